"""
The concurrent connection cap of a plan holds across real C{twistd} nodes
on one real Redis: a connection over the cap closes 4010 on any node, a
close frees a slot on every node, and a killed node's connections stop
counting once it is reaped.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from .cluster import LEASE_SECONDS, Node, Peer, connect_peer, start_cluster
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
