"""
Faults in a three-node cluster of real processes on a real Redis, with a
lease of one second: a node killed with SIGKILL, frozen past its lease and
thawed, cut off from Redis by a proxy, Redis itself killed and restarted
empty under traffic, and a frozen node next to busy ones.

Each test checks the invariants of docs/cluster.md from a watcher's
connection and from the REST view of the surviving nodes: no ghosts, exactly
one C{left} per peer that lost its last connection and none for the others,
within three leases (plus L{SLACK} for a loaded test machine).

Layout of every test: the watcher C{w} on node-1, C{p2} on node-2, C{p3} on
node-3, and C{multi} connected to both node-2 and node-3; all in
C{faults/room}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from .cluster import LEASE_SECONDS, Cluster, Peer, connect_peer, peers_of, start_cluster, wait_until

ROOM = "faults/room"

#: Measured times go to the test log (_trial_temp/test.log), for docs/cluster.md.
log = Logger()

#: Scheduling slack on top of the documented bounds: the test machine runs
#: several suites at once on two cores.
SLACK = 2.0

#: A dead node's connections are reaped within three leases.
REAP_BOUND = 3 * LEASE_SECONDS + SLACK


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class FaultTests(TestCase):
    timeout = 120

    async def setUpCluster(self, proxied: tuple[int, ...] = ()) -> Cluster:
        """
        Start the cluster and the layout of the module docstring; fires once
        the watcher has seen every peer join.
        """
        self.cluster = cluster = await start_cluster(self, nodes=3, proxied=proxied)
        self.w = await connect_peer(self, cluster[0], "w")
        self.assertEqual((await self.w.subscribe(ROOM))["type"], "ack")
        self.p2 = await connect_peer(self, cluster[1], "p2")
        self.p3 = await connect_peer(self, cluster[2], "p3")
        self.multi_2 = await connect_peer(self, cluster[1], "multi")
        self.multi_3 = await connect_peer(self, cluster[2], "multi")
        acks = await gatherResults([p.subscribe(ROOM) for p in (self.p2, self.p3, self.multi_2, self.multi_3)])
        self.assertEqual({a["type"] for a in acks}, {"ack"}, acks)
        await wait_until(
            lambda: all(self.w.joins(ROOM, peer) == 1 for peer in ("p2", "p3", "multi")), 10, "w sees everyone join"
        )
        return cluster

    @property
    def peers(self) -> list[Peer]:
        return [self.w, self.p2, self.p3, self.multi_2, self.multi_3]

    async def assert_membership(self, nodes: list[int], expected: set[str], within: float, what: str) -> float:
        """
        Wait until every node in C{nodes} lists exactly C{expected} in the
        room (REST), within C{within} seconds; fires with the time taken.
        """

        async def agreed() -> bool:
            try:
                listed = [await peers_of(self.cluster[i], ROOM) for i in nodes]
            except Exception:
                return False
            return all(members == expected for members in listed)

        return await wait_until(agreed, within, what)

    async def assert_reaped(self, lost: set[str], kept: set[str]) -> float:
        """
        The watcher sees exactly one C{left} for each peer in C{lost} within
        L{REAP_BOUND}, and, a lease later, still one, and none for C{kept}.
        """
        took = await wait_until(
            lambda: all(self.w.lefts(ROOM, peer) >= 1 for peer in lost), REAP_BOUND, f"w sees {lost} leave"
        )
        await sleep(LEASE_SECONDS * 1.5)
        self.assertEqual({peer: self.w.lefts(ROOM, peer) for peer in lost}, dict.fromkeys(lost, 1))
        self.assertEqual({peer: self.w.lefts(ROOM, peer) for peer in kept}, dict.fromkeys(kept, 0))
        return took

    def assert_open(self, peers: list[Peer]) -> None:
        self.assertEqual([p.closed.called for p in peers], [False] * len(peers))

    async def test_kill_9(self) -> None:
        """
        node-3 killed with SIGKILL: p3 (only there) leaves exactly once,
        multi (also on node-2) does not; the survivors list no ghost.
        """
        await self.setUpCluster()
        await self.cluster[2].kill()
        took = await self.assert_reaped(lost={"p3"}, kept={"p2", "multi"})
        log.info("kill -9: left seen {s:.2f}s after the kill", s=took)
        await self.assert_membership([0, 1], {"w", "p2", "multi"}, 0.1 + SLACK, "no ghost after the kill")
        self.assert_open([self.w, self.p2, self.multi_2])

    async def test_freeze_past_lease_then_thaw(self) -> None:
        """
        node-3 stopped (SIGSTOP) for four leases is reaped like a dead node;
        once it continues it finds itself fenced and registers its live
        connections again: the others see p3 join again, once.
        """
        await self.setUpCluster()
        self.cluster[2].freeze()
        try:
            took = await self.assert_reaped(lost={"p3"}, kept={"p2", "multi"})
            log.info("SIGSTOP: left seen {s:.2f}s after the freeze", s=took)
            await self.assert_membership([0, 1], {"w", "p2", "multi"}, 0.1 + SLACK, "no ghost while frozen")
        finally:
            self.cluster[2].thaw()
        took = await wait_until(lambda: self.w.joins(ROOM, "p3") == 2, REAP_BOUND, "w sees p3 join again")
        log.info("SIGCONT: joined again {s:.2f}s after the thaw", s=took)
        await self.assert_membership([0, 1, 2], {"w", "p2", "p3", "multi"}, LEASE_SECONDS + SLACK, "p3 is back")
        self.assertEqual(self.w.joins(ROOM, "multi"), 1)
        self.assert_open(self.peers)
        # p3's subscription works again across nodes.
        self.assertEqual((await self.p2.publish(ROOM, "after thaw"))["type"], "ack")
        await self.p3.received(1).addTimeout(5, reactor)

    async def test_cut_off_from_redis(self) -> None:
        """
        node-3 cut off from Redis by a proxy: the others reap it; its own
        clients stay connected and what needs Redis answers backend_error
        instead of hanging; once the link is back it registers again.
        """
        cluster = await self.setUpCluster(proxied=(2,))
        proxy = cluster[2].proxy
        assert proxy is not None
        await proxy.cut()
        took = await self.assert_reaped(lost={"p3"}, kept={"p2", "multi"})
        log.info("cut off: left seen {s:.2f}s after the cut", s=took)
        answer = await self.p3.send("p2", "across the cut").addTimeout(10, reactor)
        self.assertEqual((answer["type"], answer.get("code")), ("error", "backend_error"), answer)
        self.assert_open(self.peers)
        await proxy.restore()
        took = await wait_until(lambda: self.w.joins(ROOM, "p3") == 2, REAP_BOUND + 5, "w sees p3 join again")
        log.info("link back: joined again {s:.2f}s after the restore", s=took)
        await self.assert_membership([0, 1, 2], {"w", "p2", "p3", "multi"}, LEASE_SECONDS + SLACK, "p3 is back")
        answer = await self.p3.send("p2", "link is back").addTimeout(10, reactor)
        self.assertEqual(answer["type"], "ack", answer)

    async def test_blackholed_from_redis(self) -> None:
        """
        node-3's link to Redis goes silent (packets dropped, nothing reset):
        a send that needs Redis still answers backend_error within the
        client's deadline instead of hanging, the others reap node-3, and it
        registers again once the link is back.
        """
        cluster = await self.setUpCluster(proxied=(2,))
        proxy = cluster[2].proxy
        assert proxy is not None
        await proxy.cut(blackhole=True)
        answer = await self.p3.send("p2", "into the void").addTimeout(10, reactor)
        self.assertEqual((answer["type"], answer.get("code")), ("error", "backend_error"), answer)
        await self.assert_reaped(lost={"p3"}, kept={"p2", "multi"})
        self.assert_open(self.peers)
        await proxy.restore()
        await wait_until(lambda: self.w.joins(ROOM, "p3") == 2, REAP_BOUND + 5, "w sees p3 join again")
        await self.assert_membership([0, 1, 2], {"w", "p2", "p3", "multi"}, LEASE_SECONDS + SLACK, "p3 is back")

    async def test_node_dies_while_redis_is_down(self) -> None:
        """
        node-3 dies while Redis is down, and Redis comes back empty: nobody
        holds the dead node's state any more, yet the survivors' clients
        must not keep a ghost: p3 leaves once, multi (still on node-2) not.
        """
        cluster = await self.setUpCluster()
        await cluster.redis.kill()
        await cluster[2].kill()
        await cluster.redis.restart()
        await self.assert_membership([0, 1], {"w", "p2", "multi"}, 5 + LEASE_SECONDS + SLACK, "REST has no ghost")
        await wait_until(lambda: self.w.lefts(ROOM, "p3") == 1, 5 + 3 * LEASE_SECONDS + SLACK, "w sees p3 leave")
        await sleep(LEASE_SECONDS * 1.5)
        self.assertEqual((self.w.lefts(ROOM, "p3"), self.w.lefts(ROOM, "multi"), self.w.lefts(ROOM, "p2")), (1, 0, 0))

    async def test_redis_restarted_empty_under_traffic(self) -> None:
        """
        Redis killed and restarted empty while p2 publishes: no WebSocket
        closes, publishes stay acked, local delivery goes on, a cross-node
        send answers backend_error during the outage, and once Redis is back
        presence converges on every node and nobody was reported gone.
        """
        cluster = await self.setUpCluster()
        local = await connect_peer(self, cluster[1], "local")
        self.assertEqual((await local.subscribe(ROOM))["type"], "ack")
        await wait_until(lambda: self.w.joins(ROOM, "local") == 1, 10, "w sees local join")

        answers: list[dict[str, Any]] = []
        publishing = True

        async def traffic() -> None:
            for n in range(2000):
                if not publishing:
                    return
                answers.append(await self.p2.publish(ROOM, n).addTimeout(5, reactor))
                await sleep(0.02)

        traffic_done = Deferred.fromCoroutine(traffic())
        await sleep(0.3)
        await cluster.redis.kill()
        await sleep(0.3)
        during = await self.p2.send("p3", "needs redis").addTimeout(10, reactor)
        self.assertEqual((during["type"], during.get("code")), ("error", "backend_error"), during)
        received_before = local.messages
        await sleep(0.5)
        self.assertGreater(local.messages, received_before, "local delivery stopped during the outage")
        await cluster.redis.restart()
        restarted = reactor.seconds()
        everyone = {"w", "p2", "p3", "multi", "local"}
        # The nodes reconnect with a backoff capped at 5 s, then resynchronize.
        await self.assert_membership([0, 1, 2], everyone, 5 + LEASE_SECONDS + SLACK, "presence converges")
        publishing = False
        await traffic_done
        self.assertEqual({a["type"] for a in answers}, {"ack"}, [a for a in answers if a["type"] != "ack"][:3])
        self.assert_open([*self.peers, local])
        self.assertEqual([e for e in self.w.presence_events(ROOM) if e[0] == "left"], [])
        # Cross-node delivery resumes once w's node has its subscriber
        # connection back, which reconnects on its own backoff (up to 5 s):
        # publish until one arrives (at-most-once: earlier ones may be lost).
        after = self.w.messages

        async def delivered_again() -> bool:
            self.assertEqual((await self.p2.publish(ROOM, "after")).get("type"), "ack")
            return self.w.messages > after

        await wait_until(delivered_again, 10, "cross-node delivery resumes", interval=0.2)
        log.info("presence converged {s:.2f}s after the Redis restart", s=reactor.seconds() - restarted)

    async def test_slow_node_does_not_slow_others(self) -> None:
        """
        With node-3 frozen (its subscribers unread), 100 publishes from
        node-2 reach the watcher on node-1 about as fast as before.
        """
        await self.setUpCluster()

        async def burst(first: int) -> float:
            start = reactor.seconds()
            wanted = self.w.messages + 100
            for n in range(first, first + 100):
                await self.p2.publish(ROOM, n)
                # The server allows 100 messages/s per connection.
                await sleep(0.011)
            await self.w.received(wanted).addTimeout(20, reactor)
            return float(reactor.seconds() - start)

        before = await burst(0)
        self.cluster[2].freeze()
        try:
            during = await burst(100)
        finally:
            self.cluster[2].thaw()
        log.info("100 publishes: {before:.2f}s before, {during:.2f}s with a node frozen", before=before, during=during)
        self.assertLess(during, before * 2 + 1.0, (before, during))
