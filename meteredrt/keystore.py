"""
The SQLite key store under the names earlier releases gave it.

Apps and keys now live in L{meteredrt.store} (L{meteredrt.store.keystore}
for the server's service, L{meteredrt.store.keys} for the tables), for
SQLite and PostgreSQL alike. These names stay for code and scripts that
open a data directory's SQLite file directly.
"""

from __future__ import annotations

import sqlite3

from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorCore

from meteredrt.store.database import Database, prepare_sqlite_connection, sqlite_pool
from meteredrt.store.keys import COMPONENT, MIGRATIONS, read_state
from meteredrt.store.keystore import RELOAD_INTERVAL
from meteredrt.store.keystore import KeyStore as SQLiteKeyStore
from meteredrt.store.tenancy import StoredState, Tenancy

__all__ = [
    "RELOAD_INTERVAL",
    "SQLiteKeyStore",
    "StoredState",
    "Tenancy",
    "connect",
    "database_path",
    "open_pool",
    "prepare_database",
    "read_state",
]


def database_path(data_dir: str) -> str:
    """
    The SQLite file of a data directory's apps and keys.
    """
    return Database(data_dir).sqlite_path(COMPONENT)


def prepare_database(data_dir: str) -> str:
    """
    Create the data directory and the key database file, private to their
    owner, if need be; return the file's path.
    """
    return Database(data_dir).prepare_sqlite(COMPONENT)


def open_pool(path: str, reactor: IReactorCore) -> adbapi.ConnectionPool:
    """
    An C{adbapi} pool over the key database file at C{path}, schema up to
    date, for L{SQLiteKeyStore}.
    """
    return sqlite_pool(path, COMPONENT, MIGRATIONS, reactor)


def connect(path: str) -> sqlite3.Connection:
    """
    A synchronous connection to the key database file at C{path}, schema
    up to date.
    """
    connection = sqlite3.connect(path)
    prepare_sqlite_connection(connection, COMPONENT, MIGRATIONS)
    return connection
