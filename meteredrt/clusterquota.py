"""
The cluster-wide message quota and overage money of capped apps, in Redis.

In a cluster, each node admits messages of an app with
C{max_messages_per_period} from a I{slice} of the period's quota that it
took from Redis beforehand, so the hot path makes no Redis round trip per
message:

  - Redis keeps, per app and period, how many within-plan messages it has
    granted to nodes (C{mrt:<app>:mq:<period start>}, field C{granted}).
    L{TAKE} hands out C{min(asked, cap - granted)} atomically: the sum of
    all slices never exceeds the cap, so the cluster never admits more
    than the cap within plan (no over-admission).
  - A node asks for at most L{slice_size} units at a time and holds at
    most that many: it asks again, ahead of time and without waiting, once
    what it holds falls to half a slice (prefetch). A message that finds
    the slice empty waits for the request in flight (one round trip shared
    by every message waiting), never for one of its own.
  - When Redis has granted the whole cap, the units still held by the other
    nodes are the under-admission: at most C{N x slice} messages for N
    nodes. A node that stops cleanly gives its unused units back
    (L{GIVE_BACK}); a node that dies loses them for the period (at most one
    slice per dead node: nobody can know how many it had used).
  - Overage money is kept per app in Redis (C{mrt:<app>:money}, field
    C{changes}: recharges minus charges, the plan's opening balance added
    by the caller) and spent with L{RESERVE}, which applies rules 3 to 6 of
    L{meteredrt.metering} unit by unit and makes each due auto-recharge
    exactly once: two nodes can never spend the same money nor both
    recharge for the same shortfall. Overage messages reserve a slice of
    units at once (their cost is prepaid); unused ones are refunded on a
    clean stop (L{REFUND}). Connections reserve one unit each.

Seeding, and a Redis restarted empty. A key that does not exist yet (first
use of a period or of a cap, a Redis restarted empty) is seeded from the
store: the period's stored C{messages_used} (which also counts soft-dropped
messages: seeding errs towards refusing) and the app's ledger total. It is
seeded at once unless the store may still lack counts it needs:

  - Counts made from slices (and charges of units prepaid) of a Redis that
    restarted empty. A node uses those only while its Redis connection is
    up, and drops them when it comes back, so they reach the store within
    the node's flush interval of the restart. A Redis-wide marker
    (L{MARKER}: the Redis process's run id and, by Redis's clock, when a
    node first saw it; each node makes it when it connects) dates the
    restart: it is remade when missing or written by another Redis process
    (a restart, a restored snapshot, a failover, a flush). While it is
    younger than L{SETTLE_SECONDS}, seeding waits until it is that old.
  - Messages the nodes counted without a cap in this period, before the
    app got one: the last flush interval of them, and those of nodes that
    have not read the new plan yet (the key store's reload interval). Only
    a cap applied mid-period leaves such messages, and then the store
    already holds some of them. So a quota key whose period the store
    holds messages of (a cap applied mid-period, or a key Redis lost
    mid-period: the store cannot tell them apart) I{settles}: seeding
    waits L{SETTLE_SECONDS},
    measured by Redis's clock from the first request for the key, then
    reads the store again. Money has no such case: every overage unit a
    node charges is paid in Redis first.

Meanwhile messages of the capped app (and its overage) fail with
L{QuotaUnavailable}. So the first message of a period of an app capped all
along, on a Redis known for longer than L{SETTLE_SECONDS}, is decided
without waiting. The one gap: a cap applied so soon after the app's first
messages of the period that no node has flushed any of them yet finds the
store at 0, and is seeded without the messages counted uncapped (those of
at most one flush interval before the seeding, and of one reload interval
after it on nodes that have not read the cap yet).

Each seeding writes a new epoch, and units given back from an older epoch
are ignored, so nothing granted before the restart is counted twice in the
node's favour.

When Redis cannot answer, a node uses no slice (it cannot tell whether
Redis has lost them): messages of capped apps fail with
L{QuotaUnavailable} (C{backend_error}, not counted: the app's usage did
not refuse them) until Redis answers again. Apps without a message cap,
and nodes without C{[cluster]}, never come here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from attrs import define, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from meteredrt.apps import Plan
from meteredrt.interfaces import BackendUnavailable
from meteredrt.redisclient import RedisClient, Script
from meteredrt.store.usage import UsageStore

#: Seconds a missing key waits before it is seeded from the store when it
#: must settle, and how old the marker must be before any is: longer
#: than a node's flush interval and flush (so that what the nodes counted
#: from slices of a Redis that restarted empty is stored by then) plus the
#: key store's reload interval (so that every node counts a new cap).
SETTLE_SECONDS = 5.0

#: Seconds a node waits before asking Redis again for an app whose quota
#: or money it found exhausted, or when Redis could not answer; refusals
#: meanwhile are decided locally.
RECHECK_SECONDS = 1.0

#: The largest slice, whatever the cap.
MAX_SLICE = 1000

#: Seconds a period's quota key outlives the period in Redis.
KEY_GRACE = 86400


def slice_size(cap: int) -> int:
    """
    How many units a node holds at most for a cap: a hundredth of it,
    between 1 and L{MAX_SLICE}. N nodes under-admit at most N times this.
    """
    return max(1, min(MAX_SLICE, cap // 100))


#: The Redis-wide marker: a hash of the Redis process's C{run_id} and
#: C{at}, when a script first saw that process (ms, Redis's clock).
MARKER = "mrt:quota:born"

# Shared by the scripts that seed. expire: a key expires at expire_at
# (Unix seconds) unless that is 0 or already past (a node's clock far
# behind Redis's). settling: the milliseconds to wait before seeding (0
# when it may be seeded now), by Redis's clock from the first request for
# the missing key. marker_age: how long ago (ms) this Redis process was
# first seen, remaking the marker (age 0) when it is missing or names
# another process. A time ahead of Redis's clock (the clock stepped back)
# is replaced by now: a step back never makes a wait longer than settle_ms.
_SEEDING = (
    """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function expire(key, expire_at)
  local at = tonumber(expire_at)
  if at > tonumber(redis.call('TIME')[1]) then
    redis.call('EXPIREAT', key, at)
  end
