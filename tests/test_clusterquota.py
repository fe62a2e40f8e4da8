"""
Tests for L{meteredrt.clusterquota}: the slice logic of the books with a
L{Clock} and a Redis answered by hand, then the L{Meter} of several nodes
on one real C{redis-server}, racing to a message cap and spending one
balance, and a Redis that restarts empty.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.apps import App, Plan
from meteredrt.clustercount import ClusterConnectionCount, ConnectionCountUnavailable
from meteredrt.clusterquota import (
    MARKER,
    MAX_SLICE,
    OVER,
    RECHECK_SECONDS,
    UNKNOWN,
    WITHIN,
    ClusterQuota,
    Grant,
    MoneyBook,
    QuotaBook,
    QuotaUnavailable,
    slice_size,
)
from meteredrt.clusterwire import ClusterNode
from meteredrt.hub import Hub
from meteredrt.metering import AUTO_RECHARGE, CONNECTION_OVERAGE, MESSAGE_OVERAGE, Meter
from meteredrt.redisclient import RedisClient, RedisUnavailable, parse_redis_url
from meteredrt.store.usage import CHARGE, RECHARGE
from meteredrt.usagestore import UsageStore
from tests.servers import RedisServer
from tests.test_clustercount import eventually
from tests.test_hub import HubTestCase

START, END = 0, 2678400  # January 1970, where a Clock at 0 is


class Asked:
    """
    Redis answered by hand: each request waits in C{requests} as
    C{(units asked, Deferred)}.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[int, Deferred[Grant]]] = []

    def quota(self, app_id: str, start: int, end: int, cap: int, units: int) -> Deferred[Grant]:
        d: Deferred[Grant] = Deferred()
        self.requests.append((units, d))
        return d

    def money(
        self, app_id: str, opening: float, cost: float, amount: float, threshold: float, units: int
    ) -> Deferred[Grant]:
        return self.quota(app_id, 0, 0, 0, units)

    def answer(self, grant: Grant | Exception) -> int:
        """
        Answer the oldest request; the units it asked for.
        """
        units, d = self.requests.pop(0)
        if isinstance(grant, Exception):
            d.errback(Failure(grant))
        else:
            d.callback(grant)
        return units


class SliceSizeTests(SynchronousTestCase):
    def test_hundredth_between_one_and_max(self) -> None:
        """
        A hundredth of the cap, at least 1 and at most L{MAX_SLICE}.
        """
        self.assertEqual(slice_size(1), 1)
        self.assertEqual(slice_size(250), 2)
        self.assertEqual(slice_size(10_000), 100)
        self.assertEqual(slice_size(10**9), MAX_SLICE)


