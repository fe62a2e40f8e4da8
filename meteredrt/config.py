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
import math
import re
import tomllib
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time
from typing import Any, NoReturn
from urllib.parse import urlsplit

from attrs import evolve, frozen

from meteredrt.apps import (
    ACTIONS,
    KEY_ID_PREFIX,
    MAX_KEYS_PER_APP,
    SECRET_PREFIX,
    WEBHOOK_EVENTS,
    App,
    Key,
    KeyType,
    Plan,
    TurnConfig,
    WebhookConfig,
    message_rate_problems,
)
from meteredrt.clientaddress import TrustedProxies
from meteredrt.globs import pattern_error
from meteredrt.redisaddress import parse_redis_url

#: What ``twistd -n meteredrt`` listens on without a file or ``--listen``.
DEFAULT_LISTEN: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)

#: Where state lives without a file or ``--data-dir``; relative to the
#: working directory, like every relative ``data_dir``.
DEFAULT_DATA_DIR = "./meteredrt-data"

#: WebSocket upgrades accepted per source IP per 60 s.
DEFAULT_UPGRADE_RATE_LIMIT = 60

#: Seconds a client has to send a whole HTTP request. Upgrade requests are
#: headers only and REST bodies at most 32 KiB, so this is generous even on
#: a poor mobile link, and it bounds how long a slowloris client holds a
#: connection.
DEFAULT_REQUEST_TIMEOUT = 15.0
MAX_REQUEST_TIMEOUT = 3600

#: Open connections per client address: room for an office or a carrier's
#: NAT, far below what exhausts a process's file descriptors.
DEFAULT_MAX_CONNECTIONS_PER_IP = 256
#: Seconds between SIGTERM (``/readyz`` turns 503) and the start of the
#: drain: time for load balancers to take the node out of rotation.
DEFAULT_DRAIN_GRACE_SECONDS = 5.0
#: The most processes ``[server] workers`` may ask for: far above the cores
#: of one machine, low enough that a typo cannot fork-bomb it.
MAX_WORKERS = 64

#: Regions the Metered TURN API accepts (protocol §20.2).
TURN_REGIONS: frozenset[str] = frozenset(
    {
        "global", "north_america", "europe", "eu", "asia", "oceania", "us_west",
        "us_central", "us_east", "canada_central", "canada_east", "europe_west",
        "europe_central", "asia_west", "asia_east", "canada", "usa", "uk",
        "singapore", "india", "australia", "standard",
    }
)  # fmt: skip

#: Plan periods meteredrt can meter: the calendar month, UTC.
PLAN_PERIODS: frozenset[str] = frozenset({"month"})

# An http(s) URL with a host and no white space or control characters.
_WEBHOOK_URL = re.compile(r"https?://[^/?#\s@\x00-\x1f\x7f]+(?:[/?#][^\s\x00-\x1f\x7f]*)?")

#: Why an app may not declare webhooks on a cluster node whose store is
#: SQLite: the nodes append to one outbox and one node delivers it, which
#: per-node files cannot be (docs/webhooks.md).
WEBHOOKS_NEED_SHARED_STORE = (
    "presence webhooks in a cluster need the store in PostgreSQL ([storage] database or --database): "
    "every node writes to one shared outbox and one node delivers it, which a SQLite file per node cannot be"
)

#: A webhook secret shorter than this is refused (HMAC-SHA256 keys want
#: at least 32 bytes of entropy; the generated ones have more).
MIN_WEBHOOK_SECRET_LENGTH = 32

#: The longest debounce an app may ask for: an hour.
MAX_WEBHOOK_GRACE_SECONDS = 3600

#: The longest an app's batches may be retried: a week.
MAX_WEBHOOK_RETRY_SECONDS = 7 * 86400
#: ``[log] format`` values: lines for people, or one JSON object per line.
LOG_FORMATS = ("text", "json")
#: ``[log] level`` values, least severe first.
LOG_LEVELS = ("debug", "info", "warn", "error")

#: A ``[metrics] token`` shorter than this is refused: it guards the
#: endpoint on a public listener.
MIN_METRICS_TOKEN_LENGTH = 16