end

local function settling(key, settle_ms, expire_at)
  local now = now_ms()
  local ready = tonumber(redis.call('HGET', key, 'ready') or '0')
  if ready == 0 or ready > now + tonumber(settle_ms) then
    ready = now + tonumber(settle_ms)
    redis.call('HSET', key, 'ready', string.format('%d', ready))
    expire(key, expire_at)
  end
  if now < ready then
    return ready - now
  end
  return 0
end

local function marker_age()
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local marker = redis.call('HMGET', '"""
    + MARKER
    + """', 'run_id', 'at')
  local now = now_ms()
  if marker[1] ~= run_id or not marker[2] or tonumber(marker[2]) > now then
    redis.call('HSET', '"""
    + MARKER
    + """', 'run_id', run_id, 'at', string.format('%d', now))
    return 0
  end
  return now - tonumber(marker[2])
end
"""
)

#: Makes the marker if this Redis process has none yet (on each connect,
#: so that it is old by the time a period starts); returns its age in ms.
MARK = Script(_SEEDING + "return marker_age()\n")

#: ARGV: app, period start, cap, units asked, expiry (Unix s).
#: Returns {units granted, 0, epoch}, or {-1, 0, ""} when the key is
#: missing: to be seeded (L{SEED_QUOTA}), which may say to wait.
TAKE = Script(
    """
local key = 'mrt:' .. ARGV[1] .. ':mq:' .. ARGV[2]
local granted = redis.call('HGET', key, 'granted')
if not granted then
  return {-1, 0, ''}
end
local left = tonumber(ARGV[3]) - tonumber(granted)
local give = math.min(tonumber(ARGV[4]), left)
if give > 0 then
  redis.call('HINCRBY', key, 'granted', give)
else
  give = 0
end
return {give, 0, redis.call('HGET', key, 'epoch')}
"""
)

