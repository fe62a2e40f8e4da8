"""
The TOML configuration file, read into one frozen L{Config}.

Operators who manage infrastructure as code declare the server's options,
their apps and those apps' keys in one file; L{load_config} reads and checks
it, L{default_config} is what runs when there is no file, and
L{apply_options} lays command-line options over either.

Every problem is a L{ConfigError} whose text names the file, the key path
inside it (``apps[0].keys[1].actions``) and what is wrong, so that the
server can refuse to start with one line and never a traceback.

The checks on a key's fields (L{key_field_problems}, L{app_id_problem}) are
public because the key store and the CLI apply the same rules to keys they
create.

This module is pure: it reads one file when asked to and imports nothing
from Twisted.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time
from typing import Any, NoReturn

from attrs import evolve, frozen

from meteredrt.apps import (
    ACTIONS,
    KEY_ID_PREFIX,
    MAX_KEYS_PER_APP,
    SECRET_PREFIX,
    App,
    Key,
    KeyType,
    Plan,
    TurnConfig,
    message_rate_problems,
)
from meteredrt.clientaddress import TrustedProxies
from meteredrt.globs import pattern_error

#: What ``twistd -n meteredrt`` listens on without a file or ``--listen``.
DEFAULT_LISTEN: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)

#: Where state lives without a file or ``--data-dir``; relative to the
#: working directory, like every relative ``data_dir``.
DEFAULT_DATA_DIR = "./meteredrt-data"

#: WebSocket upgrades accepted per source IP per 60 s.
DEFAULT_UPGRADE_RATE_LIMIT = 60

#: Regions the Metered TURN API accepts (protocol §20.2).
TURN_REGIONS: frozenset[str] = frozenset(
    {
        "global", "north_america", "europe", "eu", "asia", "oceania", "us_west",
        "us_central", "us_east", "canada_central", "canada_east", "europe_west",
        "europe_central", "asia_west", "asia_east", "canada", "usa", "uk",
        "singapore", "india", "australia", "standard",
    }
)  # fmt: skip

#: Plan periods meteredrt can meter (OP-33).
PLAN_PERIODS: frozenset[str] = frozenset({"month"})

# App ids end up in URLs, logs and (in a cluster) Redis key names: keep them
# to a conservative alphabet.
_APP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Key ids travel in query strings (``?key=pk_live_…``) and JWT headers, and
# id and secret are joined by a colon in the REST credential: URL-safe
# base64 characters only, which is also what generated ids use.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

# An origin as browsers send it: scheme, host, optional port; no path, no
# trailing slash (OP-6 compares exactly, so anything else never matches).
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


class ConfigError(Exception):
    """
    The configuration file cannot be used.

    ``str()`` gives one line naming the file, the key path and the problem.

    :ivar source: the file name (or ``"<command line>"``).
    :ivar where: the key path inside it, such as ``apps[0].keys[1].actions``,
        or ``""`` for the file as a whole.
    :ivar problem: what is wrong.
    """

    def __init__(self, source: str, where: str, problem: str) -> None:
        self.source = source
        self.where = where
        self.problem = problem
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


@frozen
class AppDeclaration:
    """
    One ``[[apps]]`` table: the app and the keys declared with it.

    The keys carry ``source="config"``; they override stored keys of the
    same id.
    """

    app: App
    keys: tuple[Key, ...] = ()


@frozen
class Config:
    """
    Everything the server reads from its configuration file.

    :ivar source: the file this came from, or ``None`` for the defaults.
    :ivar upgrade_rate_limit: WebSocket upgrades accepted per source IP
        per 60 s; the next one is answered with HTTP 429.
    :ivar trusted_proxies: the networks of reverse proxies whose
        ``X-Forwarded-For`` names the client
        (L{meteredrt.clientaddress.client_address}); empty trusts nobody.
    """

    listen: tuple[str, ...] = DEFAULT_LISTEN
    data_dir: str = DEFAULT_DATA_DIR
    apps: tuple[AppDeclaration, ...] = ()
    upgrade_rate_limit: int = DEFAULT_UPGRADE_RATE_LIMIT
    trusted_proxies: TrustedProxies = ()
    source: str | None = None


def default_config() -> Config:
    """
    The configuration used when no file is given: listen on loopback port
    8080, keep state in ``./meteredrt-data``, declare no apps (the key store
    then bootstraps the ``default`` app).
    """
    return Config()


def apply_options(
    config: Config, *, listen: Sequence[str] = (), data_dir: str | None = None
) -> Config:
    """
    Lay command-line options over a configuration.

    ``--listen`` given at least once replaces the file's whole ``listen``
    list (it does not add to it); ``--data-dir`` replaces ``data_dir``.

    :raises ConfigError: for an empty endpoint or data directory.
    """
    where = "<command line>"
    for index, endpoint in enumerate(listen):
        if not endpoint.strip():
            raise ConfigError(where, f"--listen[{index}]", "must not be empty")
    if data_dir is not None and not data_dir.strip():
        raise ConfigError(where, "--data-dir", "must not be empty")
    return evolve(
        config,
        listen=tuple(listen) if listen else config.listen,
        data_dir=config.data_dir if data_dir is None else data_dir,
    )


def load_config(path: str) -> Config:
    """
    Read and check a TOML configuration file.

    :raises ConfigError: if the file cannot be read, is not valid TOML, or
        declares anything unknown, mistyped, duplicated or invalid.
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        # The message carries "(at line L, column C)".
        raise ConfigError(path, "", f"invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 (byte {e.start})") from None
    return _read_document(path, document)