class QuotaBookTests(SynchronousTestCase):
    """
    The within-plan units one node holds: cap 1000, slice 10.
    """

    CAP = 1000

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = Asked()
        self.connected = True
        self.book = QuotaBook(self.clock, self.redis.quota, lambda: self.connected)

    def take(self) -> Deferred[str]:
        return self.book.take("a", START, END, self.CAP)

    def test_first_message_waits_for_first_slice(self) -> None:
        """
        Holding nothing, a message waits for one request of a whole slice.
        """
        first = self.take()
        second = self.take()
        self.assertNoResult(first)
        self.assertEqual([units for units, _ in self.redis.requests], [10])
        self.redis.answer(Grant(10, b"e"))
        self.assertEqual(self.successResultOf(first), WITHIN)
        self.assertEqual(self.successResultOf(second), WITHIN)
        self.assertEqual(self.book.held[("a", START)].remaining, 8)

    def test_prefetch_at_half_slice(self) -> None:
        """
        Once half a slice is left the book asks for the rest, ahead of
        time: messages meanwhile are decided at once from what is held.
        """
        self.take()
        self.redis.answer(Grant(10, b"e"))
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.take()), WITHIN)
        self.assertEqual(self.redis.requests, [])
        self.assertEqual(self.successResultOf(self.take()), WITHIN)  # 5 left
        self.assertEqual([units for units, _ in self.redis.requests], [5])
        for _ in range(5):
            self.assertEqual(self.successResultOf(self.take()), WITHIN)
        self.assertEqual(len(self.redis.requests), 1)
        self.redis.answer(Grant(5, b"e"))
        self.assertEqual(self.book.held[("a", START)].remaining, 5)

    def test_cluster_exhausted(self) -> None:
        """
        Redis grants nothing more: the message is over the cap, and so are
        the next ones, without asking, until L{RECHECK_SECONDS} passed.
        """
        d = self.take()
        self.redis.answer(Grant(0, b"e", exhausted=True))
        self.assertEqual(self.successResultOf(d), OVER)
        self.assertEqual(self.successResultOf(self.take()), OVER)
        self.assertEqual(self.redis.requests, [])
        self.clock.advance(RECHECK_SECONDS)
        d = self.take()
        self.assertEqual(len(self.redis.requests), 1)
        self.redis.answer(Grant(1, b"e"))
        self.assertEqual(self.successResultOf(d), WITHIN)

    def test_partial_grant_waiting_messages(self) -> None:
        """
        A grant smaller than the messages waiting on it: the first are
        within plan, the others ask once more and learn the cap is reached.
        """
        waiting = [self.take() for _ in range(3)]
        self.redis.answer(Grant(1, b"e"))
        self.assertEqual(self.successResultOf(waiting[0]), WITHIN)
        self.redis.answer(Grant(0, b"e", exhausted=True))
        self.assertEqual([self.successResultOf(d) for d in waiting[1:]], [OVER, OVER])

    def test_redis_fails(self) -> None:
        """
        Redis cannot answer: the message is refused as unknown (never over
        the cap: no overage is charged), and Redis is left alone for
        L{RECHECK_SECONDS}.
        """
        d = self.take()
        self.redis.answer(RedisUnavailable("down"))
        self.assertEqual(self.successResultOf(d), UNKNOWN)
        self.assertEqual(self.successResultOf(self.take()), UNKNOWN)
        self.assertEqual(self.redis.requests, [])
        self.clock.advance(RECHECK_SECONDS)
        self.take()
        self.assertEqual(len(self.redis.requests), 1)

    def test_settling(self) -> None:
        """
        A key that settles before its seeding: unknown, and not asked
        again before the time Redis said.
        """
        d = self.take()
        self.redis.answer(Grant(0, retry_after=3.0))
        self.assertEqual(self.successResultOf(d), UNKNOWN)
        self.clock.advance(2.9)
        self.assertEqual(self.successResultOf(self.take()), UNKNOWN)
        self.assertEqual(self.redis.requests, [])
        self.clock.advance(0.1)
        self.take()
        self.assertEqual(len(self.redis.requests), 1)

    def test_disconnected_holds_nothing(self) -> None:
        """
        While Redis is not connected the units held are not used: Redis may
        have lost them.
        """
        self.take()
        self.redis.answer(Grant(10, b"e"))
        self.connected = False
        d = self.take()
        self.redis.answer(RedisUnavailable("not connected"))
        self.assertEqual(self.successResultOf(d), UNKNOWN)

    def test_new_epoch_drops_old_units(self) -> None:
        """
        Units granted in another epoch (Redis restarted) replace what was
        held, rather than adding to it.
        """
        self.take()
        self.redis.answer(Grant(10, b"old"))
        for _ in range(5):
            self.take()
        self.redis.answer(Grant(5, b"new"))
        self.assertEqual(self.book.held[("a", START)].remaining, 5)
        self.assertEqual(self.book.held[("a", START)].epoch, b"new")

    def test_new_period_drops_old_slice(self) -> None:
        """
        The first message of a new period asks for that period's quota;
        what was held for the last one is forgotten.
        """
        self.take()
        self.redis.answer(Grant(10, b"e"))
        d = self.book.take("a", END, 2 * END, self.CAP)
        self.assertNoResult(d)
        self.assertNotIn(("a", START), self.book.held)

    def test_forget_gives_back(self) -> None:
        """
        L{QuotaBook.forget} gives back what each key holds, in its epoch,
        and holds nothing more.
        """
        self.take()
        self.redis.answer(Grant(10, b"e"))
        given: list[tuple[Any, int, bytes]] = []

        def give_back(key: Any, held: Any) -> Deferred[object]:
            given.append((key, held.remaining, held.epoch))
            return fail(RedisUnavailable("best effort"))

        self.successResultOf(self.book.forget(give_back))
        self.assertEqual(given, [(("a", START), 9, b"e")])
        self.assertEqual(self.book.held[("a", START)].remaining, 0)

    def test_forget_gives_back_units_in_flight(self) -> None:
        """
        A request in flight when the book forgets: once it lands, the
        messages waiting for it draw first and the rest is given back, not
        held by a node that has stopped.
        """
        waiting = self.take()
        given: list[int] = []

        def give_back(key: Any, held: Any) -> Deferred[object]:
            given.append(held.remaining)
            return succeed(None)

        forgotten = self.book.forget(give_back)
        self.assertNoResult(forgotten)
        self.assertEqual(given, [])
        self.redis.answer(Grant(10, b"e"))
        self.assertEqual(self.successResultOf(waiting), WITHIN)
        self.successResultOf(forgotten)
        self.assertEqual(given, [9])
        self.assertEqual(self.book.held[("a", START)].remaining, 0)


