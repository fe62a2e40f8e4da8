"""
The SQL that differs between SQLite and PostgreSQL, in one place.

The store's table functions write their statements once, with C{?}
placeholders and the type names of L{Dialect.types}, and run them through a
L{DialectCursor}, which translates the placeholders for the driver and knows
how each database takes a write lock. Nothing outside C{meteredrt.store}
sees a dialect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from attrs import frozen

_P = ParamSpec("_P")
_T = TypeVar("_T")


@frozen
class Dialect:
    """
    One database's SQL.

    :ivar name: ``"sqlite"`` or ``"postgresql"``.
    :ivar types: the column types the schema uses, by the names the
        migrations write (C{{int}}, C{{float}}, C{{id}}, and C{{serial}}: a
        key the database assigns in increasing order and never reuses).
    :ivar greatest: the two-argument maximum function.
    """

    name: str
    types: Mapping[str, str]
    greatest: str
    _placeholder: str

    def sql(self, statement: str) -> str:
        """
        A statement written with C{?} placeholders, for this driver.

        No statement of the store contains a literal C{?} or C{%}.
        """
        if self._placeholder == "?":
            return statement
        return statement.replace("?", self._placeholder)

    def ddl(self, statement: str) -> str:
        """
        A schema statement with this dialect's type names filled in.
        """
        return statement.format_map(self.types)


SQLITE = Dialect(
    name="sqlite",
    types={
        "int": "INTEGER",
        "float": "REAL",
        "id": "INTEGER PRIMARY KEY",
        "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
    },
    greatest="MAX",
    placeholder="?",
)

POSTGRESQL = Dialect(
    name="postgresql",
    types={
        "int": "BIGINT",
        "float": "DOUBLE PRECISION",
        "id": "BIGSERIAL PRIMARY KEY",
        "serial": "BIGSERIAL PRIMARY KEY",
    },
    greatest="GREATEST",
    placeholder="%s",
)


class DialectCursor:
    """
    A DB-API cursor that speaks the store's SQL in one dialect.
    """

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def execute(self, statement: str, parameters: Any = ()) -> None:
        """
        Run one statement written with C{?} placeholders.
        """
        self._cursor.execute(self.dialect.sql(statement), parameters)

    def executemany(self, statement: str, parameters: Any) -> None:
        """
        Run one statement once per parameter set.
        """
        self._cursor.executemany(self.dialect.sql(statement), parameters)

    def fetchone(self) -> Any:
        """
        The next result row, or ``None``.
        """
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        """
        All remaining result rows.
        """
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        """
        The rows the last statement changed.
        """
        return int(self._cursor.rowcount)

    def lock_for_write(self, *tables: str) -> None:
        """
        Take the write lock on these tables before reading what a write
        depends on, so the checks still hold when the write lands (another
        process may be writing too). Plain reads by others go on.

        SQLite has one lock for the whole file (C{BEGIN IMMEDIATE});
        PostgreSQL locks the tables in a mode that conflicts with itself
        and with writes but not with reads. Either lock lasts until the
        transaction ends.
        """
        if self.dialect is SQLITE:
            if not self._cursor.connection.in_transaction:
                self._cursor.execute("BEGIN IMMEDIATE")
        else:
            self._cursor.execute(f"LOCK TABLE {', '.join(tables)} IN SHARE ROW EXCLUSIVE MODE")


def in_dialect(
    dialect: Dialect, interaction: Callable[Concatenate[DialectCursor, _P], _T]
) -> Callable[Concatenate[Any, _P], _T]:
    """
    Adapt an interaction over a L{DialectCursor} to one over the driver's
    cursor, as C{adbapi.ConnectionPool.runInteraction} calls it.
    """

    def run(cursor: Any, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return interaction(DialectCursor(cursor, dialect), *args, **kwargs)

    return run
