"""
Dual-axis metering: quota decisions and the service that counts.

The top half is pure core (it calls nothing from Twisted and reads no
clock): L{period_bounds} cuts time into billing
periods, and L{decide_connection} / L{decide_message} turn a L{Plan} and the
current L{Counters} into a L{Decision}, following the table of protocol
§15.3. The bottom half is L{Meter}, the L{IMeter} service: it keeps the
counters of every app in memory, answers the hub from them in O(1), and
flushes them to a L{meteredrt.store.usage.UsageStore} once a second.

Decision rules (one new connection or one message at a time):

  1. An app without a plan is unmetered: always accepted, still counted.
  2. Within plan: a connection is within plan while fewer than
     C{max_concurrent_connections} are live; a message while fewer than
     C{max_messages_per_period} were counted this period (so the cap-th
     one is still within plan). A cap of C{None} never runs out.
  3. Over plan with overages not allowed, or not enabled: refused (close
     4010 for a connection, a soft drop for a message).
  4. Over plan with overages on, one unit costs: a message
     C{overage_rate_per_1000_messages / 1000}; a connection
     C{overage_rate_per_connection}, charged once for each connection
     admitted while the app is at or above its cap (not for the peak, and
     not again while it stays open).
  5. Auto-recharge is on when C{auto_recharge_amount > 0}. A recharge of
     exactly that amount is due when the unit costs something and paying
     for it would leave the balance below C{auto_recharge_threshold} (a
     threshold below zero counts as zero, so an insufficient balance always
     qualifies). One decision makes at most one recharge.
  6. The unit is accepted as overage if the balance, plus the recharge when
     one is due, covers its cost; the decision then carries the charge and
     the recharge. Otherwise it is refused and no money moves: a recharge
     that would not pay for the unit is not made.

Money: C{Plan.balance} is the app's opening balance; the running balance
is that plus the recharges minus the charges of the app's whole ledger (all
periods; prepaid money does not expire at a period's end). Each recharge is
one ledger row; charges are summed into one row per app, period and kind
(message or connection overage) per flush, with ``units`` saying how many
units it bills. Money is kept in floats, as the plan holds it; comparisons allow
L{MONEY_EPSILON} of rounding error so that a balance of exactly N units pays
for N units.

In a cluster the same rules hold cluster-wide: connection caps against a
count in Redis (L{meteredrt.clustercount}), message caps from slices of
the period's quota and overage from one balance in Redis
(L{meteredrt.clusterquota}, where the bounds are stated).
"""

from __future__ import annotations

import calendar
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from attrs import define, frozen
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meteredrt.apps import App, Plan
from meteredrt.clustercount import ClusterConnectionCount, ConnectionCountUnavailable
from meteredrt.clusterquota import UNKNOWN, WITHIN, ClusterQuota, QuotaUnavailable, slice_size
from meteredrt.interfaces import IMeter
from meteredrt.store.usage import (
    CHARGE,
    RECHARGE,
    FlushBatch,
    LedgerEntry,
    UsageRow,
    UsageStore,
)

#: Rounding tolerance for money comparisons, in billing units.
MONEY_EPSILON = 1e-9

#: The only billing period kind so far: calendar month, UTC.
MONTH = "month"


def period_bounds(now: float, period: str = MONTH) -> tuple[int, int]:
    """
    The billing period containing ``now``: its start (inclusive) and end
    (exclusive), in Unix seconds.

    A timestamp in the last second of a period, however close to the end,
    belongs to that period.

    :raise ValueError: for a period kind other than ``"month"``.
    """
    if period != MONTH:
        raise ValueError(f"unknown billing period {period!r}")
    moment = time.gmtime(math.floor(now))
    year, month = moment.tm_year, moment.tm_mon
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    start = calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))
    end = calendar.timegm((next_year, next_month, 1, 0, 0, 0, 0, 0, 0))
    return start, end