# A bearer token travels in an HTTP header: visible ASCII, no spaces.
_METRICS_TOKEN = re.compile(r"[\x21-\x7e]+")

# App ids end up in URLs, logs and (in a cluster) Redis key names: keep them
# to a conservative alphabet.
_APP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Key ids travel in query strings (``?key=pk_live_…``) and JWT headers, and
# id and secret are joined by a colon in the REST credential: URL-safe
# base64 characters only, which is also what generated ids use.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

# An origin as browsers send it: scheme, host, optional port; no path, no
# trailing slash (origins compare exactly, so anything else never matches).
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


#: Seconds a cluster node's lease lasts without renewal (``[cluster]
#: lease_seconds``); a dead node is reaped within three times this.
DEFAULT_LEASE_SECONDS = 5.0

# Node names end up in Redis keys, connection ids and logs.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@frozen
class ClusterConfig:
    """
    The ``[cluster]`` table: this node shares routing and presence with
    the other nodes on the same Redis.

    :ivar redis: the ``redis://`` or ``rediss://`` URL (checked by
        L{meteredrt.redisaddress.parse_redis_url}).
    :ivar node_name: shown in logs and Redis keys; ``None`` means the
        default, host name and process id.
    :ivar lease_seconds: how long the node's lease in Redis lasts without
        renewal.
    """

    redis: str
    node_name: str | None = None
    lease_seconds: float = DEFAULT_LEASE_SECONDS


def node_name_problem(name: str) -> str | None:
    """
    Why C{name} cannot be a node name, or C{None} if it can.
    """
    if _NODE_NAME.fullmatch(name) is None:
        return f"{name!r} is not a node name: 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)"
    return None


def redis_url_problem(url: str) -> str | None:
    """
    Why C{url} is not a usable Redis URL, or C{None}.
    """
    try:
        parse_redis_url(url)
    except ValueError as e:
        return str(e)
    return None


@frozen
class MetricsConfig:
    """
    The ``[metrics]`` table: where ``/metrics`` is served. Both ``None``
    (the default) serves it nowhere.

    :ivar token: serve ``/metrics`` on the main listeners, to requests
        carrying ``Authorization: Bearer <token>``.
    :ivar listen: a Twisted endpoint (``tcp:9100:interface=127.0.0.1``)
        serving only ``/metrics``, without a token.
    """

    token: str | None = None
    listen: str | None = None

    @property
    def enabled(self) -> bool:
        """
        Whether ``/metrics`` is served anywhere.
        """
        return self.token is not None or self.listen is not None


