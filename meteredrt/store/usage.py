"""
Durable usage counters and the billing ledger, in SQLite or PostgreSQL.

L{UsageStore} is what L{meteredrt.metering.Meter} writes its counters to and
reads them back from after a restart. It runs every statement in an
C{adbapi} pool, so the reactor never waits on the database.

Three tables:

  - C{usage}: one row per app and billing period with the period's totals
    (L{UsageRow}). A flush I{adds} its counts to the row
    (C{messages_used = messages_used + excluded.messages_used}) and raises
    the peak to the larger of the two, so any number of processes writing
    into one database add up instead of overwriting each other.
  - C{ledger}: append-only money movements (L{LedgerEntry}), a C{charge}
    for billed overage units and a C{recharge} for an auto-recharge. An
    app's running balance is its plan's opening balance plus the recharges
    minus the charges of all its ledger rows.
  - C{usage_writers}: per writing process, the sequence number of the last
    batch it wrote. Adding is not idempotent, so a batch whose commit was
    cut off (the database restarted under it) would be counted twice when
    retried; the writer and sequence of a L{FlushBatch} make the retry a
    no-op when the first attempt did land.

A batch is written in one transaction: its usage increments, its ledger
rows and its sequence number land together or not at all.

Peaks: C{peak_concurrent} is the largest number of connections I{one
writer} held at once in the period, the maximum over writers, not their
sum (two processes with 3 connections each record a peak of 3). A
cluster-wide figure needs a cluster-wide count.

Durability: the meter flushes once a second and once more on graceful
shutdown. A process killed with C{SIGKILL} loses at most the counts of the
last flush interval; committed batches survive (SQLite in WAL mode with
C{synchronous=NORMAL} loses a committed transaction only when the
operating system crashes).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Protocol, Self, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore

from meteredrt.store.database import prepare_sqlite_connection, sqlite_pool
from meteredrt.store.dialect import SQLITE, Dialect, DialectCursor, in_dialect
from meteredrt.store.schema import Migration, statements

#: The component name of these tables (L{meteredrt.store.schema}).
COMPONENT = "usage"

#: Seconds a writer's last sequence number is kept after its last batch.
WRITER_RETENTION = 7 * 24 * 3600.0

#: The two kinds of ledger row.
CHARGE = "charge"
RECHARGE = "recharge"

_T = TypeVar("_T")

#: The usage tables' schema, oldest step first. Version 1 is the schema of
#: the releases before versioning, so their files are adopted as they are.
MIGRATIONS = (
    Migration(
        1,
        "usage counters and ledger",
        statements(
            """
            CREATE TABLE IF NOT EXISTS usage (
                app_id TEXT NOT NULL,
                period_start {int} NOT NULL,
                period_end {int} NOT NULL,
                peak_concurrent {int} NOT NULL DEFAULT 0,
                messages_used {int} NOT NULL DEFAULT 0,
                overage_messages {int} NOT NULL DEFAULT 0,
                overage_connections {int} NOT NULL DEFAULT 0,
                PRIMARY KEY (app_id, period_start)
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS ledger (
                id {id},
                app_id TEXT NOT NULL,
                at {float} NOT NULL,
                period_start {int} NOT NULL,
                kind TEXT NOT NULL CHECK (kind IN ('charge', 'recharge')),
                units {int} NOT NULL,
                amount {float} NOT NULL,
                reason TEXT NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS ledger_app_period ON ledger (app_id, period_start)",
        ),
    ),
    Migration(
        2,
        "writers' batch sequence numbers: usage rows become increments",
        statements(
            """
            CREATE TABLE IF NOT EXISTS usage_writers (
                writer TEXT PRIMARY KEY,
                sequence {int} NOT NULL,
                at {float} NOT NULL
            )
            """,
        ),
    ),
)


@frozen
class UsageRow:
    """
    The counters of one app in one billing period: totals when read, the
    increments of one flush in a L{FlushBatch} (the peak is the writer's
    own peak either way).

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
    What one flush writes: usage increments and new ledger entries.

    :ivar writer: the writing process's id; with ``sequence``, makes a
        retried batch count once. ``None`` writes unconditionally.
    :ivar sequence: this batch's number, increasing per writer; a batch
        whose number is not above the writer's last written one is skipped.
    :ivar at: when the batch was taken (recorded with the sequence).
    """

    usage: tuple[UsageRow, ...] = ()
    ledger: tuple[LedgerEntry, ...] = ()
    writer: str | None = None
    sequence: int = 0
    at: float = 0.0


def prepare_connection(connection: sqlite3.Connection) -> None:
    """
    Configure a fresh SQLite connection (WAL) and bring the usage tables
    up to date. The pool's C{cp_openfun}; it runs on the pool's thread.
    """
    prepare_sqlite_connection(connection, COMPONENT, MIGRATIONS)


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


def read_usage(cursor: DialectCursor, app_id: str, period_start: int) -> UsageRow | None:
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


def read_period(cursor: DialectCursor, period_start: int) -> list[UsageRow]:
    """
    The counters of every app in the period starting at ``period_start``,
    ordered by app id.
    """
    cursor.execute(
        f"SELECT {_USAGE_COLUMNS} FROM usage WHERE period_start = ? ORDER BY app_id",
        (period_start,),
    )
    return [_usage_row(row) for row in cursor.fetchall()]