PLAN = Plan(
    max_messages_per_period=100,
    overages_allowed=True,
    overage_rate_per_1000_messages=1000.0,
    auto_recharge_amount=3.0,
)


class MoneyBookTests(SynchronousTestCase):
    """
    The overage units one node has prepaid.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = Asked()
        self.recharges: list[tuple[str, int, float]] = []
        self.book = MoneyBook(self.clock, self.redis.money, lambda: True)
        self.book.on_recharges = lambda *args: self.recharges.append(args)

    def spend(self, cost: float = 1.0) -> Deferred[float | None]:
        return self.book.spend("a", MESSAGE_OVERAGE, PLAN, cost, 4)

    def test_prepaid_units(self) -> None:
        """
        A reservation pays for several units, each spent at its price; the
        recharges it made are reported once.
        """
        d = self.spend()
        self.assertEqual(self.redis.answer(Grant(4, b"e", recharges=2)), 4)
        self.assertEqual(self.successResultOf(d), 1.0)
        self.assertEqual(self.recharges, [("a", 2, 3.0)])
        self.assertEqual(self.successResultOf(self.spend()), 1.0)

    def test_broke(self) -> None:
        """
        Money that does not cover a unit: refused, and L{MoneyBook.broke}
        says so (Redis answered), not asked again before the recheck.
        """
        d = self.spend()
        self.redis.answer(Grant(0, b"e", exhausted=True))
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(self.book.broke("a", MESSAGE_OVERAGE, 1.0))
        self.assertIsNone(self.successResultOf(self.spend()))
        self.assertEqual(self.redis.requests, [])

    def test_unavailable_is_not_broke(self) -> None:
        """
        Redis not answering refuses the unit, but is not a lack of money.
        """
        d = self.spend()
        self.redis.answer(RedisUnavailable("down"))
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(self.book.broke("a", MESSAGE_OVERAGE, 1.0))

    def test_no_prefetch(self) -> None:
        """
        Without prefetch (connections), a unit is reserved only when one is
        needed: no money is taken ahead.
        """
        d = self.book.spend("a", CONNECTION_OVERAGE, PLAN, 1.0, 1, prefetch=False)
        self.assertEqual(self.redis.answer(Grant(1, b"e")), 1)
        self.assertEqual(self.successResultOf(d), 1.0)
        self.assertEqual(self.redis.requests, [])
        self.book.spend("a", CONNECTION_OVERAGE, PLAN, 1.0, 1, prefetch=False)
        self.assertEqual(len(self.redis.requests), 1)

    def test_prefetch(self) -> None:
        """
        With prefetch (messages), the next units are reserved once half a
        slice is left, before any message needs them.
        """
        d = self.spend()
        self.redis.answer(Grant(4, b"e"))
        self.successResultOf(d)
        self.assertEqual(self.redis.requests, [])
        self.successResultOf(self.spend())  # 2 left: half of 4
        self.assertEqual([units for units, _ in self.redis.requests], [2])

    def test_price_change(self) -> None:
        """
        After a price change, units are reserved at the new price; those
        prepaid at the old one stay held (to be refunded), unused.
        """
        self.spend()
        self.redis.answer(Grant(4, b"e"))
        d = self.spend(cost=2.0)
        self.redis.answer(Grant(4, b"e"))
        self.assertEqual(self.successResultOf(d), 2.0)
        self.assertEqual(self.book.held[("a", MESSAGE_OVERAGE, 1.0)].remaining, 3)


class NoRedisTests(SynchronousTestCase):
    """
    A meter given a cluster quota asks it nothing for apps without a
    message cap.
    """

    def test_uncapped_apps_ask_nobody(self) -> None:
        from tests.test_usagestore import SynchronousPool

        client = RedisClient(Clock(), parse_redis_url("redis://127.0.0.1:1/0"))
        store = UsageStore.with_pool(SynchronousPool(self.mktemp()))
        self.addCleanup(store.close)
        quota = ClusterQuota(Clock(), client, store)
        meter = Meter(Clock(), store, quota=quota)
        for app in (App("free"), App("open", Plan(max_concurrent_connections=3))):
            self.assertTrue(self.successResultOf(meter.count_message(app)))
        self.assertEqual(quota.messages.held, {})
        # Not connected: a capped app's message is not admitted unchecked,
        # and not counted either.
        capped = App("capped", PLAN)
        self.failureResultOf(meter.count_message(capped), QuotaUnavailable)
        self.assertEqual(self.successResultOf(meter.usage(capped))["messagesUsed"], 0)


class HubTests(HubTestCase):
    """
    What a client sees when its capped app's quota cannot be checked: a
    hub whose meter has a cluster quota with Redis unreachable.
    """

    def setUp(self) -> None:
        super().setUp()
        self.apps["capped"] = App("capped", Plan(max_messages_per_period=100))
        client = RedisClient(Clock(), parse_redis_url("redis://127.0.0.1:1/0"))
        quota = ClusterQuota(Clock(), client, UsageStore(self.mktemp(), MemoryReactorClock()))
        self.meter = Meter(self.clock, UsageStore(self.mktemp(), MemoryReactorClock()), quota=quota)
        self.hub = Hub(self.broker, self.presence, self.meter, self.apps.get, node_id="n1")

    def test_publish_and_send(self) -> None:
        """
        A publish and a send answer the transient C{backend_error},
        deliver nothing and count nothing; an uncapped app is unaffected.
        """
        listener, heard = self.connect("b", app_id="capped")
        self.subscribe(listener, "room")
        heard.clear()
        session, sink = self.connect("a", app_id="capped")
        self.publish(session, "room", "x", requestId="r1")
        self.assertError(sink, "backend_error")
        sink.clear()
        self.send(session, "b", "x", requestId="r1")
        self.assertError(sink, "backend_error")
        self.assertEqual(heard.decoded, [])
        usage = self.successResultOf(self.meter.usage(self.apps["capped"]))
        self.assertEqual(usage["messagesUsed"], 0)
        free, free_sink = self.connect("c", app_id="app_1")
        self.publish(free, "room", "x", requestId="r1")
        self.assertEqual(free_sink.decoded, [{"type": "ack", "requestId": "r1"}])


SETTLE = 0.2

#: The settle time of the tests that take several steps while a marker is
#: new (a restart, another Redis's marker): with L{SETTLE} the marker could
#: come of age between the nodes' reconnects (each on its own jittered
#: backoff) and the request that must find it new, on a loaded machine.
SLOW_SETTLE = 2.0


class Node:
    """
    One node's metering on a real Redis: its client, quota and meter.
    """

    def __init__(self, case: TestCase, url: str, store: UsageStore, name: str, settle: float = SETTLE) -> None:
        self.settle = settle
        self.client = RedisClient(reactor, parse_redis_url(url), timeout=2.0)
        self.client.startService()
        case.addCleanup(lambda: self.client.stopService() if self.client.running else None)
        self.quota = ClusterQuota(reactor, self.client, store, settle_seconds=settle)
        self.quota.startService()
        self.count = ClusterConnectionCount(self.client, ClusterNode(name))
        #: The meter's clock: it tells the period, not Redis's time.
        self.clock = Clock()
        self.meter = Meter(self.clock, store, cluster=self.count, quota=self.quota)

    async def publish(self, app: App, n: int) -> int:
        """
        Send C{n} messages of C{app} at once; how many were accepted.
        """
        verdicts = [self.meter.count_message(app) for _ in range(n)]
        return sum([await accepted(d) for d in verdicts])


def accepted_one(node: Node, app: App) -> Deferred[bool]:
    """
    Publish one message of C{app} on C{node}: whether it was accepted.
    """
    return Deferred.fromCoroutine(accepted(node.meter.count_message(app)))


async def accepted(verdict: Deferred[bool]) -> bool:
    """
    Whether a message was accepted; one the quota could not decide on
    (L{QuotaUnavailable}) was not.
    """
    try:
        return await verdict
    except QuotaUnavailable:
        return False


class RedisQuotaTests(TestCase):
    """
    Meters of several nodes on one real Redis and one store.
    """

    timeout = 60

    async def nodes(self, n: int = 2, settle: float = SETTLE) -> tuple[RedisServer, UsageStore, list[Node]]:
        server = await RedisServer.start(self)
        store = UsageStore(self.mktemp(), reactor)
        self.addCleanup(store.close)
        nodes = [Node(self, server.url, store, f"node{i}", settle) for i in range(n)]
        for node in nodes:
            await node.client.ready
        return server, store, nodes

    async def marker_aged(self, node: Node) -> None:
        """
        Wait until Redis has held its marker for longer than C{node}'s
        settle time: the marker the nodes made when they connected.
        """
        deadline = reactor.seconds() + 5
        while await node.client.execute("HGET", MARKER, "at") is None:
            self.assertLess(reactor.seconds(), deadline)
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, node.settle + 0.05, lambda: None)

    async def accepted_until_refused(self, node: Node, app: App, patience: float = 5.0) -> int:
        """
        Publish on C{node} until a message is refused after others were
        accepted (waiting out the settling of a new key); how many were.
        """
        deadline = reactor.seconds() + patience
        accepted = 0
        while reactor.seconds() < deadline:
            if await accepted_one(node, app):
                accepted += 1
            elif accepted:
                return accepted
            else:
                await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"still accepting after {patience} s ({accepted})")

    async def test_settles_then_seeds(self) -> None:
        """
        A cap given to an app that has sent messages this period: its first
        messages find no key and fail as unavailable (not counted) while
        the key settles; then it is seeded with the period's messages in
        the store, and only the rest of the cap is admitted. It settles
        although Redis has been up for long: the store holds messages of
        the period, counted without a cap, and more may not be stored yet.
        """
        _, _, [node, _] = await self.nodes()
        await self.marker_aged(node)
        self.assertEqual(await node.publish(App("a"), 3), 3)
        await node.meter.flush()
        app = App("a", Plan(max_messages_per_period=5))
        self.assertEqual(await node.publish(app, 2), 0)
        self.assertEqual((await node.meter.usage(app))["messagesUsed"], 3)
        await deferLater(reactor, SETTLE, lambda: None)
        self.assertEqual(await node.publish(app, 5), 2)
        self.assertEqual(await node.client.execute("HGET", "mrt:a:mq:0", "granted"), b"5")
        self.assertEqual((await node.meter.usage(app))["messagesUsed"], 8)

    async def test_burst_bigger_than_slice(self) -> None:
        """
        Many messages at once on a node holding nothing: each grant serves
        the oldest waiting, and they are admitted up to the cap exactly.
        """
        _, _, [node, _] = await self.nodes()
        app = App("a", Plan(max_messages_per_period=20))
        await self.wait_seeded(node, app)
        self.assertEqual(await node.publish(app, 30), 20)

    async def test_racing_to_the_cap(self) -> None:
        """
        Two nodes publishing at once: together they never accept more than
        the cap, and at most one slice each less.
        """
        _, _, nodes = await self.nodes()
        cap = 300
        app = App("a", Plan(max_messages_per_period=cap))
        await self.wait_seeded(nodes[0], app)
        accepted = 0
        for _ in range(20):
            counts = [node.publish(app, 25) for node in nodes]
            accepted += sum([await c for c in counts])
        self.assertLessEqual(accepted, cap)
        self.assertGreaterEqual(accepted, cap - len(nodes) * slice_size(cap))

    async def wait_seeded(self, node: Node, app: App) -> None:
        """
        Wait until the app's quota and money keys are seeded, asking Redis
        for no unit (nothing is charged nor counted).
        """
        plan = app.plan
        assert plan is not None and plan.max_messages_per_period is not None
        deadline = reactor.seconds() + 5
        while not (await node.quota.take(app.app_id, START, END, plan.max_messages_per_period, 0)).exhausted:
            self.assertLess(reactor.seconds(), deadline)
            await deferLater(reactor, 0.05, lambda: None)
        while not (await node.quota.reserve(app.app_id, plan.balance, 1.0, 0.0, 0.0, 0)).exhausted:
            self.assertLess(reactor.seconds(), deadline)
            await deferLater(reactor, 0.05, lambda: None)

    async def test_clean_stop_gives_back(self) -> None:
        """
        A node that stops cleanly gives its unused slice back: the other
        reaches the cap exactly.
        """
        _, _, [one, two] = await self.nodes()
        cap = 500
        app = App("a", Plan(max_messages_per_period=cap))
        await self.wait_seeded(one, app)
        self.assertEqual(await one.publish(app, 1), 1)
        self.assertEqual(await two.publish(app, 10), 10)
        self.assertGreater(one.quota.messages.held[("a", START)].remaining, 0)
        await one.quota.stopService()
        accepted = 1 + 10 + await self.accepted_until_refused(two, app)
        self.assertEqual(accepted, cap)

    async def test_clean_stop_gives_back_prefetch_in_flight(self) -> None:
        """
        A node that stops while its prefetch is in flight (slices of 1:
        the message that draws the unit asks for the next) gives back what
        the prefetch is granted once it lands: the other node reaches the
        cap exactly.
        """
        _, _, [one, two] = await self.nodes()
        cap = 20
        app = App("a", Plan(max_messages_per_period=cap))
        await self.wait_seeded(one, app)
        self.assertEqual(await one.publish(app, 1), 1)
        self.assertIsNotNone(one.quota.messages.held[("a", START)].waiters)
        await one.quota.stopService()
        self.assertEqual(one.quota.messages.held[("a", START)].remaining, 0)
        accepted = 1 + await self.accepted_until_refused(two, app)
        self.assertEqual(accepted, cap)

    async def test_overage_limited_balance(self) -> None:
        """
        Over the cap, two nodes spend one balance: together they never
        charge more than it holds, and the ledger they write says so.
        """
        _, store, nodes = await self.nodes()
        plan = Plan(
            max_messages_per_period=200,
            overages_allowed=True,
            overage_rate_per_1000_messages=1000.0,
            balance=30.0,
        )
        app = App("a", plan)
        await self.wait_seeded(nodes[0], app)
        accepted = 0
        for _ in range(20):
            counts = [node.publish(app, 20) for node in nodes]
            accepted += sum([await c for c in counts])
        overage = 0
        for node in nodes:
            overage += (await node.meter.usage(app))["overageMessages"]  # type: ignore[operator]
        self.assertLessEqual(overage, 30)
        self.assertLessEqual(accepted, 200 + 30)
        for node in nodes:
            await node.quota.stopService()
            await node.meter.flush()
        charged = sum(e.amount for e in await store.ledger("a") if e.kind == CHARGE)
        self.assertEqual(charged, float(overage))
        self.assertLessEqual(charged, 30.0)
        # What was reserved and not used went back: Redis agrees with the ledger.
        self.assertEqual(float(await nodes[0].client.execute("HGET", "mrt:a:money", "changes")), -charged)

    async def test_auto_recharge_exactly_once(self) -> None:
        """
        Overage units costing 1 from a balance of 0 with recharges of 3:
        however the two nodes interleave, one recharge per 3 units
        reserved, never two for the same shortfall.
        """
        _, store, nodes = await self.nodes()
        plan = Plan(
            max_messages_per_period=1,
            overages_allowed=True,
            overage_rate_per_1000_messages=1000.0,
            auto_recharge_amount=3.0,
        )
        app = App("a", plan)
        await self.wait_seeded(nodes[0], app)
        counts = [node.publish(app, 10) for node in nodes]
        self.assertEqual(sum([await c for c in counts]), 20)
        # Prefetched units were reserved (and recharged for) too.
        prefetched = sum(h.remaining for node in nodes for h in node.quota.money.held.values())
        for node in nodes:
            await node.quota.stopService()
            await node.meter.flush()
        ledger = await store.ledger("a")
        recharges = [e for e in ledger if e.kind == RECHARGE]
        charges = [e for e in ledger if e.kind == CHARGE]
        self.assertEqual({e.reason for e in recharges}, {AUTO_RECHARGE})
        self.assertEqual(sum(e.units for e in charges), 19)
        reserved = 19 + prefetched
        self.assertEqual(len(recharges), -(-reserved // 3))
        balance = sum(e.amount for e in recharges) - sum(e.amount for e in charges)
        self.assertEqual(float(await nodes[0].client.execute("HGET", "mrt:a:money", "changes")), balance)

    async def test_connection_overage_paid_in_redis(self) -> None:
        """
        A connection over the cluster-wide cap is paid from the balance in
        Redis: two nodes with one unit of money admit one, not two.
        """
        _, store, [one, two] = await self.nodes()
        plan = Plan(
            max_concurrent_connections=1, overages_allowed=True, overage_rate_per_connection=1.0, balance=1.0
        )
        app = App("a", plan)
        self.assertTrue(await one.meter.admit_connection(app))
        deadline = reactor.seconds() + 5
        while True:  # the money key settles: unavailable meanwhile
            try:
                paid = await two.meter.admit_connection(app)
                break
            except ConnectionCountUnavailable:
                self.assertLess(reactor.seconds(), deadline)
                await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(paid)
        self.assertFalse(await one.meter.admit_connection(app))
        self.assertEqual(await one.client.execute("HGET", "mrt:a:cc", one.count.node.node_id), b"1")
        await two.meter.flush()
        [charge] = await store.ledger("a")
        self.assertEqual((charge.reason, charge.units, charge.amount), (CONNECTION_OVERAGE, 1, 1.0))

    async def test_redis_restarted_empty(self) -> None:
        """
        Redis restarts empty: the slices held are dropped, capped messages
        are unavailable while the key settles, during which the nodes flush
        what they counted before; then it is seeded from the store and the
        cap still holds.
        """
        server, store, [one, two] = await self.nodes(settle=SLOW_SETTLE)
        cap = 200
        app = App("a", Plan(max_messages_per_period=cap))
        await self.wait_seeded(one, app)
        accepted = await one.publish(app, 60) + await two.publish(app, 40)
        self.assertEqual(accepted, 100)
        await server.kill()
        await eventually(self, lambda: succeed(one.client.connected or two.client.connected), False, 3)
        self.assertEqual(await one.publish(app, 5), 0)  # held, but unusable, not counted
        await server.restart()
        await eventually(self, lambda: succeed(one.client.connected and two.client.connected), True, 10)
        for node in (one, two):
            self.assertEqual(sum(h.remaining for h in node.quota.messages.held.values()), 0)
        # The key settles from this first request on; meanwhile the nodes
        # flush (as their flush loop does every second).
        self.assertFalse(await accepted_one(two, app))
        for node in (one, two):
            await node.meter.flush()
        row = await store.load("a", START)
        assert row is not None
        self.assertEqual(row.messages_used, accepted)
        while not await accepted_one(two, app):
            await deferLater(reactor, 0.05, lambda: None)
        after = 1 + await self.accepted_until_refused(two, app) + await one.publish(app, cap)
        self.assertEqual(int(await two.client.execute("HGET", "mrt:a:mq:0", "granted")), cap)
        self.assertLessEqual(accepted + after, cap)
        self.assertGreaterEqual(accepted + after, cap - 2 * slice_size(cap))

    async def test_new_period_seeded_at_once(self) -> None:
        """
        On a Redis up for longer than the settle time, the first message of
        each period of an app capped all along is decided at once: nothing
        was counted in the period without a cap, so the store is complete.
        """
        _, _, [node, _] = await self.nodes()
        await self.marker_aged(node)
        app = App("a", Plan(max_messages_per_period=5))
        self.assertTrue(await accepted_one(node, app))
        self.assertEqual(await node.publish(app, 5), 4)
        await node.meter.flush()
        node.clock.advance(END)
        self.assertTrue(await accepted_one(node, app))
        self.assertIsNotNone(await node.client.execute("HGET", f"mrt:a:mq:{END}", "epoch"))
        self.assertEqual((await node.meter.usage(app))["messagesUsed"], 1)

    async def test_restarted_empty_before_a_flush(self) -> None:
        """
        Redis restarts empty before the nodes have flushed what they
        counted from its slices: the store says 0, yet the key settles
        (the marker is new) while they flush, and the cap still holds.
        """
        server, _, [one, two] = await self.nodes(settle=SLOW_SETTLE)
        await self.marker_aged(one)
        cap = 200
        app = App("a", Plan(max_messages_per_period=cap))
        self.assertEqual(await one.publish(app, 60), 60)
        await server.kill()
        await eventually(self, lambda: succeed(one.client.connected or two.client.connected), False, 3)
        await server.restart()
        await eventually(self, lambda: succeed(one.client.connected and two.client.connected), True, 10)
        self.assertFalse(await accepted_one(two, app))
        await one.meter.flush()
        after = await self.accepted_until_refused(two, app, patience=SLOW_SETTLE + 5)
        self.assertEqual(int(await two.client.execute("HGET", "mrt:a:mq:0", "granted")), cap)
        self.assertLessEqual(60 + after, cap)
        self.assertGreaterEqual(60 + after, cap - slice_size(cap))

    async def test_marker_of_another_redis(self) -> None:
        """
        A marker written by another Redis process (a snapshot restored, a
        failover to a replica) counts as new: a missing quota or balance
        waits, however old the marker says it is; so does a quota whose
        settle time, set by that other process, is already past (app
        C{b}, capped mid-period).
        """
        _, _, [one, two] = await self.nodes(settle=SLOW_SETTLE)
        self.assertEqual(await one.publish(App("b"), 3), 3)
        await one.meter.flush()
        await self.marker_aged(one)
        await one.client.execute("HSET", MARKER, "run_id", "0" * 40, "at", "0")
        await one.client.execute("HSET", "mrt:b:mq:0", "ready", "1")
        plan = Plan(
            max_messages_per_period=5,
            max_concurrent_connections=1,
            overages_allowed=True,
            overage_rate_per_connection=1.0,
            balance=1.0,
        )
        for app in (App("a", plan), App("b", plan)):
            self.assertFalse(await accepted_one(one, app))
        self.assertTrue(await one.meter.admit_connection(App("a", plan)))
        with self.assertRaises(ConnectionCountUnavailable):
            await two.meter.admit_connection(App("a", plan))
        self.assertNotEqual(await one.client.execute("HGET", MARKER, "at"), b"0")

    async def test_money_seeded_at_once(self) -> None:
        """
        On a Redis up for longer than the settle time, the first overage
        of an app is paid at once: every charge a node makes is paid in
        Redis, so the ledger misses nothing of a balance Redis never held.
        """
        _, _, [one, two] = await self.nodes()
        await self.marker_aged(one)
        plan = Plan(
            max_concurrent_connections=1, overages_allowed=True, overage_rate_per_connection=1.0, balance=1.0
        )
        app = App("a", plan)
        self.assertTrue(await one.meter.admit_connection(app))
        self.assertTrue(await two.meter.admit_connection(app))
        self.assertFalse(await one.meter.admit_connection(app))

    async def test_restart_long_before_a_period(self) -> None:
        """
        A Redis restarted empty is marked as soon as the nodes reconnect,
        not at the next seeding: the first message of a period that starts
        long after the restart is decided at once.
        """
        server, _, [one, two] = await self.nodes()
        await server.kill()
        await eventually(self, lambda: succeed(one.client.connected or two.client.connected), False, 3)
        await server.restart()
        await eventually(self, lambda: succeed(one.client.connected and two.client.connected), True, 10)
        await self.marker_aged(one)
        self.assertTrue(await accepted_one(two, App("a", Plan(max_messages_per_period=5))))

    async def test_clock_stepped_back(self) -> None:
        """
        Times in Redis ahead of its clock (the clock stepped back since
        they were written) are taken as now: a key waits one settle time,
        not until Redis's clock catches up.
        """
        _, _, [node, _] = await self.nodes()
        self.assertEqual(await node.publish(App("b"), 3), 3)
        await node.meter.flush()
        info = (await node.client.execute("INFO", "server")).decode()
        [run_id] = [line[len("run_id:") :] for line in info.splitlines() if line.startswith("run_id:")]
        future = str(4_000_000_000_000)  # year 2096, in ms
        await node.client.execute("HSET", MARKER, "run_id", run_id, "at", future)
        await node.client.execute("HSET", "mrt:b:mq:0", "ready", future)
        plan = Plan(max_messages_per_period=5)
        for app in (App("a", plan), App("b", plan)):
            self.assertGreater(await self.accepted_until_refused(node, app, patience=SETTLE * 10), 0)
        self.assertNotEqual(await node.client.execute("HGET", MARKER, "at"), future.encode())
