"""
Where apps and keys live: SQLite, overlaid by the configuration file.

  - L{SQLiteKeyStore}: the server's L{IKeyStore}. It answers look-ups from
    memory, writes through an C{adbapi} connection pool (so SQLite never
    blocks the reactor) and re-reads the database every two seconds, so a key
    revoked with the CLI in another process stops authenticating within a few
    seconds. Observers registered with L{SQLiteKeyStore.on_apps_changed}
    hear which apps a load changed (the server closes the connections of a
    newly suspended app that way). Every change a load brings (an app
    created, suspended or resumed, its plan changed; a key created or
    revoked; L{admin_changes}) is logged, one line each, whoever made it.
  - L{Tenancy}: the effective apps and keys, stored ones overlaid by those
    the configuration file declares (config wins).
  - The table functions (L{create_schema}, L{read_state}, L{store_app},
    L{store_key}, L{store_revocation}, L{store_plan}, L{store_suspension},
    L{bootstrap_default_app}) take a DB-API cursor, so the CLI runs them
    synchronously with C{sqlite3} and the server inside C{runInteraction}.
    Each write runs in one C{BEGIN IMMEDIATE} transaction that re-checks the
    rules against the database itself, so two processes writing at once
    cannot both squeeze past the per-app key limit.

Secrets are stored in clear (protocol §3.3: the server computes HMACs with
them); the database file is created readable by its owner only. Nothing here
logs a secret.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
from attrs import frozen
from twisted.application import service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meteredrt.apps import (
    ACTIONS,
    KEY_ID_PREFIX,
    MAX_KEYS_PER_APP,
    PUBLISHABLE_DEFAULT_ACTIONS,
    SECRET_PREFIX,
    App,
    Key,
    KeyType,
    Plan,
)
from meteredrt.config import AppDeclaration, app_id_problem, key_field_problems
from meteredrt.interfaces import IKeyStore

#: The database file inside the data directory.
DATABASE_NAME = "meteredrt.sqlite3"

#: How long a writer waits for another process's write lock, in ms. Waiting
#: happens on a pool thread (or in the CLI), never on the reactor.
BUSY_TIMEOUT_MS = 5000

#: Seconds between re-reads of the database by the running server.
RELOAD_INTERVAL = 2.0

#: The app created on first start with an empty database and no config apps.
DEFAULT_APP_ID = "default"

_T = TypeVar("_T")


class KeyStoreError(ValueError):
    """
    A change to apps or keys was refused; the message says why.
    """


class NoSuchApp(KeyStoreError):
    """
    The app does not exist.
    """


class AppExists(KeyStoreError):
    """
    An app with this id exists already.
    """


class KeyLimitReached(KeyStoreError):
    """
    The app already has L{MAX_KEYS_PER_APP} active keys.
    """


class InvalidKeyField(KeyStoreError):
    """
    A field of a new key is invalid.

    :ivar field: the field's TOML name, such as ``channel_patterns[1]``.
    :ivar problem: what is wrong with it.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DeclaredInConfig(KeyStoreError):
    """
    The key or app is declared in the configuration file, which always wins:
    change it there.
    """


def database_path(data_dir: str) -> str:
    """
    The SQLite file of a data directory.
    """
    return os.path.join(data_dir, DATABASE_NAME)


def prepare_database(data_dir: str) -> str:
    """
    Create the data directory and an empty database file, both private to
    their owner, if they do not exist yet, and return the file's path.

    This is synchronous file I/O: call it from the CLI or from the
    composition root before the reactor runs. SQLite gives its ``-wal`` and
    ``-shm`` files the database file's permissions.
    """
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = database_path(data_dir)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    return path


def configure_connection(connection: sqlite3.Connection) -> None:
    """
    Prepare a fresh connection for a database shared by processes: WAL
    journal (readers never wait for the writer) and a busy timeout (a writer
    waits for another process's write instead of failing at once).
    """
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")


def open_pool(path: str, reactor: IReactorCore) -> adbapi.ConnectionPool:
    """
    An C{adbapi} pool over one SQLite file, with one connection on one
    thread: SQLite serialises writers anyway, and one thread keeps the order
    in which interactions finish the order in which they were started.
    """
    return adbapi.ConnectionPool(
        "sqlite3",
        path,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=configure_connection,
        cp_reactor=reactor,
    )