def read_periods(cursor: DialectCursor, app_id: str) -> list[UsageRow]:
    """
    The counters of every period one app was counted in, oldest first.
    """
    cursor.execute(
        f"SELECT {_USAGE_COLUMNS} FROM usage WHERE app_id = ? ORDER BY period_start",
        (app_id,),
    )
    return [_usage_row(row) for row in cursor.fetchall()]


def read_ledger(cursor: DialectCursor, app_id: str, period_start: int | None = None) -> list[LedgerEntry]:
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


def read_balance_changes(cursor: DialectCursor) -> dict[str, float]:
    """
    Per app, the sum of all its ledger entries (recharges minus charges):
    what to add to the plan's opening balance.
    """
    cursor.execute(
        "SELECT app_id, SUM(CASE kind WHEN 'recharge' THEN amount ELSE -amount END) "
        "FROM ledger GROUP BY app_id"
    )
    return {app_id: float(total) for app_id, total in cursor.fetchall()}


def read_report(
    cursor: DialectCursor, app_id: str, period_start: int
) -> tuple[UsageRow | None, list[LedgerEntry], float]:
    """
    One app's counters and ledger entries for one period, and its net
    ledger total over all periods, read in one transaction so that they
    agree even while a server flushes.
    """
    return (
        read_usage(cursor, app_id, period_start),
        read_ledger(cursor, app_id, period_start),
        read_balance_changes(cursor).get(app_id, 0.0),
    )


def _claim_sequence(cursor: DialectCursor, batch: FlushBatch) -> bool:
    """
    Record the batch's sequence number for its writer; ``False`` if a batch
    with this number or a later one was written already.
    """
    if batch.writer is None:
        return True
    cursor.execute("SELECT sequence FROM usage_writers WHERE writer = ?", (batch.writer,))
    row = cursor.fetchone()
    if row is not None and row[0] >= batch.sequence:
        return False
    cursor.execute(
        "INSERT INTO usage_writers (writer, sequence, at) VALUES (?, ?, ?) "
        "ON CONFLICT (writer) DO UPDATE SET sequence = excluded.sequence, at = excluded.at",
        (batch.writer, batch.sequence, batch.at),
    )
    # Every process start adds a writer; forget those long gone. A retry
    # comes within seconds of its first attempt, never weeks later.
    cursor.execute("DELETE FROM usage_writers WHERE at < ?", (batch.at - WRITER_RETENTION,))
    return True


def write_batch(cursor: DialectCursor, batch: FlushBatch) -> None:
    """
    Add the batch's usage increments, raise the peaks, append its ledger
    entries, unless its writer wrote it already.

    Run it inside one transaction; L{UsageStore.flush} does.
    """
    if not _claim_sequence(cursor, batch):
        return
    greatest = cursor.dialect.greatest
    cursor.executemany(
        f"INSERT INTO usage ({_USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (app_id, period_start) DO UPDATE SET "
        "period_end = excluded.period_end, "
        f"peak_concurrent = {greatest}(usage.peak_concurrent, excluded.peak_concurrent), "
        "messages_used = usage.messages_used + excluded.messages_used, "
        "overage_messages = usage.overage_messages + excluded.overage_messages, "
        "overage_connections = usage.overage_connections + excluded.overage_connections",
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


class UsageStore:
    """
    Asynchronous access to the usage tables, for the metering service.

    Every method runs one transaction on the pool's thread and returns a
    Deferred.
    """

    _pool: Pool
    _dialect: Dialect

    def __init__(self, path: str, reactor: IReactorCore) -> None:
        """
        A store over the SQLite file at ``path``, created on first use.

        :param reactor: whose thread pool runs the transactions.
        """
        self._pool = sqlite_pool(path, COMPONENT, MIGRATIONS, reactor)
        self._dialect = SQLITE

    @classmethod
    def with_pool(cls, pool: Pool, dialect: Dialect = SQLITE) -> Self:
        """
        A store running its transactions on ``pool`` (whose connections
        have the usage schema up to date), in ``dialect``: how the
        composition root opens PostgreSQL, and how tests run transactions
        synchronously.
        """
        store = cls.__new__(cls)
        store._pool = pool
        store._dialect = dialect
        return store

    def _run(self, interaction: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return self._pool.runInteraction(in_dialect(self._dialect, interaction), *args)

    def load(self, app_id: str, period_start: int) -> Deferred[UsageRow | None]:
        """
        Fires with one app's counters for one period (see L{read_usage}).
        """
        return self._run(read_usage, app_id, period_start)

    def load_period(self, period_start: int) -> Deferred[list[UsageRow]]:
        """
        Fires with every app's counters for one period (see L{read_period}).
        """
        return self._run(read_period, period_start)

    def balance_changes(self) -> Deferred[dict[str, float]]:
        """
        Fires with each app's net ledger total (see L{read_balance_changes}).
        """
        return self._run(read_balance_changes)

    def flush(self, batch: FlushBatch) -> Deferred[None]:
        """
        Write one batch in one transaction (see L{write_batch}).
        """
        return self._run(write_batch, batch)

    def ledger(self, app_id: str, period_start: int | None = None) -> Deferred[list[LedgerEntry]]:
        """
        Fires with an app's ledger entries (see L{read_ledger}).
        """
        return self._run(read_ledger, app_id, period_start)

    def periods(self, app_id: str) -> Deferred[list[UsageRow]]:
        """
        Fires with an app's counters for every period (see L{read_periods}).
        """
        return self._run(read_periods, app_id)

    def close(self) -> None:
        """
        Close the database. Call it after the meter's final flush.
        """
        self._pool.close()
