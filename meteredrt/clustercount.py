"""
The cluster-wide concurrent connection count of capped apps, in Redis.

A L{meteredrt.metering.Meter} given a L{ClusterConnectionCount} admits a
connection of an app whose plan caps concurrent connections against the
sum over all nodes, with one atomic script (L{redisscripts.ADMIT}): two
nodes can never both admit "the last" connection. Apps without a cap make
no Redis call at all, and a node without C{[cluster]} has no count.

Redis keeps one hash per app, node id -> connections counted there, so
that a node's share can be removed on its own: the reaper script removes a
dead node's share when it claims the node, a clean stop reaps the node
itself, and a node that was fenced (or finds Redis restarted empty) writes
its live counts again with L{ClusterConnectionCount.recount}.

When Redis cannot answer (not connected, or no reply within the client's
timeout), admission of a capped app fails with
L{ConnectionCountUnavailable}: the connection is closed with 1011, a
transient error the SDK retries, rather than admitted over a cap nobody can
check. Connections already admitted stay. A release that cannot reach
Redis leaves the count one too high (it refuses, never over-admits) until
the next recount, which every reconnection to Redis and every fence runs.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from meteredrt import redisscripts
from meteredrt.clusterwire import ClusterNode
from meteredrt.interfaces import StoreUnavailable
from meteredrt.redisclient import RedisClient


class ConnectionCountUnavailable(StoreUnavailable):
    """
    Redis could not count a capped app's connection: the caller closes it
    with 1011 (transient), as for any store that cannot answer.
    """


class ClusterConnectionCount:
    """
    This node's side of the cluster-wide connection counts.

    @ivar client: the node's command connection to Redis.
    @ivar node: this node, whose share of each count this is.
    @ivar counted: per app, this node's connections counted in Redis,
        those whose admission is still on its way included (so that a
        recount sent meanwhile does not forget them).
    """

    log = Logger()

    def __init__(self, client: RedisClient, node: ClusterNode) -> None:
        self.client = client
        self.node = node
        self._node_id = node.node_id
        self.counted: dict[str, int] = {}
        for script in (redisscripts.ADMIT, redisscripts.RELEASE, redisscripts.RECOUNT):
            client.register(script)

    async def admit(self, app_id: str, cap: int, over_cap: bool) -> tuple[bool, int]:
        """
        Count one more connection of the app on this node if the cluster
        holds fewer than C{cap}, or anyway if C{over_cap} (the plan pays
        for overage).

        @return: whether it was counted, and the cluster-wide count before it.
        @raise ConnectionCountUnavailable: Redis did not answer in time.
        """
        self.counted[app_id] = self.counted.get(app_id, 0) + 1
        try:
            admitted, total = await self.client.run(
                redisscripts.ADMIT, (), (app_id, self._node_id, cap, 1 if over_cap else 0)
            )
        except Exception as e:
            self._forget(app_id)
            raise ConnectionCountUnavailable(f"cannot count connections in Redis: {e}") from e
        if not admitted:
            self._forget(app_id)
        return bool(admitted), int(total)

    def release(self, app_id: str) -> bool:
        """
        Count one connection of the app less, if this node counted one in
        Redis (an app that gained its cap while connected has none).

        @return: whether one was counted.
        """
        if not self.counted.get(app_id):
            return False
        self._forget(app_id)
        self.client.run(redisscripts.RELEASE, (), (app_id, self._node_id)).addErrback(
            lambda f: self.log.warn(
                "Could not release a connection of {app_id} in Redis ({why}); the next recount will",
                app_id=app_id,
                why=f.getErrorMessage(),
            )
        )
        return True

    def recount(self) -> Deferred[object]:
        """
        Make Redis hold exactly this node's counted connections: after the
        node was reaped while cut off, or Redis came back empty.
        L{meteredrt.lease.NodeLease} calls it, after renewing the lease
        (so that nobody reaps what it writes).
        """
        pairs: list[str | int] = []
        for app_id, count in self.counted.items():
            pairs += [app_id, count]
        return self.client.run(redisscripts.RECOUNT, (), (self._node_id, *pairs))

    def _forget(self, app_id: str) -> None:
        count = self.counted[app_id] - 1
        if count:
            self.counted[app_id] = count
        else:
            del self.counted[app_id]
