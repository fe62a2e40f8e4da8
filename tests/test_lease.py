"""
Tests for L{meteredrt.lease} and the cluster's behaviour through faults,
on a real C{redis-server}: a dead node is reaped with exactly one C{left}
per peer that lost its last connection, a fenced node registers again, and
a Redis restarted empty is resynchronized.

Nodes are hubs with their own Redis connections in this process; a node
"dies" when its lease and Redis connections stop without its connections
closing, as after C{kill -9}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt import redisscripts
from meteredrt.apps import App
from meteredrt.broker.redis import RedisBroker
from meteredrt.clusterwire import ClusterNode
from meteredrt.hub import Hub, Session
from meteredrt.lease import NodeLease
from meteredrt.metering import Meter
from meteredrt.presence.redis import RedisPresence
from meteredrt.protocol import parse_frame
from meteredrt.redisclient import BACKOFF_CAP, RedisClient, RedisSubscriber, parse_redis_url
from meteredrt.testing import RecordingSink
from meteredrt.usagestore import UsageStore
from tests.servers import RedisServer
from tests.test_hub import make_grant

LEASE = 1.0


class Node:
    """
    One cluster node in this process: hub, broker, presence, lease.
    """

    def __init__(self, case: TestCase, server: RedisServer, name: str, apps: dict[str, App]) -> None:
        address = parse_redis_url(server.url)
        self.identity = ClusterNode(name)
        self.client = RedisClient(reactor, address, timeout=2.0)
        self.broker = RedisBroker(self.client, self.identity)
        self.subscriber = RedisSubscriber(reactor, address, self.broker.received, timeout=2.0)
        self.presence = RedisPresence(self.client, self.identity)
        self.reaped: list[dict[str, int]] = []
        self.lease = NodeLease(reactor, self.client, self.presence, self.identity, LEASE, self.reaped.append)
        meter = Meter(Clock(), UsageStore(case.mktemp(), MemoryReactorClock()))
        self.hub = Hub(self.broker, self.presence, meter, apps.get, node_id=self.identity.node_id)
        self.lease.reconcile_after_outage(self.subscriber, self.hub.reconcile_presence)
        self.services = [self.client, self.subscriber, self.lease]
        for service in self.services:
            case.addCleanup(self._stop, service)

    @staticmethod
    async def _stop(service: Any) -> None:
        if service.running:
            await maybeDeferred(service.stopService)

    async def start(self) -> None:
        self.client.startService()
        self.subscriber.startService()
        await self.client.ready
        await self.subscriber.ready
        await self.broker.start(self.subscriber)
        self.lease.startService()

    async def die(self) -> None:
        """
        Stop cleanly (the lease retires) without closing connections.
        """
        for service in reversed(self.services):
            await self._stop(service)

    async def crash(self) -> None:
        """
        Stop renewing and drop the Redis connections at once, closing
        nothing and retiring nothing, as C{kill -9} does.
        """
        self.lease._loop.stop()
        self.lease.running = False
        for service in (self.subscriber, self.client):
            await self._stop(service)

    async def connect(self, peer_id: str) -> tuple[Session, RecordingSink]:
        session = await self.hub.connect(RecordingSink, make_grant(peer_id))
        assert isinstance(session.sink, RecordingSink)
        return session, session.sink

    async def request(self, session: Session, **frame: Any) -> None:
        await self.hub.handle(session, parse_frame(json.dumps(frame)))


async def eventually(case: TestCase, check: Callable[[], bool], patience: float) -> None:
    deadline = reactor.seconds() + patience
    while not check():
        if reactor.seconds() > deadline:
            case.fail(f"condition not met within {patience} s")
        await deferLater(reactor, 0.02, lambda: None)


def deltas(sink: RecordingSink) -> list[tuple[list[str], list[str]]]:
    return [
        ([e["peerId"] for e in f["joined"]], [e["peerId"] for e in f["left"]])
        for f in sink.of_type("presence")
        if f["joined"] or f["left"]
    ]


class ReaperTests(TestCase):
    """
    Node leases on a real Redis.
    """

    async def cluster(self) -> tuple[RedisServer, Node, Node]:
        self.apps = {"app_1": App("app_1")}
        server = await RedisServer.start(self)
        one, two = Node(self, server, "one", self.apps), Node(self, server, "two", self.apps)
        await one.start()
        await two.start()
        return server, one, two

    async def test_dead_node_reaped(self) -> None:
        """
        A node that dies without closing its connections is reaped within
        3 x lease: the survivors hear exactly one C{left} per peer that
        lost its last connection, the registry forgets it, a peer also
        connected elsewhere stays, and the dead node's connections are
        reported per app for release.
        """
        _, one, two = await self.cluster()
        watcher, seen = await two.connect("w")
        await two.request(watcher, type="subscribe", channel="room")
        for peer in ("gone", "both"):
            session, _ = await one.connect(peer)
            await one.request(session, type="subscribe", channel="room")
            await one.request(session, type="subscribe", channel="hall")
        staying, _ = await two.connect("both")
        await two.request(staying, type="subscribe", channel="room")
        await eventually(self, lambda: len(deltas(seen)) == 2, 5)
        died = reactor.seconds()
        await one.crash()
        await eventually(self, lambda: bool(two.reaped), 3 * LEASE + 1)
        self.assertLess(reactor.seconds() - died, 3 * LEASE)
        await eventually(self, lambda: len(deltas(seen)) == 3, 2)
        await deferLater(reactor, LEASE, lambda: None)  # no late duplicate
        self.assertEqual(deltas(seen), [(["gone"], []), (["both"], []), ([], ["gone"])])
        self.assertEqual(two.reaped, [{"app_1": 2}])
        self.assertEqual([m.peer_id for m in await two.hub.members("app_1", "room")], ["w", "both"])
        self.assertEqual(await two.hub.members("app_1", "hall"), [])
        self.assertEqual(await two.hub.kick("app_1", "gone"), 0)
        self.assertEqual(await two.presence.connections_of("app_1", "both"), frozenset({staying.conn_id}))

    async def test_clean_stop_retires(self) -> None:
        """
        A node that stops cleanly gives up its lease and reaps itself:
        what it left registered leaves at once, long before its lease
        would have lapsed, and it is no longer a cluster member.
        """
        server, one, two = await self.cluster()
        watcher, seen = await two.connect("w")
        await two.request(watcher, type="subscribe", channel="room")
        left_behind, _ = await one.connect("x")
        await one.request(left_behind, type="subscribe", channel="room")
        await eventually(self, lambda: deltas(seen) == [(["x"], [])], 2)
        stopped = reactor.seconds()
        await one.die()
        await eventually(self, lambda: deltas(seen) == [(["x"], []), ([], ["x"])], 2)
        self.assertLess(reactor.seconds() - stopped, LEASE / 2)
        self.assertEqual(await server.command("SMEMBERS", "mrt:nodes"), [two.identity.origin])
        self.assertEqual(two.reaped, [])

    async def test_fenced_node_registers_again(self) -> None:
        """
        A node that stops renewing (frozen, cut off) long enough is reaped;
        when it renews again it finds itself fenced and registers its live
        connections again, which the others see join again.
        """
        _, one, two = await self.cluster()
        watcher, seen = await two.connect("w")
        await two.request(watcher, type="subscribe", channel="room")
        frozen, _ = await one.connect("f")
        await one.request(frozen, type="subscribe", channel="room")
        one.lease._loop.stop()  # frozen: it stops renewing, nothing else
        await eventually(self, lambda: bool(two.reaped), 3 * LEASE + 1)
        await eventually(self, lambda: deltas(seen) == [(["f"], []), ([], ["f"])], 2)
        await one.lease.tick()
        await eventually(self, lambda: len(deltas(seen)) == 3, 2)
        self.assertEqual(deltas(seen)[-1], (["f"], []))
        self.assertEqual([m.peer_id for m in await two.hub.members("app_1", "room")], ["w", "f"])
        self.assertEqual(await two.presence.connections_of("app_1", "f"), frozenset({frozen.conn_id}))
        # Routing to it works again.
        await two.request(watcher, type="send", to="f", data="back", requestId="d")
        self.assertEqual(watcher.sink.of_type("ack"), [{"type": "ack", "requestId": "d"}])  # type: ignore[attr-defined]

    async def test_redis_restarted_empty(self) -> None:
        """
        While Redis is down, local delivery goes on and publishes are acked;
        a send that needs another node answers C{backend_error}, never
        hangs. When Redis comes back empty, nodes resubscribe and register
        their connections and memberships again: presence and routing
        across nodes work as before, with no WebSocket closed.
        """
        server, one, two = await self.cluster()
        local, heard_local = await one.connect("l")
        await one.request(local, type="subscribe", channel="room")
        remote, heard_remote = await two.connect("r")
        await two.request(remote, type="subscribe", channel="room")
        sender, sent = await one.connect("s")
        leaving, _ = await one.connect("x")
        await one.request(leaving, type="subscribe", channel="room")
        quitting, quit_sink = await one.connect("y")
        await one.request(quitting, type="subscribe", channel="room")
        await eventually(self, lambda: deltas(heard_remote) == [(["l"], []), (["x"], []), (["y"], [])], 2)
        await server.kill()
        await eventually(self, lambda: not one.client.connected, 3)
        await one.hub.disconnect(leaving)  # its left cannot reach Redis now
        await one.request(quitting, type="unsubscribe", channel="room", requestId="u")
        self.assertEqual(quit_sink.decoded[-1], {"type": "ack", "requestId": "u"})  # done here
        await one.request(sender, type="publish", channel="room", data="during", requestId="p")
        await one.request(sender, type="send", to="r", data="x", requestId="d")
        await one.request(sender, type="send", to="l", data="near", requestId="d-local")
        self.assertEqual(heard_local.of_type("message")[-1]["data"], "during")
        self.assertEqual(heard_local.of_type("direct")[-1]["data"], "near")
        self.assertEqual([f.get("code") or f["type"] for f in sent.decoded], ["ack", "backend_error", "ack"])
        self.assertIn("Redis", sent.decoded[1]["message"])
        await server.restart()
        await eventually(self, lambda: one.client.connected and two.client.connected, 10)
        await eventually(self, lambda: one.subscriber.connected and two.subscriber.connected, 10)

        async def members() -> list[str]:
            return sorted(m.peer_id for m in await two.hub.members("app_1", "room"))

        for _ in range(200):
            if await members() == ["l", "r"]:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await members(), ["l", "r"])
        await one.request(sender, type="publish", channel="room", data="after", requestId="p2")
        await one.request(sender, type="send", to="r", data="y", requestId="d2")
        await eventually(self, lambda: bool(heard_remote.of_type("direct")), 3)
        await eventually(self, lambda: "after" in [m["data"] for m in heard_remote.of_type("message")], 3)
        self.assertEqual(heard_remote.of_type("direct")[-1]["data"], "y")
        self.assertEqual(heard_local.closes + heard_remote.closes, [])
        # Once every node could have reconnected (the backoff cap) and a
        # lease more, subscribers on both nodes hear the left they missed,
        # and nobody hears a joined twice.
        expected = [(["l"], []), (["x"], []), (["y"], []), ([], ["x", "y"])]  # the snapshot, then deltas
        await eventually(self, lambda: deltas(heard_remote) == expected, BACKOFF_CAP + LEASE + 2)
        await deferLater(reactor, LEASE, lambda: None)
        self.assertEqual(deltas(heard_remote), expected)
        self.assertEqual(deltas(heard_local), [(["r"], []), (["x"], []), (["y"], []), ([], ["x", "y"])])
        self.assertEqual(sorted(m.peer_id for m in await two.hub.members("app_1", "room")), ["l", "r"])


class _ScriptedClient:
    """
    Stands in for the Redis client in timing tests: answers every script
    with the next scripted reply and records the calls.
    """

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.connected = True
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.hooks: list[Callable[[], object]] = []
        self.replies: list[Any] = []

    def register(self, script: Any) -> Any:
        return script

    def on_reconnected(self, hook: Callable[[], object]) -> None:
        self.hooks.append(hook)

    def run(self, script: Any, keys: Any = (), args: Any = ()) -> Deferred[Any]:
        self.calls.append((script, tuple(args)))
        return succeed(self.replies.pop(0) if self.replies else [1, []])

    def execute(self, *args: Any) -> Deferred[Any]:
        self.calls.append(("execute", args))
        return succeed(1)


class _Subscriber:
    def __init__(self) -> None:
        self.hooks: list[Callable[[], object]] = []

    def on_reconnected(self, hook: Callable[[], object]) -> None:
        self.hooks.append(hook)


class LeaseTimingTests(SynchronousTestCase):
    """
    L{NodeLease}'s timers, on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = _ScriptedClient()
        self.presence = RedisPresence(self.client, ClusterNode("n", "x"))  # type: ignore[arg-type]
        self.lease = NodeLease(self.clock, self.client, self.presence, ClusterNode("n", "x"), 6.0)  # type: ignore[arg-type]

    def scripts(self) -> list[Any]:
        return [script for script, _ in self.client.calls]

    def test_renews_every_third(self) -> None:
        """
        The lease is taken as soon as Redis answers and renewed every
        lease / 3, for the lease's length in milliseconds; a stop retires
        it and leaves no timer.
        """
        self.lease.startService()
        self.assertEqual(self.scripts(), [])
        self.client.ready.callback(None)
        self.assertEqual(self.client.calls, [(redisscripts.TICK, ("n.x", 6000))])
        self.clock.advance(2.0)
        self.clock.advance(2.0)
        self.assertEqual(self.scripts(), [redisscripts.TICK] * 3)
        self.lease.stopService()
        self.assertEqual(self.scripts()[-2:], ["execute", redisscripts.REAP])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reaps_and_resyncs(self) -> None:
        """
        Each lapsed node is reaped, and the hook hears what it held; a
        fenced renewal resynchronizes.
        """
        reaped: list[dict[str, int]] = []
        self.lease._on_reaped = reaped.append
        self.client.replies = [[1, [b"dead.1"]], [[b"app_1", b"app_1", b"app_2"], []], [2, []], [0, []]]
        self.successResultOf(self.lease.tick())
        self.assertEqual(reaped, [{"app_1": 2, "app_2": 1}])
        self.successResultOf(self.lease.tick())
        self.assertEqual(self.scripts(), [redisscripts.TICK, redisscripts.REAP, redisscripts.TICK, redisscripts.RESYNC])

    def test_reconcile_after_outage(self) -> None:
        """
        The reconcile runs once, the longest reconnect delay plus a lease
        after the subscriber returns; a stop cancels it.
        """
        subscriber = _Subscriber()
        reconciled: list[bool] = []

        def reconcile() -> Deferred[None]:
            reconciled.append(True)
            return succeed(None)

        self.lease.reconcile_after_outage(subscriber, reconcile)  # type: ignore[arg-type]
        self.lease.startService()
        subscriber.hooks[0]()
        subscriber.hooks[0]()
        self.clock.advance(BACKOFF_CAP + 6.0 - 0.1)
        self.assertEqual(reconciled, [])
        self.clock.advance(0.1)
        self.assertEqual(reconciled, [True])
        subscriber.hooks[0]()
        self.lease.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
