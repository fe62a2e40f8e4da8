"""
Tests for L{meteredrt.leadership} on a real C{redis-server}: one node at a
time runs the service; a clean stop hands it on at once, a dead holder
within 4/3 of the lease, a holder cut off from Redis stops by itself before
anyone else can start, and a holder whose lease another node took stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from meteredrt.leadership import LOCAL_SHARE, Leadership
from meteredrt.redisclient import RedisClient, parse_redis_url
from tests.servers import RedisServer

LEASE = 0.6


class Job(Service):
    """
    The service only one node may run; counts its starts.
    """

    def __init__(self) -> None:
        self.starts = 0
        self.refuse = 0

    def startService(self) -> None:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("cannot start now")
        super().startService()
        self.starts += 1


class Node:
    """
    One node: its own Redis connection, a job and the leadership over it.
    """

    def __init__(self, case: TestCase, server: RedisServer, name: str) -> None:
        self.client = RedisClient(reactor, parse_redis_url(server.url), timeout=2.0)
        self.job = Job()
        self.leadership = Leadership(reactor, self.client, "test", name, LEASE, self.job)
        case.addCleanup(self.stop)

    async def start(self) -> None:
        self.client.startService()
        await self.client.ready
        self.leadership.startService()

    async def stop(self) -> None:
        for service in (self.leadership, self.client):
            if service.running:
                await maybeDeferred(service.stopService)

    async def crash(self) -> None:
        """
        Stop trying and drop the Redis connection, giving nothing up, as
        C{kill -9} does (the job is gone with the process).
        """
        self.leadership._loop.stop()
        self.leadership.running = False
        self.job.running = False
        await maybeDeferred(self.client.stopService)


async def eventually(case: TestCase, check: Callable[[], bool], patience: float) -> float:
    """
    Wait until C{check()} holds; fail after C{patience} seconds. Fires with
    the seconds it took.
    """
    started = reactor.seconds()
    while not check():
        if reactor.seconds() - started > patience:
            case.fail(f"condition not met within {patience} s")
        await deferLater(reactor, 0.02, lambda: None)
    return reactor.seconds() - started


def running(nodes: list[Node]) -> list[Node]:
    return [node for node in nodes if node.job.running]


class LeadershipTests(TestCase):
    """
    Two or three nodes contending for one lease on a real Redis.
    """

    async def nodes(self, count: int, refuse: int = 0) -> tuple[RedisServer, list[Node]]:
        server = await RedisServer.start(self)
        nodes = [Node(self, server, f"node-{i}") for i in range(count)]
        for node in nodes:
            node.job.refuse = refuse
            await node.start()
        return server, nodes

    async def watch(self, nodes: list[Node], seconds: float, sample: Callable[[list[Node]], Any]) -> None:
        deadline = reactor.seconds() + seconds
        while reactor.seconds() < deadline:
            sample(running(nodes))
            await deferLater(reactor, 0.01, lambda: None)

    async def test_one_node_runs_it(self) -> None:
        """
        Of three nodes exactly one runs the job, the same one lease after
        lease, and its term is its node's alone.
        """
        _, nodes = await self.nodes(3)
        await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 2)
        [holder] = running(nodes)
        await self.watch(nodes, LEASE * 3, lambda now: self.assertEqual(now, [holder]))
        self.assertEqual(holder.job.starts, 1)
        self.assertEqual([node.leadership.holding for node in nodes], [node is holder for node in nodes])
        self.assertEqual(holder.leadership.term, 1)

    async def test_clean_stop_hands_over(self) -> None:
        """
        A holder that stops gives the lease up: its job stops first, and
        another node starts it within a third of the lease (it does not
        wait for the lease to lapse), with a new term.
        """
        _, nodes = await self.nodes(2)
        await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 2)
        [holder] = running(nodes)
        [other] = [node for node in nodes if node is not holder]
        await holder.stop()
        self.assertFalse(holder.job.running)
        await eventually(self, lambda: other.job.running, LEASE / 3 + 0.3)
        self.assertEqual(other.leadership.term, 2)

    async def test_dead_holder_taken_over(self) -> None:
        """
        When the holder dies, another node runs the job within 4/3 of the
        lease (plus scheduling slack), and never while the lease may still
        be the dead node's.
        """
        _, nodes = await self.nodes(3)
        await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 2)
        [holder] = running(nodes)
        await holder.crash()
        took = await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 4 / 3 + 0.4)
        self.assertGreater(took, LEASE * (1 - 1 / 3))

    async def test_cut_off_holder_stops_first(self) -> None:
        """
        A holder cut off from Redis (its connection gone, the process alive)
        stops its job by itself LOCAL_SHARE of a lease after its last
        renewal, before the lease lapses in Redis: at no moment do two nodes
        run the job. Another node takes over.
        """
        _, nodes = await self.nodes(2)
        await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 2)
        [holder] = running(nodes)
        [other] = [node for node in nodes if node is not holder]
        await maybeDeferred(holder.client.stopService)
        self.assertTrue(holder.leadership.running)
        stopped = await eventually(self, lambda: not holder.job.running, LEASE * LOCAL_SHARE + 0.2)
        self.assertLessEqual(stopped, LEASE * LOCAL_SHARE + 0.2)
        self.assertFalse(holder.leadership.holding)
        await eventually(self, lambda: other.job.running, LEASE * 2)
        self.assertEqual(len(running(nodes)), 1)

    async def test_lease_taken_away(self) -> None:
        """
        A holder whose lease another node took (it lapsed, say while the
        holder was frozen) stops its job at its next try, without taking
        the lease back.
        """
        server, nodes = await self.nodes(2)
        await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 2)
        [holder] = running(nodes)
        [other] = [node for node in nodes if node is not holder]
        # Delete the lease and have the other node take it, on the other
        # node's connection so that Redis sees the two in that order. The
        # holder's own try may still come first (its loop runs meanwhile,
        # or the other's loop has a try in flight): then try again.
        for _ in range(20):
            deleted = other.client.execute("DEL", "mrt:leader:test")
            await other.leadership.attempt()
            await deleted
            if other.job.running:
                break
            await deferLater(reactor, LEASE / 10, lambda: None)
        self.assertTrue(other.job.running)
        await eventually(self, lambda: not holder.job.running, LEASE / 3 + 0.3)
        await self.watch(nodes, LEASE, lambda now: self.assertEqual(now, [other]))

    async def test_redis_restarted_empty(self) -> None:
        """
        When Redis comes back empty, the lease is taken again by one node:
        afterwards exactly one node runs the job.
        """
        server, nodes = await self.nodes(2)
        await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 2)
        await server.restart()
        await deferLater(reactor, LEASE * 3, lambda: None)
        await eventually(self, lambda: len(running(nodes)) == 1, LEASE * 4)
        [holder] = running(nodes)
        await self.watch(nodes, LEASE, lambda now: self.assertEqual(now, [holder]))

    async def test_service_that_does_not_start(self) -> None:
        """
        A node whose service fails to start hands the lease on rather than
        holding it idle, and keeps trying: it runs the service once it
        starts.
        """
        _, [node] = await self.nodes(1, refuse=2)
        await eventually(self, lambda: node.job.running, LEASE * 2)
        self.assertEqual((node.job.starts, node.leadership.term), (1, 3))
        self.flushLoggedErrors(RuntimeError)
