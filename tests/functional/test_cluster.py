"""
The single-node scenarios, run against one cluster node and against three
real C{twistd -n meteredrt} nodes on one Redis, with the official SDK's
clients spread over the nodes (client i on node i mod N).

From every client's and every backend's point of view three nodes must
behave exactly like one server: the same assertions hold for both
topologies.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from .cluster import Cluster, connect_peer, peers_of, rest, start_cluster, wait_until
from .node_harness import ensure_node_modules, run_sdk_scenario
from .test_sdk import events_of, steps, token


class Topology:
    """
    Mixed into a C{TestCase}: L{nodes} cluster nodes started for each test.
    """

    nodes = 1
    clustered = True
    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    async def start(self: Any) -> Cluster:
        self.cluster = await start_cluster(self, nodes=self.nodes, clustered=self.clustered)
        return self.cluster

    def url(self: Any, index: int) -> str:
        node = self.cluster.nodes[index % len(self.cluster.nodes)]
        return str(node.url)

    def node(self: Any, index: int) -> Any:
        return self.cluster.nodes[index % len(self.cluster.nodes)]

    async def run_clients(self: Any, clients: dict[str, dict[str, Any]], scenario_steps: list[dict[str, Any]]) -> list[dict]:
        """
        Run an SDK scenario with C{clients} placed on the nodes in order.
        """
        await self.start()
        for index, client in enumerate(clients.values()):
            client.setdefault("url", self.url(index))
        events: list[dict] = await run_sdk_scenario({"clients": clients, "steps": scenario_steps}, timeout=60)
        self.assertTrue(all(s["ok"] for s in steps(events)), [s for s in steps(events) if not s["ok"]])
        return events


def presence_of(events: list[dict], client: str, channel: str) -> list[tuple[str, str]]:
    """
    C{("joined"|"left", peerId)} deltas C{client} saw in C{channel}, in
    order, without its first frame (the snapshot).
    """
    frames = [e for e in events_of(events, "presence", client) if e["channel"] == channel][1:]
    return [(kind, p["peerId"]) for e in frames for kind in ("joined", "left") for p in e[kind]]


class ScenarioTests(Topology):
    """
    Scenarios that every topology must pass.
    """

    async def test_pubsub_and_presence(self) -> None:
        """
        Three peers on (up to) three nodes see each other join, exchange
        messages with fromMetadata only where asked for, and see the leaver
        leave once.
        """
        clients = {
            "a": {"token": token("alice", peer_metadata={"name": "Ada"})},
            "b": {"token": token("bob", peer_metadata={"name": "Bob"})},
            "c": {"token": token("carol")},
        }
        events = await self.run_clients(
            clients,
            [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "b"},
                {"op": "connect", "client": "c"},
                {"op": "subscribe", "client": "a", "channel": "demo/room", "includeSenderMetadata": True},
                {"op": "subscribe", "client": "b", "channel": "demo/room"},
                {"op": "subscribe", "client": "c", "channel": "demo/room"},
                {"op": "wait", "client": "a", "event": "presence", "where": {"channel": "demo/room"}, "count": 3},
                {"op": "publish", "client": "b", "channel": "demo/room", "data": {"text": "from b"}},
                {"op": "publish", "client": "c", "channel": "demo/room", "data": {"text": "from c"}},
                {"op": "wait", "client": "a", "event": "message", "count": 2},
                {"op": "wait", "client": "c", "event": "message", "count": 1},
                {"op": "close", "client": "b"},
                {"op": "wait", "client": "a", "event": "presence", "count": 4},
                {"op": "wait", "client": "c", "event": "presence", "count": 2},
                {"op": "sleepMs", "ms": 300},
            ],
        )
        # The driver closes the rest when the scenario ends: only what came
        # before that is checked.
        self.assertEqual(
            presence_of(events, "a", "demo/room")[:3], [("joined", "bob"), ("joined", "carol"), ("left", "bob")]
        )
        self.assertEqual(presence_of(events, "c", "demo/room")[:1], [("left", "bob")])
        self.assertEqual(presence_of(events, "c", "demo/room").count(("left", "bob")), 1)
        snapshot_c = events_of(events, "presence", "c")[0]
        self.assertEqual(
            sorted(p["peerId"] for p in snapshot_c["joined"]), ["alice", "bob"], snapshot_c
        )
        to_a = events_of(events, "message", "a")
        self.assertEqual(sorted(m["data"]["text"] for m in to_a), ["from b", "from c"])
        self.assertEqual({m["from"]: m.get("fromMetadata") for m in to_a}, {"bob": {"name": "Bob"}, "carol": None})
        [to_c] = events_of(events, "message", "c")
        self.assertNotIn("fromMetadata", to_c)
        # Publishers do not hear their own messages, on any node.
        self.assertNotIn("bob", [m["from"] for m in events_of(events, "message", "b")])

    async def test_wildcards_exactly_once(self) -> None:
        """
        A client holding C{room/1} and C{room/*} (and another holding two
        overlapping patterns) gets each publish once.
        """
        clients = {
            "pub": {"token": token("pub")},
            "w1": {"token": token("w1")},
            "w2": {"token": token("w2")},
        }
        publishes = [("room/1", 1), ("room/2", 2), ("room/1", 3), ("room/x/y", 4), ("other/1", 5)]
        events = await self.run_clients(
            clients,
            [
                {"op": "connect", "client": "pub"},
                {"op": "connect", "client": "w1"},
                {"op": "connect", "client": "w2"},
                {"op": "subscribe", "client": "w1", "channel": "room/1"},
                {"op": "subscribe", "client": "w1", "channel": "room/*"},
                {"op": "subscribe", "client": "w2", "channel": "room/*"},
                {"op": "subscribe", "client": "w2", "channel": "room/**"},
                *[{"op": "publish", "client": "pub", "channel": c, "data": n} for c, n in publishes],
                {"op": "wait", "client": "w1", "event": "message", "count": 3},
                {"op": "wait", "client": "w2", "event": "message", "count": 4},
                # Time for a duplicate to show up if there were one.
                {"op": "sleepMs", "ms": 500},
            ],
        )
        got_w1 = [(e["channel"], e["data"]) for e in events_of(events, "message", "w1")]
        got_w2 = [(e["channel"], e["data"]) for e in events_of(events, "message", "w2")]
        self.assertEqual(got_w1, [("room/1", 1), ("room/2", 2), ("room/1", 3)])
        self.assertEqual(got_w2, [("room/1", 1), ("room/2", 2), ("room/1", 3), ("room/x/y", 4)])

    async def test_presence_refcount_across_nodes(self) -> None:
        """
        A peer connected twice (on two nodes when there are several) stays
        a member until both connections are gone, then leaves once.
        """
        clients = {
            "watch": {"token": token("watcher")},
            "m1": {"token": token("multi")},
            "m2": {"token": token("multi")},
        }
        events = await self.run_clients(
            clients,
            [
                {"op": "connect", "client": "watch"},
                {"op": "connect", "client": "m1"},
                {"op": "connect", "client": "m2"},
                {"op": "subscribe", "client": "watch", "channel": "ref/room"},
                {"op": "subscribe", "client": "m1", "channel": "ref/room"},
                {"op": "subscribe", "client": "m2", "channel": "ref/room"},
                {"op": "wait", "client": "watch", "event": "presence", "count": 2},
                {"op": "close", "client": "m1"},
                {"op": "sleepMs", "ms": 1500},
                {"op": "publish", "client": "m2", "channel": "ref/room", "data": "still here"},
                {"op": "wait", "client": "watch", "event": "message"},
                {"op": "close", "client": "m2"},
                {"op": "wait", "client": "watch", "event": "presence", "count": 3},
                {"op": "sleepMs", "ms": 500},
            ],
        )
        self.assertEqual(presence_of(events, "watch", "ref/room"), [("joined", "multi"), ("left", "multi")])
        # A peer never sees itself in a snapshot, whichever node holds its
        # other connection.
        m2_snapshot = events_of(events, "presence", "m2")[0]
        self.assertEqual([p["peerId"] for p in m2_snapshot["joined"]], ["watcher"])

    async def test_directs(self) -> None:
        """
        A send reaches a peer on another node with the sender's metadata; a
        send to nobody is peer_not_found.
        """
        clients = {
            "a": {"token": token("alice", peer_metadata={"name": "Ada"})},
            "b": {"token": token("bob")},
        }
        scenario = [
            {"op": "connect", "client": "a"},
            {"op": "connect", "client": "b"},
            {"op": "send", "client": "a", "to": "bob", "data": {"kind": "offer"}},
            {"op": "wait", "client": "b", "event": "direct"},
            {"op": "send", "client": "b", "to": "alice", "data": None},
            {"op": "wait", "client": "a", "event": "direct"},
        ]
        events = await self.run_clients(clients, scenario)
        [to_b] = events_of(events, "direct", "b")
        self.assertEqual((to_b["from"], to_b["data"], to_b["fromMetadata"]), ("alice", {"kind": "offer"}, {"name": "Ada"}))
        [to_a] = events_of(events, "direct", "a")
        self.assertEqual((to_a["from"], to_a["data"]), ("bob", None))
        missing = await run_sdk_scenario(
            {
                "url": self.url(1),
                "token": token("carol"),
                "steps": [{"op": "connect"}, {"op": "send", "to": "nobody", "data": 1}],
            },
            timeout=60,
        )
        last = steps(missing)[-1]
        self.assertEqual((last["ok"], last["error"]["name"]), (False, "peer_not_found"))

    async def test_fifo_publish_then_send(self) -> None:
        """
        Publishes and sends from one sender reach a receiver on another
        node in the order they were sent.
        """
        clients = {"s": {"token": token("sender")}, "r": {"token": token("receiver")}}
        interleaved: list[dict[str, Any]] = []
        for n in range(20):
            interleaved.append({"op": "publish", "client": "s", "channel": "fifo/room", "data": n * 2})
            interleaved.append({"op": "send", "client": "s", "to": "receiver", "data": n * 2 + 1})
        events = await self.run_clients(
            clients,
            [
                {"op": "connect", "client": "s"},
                {"op": "connect", "client": "r"},
                {"op": "subscribe", "client": "r", "channel": "fifo/room"},
                *interleaved,
                {"op": "wait", "client": "r", "event": "message", "count": 20},
                {"op": "wait", "client": "r", "event": "direct", "count": 20},
            ],
        )
        received = [e["data"] for e in events if e.get("client") == "r" and e["event"] in ("message", "direct")]
        self.assertEqual(received, list(range(40)))

    async def test_fifo_joined_then_direct(self) -> None:
        """
        A newcomer's C{joined} reaches a member before the direct the
        newcomer sends right after subscribing.
        """
        clients = {"member": {"token": token("member")}, "newcomer": {"token": token("newcomer")}}
        events = await self.run_clients(
            clients,
            [
                {"op": "connect", "client": "member"},
                {"op": "connect", "client": "newcomer"},
                {"op": "subscribe", "client": "member", "channel": "call/room"},
                {"op": "subscribe", "client": "newcomer", "channel": "call/room"},
                {"op": "send", "client": "newcomer", "to": "member", "data": "offer"},
                {"op": "wait", "client": "member", "event": "direct"},
            ],
        )
        seen = [
            e["event"]
            for e in events
            if e.get("client") == "member" and (e["event"] == "direct" or (e["event"] == "presence" and e["joined"]))
        ]
        self.assertEqual(seen, ["presence", "direct"])

    async def test_rest_from_any_node(self) -> None:
        """
        The backend may ask any node: peers lists members on every node, a
        publish reaches subscribers on every node, a kick closes the peer's
        connections on every node with 4020 and counts them.
        """
        await self.start()
        a = await connect_peer(self, self.node(0), "agent")
        a2 = await connect_peer(self, self.node(1), "agent")
        b = await connect_peer(self, self.node(2), "bystander")
        acks = await gatherResults([p.subscribe("ops/alerts") for p in (a, a2, b)])
        self.assertEqual({x["type"] for x in acks}, {"ack"})
        for index in range(len(self.cluster.nodes)):
            self.assertEqual(await peers_of(self.node(index), "ops/alerts"), {"agent", "bystander"})

        code, body = await rest("POST", self.node(1), "/v1/channels/ops/alerts/publish", {"data": "page"})
        self.assertEqual(code, 200, body)
        self.assertIn(body["delivered"], (3, None), body)
        await gatherResults([p.received(1) for p in (a, a2, b)]).addTimeout(10, reactor)

        code, body = await rest("DELETE", self.node(2), "/v1/peers/agent")
        self.assertEqual((code, body), (200, {"peerId": "agent", "closed": 2}))
        codes = await gatherResults([a.closed, a2.closed]).addTimeout(10, reactor)
        self.assertEqual(codes, [4020, 4020])
        await wait_until(
            lambda: ("left", "agent") in b.presence_events("ops/alerts"), 10, "the bystander sees agent leave"
        )
        self.assertEqual(b.lefts("ops/alerts", "agent"), 1)
        for index in range(len(self.cluster.nodes)):
            self.assertEqual(await peers_of(self.node(index), "ops/alerts"), {"bystander"})


class StandaloneTests(ScenarioTests, TestCase):
    """
    One node without C{[cluster]}: the in-memory baseline the cluster must
    match.
    """

    nodes = 1
    clustered = False


class OneNodeTests(ScenarioTests, TestCase):
    """
    One cluster node on Redis.
    """

    nodes = 1


class ThreeNodeTests(ScenarioTests, TestCase):
    """
    Three cluster nodes on one Redis.
    """

    nodes = 3
