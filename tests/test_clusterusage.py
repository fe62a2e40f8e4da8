"""
Tests for L{meteredrt.clusterusage}: the meter's side of a cluster-wide
report in memory, then the report and the shares on a real
C{redis-server}, two meters on one Redis and one usage store standing for
two nodes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from meteredrt.apps import App, Plan
from meteredrt.clusterusage import SHARE_INTERVAL, ClusterUsage, UsageShares
from meteredrt.clusterwire import ClusterNode
from meteredrt.interfaces import IUsageReport
from meteredrt.metering import LiveCount, Meter
from meteredrt.redisclient import RedisClient, RedisUnavailable, parse_redis_url
from meteredrt.store.usage import UsageRow, UsageStore
from tests.servers import RedisServer
from tests.test_metering import DEC, MID_NOVEMBER, NOV
from tests.test_usagestore import SynchronousPool

FREE = App("free")
CAPPED = App("capped", Plan(name="CAP", max_concurrent_connections=100))


def started_meter(case: SynchronousTestCase, path: str, clock: Clock) -> Meter:
    """
    A started meter on the SQLite usage file at C{path}, run synchronously;
    stopped on cleanup.
    """
    store = UsageStore.with_pool(SynchronousPool(path))
    meter = Meter(clock, store)
    meter.startService()
    case.addCleanup(store.close)
    case.addCleanup(meter.stopService)
    return meter


class MeterShareTests(SynchronousTestCase):
    """
    What a L{Meter} tells a cluster-wide report about this node.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(MID_NOVEMBER)
        self.path = self.mktemp()
        self.meter = started_meter(self, self.path, self.clock)

    def admit(self, app: App, count: int = 1) -> None:
        for _ in range(count):
            self.assertTrue(self.successResultOf(self.meter.admit_connection(app)))

    def stored(self, app_id: str) -> UsageRow | None:
        store = UsageStore.with_pool(SynchronousPool(self.path))
        self.addCleanup(store.close)
        row: UsageRow | None = self.successResultOf(store.load(app_id, NOV))
        return row

    def test_live_counts(self) -> None:
        """
        Each app with live connections, with the period they count
        towards; an app whose last connection closed is left out.
        """
        self.admit(FREE, 2)
        self.admit(CAPPED)
        self.assertEqual(self.meter.live_counts(), [LiveCount("capped", 1, NOV, DEC), LiveCount("free", 2, NOV, DEC)])
        self.meter.release_connection("capped")
        self.assertEqual(self.meter.live_counts(), [LiveCount("free", 2, NOV, DEC)])

    def test_live_counts_roll_over(self) -> None:
        """
        Connections open across a period's end count towards the new one.
        """
        self.admit(FREE)
        self.clock.advance(DEC - MID_NOVEMBER)
        self.assertEqual(self.meter.live_counts(), [LiveCount("free", 1, DEC, DEC + 31 * 86400)])

    def test_unwritten(self) -> None:
        """
        Only what was counted since the last flush is unwritten; the peak
        is this node's own.
        """
        self.admit(FREE, 3)
        for _ in range(4):
            self.successResultOf(self.meter.count_message(FREE))
        self.successResultOf(self.meter.flush())
        for _ in range(2):
            self.successResultOf(self.meter.count_message(FREE))
        self.assertEqual(
            self.meter.unwritten("free", NOV),
            UsageRow("free", NOV, DEC, peak_concurrent=3, messages_used=2),
        )

    def test_unwritten_unknown(self) -> None:
        """
        An app or period this node never counted has nothing unwritten.
        """
        self.assertEqual(self.meter.unwritten("nobody", NOV), UsageRow("nobody", NOV, DEC))

    def test_raise_peak_flushed(self) -> None:
        """
        A larger cluster-wide peak is written at the next flush; a smaller
        one changes nothing.
        """
        self.admit(FREE, 2)
        self.successResultOf(self.meter.flush())
        self.meter.raise_peak("free", NOV, 7)
        self.meter.raise_peak("free", NOV, 5)
        self.successResultOf(self.meter.flush())
        row = self.stored("free")
        assert row is not None
        self.assertEqual(row.peak_concurrent, 7)

    def test_raise_peak_of_unknown_period(self) -> None:
        """
        A peak of a period not in memory is ignored: nothing to flush.
        """
        self.meter.raise_peak("free", DEC, 9)
        self.successResultOf(self.meter.flush())
        self.assertIsNone(self.stored("free"))