@frozen
class LogConfig:
    """
    The ``[log]`` table.

    :ivar format: ``"text"`` (twistd's lines) or ``"json"`` (one object per
        line, for log shippers).
    :ivar level: the least severe level written: ``"debug"``, ``"info"``,
        ``"warn"`` or ``"error"``.
    """

    format: str = "text"
    level: str = "info"


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
    :ivar request_timeout_seconds: the time a client has to send a whole
        HTTP request (headers and body, the WebSocket upgrade included)
        from the moment it connects or its previous response ends.
    :ivar max_connections_per_ip: open connections one client address
        (an IPv6 /64) may hold; connections from trusted proxies count
        against the client they forward for.
    :ivar drain_grace_seconds: on shutdown, how long ``/readyz`` answers
        503 (and upgrades are refused) while everything else keeps working,
        before connections are drained and the listeners close.
    :ivar database: ``[storage] database``, the PostgreSQL URL apps, keys
        and usage are kept in; ``None`` keeps them in SQLite files in
        ``data_dir``.
    :ivar metrics: where ``/metrics`` is served (``[metrics]``).
    :ivar log: the log format and level (``[log]``).
    :ivar workers: processes serving the same ports (L{meteredrt.workers});
        more than one needs ``[cluster]``.
    :ivar cluster: the ``[cluster]`` table, or ``None`` for a single node
        with in-memory routing and presence.
    """

    listen: tuple[str, ...] = DEFAULT_LISTEN
    data_dir: str = DEFAULT_DATA_DIR
    database: str | None = None
    apps: tuple[AppDeclaration, ...] = ()
    upgrade_rate_limit: int = DEFAULT_UPGRADE_RATE_LIMIT
    trusted_proxies: TrustedProxies = ()
    request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    drain_grace_seconds: float = DEFAULT_DRAIN_GRACE_SECONDS
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    workers: int = 1
    cluster: ClusterConfig | None = None
    source: str | None = None


def default_config() -> Config:
    """
    The configuration used when no file is given: listen on loopback port
    8080, keep state in ``./meteredrt-data``, declare no apps (the key store
    then bootstraps the ``default`` app).
    """
    return Config()


def apply_options(
    config: Config,
    *,
    listen: Sequence[str] = (),
    data_dir: str | None = None,
    database: str | None = None,
    redis: str | None = None,
) -> Config:
    """
    Lay command-line options over a configuration.

    ``--listen`` given at least once replaces the file's whole ``listen``
    list (it does not add to it); ``--data-dir`` replaces ``data_dir``;
    ``--database`` replaces ``[storage] database``. ``--redis`` replaces
    ``[cluster] redis``, or makes the node a cluster member with the other
    ``[cluster]`` keys at their defaults.

    :raises ConfigError: for an empty endpoint or data directory, a
        database URL that is not a PostgreSQL URL, or a bad Redis URL.
    """
    where = "<command line>"
    for index, endpoint in enumerate(listen):
        if not endpoint.strip():
            raise ConfigError(where, f"--listen[{index}]", "must not be empty")
    if data_dir is not None and not data_dir.strip():
        raise ConfigError(where, "--data-dir", "must not be empty")
    if database is not None:
        problem = database_url_problem(database)
        if problem is not None:
            raise ConfigError(where, "--database", problem)
    cluster = config.cluster
    if redis is not None:
        problem = redis_url_problem(redis)
        if problem is not None:
            raise ConfigError(where, "--redis", problem)
        cluster = ClusterConfig(redis) if cluster is None else evolve(cluster, redis=redis)
    config = evolve(
        config,
        listen=tuple(listen) if listen else config.listen,
        data_dir=config.data_dir if data_dir is None else data_dir,
        database=config.database if database is None else database,
        cluster=cluster,
    )
    _check_webhooks_store(config)
    return config


def _check_webhooks_store(config: Config) -> None:
    """
    Refuse webhooks on a cluster node without the shared PostgreSQL store
    (L{WEBHOOKS_NEED_SHARED_STORE}). Checked once every option is applied:
    C{--redis} and C{--database} each change the answer.
    """
    if config.cluster is None or config.database is not None:
        return
    for index, declaration in enumerate(config.apps):
        if declaration.app.webhooks is not None:
            raise ConfigError(config.source or "<command line>", f"apps[{index}].webhooks", WEBHOOKS_NEED_SHARED_STORE)


#: The endpoint types several workers can share (with ``SO_REUSEPORT``).
SHAREABLE_ENDPOINTS = frozenset({"tcp", "tcp6"})


def apply_workers(config: Config, workers: int | None) -> Config:
    """
    Lay ``--workers N`` over a configuration and check the result: more
    than one worker needs ``[cluster]`` (workers share state only through
    Redis) and ``tcp:``/``tcp6:`` listeners (the only ones they can share).

    Call it after every other option has been applied, since ``--redis``
    and ``--listen`` change what it checks.

    :raises ConfigError: for a count out of range or a combination that
        cannot work.
    """
    if workers is not None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError("<command line>", "--workers", f"must be between 1 and {MAX_WORKERS}")
        config = evolve(config, workers=workers)
    if config.workers == 1:
        return config
    source = config.source or "<command line>"
    if config.cluster is None:
        raise ConfigError(
            source,
            "server.workers",
            f"{config.workers} workers need [cluster] (or --redis): workers share channels and presence "
            "only through Redis",
        )
    for index, endpoint in enumerate(config.listen):
        if endpoint.split(":", 1)[0].strip().lower() not in SHAREABLE_ENDPOINTS:
            raise ConfigError(
                source,
                f"server.listen[{index}]",
                f"workers can only share tcp: and tcp6: endpoints, not {endpoint!r}; "
                "terminate TLS in a proxy in front of them",
            )
    return config


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


#: URL schemes of a PostgreSQL database.
POSTGRESQL_SCHEMES = ("postgresql", "postgres")


def database_url_problem(url: str) -> str | None:
    """
    What is wrong with a C{[storage] database} URL, or ``None``.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return f"not a URL: {e}"
    if parts.scheme not in POSTGRESQL_SCHEMES:
        return "must be a postgresql:// URL (leave it out to use SQLite in data_dir)"
    if not parts.path.strip("/"):
        return "must name a database, as in postgresql://user@host:5432/meteredrt"
    return None



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
        if not math.isfinite(value):
            # TOML allows nan and inf; no setting means either.
            self.fail(name, f"must be a finite number, not {value}")
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


