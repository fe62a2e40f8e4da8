"""
The ``meteredrt`` console script: apps, keys, tokens, plans and usage from
the shell.

It works on the same store as a running server (L{meteredrt.store}: the
SQLite files of the data directory, or the PostgreSQL database of
``--database`` / ``[storage] database``), through the same table functions,
synchronously: there is no reactor here. A key revoked with
``meteredrt keys revoke`` stops authenticating on a running server, and its
open sessions are closed with 4001, within a few seconds, when the server
next re-reads the store.

This module builds the parser and runs a command; the commands themselves
live in L{meteredrt.commands}, one module per group. Each is one function
registered with L{meteredrt.commands.registry.command}; it receives a
L{Session} (the store and configuration file the user chose) and the parsed
arguments, and returns an L{meteredrt.commands.registry.Output} that L{main}
prints as text or, with ``--json``, as JSON. Anything that goes wrong is one
line on stderr and exit status 2, never a traceback.

A secret is printed by ``keys create`` only, once. ``keys list`` never
prints one.

``apps set-plan`` edits an app's stored plan (a running server applies it at
its next re-read, within about 2 s). ``apps suspend`` and ``apps resume`` set
an app's stored suspension flag, for config-declared apps too (the
configuration file cannot suspend an app); at its next re-read a running
server closes the suspended app's connections with 4012. ``usage`` reads the
counters and ledger the server flushes to the store (see
``docs/metering.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from meteredrt import auth

# The command modules register their commands when imported.
from meteredrt.commands import apps, config, keys, tokens, usage, webhooks  # noqa: F401
from meteredrt.commands.registry import COMMANDS, UsageError
from meteredrt.commands.session import Session
from meteredrt.config import DEFAULT_DATA_DIR, ConfigError, apply_options, default_config, load_config
from meteredrt.store.database import DriverMissing, driver_errors
from meteredrt.store.keys import InvalidKeyField, KeyStoreError
from meteredrt.store.schema import SchemaTooNew
from meteredrt.version import package_version


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the command words, either counts.
    common.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"state directory (default: the config's data_dir, else {DEFAULT_DATA_DIR})",
    )
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML configuration file; the apps and keys it declares are included",
    )
    common.add_argument(
        "--database",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="PostgreSQL URL of the store (default: the config's [storage] database, else SQLite in the data dir)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    return common


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of every registered command.
    """
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="meteredrt", description="Manage meteredrt apps, keys and tokens.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"meteredrt {package_version()}")
    groups: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(metavar="COMMAND", required=True)}
    for entry in COMMANDS:
        for depth in range(1, len(entry.words)):
            prefix = entry.words[:depth]
            if prefix not in groups:
                group = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = group.add_subparsers(metavar="COMMAND", required=True)
        leaf = groups[entry.words[:-1]].add_parser(
            entry.words[-1], help=entry.help, description=entry.help, parents=[common]
        )
        for arg in entry.arguments:
            leaf.add_argument(*arg.names, **arg.options)
        leaf.set_defaults(run=entry.run)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """
    Run the ``meteredrt`` command line.

    :return: the exit status: 0 on success, 2 on any error.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as e:
        # --help (0) or a usage error (2), already printed by argparse.
        return e.code if isinstance(e.code, int) else 2
    storage_errors: tuple[type[Exception], ...] = (OSError, *driver_errors())
    try:
        config_path = getattr(args, "config", None)
        config = default_config() if config_path is None else load_config(config_path)
        config = apply_options(config, database=getattr(args, "database", None))
        data_dir = getattr(args, "data_dir", None) or config.data_dir
        output = args.run(Session(data_dir, config, clock), args)
    except (UsageError, ConfigError, KeyStoreError, auth.MintError, SchemaTooNew, DriverMissing) as e:
        print(f"meteredrt: error: {_describe_error(e)}", file=stderr)
        return 2
    except storage_errors as e:
        print(f"meteredrt: error: {_describe_storage_error(e)}", file=stderr)
        return 2
    if getattr(args, "json", False):
        json.dump(output.data, stdout, indent=2, sort_keys=True)
        stdout.write("\n")
    else:
        stdout.write(output.text.rstrip("\n") + "\n")
    return 0


# Key-store field names as the user typed them.
_FLAGS = {
    "channel_patterns": "--channels",
    "actions": "--actions",
    "allowed_origins": "--origins",
    "message_rate": "--message-rate",
    "message_burst": "--message-burst",
    "app_id": "APP_ID",
}


def _describe_error(error: Exception) -> str:
    if isinstance(error, InvalidKeyField):
        name, bracket, rest = error.field.partition("[")
        return f"{_FLAGS.get(name, name)}{bracket}{rest}: {error.problem}"
    if isinstance(error, auth.MintError):
        return f"cannot mint token: {error}"
    return str(error)


def _describe_storage_error(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return f"database: {error}"
