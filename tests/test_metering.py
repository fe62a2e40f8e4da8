"""
Tests for L{meteredrt.metering}: the pure quota rules and the L{Meter}
service, on an injected L{Clock} and a real SQLite file.
"""

from __future__ import annotations

import calendar
import sqlite3
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from meteredrt.apps import App, Plan
from meteredrt.interfaces import IMeter
from meteredrt.metering import (
    ACCEPT,
    AUTO_RECHARGE,
    CONNECTION_OVERAGE,
    FINAL_FLUSH_ATTEMPTS,
    MESSAGE_OVERAGE,
    REFUSE,
    Counters,
    Decision,
    Meter,
    decide_connection,
    decide_message,
    period_bounds,
)
from meteredrt.usagestore import (
    CHARGE,
    RECHARGE,
    FlushBatch,
    LedgerEntry,
    UsageRow,
    UsageStore,
    read_ledger,
    read_usage,
)
from tests.test_usagestore import SynchronousPool


def utc(*fields: int) -> int:
    """
    Unix seconds of a UTC date and time.
    """
    return calendar.timegm(fields + (0,) * (6 - len(fields)))


NOV = utc(2026, 11, 1)
DEC = utc(2026, 12, 1)
JAN = utc(2027, 1, 1)
#: The last second of November 2026.
LAST_SECOND = utc(2026, 11, 30, 23, 59, 59)
MID_NOVEMBER = utc(2026, 11, 15, 12)

#: Over-plan traffic refused outright.
HARD = Plan(name="SIGNALLING_FREE", max_concurrent_connections=2, max_messages_per_period=2)
#: Overage on: one message or connection over the caps costs 1.0.
OVERAGE = Plan(
    name="SIGNALLING_BASIC",
    max_concurrent_connections=1,
    max_messages_per_period=2,
    overages_allowed=True,
    overages_enabled=True,
    overage_rate_per_1000_messages=1000.0,
    overage_rate_per_connection=1.0,
)


def overage(**changes: Any) -> Plan:
    """
    L{OVERAGE} with some fields changed.
    """
    return evolve(OVERAGE, **changes)


class PeriodBoundsTests(SynchronousTestCase):
    """
    Tests for L{period_bounds}.
    """

    def test_calendar_month(self) -> None:
        """
        A period is the calendar month, UTC, start inclusive, end exclusive.
        """
        self.assertEqual(period_bounds(MID_NOVEMBER), (NOV, DEC))
        self.assertEqual(period_bounds(NOV), (NOV, DEC))

    def test_last_second(self) -> None:
        """
        Any instant of the last second belongs to the month it ends.
        """
        self.assertEqual(period_bounds(LAST_SECOND + 0.999), (NOV, DEC))
        self.assertEqual(period_bounds(DEC), (DEC, JAN))

    def test_december(self) -> None:
        """
        December's period ends on the first of January of the next year.
        """
        self.assertEqual(period_bounds(utc(2026, 12, 31, 23)), (DEC, JAN))

    def test_unknown_period(self) -> None:
        """
        A period kind other than a month is refused.
        """
        self.assertRaises(ValueError, period_bounds, MID_NOVEMBER, "week")


