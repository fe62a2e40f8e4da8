"""
Versioned schema creation and upgrades.

Each part of the store (a I{component}: ``keys``, ``usage``, ``webhooks``)
owns its tables and an ordered list of L{Migration}s. The
table C{schema_versions} records, per component, the version its tables
are at. L{migrate} brings a component up to the newest version this code
knows, one step per transaction-ordered migration, and refuses a database
whose version is newer than that: an older server must not write into a
schema it does not understand (L{SchemaTooNew}).

The first migration of every component creates its tables with C{IF NOT
EXISTS}, so a database made by a release before versioning (tables, no
C{schema_versions}) is adopted as version 1 and upgraded in place.

Two processes starting at once must not both run a step: on SQLite the
whole migration runs under C{BEGIN IMMEDIATE}, on PostgreSQL under a
transaction-scoped advisory lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from attrs import frozen

from meteredrt.store.dialect import POSTGRESQL, DialectCursor

#: The PostgreSQL advisory lock key that serialises migrations ("mrt" + 1).
_MIGRATION_LOCK = 0x6D727401


class SchemaTooNew(RuntimeError):
    """
    The database was upgraded by a newer release than this one.
    """


@frozen
class Migration:
    """
    One step: the version it brings a component to, and what it runs.
    """

    version: int
    description: str
    apply: Callable[[DialectCursor], None]


def statements(*ddl: str) -> Callable[[DialectCursor], None]:
    """
    A migration step that runs schema statements, with the dialect's type
    names (C{{int}}, C{{float}}, C{{id}}) filled in.
    """

    def apply(cursor: DialectCursor) -> None:
        for statement in ddl:
            cursor.execute(cursor.dialect.ddl(statement))

    return apply


def _lock(cursor: DialectCursor) -> None:
    if cursor.dialect is POSTGRESQL:
        cursor.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    else:
        cursor.lock_for_write()
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_versions ("
        " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    )


def current_version(cursor: DialectCursor, component: str) -> int:
    """
    The version a component's tables are at; 0 if it has none recorded.
    """
    cursor.execute("SELECT version FROM schema_versions WHERE component = ?", (component,))
    row = cursor.fetchone()
    return 0 if row is None else int(row[0])


def migrate(cursor: DialectCursor, component: str, migrations: Sequence[Migration]) -> int:
    """
    Bring a component's tables to the newest version in C{migrations}, in
    the caller's transaction.

    :return: the version reached.
    :raises SchemaTooNew: if the database is at a newer version than any
        migration here.
    """
    newest = migrations[-1].version
    _lock(cursor)
    version = current_version(cursor, component)
    if version > newest:
        raise SchemaTooNew(
            f"the {cursor.dialect.name} database holds {component} schema version {version}, but this "
            f"release of meteredrt knows versions up to {newest}: it was upgraded by a newer release. "
            "Run that release (or newer), or restore a backup taken before the upgrade."
        )
    for migration in migrations:
        if migration.version <= version:
            continue
        migration.apply(cursor)
        version = migration.version
    cursor.execute(
        "INSERT INTO schema_versions (component, version) VALUES (?, ?) "
        "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
        (component, version),
    )
    return version
