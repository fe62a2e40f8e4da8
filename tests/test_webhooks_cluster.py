"""
Presence webhooks across cluster nodes: two nodes' L{RedisPresence}s on one
real C{redis-server}, each telling its own L{WebhookEmitter} over shared
L{RedisMarks}, both writing to one outbox (as the nodes of a cluster share
one in PostgreSQL). The emitters' timers run on a L{Clock}; Redis answers
in real time.

What a backend is sent: one C{peer.online} for a peer's first connection
anywhere and one C{peer.offline} after its last one anywhere (none while a
connection remains on another node, none for a reconnect on another node
inside the grace), also when the node holding it dies (reaped) or dies
during the grace, or dies between claiming the offline and storing it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from meteredrt.apps import WebhookConfig
from meteredrt.clusterwire import ClusterNode
from meteredrt.lease import NodeLease
from meteredrt.presence.redis import RedisPresence
from meteredrt.redisclient import RedisClient, parse_redis_url
from meteredrt.webhooks.emitter import WebhookEmitter
from meteredrt.webhooks.events import PEER_OFFLINE, WebhookEvent
from meteredrt.webhooks.outbox import MemoryOutbox, OnlineMark
from meteredrt.webhooks.redismarks import RedisMarks
from tests.servers import RedisServer

GRACE = 3.0
CONFIG = WebhookConfig(url="http://127.0.0.1:1/hooks", secret="s" * 32, offline_grace_seconds=GRACE)
#: How often each node sweeps the shared marks.
SWEEP = 1.0
CLAIM = 30.0


class DiesBeforeStoringOffline(MemoryOutbox):
    """
    The outbox as a node sees it that dies after claiming a C{peer.offline}
    and before its write commits: that write never fires.
    """

    def __init__(self, shared: MemoryOutbox) -> None:
        super().__init__()
        self._shared = shared
        self.lost: list[WebhookEvent] = []

    def append(self, events: Sequence[WebhookEvent], marks: Sequence[OnlineMark]) -> Deferred[None]:
        if any(event.type == PEER_OFFLINE for event in events):
            self.lost.extend(events)
            return Deferred()
        return self._shared.append(events, marks)


class Node:
    """
    One node: its Redis connection, presence, marks and emitter.
    """

    def __init__(
        self, case: TestCase, server: RedisServer, name: str, clock: Clock, outbox: MemoryOutbox, sweep: float
    ) -> None:
        self.identity = ClusterNode(name)
        self.client = RedisClient(reactor, parse_redis_url(server.url), timeout=5.0)
        self.emitter = WebhookEmitter(
            {"app": CONFIG}.get,
            outbox,
            clock,
            on_stored=lambda app_id: None,
            marks=RedisMarks(self.client, claim_seconds=CLAIM),
            sweep_seconds=sweep,
        )
        self.presence = RedisPresence(self.client, self.identity, observer=self.emitter)
        self.lease = NodeLease(clock, self.client, self.presence, self.identity, 1.0)
        #: False when its outbox writes may never finish (it is dying).
        self.writes_finish = True
        case.addCleanup(self.stop)

    async def start(self) -> None:
        self.client.startService()
        await self.client.ready
        self.emitter.startService()
        await self.emitter.loaded

    async def stop(self) -> None:
        """
        Crash: stop the emitter's timers without waiting for its writes
        and drop the Redis connection. What it has not claimed, or claimed
        and not confirmed, stays in Redis.
        """
        if self.emitter.running:
            self.emitter.stopService()
        if self.client.running:
            await maybeDeferred(self.client.stopService)

    async def connect(self, peer: str, conn: str) -> None:
        await self.presence.add_connection("app", peer, conn)

    async def close(self, peer: str, conn: str) -> None:
        await self.presence.remove_connection("app", peer, conn)


class ClusterWebhookTests(TestCase):
    """
    Two nodes, one Redis, one outbox.
    """

    async def cluster(
        self, outbox_of_one: Callable[[MemoryOutbox], MemoryOutbox] | None = None, sweep_of_two: float = SWEEP
    ) -> tuple[Node, Node]:
        """
        Two started nodes writing to C{self.outbox}, node one through
        C{outbox_of_one} of it if given.
        """
        self.server = await RedisServer.start(self)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.outbox = MemoryOutbox()
        seen_by_one = self.outbox if outbox_of_one is None else outbox_of_one(self.outbox)
        self.one = Node(self, self.server, "one", self.clock, seen_by_one, SWEEP)
        self.two = Node(self, self.server, "two", self.clock, self.outbox, sweep_of_two)
        await self.one.start()
        await self.two.start()
        return self.one, self.two

    async def settle(self) -> None:
        """
        Let every round trip started so far, and what it starts in turn
        (storing, confirming, what follows a confirmation), finish.
        """
        for _ in range(4):
            for node in (self.one, self.two):
                if node.client.running:
                    await node.client.execute("PING")
                    if node.writes_finish:
                        await node.emitter.flushed()

    async def advance(self, seconds: float) -> None:
        """
        Move the nodes' clock in small steps, letting each step's sweeps
        finish, as time passing would.
        """
        steps = max(1, int(seconds / 0.5))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            await self.settle()

    def sent(self) -> list[tuple[str, str | None, str | None]]:
        batch = self.successResultOf(self.outbox.next_batch("app", 1000))
        return [(s.event.type, s.event.peer_id, s.event.channel) for s in batch]

    async def test_connections_on_two_nodes(self) -> None:
        """
        A peer connected on both nodes is online once; closing one node's
        connection sends nothing; closing the last sends one offline after
        the grace, stamped at its end, though both nodes sweep.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await two.connect("alice", "b1")
        await self.settle()
        self.assertEqual(self.sent(), [("peer.online", "alice", None)])
        await one.close("alice", "a1")
        await self.advance(2 * GRACE)
        self.assertEqual(self.sent(), [("peer.online", "alice", None)])
        closed = self.clock.seconds()
        await two.close("alice", "b1")
        await self.advance(GRACE - 0.5)
        self.assertEqual(len(self.sent()), 1)
        await self.advance(2 * SWEEP)
        await self.advance(3 * GRACE)
        self.assertEqual(self.sent(), [("peer.online", "alice", None), ("peer.offline", "alice", None)])
        batch = self.successResultOf(self.outbox.next_batch("app", 10))
        self.assertEqual(batch[1].event.timestamp_ms, int((closed + GRACE) * 1000))
        self.assertEqual(self.successResultOf(self.outbox.online_marks()), [])

    async def test_reconnect_on_other_node_inside_grace(self) -> None:
        """
        A peer whose last connection closes on one node and that reconnects
        on the other inside the grace sends nothing more, ever.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await one.close("alice", "a1")
        await self.advance(GRACE - 1)
        await two.connect("alice", "b1")
        await self.advance(3 * GRACE)
        self.assertEqual(self.sent(), [("peer.online", "alice", None)])

    async def test_reconnect_after_grace(self) -> None:
        """
        Reconnecting on the other node after the grace is a new online,
        after the offline.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await one.close("alice", "a1")
        await self.advance(GRACE + 2 * SWEEP)
        await two.connect("alice", "b1")
        await self.settle()
        self.assertEqual([t for t, _, _ in self.sent()], ["peer.online", "peer.offline", "peer.online"])

    async def test_channel_across_nodes(self) -> None:
        """
        A channel with members on both nodes is occupied once and vacated
        once, after its last member anywhere left and the grace passed;
        every join and leave is mirrored once.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await two.connect("bob", "b1")
        await one.presence.add_member("app", "room", "alice", "a1", {"n": 1}, snapshot=False)
        await self.settle()
        await two.presence.add_member("app", "room", "bob", "b1", None, snapshot=False)
        await self.settle()
        await one.presence.remove_member("app", "room", "alice", "a1")
        await self.advance(2 * GRACE)
        self.assertNotIn(("channel.vacated", None, "room"), self.sent())
        await two.presence.remove_member("app", "room", "bob", "b1")
        await self.advance(GRACE + 2 * SWEEP)
        rooms = [entry for entry in self.sent() if entry[2] == "room"]
        self.assertEqual(
            rooms,
            [
                ("channel.occupied", None, "room"),
                ("presence.joined", "alice", "room"),
                ("presence.joined", "bob", "room"),
                ("presence.left", "alice", "room"),
                ("presence.left", "bob", "room"),
                ("channel.vacated", None, "room"),
            ],
        )

    async def test_reaped_node(self) -> None:
        """
        A node that dies holding connections is reaped by the other, which
        sends one offline per peer whose last connection was there (after
        the grace) and a vacated per channel whose last member was there,
        and nothing for a peer or channel also held by the survivor.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await one.connect("bob", "a2")
        await two.connect("bob", "b1")
        await one.presence.add_member("app", "room", "alice", "a1", None, snapshot=False)
        await one.presence.add_member("app", "hall", "bob", "a2", None, snapshot=False)
        await two.presence.add_member("app", "hall", "bob", "b1", None, snapshot=False)
        await self.settle()
        await one.stop()
        # Node one never took a lease: the survivor's renewal finds it dead.
        await two.lease.tick()
        await self.advance(GRACE + 2 * SWEEP)
        await self.advance(3 * GRACE)
        sent = self.sent()
        self.assertEqual(sent.count(("peer.offline", "alice", None)), 1)
        self.assertNotIn(("peer.offline", "bob", None), sent)
        self.assertEqual(sent.count(("channel.vacated", None, "room")), 1)
        self.assertNotIn(("channel.vacated", None, "hall"), sent)
        self.assertEqual(sent.count(("presence.left", "alice", "room")), 1)
        # Another renewal finds nothing more to reap, and nothing more is sent.
        await two.lease.tick()
        await self.advance(GRACE + 2 * SWEEP)
        self.assertEqual(self.sent(), sent)

    async def test_fenced_node_back_inside_grace(self) -> None:
        """
        A node reaped while alive (cut off) that registers its connections
        again inside the grace sends nothing: the reap's offline is
        cancelled by the resynchronization's reconnect.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await self.settle()
        await two.lease.tick()
        await self.advance(GRACE - 1)
        await one.presence.resync()
        await self.advance(3 * GRACE)
        self.assertEqual(self.sent(), [("peer.online", "alice", None)])

    async def test_fenced_node_back_after_grace(self) -> None:
        """
        A node reaped while alive that registers its connections again
        after the grace: the reap's offline went out, and the
        resynchronization's reconnect is a new online.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await self.settle()
        await two.lease.tick()
        await self.advance(GRACE + 2 * SWEEP)
        await one.presence.resync()
        await self.settle()
        self.assertEqual([t for t, _, _ in self.sent()], ["peer.online", "peer.offline", "peer.online"])

    async def test_redis_restarted_empty(self) -> None:
        """
        Redis restarting empty forgets the marks: after the nodes register
        their connections again and reload the outbox's marks, a peer that
        left meanwhile is announced offline once, and one still connected
        is announced online a second time, never offline.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await one.connect("bob", "a2")
        await self.settle()
        await self.server.command("FLUSHALL")
        await one.close("bob", "a2")
        await one.presence.resync()
        await one.emitter.recover(2 * GRACE)
        await self.settle()
        await self.advance(GRACE + SWEEP)
        self.assertNotIn(("peer.offline", "bob", None), self.sent())
        await self.advance(GRACE + 2 * SWEEP)
        await self.advance(3 * GRACE)
        self.assertEqual(
            self.sent(),
            [("peer.online", "alice", None), ("peer.online", "bob", None), ("peer.online", "alice", None),
             ("peer.offline", "bob", None)],
        )

    async def test_node_dies_during_grace(self) -> None:
        """
        The node where a peer's last connection closed dies during the
        grace: the other node's sweep sends the offline, once.
        """
        one, two = await self.cluster()
        await one.connect("alice", "a1")
        await one.close("alice", "a1")
        await self.settle()
        await one.stop()
        await self.advance(GRACE + 2 * SWEEP)
        await self.advance(3 * GRACE)
        self.assertEqual(self.sent(), [("peer.online", "alice", None), ("peer.offline", "alice", None)])

    async def test_node_dies_between_claim_and_store(self) -> None:
        """
        A node that claimed an offline and died before storing it loses
        nothing: after the claim time another node's sweep stores the same
        event, with the same id, once.
        """
        # Node two sweeps only every claim time: node one claims the offline.
        one, two = await self.cluster(outbox_of_one=DiesBeforeStoringOffline, sweep_of_two=CLAIM)
        dying = one.emitter._outbox
        assert isinstance(dying, DiesBeforeStoringOffline)
        one.writes_finish = False
        await one.connect("alice", "a1")
        await one.close("alice", "a1")
        await self.advance(GRACE + SWEEP)
        [lost] = dying.lost
        await one.stop()
        await self.advance(CLAIM)
        await self.advance(3 * CLAIM)
        batch = self.successResultOf(self.outbox.next_batch("app", 10))
        self.assertEqual([s.event for s in batch][1:], [lost])
        self.assertEqual(self.sent(), [("peer.online", "alice", None), ("peer.offline", "alice", None)])

    async def test_presence_reports_transitions_once(self) -> None:
        """
        Each node's presence tells its own observer only of the
        transitions its steps made: the first connection anywhere, the
        last one gone.
        """
        one, two = await self.cluster()
        heard: list[tuple[str, Any]] = []

        class Recorder:
            def __init__(self, name: str) -> None:
                self.name = name

            def __getattr__(self, event: str) -> Any:
                return lambda *args: heard.append((self.name, (event, *args)))

        one.presence._observer = Recorder("one")  # type: ignore[assignment]
        two.presence._observer = Recorder("two")  # type: ignore[assignment]
        await one.connect("alice", "a1")
        await two.connect("alice", "b1")
        await one.close("alice", "a1")
        await two.close("alice", "b1")
        self.assertEqual(
            heard, [("one", ("peer_connected", "app", "alice")), ("two", ("peer_disconnected", "app", "alice"))]
        )