class DecisionTests(SynchronousTestCase):
    """
    Tests for L{decide_connection} and L{decide_message}: §15.3.
    """

    def test_unmetered(self) -> None:
        """
        An app without a plan is always within plan.
        """
        counters = Counters(concurrent_now=10**9, messages_used=10**9)
        self.assertEqual(decide_connection(None, counters), ACCEPT)
        self.assertEqual(decide_message(None, counters), ACCEPT)

    def test_no_cap(self) -> None:
        """
        A cap of None never runs out.
        """
        plan = Plan(max_concurrent_connections=None, max_messages_per_period=None)
        counters = Counters(concurrent_now=10**9, messages_used=10**9)
        self.assertEqual(decide_connection(plan, counters), ACCEPT)
        self.assertEqual(decide_message(plan, counters), ACCEPT)

    def test_connection_cap(self) -> None:
        """
        A connection is within plan while fewer than the cap are live.
        """
        self.assertEqual(decide_connection(HARD, Counters(concurrent_now=1)), ACCEPT)
        self.assertEqual(decide_connection(HARD, Counters(concurrent_now=2)), REFUSE)

    def test_message_cap(self) -> None:
        """
        The cap-th message is within plan, the next is not.
        """
        self.assertEqual(decide_message(HARD, Counters(messages_used=1)), ACCEPT)
        self.assertEqual(decide_message(HARD, Counters(messages_used=2)), REFUSE)

    def test_decision_table(self) -> None:
        """
        Over plan, each row of the §15.3 table gives its verdict, for
        connections and messages alike.
        """
        over = Counters(concurrent_now=1, messages_used=2, balance=5.0)
        empty = Counters(concurrent_now=1, messages_used=2, balance=0.0)
        rows = [
            ("not allowed", overage(overages_allowed=False), over, REFUSE),
            ("not enabled", overage(overages_enabled=False), over, REFUSE),
            ("balance sufficient", OVERAGE, over, Decision(True, overage=True, charge=1.0)),
            ("balance empty, no recharge", OVERAGE, empty, REFUSE),
            (
                "balance empty, recharge",
                overage(auto_recharge_amount=10.0),
                empty,
                Decision(True, overage=True, charge=1.0, recharge=10.0),
            ),
        ]
        for situation, plan, counters, expected in rows:
            self.assertEqual(decide_connection(plan, counters), expected, situation)
            self.assertEqual(decide_message(plan, counters), expected, situation)

    def test_message_rate(self) -> None:
        """
        A message over plan costs a thousandth of the per-1000 rate.
        """
        plan = overage(overage_rate_per_1000_messages=2.5)
        decision = decide_message(plan, Counters(messages_used=2, balance=1.0))
        self.assertEqual(decision, Decision(True, overage=True, charge=0.0025))

    def test_exact_balance(self) -> None:
        """
        A balance that is exactly one unit pays for it, despite rounding.
        """
        plan = overage(overage_rate_per_1000_messages=100.0)
        balance = 0.3 - 0.1 - 0.1  # 0.09999999999999998
        decision = decide_message(plan, Counters(messages_used=2, balance=balance))
        self.assertTrue(decision.accepted)

    def test_recharge_too_small(self) -> None:
        """
        A recharge that would not cover the unit is not made; the unit is
        refused.
        """
        plan = overage(overage_rate_per_connection=5.0, auto_recharge_amount=2.0)
        self.assertEqual(decide_connection(plan, Counters(concurrent_now=1, balance=1.0)), REFUSE)

    def test_recharge_below_threshold(self) -> None:
        """
        With enough balance, a recharge is still made when paying would
        leave the balance below the threshold.
        """
        plan = overage(auto_recharge_amount=10.0, auto_recharge_threshold=3.0)
        decision = decide_message(plan, Counters(messages_used=2, balance=3.5))
        self.assertEqual(decision, Decision(True, overage=True, charge=1.0, recharge=10.0))

    def test_no_recharge_above_threshold(self) -> None:
        """
        No recharge is made while the balance stays at or above the
        threshold after paying.
        """
        plan = overage(auto_recharge_amount=10.0, auto_recharge_threshold=3.0)
        decision = decide_message(plan, Counters(messages_used=2, balance=4.0))
        self.assertEqual(decision, Decision(True, overage=True, charge=1.0))

    def test_free_overage(self) -> None:
        """
        At a rate of zero, overage is accepted on an empty balance and
        triggers no recharge.
        """
        plan = overage(
            overage_rate_per_connection=0.0,
            auto_recharge_amount=10.0,
            auto_recharge_threshold=3.0,
        )
        decision = decide_connection(plan, Counters(concurrent_now=1))
        self.assertEqual(decision, Decision(True, overage=True, charge=0.0))


class FlakyStore(UsageStore):
    """
    A store whose next flushes or loads fail on demand, and whose loads can
    be held back.
    """

    #: How many of the next flushes fail.
    failures = 0
    #: How many of the next loads fail.
    load_failures = 0
    #: How many of the next flushes are written but report a failure (the
    #: connection dropped after the commit, before its answer).
    lost_answers = 0
    #: When set, loads wait for it to fire.
    held_load: Deferred[None] | None = None

    def flush(self, batch: FlushBatch) -> Deferred[None]:
        """
        Fail while C{failures} says so, else write the batch (and perhaps
        report a failure anyway).
        """
        if self.failures:
            self.failures -= 1
            return fail(sqlite3.OperationalError("disk I/O error"))
        written = super().flush(batch)
        if self.lost_answers:
            self.lost_answers -= 1
            return written.addCallback(lambda _: fail(sqlite3.OperationalError("connection lost")))
        return written

    def load_period(self, period_start: int) -> Deferred[list[UsageRow]]:
        """
        Load once C{held_load} fires, if it is set.
        """
        if self.load_failures:
            self.load_failures -= 1
            return fail(sqlite3.OperationalError("database is locked"))
        if self.held_load is None:
            return super().load_period(period_start)
        return self.held_load.addCallback(
            lambda _: UsageStore.load_period(self, period_start)
        )


