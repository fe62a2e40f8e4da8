"""
Three real C{twistd} nodes on one real Redis and one real PostgreSQL
database: keys made with the CLI reach every node, a revoked key's
sessions close with 4001 on every node, C{GET /v1/usage} on any node
reports the whole cluster, and the usage ledger holds every acked message
after SIGTERM of every node, or all but the last flush interval of a node
killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meteredrt.cli import main
from meteredrt.metering import FLUSH_INTERVAL
from meteredrt.store.keystore import RELOAD_INTERVAL
from tests.postgres_server import fresh_database

from .cluster import LEASE_SECONDS, Cluster, Node, start_cluster, wait_until
from .support import APP_ID
from .test_metering_e2e import ClosedBeforeWelcome, RealtimeClient, connect_client, get_usage


class ClusterUsageTests(TestCase):
    timeout = 120

    async def start(self) -> Cluster:
        self.database = fresh_database()
        return await start_cluster(self, nodes=3, database=self.database)

    def operator(self, node: Node, *argv: str) -> Any:
        """
        One C{meteredrt} command on C{node}'s configuration file and the
        cluster's database, as an operator would run it; its JSON output.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        status = main(
            [*argv, "--config", node.config_path, "--database", self.database, "--json"], stdout=stdout, stderr=stderr
        )
        self.assertEqual(status, 0, stderr.getvalue())
        return json.loads(stdout.getvalue())

    async def publish(self, client: RealtimeClient, count: int) -> int:
        """
        Publish C{count} messages; fires with how many were acked (all).
        """
        answers = await gatherResults([client.publish("usage/room", n) for n in range(count)])
        self.assertEqual([frame["type"] for frame in answers], ["ack"] * count)
        return count

    async def connect_new_key(self, node: Node, key: str, created: float) -> RealtimeClient:
        """
        Connect with C{key}, created with the CLI at C{created}
        (monotonic), trying until C{node} knows it: refused with 4001
        until its next re-read of the keys, which must come within about
        2 s of the creation.
        """
        while True:
            try:
                client = await connect_client(self, node.port, f"key={key}")
            except ClosedBeforeWelcome as e:
                self.assertEqual(e.code, 4001)
                self.assertLess(time.monotonic() - created, RELOAD_INTERVAL + 2, f"{node.name} never knew the key")
                await deferLater(reactor, 0.05, lambda: None)
                continue
            self.assertLess(time.monotonic() - created, RELOAD_INTERVAL + 2)
            return client

    async def test_cli_key_reaches_every_node(self) -> None:
        """
        A key minted with the CLI on node 1's configuration connects on node
        3, and on every node, within one key store re-read (about 2 s);
        once revoked, its sessions on every node are closed with 4001
        within about 2 s.
        """
        cluster = await self.start()
        created = time.monotonic()
        key = self.operator(cluster[0], "keys", "create", "--app", APP_ID, "--type", "publishable")["keyId"]
        clients = [await self.connect_new_key(cluster[i], key, created) for i in (2, 0, 1)]

        revoked = time.monotonic()
        self.operator(cluster[0], "keys", "revoke", key)
        codes = await gatherResults([client.closed for client in clients])
        self.assertEqual(codes, [4001, 4001, 4001])
        self.assertLess(time.monotonic() - revoked, RELOAD_INTERVAL + 2)

    async def test_usage_of_the_cluster_after_sigterm(self) -> None:
        """
        While the nodes run, C{GET /v1/usage} on any of them reports the
        connections and messages of all, and the CLI the connections of
        all; after SIGTERM of every node the CLI reports exactly the acked
        messages, the cluster-wide peak and no connection.
        """
        cluster = await self.start()
        clients = [await connect_client(self, node.port) for node in cluster.nodes]
        clients.append(await connect_client(self, cluster[1].port))
        acked = sum(
            await gatherResults(
                [self._publish(client, count) for client, count in zip(clients, (30, 20, 25, 5), strict=True)]
            )
        )

        async def all_reported() -> bool:
            reports = [await get_usage(self, node.port) for node in cluster.nodes]
            return all((r["concurrentNow"], r["messagesUsed"]) == (4, acked) for r in reports)

        # Other nodes' connections appear within one share round, their
        # messages within one flush.
        await wait_until(all_reported, 2 * FLUSH_INTERVAL + 2, "every node reports the whole cluster")
        report = await get_usage(self, cluster[2].port)
        self.assertEqual(report["peakConcurrent"], 4)
        live = self.operator(cluster[0], "usage", "--app", APP_ID)
        self.assertEqual((live["concurrentNow"], live["peakConcurrent"]), (4, 4))

        for node in cluster.nodes:
            self.assertIn(await node.terminate(), [(0, None), (None, 15)], node.child.text)
        stored = self.operator(cluster[0], "usage", "--app", APP_ID)
        self.assertEqual((stored["messagesUsed"], stored["peakConcurrent"], stored["concurrentNow"]), (acked, 4, 0))

    async def test_sigkill_of_one_node(self) -> None:
        """
        SIGKILL of one node loses at most what it counted in its last flush
        interval, and its connections stop counting once its lease lapses;
        the other nodes lose nothing.
        """
        cluster = await self.start()
        clients = [await connect_client(self, node.port) for node in cluster.nodes]
        flushed = sum(await gatherResults([self._publish(client, 20) for client in clients]))
        await wait_until(
            lambda: self._reported(cluster[0], flushed), 2 * FLUSH_INTERVAL + 2, "the first messages are flushed"
        )
        unflushed = await self.publish(clients[1], 15)
        await cluster[1].kill()
        after = await self.publish(clients[0], 10) + await self.publish(clients[2], 5)

        async def forgotten() -> bool:
            return (await get_usage(self, cluster[0].port))["concurrentNow"] == 2

        # A dead node is reaped within three leases (docs/cluster.md), plus
        # the scheduling slack of the fault tests for a loaded machine.
        await wait_until(forgotten, 3 * LEASE_SECONDS + 2, "the killed node's connection no longer counts")
        for node in (cluster[0], cluster[2]):
            await node.terminate()
        stored = self.operator(cluster[0], "usage", "--app", APP_ID)["messagesUsed"]
        self.assertGreaterEqual(stored, flushed + after)
        self.assertLessEqual(stored, flushed + unflushed + after)

    async def _reported(self, node: Node, messages: int) -> bool:
        return bool((await get_usage(self, node.port))["messagesUsed"] == messages)

    def _publish(self, client: RealtimeClient, count: int) -> Deferred[int]:
        return Deferred.fromCoroutine(self.publish(client, count))