def connect(path: str) -> sqlite3.Connection:
    """
    A synchronous connection for the CLI, configured like the server's.
    """
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    configure_connection(connection)
    return connection


_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS apps (
        app_id TEXT PRIMARY KEY,
        plan_json TEXT,
        suspended INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS keys (
        key_id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        type TEXT NOT NULL,
        secret TEXT,
        channel_patterns_json TEXT NOT NULL,
        actions_json TEXT NOT NULL,
        allowed_origins_json TEXT NOT NULL,
        auto_inject_turn INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS keys_by_app ON keys (app_id)",
)


def create_schema(cursor: Any) -> None:
    """
    Create the tables if they do not exist.
    """
    for statement in _SCHEMA:
        cursor.execute(statement)


@frozen
class StoredState:
    """
    The rows of the database, as records.
    """

    apps: Mapping[str, App]
    keys: Mapping[str, Key]


def _plan_to_json(plan: Plan | None) -> str | None:
    return None if plan is None else json.dumps(attrs.asdict(plan), sort_keys=True)


def _plan_from_json(text: str | None) -> Plan | None:
    if text is None:
        return None
    values = json.loads(text)
    # Ignore fields this version does not know (a newer version wrote them).
    known = {field.name for field in attrs.fields(Plan)}
    return Plan(**{name: value for name, value in values.items() if name in known})


def read_state(cursor: Any) -> StoredState:
    """
    Read every app and key.

    Keys are read before apps: apps are never deleted and a key is only
    stored after its app, so every key read has its app in the result even
    without a snapshot spanning both statements.
    """
    cursor.execute(
        "SELECT key_id, app_id, type, secret, channel_patterns_json, actions_json,"
        " allowed_origins_json, auto_inject_turn, revoked, created_at FROM keys"
    )
    keys = {
        row[0]: Key(
            key_id=row[0],
            app_id=row[1],
            type=KeyType(row[2]),
            secret=row[3],
            channel_patterns=tuple(json.loads(row[4])),
            actions=frozenset(json.loads(row[5])),
            allowed_origins=tuple(json.loads(row[6])),
            auto_inject_turn=bool(row[7]),
            revoked=bool(row[8]),
            created_at=row[9],
            source="store",
        )
        for row in cursor.fetchall()
    }
    cursor.execute("SELECT app_id, plan_json, suspended FROM apps")
    apps = {
        row[0]: App(app_id=row[0], plan=_plan_from_json(row[1]), suspended=bool(row[2]))
        for row in cursor.fetchall()
    }
    return StoredState(apps=apps, keys=keys)


@frozen
class Tenancy:
    """
    The effective apps and keys: stored ones overlaid by the configuration.

    A declared app exists even if nothing about it is stored; its declared
    plan (if it declares one) and TURN settings win over stored ones, while
    suspension stays a stored flag. A declared key replaces a stored key of
    the same id. Stored keys of apps nobody knows are not served.
    """

    _apps: Mapping[str, App]
    _keys: Mapping[str, Key]
    _keys_by_app: Mapping[str, tuple[Key, ...]]
    _declared_apps: frozenset[str]

    @classmethod
    def overlay(cls, stored: StoredState, declarations: Iterable[AppDeclaration]) -> Tenancy:
        """
        Combine stored state with the configuration's declarations.
        """
        declarations = tuple(declarations)
        apps = dict(stored.apps)
        declared_keys: dict[str, Key] = {}
        for declaration in declarations:
            declared = declaration.app
            kept = apps.get(declared.app_id)
            plan = declared.plan
            if plan is None and kept is not None:
                plan = kept.plan
            apps[declared.app_id] = attrs.evolve(
                declared, plan=plan, suspended=kept.suspended if kept is not None else declared.suspended
            )
            declared_keys.update((key.key_id, key) for key in declaration.keys)
        keys = {key_id: key for key_id, key in stored.keys.items() if key.app_id in apps}
        keys.update(declared_keys)
        by_app: dict[str, list[Key]] = {}
        for key_id in sorted(keys):
            by_app.setdefault(keys[key_id].app_id, []).append(keys[key_id])
        return cls(
            apps=dict(sorted(apps.items())),
            keys=keys,
            keys_by_app={app_id: tuple(app_keys) for app_id, app_keys in by_app.items()},
            declared_apps=frozenset(declaration.app.app_id for declaration in declarations),
        )

    def key(self, key_id: str) -> Key | None:
        """
        The key with this id, revoked or not, or ``None``.
        """
        return self._keys.get(key_id)

    def app(self, app_id: str) -> App | None:
        """
        The app with this id, or ``None``.
        """
        return self._apps.get(app_id)

    def apps(self) -> list[App]:
        """
        Every app, ordered by id.
        """
        return list(self._apps.values())

    def keys_of(self, app_id: str) -> list[Key]:
        """
        Every key of one app, revoked ones included, ordered by id.
        """
        return list(self._keys_by_app.get(app_id, ()))

    def is_declared(self, app_id: str) -> bool:
        """
        Whether the configuration file declares this app.
        """
        return app_id in self._declared_apps

    def changed_apps(self, other: Tenancy) -> frozenset[str]:
        """
        The ids of the apps whose records differ between this tenancy and
        C{other}: added, or with another plan, suspension or TURN setting.
        Keys are not compared.
        """
        return frozenset(
            app_id
            for app_id in self._apps.keys() | other._apps.keys()
            if self._apps.get(app_id) != other._apps.get(app_id)
        )


@frozen
class AdminChange:
    """
    One change an operator made, as two loads of the key store show it.

    :ivar event: C{app_created}, C{app_suspended}, C{app_resumed},
        C{plan_changed}, C{key_created} or C{key_revoked}.
    :ivar key_id: the key's id (never its secret) for key events.
    """

    event: str
    app_id: str
    key_id: str | None = None


def admin_changes(before: Tenancy, after: Tenancy) -> list[AdminChange]:
    """
    What changed between two loads, apps first, each list ordered by id.
    """
    changes: list[AdminChange] = []
    for app in after.apps():
        old = before.app(app.app_id)
        if old is None:
            changes.append(AdminChange("app_created", app.app_id))
            if app.suspended:
                changes.append(AdminChange("app_suspended", app.app_id))
            continue
        if app.suspended != old.suspended:
            changes.append(AdminChange("app_suspended" if app.suspended else "app_resumed", app.app_id))
        if app.plan != old.plan:
            changes.append(AdminChange("plan_changed", app.app_id))
    for app in after.apps():
        for key in after.keys_of(app.app_id):
            old_key = before.key(key.key_id)
            if old_key is None:
                changes.append(AdminChange("key_created", key.app_id, key.key_id))
                if key.revoked:
                    changes.append(AdminChange("key_revoked", key.app_id, key.key_id))
            elif key.revoked and not old_key.revoked:
                changes.append(AdminChange("key_revoked", key.app_id, key.key_id))
    return changes


def _begin_immediate(cursor: Any) -> None:
    # Take the write lock before reading what the write depends on, so that
    # the checks still hold when the write lands (another process may be
    # writing too).
    if not cursor.connection.in_transaction:
        cursor.execute("BEGIN IMMEDIATE")


def _insert_app(cursor: Any, app: App, now: float) -> None:
    cursor.execute(
        "INSERT INTO apps (app_id, plan_json, suspended, created_at) VALUES (?, ?, ?, ?)",
        (app.app_id, _plan_to_json(app.plan), int(app.suspended), now),
    )


def _insert_key(cursor: Any, key: Key) -> None:
    cursor.execute(
        "INSERT INTO keys (key_id, app_id, type, secret, channel_patterns_json, actions_json,"
        " allowed_origins_json, auto_inject_turn, revoked, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key.key_id,
            key.app_id,
            key.type.value,
            key.secret,
            json.dumps(list(key.channel_patterns)),
            json.dumps(sorted(key.actions)),
            json.dumps(list(key.allowed_origins)),
            int(key.auto_inject_turn),
            int(key.revoked),
            key.created_at,
        ),
    )