#: ARGV: app, period start, messages already used (stored), new epoch,
#: expiry, settle ms. Seeds the quota key unless someone did first, or it
#: must wait: until the marker is settle ms old, and if the store holds
#: messages of the period, settle ms from the first request for the key.
#: Returns {1, 0} if it seeded, {0, 0} if someone did, {-1, ms to wait}.
SEED_QUOTA = Script(
    _SEEDING
    + """
local key = 'mrt:' .. ARGV[1] .. ':mq:' .. ARGV[2]
if redis.call('HEXISTS', key, 'granted') == 1 then
  return {0, 0}
end
local settle_ms = tonumber(ARGV[6])
local wait = settle_ms - marker_age()
if tonumber(ARGV[3]) > 0 then
  wait = math.max(wait, settling(key, settle_ms, ARGV[5]))
end
if wait > 0 then
  return {-1, wait}
end
redis.call('HSET', key, 'granted', ARGV[3], 'epoch', ARGV[4])
expire(key, ARGV[5])
return {1, 0}
"""
)

#: ARGV: app, period start, units, epoch. Takes unused units back if they
#: were granted in this epoch; returns 1 if it did.
GIVE_BACK = Script(
    """
local key = 'mrt:' .. ARGV[1] .. ':mq:' .. ARGV[2]
if redis.call('HGET', key, 'epoch') ~= ARGV[4] then
  return 0
end
redis.call('HINCRBY', key, 'granted', -tonumber(ARGV[3]))
return 1
"""
)

#: ARGV: app, opening balance, units asked, cost of one, auto-recharge
#: amount, auto-recharge threshold.
#: Charges up to the units asked, one by one, each with its auto-recharge
#: when due (rules 5 and 6), and stops at the first the money does not
#: cover. Returns {units charged, recharges made, epoch}, or {-1, 0, ""}
#: when the balance is missing: to be seeded (L{SEED_MONEY}).
RESERVE = Script(
    """
local key = 'mrt:' .. ARGV[1] .. ':money'
local stored = redis.call('HGET', key, 'changes')
if not stored then
  return {-1, 0, ''}
end
local changes = tonumber(stored)
local opening, cost, amount = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
local threshold = math.max(tonumber(ARGV[6]), 0)
local epsilon = 1e-9
local units, recharges = 0, 0
for _ = 1, tonumber(ARGV[3]) do
  local balance = opening + changes
  local recharge = 0
  if amount > 0 and cost > 0 and balance - cost < threshold - epsilon then
    recharge = amount
  end
  if balance + recharge - cost < -epsilon then
    break
  end
  changes = changes + recharge - cost
  units = units + 1
  if recharge > 0 then
    recharges = recharges + 1
  end
end
redis.call('HSET', key, 'changes', string.format('%.17g', changes))
return {units, recharges, redis.call('HGET', key, 'epoch')}
"""
)

#: ARGV: app, ledger total (recharges minus charges), new epoch, settle
#: ms. Seeds the money key unless someone did first, or the marker is not
#: settle ms old yet; answers as L{SEED_QUOTA}.
SEED_MONEY = Script(
    _SEEDING
    + """
local key = 'mrt:' .. ARGV[1] .. ':money'
if redis.call('HEXISTS', key, 'changes') == 1 then
  return {0, 0}
end
local wait = tonumber(ARGV[4]) - marker_age()
if wait > 0 then
  return {-1, wait}
end
redis.call('HSET', key, 'changes', ARGV[2], 'epoch', ARGV[3])
return {1, 0}
"""
)

#: ARGV: app, amount, epoch. Gives prepaid money back if it was charged
#: in this epoch; returns 1 if it did.
REFUND = Script(
    """
local key = 'mrt:' .. ARGV[1] .. ':money'
if redis.call('HGET', key, 'epoch') ~= ARGV[3] then
  return 0
end
redis.call('HINCRBYFLOAT', key, 'changes', ARGV[2])
return 1
"""
)