class MeterTestCase(SynchronousTestCase):
    """
    Helpers for running L{Meter}s over one SQLite file.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()

    def start_meter(self, now: float = MID_NOVEMBER) -> tuple[Meter, Clock, FlakyStore]:
        """
        A started meter at ``now`` over this test's file; it is stopped at
        cleanup, which must leave no timer behind.
        """
        clock = Clock()
        clock.advance(now)
        store = FlakyStore.with_pool(SynchronousPool(self.path))
        self.addCleanup(store.close)
        meter = Meter(clock, store)
        meter.startService()

        def stop() -> None:
            if meter.running:
                self.successResultOf(meter.stopService())
            self.assertEqual(clock.getDelayedCalls(), [])

        self.addCleanup(stop)
        return meter, clock, store

    def persisted(self, app_id: str = "app_a", start: int = NOV) -> UsageRow | None:
        """
        What the file holds for an app and period, read as the CLI would.
        """
        connection = sqlite3.connect(self.path)
        try:
            return read_usage(connection.cursor(), app_id, start)
        finally:
            connection.close()

    def persisted_ledger(self, app_id: str = "app_a") -> list[LedgerEntry]:
        """
        The app's ledger as the file holds it.
        """
        connection = sqlite3.connect(self.path)
        try:
            return read_ledger(connection.cursor(), app_id)
        finally:
            connection.close()

    def admit(self, meter: Meter, app: App, count: int = 1) -> list[bool]:
        """
        The verdicts on ``count`` connections.
        """
        return [self.successResultOf(meter.admit_connection(app)) for _ in range(count)]

    def send(self, meter: Meter, app: App, count: int = 1) -> list[bool]:
        """
        The verdicts on ``count`` messages.
        """
        return [self.successResultOf(meter.count_message(app)) for _ in range(count)]

    def report(self, meter: Meter, app: App) -> dict[str, object]:
        """
        The app's usage report.
        """
        return self.successResultOf(meter.usage(app))


class MeterAdmissionTests(MeterTestCase):
    """
    Tests for L{Meter.admit_connection} and L{Meter.release_connection}.
    """

    def test_provides_imeter(self) -> None:
        """
        L{Meter} implements L{IMeter}.
        """
        meter, _, _ = self.start_meter()
        self.assertTrue(verifyObject(IMeter, meter))

    def test_cap(self) -> None:
        """
        Connections below and at the cap are admitted, the one above it is
        refused and not counted.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", HARD)
        self.assertEqual(self.admit(meter, app, 3), [True, True, False])
        report = self.report(meter, app)
        self.assertEqual((report["concurrentNow"], report["peakConcurrent"]), (2, 2))

    def test_release_frees_a_place(self) -> None:
        """
        After a connection closes, another is admitted; the peak stays.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", HARD)
        self.admit(meter, app, 2)
        meter.release_connection("app_a")
        meter.release_connection("app_a")
        self.assertEqual(self.admit(meter, app), [True])
        report = self.report(meter, app)
        self.assertEqual((report["concurrentNow"], report["peakConcurrent"]), (1, 2))

    def test_unbalanced_release(self) -> None:
        """
        Releasing a connection that was never admitted changes nothing.
        """
        meter, _, _ = self.start_meter()
        meter.release_connection("app_a")
        self.assertEqual(self.report(meter, App("app_a"))["concurrentNow"], 0)

    def test_overage_connection(self) -> None:
        """
        With overages on, a connection over the cap is admitted and each one
        charged once.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", overage(balance=5.0))
        self.assertEqual(self.admit(meter, app, 3), [True, True, True])
        self.assertEqual(self.report(meter, app)["overageConnections"], 2)
        self.assertEqual(meter.balance(app), 3.0)

    def test_overage_connection_balance_empty(self) -> None:
        """
        Without balance or recharge, a connection over the cap is refused.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", overage(balance=1.0))
        self.assertEqual(self.admit(meter, app, 3), [True, True, False])
        self.assertEqual(self.report(meter, app)["overageConnections"], 1)

    def test_plan_change(self) -> None:
        """
        A changed plan applies to the next connection.
        """
        meter, _, _ = self.start_meter()
        self.assertEqual(self.admit(meter, App("app_a", HARD), 3), [True, True, False])
        bigger = Plan(max_concurrent_connections=3)
        self.assertEqual(self.admit(meter, App("app_a", bigger)), [True])

    def test_unmetered_counted(self) -> None:
        """
        An unmetered app is never refused but still counted.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a")
        self.assertEqual(self.admit(meter, app, 5), [True] * 5)
        self.assertEqual(self.send(meter, app, 5), [True] * 5)
        report = self.report(meter, app)
        self.assertEqual((report["peakConcurrent"], report["messagesUsed"]), (5, 5))


