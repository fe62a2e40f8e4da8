"""
How commands are declared: L{command} registers a function that takes a
L{meteredrt.commands.session.Session} and the parsed arguments and returns
an L{Output}; L{meteredrt.cli} builds the parser from L{COMMANDS}.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from attrs import frozen

from meteredrt.commands.session import Session, UsageError

__all__ = ["COMMANDS", "Output", "Run", "UsageError", "argument", "command"]


@frozen
class Output:
    """
    What a command prints: ``data`` with ``--json``, ``text`` otherwise.
    """

    data: Any
    text: str


@frozen
class _Argument:
    names: tuple[str, ...]
    options: dict[str, Any]


def argument(*names: str, **options: Any) -> _Argument:
    """
    Declare one argument of a command, as for
    C{ArgumentParser.add_argument}.
    """
    return _Argument(names, options)


Run = Callable[[Session, argparse.Namespace], Output]


@frozen
class _Command:
    words: tuple[str, ...]
    help: str
    arguments: tuple[_Argument, ...]
    run: Run


COMMANDS: list[_Command] = []


def command(words: str, help: str, *arguments: _Argument) -> Callable[[Run], Run]:
    """
    Register a subcommand: ``@command("apps set-plan", "Replace a plan.",
    argument("app_id"), ...)`` above a function taking a L{Session} and the
    parsed arguments and returning an L{Output}.

    :param words: the command words, such as ``"keys create"`` or
        ``"usage"``.
    """

    def register(run: Run) -> Run:
        COMMANDS.append(_Command(tuple(words.split()), help, arguments, run))
        return run

    return register