def new_key(
    app_id: str,
    type: KeyType,
    channel_patterns: Sequence[str],
    actions: Iterable[str],
    *,
    now: float,
    allowed_origins: Sequence[str] = (),
    auto_inject_turn: bool = True,
) -> Key:
    """
    A key with a fresh random id (and, for a secret key, a fresh secret).

    The random part carries no structure; the server relies only on the
    prefix (protocol §3.3).

    :raises InvalidKeyField: if a field breaks the rules of §3.3.
    """
    # Check in the caller's order, so that an index in a message points at
    # what the user wrote.
    actions = list(actions)
    for field, problem in key_field_problems(type, channel_patterns, actions, allowed_origins):
        raise InvalidKeyField(field, problem)
    if type is KeyType.SECRET:
        key_id = KEY_ID_PREFIX[type] + secrets.token_urlsafe(16)
        secret: str | None = SECRET_PREFIX + secrets.token_urlsafe(32)
    else:
        key_id = KEY_ID_PREFIX[type] + secrets.token_urlsafe(24)
        secret = None
    return Key(
        key_id=key_id,
        app_id=app_id,
        type=type,
        secret=secret,
        channel_patterns=tuple(channel_patterns),
        actions=frozenset(actions),
        allowed_origins=tuple(allowed_origins),
        auto_inject_turn=auto_inject_turn,
        created_at=now,
        source="store",
    )