class MeterMessageTests(MeterTestCase):
    """
    Tests for L{Meter.count_message}.
    """

    def test_soft_drop_counted(self) -> None:
        """
        Over quota without overage, messages are soft-dropped but counted.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", HARD)
        self.assertEqual(self.send(meter, app, 4), [True, True, False, False])
        report = self.report(meter, app)
        self.assertEqual((report["messagesUsed"], report["overageMessages"]), (4, 0))

    def test_overage_until_balance_empty(self) -> None:
        """
        Overage messages are accepted while the balance pays for them, then
        soft-dropped.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", overage(balance=2.0))
        self.assertEqual(self.send(meter, app, 5), [True, True, True, True, False])
        report = self.report(meter, app)
        self.assertEqual((report["messagesUsed"], report["overageMessages"]), (5, 2))
        self.assertEqual(meter.balance(app), 0.0)

    def test_balance_spent_exactly(self) -> None:
        """
        A balance of N units pays for exactly N overage messages.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", overage(balance=0.3, overage_rate_per_1000_messages=100.0))
        self.assertEqual(self.send(meter, app, 6), [True] * 5 + [False])

    def test_recharge(self) -> None:
        """
        An empty balance with auto-recharge on is recharged and the message
        accepted.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", overage(auto_recharge_amount=10.0))
        self.assertEqual(self.send(meter, app, 3), [True, True, True])
        self.assertEqual(meter.balance(app), 9.0)

    def test_ledger(self) -> None:
        """
        Charges and recharges become ledger rows at the next flush: charges
        summed per kind, each recharge its own row.
        """
        meter, clock, _ = self.start_meter()
        app = App("app_a", overage(auto_recharge_amount=2.0))
        self.send(meter, app, 2)
        self.send(meter, app, 3)  # recharge 2, charge 1, charge 1, recharge 2, charge 1
        self.admit(meter, app, 2)  # the second: charge 1
        clock.advance(1)
        rows = [(e.kind, e.units, e.amount, e.reason) for e in self.persisted_ledger()]
        self.assertEqual(
            sorted(rows),
            [
                (CHARGE, 1, 1.0, CONNECTION_OVERAGE),
                (CHARGE, 3, 3.0, MESSAGE_OVERAGE),
                (RECHARGE, 1, 2.0, AUTO_RECHARGE),
                (RECHARGE, 1, 2.0, AUTO_RECHARGE),
            ],
        )

    def test_ledger_sums_to_balance_change(self) -> None:
        """
        Over several flushes, the ledger rows add up to the balance change,
        and a restarted meter starts from that balance.
        """
        meter, clock, _ = self.start_meter()
        app = App(
            "app_a",
            overage(
                balance=1.25,
                overage_rate_per_1000_messages=300.0,
                auto_recharge_amount=0.5,
                auto_recharge_threshold=0.2,
            ),
        )
        for _ in range(5):
            self.send(meter, app, 7)
            self.admit(meter, app, 1)
            clock.advance(1)
        change = sum(entry.balance_change for entry in self.persisted_ledger())
        self.assertAlmostEqual(meter.balance(app), 1.25 + change)
        self.assertNotEqual(change, 0)
        self.successResultOf(meter.stopService())
        restarted, _, _ = self.start_meter(clock.seconds())
        self.assertAlmostEqual(restarted.balance(app), meter.balance(app))