class ClusterUsageTests(TestCase):
    """
    L{ClusterUsage} and L{UsageShares} on a real Redis, for two nodes
    sharing one usage store.
    """

    async def start_nodes(self) -> None:
        self.redis = await RedisServer.start(self)
        path = self.mktemp()
        self.clock = Clock()
        self.clock.advance(MID_NOVEMBER)
        self.nodes: list[tuple[Meter, ClusterUsage, UsageShares]] = []
        for name in ("one", "two"):
            client = RedisClient(reactor, parse_redis_url(self.redis.url), timeout=2.0)
            client.startService()
            self.addCleanup(client.stopService)
            await client.ready
            node = ClusterNode(name)
            # Both nodes hold a lease, as their NodeLease would.
            await client.execute("SET", f"mrt:lease:{node.node_id}", "1", "PX", 60_000)
            meter = started_meter(self, path, self.clock)
            store = UsageStore.with_pool(SynchronousPool(path))
            self.addCleanup(store.close)
            usage = ClusterUsage(meter, store, client, node)
            self.nodes.append((meter, usage, UsageShares(self.clock, meter, usage)))

    async def report(self, index: int, app: App = FREE) -> dict[str, Any]:
        return await self.nodes[index][1].usage(app)

    async def admit(self, index: int, app: App, count: int = 1) -> None:
        for _ in range(count):
            self.assertTrue(await self.nodes[index][0].admit_connection(app))

    async def share(self, *indexes: int) -> None:
        for index in indexes or range(len(self.nodes)):
            await self.nodes[index][2].share()

    async def test_provides_report(self) -> None:
        """
        L{ClusterUsage} is an L{IUsageReport}.
        """
        await self.start_nodes()
        self.assertTrue(verifyObject(IUsageReport, self.nodes[0][1]))

    async def test_concurrent_now_across_nodes(self) -> None:
        """
        Every node reports the sum of the app's live connections: its own
        at once, the others' as they last shared them.
        """
        await self.start_nodes()
        await self.admit(0, FREE, 2)
        await self.admit(1, FREE, 3)
        self.assertEqual((await self.report(0))["concurrentNow"], 2)
        await self.share()
        self.assertEqual([(await self.report(i))["concurrentNow"] for i in (0, 1)], [5, 5])
        await self.admit(1, FREE)
        await self.admit(0, FREE)
        self.assertEqual([(await self.report(i))["concurrentNow"] for i in (0, 1)], [6, 6])
        await self.share(1)
        self.assertEqual((await self.report(0))["concurrentNow"], 7)

    async def test_capped_and_uncapped_apart(self) -> None:
        """
        Apps are counted apart, capped or not.
        """
        await self.start_nodes()
        await self.admit(0, FREE)
        await self.admit(1, CAPPED, 2)
        await self.share()
        self.assertEqual((await self.report(0, CAPPED))["concurrentNow"], 2)
        self.assertEqual((await self.report(1, FREE))["concurrentNow"], 1)

    async def test_closed_app_unshared(self) -> None:
        """
        When a node's last connection of an app closes, its next round
        removes its share of the app.
        """
        await self.start_nodes()
        await self.admit(1, FREE, 2)
        await self.share()
        meter, usage, _ = self.nodes[1]
        meter.release_connection("free")
        meter.release_connection("free")
        await self.share()
        self.assertEqual(await usage.client.execute("HGETALL", "mrt:free:live"), [])
        self.assertEqual((await self.report(0))["concurrentNow"], 0)

    async def test_dead_node_forgotten(self) -> None:
        """
        A node without a lease does not count, and its share is removed.
        """
        await self.start_nodes()
        await self.admit(0, FREE)
        await self.admit(1, FREE, 3)
        await self.share()
        client = self.nodes[0][1].client
        await client.execute("DEL", f"mrt:lease:{self.nodes[1][1].node.node_id}")
        self.assertEqual((await self.report(0))["concurrentNow"], 1)
        self.assertEqual(await client.execute("HKEYS", "mrt:free:live"), [self.nodes[0][1].node.node_id.encode()])

    async def test_peak_sampled_across_nodes(self) -> None:
        """
        The peak is the largest cluster-wide sum a round sampled; it stays
        after the connections close and is flushed into the store.
        """
        await self.start_nodes()
        await self.admit(0, FREE, 2)
        await self.admit(1, FREE, 3)
        await self.share()
        for _ in range(3):
            self.nodes[1][0].release_connection("free")
        await self.share()
        report = await self.report(0)
        self.assertEqual((report["concurrentNow"], report["peakConcurrent"]), (2, 5))
        meter, usage, _ = self.nodes[0]
        await meter.flush()
        row = await usage._store.load("free", NOV)
        assert row is not None
        self.assertEqual(row.peak_concurrent, 5)

    async def test_peak_in_redis_is_per_period(self) -> None:
        """
        The sampled peak is kept per period, and expires after it.
        """
        await self.start_nodes()
        await self.admit(0, FREE, 2)
        await self.share()
        client = self.nodes[0][1].client
        self.assertEqual(await client.execute("GET", f"mrt:free:pk:{NOV}"), b"2")
        ttl = await client.execute("TTL", f"mrt:free:pk:{NOV}")
        self.assertGreater(ttl, DEC - MID_NOVEMBER)

    async def test_messages_from_store_and_unwritten(self) -> None:
        """
        Messages are what the store holds plus what the reporting node has
        not written: another node's appear once it flushes, none twice.
        """
        await self.start_nodes()
        (one, _, _), (two, _, _) = self.nodes[0], self.nodes[1]
        for _ in range(4):
            await one.count_message(FREE)
        for _ in range(3):
            await two.count_message(FREE)
        self.assertEqual([(await self.report(i))["messagesUsed"] for i in (0, 1)], [4, 3])
        await two.flush()
        self.assertEqual([(await self.report(i))["messagesUsed"] for i in (0, 1)], [7, 3])
        await one.flush()
        self.assertEqual([(await self.report(i))["messagesUsed"] for i in (0, 1)], [7, 7])

    async def test_overage_from_store_and_unwritten(self) -> None:
        """
        Overage counts add up over nodes as messages do.
        """
        await self.start_nodes()
        plan = Plan(
            name="PAID",
            max_messages_per_period=1,
            overages_allowed=True,
            overage_rate_per_1000_messages=1.0,
            balance=100.0,
        )
        app = App("paid", plan)
        (one, _, _), (two, _, _) = self.nodes[0], self.nodes[1]
        for _ in range(3):
            await one.count_message(app)
        for _ in range(2):
            await two.count_message(app)
        await two.flush()
        report = await self.report(0, app)
        self.assertEqual((report["messagesUsed"], report["overageMessages"]), (5, 3))

    async def test_redis_unavailable(self) -> None:
        """
        Without Redis a report fails (503 for REST), a share round logs
        and carries on, and the next round after Redis is back shares the
        apps still served and removes those gone meanwhile.
        """
        await self.start_nodes()
        await self.admit(0, FREE)
        await self.admit(0, CAPPED)
        await self.share(0)
        await self.redis.stop()
        with self.assertRaises(RedisUnavailable):
            await self.report(0)
        self.nodes[0][0].release_connection("capped")
        await self.share(0)  # fails, logged, no exception
        await self.redis.restart()
        client = self.nodes[0][1].client
        # Both nodes' connections come back on their own, in any order.
        await _within(5, lambda: all(usage.client.connected for _, usage, _ in self.nodes))
        await client.execute("SET", f"mrt:lease:{self.nodes[0][1].node.node_id}", "1", "PX", 60_000)
        await client.execute("HSET", "mrt:capped:live", self.nodes[0][1].node.node_id, "1")
        await self.share(0)
        self.assertEqual((await self.report(1, FREE))["concurrentNow"], 1)
        self.assertEqual(await client.execute("HGETALL", "mrt:capped:live"), [])

    async def test_loop(self) -> None:
        """
        Started, the service shares every L{SHARE_INTERVAL}; stopped, it
        leaves no timer behind.
        """
        await self.start_nodes()
        await self.admit(1, FREE, 2)
        shares = self.nodes[1][2]
        timers = len(self.clock.getDelayedCalls())
        shares.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), timers + 1)
        self.clock.advance(SHARE_INTERVAL)

        async def shared() -> bool:
            return (await self.report(0))["concurrentNow"] == 2

        await _within(5, shared)
        shares.stopService()
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)


async def _within(seconds: float, check: Callable[[], Awaitable[bool] | bool]) -> None:
    """
    Poll C{check} on the real reactor until it is true; fail after
    C{seconds}.
    """
    deadline = reactor.seconds() + seconds
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {seconds}s")
        await deferLater(reactor, 0.05, lambda: None)
