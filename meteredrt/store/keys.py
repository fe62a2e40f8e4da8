"""
The key tables: apps, plans and keys, in SQLite or PostgreSQL.

The functions here take a L{DialectCursor} and run inside the caller's
transaction, so the server runs them in C{runInteraction} and the command
line synchronously: one set of queries for both. Each write takes the
tables' write lock (L{DialectCursor.lock_for_write}) before it re-checks
the rules against the database itself, so two processes writing at once
cannot both squeeze past the per-app key limit.

Secrets are stored in clear (protocol §3.3: the server computes HMACs with
them); a SQLite file is created readable by its owner only. Nothing here
logs a secret.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

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
    message_rate_problems,
)
from meteredrt.config import AppDeclaration, app_id_problem, key_field_problems
from meteredrt.store.dialect import DialectCursor
from meteredrt.store.schema import Migration, statements
from meteredrt.store.tenancy import StoredState, Tenancy

#: The component name of these tables (L{meteredrt.store.schema}).
COMPONENT = "keys"

#: The app created on first start with an empty database and no config apps.
DEFAULT_APP_ID = "default"

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


#: The key tables' schema, oldest step first. Version 1 is the schema of the
#: releases before versioning, so their databases are adopted as they are.
MIGRATIONS = (
    Migration(
        1,
        "apps and keys",
        statements(
            """
            CREATE TABLE IF NOT EXISTS apps (
                app_id TEXT PRIMARY KEY,
                plan_json TEXT,
                suspended INTEGER NOT NULL DEFAULT 0,
                created_at {float} NOT NULL
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
                created_at {float} NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS keys_by_app ON keys (app_id)",
        ),
    ),
)

#: The tables every write locks.
_TABLES = ("apps", "keys")

def _plan_to_json(plan: Plan | None) -> str | None:
    return None if plan is None else json.dumps(attrs.asdict(plan), sort_keys=True)


def _plan_from_json(text: str | None) -> Plan | None:
    if text is None:
        return None
    values = json.loads(text)
    # Ignore fields this version does not know (a newer version wrote them).
    known = {field.name for field in attrs.fields(Plan)}
    return Plan(**{name: value for name, value in values.items() if name in known})


def read_state(cursor: DialectCursor) -> StoredState:
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


def _insert_app(cursor: DialectCursor, app: App, now: float) -> None:
    cursor.execute(
        "INSERT INTO apps (app_id, plan_json, suspended, created_at) VALUES (?, ?, ?, ?)",
        (app.app_id, _plan_to_json(app.plan), int(app.suspended), now),
    )


def _insert_key(cursor: DialectCursor, key: Key) -> None:
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
    cursor: DialectCursor, declarations: Sequence[AppDeclaration], app_id: str, plan: Plan | None, now: float
) -> App:
    """
    Store a new app.

    :raises InvalidKeyField: for a malformed app id (field ``app_id``).
    :raises AppExists: if it is stored or declared already.
    """
    problem = app_id_problem(app_id)
    if problem is not None:
        raise InvalidKeyField("app_id", problem)
    cursor.lock_for_write(*_TABLES)
    if Tenancy.overlay(read_state(cursor), declarations).app(app_id) is not None:
        raise AppExists(f"app {app_id!r} exists already")
    app = App(app_id=app_id, plan=plan)
    _insert_app(cursor, app, now)
    return app


def store_key(
    cursor: DialectCursor,
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
    cursor.lock_for_write(*_TABLES)
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


def store_revocation(cursor: DialectCursor, declarations: Sequence[AppDeclaration], key_id: str) -> bool:
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
    cursor.lock_for_write(*_TABLES)
    cursor.execute("UPDATE keys SET revoked = 1 WHERE key_id = ?", (key_id,))
    return bool(cursor.rowcount)


def store_plan(
    cursor: DialectCursor, declarations: Sequence[AppDeclaration], app_id: str, plan: Plan | None, now: float
) -> App:
    """
    Replace an app's stored plan and return the effective app.

    :raises NoSuchApp: if the app is neither stored nor declared.
    :raises DeclaredInConfig: if the configuration declares a plan for it.
    :raises InvalidKeyField: if the per-connection message rate or burst
        that results is out of range.
    """
    cursor.lock_for_write(*_TABLES)
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
    cursor: DialectCursor, declarations: Sequence[AppDeclaration], app_id: str, suspended: bool, now: float
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
    cursor.lock_for_write(*_TABLES)
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


def bootstrap_default_app(cursor: DialectCursor, now: float) -> tuple[App, tuple[Key, ...]] | None:
    """
    In an empty database, store the app ``default`` with one secret key (all
    four actions) and one publishable key (subscribe, publish, presence),
    both on every channel.

    :return: the app and its keys (secret included) if they were created,
        ``None`` if the database held anything already.
    """
    cursor.lock_for_write(*_TABLES)
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




def store_plan_changes(
    cursor: DialectCursor,
    declarations: Sequence[AppDeclaration],
    app_id: str,
    changes: dict[str, Any],
    unmetered: bool,
    now: float,
) -> App:
    """
    Replace some fields of an app's stored plan (of a fresh L{Plan} when it
    has none), or remove the plan if ``unmetered``, and return the
    effective app. The read and the write hold one lock, so a concurrent
    change cannot be lost between them.

    :raises NoSuchApp: if the app is neither stored nor declared.
    :raises DeclaredInConfig: if the configuration declares a plan for it.
    :raises InvalidKeyField: if the per-connection message rate or burst
        that results is out of range.
    """
    cursor.lock_for_write(*_TABLES)
    current = Tenancy.overlay(read_state(cursor), declarations).app(app_id)
    if current is None:
        raise NoSuchApp(f"no app {app_id!r}")
    plan = None if unmetered else attrs.evolve(current.plan or Plan(), **changes)
    if plan is not None:
        # Checked on the result: one field may only be wrong given the other.
        for field, problem in message_rate_problems(plan.message_rate, plan.message_burst):
            raise InvalidKeyField(field, problem)
    return store_plan(cursor, declarations, app_id, plan, now)