class MeterPeriodTests(MeterTestCase):
    """
    Tests for billing period roll-over.
    """

    def test_roll_over(self) -> None:
        """
        Counts up to the last instant of a month go to that month; from the
        boundary on they go to the next one, without a restart.
        """
        meter, clock, _ = self.start_meter(LAST_SECOND)
        app = App("app_a", HARD)
        self.admit(meter, app)
        self.send(meter, app)
        clock.advance(0.999)
        self.send(meter, app)
        clock.advance(0.001)
        self.send(meter, app)
        report = self.report(meter, app)
        self.assertEqual(
            (report["periodStartUnix"], report["periodEndUnix"], report["messagesUsed"]),
            (DEC, JAN, 1),
        )
        clock.advance(1)
        persisted_nov = self.persisted(start=NOV)
        persisted_dec = self.persisted(start=DEC)
        assert persisted_nov is not None and persisted_dec is not None
        self.assertEqual(persisted_nov.messages_used, 2)
        self.assertEqual(persisted_dec.messages_used, 1)

    def test_quota_resets(self) -> None:
        """
        A message quota used up in one month is available again in the next.
        """
        meter, clock, _ = self.start_meter(LAST_SECOND)
        app = App("app_a", HARD)
        self.assertEqual(self.send(meter, app, 3), [True, True, False])
        clock.advance(1)
        self.assertEqual(self.send(meter, app, 3), [True, True, False])

    def test_open_connections_carry_over(self) -> None:
        """
        Connections open across the boundary stay live and are the new
        period's first peak, even when the first event after it is a close.
        """
        meter, clock, _ = self.start_meter(LAST_SECOND)
        app = App("app_a", HARD)
        self.admit(meter, app, 2)
        clock.advance(1)
        meter.release_connection("app_a")
        report = self.report(meter, app)
        self.assertEqual(
            (report["periodStartUnix"], report["concurrentNow"], report["peakConcurrent"]),
            (DEC, 1, 2),
        )