def store_app(
    cursor: Any, declarations: Sequence[AppDeclaration], app_id: str, plan: Plan | None, now: float
) -> App:
    """
    Store a new app.

    :raises InvalidKeyField: for a malformed app id (field ``app_id``).
    :raises AppExists: if it is stored or declared already.
    """
    problem = app_id_problem(app_id)
    if problem is not None:
        raise InvalidKeyField("app_id", problem)
    _begin_immediate(cursor)
    if Tenancy.overlay(read_state(cursor), declarations).app(app_id) is not None:
        raise AppExists(f"app {app_id!r} exists already")
    app = App(app_id=app_id, plan=plan)
    _insert_app(cursor, app, now)
    return app


def store_key(
    cursor: Any,
    declarations: Sequence[AppDeclaration],
    app_id: str,
    type: KeyType,
    channel_patterns: Sequence[str],
    actions: Iterable[str],
    now: float,
    allowed_origins: Sequence[str] = (),
    auto_inject_turn: bool = True,
) -> Key:
    """
    Store a new key with a fresh id (and secret) for an app.

    An app that only the configuration declares gets its row now, so that
    every stored key has a stored app.

    :raises NoSuchApp: if the app is neither stored nor declared.
    :raises KeyLimitReached: if the app has L{MAX_KEYS_PER_APP} active keys.
    :raises InvalidKeyField: if a field breaks the rules of §3.3.
    """
    key = new_key(
        app_id,
        type,
        channel_patterns,
        actions,
        now=now,
        allowed_origins=allowed_origins,
        auto_inject_turn=auto_inject_turn,
    )
    _begin_immediate(cursor)
    stored = read_state(cursor)
    tenancy = Tenancy.overlay(stored, declarations)
    if tenancy.app(app_id) is None:
        raise NoSuchApp(f"no app {app_id!r}")
    # Revoked keys stay listed but do not use up the allowance.
    active = [existing for existing in tenancy.keys_of(app_id) if existing.active]
    if len(active) >= MAX_KEYS_PER_APP:
        raise KeyLimitReached(f"app {app_id!r} already has {MAX_KEYS_PER_APP} active keys; revoke one first")
    if tenancy.key(key.key_id) is not None or key.key_id in stored.keys:
        # 128 random bits do not collide; a clash means something is broken.
        raise KeyStoreError("generated key id is taken; try again")
    if app_id not in stored.apps:
        _insert_app(cursor, App(app_id=app_id), now)
    _insert_key(cursor, key)
    return key


def store_revocation(cursor: Any, declarations: Sequence[AppDeclaration], key_id: str) -> bool:
    """
    Mark a stored key revoked. Revoking a revoked key is not an error.

    :return: whether the key exists.
    :raises DeclaredInConfig: for a key the configuration declares, since a
        revocation in the database would have no effect.
    """
    for declaration in declarations:
        if any(key.key_id == key_id for key in declaration.keys):
            raise DeclaredInConfig(
                f"key {key_id!r} is declared in the configuration file; remove it there"
            )
    _begin_immediate(cursor)
    cursor.execute("UPDATE keys SET revoked = 1 WHERE key_id = ?", (key_id,))
    return bool(cursor.rowcount)