_TOP_LEVEL = ("server", "storage", "cluster", "webhooks", "metrics", "log", "apps")
_STORAGE_KEYS = ("database",)
_CLUSTER_KEYS = ("redis", "node_name", "lease_seconds")
_WEBHOOKS_SERVER_KEYS = ("refuse_private_addresses",)
_METRICS_KEYS = ("token", "listen")
_LOG_KEYS = ("format", "level")
_SERVER_KEYS = (
    "listen",
    "data_dir",
    "upgrade_rate_limit",
    "trusted_proxies",
    "request_timeout_seconds",
    "max_connections_per_ip",
    "drain_grace_seconds",
    "workers",
)
_APP_KEYS = ("id", "plan", "turn", "webhooks", "keys")
_WEBHOOK_KEYS = ("url", "secret", "events", "offline_grace_seconds", "retry_seconds")
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
            request_timeout_seconds=_read_request_timeout(server, config.request_timeout_seconds),
            max_connections_per_ip=server.integer(
                "max_connections_per_ip", config.max_connections_per_ip, minimum=1
            ),
            drain_grace_seconds=server.number("drain_grace_seconds", config.drain_grace_seconds),
            workers=server.integer("workers", config.workers, minimum=1),
        )
        if config.workers > MAX_WORKERS:
            server.fail("workers", f"must be at most {MAX_WORKERS}")
    storage = top.table("storage", _STORAGE_KEYS)
    if storage is not None:
        database = storage.string("database", None)
        if database is not None:
            problem = database_url_problem(database)
            if problem is not None:
                storage.fail("database", problem)
            config = evolve(config, database=database)
    cluster = top.table("cluster", _CLUSTER_KEYS)
    if cluster is not None:
        config = evolve(config, cluster=_read_cluster(cluster))
    metrics = top.table("metrics", _METRICS_KEYS)
    if metrics is not None:
        config = evolve(config, metrics=_read_metrics(metrics))
    log = top.table("log", _LOG_KEYS)
    if log is not None:
        config = evolve(config, log=_read_log(log))
    declarations = tuple(_read_app(table) for table in top.tables("apps", _APP_KEYS))
    webhooks = top.table("webhooks", _WEBHOOKS_SERVER_KEYS)
    if webhooks is not None and webhooks.boolean("refuse_private_addresses", False):
        _refuse_private_webhooks(top, declarations)
    _check_unique(top, declarations)
    return evolve(config, apps=declarations)


def _read_request_timeout(server: _Table, default: float) -> float:
    value: float = server.number("request_timeout_seconds", default, minimum=None)
    # "not" so that NaN, which compares false with everything, fails too.
    if not 0 < value <= MAX_REQUEST_TIMEOUT:
        server.fail(
            "request_timeout_seconds", f"must be more than 0 and at most {MAX_REQUEST_TIMEOUT} seconds, not {value}"
        )
    return value


def _read_metrics(table: _Table) -> MetricsConfig:
    token = table.string("token", None)
    if token is not None:
        if not _METRICS_TOKEN.fullmatch(token):
            table.fail("token", "may contain only visible ASCII characters, no spaces")
        if len(token) < MIN_METRICS_TOKEN_LENGTH:
            table.fail(
                "token",
                f"must be at least {MIN_METRICS_TOKEN_LENGTH} characters "
                "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
            )
    listen = table.string("listen", None)
    if listen is not None and not listen.strip():
        table.fail("listen", "must not be empty")
    return MetricsConfig(token=token, listen=listen)