class MeterDurabilityTests(MeterTestCase):
    """
    Tests for flushing, stopping and restarting L{Meter}.
    """

    def test_flush_cadence(self) -> None:
        """
        Counts reach the file at the next whole flush interval, not before.
        """
        meter, clock, _ = self.start_meter()
        app = App("app_a", HARD)
        self.send(meter, app)
        self.assertIsNone(self.persisted())
        clock.advance(0.999)
        self.assertIsNone(self.persisted())
        clock.advance(0.001)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 1)
        self.send(meter, app)
        clock.advance(1)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 2)

    def test_graceful_stop_flushes(self) -> None:
        """
        Stopping the service writes every count and leaves no timer.
        """
        meter, clock, _ = self.start_meter()
        app = App("app_a", HARD)
        self.admit(meter, app)
        self.send(meter, app, 3)
        self.successResultOf(meter.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(
            self.persisted(), UsageRow("app_a", NOV, DEC, peak_concurrent=1, messages_used=3)
        )

    def test_restart_keeps_counting(self) -> None:
        """
        A meter started on the same file continues the period's counts and
        quota; live connections start again from zero.
        """
        first, clock, _ = self.start_meter()
        app = App("app_a", Plan(max_concurrent_connections=5, max_messages_per_period=4))
        self.admit(first, app, 2)
        self.send(first, app, 3)
        self.successResultOf(first.stopService())
        second, _, _ = self.start_meter(clock.seconds() + 60)
        report = self.report(second, app)
        self.assertEqual(
            (report["concurrentNow"], report["peakConcurrent"], report["messagesUsed"]),
            (0, 2, 3),
        )
        self.assertEqual(self.send(second, app, 2), [True, False])

    def test_kill_loses_at_most_one_interval(self) -> None:
        """
        A meter that dies without stopping loses only what it counted since
        its last flush.
        """
        clock = Clock()
        clock.advance(MID_NOVEMBER)
        store = UsageStore.with_pool(SynchronousPool(self.path))
        self.addCleanup(store.close)
        # Never stopped: when this test ends, the meter is simply gone.
        first = Meter(clock, store)
        first.startService()
        app = App("app_a", HARD)
        self.send(first, app, 5)
        clock.advance(1)
        self.send(first, app, 3)
        clock.advance(0.5)
        second, _, _ = self.start_meter(clock.seconds())
        self.assertEqual(self.report(second, app)["messagesUsed"], 5)

    def test_failed_flush_retried(self) -> None:
        """
        A failed flush is logged and its counts and ledger rows are written,
        once, by the next one.
        """
        meter, clock, store = self.start_meter()
        app = App("app_a", overage(balance=10.0))
        self.send(meter, app, 3)
        store.failures = 1
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertIsNone(self.persisted())
        self.send(meter, app)
        clock.advance(1)
        row = self.persisted()
        assert row is not None
        self.assertEqual((row.messages_used, row.overage_messages), (4, 2))
        ledger = [(e.units, e.amount) for e in self.persisted_ledger()]
        self.assertEqual(ledger, [(1, 1.0), (1, 1.0)])

    def test_outage_logged_once(self) -> None:
        """
        A run of failed flushes (a database outage) logs one traceback, not
        one a second; the counts are written once the store is back.
        """
        meter, clock, store = self.start_meter()
        app = App("app_a")
        self.send(meter, app, 2)
        store.failures = 3
        for _ in range(3):
            self.send(meter, app)
            clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        clock.advance(1)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 5)
        # A new outage logs again.
        self.send(meter, app)
        store.failures = 1
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)

    def test_final_flush_retried(self) -> None:
        """
        A graceful stop during a short outage retries the final flush every
        flush interval and loses nothing.
        """
        meter, clock, store = self.start_meter()
        app = App("app_a")
        self.send(meter, app, 4)
        store.failures = 2
        stopped = meter.stopService()
        self.assertNoResult(stopped)
        clock.advance(1)
        self.assertNoResult(stopped)
        clock.advance(1)
        self.successResultOf(stopped)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 4)
        self.assertEqual(self.flushLoggedErrors(sqlite3.OperationalError), [])

    def test_final_flush_gives_up(self) -> None:
        """
        When the store stays down, the stop ends after
        L{FINAL_FLUSH_ATTEMPTS} attempts and says what was lost.
        """
        meter, clock, store = self.start_meter()
        self.send(meter, App("app_a"), 4)
        store.failures = FINAL_FLUSH_ATTEMPTS
        stopped = meter.stopService()
        clock.pump([1.0] * (FINAL_FLUSH_ATTEMPTS - 2))
        self.assertNoResult(stopped)
        clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertIsNone(self.persisted())

    def test_final_flush_with_nothing_to_write(self) -> None:
        """
        A stop with nothing counted since the last flush ends at once, even
        with the store down (a start that never reached its database);
        with a batch whose write failed, it still retries.
        """
        meter, clock, store = self.start_meter()
        store.failures = FINAL_FLUSH_ATTEMPTS
        self.successResultOf(meter.stopService())
        self.assertEqual(self.flushLoggedErrors(sqlite3.OperationalError), [])
        meter, clock, store = self.start_meter()
        self.send(meter, App("app_a"), 2)
        store.failures = 1
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        store.failures = 1
        stopped = meter.stopService()
        self.assertNoResult(stopped)
        clock.advance(1)
        self.successResultOf(stopped)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 2)

    def test_lost_commit_counted_once(self) -> None:
        """
        A flush that was written but whose answer was lost is retried
        unchanged and counts once; what was counted meanwhile goes in the
        next batch.
        """
        meter, clock, store = self.start_meter()
        app = App("app_a", overage(balance=10.0))
        self.send(meter, app, 3)
        store.lost_answers = 1
        clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.send(meter, app)
        clock.advance(1)
        row = self.persisted()
        assert row is not None
        self.assertEqual((row.messages_used, row.overage_messages), (4, 2))
        self.assertEqual([(e.units, e.amount) for e in self.persisted_ledger()], [(1, 1.0), (1, 1.0)])

    def test_two_writers_add_up(self) -> None:
        """
        Two meters counting into one database at the same time add up, and
        the stored peak is the larger of their own peaks.
        """
        first, clock, _ = self.start_meter()
        second, other_clock, _ = self.start_meter()
        app = App("app_a")
        self.send(first, app, 3)
        self.send(second, app, 4)
        self.admit(first, app, 2)
        self.admit(second, app, 1)
        clock.advance(1)
        other_clock.advance(1)
        self.send(first, app, 1)
        clock.advance(1)
        row = self.persisted()
        assert row is not None
        self.assertEqual((row.messages_used, row.peak_concurrent), (8, 2))
    def test_flush_lag(self) -> None:
        """
        L{Meter.last_flush} is when the meter last wrote everything (its
        creation before that): a failed flush leaves it behind and counts
        in L{Meter.flush_failures}; the next good one catches up.
        """
        meter, clock, store = self.start_meter()
        self.assertEqual((meter.last_flush, meter.flush_failures), (MID_NOVEMBER, 0))
        self.send(meter, App("app_a", HARD))
        clock.advance(1)
        self.assertEqual((meter.last_flush, meter.flush_failures), (MID_NOVEMBER + 1, 0))
        self.send(meter, App("app_a", HARD))
        store.failures = 1
        clock.advance(1)
        self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertEqual((meter.last_flush, meter.flush_failures), (MID_NOVEMBER + 1, 1))
        clock.advance(1)
        self.assertEqual((meter.last_flush, meter.flush_failures), (MID_NOVEMBER + 3, 1))
        clock.advance(1)
        # Nothing new to write is still a flush that is up to date.
        self.assertEqual(meter.last_flush, MID_NOVEMBER + 4)

    def test_failed_load_retried(self) -> None:
        """
        When loading the stored counts fails, nothing is written until a
        later flush has loaded them, so they are added to, not overwritten.
        """
        first, clock, _ = self.start_meter()
        app = App("app_a")
        self.send(first, app, 3)
        self.successResultOf(first.stopService())

        later = Clock()
        later.advance(clock.seconds())
        store = FlakyStore.with_pool(SynchronousPool(self.path))
        self.addCleanup(store.close)
        store.load_failures = 2
        second = Meter(later, store)
        second.startService()
        loaded = second.loaded
        self.send(second, app, 2)
        later.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 2)
        self.assertNoResult(loaded)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 3)
        later.advance(1)
        self.successResultOf(loaded)
        self.successResultOf(second.loaded)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 5)
        self.successResultOf(second.stopService())
        self.assertEqual(later.getDelayedCalls(), [])

    def test_counts_before_load(self) -> None:
        """
        Counts made while the stored ones are still loading are added to
        them, and nothing is written before the load is done.
        """
        first, clock, _ = self.start_meter()
        app = App("app_a")
        self.send(first, app, 3)
        self.successResultOf(first.stopService())

        later = Clock()
        later.advance(clock.seconds())
        store = FlakyStore.with_pool(SynchronousPool(self.path))
        self.addCleanup(store.close)
        store.held_load = Deferred()
        second = Meter(later, store)
        second.startService()
        self.send(second, app, 2)
        later.advance(1)
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 3)
        store.held_load.callback(None)
        self.assertEqual(self.report(second, app)["messagesUsed"], 5)
        self.successResultOf(second.stopService())
        self.assertEqual(later.getDelayedCalls(), [])
        row = self.persisted()
        assert row is not None
        self.assertEqual(row.messages_used, 5)


