"""
Cluster-wide usage reports: C{GET /v1/usage} on any node answers for the
whole cluster.

Each node's L{meteredrt.metering.Meter} knows only its own connections and
its own counts since its last flush. A cluster report puts together:

  - C{concurrentNow}: this node's live connections plus the other nodes'
    as they last shared them in Redis. L{UsageShares} writes this node's
    live count of every app it serves into C{mrt:{app}:live} every
    L{SHARE_INTERVAL} seconds (one script for all apps, so connects of
    uncapped apps make no Redis call). A node's share counts only while
    it holds its lease: a node that dies stops counting within its lease
    (the reader forgets its share), one that stops cleanly at once.
  - C{peakConcurrent}: the largest of the sampled cluster-wide sums (each
    share round samples the sum of every app it writes into
    C{mrt:{app}:pk:{period}}), this node's own peak and what the store
    holds. Every node folds the sampled peak into its counters, so its
    flushes carry it into the ledger's peak column.
  - C{messagesUsed}, C{overageMessages}, C{overageConnections}: what the
    store holds (every node's flushes add up there when the nodes share
    one PostgreSQL database) plus what this node counted and has not
    written yet. Other nodes' counts appear once they flush: at most one
    flush interval (L{meteredrt.metering.FLUSH_INTERVAL}) late.

Main names: L{ClusterUsage} (the report and Redis's side of the shares),
L{UsageShares} (the service that shares this node's counts).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from meteredrt import redisscripts
from meteredrt.apps import App
from meteredrt.clusterwire import ClusterNode
from meteredrt.interfaces import IUsageReport
from meteredrt.metering import LiveCount, Meter
from meteredrt.redisclient import RedisClient
from meteredrt.store.usage import UsageStore

#: Seconds between two shares of a node's live counts: the staleness of
#: another node's connections in C{concurrentNow}, and the sampling period
#: of the cluster-wide peak.
SHARE_INTERVAL = 1.0

#: How long a sampled peak outlives its period in Redis: every node has
#: flushed it into the store long before.
PEAK_KEPT_AFTER_PERIOD = 7 * 86400


@implementer(IUsageReport)
class ClusterUsage:
    """
    The usage reports of a cluster node, and its shares in Redis.

    @ivar client: the node's command connection to Redis.
    @ivar node: this node.
    """

    def __init__(self, meter: Meter, store: UsageStore, client: RedisClient, node: ClusterNode) -> None:
        """
        :param meter: this node's counts.
        :param store: the usage store the nodes flush to.
        """
        self._meter = meter
        self._store = store
        self.client = client
        self.node = node
        for script in (redisscripts.USAGE_SHARE, redisscripts.USAGE_READ):
            client.register(script)

    def usage(self, app: App) -> Deferred[dict[str, object]]:
        """
        Fires with the app's cluster-wide report (§19.6); fails when Redis
        or the store cannot answer.
        """
        return Deferred.fromCoroutine(self._report(app))

    async def _report(self, app: App) -> dict[str, object]:
        report = await self._meter.usage(app)
        start = report["periodStartUnix"]
        assert isinstance(start, int)
        # Taken before the store is read: a batch written meanwhile may be
        # missed by this report (one flush late), never counted twice.
        unwritten = self._meter.unwritten(app.app_id, start)
        stored = await self._store.load(app.app_id, start)
        others, sampled_peak = await self.client.run(
            redisscripts.USAGE_READ, (), (app.app_id, self.node.node_id, start)
        )
        concurrent_now = report["concurrentNow"]
        assert isinstance(concurrent_now, int)
        concurrent_now += int(others)
        report["concurrentNow"] = concurrent_now
        report["peakConcurrent"] = max(
            concurrent_now,
            int(sampled_peak),
            unwritten.peak_concurrent,
            stored.peak_concurrent if stored else 0,
        )
        report["messagesUsed"] = unwritten.messages_used + (stored.messages_used if stored else 0)
        report["overageMessages"] = unwritten.overage_messages + (stored.overage_messages if stored else 0)
        report["overageConnections"] = unwritten.overage_connections + (stored.overage_connections if stored else 0)
        return report

    async def share(self, counts: list[LiveCount], gone: list[str], now: float) -> list[int]:
        """
        Write this node's live connections of each app in C{counts}, remove
        its share of the apps C{gone}, and sample each app's cluster-wide
        sum into its period's peak.

        @param now: this node's time, from which the peaks' lifetimes are
            counted (relative, so that Redis's clock need not agree).
        @return: the sampled peak of each app of C{counts}, in order.
        """
        args: list[str | int] = [self.node.node_id, len(gone), *gone]
        for count in counts:
            kept = max(int(count.period_end - now), 0) + PEAK_KEPT_AFTER_PERIOD
            args += [count.app_id, count.live, count.period_start, kept]
        peaks = await self.client.run(redisscripts.USAGE_SHARE, (), args)
        return [int(peak) for peak in peaks]


class UsageShares(Service):
    """
    Shares this node's live connection counts every L{SHARE_INTERVAL}
    seconds and folds the sampled cluster-wide peaks into the meter.

    A round that fails (Redis away) is logged and the next one writes the
    whole state again: every round writes every app this node serves, so
    a Redis restarted empty, or a node that was fenced, is right again one
    round after it is back.
    """

    log = Logger()

    def __init__(
        self, clock: IReactorTime, meter: Meter, usage: ClusterUsage, interval: float = SHARE_INTERVAL
    ) -> None:
        self._clock = clock
        self._meter = meter
        self._usage = usage
        self._interval = interval
        self._loop = LoopingCall(self.share)
        self._loop.clock = clock
        #: The apps whose share Redis holds, as far as this node knows.
        self._shared: set[str] = set()
        self._failing = False

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def share(self) -> Deferred[None]:
        """
        One round; never fails, so that the loop goes on.
        """
        return Deferred.fromCoroutine(self._share())

    async def _share(self) -> None:
        counts = self._meter.live_counts()
        serving = {count.app_id for count in counts}
        gone = sorted(self._shared - serving)
        if not counts and not gone:
            return
        try:
            peaks = await self._usage.share(counts, gone, self._clock.seconds())
        except Exception as e:
            if not self._failing:
                self._failing = True
                self.log.warn("Sharing live connection counts in Redis failed ({why}); retrying", why=str(e))
            return
        if self._failing:
            self._failing = False
            self.log.info("Live connection counts are shared in Redis again")
        self._shared = serving
        for count, peak in zip(counts, peaks, strict=True):
            self._meter.raise_peak(count.app_id, count.period_start, peak)
