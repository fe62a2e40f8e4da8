"""
Where the store lives and how to reach it: SQLite files in the data
directory (the embedded default) or one PostgreSQL database.

A L{Database} opens connections for one I{component} of the store (the key
tables, the usage tables): an C{adbapi} pool for the server, so no query
runs on the reactor thread, and a plain synchronous connection for the
C{meteredrt} command line, which has no reactor. Both come configured the
same way and both bring the component's schema up to date (L{migrate}).

SQLite keeps each component in its own file (C{meteredrt.sqlite3},
C{usage.sqlite3}, C{webhooks.sqlite3}), as earlier releases did, so existing data directories
upgrade in place. PostgreSQL keeps every component in one database.

Every query has a time limit: SQLite waits at most L{BUSY_TIMEOUT_MS} for
another process's write lock; PostgreSQL connections time out after
L{CONNECT_TIMEOUT} seconds, statements after L{STATEMENT_TIMEOUT_MS}, and a
peer that vanishes without closing the TCP connection is noticed by
keepalives and C{tcp_user_timeout} within about ten seconds.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorCore

from meteredrt.store.dialect import POSTGRESQL, SQLITE, Dialect, DialectCursor
from meteredrt.store.schema import Migration, migrate

#: How long a SQLite writer waits for another process's write lock, in ms.
#: Waiting happens on a pool thread (or in the CLI), never on the reactor.
BUSY_TIMEOUT_MS = 5000

#: Seconds to wait for a PostgreSQL connection.
CONNECT_TIMEOUT = 5

#: The longest any one PostgreSQL statement may run, in ms.
STATEMENT_TIMEOUT_MS = 5000

#: The longest a PostgreSQL statement waits for a lock, in ms.
LOCK_TIMEOUT_MS = 4000

#: The SQLite file of each component inside the data directory.
SQLITE_FILES = {"keys": "meteredrt.sqlite3", "usage": "usage.sqlite3", "webhooks": "webhooks.sqlite3"}

class DriverMissing(RuntimeError):
    """
    PostgreSQL is configured but its driver is not installed.
    """


def require_driver(database: Database) -> None:
    """
    Check that the database's driver can be imported, before anything
    starts.

    :raises DriverMissing: with the command that installs it.
    """
    if database.url is None:
        return
    try:
        import psycopg2  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise DriverMissing(
            "[storage] database is a PostgreSQL URL, but psycopg2 is not installed: "
            "pip install 'meteredrt[postgresql]'"
        ) from None


def _sqlite_pragmas(connection: sqlite3.Connection) -> None:
    """
    A database shared by processes: WAL journal (readers never wait for the
    writer), a busy timeout (a writer waits for another process's write
    instead of failing at once), and C{synchronous=NORMAL} (a committed
    transaction is lost only when the operating system crashes).
    """
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")


def _postgresql_options() -> dict[str, Any]:
    return {
        "connect_timeout": CONNECT_TIMEOUT,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}",
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        "tcp_user_timeout": 10_000,
        "application_name": "meteredrt",
    }


def _migrated(connection: Any, dialect: Dialect, component: str, migrations: Sequence[Migration]) -> None:
    cursor = connection.cursor()
    try:
        migrate(DialectCursor(cursor, dialect), component, migrations)
    except BaseException:
        connection.rollback()
        raise
    finally:
        cursor.close()
    connection.commit()


def prepare_sqlite_connection(
    connection: sqlite3.Connection, component: str, migrations: Sequence[Migration]
) -> None:
    """
    Configure a fresh SQLite connection and bring the component's schema up
    to date.
    """
    _sqlite_pragmas(connection)
    _migrated(connection, SQLITE, component, migrations)


def sqlite_pool(
    path: str, component: str, migrations: Sequence[Migration], reactor: IReactorCore
) -> adbapi.ConnectionPool:
    """
    An C{adbapi} pool over one SQLite file: one connection on one thread,
    prepared by L{prepare_sqlite_connection}.
    """
    return adbapi.ConnectionPool(
        "sqlite3",
        path,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=lambda connection: prepare_sqlite_connection(connection, component, migrations),
        cp_reactor=reactor,
    )


class _QuietConnection(adbapi.Connection):
    """
    A pooled connection whose failed rollback (the database went away)
    drops the connection without logging: the interaction's own error
    reaches the caller, which logs an outage once rather than adbapi
    logging a traceback per query.
    """

    def rollback(self) -> None:
        connection = self._connection
        assert connection is not None
        try:
            connection.rollback()
            cursor = connection.cursor()
            cursor.execute(self._pool.good_sql)
            cursor.close()
            connection.commit()
        except Exception:
            # The next interaction on this thread connects afresh.
            self._pool.disconnect(connection)


class _ReconnectingPool(adbapi.ConnectionPool):
    """
    The PostgreSQL pool: reconnects after a lost connection, quietly.
    """

    connectionFactory = _QuietConnection


@frozen
class Database:
    """
    The store's location: a data directory for SQLite, or a PostgreSQL URL.

    :ivar data_dir: the server's data directory (SQLite files live here).
    :ivar url: the PostgreSQL URL, or ``None`` for SQLite.
    """

    data_dir: str
    url: str | None = None

    @property
    def dialect(self) -> Dialect:
        """
        The SQL dialect of this database.
        """
        return SQLITE if self.url is None else POSTGRESQL

    def describe(self) -> str:
        """
        Where the data is, for logs and messages, without any password.
        """
        if self.url is None:
            return f"SQLite in {self.data_dir}"
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"PostgreSQL {host}{port}{parts.path}"

    def sqlite_path(self, component: str) -> str:
        """
        The SQLite file of a component.
        """
        return os.path.join(self.data_dir, SQLITE_FILES[component])

    def prepare_sqlite(self, component: str) -> str:
        """
        Create the data directory and a component's empty file, both private
        to their owner, if they do not exist yet; return the file's path.

        Synchronous file I/O: call it from the CLI or from the composition
        root before the reactor runs. SQLite gives its C{-wal} and C{-shm}
        files the database file's permissions.
        """
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        path = self.sqlite_path(component)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        return path

    def exists(self, component: str) -> bool:
        """
        Whether the component may hold data: always for PostgreSQL, only if
        its file exists for SQLite. Lets read-only commands avoid creating
        an empty database.
        """
        return self.url is not None or os.path.exists(self.sqlite_path(component))

    def open_pool(
        self, component: str, migrations: Sequence[Migration], reactor: IReactorCore, *, create: bool = True
    ) -> adbapi.ConnectionPool:
        """
        An C{adbapi} pool for the server; each new connection brings the
        component's schema up to date first (and fails with
        L{meteredrt.store.schema.SchemaTooNew} when it is newer than this
        release).

        One connection on one thread, for either database: the key store
        and the meter each need little, and one thread keeps the order in
        which interactions finish the order in which they were started
        (SQLite serialises writers anyway). PostgreSQL reconnects after a
        lost connection (C{cp_reconnect}).

        @param create: create the SQLite data directory and file now; the
            server passes C{False} and creates them once it has bound its
            listeners.
        """
        if self.url is None:
            path = self.prepare_sqlite(component) if create else self.sqlite_path(component)
            return sqlite_pool(path, component, migrations, reactor)

        def open_postgresql(connection: Any) -> None:
            _migrated(connection, POSTGRESQL, component, migrations)

        return _ReconnectingPool(
            "psycopg2",
            self.url,
            cp_min=1,
            cp_max=1,
            cp_reconnect=True,
            cp_noisy=False,
            cp_openfun=open_postgresql,
            cp_reactor=reactor,
            **_postgresql_options(),
        )

    def connect(self, component: str, migrations: Sequence[Migration]) -> Any:
        """
        A synchronous DB-API connection for the command line, configured
        like the server's and with the component's schema up to date.
        The caller closes it.
        """
        if self.url is None:
            sqlite = sqlite3.connect(self.prepare_sqlite(component), timeout=BUSY_TIMEOUT_MS / 1000)
            connection: Any = sqlite
            _sqlite_pragmas(sqlite)
        else:
            import psycopg2

            connection = psycopg2.connect(self.url, **_postgresql_options())
        try:
            _migrated(connection, self.dialect, component, migrations)
        except BaseException:
            connection.close()
            raise
        return connection


def driver_errors() -> tuple[type[Exception], ...]:
    """
    The exception classes the database drivers raise (for the command line
    to report in one line): C{sqlite3.Error}, and C{psycopg2.Error} when
    PostgreSQL support is installed.
    """
    try:
        import psycopg2
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg2.Error)


def first_line(error: BaseException) -> str:
    """
    The first line of an error's message: psycopg2 adds hint lines ("Is
    the server running on that host…") that do not belong in a one-line
    report.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