class MeterUsageReportTests(MeterTestCase):
    """
    Tests for L{Meter.usage}.
    """

    def test_metered(self) -> None:
        """
        The report of a metered app is the §19.6 object with its plan.
        """
        meter, _, _ = self.start_meter()
        app = App("app_a", overage(balance=10.0))
        self.admit(meter, app, 2)
        meter.release_connection("app_a")
        self.send(meter, app, 3)
        self.assertEqual(
            self.report(meter, app),
            {
                "appId": "app_a",
                "periodStartUnix": NOV,
                "periodEndUnix": DEC,
                "concurrentNow": 1,
                "peakConcurrent": 2,
                "messagesUsed": 3,
                "overageMessages": 1,
                "overageConnections": 1,
                "plan": {
                    "name": "SIGNALLING_BASIC",
                    "maxConcurrentConnections": 1,
                    "maxMessagesPerPeriod": 2,
                    "overagesAllowed": True,
                    "overagesEnabled": True,
                },
            },
        )

    def test_unmetered(self) -> None:
        """
        The report of an unmetered app has null plan fields.
        """
        meter, _, _ = self.start_meter()
        self.assertEqual(
            self.report(meter, App("app_z")),
            {
                "appId": "app_z",
                "periodStartUnix": NOV,
                "periodEndUnix": DEC,
                "concurrentNow": 0,
                "peakConcurrent": 0,
                "messagesUsed": 0,
                "overageMessages": 0,
                "overageConnections": 0,
                "plan": {
                    "name": None,
                    "maxConcurrentConnections": None,
                    "maxMessagesPerPeriod": None,
                    "overagesAllowed": None,
                    "overagesEnabled": None,
                },
            },
        )
