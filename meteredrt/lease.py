"""
Node leases: how a cluster notices a dead node and cleans up after it.

L{NodeLease} is a service that renews this node's lease in Redis every
third of its length (L{meteredrt.redisscripts.TICK}: C{SET ... PX}, so the
lease is timed by Redis's clock, never by the nodes' clocks) and, in the
same round trip, learns which nodes' leases have lapsed. Each lapsed node is
claimed with L{meteredrt.redisscripts.REAP}, atomically: the first survivor
to run it removes the dead node's connections from presence and the peer
registry and announces exactly one C{left} per peer that lost its last
connection; any other finds nothing to claim. A node that dies is reaped
within its lease plus one renewal interval of a survivor (under 3 x lease).

A node that stops cleanly gives its lease up and reaps itself, so that the
others hear at once of connections it could not remove while draining.

A node that was cut off or frozen past its lease and comes back learns from
its next renewal that it was reaped (fenced) and registers its live
connections and memberships again (L{RedisPresence.resync}); the others see
them join again. The same resynchronization runs whenever the command
connection to Redis comes back, since Redis may have restarted empty.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from meteredrt import redisscripts
from meteredrt.clusterwire import EVERYONE, ClusterNode
from meteredrt.presence.redis import RedisPresence
from meteredrt.redisclient import BACKOFF_CAP, RedisClient, RedisSubscriber, RedisUnavailable


class NodeLease(Service):
    """
    Holds this node's lease and reaps the nodes whose leases lapsed.

    @param on_reaped: called with C{{app_id: connections}} for each reaped
        node: the connections it held, whose concurrent-connection counts
        a cluster-wide meter would release (per-node meters have nothing to
        release; the cluster-wide count is released by the reaper script).
    @param recount: called whenever this node registers its connections
        again (fenced, or Redis reconnected): writes its connection counts
        again (L{meteredrt.clustercount.ClusterConnectionCount.recount}).
    """

    log = Logger()

    def __init__(
        self,
        clock: object,
        client: RedisClient,
        presence: RedisPresence,
        node: ClusterNode,
        lease_seconds: float,
        on_reaped: Callable[[dict[str, int]], object] | None = None,
        recount: Callable[[], Deferred[object]] | None = None,
    ) -> None:
        self._clock = clock
        self._client = client
        self._presence = presence
        self._node = node
        self.lease_seconds = lease_seconds
        self._on_reaped = on_reaped
        self._recount = recount
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock  # type: ignore[assignment]
        self._resynced_once = False
        self._reconcile_call: IDelayedCall | None = None
        for script in (redisscripts.TICK, redisscripts.REAP):
            client.register(script)
        client.on_reconnected(self._reconnected)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.lease_seconds / 3, now=False)
        # Take the lease as soon as Redis answers: TICK goes out on the
        # command connection ahead of any connection's registration.
        self._client.ready.addCallback(lambda _: self.tick() if self.running else None)

    def reconcile_after_outage(self, subscriber: RedisSubscriber, reconcile: Callable[[], Deferred[None]]) -> None:
        """
        When C{subscriber} comes back, call C{reconcile} to tell this
        node's subscribers what they missed
        (L{meteredrt.hub.Hub.reconcile_presence}), but only once every live
        node has had time to register its connections again, should Redis
        have come back empty: the longest reconnect delay
        (L{BACKOFF_CAP}) plus one lease. Sooner, a node still reconnecting
        would look gone and its peers would be announced as left.
        """
        delay = BACKOFF_CAP + self.lease_seconds

        def later() -> None:
            if self._reconcile_call is None or not self._reconcile_call.active():
                self._reconcile_call = self._clock.callLater(delay, run)  # type: ignore[attr-defined]

        def run() -> None:
            self._reconcile_call = None
            reconcile().addErrback(lambda f: self.log.failure("Reconciling presence failed", f))

        subscriber.on_reconnected(later)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._reconcile_call is not None and self._reconcile_call.active():
            self._reconcile_call.cancel()
        self._reconcile_call = None
        if self._loop.running:
            self._loop.stop()
        if not self._client.connected:
            return None
        return Deferred.fromCoroutine(self._retire())

    async def _retire(self) -> None:
        """
        Give up the lease and reap this node at once, on a clean stop:
        whatever its drained connections left in Redis (a removal cut short)
        goes now, with its C{left}s, rather than one lease later. Sent
        behind every command before it, so it also comes after them.
        """
        lease = f"mrt:lease:{self._node.node_id}"
        try:
            self._client.execute("DEL", lease)
            reaped = await self._client.run(redisscripts.REAP, (), (self._node.node_id, self._node.prefix(EVERYONE)))
        except Exception as e:
            self.log.warn("Could not retire node {node}: {why}", node=self._node.name, why=str(e))
            return
        if reaped is not None:
            self._presence.report(reaped[1])

    def _reconnected(self) -> None:
        # The lease first, so that nobody reaps what the resync registers.
        if self.running:
            self.tick()
        self._presence.resync().addErrback(lambda f: None)
        if self._recount is not None:
            self._recount().addErrback(lambda f: self.log.warn("Recounting connections failed: {why}", why=f.getErrorMessage()))

    def tick(self) -> Deferred[None]:
        """
        Renew the lease; resynchronize if fenced; reap lapsed nodes.
        """
        return Deferred.fromCoroutine(self._tick())

    async def _tick(self) -> None:
        try:
            state, dead = await self._client.run(
                redisscripts.TICK, (), (self._node.node_id, int(self.lease_seconds * 1000))
            )
        except RedisUnavailable:
            return  # the client reconnects by itself; _reconnected resyncs
        except Exception:
            self.log.failure("Renewing the node lease failed")
            return
        if state == 2:
            self.log.warn(
                "Node {node} was reaped while cut off: registering its connections again", node=self._node.name
            )
            await self._resync()
        elif state == 0 and self._resynced_once:
            # The lease lapsed without a reap, or Redis is new: make sure.
            await self._resync()
        self._resynced_once = True
        for other in dead:
            await self._reap(other.decode())

    async def _resync(self) -> None:
        try:
            await self._presence.resync()
        except Exception:
            pass  # logged by the presence; the next tick tries again
        if self._recount is not None:
            try:
                await self._recount()
            except Exception as e:
                self.log.warn("Recounting connections failed: {why}", why=str(e))

    async def _reap(self, dead: str) -> None:
        try:
            reaped = await self._client.run(redisscripts.REAP, (), (dead, self._node.prefix(EVERYONE)))
        except Exception:
            self.log.failure("Reaping node {dead} failed", dead=dead)
            return
        if reaped is None:
            return  # another node claimed it first, or it came back
        apps, transitions = reaped
        # The dead node's peers that lost their last connection, channels
        # that lost their last member: told here, exactly once.
        self._presence.report(transitions)
        released = dict(Counter(app.decode() for app in apps))
        self.log.info("Reaped node {dead}: removed {count} connections", dead=dead, count=sum(released.values()))
        if self._on_reaped is not None:
            self._on_reaped(released)