def _read_log(table: _Table) -> LogConfig:
    log_format = table.string("format", "text")
    if log_format not in LOG_FORMATS:
        table.fail("format", f"unknown format {log_format!r} (expected one of {', '.join(LOG_FORMATS)})")
    level = table.string("level", "info")
    if level not in LOG_LEVELS:
        table.fail("level", f"unknown level {level!r} (expected one of {', '.join(LOG_LEVELS)})")
    return LogConfig(format=log_format, level=level)


def _read_cluster(table: _Table) -> ClusterConfig:
    url = table.string("redis")
    problem = redis_url_problem(url)
    if problem is not None:
        table.fail("redis", problem)
    node_name = table.string("node_name", None)
    if node_name is not None and (problem := node_name_problem(node_name)) is not None:
        table.fail("node_name", problem)
    lease = table.number("lease_seconds", DEFAULT_LEASE_SECONDS, minimum=1.0)
    if lease > 3600:
        table.fail("lease_seconds", "must be at most 3600 (a dead node is reaped within 3 x lease)")
    return ClusterConfig(url, node_name, float(lease))


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
    webhooks_table = table.table("webhooks", _WEBHOOK_KEYS)
    key_tables = table.tables("keys", _KEY_KEYS)
    if len(key_tables) > MAX_KEYS_PER_APP:
        table.fail("keys", f"declares {len(key_tables)} keys; an app may have at most {MAX_KEYS_PER_APP}")
    app = App(
        app_id=app_id,
        plan=None if plan_table is None else _read_plan(plan_table),
        turn=None if turn_table is None else _read_turn(turn_table),
        webhooks=None if webhooks_table is None else _read_webhooks(webhooks_table),
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


def webhook_url_problem(url: str) -> str | None:
    """
    What is wrong with a webhook target URL, or ``None``: it must be an
    absolute ``http://`` or ``https://`` URL with a host, and nothing a
    header could be smuggled through.
    """
    match = _WEBHOOK_URL.fullmatch(url)
    if match is None:
        return "must be an absolute http:// or https:// URL with a host"
    return None


def _refuse_private_webhooks(top: _Table, declarations: tuple[AppDeclaration, ...]) -> None:
    """
    For multi-tenant operators: no app may aim its webhooks at this
    machine or a private network. Host names are taken as they are (they
    are not resolved here).
    """
    for index, declaration in enumerate(declarations):
        webhooks = declaration.app.webhooks
        if webhooks is None:
            continue
        host = urlsplit(webhooks.url).hostname or ""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            private = host == "localhost" or host.endswith(".localhost")
        else:
            private = not address.is_global
        if private:
            top.fail(
                f"apps[{index}].webhooks.url",
                f"{host!r} is a private or local address ([webhooks] refuse_private_addresses is on)",
            )


def _read_webhooks(table: _Table) -> WebhookConfig:
    url = table.string("url")
    problem = webhook_url_problem(url)
    if problem is not None:
        table.fail("url", problem)
    secret = table.string("secret")
    if len(secret) < MIN_WEBHOOK_SECRET_LENGTH:
        table.fail("secret", f"must be at least {MIN_WEBHOOK_SECRET_LENGTH} characters (a random string)")
    events = table.strings("events", WEBHOOK_EVENTS)
    for index, event in enumerate(events):
        if event not in WEBHOOK_EVENTS:
            table.fail(f"events[{index}]", f"unknown event {event!r} (expected one of {_listing(WEBHOOK_EVENTS)})")
    defaults = WebhookConfig(url=url, secret=secret)
    grace = table.number("offline_grace_seconds", defaults.offline_grace_seconds)
    if grace > MAX_WEBHOOK_GRACE_SECONDS:
        table.fail("offline_grace_seconds", f"must be at most {MAX_WEBHOOK_GRACE_SECONDS}, not {grace:g}")
    retry = table.number("retry_seconds", defaults.retry_seconds)
    if not 1 <= retry <= MAX_WEBHOOK_RETRY_SECONDS:
        table.fail("retry_seconds", f"must be between 1 and {MAX_WEBHOOK_RETRY_SECONDS}, not {retry:g}")
    return WebhookConfig(
        url=url,
        secret=secret,
        events=frozenset(events),
        offline_grace_seconds=grace,
        retry_seconds=retry,
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
