"""
One node of the cluster does a job: L{Leadership}, a lease in Redis.

Some work must be done by exactly one node at a time, such as delivering
the webhook outbox the nodes share (two deliverers would send an app's
batches out of order). L{Leadership} runs such a service on the node that
holds the role's lease, and nowhere else.

The lease is one Redis key, C{mrt:leader:<role>}, holding
C{<term>:<holder>} with an expiry of C{lease_seconds} (C{PX}: timed by
Redis's clock). Every node tries to take it every third of the lease
(L{TRY}): the holder renews it, the others take it only when it is gone.
Each taking draws a new I{term} from a counter (C{mrt:leader:<role>:term}),
so a holder renews only the lease it took, never one another node took
after its own lapsed, and the logs tell the terms apart.

The holder stops the service by itself once 80% of the lease has passed
since it sent its last successful renewal (L{LOCAL_SHARE}): the lease in
Redis outlives that deadline, so even a holder cut off from Redis, or
frozen, has stopped before anyone else can take the lease, as long as
clocks do not run 20% apart. When the holder dies, the lease lapses at
most C{lease_seconds} after its last renewal and another node takes it at
its next try: the service runs again within C{4/3 x lease_seconds}. A clean
stop gives the lease up (L{GIVE_UP}), and another node takes it within a
third of the lease.

A Redis that restarts empty forgets the lease (and the term counter): the
first node to try takes it. The holder keeps its service running if it is
that node; otherwise it stops at its next try. Until then two nodes may
run the service for up to a third of the lease, which the delivery's
guarantee (at least once) absorbs.
"""

from __future__ import annotations

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from meteredrt.redisclient import RedisClient, RedisUnavailable, Script

#: The share of the lease after its last renewal at which the holder stops
#: its service by itself, before the lease can lapse in Redis.
LOCAL_SHARE = 0.8

#: ARGV: role, holder, lease in milliseconds, the term the caller holds (0
#: for none). Renews the caller's lease, or takes the lease if nobody holds
#: it; returns the caller's term, or 0 when another node holds the lease.
TRY = Script(
    """
local key = 'mrt:leader:' .. ARGV[1]
local current = redis.call('GET', key)
if current == ARGV[4] .. ':' .. ARGV[2] then
  redis.call('PEXPIRE', key, ARGV[3])
  return tonumber(ARGV[4])
end
if current then
  return 0
end
local term = redis.call('INCR', key .. ':term')
redis.call('SET', key, term .. ':' .. ARGV[2], 'PX', ARGV[3])
return term
"""
)

#: ARGV: role, holder, term. Deletes the lease if the caller still holds it.
GIVE_UP = Script(
    """
local key = 'mrt:leader:' .. ARGV[1]
if redis.call('GET', key) == ARGV[3] .. ':' .. ARGV[2] then
  redis.call('DEL', key)
end
"""
)


class Leadership(Service):
    """
    Runs C{service} while this node holds the lease of C{role}.

    @param holder: this node's unique id (L{meteredrt.clusterwire.ClusterNode.node_id}).
    @param service: started when the lease is taken, stopped when it is
        lost or given up; not a child (nothing else starts it).
    @ivar term: the term of the lease this node holds; 0 when it holds none.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client: RedisClient,
        role: str,
        holder: str,
        lease_seconds: float,
        service: IService,
    ) -> None:
        self._clock = clock
        self._client = client
        self.role = role
        self._holder = holder
        self.lease_seconds = lease_seconds
        self._service = service
        self.term = 0
        self._deadline: IDelayedCall | None = None
        self._trying = False
        self._loop = LoopingCall(self.attempt)
        self._loop.clock = clock
        for script in (TRY, GIVE_UP):
            client.register(script)

    @property
    def holding(self) -> bool:
        """
        Whether this node holds the lease (and runs the service).
        """
        return self.term != 0

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.lease_seconds / 3, now=False)
        # Try as soon as Redis answers rather than a third of a lease later.
        self._client.ready.addCallback(lambda _: self.attempt() if self.running else None)

    def attempt(self) -> Deferred[None]:
        """
        Renew the lease, or take it if nobody holds it; start or stop the
        service accordingly. One attempt at a time.
        """
        if self._trying:
            return succeed(None)
        self._trying = True
        attempt = Deferred.fromCoroutine(self._attempt())

        def done(result: object) -> None:
            self._trying = False
            if isinstance(result, Failure):
                # Logged, not raised: a failure would end the LoopingCall.
                self.log.failure("Trying the {role} lease failed", result, role=self.role)

        return attempt.addBoth(done)

    async def _attempt(self) -> None:
        sent = self._clock.seconds()
        try:
            term = int(
                await self._client.run(
                    TRY, (), (self.role, self._holder, int(self.lease_seconds * 1000), self.term)
                )
            )
        except RedisUnavailable:
            return  # the deadline stops the service if this lasts
        except Exception:
            self.log.failure("Trying the {role} lease failed", role=self.role)
            return
        if not self.running:
            if term != 0 and term != self.term:
                # Taken while this node stopped: hand it on at once (or
                # let it lapse, if Redis is gone meanwhile).
                await self._client.run(GIVE_UP, (), (self.role, self._holder, term)).addErrback(lambda _: None)
            return
        if term == 0:
            if self.holding:
                await self._lose("another node holds the lease")
            return
        if term != self.term:
            if self.holding:
                self.log.warn(
                    "The {role} lease of term {old} vanished from Redis; this node holds it again, term {term}",
                    role=self.role, old=self.term, term=term,
                )
                self.term = term
            else:
                try:
                    self._service.startService()
                except Exception:
                    self.log.failure("The {role} service did not start; handing the lease on", role=self.role)
                    await self._client.run(GIVE_UP, (), (self.role, self._holder, term)).addErrback(lambda _: None)
                    return
                self.term = term
                self.log.info("This node took the {role} lease (term {term})", role=self.role, term=term)
        self._keep_until(sent + self.lease_seconds * LOCAL_SHARE)

    def _keep_until(self, when: float) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        delay = max(0.0, when - self._clock.seconds())
        self._deadline = self._clock.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self.holding:
            Deferred.fromCoroutine(self._lose("it could not be renewed in time"))

    async def _lose(self, why: str, expected: bool = False) -> None:
        term, self.term = self.term, 0
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        (self.log.info if expected else self.log.warn)(
            "This node stopped holding the {role} lease (term {term}): {why}", role=self.role, term=term, why=why
        )
        try:
            await maybeDeferred(self._service.stopService)
        except Exception:
            self.log.failure("Stopping the {role} service failed", role=self.role)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._give_up())

    async def _give_up(self) -> None:
        """
        Stop the service, then give the lease up so another node takes it
        within a third of the lease rather than once it lapses.
        """
        term = self.term
        if term == 0:
            return
        await self._lose("this node stops", expected=True)
        try:
            await self._client.run(GIVE_UP, (), (self.role, self._holder, term))
        except Exception as e:
            self.log.warn("Could not give up the {role} lease: {why}; it lapses by itself",
                          role=self.role, why=str(e))
