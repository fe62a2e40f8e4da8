"""
C{[server] workers = 3} with real processes: one port served by three
processes that are all members of one cluster, stopped together by SIGTERM
to the first, and not left behind when it dies.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from .cluster import Node, child_pids, serving_pid, start_cluster, wait_until
from .support import LISTENING
from .test_metering_e2e import RealtimeClient, connect_client

WORKERS = 3
CLIENTS = 30


def alive(pid: int) -> bool:
    """
    Whether a process exists and is not a zombie.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class WorkersTests(TestCase):
    """
    Three workers of one C{twistd -n meteredrt} on one Redis.
    """

    timeout = 120

    async def start(self) -> tuple[Node, list[int]]:
        """
        Start the server with three workers; fires once all listen, with
        the first and the process ids of all three.
        """
        self.cluster = cluster = await start_cluster(self, nodes=0)
        node = await cluster.add_node("ws", extra=f"workers = {WORKERS}")
        await wait_until(
            lambda: len(LISTENING.findall(node.child.output)) == WORKERS, 60, "every worker listens"
        )
        others = child_pids(node.pid)
        self.assertEqual(len(others), WORKERS - 1, node.child.text)
        self.pids = [node.pid, *others]
        self.addCleanup(self.kill_all)
        return node, self.pids

    def kill_all(self) -> None:
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, 9)

    async def connect(self, node: Node, count: int) -> list[RealtimeClient]:
        return list(await gatherResults([Deferred.fromCoroutine(connect_client(self, node.port)) for _ in range(count)], consumeErrors=True))

    async def test_connections_spread(self) -> None:
        """
        Connections land on every worker.
        """
        node, pids = await self.start()
        clients = await self.connect(node, CLIENTS)
        served = [serving_pid(pids, node.port, client.transport.getHost().port) for client in clients]
        self.assertEqual(set(served), set(pids), served)

    async def test_one_cluster(self) -> None:
        """
        A publish on one worker reaches the subscribers on all of them:
        each worker is a member of the cluster.
        """
        node, pids = await self.start()
        clients = await self.connect(node, CLIENTS)
        served = {serving_pid(pids, node.port, client.transport.getHost().port) for client in clients}
        self.assertEqual(served, set(pids))
        answers = await gatherResults(
            [client.request({"type": "subscribe", "channel": "workers/room"}) for client in clients]
        )
        self.assertEqual({a["type"] for a in answers}, {"ack"}, answers)
        self.assertEqual((await clients[0].publish("workers/room", "to all"))["type"], "ack")
        # Publishers do not hear their own messages.
        await gatherResults([client.received(1) for client in clients[1:]]).addTimeout(10, reactor)
        self.assertEqual([client.messages for client in clients], [0] + [1] * (CLIENTS - 1))
        # Registered under their own names, ws-1 .. ws-3 (plus an incarnation suffix).
        registered = await self.cluster.redis.command("SMEMBERS", "mrt:nodes")
        self.assertEqual(sorted(n.decode().rsplit(".", 1)[0] for n in registered), ["ws-1", "ws-2", "ws-3"])

    async def test_sigterm_stops_all(self) -> None:
        """
        SIGTERM to the first worker drains every worker: each client is
        closed and every process exits; the first says it shut down.
        """
        node, pids = await self.start()
        clients = await self.connect(node, 9)
        ended = await node.terminate()
        self.assertIn(ended, [(0, None), (None, 15)], node.child.text)
        self.assertIn("Server Shut Down.", node.child.text)
        self.assertEqual([pid for pid in pids if alive(pid)], [])
        codes = await gatherResults([client.closed for client in clients]).addTimeout(5, reactor)
        self.assertEqual(set(codes), {1001}, codes)
        self.assertEqual(node.child.text.count("Server Shut Down."), WORKERS)

    async def test_drain_one(self) -> None:
        """
        SIGTERM to one worker drains its connections only (going away,
        1001); the others keep theirs and take the reconnecting clients.
        """
        node, pids = await self.start()
        clients = await self.connect(node, CLIENTS)
        served = [serving_pid(pids, node.port, client.transport.getHost().port) for client in clients]
        os.kill(pids[1], 15)
        drained = [c for c, pid in zip(clients, served, strict=True) if pid == pids[1]]
        kept = [c for c, pid in zip(clients, served, strict=True) if pid != pids[1]]
        self.assertTrue(drained and kept, served)
        codes = await gatherResults([c.closed for c in drained]).addTimeout(15, reactor)
        self.assertEqual(set(codes), {1001})
        await wait_until(lambda: not alive(pids[1]), 15, "the drained worker exits")
        self.assertEqual([c.closed.called for c in kept], [False] * len(kept))
        again = await self.connect(node, len(drained))
        self.assertEqual(
            {serving_pid(pids, node.port, c.transport.getHost().port) for c in again} - {pids[0], pids[2]}, set()
        )
        self.assertTrue(alive(pids[0]) and alive(pids[2]))

    async def test_first_killed(self) -> None:
        """
        If the first worker is killed, the others notice and stop too.
        """
        node, pids = await self.start()
        await node.kill()
        await wait_until(lambda: not any(alive(pid) for pid in pids[1:]), 30, "the other workers exit")

    async def test_one_killed(self) -> None:
        """
        A worker killed on its own leaves the others serving the port: new
        connections all succeed on the survivors.
        """
        node, pids = await self.start()
        os.kill(pids[1], 9)
        await wait_until(lambda: "worker 2 exited on its own" in node.child.text, 10, "worker 1 notices")
        clients = await self.connect(node, 20)
        served = {serving_pid(pids, node.port, client.transport.getHost().port) for client in clients}
        self.assertEqual(served, {pids[0], pids[2]})