@frozen
class Counters:
    """
    What a quota decision needs to know about an app right now.

    ``concurrent_now`` and ``messages_used`` do not yet include the
    connection or message being decided.
    """

    concurrent_now: int = 0
    messages_used: int = 0
    balance: float = 0.0


@frozen
class Decision:
    """
    The verdict on one connection or one message.

    ``charge`` and ``recharge`` are the money to record for it: what the
    unit costs the balance and what an auto-recharge adds. Both are zero
    unless ``overage`` is true.
    """

    accepted: bool
    overage: bool = False
    charge: float = 0.0
    recharge: float = 0.0


#: Within plan, or unmetered.
ACCEPT = Decision(accepted=True)
#: Over plan, and no overage possible.
REFUSE = Decision(accepted=False)


def decide_connection(plan: Plan | None, counters: Counters) -> Decision:
    """
    Whether to admit one more connection of an app (§15.3, first column).
    """
    if plan is None:
        return ACCEPT
    cap = plan.max_concurrent_connections
    if cap is None or counters.concurrent_now < cap:
        return ACCEPT
    return _decide_overage(plan, counters.balance, plan.overage_rate_per_connection)


def decide_message(plan: Plan | None, counters: Counters) -> Decision:
    """
    Whether to deliver one more message of an app (§15.3, second column).
    """
    if plan is None:
        return ACCEPT
    cap = plan.max_messages_per_period
    if cap is None or counters.messages_used < cap:
        return ACCEPT
    return _decide_overage(plan, counters.balance, plan.overage_rate_per_1000_messages / 1000)


def _decide_overage(plan: Plan, balance: float, cost: float) -> Decision:
    """
    Rules 3 to 6 of the module docstring, for one unit costing ``cost``.
    """
    if not (plan.overages_allowed and plan.overages_enabled):
        return REFUSE
    recharge = plan.auto_recharge_amount if _recharge_due(plan, balance, cost) else 0.0
    if balance + recharge - cost < -MONEY_EPSILON:
        return REFUSE
    return Decision(accepted=True, overage=True, charge=cost, recharge=recharge)


def _recharge_due(plan: Plan, balance: float, cost: float) -> bool:
    """
    Rule 5 of the module docstring.
    """
    threshold = max(plan.auto_recharge_threshold, 0.0)
    return (
        plan.auto_recharge_amount > 0
        and cost > 0
        and balance - cost < threshold - MONEY_EPSILON
    )


_Coroutine = Callable[[], Coroutine[Any, Any, None]]

#: Seconds between two flushes; also the most a C{SIGKILL} can lose.
FLUSH_INTERVAL = 1.0

#: How many times a graceful stop tries the final flush, one flush interval
#: apart, before it gives the unwritten counts up.
FINAL_FLUSH_ATTEMPTS = 10

#: Ledger reasons.
MESSAGE_OVERAGE = "message overage"
CONNECTION_OVERAGE = "connection overage"
AUTO_RECHARGE = "auto-recharge"


@frozen
class LiveCount:
    """
    An app's live connections on this node, and the billing period
    ``[period_start, period_end)`` they count towards.
    """

    app_id: str
    live: int
    period_start: int
    period_end: int


