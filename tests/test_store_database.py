"""
Tests for L{meteredrt.store.database} and L{meteredrt.store.dialect}: where
the store is, and the SQL that differs between the two databases.
"""

from __future__ import annotations

import os
import sqlite3
import stat

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.store import keys as key_tables
from meteredrt.store.database import Database, driver_errors
from meteredrt.store.dialect import POSTGRESQL, SQLITE, DialectCursor
from tests.postgres_server import fresh_database


class DatabaseTests(SynchronousTestCase):
    """
    Tests for L{Database}.
    """

    def test_describe_hides_password(self) -> None:
        """
        The description logged at start names host, port and database, never
        the user's password.
        """
        described = Database("d", "postgresql://meteredrt:hunter2@db.internal:5433/prod").describe()
        self.assertEqual(described, "PostgreSQL db.internal:5433/prod")
        self.assertEqual(Database("/var/lib/m").describe(), "SQLite in /var/lib/m")

    def test_dialects(self) -> None:
        """
        No URL is SQLite; a PostgreSQL URL is PostgreSQL.
        """
        self.assertIs(Database("d").dialect, SQLITE)
        self.assertIs(Database("d", "postgresql://u@h/db").dialect, POSTGRESQL)

    def test_sqlite_files_private(self) -> None:
        """
        Each component has its file in the data directory; both are
        private to their owner, and only created when asked for.
        """
        data_dir = self.mktemp()
        database = Database(data_dir)
        self.assertFalse(database.exists("keys"))
        path = database.prepare_sqlite("usage")
        self.assertEqual(path, os.path.join(data_dir, "usage.sqlite3"))
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertTrue(database.exists("usage"))
        self.assertFalse(database.exists("keys"))
        self.assertTrue(Database(data_dir, "postgresql://u@h/db").exists("keys"))

    def test_postgresql_timeouts(self) -> None:
        """
        A PostgreSQL connection of the store carries the statement and lock
        time limits.
        """
        connection = Database(self.mktemp(), fresh_database()).connect(key_tables.COMPONENT, key_tables.MIGRATIONS)
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        cursor.execute("SHOW statement_timeout")
        self.assertEqual(cursor.fetchone(), ("5s",))
        cursor.execute("SHOW lock_timeout")
        self.assertEqual(cursor.fetchone(), ("4s",))

    def test_driver_errors(self) -> None:
        """
        The CLI reports both drivers' errors in one line.
        """
        self.assertEqual(driver_errors(), (sqlite3.Error, psycopg2.Error))


class DialectTests(SynchronousTestCase):
    """
    Tests for L{DialectCursor}.
    """

    def test_placeholders(self) -> None:
        """
        Statements are written with C{?}; PostgreSQL gets C{%s}.
        """
        self.assertEqual(SQLITE.sql("a = ? AND b = ?"), "a = ? AND b = ?")
        self.assertEqual(POSTGRESQL.sql("a = ? AND b = ?"), "a = %s AND b = %s")

    def test_types(self) -> None:
        """
        Schema statements get each database's types.
        """
        ddl = "CREATE TABLE t (id {id}, n {int}, x {float})"
        self.assertEqual(SQLITE.ddl(ddl), "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, x REAL)")
        self.assertEqual(
            POSTGRESQL.ddl(ddl), "CREATE TABLE t (id BIGSERIAL PRIMARY KEY, n BIGINT, x DOUBLE PRECISION)"
        )
        # A key never reused, even after the rows holding the largest went.
        self.assertEqual(SQLITE.ddl("{serial}"), "INTEGER PRIMARY KEY AUTOINCREMENT")
        self.assertEqual(POSTGRESQL.ddl("{serial}"), "BIGSERIAL PRIMARY KEY")

    def test_sqlite_write_lock(self) -> None:
        """
        On SQLite the write lock is C{BEGIN IMMEDIATE}: another connection
        cannot write until the transaction ends.
        """
        path = self.mktemp()
        first = sqlite3.connect(path)
        first.execute("CREATE TABLE t (n INTEGER)")
        first.commit()
        second = sqlite3.connect(path, timeout=0)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        DialectCursor(first.cursor(), SQLITE).lock_for_write("t")
        with self.assertRaises(sqlite3.OperationalError):
            second.execute("INSERT INTO t VALUES (1)")
        first.rollback()
        second.execute("INSERT INTO t VALUES (1)")

    def test_postgresql_write_lock(self) -> None:
        """
        On PostgreSQL the write lock locks the tables against other writers
        (who wait) but not against plain reads.
        """
        database = Database(self.mktemp(), fresh_database())
        first = database.connect(key_tables.COMPONENT, key_tables.MIGRATIONS)
        second = database.connect(key_tables.COMPONENT, key_tables.MIGRATIONS)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        DialectCursor(first.cursor(), POSTGRESQL).lock_for_write("apps", "keys")
        cursor = second.cursor()
        cursor.execute("SELECT COUNT(*) FROM apps")
        self.assertEqual(cursor.fetchone(), (0,))
        cursor.execute("SET lock_timeout = 100")
        with self.assertRaises(psycopg2.errors.LockNotAvailable):
            DialectCursor(cursor, POSTGRESQL).lock_for_write("apps", "keys")
        second.rollback()
        first.rollback()
        DialectCursor(second.cursor(), POSTGRESQL).lock_for_write("apps", "keys")