def store_plan(
    cursor: Any, declarations: Sequence[AppDeclaration], app_id: str, plan: Plan | None, now: float
) -> App:
    """
    Replace an app's stored plan and return the effective app.

    :raises NoSuchApp: if the app is neither stored nor declared.
    :raises DeclaredInConfig: if the configuration declares a plan for it.
    """
    _begin_immediate(cursor)
    stored = read_state(cursor)
    for declaration in declarations:
        if declaration.app.app_id == app_id and declaration.app.plan is not None:
            raise DeclaredInConfig(
                f"app {app_id!r} has a plan in the configuration file; change it there"
            )
    if Tenancy.overlay(stored, declarations).app(app_id) is None:
        raise NoSuchApp(f"no app {app_id!r}")
    if app_id in stored.apps:
        cursor.execute("UPDATE apps SET plan_json = ? WHERE app_id = ?", (_plan_to_json(plan), app_id))
    else:
        _insert_app(cursor, App(app_id=app_id, plan=plan), now)
    app = Tenancy.overlay(read_state(cursor), declarations).app(app_id)
    assert app is not None
    return app


def store_suspension(
    cursor: Any, declarations: Sequence[AppDeclaration], app_id: str, suspended: bool, now: float
) -> App:
    """
    Suspend or resume an app and return the effective app. Setting the flag
    an app has already is not an error.

    Suspension is a stored flag for every app, declared ones included: the
    configuration file cannot suspend an app, so the database always
    decides (see L{Tenancy}). An app that only the configuration declares
    gets its row now, holding the flag and no plan (its declared plan, if
    any, still wins).

    :raises NoSuchApp: if the app is neither stored nor declared.
    """
    _begin_immediate(cursor)
    stored = read_state(cursor)
    if Tenancy.overlay(stored, declarations).app(app_id) is None:
        raise NoSuchApp(f"no app {app_id!r}")
    if app_id in stored.apps:
        cursor.execute("UPDATE apps SET suspended = ? WHERE app_id = ?", (int(suspended), app_id))
    else:
        _insert_app(cursor, App(app_id=app_id, suspended=suspended), now)
    app = Tenancy.overlay(read_state(cursor), declarations).app(app_id)
    assert app is not None
    return app


def bootstrap_default_app(cursor: Any, now: float) -> tuple[App, tuple[Key, ...]] | None:
    """
    In an empty database, store the app ``default`` with one secret key (all
    four actions) and one publishable key (subscribe, publish, presence),
    both on every channel.

    :return: the app and its keys (secret included) if they were created,
        ``None`` if the database held anything already.
    """
    _begin_immediate(cursor)
    cursor.execute("SELECT (SELECT COUNT(*) FROM apps) + (SELECT COUNT(*) FROM keys)")
    if cursor.fetchone()[0]:
        return None
    app = App(app_id=DEFAULT_APP_ID)
    keys = (
        new_key(app.app_id, KeyType.SECRET, ("**",), ACTIONS, now=now),
        new_key(
            app.app_id,
            KeyType.PUBLISHABLE,
            ("**",),
            PUBLISHABLE_DEFAULT_ACTIONS,
            now=now,
        ),
    )
    _insert_app(cursor, app, now)
    for key in keys:
        _insert_key(cursor, key)
    return app, keys


def _write_then_read(
    cursor: Any, write: Callable[..., _T], declarations: Sequence[AppDeclaration], *args: Any
) -> tuple[_T, StoredState]:
    result = write(cursor, declarations, *args)
    return result, read_state(cursor)


def _bootstrap_then_read(cursor: Any, now: float) -> tuple[tuple[App, tuple[Key, ...]] | None, StoredState]:
    create_schema(cursor)
    result = bootstrap_default_app(cursor, now)
    return result, read_state(cursor)


def _schema_then_read(cursor: Any) -> StoredState:
    create_schema(cursor)
    return read_state(cursor)


#: Called once with the app and keys bootstrapped into an empty database.
BootstrapCallback = Callable[[App, tuple[Key, ...]], None]

#: Called with the ids of the apps a load changed (L{Tenancy.changed_apps}).
AppsChangedObserver = Callable[[frozenset[str]], object]