@define
class _PeriodUsage:
    """
    The mutable counters of one app in one billing period.
    """

    app_id: str
    period: str
    start: int
    end: int
    peak_concurrent: int = 0
    messages_used: int = 0
    overage_messages: int = 0
    overage_connections: int = 0
    #: The part of the three counts above that is written (or being
    #: written): loaded, or taken into a batch.
    taken: tuple[int, int, int] = (0, 0, 0)

    @property
    def key(self) -> tuple[str, int]:
        """
        Where L{Meter} files these counters.
        """
        return (self.app_id, self.start)

    def take(self) -> UsageRow:
        """
        The increments counted since the last batch, and this process's
        peak, to add to the stored row; from now on they count as written.
        """
        row = self.untaken()
        self.taken = (self.messages_used, self.overage_messages, self.overage_connections)
        return row

    def untaken(self) -> UsageRow:
        """
        The increments counted since the last batch, and this process's
        peak, leaving them pending.
        """
        counts = (self.messages_used, self.overage_messages, self.overage_connections)
        messages, overage_messages, overage_connections = (
            count - taken for count, taken in zip(counts, self.taken, strict=True)
        )
        return UsageRow(
            app_id=self.app_id,
            period_start=self.start,
            period_end=self.end,
            peak_concurrent=self.peak_concurrent,
            messages_used=messages,
            overage_messages=overage_messages,
            overage_connections=overage_connections,
        )

    def add_persisted(self, row: UsageRow) -> None:
        """
        Fold in what other processes (earlier ones, or others writing now)
        counted in this period: stored already, so not to be written again.

        The peak of two processes is the larger one.
        """
        self.peak_concurrent = max(self.peak_concurrent, row.peak_concurrent)
        self.messages_used += row.messages_used
        self.overage_messages += row.overage_messages
        self.overage_connections += row.overage_connections
        messages, overage_messages, overage_connections = self.taken
        self.taken = (
            messages + row.messages_used,
            overage_messages + row.overage_messages,
            overage_connections + row.overage_connections,
        )


@define
class _PendingCharge:
    """
    Overage charges of one kind not yet written: one ledger row per flush.
    """

    units: int = 0
    amount: float = 0.0
    at: float = 0.0


