"""
Read the code blocks of the project's C{README.md}, so that the tests run
what a new user copies from it and the two cannot drift apart.

Main names: L{setup_commands}, L{code_blocks}, L{ROOT}.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The repository root (the directory holding README.md).
ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def _section(heading: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise AssertionError(f"README.md has no '## {heading}' section")
    return match.group(1)


def code_blocks(heading: str, language: str) -> list[str]:
    """
    The fenced code blocks tagged C{language} in the README section titled
    C{heading}, in order, without their fences.
    """
    return [body for lang, body in _FENCE.findall(_section(heading)) if lang == language]


def setup_commands() -> tuple[str, str]:
    """
    The README's two set-up commands: (install and run the server, install
    and run the tests).

    @raise AssertionError: unless the "Set up" section holds exactly two
        C{sh} blocks of one line each, as the README promises.
    """
    blocks = code_blocks("Set up", "sh")
    if len(blocks) != 2:
        raise AssertionError(f"README's Set up section has {len(blocks)} sh blocks, not 2: {blocks!r}")
    lines = [block.strip() for block in blocks]
    for line in lines:
        if "\n" in line:
            raise AssertionError(f"a README set-up command spans several lines: {line!r}")
    return lines[0], lines[1]
