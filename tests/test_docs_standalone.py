"""
The repository's documentation stands on its own: nothing in it, in the
code or in the tests points at files a clone does not have, and every
protocol section or design decision cited is defined in C{docs/}.

Cited as C{§N} or C{§N.M}: a section heading of C{docs/protocol.md}
(references into an RFC, "RFC 6455 §5.5.1", are left alone). Cited as
C{OP-N}: a decision defined in the table of C{docs/decisions.md}, and only
from the Markdown documentation; code and tests say what the decision is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .readme import ROOT

#: What is scanned, relative to the repository root.
_SCANNED = ("README.md", "CHANGELOG.md", "docs", "meteredrt", "tests", "bench", "examples", "contrib", "twisted", ".ci")
_SUFFIXES = {".md", ".py", ".mjs", ".js", ".html", ".service", ".toml", ".ini", ".cfg", ""}
# Third-party code and generated output: node_modules, bench/results, and
# examples/webrtc/sdk (the SDK's build, copied in by hand, not committed).
_SKIPPED_DIRECTORIES = {"node_modules", "__pycache__", "results", "_trial_temp", "sdk"}

# Built from parts so that this file does not match itself.
_OUTSIDE = re.compile(r"(?<![\w-])" + "shared" + r"/")
_DECISION = re.compile(r"\b" + "OP" + r"-(\d+)(?:/(\d+))?")
_SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")


def _files() -> Iterator[Path]:
    for name in _SCANNED:
        top = ROOT / name
        candidates = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in candidates:
            if not path.is_file() or _SKIPPED_DIRECTORIES.intersection(path.relative_to(ROOT).parts):
                continue
            if path.suffix in _SUFFIXES:
                yield path


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _defined_decisions() -> set[int]:
    defined = set()
    for line in _text(ROOT / "docs" / "decisions.md").splitlines():
        match = re.match(r"\|\s*" + "OP" + r"-(\d+)(?:/(\d+))?\s*\|", line)
        if match:
            defined.update(int(number) for number in match.groups() if number)
    return defined


def _protocol_sections() -> set[str]:
    sections = set()
    for line in _text(ROOT / "docs" / "protocol.md").splitlines():
        match = re.match(r"#{2,4} (\d+(?:\.\d+)*)\.? ", line)
        if match:
            sections.add(match.group(1))
    return sections


class StandaloneDocsTests(SynchronousTestCase):
    """
    Every citation resolves inside the repository.
    """

    def test_scan_covers_the_tree(self) -> None:
        """
        The scan sees the docs, the package and the tests (so an empty scan
        cannot pass the other tests vacuously).
        """
        seen = {path.relative_to(ROOT).parts[0] for path in _files()}
        self.assertTrue({"docs", "meteredrt", "tests", "README.md"} <= seen, seen)

    def test_no_files_outside_the_repository(self) -> None:
        """
        Nothing cites the project's private notes directory.
        """
        offenders = [
            f"{path.relative_to(ROOT)}:{number}"
            for path in _files()
            for number, line in enumerate(_text(path).splitlines(), 1)
            if _OUTSIDE.search(line)
        ]
        self.assertEqual(offenders, [])

    def test_decisions_only_in_docs_and_defined(self) -> None:
        """
        Decision numbers appear only in Markdown documentation, and each one
        is defined in C{docs/decisions.md}, which defines every number from
        1 to its highest.
        """
        defined = _defined_decisions()
        self.assertEqual(defined, set(range(1, max(defined) + 1)))
        offenders = []
        for path in _files():
            for match in _DECISION.finditer(_text(path)):
                numbers = {int(number) for number in match.groups() if number}
                if path.suffix != ".md" or not numbers <= defined:
                    offenders.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        self.assertEqual(offenders, [])

    def test_sections_exist_in_protocol_md(self) -> None:
        """
        Every C{§} reference that is not into an RFC names a heading of
        C{docs/protocol.md}.
        """
        sections = _protocol_sections()
        self.assertIn("19.6", sections)
        offenders = []
        for path in _files():
            text = _text(path)
            for match in _SECTION.finditer(text):
                if "RFC" in text[max(0, match.start() - 30) : match.start()]:
                    continue
                if match.group(1) not in sections:
                    offenders.append(f"{path.relative_to(ROOT)}: §{match.group(1)}")
        self.assertEqual(offenders, [])