SCRIPTS = (MARK, TAKE, SEED_QUOTA, GIVE_BACK, RESERVE, SEED_MONEY, REFUND)


class QuotaUnavailable(BackendUnavailable):
    """
    Redis cannot say whether a message of a capped app is within its quota
    or paid for (unreachable, or the key settling): the message is not
    counted and its sender gets C{backend_error} (REST: 503), a transient
    error to retry after a short backoff, rather than a verdict on its
    usage.
    """


@frozen
class Grant:
    """
    Redis's answer to a request for units.

    @ivar units: how many were granted (0 or more).
    @ivar epoch: the key's epoch, to give unused units back in.
    @ivar recharges: auto-recharges the request made (money only).
    @ivar retry_after: seconds not to ask again, when nothing was granted.
    @ivar exhausted: nothing was granted because the cluster has no more
        units (rather than because a key settles).
    """

    units: int
    epoch: bytes = b""
    recharges: int = 0
    retry_after: float = RECHECK_SECONDS
    exhausted: bool = False


#: What a message of a capped app gets from L{QuotaBook.take}.
WITHIN = "within"  # a unit of the cap: accept within plan
OVER = "over"  # the cluster has granted the whole cap: overage rules
UNKNOWN = "unknown"  # Redis cannot say now: refuse


@define
class _Held:
    """
    Units one node holds for one key (an app's period, or an app's money
    of one kind), and the request for more in flight.
    """

    remaining: int = 0
    epoch: bytes = b""
    #: Fired (never failed) when the request in flight is answered; None
    #: when none is.
    waiters: list[Deferred[None]] | None = None
    #: Do not ask Redis before this time.
    quiet_until: float = 0.0
    #: Whether the last answer said the cluster has no more units.
    exhausted: bool = False
    #: Whether the last answer granted units.
    granted: bool = False
    #: What one unit was paid (money only).
    cost: float = 0.0
    #: Whether to ask for more ahead of time, once half a slice is left.
    prefetch: bool = True


Asker = Callable[[int], Deferred[Grant]]


def _all_settled(calls: list[Deferred[Any]]) -> Deferred[None]:
    """
    Fires once every call has, whatever its outcome: giving units back is
    best effort (what is not given back is under-admission, never more).
    """
    return DeferredList(calls, consumeErrors=True).addCallback(lambda _: None)


