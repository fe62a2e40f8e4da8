"""
The ``meteredrt`` console script: apps, keys, tokens, plans and usage from
the shell.

It works on the same SQLite file as a running server (WAL lets both write),
synchronously: there is no reactor here. A key revoked with
``meteredrt keys revoke`` stops authenticating on a running server within a
few seconds, when the server next re-reads the file.

Each subcommand is one function registered with L{command}; it receives a
L{Session} (the data directory and configuration file the user chose) and
the parsed arguments, and returns an L{Output} that L{main} prints as text or,
with ``--json``, as JSON. Anything that goes wrong is one line on stderr and
exit status 2, never a traceback.

A secret is printed by ``keys create`` only, once. ``keys list`` never
prints one.

``apps set-plan`` edits an app's stored plan (a running server applies it at
its next re-read, within about 2 s). ``apps suspend`` and ``apps resume`` set
an app's stored suspension flag, for config-declared apps too (the
configuration file cannot suspend an app); at its next re-read a running
server closes the suspended app's connections with 4012. ``usage`` reads the
counters and ledger the server flushes to ``usage.sqlite3`` (see
``docs/metering.md``).
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO, TypeVar, cast

import attrs
import jwt
import treq
from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from meteredrt import auth
from meteredrt.apps import (
    ACTIONS,
    DEFAULT_MESSAGE_BURST,
    DEFAULT_MESSAGE_RATE,
    PUBLISHABLE_DEFAULT_ACTIONS,
    App,
    Key,
    KeyType,
    Plan,
    TurnConfig,
    message_rate_problems,
)
from meteredrt.backend import mint_token_with_turn
from meteredrt.config import (
    DEFAULT_DATA_DIR,
    AppDeclaration,
    Config,
    ConfigError,
    default_config,
    load_config,
)
from meteredrt.keystore import (
    BUSY_TIMEOUT_MS,
    InvalidKeyField,
    KeyStoreError,
    StoredState,
    Tenancy,
    connect,
    create_schema,
    database_path,
    prepare_database,
    read_state,
    store_app,
    store_key,
    store_plan,
    store_revocation,
    store_suspension,
)
from meteredrt.metering import CONNECTION_OVERAGE, MESSAGE_OVERAGE, MONTH, period_bounds
from meteredrt.turn import TurnApiClient, TurnApiError
from meteredrt.usagestore import (
    CHARGE,
    RECHARGE,
    LedgerEntry,
    UsageRow,
    read_balance_changes,
    read_ledger,
    read_usage,
    usage_database_path,
)

_T = TypeVar("_T")


class UsageError(Exception):
    """
    The command line asks for something that cannot be done; the message
    says what.
    """


@frozen
class Output:
    """
    What a command prints: ``data`` with ``--json``, ``text`` otherwise.
    """

    data: Any
    text: str


class Session:
    """
    The data directory and configuration one command works on.

    Reads see the stored apps and keys overlaid by the configuration file,
    as the server sees them; writes run in one transaction each.

    :ivar data_dir: the data directory (``--data-dir``, else the
        configuration's ``data_dir``, else C{DEFAULT_DATA_DIR}).
    :ivar config: the configuration (defaults without ``--config``).
    """

    def __init__(self, data_dir: str, config: Config, clock: Callable[[], float]) -> None:
        self.data_dir = data_dir
        self.config = config
        self._clock = clock

    @property
    def declarations(self) -> tuple[AppDeclaration, ...]:
        """
        The apps and keys the configuration file declares.
        """
        return self.config.apps

    def now(self) -> float:
        """
        The current time, in seconds since the epoch.
        """
        return self._clock()

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """
        A connection to the key database, created if need be; committed if
        the block succeeds, rolled back if it raises.
        """
        connection = connect(prepare_database(self.data_dir))
        try:
            with connection:
                create_schema(connection.cursor())
                yield connection
        finally:
            connection.close()

    def tenancy(self) -> Tenancy:
        """
        The effective apps and keys. Does not create a missing database.
        """
        if not os.path.exists(database_path(self.data_dir)):
            return Tenancy.overlay(StoredState(apps={}, keys={}), self.declarations)
        with self.connection() as connection:
            state = read_state(connection.cursor())
        return Tenancy.overlay(state, self.declarations)

    def write(self, operation: Callable[..., _T], *args: Any) -> _T:
        """
        Run one of the key store's write functions (C{store_*}) in its own
        transaction.
        """
        with self.connection() as connection:
            return operation(connection.cursor(), self.declarations, *args)


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


_COMMANDS: list[_Command] = []


def command(words: str, help: str, *arguments: _Argument) -> Callable[[Run], Run]:
    """
    Register a subcommand: ``@command("apps set-plan", "Replace a plan.",
    argument("app_id"), ...)`` above a function taking a L{Session} and the
    parsed arguments and returning an L{Output}.

    :param words: the command words, such as ``"keys create"`` or
        ``"usage"``.
    """

    def register(run: Run) -> Run:
        _COMMANDS.append(_Command(tuple(words.split()), help, arguments, run))
        return run

    return register


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
    groups: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(metavar="COMMAND", required=True)}
    for entry in _COMMANDS:
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
    try:
        config_path = getattr(args, "config", None)
        config = default_config() if config_path is None else load_config(config_path)
        data_dir = getattr(args, "data_dir", None) or config.data_dir
        output = args.run(Session(data_dir, config, clock), args)
    except (UsageError, ConfigError, KeyStoreError, auth.MintError) as e:
        print(f"meteredrt: error: {_describe_error(e)}", file=stderr)
        return 2
    except (sqlite3.Error, OSError) as e:
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


def _split(values: list[str] | None) -> list[str] | None:
    """
    Comma-separated, repeatable list options: ``None`` when not given.
    """
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _json_object(option: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{option}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option}: must be a JSON object")
    return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def plan_json(plan: Plan | None) -> dict[str, Any] | None:
    """
    A plan as a JSON object with the protocol's camelCase names.
    """
    if plan is None:
        return None
    return {_camel(name): value for name, value in attrs.asdict(plan).items()}


def key_json(key: Key, *, reveal_secret: bool = False) -> dict[str, Any]:
    """
    A key as a JSON object with the protocol's camelCase names (§3.3); the
    secret only if asked to.
    """
    data: dict[str, Any] = {
        "keyId": key.key_id,
        "appId": key.app_id,
        "type": key.type.value,
        "channelPatterns": list(key.channel_patterns),
        "actions": sorted(key.actions),
        "allowedOrigins": list(key.allowed_origins),
        "autoInjectTurn": key.auto_inject_turn,
        "status": "active" if key.active else "revoked",
        "source": key.source,
    }
    if reveal_secret and key.secret is not None:
        data["secret"] = key.secret
    return data


def describe_key(key: Key, *, reveal_secret: bool = False) -> str:
    """
    A key as a few lines for humans; the secret only if asked to, with a
    reminder that it is not shown again.
    """
    lines = [
        f"{key.type.value} key {key.key_id} (app {key.app_id})",
        f"  channels:         {', '.join(key.channel_patterns)}",
        f"  actions:          {', '.join(sorted(key.actions)) or '(none)'}",
    ]
    if key.type is KeyType.PUBLISHABLE:
        lines.append(f"  allowed origins:  {', '.join(key.allowed_origins) or '(any)'}")
    lines.append(f"  auto-inject TURN: {'on' if key.auto_inject_turn else 'off'}")
    if reveal_secret and key.secret is not None:
        lines.append(f"  secret:           {key.secret}")
        lines.append("  The secret is shown only now: store it safely.")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def _app_json(app: App, tenancy: Tenancy) -> dict[str, Any]:
    return {
        "appId": app.app_id,
        "source": "config" if tenancy.is_declared(app.app_id) else "store",
        "suspended": app.suspended,
        "plan": plan_json(app.plan),
        "activeKeys": sum(1 for key in tenancy.keys_of(app.app_id) if key.active),
    }


@command("apps list", "List every app, stored or declared in the configuration file.")
def _apps_list(session: Session, args: argparse.Namespace) -> Output:
    tenancy = session.tenancy()
    apps = [_app_json(app, tenancy) for app in tenancy.apps()]
    rows = [
        [
            app["appId"],
            app["source"],
            (app["plan"] or {}).get("name") or "-",
            str(app["activeKeys"]),
            "suspended" if app["suspended"] else "active",
        ]
        for app in apps
    ]
    return Output(apps, _table(["APP", "SOURCE", "PLAN", "KEYS", "STATUS"], rows) or "No apps.")


@command("apps create", "Create an app (without keys or plan).", argument("app_id", metavar="APP_ID"))
def _apps_create(session: Session, args: argparse.Namespace) -> Output:
    app = session.write(store_app, args.app_id, None, session.now())
    return Output(_app_json(app, session.tenancy()), f"Created app {app.app_id}.")


@command(
    "apps suspend",
    "Suspend an app: connections are refused with 4012, and a running server closes the live ones "
    "with 4012 within about 2 s. Works on config-declared apps too: suspension is always stored.",
    argument("app_id", metavar="APP_ID"),
)
def _apps_suspend(session: Session, args: argparse.Namespace) -> Output:
    app = session.write(store_suspension, args.app_id, True, session.now())
    text = (
        f"Suspended app {app.app_id}.\n"
        "A running server closes its connections (4012) within about 2 s;"
        " its secret keys still authenticate REST calls."
    )
    return Output(_app_json(app, session.tenancy()), text)


@command(
    "apps resume",
    "Resume a suspended app: a running server admits its connections again within about 2 s.",
    argument("app_id", metavar="APP_ID"),
)
def _apps_resume(session: Session, args: argparse.Namespace) -> Output:
    app = session.write(store_suspension, args.app_id, False, session.now())
    text = f"Resumed app {app.app_id}.\nA running server admits its connections again within about 2 s."
    return Output(_app_json(app, session.tenancy()), text)


@command(
    "keys create",
    "Create a key; a secret key's secret is printed this once only.",
    argument("--app", required=True, metavar="APP"),
    argument("--type", required=True, choices=[t.value for t in KeyType]),
    argument(
        "--channels",
        action="append",
        metavar="PATTERNS",
        help="comma-separated channel patterns (default: **)",
    ),
    argument(
        "--actions",
        action="append",
        metavar="ACTIONS",
        help=f"comma-separated, of {', '.join(sorted(ACTIONS))} "
        "(default: all for a secret key, all but send for a publishable key)",
    ),
    argument(
        "--origins",
        action="append",
        metavar="ORIGINS",
        help="comma-separated allowed origins of a publishable key (default: any)",
    ),
    argument(
        "--no-auto-inject-turn",
        dest="auto_inject_turn",
        action="store_false",
        help="do not add TURN credentials to this key's welcome frames",
    ),
)
def _keys_create(session: Session, args: argparse.Namespace) -> Output:
    type = KeyType(args.type)
    actions = _split(args.actions)
    if actions is None:
        actions = sorted(ACTIONS if type is KeyType.SECRET else PUBLISHABLE_DEFAULT_ACTIONS)
    key = session.write(
        store_key,
        args.app,
        type,
        ("**",) if args.channels is None else tuple(_split(args.channels) or ()),
        tuple(actions),
        session.now(),
        tuple(_split(args.origins) or ()),
        args.auto_inject_turn,
    )
    return Output(key_json(key, reveal_secret=True), "Created " + describe_key(key, reveal_secret=True))


@command(
    "keys list",
    "List an app's keys (never their secrets).",
    argument("--app", required=True, metavar="APP"),
)
def _keys_list(session: Session, args: argparse.Namespace) -> Output:
    tenancy = session.tenancy()
    if tenancy.app(args.app) is None:
        raise UsageError(f"no app {args.app!r}")
    keys = tenancy.keys_of(args.app)
    rows = [
        [
            key.key_id,
            key.type.value,
            "active" if key.active else "revoked",
            key.source,
            ",".join(key.channel_patterns),
            ",".join(sorted(key.actions)),
            ",".join(key.allowed_origins) or "-",
            "on" if key.auto_inject_turn else "off",
        ]
        for key in keys
    ]
    text = _table(["KEY ID", "TYPE", "STATUS", "SOURCE", "CHANNELS", "ACTIONS", "ORIGINS", "TURN"], rows)
    return Output([key_json(key) for key in keys], text or f"App {args.app} has no keys.")


@command(
    "keys revoke",
    "Revoke a key; a running server refuses it within seconds.",
    argument("key_id", metavar="KEY_ID"),
)
def _keys_revoke(session: Session, args: argparse.Namespace) -> Output:
    if not session.write(store_revocation, args.key_id):
        raise UsageError(f"no stored key {args.key_id!r}")
    return Output({"keyId": args.key_id, "status": "revoked"}, f"Revoked key {args.key_id}.")


@command(
    "token mint",
    "Print a JWT (protocol §4) signed with a secret key.",
    argument("--app", required=True, metavar="APP"),
    argument("--key", required=True, metavar="KEY_ID", help="the sk_id_… of the signing key"),
    argument("--peer-id", required=True, metavar="PEER_ID", help="the token's sub, the peer's id"),
    argument(
        "--channels", action="append", metavar="CHANNELS", help="comma-separated channel names or patterns"
    ),
    argument("--permissions", action="append", metavar="ACTIONS", help="comma-separated actions"),
    argument("--expires-in", type=int, default=3600, metavar="SECONDS", help="lifetime (default: 3600)"),
    argument("--metadata", metavar="JSON", help="private metadata object echoed in the welcome"),
    argument("--peer-metadata", metavar="JSON", help="public metadata object shown to other peers"),
    argument(
        "--turn",
        action="store_true",
        help="embed fresh Metered TURN credentials of the app ([apps.turn]) in metadata.iceServers",
    ),
)
def _token_mint(session: Session, args: argparse.Namespace) -> Output:
    metadata = _json_object("--metadata", args.metadata)
    peer_metadata = _json_object("--peer-metadata", args.peer_metadata)
    tenancy = session.tenancy()
    app = tenancy.app(args.app)
    if app is None:
        raise UsageError(f"no app {args.app!r}")
    key = tenancy.key(args.key)
    if key is None or key.app_id != args.app:
        raise UsageError(f"app {args.app!r} has no key {args.key!r}")
    if key.type is not KeyType.SECRET:
        raise UsageError(f"{args.key} is a publishable key; only secret keys sign tokens")
    if not key.active:
        raise UsageError(f"key {args.key!r} is revoked")
    claims: dict[str, Any] = dict(
        now=int(session.now()),
        expires_in=args.expires_in,
        channels=_split(args.channels),
        permissions=_split(args.permissions),
        metadata=metadata,
        peer_metadata=peer_metadata,
    )
    if not args.turn:
        token = auth.mint_token(key, args.peer_id, **claims)
    elif app.turn is None:
        raise UsageError(f"app {args.app!r} has no [apps.turn] configuration")
    else:
        token = _mint_with_turn(key, args.peer_id, app.turn, claims)
    claims = jwt.decode(token, options={"verify_signature": False})
    data = {"token": token, "keyId": key.key_id, "peerId": args.peer_id, "expiresAt": claims["exp"]}
    return Output(data, token)


def _mint_with_turn(key: Key, peer_id: str, turn: TurnConfig, claims: dict[str, Any]) -> str:
    """
    Run the reactor just long enough for the two TURN API calls of
    L{mint_token_with_turn}. The CLI is an entry point of its own, like the
    twistd plugin, so it may drive the global reactor.
    """
    from twisted.internet import reactor
    from twisted.internet.base import ReactorBase

    outcome: list[Any] = []

    async def work() -> str:
        client = TurnApiClient(treq, reactor, timeout=10.0)
        token, _ = await mint_token_with_turn(key, peer_id, client, turn, **claims)
        return token

    def finish(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(work()).addBoth(finish))
    # IReactorCore.run declares no parameters, but every reactor Twisted
    # ships runs ReactorBase.run, which takes installSignalHandlers.
    cast(ReactorBase, reactor).run(installSignalHandlers=False)
    [result] = outcome
    if isinstance(result, Failure):
        if result.check(TurnApiError):
            raise UsageError(f"the TURN API failed: {result.value}")
        result.raiseException()
    return result


# -- plans and usage -------------------------------------------------------

#: C{apps set-plan} options and the L{Plan} fields they set.
_PLAN_OPTIONS = {
    "name": "--name",
    "max_concurrent_connections": "--max-connections",
    "max_messages_per_period": "--max-messages",
    "overages_allowed": "--overages-allowed",
    "overages_enabled": "--overages-enabled",
    "overage_rate_per_1000_messages": "--overage-rate-per-1000",
    "overage_rate_per_connection": "--overage-rate-per-connection",
    "balance": "--balance",
    "auto_recharge_amount": "--auto-recharge-amount",
    "auto_recharge_threshold": "--auto-recharge-threshold",
    "message_rate": "--message-rate",
    "message_burst": "--message-burst",
}

#: Words that clear a cap (the axis becomes unlimited).
_UNLIMITED = ("none", "unlimited")


def _cap(text: str) -> int | None:
    """
    An argparse type: a cap is a whole number of at least 0, or
    ``unlimited``/``none`` for no cap.
    """
    if text.strip().lower() in _UNLIMITED:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'unlimited', not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _number(text: str, *, signed: bool = False) -> float:
    """
    A finite number, at least 0 unless ``signed``, for the argparse types
    below.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    if not signed and value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
    return value


def _amount(text: str) -> float:
    """
    An argparse type: a non-negative amount of money or a rate.
    """
    return _number(text)


def _balance(text: str) -> float:
    """
    An argparse type: an opening balance, which may be negative (overage
    billed after the fact can leave a debt).
    """
    return _number(text, signed=True)


def _month(text: str) -> int:
    """
    An argparse type: ``YYYY-MM``, a calendar month (UTC), as the Unix time
    it starts at.
    """
    year, dash, month = text.partition("-")
    if not (dash and len(year) == 4 and len(month) == 2 and year.isdigit() and month.isdigit()):
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, not {text!r}")
    if not 1 <= int(month) <= 12:
        raise argparse.ArgumentTypeError(f"no month {month} in {text!r}")
    return calendar.timegm((int(year), int(month), 1, 0, 0, 0, 0, 0, 0))


def _replace_plan(
    cursor: Any,
    declarations: Sequence[AppDeclaration],
    app_id: str,
    changes: dict[str, Any],
    unmetered: bool,
    now: float,
) -> App:
    """
    In one transaction: the app's stored plan with ``changes`` applied (a
    fresh L{Plan} when it has none), or no plan if ``unmetered``.
    """
    # Hold the write lock from the read to the write, so a concurrent
    # set-plan cannot be lost between them.
    if not cursor.connection.in_transaction:
        cursor.execute("BEGIN IMMEDIATE")
    current = Tenancy.overlay(read_state(cursor), declarations).app(app_id)
    if current is None:
        raise UsageError(f"no app {app_id!r}")
    plan = None if unmetered else attrs.evolve(current.plan or Plan(), **changes)
    if plan is not None:
        # Checked on the result: one option may only be wrong given the other.
        for field, problem in message_rate_problems(plan.message_rate, plan.message_burst):
            raise UsageError(f"{_PLAN_OPTIONS[field]} {problem}")
    return store_plan(cursor, declarations, app_id, plan, now)


def describe_plan(plan: Plan | None) -> str:
    """
    A plan as a few indented lines for humans.
    """
    if plan is None:
        return "  unmetered (no plan): always admitted, still counted"

    def cap(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    overages = "not allowed"
    if plan.overages_allowed:
        overages = "on" if plan.overages_enabled else "allowed, switched off"
    recharge = "off"
    if plan.auto_recharge_amount > 0:
        recharge = f"{plan.auto_recharge_amount:g} when below {plan.auto_recharge_threshold:g}"
    return "\n".join(
        [
            f"  name:                   {plan.name or '-'}",
            f"  max connections:        {cap(plan.max_concurrent_connections)}",
            f"  max messages/period:    {cap(plan.max_messages_per_period)} (per {plan.period}, UTC)",
            f"  overages:               {overages}",
            f"  overage rates:          {plan.overage_rate_per_1000_messages:g} per 1000 messages, "
            f"{plan.overage_rate_per_connection:g} per connection",
            f"  opening balance:        {plan.balance:g}",
            f"  auto-recharge:          {recharge}",
            f"  per connection:         {plan.message_rate:g} messages/s, bursts of {plan.message_burst:g}",
        ]
    )


@command(
    "apps set-plan",
    "Change an app's plan: the options given replace those fields of its current plan (or of a "
    "fresh one); --unmetered removes the plan. A running server applies it within about 2 s.",
    argument("app_id", metavar="APP_ID"),
    argument("--name", default=argparse.SUPPRESS, metavar="NAME", help="plan name, such as SIGNALLING_BASIC"),
    argument(
        "--max-connections",
        default=argparse.SUPPRESS,
        dest="max_concurrent_connections",
        type=_cap,
        metavar="N",
        help="cap on concurrent connections, or 'unlimited'",
    ),
    argument(
        "--max-messages",
        default=argparse.SUPPRESS,
        dest="max_messages_per_period",
        type=_cap,
        metavar="N",
        help="cap on messages per billing period, or 'unlimited'",
    ),
    argument(
        "--overages-allowed",
        default=argparse.SUPPRESS,
        action=argparse.BooleanOptionalAction,
        help="whether the plan permits overage at all",
    ),
    argument(
        "--overages-enabled",
        default=argparse.SUPPRESS,
        action=argparse.BooleanOptionalAction,
        help="the customer's overage switch",
    ),
    argument(
        "--overage-rate-per-1000",
        default=argparse.SUPPRESS,
        dest="overage_rate_per_1000_messages",
        type=_amount,
        metavar="AMOUNT",
        help="price of 1000 overage messages",
    ),
    argument(
        "--overage-rate-per-connection",
        default=argparse.SUPPRESS,
        type=_amount,
        metavar="AMOUNT",
        help="price of one connection admitted over the cap",
    ),
    argument(
        "--balance",
        default=argparse.SUPPRESS,
        type=_balance,
        metavar="AMOUNT",
        help="opening prepaid balance (may be negative)",
    ),
    argument(
        "--auto-recharge-amount",
        default=argparse.SUPPRESS,
        type=_amount,
        metavar="AMOUNT",
        help="amount of one automatic recharge (0: off)",
    ),
    argument(
        "--auto-recharge-threshold",
        default=argparse.SUPPRESS,
        type=_amount,
        metavar="AMOUNT",
        help="recharge when a charge would leave the balance below this",
    ),
    argument(
        "--message-rate",
        default=argparse.SUPPRESS,
        type=_amount,
        metavar="PER_SECOND",
        help=f"messages per second each connection may send (default {DEFAULT_MESSAGE_RATE:g}; over it: close 4011)",
    ),
    argument(
        "--message-burst",
        default=argparse.SUPPRESS,
        type=_amount,
        metavar="N",
        help=f"messages a connection may send at once above its rate (default {DEFAULT_MESSAGE_BURST:g})",
    ),
    argument("--unmetered", action="store_true", help="remove the plan: the app is counted, never limited"),
)
def _apps_set_plan(session: Session, args: argparse.Namespace) -> Output:
    # Plan options default to absent, so that "unlimited" (None) is a value.
    given = {field: option for field, option in _PLAN_OPTIONS.items() if hasattr(args, field)}
    if args.unmetered and given:
        raise UsageError(
            f"--unmetered removes the plan; it cannot be combined with {', '.join(given.values())}"
        )
    if not args.unmetered and not given:
        raise UsageError("give at least one plan option, or --unmetered")
    changes = {field: getattr(args, field) for field in given}
    app = session.write(_replace_plan, args.app_id, changes, args.unmetered, session.now())
    text = (
        f"Plan of app {app.app_id}:\n{describe_plan(app.plan)}\n"
        "A running server applies it within about 2 s."
    )
    return Output(_app_json(app, session.tenancy()), text)


def _read_usage_file(
    path: str, app_id: str, period_start: int
) -> tuple[UsageRow | None, list[LedgerEntry], float]:
    """
    One app's counters and ledger entries for one period, and its net ledger
    total over all periods, read with plain C{sqlite3} in one read
    transaction (one snapshot, so the counters and the ledger agree even
    while a server flushes). A missing file holds nothing.
    """
    if not os.path.exists(path):
        return None, [], 0.0
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        cursor.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('usage', 'ledger')"
        )
        if cursor.fetchone()[0] < 2:
            # The server creates both tables before its first flush.
            return None, [], 0.0
        row = read_usage(cursor, app_id, period_start)
        entries = read_ledger(cursor, app_id, period_start)
        net = read_balance_changes(cursor).get(app_id, 0.0)
    finally:
        connection.rollback()
        connection.close()
    return row, entries, net


def usage_report(
    app: App,
    row: UsageRow | None,
    bounds: tuple[int, int],
    entries: Sequence[LedgerEntry],
    net: float,
) -> dict[str, Any]:
    """
    The figures of §19.6 as stored for one period (without the live
    C{concurrentNow}), with the period's ledger totals and the balance now.
    """
    plan = app.plan
    charges = [entry for entry in entries if entry.kind == CHARGE]
    recharges = [entry for entry in entries if entry.kind == RECHARGE]
    return {
        "appId": app.app_id,
        "periodStartUnix": bounds[0],
        "periodEndUnix": bounds[1],
        "peakConcurrent": row.peak_concurrent if row else 0,
        "messagesUsed": row.messages_used if row else 0,
        "overageMessages": row.overage_messages if row else 0,
        "overageConnections": row.overage_connections if row else 0,
        "plan": {
            "name": plan.name if plan else None,
            "maxConcurrentConnections": plan.max_concurrent_connections if plan else None,
            "maxMessagesPerPeriod": plan.max_messages_per_period if plan else None,
            "overagesAllowed": plan.overages_allowed if plan else None,
            "overagesEnabled": plan.overages_enabled if plan else None,
        },
        "ledger": {
            "entries": len(entries),
            "chargedMessages": sum(e.units for e in charges if e.reason == MESSAGE_OVERAGE),
            "chargedConnections": sum(e.units for e in charges if e.reason == CONNECTION_OVERAGE),
            "charged": sum((e.amount for e in charges), 0.0),
            "recharges": len(recharges),
            "recharged": sum((e.amount for e in recharges), 0.0),
        },
        "balance": (plan.balance if plan else 0.0) + net,
    }


def plan_summary(plan: Plan | None) -> str:
    """
    A plan in one line: its name and caps.
    """
    if plan is None:
        return "unmetered"

    def cap(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    return (
        f"{plan.name or '(unnamed)'}: {cap(plan.max_concurrent_connections)} connections, "
        f"{cap(plan.max_messages_per_period)} messages per {plan.period}"
    )


def describe_usage(report: dict[str, Any], plan: Plan | None) -> str:
    """
    A usage report (L{usage_report}) as a few lines for humans.
    """
    start = time.gmtime(report["periodStartUnix"])
    ledger = report["ledger"]
    return "\n".join(
        [
            f"Usage of app {report['appId']} in {time.strftime('%Y-%m', start)} "
            f"[{report['periodStartUnix']}, {report['periodEndUnix']}) UTC",
            f"  plan (current):       {plan_summary(plan)}",
            f"  peak concurrent:      {report['peakConcurrent']}",
            f"  messages used:        {report['messagesUsed']}",
            f"  overage messages:     {report['overageMessages']}",
            f"  overage connections:  {report['overageConnections']}",
            f"  ledger entries:       {ledger['entries']}",
            f"  charged:              {ledger['charged']:g} for {ledger['chargedMessages']} messages "
            f"and {ledger['chargedConnections']} connections",
            f"  recharged:            {ledger['recharged']:g} in {ledger['recharges']} recharges",
            f"  balance now:          {report['balance']:g}",
        ]
    )


@command(
    "usage",
    "Print an app's usage for the current billing period (or --period YYYY-MM) as flushed to "
    "usage.sqlite3 by the server, at most about a second behind it.",
    argument("--app", required=True, metavar="APP"),
    argument("--period", type=_month, metavar="YYYY-MM", help="a past calendar month (UTC)"),
)
def _usage(session: Session, args: argparse.Namespace) -> Output:
    app = session.tenancy().app(args.app)
    if app is None:
        raise UsageError(f"no app {args.app!r}")
    if args.period is None:
        bounds = period_bounds(session.now(), app.plan.period if app.plan else MONTH)
    else:
        bounds = period_bounds(args.period, MONTH)
    row, entries, net = _read_usage_file(usage_database_path(session.data_dir), app.app_id, bounds[0])
    report = usage_report(app, row, bounds, entries, net)
    return Output(report, describe_usage(report, app.plan))
