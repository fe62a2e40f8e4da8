"""
The caps of a plan hold across real C{twistd} nodes on one real Redis: a
connection over the cap closes 4010 on any node, a close frees a slot on
every node, and a killed node's connections stop counting once it is
reaped; the message cap is never exceeded, and under-admits at most one
slice per node.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meteredrt.clusterquota import RECHECK_SECONDS, SETTLE_SECONDS, slice_size
from tests.postgres_server import fresh_database

from .cluster import LEASE_SECONDS, Cluster, Node, Peer, connect_peer, start_cluster
from .test_metering_e2e import ClosedBeforeWelcome, config_with_plan


class ClusterConnectionCapTests(TestCase):
    timeout = 120

    async def refused_code(self, node: Node, peer_id: str) -> int | None:
        """
        Connect C{peer_id} to C{node}, expecting to be closed before the
        welcome; the close code.
        """
        try:
            await connect_peer(self, node, peer_id)
        except ClosedBeforeWelcome as e:
            return e.code
        self.fail(f"{peer_id} was admitted on {node.name}")

    async def test_cap_across_three_nodes(self) -> None:
        """
        Cap 3 over three nodes: one connection on each, the 4th closes
        4010 on every node; closing one admits one more; killing the node
        holding one admits one more within 3 × lease.
        """
        cluster = await start_cluster(self, nodes=3, config=config_with_plan("max_concurrent_connections = 3"))
        peers: list[Peer] = [await connect_peer(self, cluster[i], f"p{i}") for i in range(3)]
        for i in range(3):
            self.assertEqual(await self.refused_code(cluster[i], f"extra{i}"), 4010)

        peers[0].sendClose(1000)
        await peers[0].closed
        replacement = None
        for _ in range(50):  # the release reaches Redis after the close
            try:
                replacement = await connect_peer(self, cluster[2], "after-close")
                break
            except ClosedBeforeWelcome as e:
                self.assertEqual(e.code, 4010)
                await deferLater(reactor, 0.1, lambda: None)
        self.assertIsNotNone(replacement)
        self.assertEqual(await self.refused_code(cluster[0], "still-full"), 4010)

        await cluster[1].kill()
        deadline = reactor.seconds() + 3 * LEASE_SECONDS + 5
        while True:
            try:
                await connect_peer(self, cluster[0], "after-kill")
                break
            except ClosedBeforeWelcome as e:
                self.assertEqual(e.code, 4010)
                if reactor.seconds() > deadline:
                    self.fail("the killed node's connection still counts")
                await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(await self.refused_code(cluster[2], "full-again"), 4010)


#: The message cap of the quota test: with 3 nodes and slices of 1
#: (L{slice_size}), at most 3 messages under it may go unadmitted.
MESSAGE_CAP = 60


class ClusterMessageQuotaTests(TestCase):
    """
    The message cap of a plan over three real nodes on one Redis and one
    PostgreSQL database.
    """

    timeout = 180

    async def outcome(self, peer: Peer, channel: str) -> str:
        """
        Publish once: C{"ack"}, or the error code.
        """
        answer = await peer.publish(channel, "x")
        return "ack" if answer["type"] == "ack" else answer["code"]

    async def quota_cluster(self) -> tuple[Cluster, list[Peer]]:
        """
        Three nodes with the capped plan on one Redis and one PostgreSQL,
        a peer on each, once the period's quota is seeded: the first
        message acked (from peer 0) counts one.
        """
        cluster = await self.capped_cluster()
        peers = [await connect_peer(self, cluster[i], f"p{i}") for i in range(3)]
        # On a Redis younger than the settle time (just started, like a
        # Redis restarted empty) the period's quota is seeded once it has
        # settled; meanwhile messages are refused as transient, and not
        # counted.
        deadline = reactor.seconds() + 20
        while (first := await self.outcome(peers[0], "c")) != "ack":
            self.assertEqual(first, "backend_error")
            self.assertLess(reactor.seconds(), deadline, "the quota was never seeded")
            await deferLater(reactor, 0.5, lambda: None)
        return cluster, peers

    async def capped_cluster(self) -> Cluster:
        """
        Three nodes with the capped plan on one Redis and one PostgreSQL.
        """
        config = config_with_plan(f"max_messages_per_period = {MESSAGE_CAP}")
        config += f'\n[storage]\ndatabase = "{fresh_database()}"\n'
        return await start_cluster(self, nodes=3, config=config)

    async def test_first_message_not_delayed(self) -> None:
        """
        Once the nodes have known their Redis for the settle time, the
        first message of a period of an app capped all along is acked at
        once on every node: a period does not start with C{backend_error}.
        """
        cluster = await self.capped_cluster()
        await deferLater(reactor, SETTLE_SECONDS + 1, lambda: None)
        for i in range(3):
            peer = await connect_peer(self, cluster[i], f"p{i}")
            self.assertEqual(await self.outcome(peer, "c"), "ack")

    async def race(self, peers: list[Peer], each: int) -> int:
        """
        Every peer publishes C{each} messages at once; how many were acked
        (the others must be refused for quota).
        """
        answers = await gatherResults(
            [Deferred.fromCoroutine(self.outcome(peer, "c")) for peer in peers for _ in range(each)]
        )
        self.assertEqual(set(answers) - {"ack", "over_message_quota"}, set())
        return answers.count("ack")

    async def until_refused(self, peer: Peer, accepted: int) -> int:
        """
        Publish from C{peer} until refused, never past the cap; the total
        accepted, C{accepted} before included.
        """
        while await self.outcome(peer, "c") == "ack":
            accepted += 1
            self.assertLessEqual(accepted, MESSAGE_CAP)
        return accepted

    async def test_cap_across_three_nodes(self) -> None:
        """
        Every node publishes at once, twice the cap in all: the cluster
        admits no more than the cap and at most one slice per node less;
        once the nodes that hold slices stop cleanly, the last one admits
        exactly up to the cap.
        """
        cluster, peers = await self.quota_cluster()
        accepted = 1 + await self.race(peers, MESSAGE_CAP * 2 // 3)
        self.assertLessEqual(accepted, MESSAGE_CAP)
        self.assertGreaterEqual(accepted, MESSAGE_CAP - 3 * slice_size(MESSAGE_CAP))

        # A clean stop gives the unused slices back to the cluster (those of
        # prefetches still in flight included). Node 2 may have found the
        # cap exhausted during the race: it refuses locally, without asking
        # Redis, for RECHECK_SECONDS after that, so the units given back are
        # picked up only once that has passed.
        for node in (cluster[0], cluster[1]):
            await node.terminate()
        await deferLater(reactor, RECHECK_SECONDS + 0.1, lambda: None)
        self.assertEqual(await self.until_refused(peers[2], accepted), MESSAGE_CAP)

    async def test_killed_node_loses_at_most_its_slice(self) -> None:
        """
        A node killed with slices in hand: the cap still holds, and what it
        held is lost to the period, at most one slice.
        """
        cluster, peers = await self.quota_cluster()
        accepted = 1 + await self.race(peers[:2], MESSAGE_CAP // 4)
        await cluster[0].kill()
        await cluster[1].terminate()
        accepted = await self.until_refused(peers[2], accepted)
        self.assertGreaterEqual(accepted, MESSAGE_CAP - slice_size(MESSAGE_CAP))
