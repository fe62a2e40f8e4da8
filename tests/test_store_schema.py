"""
Tests for L{meteredrt.store.schema}: ordered, recorded, refused when too
new, and serialised between processes — on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.store.database import Database
from meteredrt.store.dialect import DialectCursor
from meteredrt.store.schema import Migration, SchemaTooNew, current_version, migrate, statements
from tests.postgres_server import fresh_database

if TYPE_CHECKING:
    _MixinBase = SynchronousTestCase
else:
    _MixinBase = object


def steps(applied: list[int]) -> tuple[Migration, ...]:
    """
    Three migrations of a component ``test``, recording which ran.
    """

    def step(version: int, ddl: str) -> Migration:
        create = statements(ddl)

        def apply(cursor: DialectCursor) -> None:
            applied.append(version)
            create(cursor)

        return Migration(version, f"step {version}", apply)

    return (
        step(1, "CREATE TABLE IF NOT EXISTS t1 (n {int})"),
        step(2, "CREATE TABLE t2 (x {float})"),
        step(3, "CREATE TABLE t3 (id {id}, s TEXT)"),
    )


class SchemaTestsMixin(_MixinBase):
    """
    Migration behaviour every database must show.
    """

    def make_database(self) -> Database:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.db = self.make_database()

    def run_migrations(self, migrations: tuple[Migration, ...]) -> int:
        connection = self._connect()
        try:
            with connection:
                return migrate(DialectCursor(connection.cursor(), self.db.dialect), "test", migrations)
        finally:
            connection.close()

    def _connect(self) -> Any:
        if self.db.url is None:
            return sqlite3.connect(self.db.prepare_sqlite("keys"))
        return psycopg2.connect(self.db.url)

    def version(self) -> int:
        connection = self._connect()
        try:
            return current_version(DialectCursor(connection.cursor(), self.db.dialect), "test")
        finally:
            connection.close()

    def test_in_order_once(self) -> None:
        """
        A new database runs every step in order and records the last; a
        second run runs none; a release with one more step runs only it.
        """
        applied: list[int] = []
        migrations = steps(applied)
        self.assertEqual(self.run_migrations(migrations[:2]), 2)
        self.assertEqual(applied, [1, 2])
        self.assertEqual(self.run_migrations(migrations[:2]), 2)
        self.assertEqual(applied, [1, 2])
        self.assertEqual(self.run_migrations(migrations), 3)
        self.assertEqual(applied, [1, 2, 3])
        self.assertEqual(self.version(), 3)

    def test_too_new(self) -> None:
        """
        An older release (fewer steps) refuses a database a newer one
        upgraded, and changes nothing.
        """
        self.run_migrations(steps([]))
        with self.assertRaises(SchemaTooNew) as raised:
            self.run_migrations(steps([])[:1])
        self.assertIn("test schema version 3", str(raised.exception))
        self.assertIn("versions up to 1", str(raised.exception))
        self.assertEqual(self.version(), 3)

    def test_failed_step_rolls_back(self) -> None:
        """
        A step that fails leaves the version where it was.
        """
        self.run_migrations(steps([])[:1])
        broken = Migration(2, "broken", statements("CREATE TABLE t1 (n {int})"))
        with self.assertRaises((sqlite3.OperationalError, psycopg2.errors.DuplicateTable)):
            self.run_migrations((steps([])[0], broken))
        self.assertEqual(self.version(), 1)


class SQLiteSchemaTests(SchemaTestsMixin, SynchronousTestCase):
    """
    Migrations on a SQLite file.
    """

    def make_database(self) -> Database:
        return Database(self.mktemp())


class PostgreSQLSchemaTests(SchemaTestsMixin, SynchronousTestCase):
    """
    Migrations on PostgreSQL.
    """

    def make_database(self) -> Database:
        return Database(self.mktemp(), fresh_database())

    def test_serialised(self) -> None:
        """
        While one process migrates (its transaction open), another waits
        for it rather than running the same steps; once the first commits,
        the second finds nothing to do.
        """
        applied: list[int] = []
        first = psycopg2.connect(self.db.url)
        second = psycopg2.connect(self.db.url)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        migrate(DialectCursor(first.cursor(), self.db.dialect), "test", steps(applied))
        cursor = second.cursor()
        cursor.execute("SET lock_timeout = 200")
        with self.assertRaises(psycopg2.errors.LockNotAvailable):
            migrate(DialectCursor(cursor, self.db.dialect), "test", steps(applied))
        second.rollback()
        first.commit()
        self.assertEqual(migrate(DialectCursor(second.cursor(), self.db.dialect), "test", steps(applied)), 3)
        second.commit()
        self.assertEqual(applied, [1, 2, 3])