@implementer(IKeyStore)
class SQLiteKeyStore(service.Service):
    """
    The server's key store: SQLite below, the configuration file on top,
    look-ups from memory.

    Start it and wait for L{ready} before serving: the first load runs then.
    If the database is empty and the configuration declares no apps, the
    first load bootstraps the ``default`` app and hands it, secrets included,
    to C{on_bootstrap} once; that is the only time a secret leaves the store
    other than through L{key}.

    While running it re-reads the database every L{RELOAD_INTERVAL}
    seconds, so changes made with the CLI (another process) reach the
    running server within a few seconds; L{on_apps_changed} lets other
    services act on them.
    """

    _log = Logger()

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        *,
        clock: IReactorTime,
        declarations: Sequence[AppDeclaration] = (),
        on_bootstrap: BootstrapCallback | None = None,
        reload_interval: float = RELOAD_INTERVAL,
    ) -> None:
        """
        :param pool: a pool from L{open_pool}; the store closes it on stop.
        :param declarations: the configuration file's apps and keys.
        """
        self._pool = pool
        self._clock = clock
        self._declarations = tuple(declarations)
        self._on_bootstrap = on_bootstrap
        self._reload_interval = reload_interval
        self._tenancy = Tenancy.overlay(StoredState(apps={}, keys={}), self._declarations)
        self._reloading: LoopingCall | None = None
        self._loaded = False
        self._observers: list[AppsChangedObserver] = []
        # Every database round trip gets a ticket when it starts; state read
        # by an older one never replaces state read by a newer one.
        self._tickets = 0
        self._applied = 0
        self._started: Deferred[None] | None = None
        self._outcome: Failure | None = None
        self._settled = False
        self._waiting: list[Deferred[None]] = []

    @property
    def ready(self) -> Deferred[None]:
        """
        A new Deferred that fires once the first load has finished (with
        ``None``), or fails with the reason it could not.
        """
        waiter: Deferred[None] = Deferred()
        if self._settled:
            self._notify(waiter)
        else:
            self._waiting.append(waiter)
        return waiter

    def _notify(self, waiter: Deferred[None]) -> None:
        if self._outcome is None:
            waiter.callback(None)
        else:
            waiter.errback(self._outcome)

    def _settle(self, result: object) -> None:
        if isinstance(result, Failure):
            self._log.failure("Could not load apps and keys", result)
            self._outcome = result
        self._settled = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            self._notify(waiter)

    def startService(self) -> Deferred[None]:
        """
        Load (and perhaps bootstrap) the database, then start re-reading it.

        :return: the same as L{ready}.
        """
        super().startService()
        self._started = Deferred.fromCoroutine(self._start())
        self._started.addBoth(self._settle)
        return self.ready

    async def _start(self) -> None:
        ticket = self._ticket()
        if self._declarations:
            state = await self._pool.runInteraction(_schema_then_read)
        else:
            bootstrapped, state = await self._pool.runInteraction(
                _bootstrap_then_read, self._clock.seconds()
            )
            if bootstrapped is not None:
                app, keys = bootstrapped
                self._log.info(
                    "Created app {app_id} with keys {key_ids}",
                    app_id=app.app_id,
                    key_ids=", ".join(key.key_id for key in keys),
                )
                if self._on_bootstrap is not None:
                    # The keys are stored either way; a failure to show them
                    # must not keep the server from starting (more keys can
                    # be created with the CLI).
                    try:
                        self._on_bootstrap(app, keys)
                    except Exception:
                        self._log.failure("Could not show the bootstrapped keys")
        self._apply(ticket, state)
        if self.running:
            self._reloading = LoopingCall(self._reload)
            self._reloading.clock = self._clock
            self._reloading.start(self._reload_interval, now=False).addErrback(
                lambda failure: self._log.failure("Key store reloading stopped", failure)
            )

    def stopService(self) -> Deferred[None]:
        """
        Stop re-reading and close the pool, once a running load has settled.
        Stopping a store that is not running does nothing.
        """
        if not self.running:
            return succeed(None)
        super().stopService()
        if self._reloading is not None and self._reloading.running:
            self._reloading.stop()
        self._reloading = None
        settled = succeed(None) if self._started is None else self.ready

        def close(_: object) -> None:
            self._pool.close()

        return settled.addBoth(close)

    def _ticket(self) -> int:
        self._tickets += 1
        return self._tickets

    def on_apps_changed(self, observer: AppsChangedObserver) -> None:
        """
        Call C{observer} after every load that changes apps, with the ids of
        the apps it changed (L{Tenancy.changed_apps}); look-ups answer with
        the new state by then.

        Loads are the re-reads and the writes made through this store. The
        first load is not reported: nothing is served before L{ready}. An
        observer that raises is logged; the others are called anyway.
        """
        self._observers.append(observer)

    def _apply(self, ticket: int, state: StoredState) -> None:
        if ticket <= self._applied:
            return
        self._applied = ticket
        previous, self._tenancy = self._tenancy, Tenancy.overlay(state, self._declarations)
        if not self._loaded:
            self._loaded = True
            return
        for change in admin_changes(previous, self._tenancy):
            self._log.info(
                "Admin change: {event} app={app} key={key}",
                event=change.event,
                app=change.app_id,
                key=change.key_id or "-",
            )
        changed = self._tenancy.changed_apps(previous)
        if not changed:
            return
        for observer in list(self._observers):
            try:
                observer(changed)
            except Exception:
                self._log.failure("An observer of changed apps failed")

    def _reload(self) -> Deferred[None]:
        # A failed re-read (say, a lock held for longer than the busy
        # timeout) is logged and the next tick tries again.
        return Deferred.fromCoroutine(self._read()).addErrback(
            lambda failure: self._log.failure("Could not re-read apps and keys", failure)
        )

    async def _read(self) -> None:
        ticket = self._ticket()
        state = await self._pool.runInteraction(read_state)
        self._apply(ticket, state)

    async def _write(self, write: Callable[..., _T], *args: Any) -> _T:
        ticket = self._ticket()
        result, state = await self._pool.runInteraction(_write_then_read, write, self._declarations, *args)
        self._apply(ticket, state)
        return result

    def key(self, key_id: str) -> Key | None:
        """
        The key with this id, revoked or not, or ``None``.
        """
        return self._tenancy.key(key_id)

    def app(self, app_id: str) -> App | None:
        """
        The app with this id, or ``None``.
        """
        return self._tenancy.app(app_id)

    def apps(self) -> list[App]:
        """
        Every app, ordered by id.
        """
        return self._tenancy.apps()

    def keys_of(self, app_id: str) -> list[Key]:
        """
        Every key of one app, revoked ones included, ordered by id.
        """
        return self._tenancy.keys_of(app_id)

    def create_app(self, app_id: str, plan: Plan | None = None) -> Deferred[App]:
        """
        Store a new app. Fails with L{AppExists} (a L{ValueError}) if it
        exists, L{InvalidKeyField} for a malformed id.
        """
        return Deferred.fromCoroutine(self._write(store_app, app_id, plan, self._clock.seconds()))

    def create_key(
        self,
        app_id: str,
        type: KeyType,
        channel_patterns: tuple[str, ...],
        actions: frozenset[str],
        allowed_origins: tuple[str, ...] = (),
        auto_inject_turn: bool = True,
    ) -> Deferred[Key]:
        """
        Store a key with a fresh id (and secret). Fails with L{NoSuchApp},
        L{KeyLimitReached} or L{InvalidKeyField}, all L{ValueError}s.
        """
        return Deferred.fromCoroutine(
            self._write(
                store_key,
                app_id,
                type,
                channel_patterns,
                actions,
                self._clock.seconds(),
                allowed_origins,
                auto_inject_turn,
            )
        )

    def revoke_key(self, key_id: str) -> Deferred[bool]:
        """
        Revoke a stored key. Fires with whether it existed; fails with
        L{DeclaredInConfig} for a key the configuration declares.
        """
        return Deferred.fromCoroutine(self._write(store_revocation, key_id))

    def set_plan(self, app_id: str, plan: Plan | None) -> Deferred[App]:
        """
        Replace an app's stored plan. Fires with the new L{App}; fails with
        L{NoSuchApp} or L{DeclaredInConfig}.
        """
        return Deferred.fromCoroutine(self._write(store_plan, app_id, plan, self._clock.seconds()))
