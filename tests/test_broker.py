"""
One conformance suite for L{IBroker}, through hubs, run against the
in-memory broker (one node) and the Redis broker (two nodes in this process,
each with its own Redis connections, on a real C{redis-server}).

Each test asks for two nodes; with the memory broker both are the same hub,
so every guarantee stated here is one a single node already gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from meteredrt.apps import App
from meteredrt.broker.memory import MemoryBroker
from meteredrt.broker.redis import RedisBroker
from meteredrt.clusterwire import ClusterNode
from meteredrt.hub import Hub, Session
from meteredrt.interfaces import IBroker, IPresence
from meteredrt.metering import Meter
from meteredrt.presence.memory import MemoryPresence
from meteredrt.presence.redis import RedisPresence
from meteredrt.protocol import parse_frame
from meteredrt.redisclient import RedisClient, RedisSubscriber, parse_redis_url
from meteredrt.testing import RecordingSink
from meteredrt.usagestore import UsageStore
from tests.servers import RedisServer
from tests.test_hub import BLIND, make_grant

#: How long a test waits for a delivery that crosses Redis.
PATIENCE = 5.0


class BrokerTestsMixin:
    """
    Behaviour every broker gives, seen through two nodes' hubs.
    """

    apps: dict[str, App]

    async def make_nodes(self) -> tuple[Hub, Hub]:
        raise NotImplementedError

    async def settle(self) -> None:
        """
        Wait until what was sent has crossed to every node.
        """

    def meter(self) -> Meter:
        return Meter(Clock(), UsageStore(self.mktemp(), MemoryReactorClock()))  # type: ignore[attr-defined]

    async def setUpNodes(self) -> None:
        self.apps = {"app_1": App("app_1")}
        self.one, self.two = await self.make_nodes()

    async def connect(self, hub: Hub, peer_id: str, **kwargs: Any) -> tuple[Session, RecordingSink]:
        session = await hub.connect(RecordingSink, make_grant(peer_id, **kwargs))
        assert isinstance(session.sink, RecordingSink)
        return session, session.sink

    async def request(self, hub: Hub, session: Session, **frame: Any) -> None:
        await hub.handle(session, parse_frame(json.dumps(frame)))

    async def eventually(self, check: Callable[[], bool]) -> None:
        """
        Wait, boundedly, until C{check()} holds; fail if it never does.
        """
        deadline = reactor.seconds() + PATIENCE
        while not check():
            if reactor.seconds() > deadline:
                self.fail("condition not met in time")  # type: ignore[attr-defined]
            await deferLater(reactor, 0.01, lambda: None)

    async def test_interface(self) -> None:
        """
        The broker provides L{IBroker}, the presence L{IPresence}.
        """
        await self.setUpNodes()
        self.assertTrue(verifyObject(IBroker, self.one._broker))  # type: ignore[attr-defined]
        self.assertTrue(verifyObject(IPresence, self.one._presence))  # type: ignore[attr-defined]

    async def test_publish_crosses(self) -> None:
        """
        A publish on one node reaches a subscriber on the other, once, and
        not the publisher; any JSON crosses, lone surrogates included.
        """
        await self.setUpNodes()
        listener, heard = await self.connect(self.one, "a")
        await self.request(self.one, listener, type="subscribe", channel="room", requestId="s")
        sender, sent = await self.connect(self.two, "b")
        await self.request(self.two, sender, type="publish", channel="room", data={"n": 1, "s": "\ud800"}, requestId="p")
        await self.eventually(lambda: bool(heard.of_type("message")))
        await self.settle()
        self.assertEqual(
            heard.of_type("message"), [{"type": "message", "channel": "room", "from": "b", "data": {"n": 1, "s": "\ud800"}}]
        )
        self.assertEqual(sent.of_type("message"), [])
        self.assertEqual(sent.of_type("ack"), [{"type": "ack", "requestId": "p"}])

    async def test_overlapping_exactly_once(self) -> None:
        """
        A node whose subscriptions overlap (a channel and two patterns of
        one connection, the same pattern on another) delivers each publish
        exactly once per connection, from either node, in each sender's order.
        """
        await self.setUpNodes()
        both, heard_both = await self.connect(self.one, "x")
        for channel in ("room/1", "room/*", "room/**"):
            await self.request(self.one, both, type="subscribe", channel=channel)
        star, heard_star = await self.connect(self.one, "y")
        await self.request(self.one, star, type="subscribe", channel="room/*")
        near, _ = await self.connect(self.one, "p1")
        far, _ = await self.connect(self.two, "p2")
        for i in range(20):
            hub, session = (self.one, near) if i % 2 else (self.two, far)
            await self.request(hub, session, type="publish", channel="room/1", data=i)
        await self.request(self.two, far, type="publish", channel="room/1/deep", data="deep")
        await self.eventually(lambda: len(heard_both.of_type("message")) >= 21)
        await self.settle()
        # Exactly once each, in each sender's order (two senders: no order
        # between them).
        for sink, expected in ((heard_both, [*range(20), "deep"]), (heard_star, list(range(20)))):
            got = [m["data"] for m in sink.of_type("message")]
            self.assertEqual(sorted(got, key=str), sorted(expected, key=str))
            self.assertEqual(
                [d for d in got if d == "deep" or d % 2 == 0], [d for d in expected if d == "deep" or d % 2 == 0]
            )
            self.assertEqual([d for d in got if d != "deep" and d % 2], [d for d in expected if d != "deep" and d % 2])

    async def test_pattern_filtered_locally(self) -> None:
        """
        Redis's C{*} crosses C{/}, ours does not: a publish on another node
        to a deeper channel does not reach a C{*} subscriber.
        """
        await self.setUpNodes()
        listener, heard = await self.connect(self.one, "a")
        await self.request(self.one, listener, type="subscribe", channel="a/*")
        sender, _ = await self.connect(self.two, "b")
        await self.request(self.two, sender, type="publish", channel="a/b/c", data=1)
        await self.request(self.two, sender, type="publish", channel="a/b", data=2)
        await self.eventually(lambda: bool(heard.of_type("message")))
        await self.settle()
        self.assertEqual([m["data"] for m in heard.of_type("message")], [2])

    async def test_direct_and_not_found(self) -> None:
        """
        A send finds a peer on the other node; one to a peer connected
        nowhere answers C{peer_not_found}.
        """
        await self.setUpNodes()
        target, heard = await self.connect(self.two, "t")
        sender, sent = await self.connect(self.one, "s", peer_metadata={"n": "s"})
        await self.request(self.one, sender, type="send", to="t", data="hi", requestId="d1")
        await self.request(self.one, sender, type="send", to="nobody", data="hi", requestId="d2")
        await self.eventually(lambda: bool(heard.of_type("direct")))
        self.assertEqual(
            heard.of_type("direct"), [{"type": "direct", "from": "s", "data": "hi", "fromMetadata": {"n": "s"}}]
        )
        self.assertEqual([f.get("code") or f["type"] for f in sent.decoded], ["ack", "peer_not_found"])

    async def test_kick_counts_every_node(self) -> None:
        """
        A kick closes the peer's connections on every node with 4020 and
        reports how many.
        """
        await self.setUpNodes()
        sinks = [(await self.connect(hub, "k"))[1] for hub in (self.one, self.one, self.two)]
        other, other_sink = await self.connect(self.two, "other")
        self.assertEqual(await self.one.kick("app_1", "k"), 3)
        await self.eventually(lambda: all(sink.closes for sink in sinks))
        self.assertEqual([sink.closes for sink in sinks], [[(4020, "admin_disconnect")]] * 3)
        self.assertEqual(other_sink.closes, [])
        self.assertEqual(await self.two.kick("app_1", "nobody"), 0)

    async def test_sender_fifo_across_nodes(self) -> None:
        """
        What one connection causes reaches a receiver on another node in
        the order it was caused: publishes, a C{joined} (its subscribe),
        directs.
        """
        await self.setUpNodes()
        receiver, heard = await self.connect(self.two, "r")
        for channel in ("room", "other"):
            await self.request(self.two, receiver, type="subscribe", channel=channel)
        heard.clear()
        sender, _ = await self.connect(self.one, "s")
        expected: list[tuple[str, Any]] = []
        for i in range(30):
            await self.request(self.one, sender, type="publish", channel="room", data=i)
            expected.append(("message", i))
            if i == 10:
                await self.request(self.one, sender, type="subscribe", channel="other")
                expected.append(("presence", "s"))
            await self.request(self.one, sender, type="send", to="r", data=f"d{i}")
            expected.append(("direct", f"d{i}"))
        await self.eventually(lambda: len(heard.decoded) >= len(expected))
        await self.settle()
        seen = [(f["type"], f["joined"][0]["peerId"] if f["type"] == "presence" else f["data"]) for f in heard.decoded]
        self.assertEqual(seen, expected)

    async def test_presence_across_nodes(self) -> None:
        """
        Snapshots list members of every node; C{joined} and C{left} reach
        every node; a peer on two nodes leaves only with its last
        connection; REST lists the same members from either node.
        """
        await self.setUpNodes()
        watcher, seen = await self.connect(self.two, "w")
        await self.request(self.two, watcher, type="subscribe", channel="room")
        first, _ = await self.connect(self.one, "p", peer_metadata={"v": 1})
        await self.request(self.one, first, type="subscribe", channel="room")
        second, _ = await self.connect(self.two, "p", peer_metadata={"v": 2})
        await self.request(self.two, second, type="subscribe", channel="room")
        late, late_sink = await self.connect(self.one, "late")
        await self.request(self.one, late, type="subscribe", channel="room", requestId="l")
        self.assertEqual([e["peerId"] for f in late_sink.of_type("presence") for e in f["joined"]], ["w", "p"])
        for hub in (self.one, self.two):
            self.assertEqual([m.peer_id for m in await hub.members("app_1", "room")], ["w", "p", "late"])
        await self.one.disconnect(first)
        await self.settle()
        await self.two.disconnect(second)
        await self.eventually(lambda: any(f["left"] for f in seen.of_type("presence")))
        await self.settle()
        deltas = [(f["joined"], f["left"]) for f in seen.of_type("presence")]
        self.assertEqual(
            deltas,
            [
                ([], []),  # the watcher's own (empty) snapshot
                ([{"peerId": "p", "metadata": {"v": 1}}], []),
                ([{"peerId": "late"}], []),
                ([], [{"peerId": "p", "metadata": {"v": 2}}]),
            ],
        )

    async def test_snapshot_and_deltas_agree(self) -> None:
        """
        Subscribers joining at the same time on two nodes each end up
        knowing exactly the final members, each once: no duplicate
        C{joined}, no stray C{left}.
        """
        await self.setUpNodes()
        sessions = []
        for i in range(12):
            hub = (self.one, self.two)[i % 2]
            session, sink = await self.connect(hub, f"p{i}")
            sessions.append((hub, session, sink))
        await gather([self.request(hub, session, type="subscribe", channel="room") for hub, session, _ in sessions])
        await self.request(sessions[0][0], sessions[0][1], type="unsubscribe", channel="room")
        everyone = {f"p{i}" for i in range(1, 12)}

        def known(sink: RecordingSink) -> list[str] | None:
            members: list[str] = []
            for frame in sink.of_type("presence"):
                for entry in frame["joined"]:
                    if entry["peerId"] in members:
                        return None  # a duplicate joined
                    members.append(entry["peerId"])
                for entry in frame["left"]:
                    if entry["peerId"] not in members:
                        return None  # a stray left
                    members.remove(entry["peerId"])
            return members

        def converged() -> bool:
            return all(
                known(sink) is not None and set(known(sink) or ()) == everyone - {session.peer_id}
                for _, session, sink in sessions[1:]
            )

        await self.eventually(converged)
        await self.settle()
        self.assertTrue(converged())

    async def test_presence_beside_blind_subscribers(self) -> None:
        """
        Subscribers without C{presence} joining on both nodes among
        watchers (their joins take no snapshot) are acked and shown no
        presence; the watchers still hear every member exactly once.
        """
        await self.setUpNodes()
        nodes = (self.one, self.two)
        watchers = []
        for n, hub in enumerate(nodes):
            watcher, seen = await self.connect(hub, f"w{n}")
            await self.request(hub, watcher, type="subscribe", channel="room")
            watchers.append((watcher, seen))
        blind = [await self.connect(nodes[i % 2], f"b{i}", actions=BLIND) for i in range(6)]
        await gather(
            [
                self.request(nodes[i % 2], session, type="subscribe", channel="room", requestId="r")
                for i, (session, _) in enumerate(blind)
            ]
        )
        for _, sink in blind:
            self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "r"}])
        everyone = {"w0", "w1"} | {f"b{i}" for i in range(6)}

        def heard(seen: RecordingSink) -> list[str]:
            return [entry["peerId"] for frame in seen.of_type("presence") for entry in frame["joined"]]

        def converged() -> bool:
            return all(sorted(heard(seen)) == sorted(everyone - {w.peer_id}) for w, seen in watchers)

        await self.eventually(converged)
        await self.settle()
        self.assertTrue(converged())

async def gather(calls: list[Any]) -> None:
    for call in calls:
        await call


class MemoryBrokerTests(BrokerTestsMixin, TestCase):
    """
    The in-memory broker: one node, twice.
    """

    async def make_nodes(self) -> tuple[Hub, Hub]:
        hub = Hub(MemoryBroker(), MemoryPresence(), self.meter(), self.apps.get, node_id="n1")
        return hub, hub


class RedisBrokerTests(BrokerTestsMixin, TestCase):
    """
    The Redis broker and presence: two nodes on one real Redis.
    """

    async def make_nodes(self) -> tuple[Hub, Hub]:
        self.server = await RedisServer.start(self)
        return await self.make_node("one"), await self.make_node("two")

    async def make_node(self, name: str) -> Hub:
        address = parse_redis_url(self.server.url)
        node = ClusterNode(name)
        client = RedisClient(reactor, address, timeout=5.0)
        broker = RedisBroker(client, node)
        subscriber = RedisSubscriber(reactor, address, broker.received, timeout=5.0)
        presence = RedisPresence(client, node)
        for service in (client, subscriber):
            service.startService()
            self.addCleanup(service.stopService)
        await client.ready
        await subscriber.ready
        await broker.start(subscriber)
        self.clients = [*getattr(self, "clients", []), client]
        return Hub(broker, presence, self.meter(), self.apps.get, node_id=node.node_id)

    async def settle(self) -> None:
        # A PING on every command connection, then a round trip on the
        # server: whatever was published before has been handed out.
        for client in self.clients:
            await client.execute("PING")
        await self.server.command("PING")
        await deferLater(reactor, 0.05, lambda: None)