def app_id_problem(app_id: str) -> str | None:
    """
    What is wrong with an app id, or ``None`` if it is usable.
    """
    if not _APP_ID.fullmatch(app_id):
        return (
            "must be 1-64 characters of letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return None


def key_field_problems(
    type: KeyType,
    channel_patterns: Sequence[str],
    actions: Iterable[str],
    allowed_origins: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """
    Check the configurable fields of a key (protocol §3.3).

    :return: ``(field, problem)`` pairs, where ``field`` is the TOML name
        with the offending index (``channel_patterns[2]``); empty if the
        key is valid.
    """
    problems: list[tuple[str, str]] = []
    if not channel_patterns:
        problems.append(("channel_patterns", "must list at least one pattern"))
    for index, pattern in enumerate(channel_patterns):
        # An empty pattern is a valid glob, but it matches only the empty
        # channel name, which §9.1 forbids: surely a mistake.
        error = "must not be empty" if not pattern else pattern_error(pattern)
        if error is not None:
            problems.append((f"channel_patterns[{index}]", f"invalid pattern {pattern!r}: {error}"))
    for index, action in enumerate(actions):
        if action not in ACTIONS:
            problems.append(
                (f"actions[{index}]", f"unknown action {action!r} (expected one of {_listing(ACTIONS)})")
            )
    if allowed_origins and type is not KeyType.PUBLISHABLE:
        problems.append(("allowed_origins", "applies to publishable keys only"))
    for index, origin in enumerate(allowed_origins):
        if not _ORIGIN.fullmatch(origin):
            problems.append(
                (
                    f"allowed_origins[{index}]",
                    f"{origin!r} is not an origin like 'https://app.example.com' "
                    "(lower-case scheme, no path, no trailing slash)",
                )
            )
    return problems


def key_id_problem(type: KeyType, key_id: str) -> str | None:
    """
    What is wrong with a key id for a key of this type, or ``None``.
    """
    prefix = KEY_ID_PREFIX[type]
    if not key_id.startswith(prefix) or len(key_id) == len(prefix):
        return f"a {type.value} key id must start with {prefix!r} followed by a token"
    if not _TOKEN.fullmatch(key_id):
        return "may contain only letters, digits, '_' and '-'"
    return None


def secret_problem(secret: str) -> str | None:
    """
    What is wrong with a signing secret, or ``None``.
    """
    if not secret.startswith(SECRET_PREFIX) or len(secret) == len(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX!r} followed by a token"
    if not _TOKEN.fullmatch(secret):
        return "may contain only letters, digits, '_' and '-'"
    return None


def _listing(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


_TOML_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
    (datetime, "a date-time"),
    (date, "a date"),
    (time, "a time"),
)


def _toml_type(value: object) -> str:
    for kind, name in _TOML_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


_REQUIRED: Any = object()


class _Table:
    """
    One TOML table being read: knows its file and key path for messages,
    and rejects keys it does not know before anything else is read.
    """

    def __init__(self, source: str, where: str, value: object, known: Iterable[str]) -> None:
        self.source = source
        self.where = where
        if not isinstance(value, dict):
            self.fail("", f"must be a table, not {_toml_type(value)}")
        self._values: dict[str, object] = value
        known = sorted(known)
        for name in value:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (expected one of {', '.join(known)})"
                self.fail(name, f"unknown key {name!r}{hint}")

    def path(self, name: str) -> str:
        if not name:
            return self.where
        if name.startswith("["):
            return f"{self.where}{name}"
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, problem: str) -> NoReturn:
        raise ConfigError(self.source, self.path(name), problem)

    def _missing(self, name: str, default: Any) -> bool:
        if name in self._values:
            return False
        if default is _REQUIRED:
            self.fail(name, "is required")
        return True

    def _typed(self, name: str, value: object, kind: type | tuple[type, ...], expected: str) -> Any:
        # bool is a subclass of int in Python, but not in TOML.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self.fail(name, f"must be {expected}, not {_toml_type(value)}")
        return value

    def string(self, name: str, default: Any = _REQUIRED, *, non_empty: bool = True) -> Any:
        if self._missing(name, default):
            return default
        value = self._values[name]
        self._typed(name, value, str, "a string")
        if non_empty and not value:
            self.fail(name, "must not be empty")
        return value

    def boolean(self, name: str, default: Any = _REQUIRED) -> Any:
        if self._missing(name, default):
            return default
        value = self._values[name]
        return self._typed(name, value, bool, "a boolean (true or false)")

    def integer(self, name: str, default: Any = _REQUIRED, *, minimum: int = 0) -> Any:
        if self._missing(name, default):
            return default
        value = self._typed(name, self._values[name], int, "an integer")
        if value < minimum:
            self.fail(name, f"must be at least {minimum}, not {value}")
        return value

    def number(self, name: str, default: Any = _REQUIRED, *, minimum: float | None = 0.0) -> Any:
        if self._missing(name, default):
            return default
        value = self._typed(name, self._values[name], (int, float), "a number")
        if minimum is not None and value < minimum:
            self.fail(name, f"must be at least {minimum}, not {value}")
        return float(value)

    def strings(self, name: str, default: Any = _REQUIRED) -> Any:
        if self._missing(name, default):
            return default
        value = self._typed(name, self._values[name], list, "an array of strings")
        for index, item in enumerate(value):
            self._typed(f"{name}[{index}]", item, str, "a string")
        return tuple(value)

    def table(self, name: str, known: Iterable[str]) -> _Table | None:
        if name not in self._values:
            return None
        return _Table(self.source, self.path(name), self._values[name], known)

    def tables(self, name: str, known: Iterable[str]) -> list[_Table]:
        raw = [] if self._missing(name, []) else self._values[name]
        value = self._typed(name, raw, list, "an array of tables")
        return [
            _Table(self.source, self.path(f"{name}[{index}]"), item, known)
            for index, item in enumerate(value)
        ]


_TOP_LEVEL = ("server", "apps")
_SERVER_KEYS = ("listen", "data_dir", "upgrade_rate_limit", "trusted_proxies")
_APP_KEYS = ("id", "plan", "turn", "keys")
_PLAN_KEYS = (
    "name",
    "max_concurrent_connections",
    "max_messages_per_period",
    "overages_allowed",
    "overages_enabled",
    "overage_rate_per_1000_messages",
    "overage_rate_per_connection",
    "balance",
    "auto_recharge_amount",
    "auto_recharge_threshold",
    "period",
    "message_rate",
    "message_burst",
)
_TURN_KEYS = ("app_name", "secret_key", "region", "ttl", "api_base")
_KEY_KEYS = (
    "type",
    "key_id",
    "secret",
    "channel_patterns",
    "actions",
    "allowed_origins",
    "auto_inject_turn",
)


def _read_document(source: str, document: dict[str, Any]) -> Config:
    top = _Table(source, "", document, _TOP_LEVEL)
    config = Config(source=source)
    server = top.table("server", _SERVER_KEYS)
    if server is not None:
        listen = server.strings("listen", config.listen)
        if not listen:
            server.fail("listen", "must list at least one endpoint")
        for index, endpoint in enumerate(listen):
            if not endpoint.strip():
                server.fail(f"listen[{index}]", "must not be empty")
        config = evolve(
            config,
            listen=listen,
            data_dir=server.string("data_dir", config.data_dir),
            upgrade_rate_limit=server.integer("upgrade_rate_limit", config.upgrade_rate_limit, minimum=1),
            trusted_proxies=_read_trusted_proxies(server),
        )
    declarations = tuple(_read_app(table) for table in top.tables("apps", _APP_KEYS))
    _check_unique(top, declarations)
    return evolve(config, apps=declarations)


def _read_trusted_proxies(server: _Table) -> TrustedProxies:
    networks = []
    for index, entry in enumerate(server.strings("trusted_proxies", ())):
        try:
            # strict=False: "10.1.2.3/8" means the network 10.0.0.0/8.
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            server.fail(f"trusted_proxies[{index}]", f"not an IP address or network: {entry!r}")
        if network.prefixlen == 0:
            # Trusting every peer lets every client choose its own address.
            server.fail(f"trusted_proxies[{index}]", f"{entry!r} holds every address; list the proxies' networks")
        networks.append(network)
    return tuple(networks)


def _check_unique(top: _Table, declarations: tuple[AppDeclaration, ...]) -> None:
    app_at: dict[str, int] = {}
    key_at: dict[str, str] = {}
    for app_index, declaration in enumerate(declarations):
        app_id = declaration.app.app_id
        if app_id in app_at:
            top.fail(f"apps[{app_index}].id", f"duplicate app id {app_id!r} (also apps[{app_at[app_id]}])")
        app_at[app_id] = app_index
        for key_index, key in enumerate(declaration.keys):
            here = f"apps[{app_index}].keys[{key_index}]"
            if key.key_id in key_at:
                top.fail(f"{here}.key_id", f"duplicate key id {key.key_id!r} (also {key_at[key.key_id]})")
            key_at[key.key_id] = here


def _read_app(table: _Table) -> AppDeclaration:
    app_id = table.string("id")
    problem = app_id_problem(app_id)
    if problem is not None:
        table.fail("id", problem)
    plan_table = table.table("plan", _PLAN_KEYS)
    turn_table = table.table("turn", _TURN_KEYS)
    key_tables = table.tables("keys", _KEY_KEYS)
    if len(key_tables) > MAX_KEYS_PER_APP:
        table.fail("keys", f"declares {len(key_tables)} keys; an app may have at most {MAX_KEYS_PER_APP}")
    app = App(
        app_id=app_id,
        plan=None if plan_table is None else _read_plan(plan_table),
        turn=None if turn_table is None else _read_turn(turn_table),
    )
    return AppDeclaration(app=app, keys=tuple(_read_key(app_id, key) for key in key_tables))


def _read_plan(table: _Table) -> Plan:
    defaults = Plan()
    period = table.string("period", defaults.period)
    if period not in PLAN_PERIODS:
        table.fail("period", f"unknown period {period!r} (expected one of {_listing(PLAN_PERIODS)})")
    rate = table.number("message_rate", defaults.message_rate)
    burst = table.number("message_burst", defaults.message_burst)
    for field, problem in message_rate_problems(rate, burst):
        table.fail(field, problem)
    return Plan(
        name=table.string("name", defaults.name),
        max_concurrent_connections=table.integer(
            "max_concurrent_connections", defaults.max_concurrent_connections
        ),
        max_messages_per_period=table.integer("max_messages_per_period", defaults.max_messages_per_period),
        overages_allowed=table.boolean("overages_allowed", defaults.overages_allowed),
        overages_enabled=table.boolean("overages_enabled", defaults.overages_enabled),
        overage_rate_per_1000_messages=table.number(
            "overage_rate_per_1000_messages", defaults.overage_rate_per_1000_messages
        ),
        overage_rate_per_connection=table.number(
            "overage_rate_per_connection", defaults.overage_rate_per_connection
        ),
        # A balance may run below zero when overage is billed after the fact.
        balance=table.number("balance", defaults.balance, minimum=None),
        auto_recharge_amount=table.number("auto_recharge_amount", defaults.auto_recharge_amount),
        auto_recharge_threshold=table.number("auto_recharge_threshold", defaults.auto_recharge_threshold),
        period=period,
        message_rate=rate,
        message_burst=burst,
    )


def _read_turn(table: _Table) -> TurnConfig:
    region = table.string("region", None)
    if region is not None and region not in TURN_REGIONS:
        table.fail("region", f"unknown region {region!r} (expected one of {_listing(TURN_REGIONS)})")
    api_base = table.string("api_base", None)
    if api_base is not None and not api_base.startswith(("https://", "http://")):
        table.fail("api_base", "must be an http:// or https:// URL")
    return TurnConfig(
        app_name=table.string("app_name"),
        secret_key=table.string("secret_key"),
        region=region,
        ttl=table.integer("ttl", None, minimum=1),
        api_base=api_base,
    )


def _read_key(app_id: str, table: _Table) -> Key:
    type_name = table.string("type")
    try:
        type = KeyType(type_name)
    except ValueError:
        table.fail("type", f"unknown key type {type_name!r} (expected 'secret' or 'publishable')")
    key_id = table.string("key_id")
    problem = key_id_problem(type, key_id)
    if problem is not None:
        table.fail("key_id", problem)
    secret = table.string("secret", None)
    if type is KeyType.SECRET:
        if secret is None:
            table.fail("secret", "is required for a secret key")
        problem = secret_problem(secret)
        if problem is not None:
            table.fail("secret", problem)
    elif secret is not None:
        table.fail("secret", "a publishable key has no secret")
    channel_patterns = table.strings("channel_patterns")
    actions = table.strings("actions")
    allowed_origins = table.strings("allowed_origins", ())
    for field, problem in key_field_problems(type, channel_patterns, actions, allowed_origins):
        table.fail(field, problem)
    return Key(
        key_id=key_id,
        app_id=app_id,
        type=type,
        secret=secret,
        channel_patterns=channel_patterns,
        actions=frozenset(actions),
        allowed_origins=allowed_origins,
        auto_inject_turn=table.boolean("auto_inject_turn", True),
        source="config",
    )