@implementer(IMeter)
class Meter(service.Service):
    """
    Counts connections and messages per app and period and enforces plans.

    Hot-path calls (L{admit_connection}, L{release_connection},
    L{count_message}, L{usage}) read the app's plan from the L{App} they are
    given, so a plan change applies to the next call. They decide from
    memory and return already-fired Deferreds.

    A period rolls over on the first call at or after its end: counters
    start from zero, except that the connections still open are the new
    period's first peak. The old period's last counts stay in memory until
    they are flushed.

    Once started, the service loads the current period's counters and every
    app's ledger total, then flushes changed counters and new ledger
    entries every L{FLUSH_INTERVAL} seconds, and once more when stopped.
    Counts made before the load finishes are added to what it loads, and
    nothing is written until it has, so a slow load loses nothing. A
    C{SIGKILL} loses at most what was counted since the last flush.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: UsageStore,
        flush_interval: float = FLUSH_INTERVAL,
        cluster: ClusterConnectionCount | None = None,
        quota: ClusterQuota | None = None,
    ) -> None:
        """
        :param clock: tells the time (periods, ledger timestamps) and drives
            the flush loop.
        :param store: where counters and the ledger persist.
        :param flush_interval: seconds between flushes.
        :param cluster: in a cluster, the cluster-wide connection count that
            connections of capped apps are admitted against; without it
            (one node) every decision is made from memory.
        :param quota: in a cluster, the cluster-wide message quota and
            overage money (L{meteredrt.clusterquota}): messages of apps
            with a message cap are admitted from slices of it, and every
            overage unit is paid from the balance kept in Redis.
        """
        self._clock = clock
        self._cluster = cluster
        self._quota = quota
        if quota is not None:
            quota.money.on_recharges = self._record_recharges
        self._store = store
        self._flush_interval = flush_interval
        #: Live connections per app; not per period, they cross boundaries.
        self._live: dict[str, int] = {}
        #: Each app's counters for the period it is in now.
        self._current: dict[str, _PeriodUsage] = {}
        #: Every period's counters still in memory, by (app id, start).
        self._periods: dict[tuple[str, int], _PeriodUsage] = {}
        #: Per app, recharges minus charges over its whole ledger.
        self._balance_changes: dict[str, float] = {}
        self._dirty: set[tuple[str, int]] = set()
        self._charges: dict[tuple[str, int, str], _PendingCharge] = {}
        #: Ledger entries awaiting a flush, other than aggregated charges.
        self._entries: list[LedgerEntry] = []
        #: This process's writer id and last batch number (see
        #: L{meteredrt.store.usage.FlushBatch}).
        self._writer = uuid.uuid4().hex
        self._sequence = 0
        #: A batch whose write failed: written again, unchanged, before
        #: anything newer, so that it counts exactly once.
        self._unconfirmed: FlushBatch | None = None
        #: Whether the last flush of the loop failed.
        self._failing = False
        self._loaded = False
        self._load_waiters: list[Deferred[None]] = []
        self._lock = DeferredLock()
        self._loop: LoopingCall | None = None
        self._last_flush = clock.seconds()
        self._flush_failures = 0

    @property
    def last_flush(self) -> float:
        """
        When the counts in memory were last all written (or this meter was
        made): C{now - last_flush} is the flush lag an operator watches,
        the most a C{SIGKILL} would lose, in seconds.
        """
        return self._last_flush

    @property
    def flush_failures(self) -> int:
        """
        How many flushes (and loads before them) have failed so far.
        """
        return self._flush_failures

    @property
    def loaded(self) -> Deferred[None]:
        """
        A new Deferred that fires once the persisted counters are in memory.

        Quota decisions made before that only see this process's counts, so
        the composition root opens no listener until it fires. A failed load
        is retried at every flush, and this waits for the one that works.
        """
        waiter: Deferred[None] = Deferred()
        if self._loaded:
            waiter.callback(None)
        else:
            self._load_waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        """
        Load the counters of the current period and start flushing.
        """
        super().startService()
        self._run_exclusively(self._load).addErrback(
            self._log_failure, "Loading usage counters failed; retrying at the next flush"
        )
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._flush_interval, now=False).addErrback(
            self._log_failure, "The usage flush loop stopped"
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop the flush loop and write everything counted so far.

        The returned Deferred fires once the final flush is done, so a
        graceful shutdown loses no count. A failing final flush (the
        database is down) is retried every flush interval for at most
        L{FINAL_FLUSH_ATTEMPTS} attempts, so that a short outage during a
        shutdown loses nothing either; after that the counts are given up
        and logged.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        final = Deferred.fromCoroutine(self._final_flush())
        final.addErrback(self._log_failure, "The final flush of usage counters failed; unwritten counts are lost")
        return final

    async def _final_flush(self) -> None:
        if not self._unwritten():
            # Nothing to lose: a stop after a failed start (the store never
            # reachable) ends at once instead of retrying for ten intervals.
            return
        for attempt in range(1, FINAL_FLUSH_ATTEMPTS + 1):
            try:
                await self._run_exclusively(self._sync)
                return
            except Exception:
                if attempt == FINAL_FLUSH_ATTEMPTS:
                    raise
                self._log.warn(
                    "The final flush of usage counters failed (attempt {attempt} of {attempts}); retrying",
                    attempt=attempt,
                    attempts=FINAL_FLUSH_ATTEMPTS,
                )
                await deferLater(self._clock, self._flush_interval, lambda: None)

    def admit_connection(self, app: App) -> Deferred[bool]:
        """
        Decide on and count one authenticated connection (counted from authentication, before the welcome).

        In a cluster, a connection of an app with a connection cap is
        decided on the cluster-wide count (one Redis script); it fails with
        L{ConnectionCountUnavailable} when Redis cannot answer.
        """
        plan = app.plan
        if self._cluster is None or plan is None or plan.max_concurrent_connections is None:
            return succeed(self._admit(app, self._live.get(app.app_id, 0)))
        return Deferred.fromCoroutine(self._admit_in_cluster(app, self._cluster, plan.max_concurrent_connections))

    async def _admit_in_cluster(self, app: App, cluster: ClusterConnectionCount, cap: int) -> bool:
        """
        Admit against the cluster-wide count: Redis counts the connection if
        the cluster is under the cap, or if the plan would accept it as
        overage now; the decision is then made as on one node, from the
        count Redis saw (and the balance now, should it have changed).

        With a cluster-wide balance (C{quota}), a connection over the cap
        is counted if the plan allows overage at all, and then paid in
        Redis: refused (and released) when the money does not cover it,
        closed 1011 when Redis cannot say.
        """
        plan = app.plan
        assert plan is not None
        if self._quota is not None:
            over_cap = plan.overages_allowed and plan.overages_enabled
        else:
            usage = self._usage_at(app.app_id, _period_of(plan), self._clock.seconds())
            over_cap = decide_connection(plan, Counters(cap, usage.messages_used, self.balance(app))).accepted
        counted, total = await cluster.admit(app.app_id, cap, over_cap)
        if not counted:
            return False
        if self._quota is None or total < cap:
            if self._admit(app, total):
                return True
            # The balance changed while Redis answered: overage no longer paid.
            cluster.release(app.app_id)
            return False
        price = plan.overage_rate_per_connection
        cost = await self._quota.money.spend(app.app_id, CONNECTION_OVERAGE, plan, price, 1, prefetch=False)
        if cost is None:
            cluster.release(app.app_id)
            if not self._quota.money.broke(app.app_id, CONNECTION_OVERAGE, price):
                raise ConnectionCountUnavailable("cannot pay a connection overage in Redis")
            return False
        now = self._clock.seconds()
        usage = self._usage_at(app.app_id, _period_of(plan), now)
        live = self._live[app.app_id] = self._live.get(app.app_id, 0) + 1
        usage.peak_concurrent = max(usage.peak_concurrent, live)
        usage.overage_connections += 1
        self._charge(usage, cost, now, CONNECTION_OVERAGE)
        self._dirty.add(usage.key)
        return True

    def _admit(self, app: App, concurrent_now: int) -> bool:
        """
        Decide with C{concurrent_now} connections of the app live (on this
        node, or in the cluster) and count the connection if accepted.
        """
        now = self._clock.seconds()
        usage = self._usage_at(app.app_id, _period_of(app.plan), now)
        live = self._live.get(app.app_id, 0)
        decision = decide_connection(
            app.plan, Counters(concurrent_now, usage.messages_used, self.balance(app))
        )
        if decision.accepted:
            live += 1
            self._live[app.app_id] = live
            usage.peak_concurrent = max(usage.peak_concurrent, live)
            if decision.overage:
                usage.overage_connections += 1
                self._bill(usage, decision, now, CONNECTION_OVERAGE)
            self._dirty.add(usage.key)
        return decision.accepted

    def release_connection(self, app_id: str) -> None:
        """
        Forget one admitted connection that closed.
        """
        live = self._live.get(app_id, 0)
        if live == 0:
            self._log.warn("Connection of {app_id} released but none is counted", app_id=app_id)
            return
        if self._cluster is not None:
            self._cluster.release(app_id)
        usage = self._current.get(app_id)
        if usage is not None:
            # Roll over first, so the new period's peak sees this connection.
            self._usage_at(app_id, usage.period, self._clock.seconds())
        if live == 1:
            del self._live[app_id]
        else:
            self._live[app_id] = live - 1

    def count_message(self, app: App) -> Deferred[bool]:
        """
        Count one publish/send/REST publish and decide whether it goes out.

        In a cluster, a message of an app with a message cap is decided
        from the slice of the cap this node holds (L{meteredrt.clusterquota});
        when Redis cannot say (unreachable, or the period's quota settling)
        it fails with L{QuotaUnavailable} and is not counted.
        """
        now = self._clock.seconds()
        plan = app.plan
        usage = self._usage_at(app.app_id, _period_of(plan), now)
        if self._quota is not None and plan is not None and plan.max_messages_per_period is not None:
            verdict = self._quota.messages.take(app.app_id, usage.start, usage.end, plan.max_messages_per_period)
            return verdict.addCallback(self._over_cluster_cap, app, plan, usage)
        cap = None if plan is None else plan.max_messages_per_period
        if cap is None or usage.messages_used < cap:
            # Within plan, as decide_message answers first: nothing to bill,
            # and the balance and live count need not be read (a send's
            # every frame comes here).
            usage.messages_used += 1
            self._dirty.add(usage.key)
            return succeed(True)
        decision = decide_message(
            plan,
            Counters(self._live.get(app.app_id, 0), usage.messages_used, self.balance(app)),
        )
        usage.messages_used += 1
        if decision.overage:
            usage.overage_messages += 1
            self._bill(usage, decision, now, MESSAGE_OVERAGE)
        self._dirty.add(usage.key)
        return succeed(decision.accepted)

    def _over_cluster_cap(
        self, verdict: str, app: App, plan: Plan, usage: _PeriodUsage
    ) -> bool | Deferred[bool]:
        """
        A message of a capped app in a cluster, once the slice has spoken:
        within plan, refused, or paid as overage from the cluster-wide
        balance (rules 3 to 6, applied in Redis). Counted unless Redis
        could not say.
        """
        if verdict == UNKNOWN:
            raise QuotaUnavailable("the message quota cannot be checked now; retry shortly")
        if verdict == WITHIN or not (plan.overages_allowed and plan.overages_enabled):
            usage.messages_used += 1
            self._dirty.add(usage.key)
            return verdict == WITHIN
        assert self._quota is not None and plan.max_messages_per_period is not None
        price = plan.overage_rate_per_1000_messages / 1000
        size = slice_size(plan.max_messages_per_period)
        money = self._quota.money

        def paid(cost: float | None) -> bool:
            if cost is None and not money.broke(app.app_id, MESSAGE_OVERAGE, price):
                raise QuotaUnavailable("the balance cannot be checked now; retry shortly")
            usage.messages_used += 1
            self._dirty.add(usage.key)
            if cost is None:
                return False
            usage.overage_messages += 1
            self._charge(usage, cost, self._clock.seconds(), MESSAGE_OVERAGE)
            return True

        return money.spend(app.app_id, MESSAGE_OVERAGE, plan, price, size).addCallback(paid)

    def usage(self, app: App) -> Deferred[dict[str, object]]:
        """
        Fires with the app's usage report, the JSON object of §19.6.
        """
        usage = self._usage_at(app.app_id, _period_of(app.plan), self._clock.seconds())
        plan = app.plan
        return succeed(
            {
                "appId": app.app_id,
                "periodStartUnix": usage.start,
                "periodEndUnix": usage.end,
                "concurrentNow": self._live.get(app.app_id, 0),
                "peakConcurrent": usage.peak_concurrent,
                "messagesUsed": usage.messages_used,
                "overageMessages": usage.overage_messages,
                "overageConnections": usage.overage_connections,
                "plan": plan_report(plan),
            }
        )

    def live_counts(self) -> list[LiveCount]:
        """
        This node's live connections of each app that has any, with the
        period they count towards now: the node's share of the
        cluster-wide figures (L{meteredrt.clusterusage.UsageShares}).
        """
        now = self._clock.seconds()
        counts = []
        for app_id, live in sorted(self._live.items()):
            current = self._current.get(app_id)
            usage = self._usage_at(app_id, current.period if current is not None else MONTH, now)
            counts.append(LiveCount(app_id, live, usage.start, usage.end))
        return counts

    def unwritten(self, app_id: str, period_start: int) -> UsageRow:
        """
        What this node counted for the app in the period that is neither
        written to the store nor being written, with its own peak: the part
        of a cluster-wide report that the store cannot know yet.
        """
        usage = self._periods.get((app_id, period_start))
        if usage is None:
            return UsageRow(app_id=app_id, period_start=period_start, period_end=period_bounds(period_start)[1])
        return usage.untaken()

    def raise_peak(self, app_id: str, period_start: int, peak: int) -> None:
        """
        Take in a cluster-wide peak of the app's concurrent connections,
        so that the next flush writes it (the store keeps the largest peak
        any writer reports). A period no longer in memory is left alone.
        """
        usage = self._periods.get((app_id, period_start))
        if usage is not None and peak > usage.peak_concurrent:
            usage.peak_concurrent = peak
            self._dirty.add(usage.key)

    def balance(self, app: App) -> float:
        """
        The app's running balance: its plan's opening balance plus the
        recharges minus the charges of its whole ledger, written or not.
        """
        opening = app.plan.balance if app.plan is not None else 0.0
        return opening + self._balance_changes.get(app.app_id, 0.0)

    def flush(self) -> Deferred[None]:
        """
        Write what changed since the last flush now, after any flush in
        progress. The loop calls this every L{FLUSH_INTERVAL} seconds.
        """
        return self._run_exclusively(self._sync)

    def _usage_at(self, app_id: str, period: str, now: float) -> _PeriodUsage:
        """
        The app's counters for the period containing ``now``, rolling over
        when ``now`` has reached the end of the current one.

        Time running backwards never reopens an earlier period.
        """
        usage = self._current.get(app_id)
        if usage is not None and usage.period == period and now < usage.end:
            return usage
        start, end = period_bounds(now, period)
        usage = self._periods.get((app_id, start))
        if usage is None:
            live = self._live.get(app_id, 0)
            usage = _PeriodUsage(app_id, period, start, end, peak_concurrent=live)
            self._periods[usage.key] = usage
            if live:
                self._dirty.add(usage.key)
        self._current[app_id] = usage
        return usage

    def _bill(self, usage: _PeriodUsage, decision: Decision, now: float, reason: str) -> None:
        """
        Record the money of one overage decision: a ledger entry for its
        recharge, a share of this flush's charge entry, and the balance.
        """
        if decision.recharge:
            self._record_recharges(usage.app_id, 1, decision.recharge)
        self._charge(usage, decision.charge, now, reason)

    def _charge(self, usage: _PeriodUsage, amount: float, now: float, reason: str) -> None:
        """
        Add one overage unit costing C{amount} to this flush's charge entry
        of its kind, and take it off the balance.
        """
        pending = self._charges.get((usage.app_id, usage.start, reason))
        if pending is None:
            pending = self._charges[(usage.app_id, usage.start, reason)] = _PendingCharge()
        pending.units += 1
        pending.amount += amount
        pending.at = now
        self._balance_changes[usage.app_id] = self._balance_changes.get(usage.app_id, 0.0) - amount

    def _record_recharges(self, app_id: str, count: int, amount: float) -> None:
        """
        Write C{count} auto-recharges of C{amount} to the ledger (one entry
        each) and add them to the balance: made by a decision on this node,
        or by a reservation in Redis (L{meteredrt.clusterquota.RESERVE}).
        """
        now = self._clock.seconds()
        usage = self._current.get(app_id)
        start = usage.start if usage is not None else period_bounds(now)[0]
        for _ in range(count):
            self._entries.append(
                LedgerEntry(
                    app_id=app_id,
                    at=now,
                    period_start=start,
                    kind=RECHARGE,
                    units=1,
                    amount=amount,
                    reason=AUTO_RECHARGE,
                )
            )
        self._balance_changes[app_id] = self._balance_changes.get(app_id, 0.0) + count * amount

    def _tick(self) -> Deferred[None]:
        """
        One iteration of the flush loop; never fails, so the loop goes on.

        The first failure of a run of them is logged with its traceback,
        the rest briefly (a database outage would otherwise log one
        traceback a second), and the first success after them says so.
        """
        d = self.flush()
        d.addCallbacks(self._flushed, self._flush_failed)
        return d

    def _flushed(self, _: object) -> None:
        if self._failing:
            self._failing = False
            self._log.info("Usage counters are flushed again")

    def _flush_failed(self, failure: Failure) -> None:
        if self._failing:
            self._log.debug("Flushing usage counters failed again: {error}", error=failure.getErrorMessage())
            return
        self._failing = True
        self._log_failure(failure, "Flushing usage counters failed; retrying every flush interval, counts kept")

    def _run_exclusively(self, work: _Coroutine) -> Deferred[None]:
        """
        Run a load or flush once no other one is running.
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(work()))

    async def _load(self) -> None:
        """
        Add the persisted counters of the current month and the ledger
        totals to memory.
        """
        start, _ = period_bounds(self._clock.seconds(), MONTH)
        rows = await self._store.load_period(start)
        changes = await self._store.balance_changes()
        for row in rows:
            usage = self._periods.get((row.app_id, row.period_start))
            if usage is None:
                usage = _PeriodUsage(row.app_id, MONTH, row.period_start, row.period_end)
                self._periods[usage.key] = usage
                self._current.setdefault(row.app_id, usage)
            usage.add_persisted(row)
        for app_id, change in changes.items():
            self._balance_changes[app_id] = self._balance_changes.get(app_id, 0.0) + change
        self._loaded = True
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _sync(self) -> None:
        """
        Write a batch of what changed, after loading if that has not
        succeeded yet (what this process writes must not be loaded back and
        counted twice), and after the batch that failed last time, if any.
        """
        started = self._clock.seconds()
        try:
            if not self._loaded:
                await self._load()
            if self._unconfirmed is not None:
                await self._store.flush(self._unconfirmed)
                self._forget_finished(self._unconfirmed)
                self._unconfirmed = None
        except BaseException:
            self._flush_failures += 1
            raise
        batch = self._take_batch()
        if not batch.usage and not batch.ledger:
            self._last_flush = started
            return
        self._unconfirmed = batch
        try:
            await self._store.flush(batch)
        except BaseException:
            self._flush_failures += 1
            raise
        self._unconfirmed = None
        self._last_flush = started
        self._forget_finished(batch)

    def _unwritten(self) -> bool:
        """
        Whether anything counted is not known to be written yet.
        """
        return bool(self._dirty or self._charges or self._entries or self._unconfirmed is not None)

    def _take_batch(self) -> FlushBatch:
        """
        Everything changed since the last batch, numbered; it is pending no
        more.
        """
        usage = tuple(self._periods[key].take() for key in sorted(self._dirty))
        charges = [
            LedgerEntry(
                app_id=app_id,
                at=pending.at,
                period_start=start,
                kind=CHARGE,
                units=pending.units,
                amount=pending.amount,
                reason=reason,
            )
            for (app_id, start, reason), pending in self._charges.items()
        ]
        ledger = tuple(sorted(self._entries + charges, key=lambda entry: entry.at))
        self._dirty.clear()
        self._charges.clear()
        self._entries = []
        if not usage and not ledger:
            return FlushBatch()
        self._sequence += 1
        return FlushBatch(
            usage=usage, ledger=ledger, writer=self._writer, sequence=self._sequence, at=self._clock.seconds()
        )

    def _forget_finished(self, batch: FlushBatch) -> None:
        """
        Drop the written counters of periods that are over.
        """
        for row in batch.usage:
            key = (row.app_id, row.period_start)
            usage = self._periods.get(key)
            if (
                usage is not None
                and key not in self._dirty
                and self._current.get(row.app_id) is not usage
            ):
                del self._periods[key]

    def _log_failure(self, failure: Failure, message: str) -> None:
        """
        Log a failed load or flush; the counts stay in memory.
        """
        self._log.failure(message, failure)


def plan_report(plan: Plan | None) -> dict[str, object]:
    """
    The C{plan} object of a usage report (§19.6), for the server's report
    and the CLI's alike.
    """
    return {
        "name": plan.name if plan else None,
        "maxConcurrentConnections": plan.max_concurrent_connections if plan else None,
        "maxMessagesPerPeriod": plan.max_messages_per_period if plan else None,
        "overagesAllowed": plan.overages_allowed if plan else None,
        "overagesEnabled": plan.overages_enabled if plan else None,
    }


def _period_of(plan: Plan | None) -> str:
    """
    The billing period kind of a plan; unmetered apps count by month.
    """
    return plan.period if plan is not None else MONTH