class _Book:
    """
    Units held per key, with prefetch: the pure part of L{QuotaBook} and
    L{MoneyBook}. Time comes from C{clock}; Redis is behind the C{ask}
    callables the subclasses pass.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, connected: Callable[[], bool]) -> None:
        self._clock = clock
        self._connected = connected
        self.held: dict[Any, _Held] = {}

    def _draw(self, key: Any, held: _Held, size: int, ask: Asker) -> bool:
        """
        Use one held unit if there is one (and Redis is reachable, so the
        unit is still valid); ask for more once half a slice is left.
        """
        if held.remaining <= 0 or not self._connected():
            return False
        held.remaining -= 1
        if held.prefetch and held.remaining <= size // 2:
            self._ask(key, held, size, ask)
        return True

    def _ask(self, key: Any, held: _Held, size: int, ask: Asker) -> None:
        """
        Ask for enough units to hold C{size}, unless a request is in flight
        or Redis said to wait.
        """
        if held.waiters is not None or self._clock.seconds() < held.quiet_until:
            return
        want = size - held.remaining
        if want <= 0:
            return
        held.waiters = []
        ask(want).addBoth(self._answered, key, held)

    def _answered(self, grant: Grant | Failure, key: Any, held: _Held) -> None:
        now = self._clock.seconds()
        held.granted = not isinstance(grant, Failure) and grant.units > 0
        if isinstance(grant, Failure):
            self.log.warn("Redis gave no quota for {key}: {why}", key=key, why=grant.getErrorMessage())
            held.quiet_until = now + RECHECK_SECONDS
        elif grant.units > 0:
            if grant.epoch != held.epoch:
                held.remaining = 0  # granted before Redis restarted: gone
            held.epoch = grant.epoch
            held.remaining += grant.units
            held.exhausted = False
        else:
            held.exhausted = grant.exhausted
            held.quiet_until = now + grant.retry_after
        waiters, held.waiters = held.waiters or [], None
        for waiter in waiters:
            waiter.callback(None)

    async def _draw_or_wait(self, key: Any, held: _Held, size: int, ask: Asker) -> bool:
        """
        The slow path: no unit held. Wait for the request in flight (or
        make one), and again while Redis keeps granting units: waiters are
        woken in arrival order, so each grant serves the oldest, and a
        burst bigger than a slice is admitted up to the cap rather than
        refused for want of units in flight. Stops at the first answer
        that grants nothing.
        """
        while True:
            if self._draw(key, held, size, ask):
                return True
            self._ask(key, held, size, ask)
            if held.waiters is None:  # not asked, or answered at once
                return self._draw(key, held, size, ask)
            waiter: Deferred[None] = Deferred()
            held.waiters.append(waiter)
            await waiter
            if not held.granted:
                return self._draw(key, held, size, ask)

    def forget(self, give_back: Callable[[Any, _Held], Deferred[object]]) -> Deferred[None]:
        """
        Give every held unit back (C{give_back} per key with units) and
        hold nothing: on a clean stop, and when Redis reconnects (it may
        have restarted empty). A request in flight is waited for and what
        it grants given back too: Redis counted those units as granted, so
        a node that stopped before they landed would lose them for the
        period.
        """
        calls: list[Deferred[Any]] = []
        for key, held in self.held.items():
            calls.append(self._give_back(key, held, give_back))
            if held.waiters is not None:
                landed: Deferred[None] = Deferred()
                held.waiters.append(landed)  # woken last: waiting messages draw first
                calls.append(landed.addCallback(lambda _, key, held: self._give_back(key, held, give_back), key, held))
        return _all_settled(calls)

    @staticmethod
    def _give_back(key: Any, held: _Held, give_back: Callable[[Any, _Held], Deferred[object]]) -> Deferred[object]:
        """
        Give back what C{held} holds now, if anything, and hold nothing.
        """
        call: Deferred[object] = give_back(key, held) if held.remaining > 0 else succeed(None)
        held.remaining = 0
        held.exhausted = False
        held.quiet_until = 0.0
        return call


class QuotaBook(_Book):
    """
    The within-plan message units this node holds, per app and period.

    @param ask: C{ask(app_id, start, end, cap, units)} asks Redis for
        units of the cap (L{ClusterQuota.take}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        ask: Callable[[str, int, int, int, int], Deferred[Grant]],
        connected: Callable[[], bool],
    ) -> None:
        super().__init__(clock, connected)
        self._asker = ask
        #: The period each app's units are held for.
        self._periods: dict[str, int] = {}

    def take(self, app_id: str, start: int, end: int, cap: int) -> Deferred[str]:
        """
        Decide on one message of an app capped at C{cap} in the period
        C{[start, end)}: L{WITHIN}, L{OVER} or L{UNKNOWN}. Fired at once
        while a unit is held or the cluster is known to be over the cap.
        """
        key = (app_id, start)
        if self._periods.get(app_id) != start:
            # A new period: what was held for the last one is worth nothing.
            previous = self._periods.get(app_id)
            self.held.pop((app_id, previous), None)
            self._periods[app_id] = start
        held = self.held.get(key)
        if held is None:
            held = self.held[key] = _Held()
        size = slice_size(cap)

        def ask(units: int) -> Deferred[Grant]:
            return self._asker(app_id, start, end, cap, units)

        if self._draw(key, held, size, ask):
            return succeed(WITHIN)
        if held.exhausted and held.waiters is None and self._clock.seconds() < held.quiet_until:
            return succeed(OVER)
        return Deferred.fromCoroutine(self._slow(key, held, size, ask))

    async def _slow(self, key: Any, held: _Held, size: int, ask: Asker) -> str:
        if await self._draw_or_wait(key, held, size, ask):
            return WITHIN
        return OVER if held.exhausted else UNKNOWN


