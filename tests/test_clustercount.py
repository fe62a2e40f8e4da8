"""
Tests for L{meteredrt.clustercount} and the L{Meter}'s cluster-wide
connection admission: the decision from a fake count in memory, then the
count itself on a real C{redis-server}, several meters on one Redis
standing for several nodes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt import redisscripts
from meteredrt.apps import App, Plan
from meteredrt.clustercount import ClusterConnectionCount, ConnectionCountUnavailable
from meteredrt.clusterwire import EVERYONE, ClusterNode
from meteredrt.lease import NodeLease
from meteredrt.metering import Meter
from meteredrt.presence.redis import RedisPresence
from meteredrt.redisclient import RedisClient, parse_redis_url
from meteredrt.usagestore import UsageStore
from tests.servers import LoopbackProxy, RedisServer
from tests.test_metering import OVERAGE, overage

LEASE = 1.0
CAP3 = Plan(name="CAP3", max_concurrent_connections=3)


class FakeCount:
    """
    A cluster-wide count held in this object: C{total} connections
    elsewhere in the cluster; admits as L{redisscripts.ADMIT} does.
    """

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.admits: list[tuple[str, int, bool]] = []
        self.released: list[str] = []
        self.failure: Exception | None = None

    def admit(self, app_id: str, cap: int, over_cap: bool) -> Deferred[tuple[bool, int]]:
        self.admits.append((app_id, cap, over_cap))
        if self.failure is not None:
            return fail(self.failure)
        before = self.total
        counted = before < cap or over_cap
        if counted:
            self.total += 1
        return succeed((counted, before))

    def release(self, app_id: str) -> bool:
        self.released.append(app_id)
        self.total -= 1
        return True


class DecisionTests(SynchronousTestCase):
    """
    The meter decides on the cluster-wide count exactly as it decides on
    its own count alone.
    """

    def meter(self, count: FakeCount) -> Meter:
        return Meter(Clock(), UsageStore(self.mktemp(), MemoryReactorClock()), cluster=count)  # type: ignore[arg-type]

    def admit(self, meter: Meter, app: App) -> bool:
        return self.successResultOf(meter.admit_connection(app))

    def test_uncapped_apps_ask_nobody(self) -> None:
        """
        An app without a plan, or without a connection cap, is admitted
        without any cluster call.
        """
        count = FakeCount(total=1000)
        meter = self.meter(count)
        self.assertTrue(self.admit(meter, App("free")))
        self.assertTrue(self.admit(meter, App("open", Plan(max_concurrent_connections=None))))
        self.assertEqual(count.admits, [])

    def test_under_cluster_cap_admitted(self) -> None:
        """
        Fewer than the cap live across the cluster: admitted, counted.
        """
        count = FakeCount(total=2)
        meter = self.meter(count)
        self.assertTrue(self.admit(meter, App("a", CAP3)))
        self.assertEqual(count.admits, [("a", 3, False)])
        self.assertEqual(count.total, 3)

    def test_at_cluster_cap_refused(self) -> None:
        """
        The cap reached on other nodes refuses the first connection here.
        """
        count = FakeCount(total=3)
        meter = self.meter(count)
        self.assertFalse(self.admit(meter, App("a", CAP3)))
        self.assertEqual(count.total, 3)
        usage = self.successResultOf(meter.usage(App("a", CAP3)))
        self.assertEqual(usage["concurrentNow"], 0)

    def test_overage_over_cluster_cap(self) -> None:
        """
        With overage on and a balance to pay, a connection over the
        cluster-wide cap is admitted as overage and billed once.
        """
        app = App("a", overage(balance=5.0))
        count = FakeCount(total=1)
        meter = self.meter(count)
        self.assertTrue(self.admit(meter, app))
        self.assertEqual(count.admits, [("a", OVERAGE.max_concurrent_connections, True)])
        usage = self.successResultOf(meter.usage(app))
        self.assertEqual(usage["overageConnections"], 1)
        self.assertEqual(meter.balance(app), 4.0)

    def test_overage_without_balance_refused(self) -> None:
        """
        Overage on but no money: not counted in the cluster, refused.
        """
        app = App("a", overage(balance=0.0))
        count = FakeCount(total=1)
        meter = self.meter(count)
        self.assertFalse(self.admit(meter, app))
        self.assertEqual(count.admits, [("a", 1, False)])
        self.assertEqual(count.total, 1)

    def test_release(self) -> None:
        """
        Closing a counted connection releases it in the cluster.
        """
        count = FakeCount()
        meter = self.meter(count)
        self.assertTrue(self.admit(meter, App("a", CAP3)))
        meter.release_connection("a")
        self.assertEqual(count.released, ["a"])
        self.assertEqual(count.total, 0)

    def test_unavailable(self) -> None:
        """
        When the count cannot be had, admission fails with
        L{ConnectionCountUnavailable} (closed 1011), counting nothing.
        """
        count = FakeCount()
        count.failure = ConnectionCountUnavailable("Redis down")
        meter = self.meter(count)
        self.failureResultOf(meter.admit_connection(App("a", CAP3)), ConnectionCountUnavailable)
        self.assertEqual(self.successResultOf(meter.usage(App("a", CAP3)))["concurrentNow"], 0)

    def test_single_node_unchanged(self) -> None:
        """
        Without a cluster count, the meter decides from its own count.
        """
        meter = Meter(Clock(), UsageStore(self.mktemp(), MemoryReactorClock()))
        app = App("a", CAP3)
        self.assertEqual([self.admit(meter, app) for _ in range(4)], [True, True, True, False])


class RedisCountTests(TestCase):
    """
    L{ClusterConnectionCount} on a real Redis: two meters on one Redis are
    two nodes.
    """

    async def nodes(self, n: int = 2) -> tuple[RedisServer, list[tuple[Meter, ClusterConnectionCount]]]:
        server = await RedisServer.start(self)
        nodes = []
        for i in range(n):
            client = RedisClient(reactor, parse_redis_url(server.url), timeout=2.0)
            client.startService()
            self.addCleanup(client.stopService)
            await client.ready
            count = ClusterConnectionCount(client, ClusterNode(f"node{i}"))
            nodes.append((Meter(Clock(), UsageStore(self.mktemp(), MemoryReactorClock()), cluster=count), count))
        return server, nodes

    async def admitted(self, meter: Meter, app: App) -> bool:
        return await meter.admit_connection(app)

    async def test_cap_across_nodes(self) -> None:
        """
        Cap 3: three connections over two nodes are admitted, the 4th is
        refused on either node; a release frees one slot for any node.
        """
        _, [(one, _), (two, _)] = await self.nodes()
        app = App("a", CAP3)
        results = [await self.admitted(m, app) for m in (one, two, one)]
        self.assertEqual(results, [True, True, True])
        self.assertFalse(await self.admitted(two, app))
        self.assertFalse(await self.admitted(one, app))
        one.release_connection("a")
        self.assertTrue(await self.admitted(two, app))
        self.assertFalse(await self.admitted(one, app))

    async def test_overage_across_nodes(self) -> None:
        """
        With overage paid, the connection over the cluster cap is admitted
        and billed on the node that admitted it.
        """
        _, [(one, _), (two, _)] = await self.nodes()
        app = App("a", overage(balance=1.0))
        self.assertTrue(await self.admitted(one, app))
        self.assertTrue(await self.admitted(two, app))
        self.assertEqual(two.balance(app), 0.0)
        self.assertFalse(await self.admitted(two, app))

    async def test_reaped_node_released(self) -> None:
        """
        The reaper script removes a dead node's share of every count.
        """
        server, [(one, first), (two, second)] = await self.nodes()
        app = App("a", CAP3)
        for _ in range(3):
            self.assertTrue(await self.admitted(one, app))
        self.assertFalse(await self.admitted(two, app))
        # node0 is a member without a lease: dead, as after kill -9.
        await second.client.execute("SADD", "mrt:nodes", first.node.node_id)
        apps, _ = await second.client.run(redisscripts.REAP, (), (first.node.node_id, second.node.prefix(EVERYONE)))
        self.assertEqual(apps, [])
        self.assertEqual([await self.admitted(two, app) for _ in range(4)], [True, True, True, False])

    async def test_recount_after_fence(self) -> None:
        """
        A node reaped while alive writes its live counts again.
        """
        server, [(one, first), (two, second)] = await self.nodes()
        app = App("a", CAP3)
        for _ in range(2):
            self.assertTrue(await self.admitted(one, app))
        await second.client.execute("SADD", "mrt:nodes", first.node.node_id)
        await second.client.run(redisscripts.REAP, (), (first.node.node_id, second.node.prefix(EVERYONE)))
        await first.recount()
        self.assertTrue(await self.admitted(two, app))
        self.assertFalse(await self.admitted(two, app))
        one.release_connection("a")
        one.release_connection("a")
        await first.recount()
        self.assertEqual(await second.client.execute("HGETALL", "mrt:a:cc"), [second.node.node_id.encode(), b"1"])

    async def test_redis_down(self) -> None:
        """
        Redis unreachable: a capped app's connection fails with
        L{ConnectionCountUnavailable}; an uncapped app's is admitted.
        """
        server, [(one, first), _] = await self.nodes()
        await first.client.stopService()
        failure: Any = None
        try:
            await one.admit_connection(App("a", CAP3))
        except ConnectionCountUnavailable as e:
            failure = e
        self.assertIsInstance(failure, ConnectionCountUnavailable)
        self.assertEqual(first.counted, {})
        self.assertTrue(await one.admit_connection(App("b")))


class LeaseRecountTests(TestCase):
    """
    L{NodeLease} writes a fenced node's counts again.
    """

    async def nodes(
        self, lease_seconds: float = LEASE, proxied: bool = False
    ) -> tuple[RedisServer, list[NodeLease], list[ClusterConnectionCount], list[Meter]]:
        """
        Two nodes with leases on one new Redis; the first through a
        L{LoopbackProxy} (C{self.proxy}) if C{proxied}.
        """
        server = await RedisServer.start(self)
        leases, counts, meters = [], [], []
        for name in ("one", "two"):
            url = server.url
            if proxied and name == "one":
                self.proxy = await LoopbackProxy.start(self, server.port)
                url = f"redis://127.0.0.1:{self.proxy.port}/0"
            client = RedisClient(reactor, parse_redis_url(url), timeout=2.0)
            node = ClusterNode(name)
            count = ClusterConnectionCount(client, node)
            presence = RedisPresence(client, node)
            lease = NodeLease(reactor, client, presence, node, lease_seconds, recount=count.recount)
            client.startService()
            await client.ready
            lease.startService()
            self.addCleanup(client.stopService)
            self.addCleanup(lambda lease=lease: lease.stopService() if lease.running else None)
            leases.append(lease)
            counts.append(count)
            meters.append(Meter(Clock(), UsageStore(self.mktemp(), MemoryReactorClock()), cluster=count))
        return server, leases, counts, meters

    async def test_fenced_node_recounts(self) -> None:
        """
        A node that stops renewing is reaped (its share of the count goes)
        and, renewing again, finds itself fenced and counts its live
        connections again.
        """
        _, leases, counts, meters = await self.nodes()
        app = App("a", CAP3)
        for _ in range(3):
            self.assertTrue(await meters[0].admit_connection(app))
        self.assertFalse(await meters[1].admit_connection(app))
        leases[0]._loop.stop()  # frozen: it stops renewing, nothing else
        await eventually(self, lambda: counts[1].client.execute("HLEN", "mrt:a:cc"), 0, 3 * LEASE + 2)
        self.assertTrue(await meters[1].admit_connection(app))
        await leases[0].tick()
        self.assertEqual(await counts[1].client.execute("HGET", "mrt:a:cc", counts[0].node.node_id), b"3")
        self.assertFalse(await meters[1].admit_connection(app))

    async def test_redis_restarted_empty(self) -> None:
        """
        While Redis is down a capped app's connection is refused as
        unavailable and a release cannot be sent; when Redis comes back
        empty, every node writes its live counts again, the release made
        meanwhile included.
        """
        server, _, counts, meters = await self.nodes()
        app = App("a", CAP3)
        for meter in (meters[0], meters[0], meters[1]):
            self.assertTrue(await meter.admit_connection(app))
        await server.kill()
        await eventually(self, lambda: succeed(counts[0].client.connected or counts[1].client.connected), False, 3)
        try:
            await meters[1].admit_connection(app)
            self.fail("admitted while Redis is down")
        except ConnectionCountUnavailable:
            pass
        meters[0].release_connection("a")
        await server.restart()

        def held() -> Deferred[Any]:
            if not counts[1].client.connected:
                return succeed(None)
            return counts[1].client.execute("HGETALL", "mrt:a:cc").addErrback(lambda _: None)

        expected = sorted([counts[0].node.node_id.encode(), b"1", counts[1].node.node_id.encode(), b"1"])
        await eventually(self, lambda: held().addCallback(lambda got: sorted(got) if got else got), expected, 10)
        self.assertTrue(await meters[1].admit_connection(app))
        self.assertFalse(await meters[0].admit_connection(app))

    async def test_release_lost_in_outage_recounted(self) -> None:
        """
        A release sent while the node is cut off from Redis (which keeps
        its data) is made good when the node reconnects, within its lease.
        """
        _, _, counts, meters = await self.nodes(lease_seconds=30, proxied=True)
        app = App("a", CAP3)
        for meter in (meters[0], meters[0], meters[1]):
            self.assertTrue(await meter.admit_connection(app))
        await self.proxy.cut()
        await eventually(self, lambda: succeed(counts[0].client.connected), False, 3)
        meters[0].release_connection("a")
        self.assertEqual(await counts[1].client.execute("HGET", "mrt:a:cc", counts[0].node.node_id), b"2")
        await self.proxy.restore()
        await eventually(
            self, lambda: counts[1].client.execute("HGET", "mrt:a:cc", counts[0].node.node_id), b"1", 10
        )
        self.assertTrue(await meters[1].admit_connection(app))


async def eventually(case: TestCase, ask: Any, expected: Any, patience: float) -> None:
    """
    Wait until C{ask()} fires with C{expected}, for at most C{patience} s.
    """
    deadline = reactor.seconds() + patience
    while (got := await ask()) != expected:
        if reactor.seconds() > deadline:
            case.fail(f"still {got!r}, not {expected!r}, after {patience} s")
        await deferLater(reactor, 0.05, lambda: None)
