"""
Presence webhooks in a cluster, end to end: three real nodes on one real
Redis and one real PostgreSQL, a real receiver on a loopback port, and the
delivering node killed with SIGKILL.

L{ClusterDeliveryTests} appends events to the shared outbox through three
writers of its own, as the nodes' emitters do: what it tests is the outbox
and its delivery, one node at a time, across a crash.
L{ClusterEmissionTests} connects real clients to the nodes: what it tests
is which node emits what, once, across nodes and across a node killed with
SIGKILL.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meteredrt.cli import main
from meteredrt.redisclient import RedisClient, parse_redis_url
from meteredrt.store import webhooks as webhook_tables
from meteredrt.store.database import Database
from meteredrt.store.dialect import POSTGRESQL
from meteredrt.store.webhooks import StoreOutbox
from meteredrt.webhooks.events import PEER_OFFLINE, PEER_ONLINE, WebhookEvent, new_event
from tests.postgres_server import fresh_database

from .cluster import LEASE_SECONDS, Cluster, Node, connect_peer, start_cluster, wait_until
from .support import APP_ID
from .test_webhooks import WEBHOOK_SECRET, config_with_webhooks, per_peer
from .webhook_receiver import WebhookReceiver, start_receiver

#: The message each node logs when it takes the delivery lease.
TOOK_LEASE = "took the webhooks lease"


class ClusterDeliveryTests(TestCase):
    """
    One node delivers the outbox every node writes; another takes over
    when it dies.
    """

    timeout = 120

    async def start(self) -> tuple[Cluster, WebhookReceiver, list[StoreOutbox]]:
        receiver, url = await start_receiver(self, WEBHOOK_SECRET)
        self.database = fresh_database()
        cluster = await start_cluster(self, 3, config=config_with_webhooks(url), database=self.database)
        self.redis = RedisClient(reactor, parse_redis_url(cluster.redis.url), timeout=2.0)
        self.redis.startService()
        self.addCleanup(lambda: maybeDeferred(self.redis.stopService))
        await self.redis.ready
        writers = []
        for _ in cluster.nodes:
            database = Database(self.mktemp(), self.database)
            writer = StoreOutbox(
                database.open_pool(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS, reactor), POSTGRESQL
            )
            self.addCleanup(writer.close)
            writers.append(writer)
        return cluster, receiver, writers

    async def holder(self, cluster: Cluster) -> Node:
        """
        The node holding the delivery lease, once one does.
        """
        deadline = time.monotonic() + 10
        while True:
            value = await self.redis.execute("GET", "mrt:leader:webhooks")
            if value is not None:
                node_id = value.decode().split(":", 1)[1]
                [node] = [node for node in cluster.nodes if node_id.startswith(node.name + ".")]
                return node
            if time.monotonic() > deadline:
                self.fail("no node took the delivery lease")
            await _pause(0.05)

    def operator(self, cluster: Cluster, *argv: str) -> Any:
        """
        Run one C{meteredrt} command on the cluster's database, as an
        operator would on any machine; return its JSON output.
        """
        config = str(cluster.base / cluster[0].name / "meteredrt.toml")
        stdout, stderr = io.StringIO(), io.StringIO()
        status = main([*argv, "--config", config, "--database", self.database, "--json"], stdout=stdout, stderr=stderr)
        self.assertEqual(status, 0, stderr.getvalue())
        return json.loads(stdout.getvalue())

    async def test_one_node_delivers_then_another_takes_over(self) -> None:
        """
        Events the three nodes append are delivered by the lease holder
        alone, each id once, every peer's in order; after the holder is
        killed with SIGKILL while the receiver is down, another node takes
        the lease within 4/3 of a lease (plus scheduling) and delivers the
        rest, each id once.
        """
        cluster, receiver, writers = await self.start()
        holder = await self.holder(cluster)
        # The holder logs once Redis has answered its try: the lease may be
        # seen in Redis before that line has come down the holder's pipe.
        await wait_until(lambda: TOOK_LEASE in holder.child.text, 10, "the holder logs that it took the lease")
        self.assertEqual([node.child.text.count(TOOK_LEASE) for node in cluster.nodes],
                         [1 if node is holder else 0 for node in cluster.nodes])

        # Peer i comes online through writer i % 3 and goes offline
        # through the next one, as when a peer moves between nodes.
        peers = [f"peer-{i}" for i in range(12)]
        for i, peer in enumerate(peers):
            await writers[i % 3].append([_event(PEER_ONLINE, peer)], [])
        for i, peer in enumerate(peers[:6]):
            await writers[(i + 1) % 3].append([_event(PEER_OFFLINE, peer)], [])
        await receiver.wait_for(lambda: len(receiver.accepted) == 18)

        receiver.statuses = [503] * 1000
        for i, peer in enumerate(peers[6:]):
            await writers[i % 3].append([_event(PEER_OFFLINE, peer)], [])
        requests = receiver.requests
        await receiver.wait_for(lambda: receiver.requests > requests)
        await holder.kill()
        killed_at = time.monotonic()
        receiver.statuses = []
        await receiver.wait_for(lambda: len(receiver.accepted) == 24)
        took_over = time.monotonic() - killed_at
        self.assertLess(took_over, LEASE_SECONDS * 4 / 3 + 3)

        successor = await self.holder(cluster)
        self.assertIsNot(successor, holder)
        self.assertIn(TOOK_LEASE, successor.child.text)
        ids = [event["id"] for event in receiver.accepted]
        self.assertEqual(len(ids), len(set(ids)))
        for peer in peers:
            self.assertEqual(per_peer(receiver.accepted, peer), ["peer.online", "peer.offline"])
        self.assertEqual(receiver.bad_signatures, 0)

        status = self.operator(cluster, "webhooks", "status", "--app", APP_ID)
        self.assertEqual((status["pending"], status["failed"], status["delivered"]), (0, 0, 24))


#: The functional tests' grace (L{config_with_webhooks}'s default).
GRACE = 1.0


class ClusterEmissionTests(TestCase):
    """
    Clients on three nodes; what the backend hears of them.
    """

    timeout = 120

    async def test_peers_across_nodes_and_a_crash(self) -> None:
        """
        A peer connected to two nodes is online once and offline once,
        only after its last connection anywhere closed; a reconnect to
        another node inside the grace sends nothing; when a node is killed
        with SIGKILL, its peers connected nowhere else are announced
        offline once (by a survivor, after the reap and the grace), and a
        peer also connected to a survivor is not.
        """
        receiver, url = await start_receiver(self, WEBHOOK_SECRET)
        database = fresh_database()
        cluster = await start_cluster(self, 3, config=config_with_webhooks(url, GRACE), database=database)
        one, two, three = cluster.nodes
        alice_on_one = await connect_peer(self, one, "alice")
        alice_on_two = await connect_peer(self, two, "alice")
        await connect_peer(self, three, "bob")
        await connect_peer(self, three, "carol")
        await connect_peer(self, one, "carol")
        dave = await connect_peer(self, one, "dave")
        await receiver.wait_for(lambda: len(receiver.of_type("peer.online")) == 4)

        alice_on_one.sendClose()
        await alice_on_one.closed
        dave.sendClose()
        await dave.closed
        await connect_peer(self, two, "dave")
        await three.kill()
        # Reaped within 3 leases, then the grace, then a sweep.
        await receiver.wait_for(lambda: len(receiver.of_type("peer.offline")) == 1, timeout=3 * LEASE_SECONDS + 10)
        alice_on_two.sendClose()
        await alice_on_two.closed
        await receiver.wait_for(lambda: len(receiver.of_type("peer.offline")) == 2)
        await _pause(3 * LEASE_SECONDS + GRACE + 1)  # nothing late, nothing twice

        events = receiver.accepted
        self.assertEqual(per_peer(events, "alice"), ["peer.online", "peer.offline"])
        self.assertEqual(per_peer(events, "bob"), ["peer.online", "peer.offline"])
        self.assertEqual(per_peer(events, "carol"), ["peer.online"])
        self.assertEqual(per_peer(events, "dave"), ["peer.online"])
        ids = [event["id"] for event in events]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(receiver.bad_signatures, 0)


def _event(kind: str, peer_id: str) -> WebhookEvent:
    return new_event(kind, APP_ID, time.time(), peer_id=peer_id)


async def _pause(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)
