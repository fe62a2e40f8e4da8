"""
Tests for L{meteredrt.usagestore}, against real SQLite files.

L{SynchronousPool} is the in-thread stand-in for the adbapi pool that the
metering tests use to stay deterministic; the same store tests run against
it and against the real L{adbapi.ConnectionPool}, which is what makes it a
faithful fake.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.store.database import Database
from meteredrt.store.dialect import POSTGRESQL
from meteredrt.store.schema import SchemaTooNew
from meteredrt.store.usage import (
    CHARGE,
    COMPONENT,
    MIGRATIONS,
    RECHARGE,
    WRITER_RETENTION,
    FlushBatch,
    LedgerEntry,
    UsageRow,
    UsageStore,
    prepare_connection,
    read_ledger,
    read_usage,
)
from meteredrt.usagestore import usage_database_path
from tests.postgres_server import fresh_database

_T = TypeVar("_T")

if TYPE_CHECKING:
    _MixinBase = TestCase
else:
    _MixinBase = object

NOV = 1_793_491_200  # 2026-11-01T00:00:00Z
DEC = 1_796_083_200  # 2026-12-01T00:00:00Z
JAN = 1_798_761_600  # 2027-01-01T00:00:00Z


class SynchronousPool:
    """
    Runs each interaction at once, in the calling thread, in one
    transaction: the L{UsageStore} pool for tests that must not wait on
    threads. It blocks, so it has no place in a running server.
    """

    def __init__(self, path: str) -> None:
        self._connection = sqlite3.connect(path)
        prepare_connection(self._connection)

    def runInteraction(
        self, interaction: Callable[..., _T], *args: Any, **kw: Any
    ) -> Deferred[_T]:
        """
        Run ``interaction(cursor, ...)``; commit if it returns, roll back if
        it raises.
        """
        cursor = self._connection.cursor()
        try:
            result = interaction(cursor, *args, **kw)
        except BaseException:
            self._connection.rollback()
            return fail()
        self._connection.commit()
        return succeed(result)

    def close(self) -> None:
        """
        Close the connection.
        """
        self._connection.close()


def usage_row(app_id: str = "app_a", start: int = NOV, **counts: int) -> UsageRow:
    """
    A usage row of a November 2026 period unless told otherwise.
    """
    end = {NOV: DEC, DEC: JAN}[start]
    return UsageRow(app_id, start, end, **counts)


def charge(amount: float, units: int = 1, app_id: str = "app_a", start: int = NOV) -> LedgerEntry:
    """
    A charge ledger entry.
    """
    return LedgerEntry(app_id, float(start + 10), start, CHARGE, units, amount, "message overage")


def recharge(amount: float, app_id: str = "app_a", start: int = NOV) -> LedgerEntry:
    """
    A recharge ledger entry.
    """
    return LedgerEntry(app_id, float(start + 5), start, RECHARGE, 1, amount, "auto-recharge")


class UsageStoreTestsMixin(_MixinBase):
    """
    Behaviour every pool must give L{UsageStore}; mixed into a
    L{TestCase} that defines C{make_store}.
    """

    def make_store(self) -> UsageStore:
        """
        A store over an empty database.
        """
        raise NotImplementedError()

    async def test_load_unknown(self) -> None:
        """
        Loading a period nothing was counted in gives None.
        """
        store = self.make_store()
        self.assertIsNone(await store.load("app_a", NOV))

    async def test_flush_then_load(self) -> None:
        """
        A flushed row loads back as written.
        """
        store = self.make_store()
        row = usage_row(
            peak_concurrent=3, messages_used=10, overage_messages=2, overage_connections=1
        )
        await store.flush(FlushBatch(usage=(row,)))
        self.assertEqual(await store.load("app_a", NOV), row)

    async def test_flush_adds_increments(self) -> None:
        """
        A later flush adds its counts to the row (two writers add up instead
        of overwriting each other); the peak becomes the larger of the two,
        never their sum.
        """
        store = self.make_store()
        await store.flush(
            FlushBatch(usage=(usage_row(messages_used=10, peak_concurrent=4, overage_messages=1),))
        )
        await store.flush(
            FlushBatch(usage=(usage_row(messages_used=2, peak_concurrent=3, overage_connections=2),))
        )
        self.assertEqual(
            await store.load("app_a", NOV),
            usage_row(messages_used=12, peak_concurrent=4, overage_messages=1, overage_connections=2),
        )
        await store.flush(FlushBatch(usage=(usage_row(peak_concurrent=6),)))
        self.assertEqual((await store.load("app_a", NOV)).peak_concurrent, 6)  # type: ignore[union-attr]

    async def test_retried_batch_counts_once(self) -> None:
        """
        A batch written again by its writer with the same sequence number
        (a retry after a commit whose answer was lost) changes nothing;
        the writer's next batch and other writers' batches count.
        """
        store = self.make_store()
        batch = FlushBatch(usage=(usage_row(messages_used=10),), ledger=(charge(1.0),), writer="w1", sequence=1)
        await store.flush(batch)
        await store.flush(batch)
        self.assertEqual(await store.periods("app_a"), [usage_row(messages_used=10)])
        self.assertEqual(len(await store.ledger("app_a")), 1)
        await store.flush(FlushBatch(usage=(usage_row(messages_used=1),), writer="w1", sequence=2))
        await store.flush(FlushBatch(usage=(usage_row(messages_used=5),), writer="w2", sequence=1))
        self.assertEqual(await store.periods("app_a"), [usage_row(messages_used=16)])

    async def test_load_period(self) -> None:
        """
        Loading a period gives every app's row of that period only, by app id.
        """
        store = self.make_store()
        rows = (usage_row("app_b", messages_used=1), usage_row("app_a", messages_used=2))
        await store.flush(FlushBatch(usage=rows + (usage_row("app_a", DEC, messages_used=3),)))
        self.assertEqual(await store.load_period(NOV), [rows[1], rows[0]])

    async def test_periods(self) -> None:
        """
        An app's periods come oldest first.
        """
        store = self.make_store()
        dec, nov = usage_row(start=DEC, messages_used=1), usage_row(messages_used=2)
        await store.flush(FlushBatch(usage=(dec, nov, usage_row("app_b"))))
        self.assertEqual(await store.periods("app_a"), [nov, dec])

    async def test_ledger_appends(self) -> None:
        """
        Ledger entries accumulate across flushes in write order, with ids.
        """
        store = self.make_store()
        await store.flush(FlushBatch(ledger=(recharge(10.0), charge(1.5, units=3))))
        await store.flush(FlushBatch(ledger=(charge(0.5), charge(2.0, start=DEC))))
        entries = await store.ledger("app_a")
        self.assertEqual(
            [(e.kind, e.amount, e.units, e.period_start) for e in entries],
            [
                (RECHARGE, 10.0, 1, NOV),
                (CHARGE, 1.5, 3, NOV),
                (CHARGE, 0.5, 1, NOV),
                (CHARGE, 2.0, 1, DEC),
            ],
        )
        ids = [e.id for e in entries]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 4)

    async def test_ledger_of_period(self) -> None:
        """
        The ledger can be read for one period.
        """
        store = self.make_store()
        await store.flush(FlushBatch(ledger=(charge(1.0), charge(2.0, start=DEC))))
        entries = await store.ledger("app_a", DEC)
        self.assertEqual([e.amount for e in entries], [2.0])

    async def test_balance_changes(self) -> None:
        """
        Each app's ledger nets recharges against charges over all periods.
        """
        store = self.make_store()
        await store.flush(
            FlushBatch(
                ledger=(
                    recharge(10.0),
                    charge(1.5),
                    charge(2.0, start=DEC),
                    charge(4.0, app_id="app_b"),
                )
            )
        )
        self.assertEqual(await store.balance_changes(), {"app_a": 6.5, "app_b": -4.0})

    async def test_failed_batch_writes_nothing(self) -> None:
        """
        A batch that fails part-way leaves neither its rows nor its ledger.
        """
        store = self.make_store()
        bad = LedgerEntry("app_a", 1.0, NOV, "refund", 1, 1.0, "not a kind")
        batch = FlushBatch(usage=(usage_row(messages_used=5),), ledger=(charge(1.0), bad))
        with self.assertRaises(Exception) as raised:
            await store.flush(batch)
        # sqlite3.IntegrityError or psycopg2's CheckViolation.
        self.assertIn("IntegrityError", [kind.__name__ for kind in type(raised.exception).__mro__])
        self.assertIsNone(await store.load("app_a", NOV))
        self.assertEqual(await store.ledger("app_a"), [])


class AdbapiUsageStoreTests(UsageStoreTestsMixin, TestCase):
    """
    L{UsageStore} over the real one-thread adbapi pool.
    """

    def make_store(self) -> UsageStore:
        from twisted.internet import reactor

        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        path = usage_database_path(self.data_dir)
        store = UsageStore(path, reactor)  # type: ignore[arg-type]
        self.addCleanup(store.close)
        return store

    async def test_file_in_wal_mode(self) -> None:
        """
        The store keeps its data in C{<data_dir>/usage.sqlite3}, in WAL mode.
        """
        self.assertEqual(
            usage_database_path("/var/lib/meteredrt"), "/var/lib/meteredrt/usage.sqlite3"
        )
        store = self.make_store()
        await store.flush(FlushBatch(usage=(usage_row(messages_used=1),)))
        path = usage_database_path(self.data_dir)
        with sqlite3.connect(path) as connection:
            (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        connection.close()
        self.assertEqual(mode, "wal")

    async def test_readable_with_plain_sqlite3(self) -> None:
        """
        A separate sqlite3 connection (the CLI's) reads what the store wrote
        while the store is still open.
        """
        store = self.make_store()
        row = usage_row(messages_used=7)
        await store.flush(FlushBatch(usage=(row,), ledger=(charge(1.0),)))
        connection = sqlite3.connect(usage_database_path(self.data_dir))
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        self.assertEqual(read_usage(cursor, "app_a", NOV), row)
        self.assertIsNone(read_usage(cursor, "app_a", DEC))
        self.assertEqual([e.amount for e in read_ledger(cursor, "app_a", NOV)], [1.0])


class SynchronousPoolUsageStoreTests(UsageStoreTestsMixin, TestCase):
    """
    L{UsageStore} over L{SynchronousPool}, the fake the metering tests use.
    """

    def make_store(self) -> UsageStore:
        store = UsageStore.with_pool(SynchronousPool(self.mktemp()))
        self.addCleanup(store.close)
        return store


class WriterRetentionTests(TestCase):
    """
    The writers' sequence numbers do not pile up forever.
    """

    def test_old_writers_forgotten(self) -> None:
        """
        A batch removes the sequence numbers of writers silent for longer
        than L{WRITER_RETENTION}; recent ones stay.
        """
        pool = SynchronousPool(self.mktemp())
        self.addCleanup(pool.close)
        store = UsageStore.with_pool(pool)
        now = 1_800_000_000.0
        for writer, at in (("gone", now - WRITER_RETENTION - 1), ("recent", now - 60), ("me", now)):
            self.successResultOf(store.flush(FlushBatch(usage=(usage_row(messages_used=1),), writer=writer, sequence=1, at=at)))
        writers = self.successResultOf(
            pool.runInteraction(lambda cursor: cursor.execute("SELECT writer FROM usage_writers ORDER BY writer").fetchall())
        )
        self.assertEqual(writers, [("me",), ("recent",)])


class PostgreSQLUsageStoreTests(UsageStoreTestsMixin, TestCase):
    """
    L{UsageStore} over an C{adbapi} pool on a PostgreSQL database of its
    own.
    """

    def make_store(self) -> UsageStore:
        from twisted.internet import reactor

        database = Database(self.mktemp(), fresh_database())
        store = UsageStore.with_pool(database.open_pool(COMPONENT, MIGRATIONS, reactor), POSTGRESQL)
        self.addCleanup(store.close)
        return store


class UsageSchemaTests(TestCase):
    """
    Versioning of the usage tables.
    """

    def test_upgrade_previous_release(self) -> None:
        """
        A usage file written by the release before versioning (absolute
        rows, no C{schema_versions}) is upgraded in place: its counts stay
        and later flushes add to them.
        """
        path = os.path.join(self.mktemp())
        connection = sqlite3.connect(path)
        with connection:
            for statement in PREVIOUS_RELEASE_USAGE_SCHEMA:
                connection.execute(statement)
            connection.execute(f"INSERT INTO usage VALUES ('app_a', {NOV}, {DEC}, 3, 40, 0, 0)")
        connection.close()
        store = UsageStore.with_pool(SynchronousPool(path))
        self.addCleanup(store.close)
        self.successResultOf(store.flush(FlushBatch(usage=(usage_row(messages_used=2, peak_concurrent=1),))))
        self.assertEqual(
            self.successResultOf(store.load("app_a", NOV)), usage_row(messages_used=42, peak_concurrent=3)
        )
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        self.assertEqual(
            connection.execute("SELECT component, version FROM schema_versions").fetchall(),
            [("usage", MIGRATIONS[-1].version)],
        )

    def test_too_new_refused(self) -> None:
        """
        A usage file upgraded by a newer release cannot be opened.
        """
        path = self.mktemp()
        SynchronousPool(path).close()
        connection = sqlite3.connect(path)
        with connection:
            connection.execute("UPDATE schema_versions SET version = 7 WHERE component = 'usage'")
        connection.close()
        with self.assertRaises(SchemaTooNew) as raised:
            SynchronousPool(path)
        self.assertIn("usage schema version 7", str(raised.exception))

    def test_too_new_refused_postgresql(self) -> None:
        """
        The same on PostgreSQL.
        """
        database = Database(self.mktemp(), fresh_database())
        database.connect(COMPONENT, MIGRATIONS).close()
        connection = database.connect(COMPONENT, MIGRATIONS)
        with connection, connection.cursor() as cursor:
            cursor.execute("UPDATE schema_versions SET version = 7 WHERE component = 'usage'")
        connection.close()
        with self.assertRaises(SchemaTooNew):
            database.connect(COMPONENT, MIGRATIONS)


#: The usage tables exactly as the release before schema versioning
#: created them.
PREVIOUS_RELEASE_USAGE_SCHEMA = (
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


class SynchronousPoolTests(SynchronousTestCase):
    """
    Tests for L{SynchronousPool} itself.
    """

    def test_fires_at_once(self) -> None:
        """
        Interactions have run by the time the Deferred is returned.
        """
        store = UsageStore.with_pool(SynchronousPool(self.mktemp()))
        self.addCleanup(store.close)
        self.successResultOf(store.flush(FlushBatch(usage=(usage_row(messages_used=2),))))
        self.assertEqual(self.successResultOf(store.load("app_a", NOV)), usage_row(messages_used=2))
