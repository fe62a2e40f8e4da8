"""
Durable usage counters and the billing ledger, in SQLite.

L{UsageStore} is what L{meteredrt.metering.Meter} writes its counters to and
reads them back from after a restart. It runs every statement in a
one-thread L{adbapi.ConnectionPool}, so the reactor never waits on disk.

The file (L{usage_database_path}: C{<data_dir>/usage.sqlite3}, WAL mode)
holds two tables:

  - C{usage}: one row per app and billing period with the period's
    I{absolute} counters (L{UsageRow}). A flush overwrites a row with the
    current totals rather than adding increments, so writing the same batch
    twice leaves the same row.
  - C{ledger}: append-only money movements (L{LedgerEntry}), a C{charge} for
    billed overage units and a C{recharge} for an auto-recharge. An app's
    running balance is its plan's opening balance plus the recharges minus
    the charges of all its ledger rows, so an invoice can be rebuilt from
    the ledger alone.

A batch (L{FlushBatch}) is written in one transaction: its usage rows and
its ledger rows land together or not at all, which is what lets the meter
retry a failed batch without double-charging anybody.

The module-level C{read_*} functions take a plain DB-API cursor, so the
C{meteredrt usage} command can read the file with the standard library
L{sqlite3} module while a server is running (WAL lets readers and the one
writer proceed side by side).

Durability: the meter flushes once a second and once more on graceful
shutdown. A process killed with C{SIGKILL} loses at most the counts of the
last flush interval (one second); committed batches survive, because WAL
with C{synchronous=NORMAL} loses committed transactions only when the
operating system itself crashes.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any, Protocol, Self, TypeVar

from attrs import frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore

#: The file name of the usage database inside the data directory.
USAGE_DB_NAME = "usage.sqlite3"

#: The two kinds of ledger row.
CHARGE = "charge"
RECHARGE = "recharge"

_T = TypeVar("_T")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS usage (
        app_id TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        period_end INTEGER NOT NULL,
        peak_concurrent INTEGER NOT NULL DEFAULT 0,
        messages_used INTEGER NOT NULL DEFAULT 0,
        overage_messages INTEGER NOT NULL DEFAULT 0,
        overage_connections INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (app_id, period_start)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS ledger (
        id INTEGER PRIMARY KEY,
        app_id TEXT NOT NULL,
        at REAL NOT NULL,
        period_start INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('charge', 'recharge')),
        units INTEGER NOT NULL,
        amount REAL NOT NULL,
        reason TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS ledger_app_period ON ledger (app_id, period_start)",
)


@frozen
class UsageRow:
    """
    The persisted counters of one app in one billing period.

    ``concurrent_now`` is deliberately absent: live connections do not
    outlive the process, so it always restarts at zero.
    """

    app_id: str
    period_start: int
    period_end: int
    peak_concurrent: int = 0
    messages_used: int = 0
    overage_messages: int = 0
    overage_connections: int = 0


@frozen
class LedgerEntry:
    """
    One money movement of an app.

    ``amount`` is always non-negative; ``kind`` says which way it moves the
    balance (a L{CHARGE} lowers it, a L{RECHARGE} raises it). ``units`` is
    the number of overage messages or connections a charge bills, and 1 for
    a recharge. ``id`` is assigned by the database and is ``None`` on
    entries not yet written.
    """

    app_id: str
    at: float
    period_start: int
    kind: str
    units: int
    amount: float
    reason: str
    id: int | None = None

    @property
    def balance_change(self) -> float:
        """
        What this entry adds to the app's balance (negative for a charge).
        """
        return self.amount if self.kind == RECHARGE else -self.amount


@frozen
class FlushBatch:
    """
    What one flush writes: absolute usage rows and new ledger entries.
    """

    usage: tuple[UsageRow, ...] = ()
    ledger: tuple[LedgerEntry, ...] = ()


class Cursor(Protocol):
    """
    The part of a DB-API cursor the functions of this module use.
    """

    def execute(self, sql: str, parameters: Any = ..., /) -> Any:
        """
        Run one statement.
        """

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Any:
        """
        Run one statement once per parameter set.
        """

    def fetchone(self) -> Any:
        """
        The next result row, or ``None``.
        """

    def fetchall(self) -> list[Any]:
        """
        All remaining result rows.
        """


def prepare_connection(connection: sqlite3.Connection) -> None:
    """
    Put a fresh connection in WAL mode and make sure the tables exist.

    Used as the pool's C{cp_openfun}; it runs on the pool's thread.
    """
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    create_schema(connection.cursor())
    connection.commit()


def create_schema(cursor: Cursor) -> None:
    """
    Create the C{usage} and C{ledger} tables if they do not exist yet.
    """
    for statement in _SCHEMA:
        cursor.execute(statement)


_USAGE_COLUMNS = (
    "app_id, period_start, period_end, peak_concurrent, messages_used, "
    "overage_messages, overage_connections"
)
_LEDGER_COLUMNS = "id, app_id, at, period_start, kind, units, amount, reason"


def _usage_row(row: tuple[Any, ...]) -> UsageRow:
    app_id, start, end, peak, used, over_msgs, over_conns = row
    return UsageRow(app_id, start, end, peak, used, over_msgs, over_conns)


def _ledger_entry(row: tuple[Any, ...]) -> LedgerEntry:
    entry_id, app_id, at, start, kind, units, amount, reason = row
    return LedgerEntry(app_id, at, start, kind, units, amount, reason, id=entry_id)


def read_usage(cursor: Cursor, app_id: str, period_start: int) -> UsageRow | None:
    """
    The counters of one app in the period starting at ``period_start``, or
    ``None`` if nothing was counted then.
    """
    cursor.execute(
        f"SELECT {_USAGE_COLUMNS} FROM usage WHERE app_id = ? AND period_start = ?",
        (app_id, period_start),
    )
    row = cursor.fetchone()
    return None if row is None else _usage_row(row)


def read_period(cursor: Cursor, period_start: int) -> list[UsageRow]:
    """
    The counters of every app in the period starting at ``period_start``,
    ordered by app id.
    """
    cursor.execute(
        f"SELECT {_USAGE_COLUMNS} FROM usage WHERE period_start = ? ORDER BY app_id",
        (period_start,),
    )
    return [_usage_row(row) for row in cursor.fetchall()]


def read_periods(cursor: Cursor, app_id: str) -> list[UsageRow]:
    """
    The counters of every period one app was counted in, oldest first.
    """
    cursor.execute(
        f"SELECT {_USAGE_COLUMNS} FROM usage WHERE app_id = ? ORDER BY period_start",
        (app_id,),
    )
    return [_usage_row(row) for row in cursor.fetchall()]


def read_ledger(cursor: Cursor, app_id: str, period_start: int | None = None) -> list[LedgerEntry]:
    """
    An app's ledger entries in the order they were written, all of them or
    only those of the period starting at ``period_start``.
    """
    if period_start is None:
        cursor.execute(
            f"SELECT {_LEDGER_COLUMNS} FROM ledger WHERE app_id = ? ORDER BY id",
            (app_id,),
        )
    else:
        cursor.execute(
            f"SELECT {_LEDGER_COLUMNS} FROM ledger "
            "WHERE app_id = ? AND period_start = ? ORDER BY id",
            (app_id, period_start),
        )
    return [_ledger_entry(row) for row in cursor.fetchall()]


def read_balance_changes(cursor: Cursor) -> dict[str, float]:
    """
    Per app, the sum of all its ledger entries (recharges minus charges):
    what to add to the plan's opening balance.
    """
    cursor.execute(
        "SELECT app_id, SUM(CASE kind WHEN 'recharge' THEN amount ELSE -amount END) "
        "FROM ledger GROUP BY app_id"
    )
    return {app_id: total for app_id, total in cursor.fetchall()}


def write_batch(cursor: Cursor, batch: FlushBatch) -> None:
    """
    Upsert the batch's absolute usage rows and append its ledger entries.

    Run it inside one transaction; L{UsageStore.flush} does.
    """
    cursor.executemany(
        f"INSERT INTO usage ({_USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (app_id, period_start) DO UPDATE SET "
        "period_end = excluded.period_end, "
        "peak_concurrent = excluded.peak_concurrent, "
        "messages_used = excluded.messages_used, "
        "overage_messages = excluded.overage_messages, "
        "overage_connections = excluded.overage_connections",
        [
            (
                row.app_id,
                row.period_start,
                row.period_end,
                row.peak_concurrent,
                row.messages_used,
                row.overage_messages,
                row.overage_connections,
            )
            for row in batch.usage
        ],
    )
    cursor.executemany(
        "INSERT INTO ledger (app_id, at, period_start, kind, units, amount, reason) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (e.app_id, e.at, e.period_start, e.kind, e.units, e.amount, e.reason)
            for e in batch.ledger
        ],
    )


class Pool(Protocol):
    """
    What L{UsageStore} needs of an L{adbapi.ConnectionPool}.
    """

    def runInteraction(
        self, interaction: Callable[..., _T], *args: Any, **kw: Any
    ) -> Deferred[_T]:
        """
        Run ``interaction(cursor, *args, **kw)`` in one transaction.
        """

    def close(self) -> None:
        """
        Close every connection.
        """


def usage_database_path(data_dir: str) -> str:
    """
    Where the usage database of a data directory lives.
    """
    return os.path.join(data_dir, USAGE_DB_NAME)


class UsageStore:
    """
    Asynchronous access to the usage database, for the metering service.

    Every method runs one transaction on the pool's thread and returns a
    Deferred.
    """

    _pool: Pool

    def __init__(self, path: str, reactor: IReactorCore) -> None:
        """
        A store over the SQLite file at ``path``, created on first use.

        One connection on one thread: SQLite has a single writer anyway, and
        a single connection keeps our writes in order.

        :param reactor: whose thread pool runs the transactions.
        """
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=prepare_connection,
            cp_reactor=reactor,
        )

    @classmethod
    def with_pool(cls, pool: Pool) -> Self:
        """
        A store running its transactions on ``pool`` instead: how tests run
        them synchronously.
        """
        store = cls.__new__(cls)
        store._pool = pool
        return store

    def load(self, app_id: str, period_start: int) -> Deferred[UsageRow | None]:
        """
        Fires with one app's counters for one period (see L{read_usage}).
        """
        return self._pool.runInteraction(read_usage, app_id, period_start)

    def load_period(self, period_start: int) -> Deferred[list[UsageRow]]:
        """
        Fires with every app's counters for one period (see L{read_period}).
        """
        return self._pool.runInteraction(read_period, period_start)

    def balance_changes(self) -> Deferred[dict[str, float]]:
        """
        Fires with each app's net ledger total (see L{read_balance_changes}).
        """
        return self._pool.runInteraction(read_balance_changes)

    def flush(self, batch: FlushBatch) -> Deferred[None]:
        """
        Write one batch in one transaction (see L{write_batch}).
        """
        return self._pool.runInteraction(write_batch, batch)

    def ledger(self, app_id: str, period_start: int | None = None) -> Deferred[list[LedgerEntry]]:
        """
        Fires with an app's ledger entries (see L{read_ledger}).
        """
        return self._pool.runInteraction(read_ledger, app_id, period_start)

    def periods(self, app_id: str) -> Deferred[list[UsageRow]]:
        """
        Fires with an app's counters for every period (see L{read_periods}).
        """
        return self._pool.runInteraction(read_periods, app_id)

    def close(self) -> None:
        """
        Close the database. Call it after the meter's final flush.
        """
        self._pool.close()