class MoneyBook(_Book):
    """
    The overage units this node has prepaid, per app and kind (messages,
    connections), each unit at the cost it was charged.

    @param ask: C{ask(app_id, opening, cost, amount, threshold, units)}
        charges up to C{units} units in Redis (L{ClusterQuota.reserve}).
    @ivar on_recharges: called with C{(app_id, count, amount)} for the
        auto-recharges a reservation made, so that the ledger gets them.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ask: Callable[[str, float, float, float, float, int], Deferred[Grant]],
        connected: Callable[[], bool],
    ) -> None:
        super().__init__(clock, connected)
        self._asker = ask
        self.on_recharges: Callable[[str, int, float], None] = lambda app_id, count, amount: None

    def spend(
        self, app_id: str, kind: str, plan: Plan, cost: float, size: int, prefetch: bool = True
    ) -> Deferred[float | None]:
        """
        Pay one overage unit of C{kind} costing C{cost} under C{plan},
        holding up to C{size} prepaid: fires with what it cost (charged in
        Redis when it was reserved), or C{None} when the money does not
        cover it or Redis cannot say. Without C{prefetch}, nothing is
        reserved before it is needed (connections: each waits for Redis
        anyway, and a unit reserved ahead could make a recharge for a
        connection that never comes).
        """
        # Units prepaid at another price (the plan changed) stay held under
        # it until they are refunded.
        key = (app_id, kind, cost)
        held = self.held.get(key)
        if held is None:
            held = self.held[key] = _Held(cost=cost, prefetch=prefetch)

        def reserve(units: int) -> Deferred[Grant]:
            return self._asker(
                app_id, plan.balance, cost, plan.auto_recharge_amount, plan.auto_recharge_threshold, units
            ).addCallback(charged)

        def charged(grant: Grant) -> Grant:
            if grant.recharges:
                self.on_recharges(app_id, grant.recharges, plan.auto_recharge_amount)
            return grant

        if self._draw(key, held, size, reserve):
            return succeed(held.cost)
        if held.waiters is None and self._clock.seconds() < held.quiet_until:
            return succeed(None)
        return Deferred.fromCoroutine(self._slow(key, held, size, reserve))

    async def _slow(self, key: Any, held: _Held, size: int, ask: Asker) -> float | None:
        if await self._draw_or_wait(key, held, size, ask):
            return held.cost
        return None

    def broke(self, app_id: str, kind: str, cost: float) -> bool:
        """
        Whether Redis last said the app's money does not cover a unit of
        C{kind} costing C{cost} (rather than not answering, or its balance
        settling).
        """
        held = self.held.get((app_id, kind, cost))
        return held is not None and held.exhausted


class ClusterQuota(Service):
    """
    This node's side of the cluster-wide message quota and overage money:
    the two books, and the Redis scripts and store reads behind them.

    A service so that a clean stop gives the unused units back while Redis
    is still connected: the composition root adds it after the Redis
    client (so it stops before the client) and before the hub (so it stops
    after the connections drained).
    """

    log = Logger()

    def __init__(
        self, clock: IReactorTime, client: RedisClient, store: UsageStore, settle_seconds: float = SETTLE_SECONDS
    ) -> None:
        """
        :param store: the store the meters of every node flush to, which
            missing keys are seeded from.
        :param settle_seconds: how long a missing key waits before it is
            seeded when it must settle, and how old the marker must be
            for it not to (L{SETTLE_SECONDS}; shorter only in tests).
        """
        self._client = client
        self._store = store
        self._settle_ms = int(settle_seconds * 1000)
        self.messages = QuotaBook(clock, self.take, lambda: client.connected)
        self.money = MoneyBook(clock, self.reserve, lambda: client.connected)
        for script in SCRIPTS:
            client.register(script)
        client.on_reconnected(self._reconnected)
        client.ready.addCallback(lambda _: self._mark())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._forget()

    def _reconnected(self) -> None:
        # Redis may have restarted empty: nothing held is known to be valid.
        self._forget()
        self._mark()

    def _mark(self) -> None:
        """
        Make the marker of a Redis that has none as soon as a node sees it,
        so that a restart costs the settle time only to keys missing within
        L{SETTLE_SECONDS} of it (not to the next period's first messages).
        Best effort: a seeding makes it too.
        """
        self._client.run(MARK, (), ()).addErrback(
            lambda failure: self.log.warn("Could not mark Redis: {why}", why=failure.getErrorMessage())
        )

    def _forget(self) -> Deferred[None]:
        def units(key: tuple[str, int], held: _Held) -> Deferred[object]:
            app_id, start = key
            return self._client.run(GIVE_BACK, (), (app_id, start, held.remaining, held.epoch)).addErrback(
                self._not_given_back, app_id
            )

        def money(key: tuple[str, str, float], held: _Held) -> Deferred[object]:
            amount = repr(held.remaining * held.cost)
            return self._client.run(REFUND, (), (key[0], amount, held.epoch)).addErrback(
                self._not_given_back, key[0]
            )

        return _all_settled([self.messages.forget(units), self.money.forget(money)])

    def _not_given_back(self, failure: Failure, app_id: str) -> None:
        self.log.warn(
            "Unused quota of {app_id} could not be given back ({why}); lost to the period",
            app_id=app_id,
            why=failure.getErrorMessage(),
        )

    def take(self, app_id: str, start: int, end: int, cap: int, units: int) -> Deferred[Grant]:
        """
        Ask Redis for up to C{units} units of the app's cap for the period
        C{[start, end)}, seeding its key from the store if it must.
        """
        return Deferred.fromCoroutine(self._take(app_id, start, end, cap, units))

    async def _take(self, app_id: str, start: int, end: int, cap: int, units: int) -> Grant:
        expiry = end + KEY_GRACE
        for _ in range(2):
            units_or_code, _, epoch = await self._client.run(TAKE, (), (app_id, start, cap, units, expiry))
            if units_or_code >= 0:
                return Grant(units_or_code, epoch, exhausted=units_or_code == 0)
            row = await self._store.load(app_id, start)
            used = row.messages_used if row is not None else 0
            seeded, wait = await self._client.run(
                SEED_QUOTA, (), (app_id, start, used, uuid.uuid4().hex, expiry, self._settle_ms)
            )
            if seeded == -1:
                return Grant(0, retry_after=wait / 1000)
            if seeded:
                self.log.info("Seeded the message quota of {app_id} with {used} used", app_id=app_id, used=used)
        return Grant(0, retry_after=RECHECK_SECONDS)

    def reserve(
        self, app_id: str, opening: float, cost: float, amount: float, threshold: float, units: int
    ) -> Deferred[Grant]:
        """
        Charge up to C{units} overage units of C{cost} against the app's
        balance in Redis (its plan's C{opening} balance, auto-recharge
        C{amount} and C{threshold}), seeding the balance from the ledger
        if it must.
        """
        return Deferred.fromCoroutine(self._reserve(app_id, opening, cost, amount, threshold, units))

    async def _reserve(
        self, app_id: str, opening: float, cost: float, amount: float, threshold: float, units: int
    ) -> Grant:
        for _ in range(2):
            units_or_code, detail, epoch = await self._client.run(
                RESERVE,
                (),
                (app_id, repr(opening), units, repr(cost), repr(amount), repr(threshold)),
            )
            if units_or_code >= 0:
                return Grant(units_or_code, epoch, recharges=detail, exhausted=units_or_code == 0)
            changes = (await self._store.balance_changes()).get(app_id, 0.0)
            seeded, wait = await self._client.run(
                SEED_MONEY, (), (app_id, repr(changes), uuid.uuid4().hex, self._settle_ms)
            )
            if seeded == -1:
                return Grant(0, retry_after=wait / 1000)
            if seeded:
                self.log.info("Seeded the balance of {app_id} from the ledger", app_id=app_id)
        return Grant(0, retry_after=RECHECK_SECONDS)
