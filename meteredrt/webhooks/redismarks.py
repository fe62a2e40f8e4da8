"""
Webhook marks shared by the nodes of a cluster: L{RedisMarks}, an
L{IWebhookMarks} in Redis.

Each call is one script (L{meteredrt.redisscripts.MARK_ARRIVED} and the
others), so every decision is atomic and taken once for the whole cluster:
the node whose presence step saw a peer's first connection anywhere asks
whether to announce it, the node that saw its last connection go records
the deadline, and whichever node sweeps first after the deadline claims
the going-away, only if presence holds the peer (channel) nowhere by then
(a reconnect on another node inside the grace, even one whose arrival
reached Redis before the disconnect it follows, sends nothing).

An announcement stays "under way" in Redis until its node confirms it is
stored in the outbox; one left unconfirmed past the claim time (its node
died between the claim and the write, or its outbox stalls) is handed to
the next sweeping node with the same event id and timestamp. So nothing a
script decided is lost with a node, and a backend de-duplicating by id sees
it once.

Deadlines and timestamps come from the calling node's clock, in
milliseconds: clock skew between nodes shifts a grace by the skew.

Main name: L{RedisMarks}.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from meteredrt import redisscripts
from meteredrt.interfaces import IWebhookMarks
from meteredrt.redisclient import RedisClient
from meteredrt.webhooks.marks import CLAIM_SECONDS, Announcement, Where

#: How often each node sweeps the shared marks: the most a going-away
#: another node started (or a dead node left) waits past its grace.
SWEEP_SECONDS = 1.0

#: Going-aways (and re-handed announcements) claimed per script call.
SWEEP_LIMIT = 100

#: Script calls per L{RedisMarks.due}: a bound on one sweep's work (the
#: next sweep goes on).
SWEEP_ROUNDS = 20


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _announcements(flat: list[bytes]) -> list[Announcement]:
    out = []
    for i in range(0, len(flat), 6):
        app, kind, name, sign, event_id, ts = (value.decode() for value in flat[i : i + 6])
        out.append(Announcement((app, kind, name), sign == "+", event_id, int(float(ts)) / 1000))
    return out


def _id_prefix() -> str:
    # 24 random hex digits; the script appends an 8-digit counter, which
    # makes an id as long as L{meteredrt.webhooks.events.new_event_id}'s.
    return "evt_" + os.urandom(12).hex()


@implementer(IWebhookMarks)
class RedisMarks:
    """
    The marks in Redis, on the node's command connection (so Redis carries
    out this node's calls in the order it made them, behind its presence
    steps).

    @param claim_seconds: how long an announcement may stay unconfirmed
        before another sweep hands it out again.
    """

    def __init__(self, client: RedisClient, claim_seconds: float = CLAIM_SECONDS, limit: int = SWEEP_LIMIT) -> None:
        self._client = client
        self._claim_ms = _ms(claim_seconds)
        self._limit = limit
        for script in redisscripts.MARKS:
            client.register(script)

    def _run(self, script: Any, args: Sequence[Any]) -> Deferred[Any]:
        return self._client.run(script, (), args)

    def arrived(self, where: Where, now: float, event_id: str) -> Deferred[list[Announcement]]:
        d = self._run(redisscripts.MARK_ARRIVED, (*where, _ms(now), event_id, self._claim_ms))
        return d.addCallback(_announcements)

    def going(self, where: Where, deadline: float) -> Deferred[None]:
        return self._run(redisscripts.MARK_GOING, (*where, _ms(deadline))).addCallback(lambda _: None)

    def due(self, now: float) -> Deferred[list[Announcement]]:
        return Deferred.fromCoroutine(self._due(now))

    async def _due(self, now: float) -> list[Announcement]:
        out: list[Announcement] = []
        for _ in range(SWEEP_ROUNDS):
            flat, more = await self._run(
                redisscripts.MARK_SWEEP, (_ms(now), self._claim_ms, _id_prefix(), self._limit)
            )
            out.extend(_announcements(flat))
            if not more:
                break
        return out

    def stored(self, announcements: Sequence[Announcement], now: float) -> Deferred[list[Announcement]]:
        args: list[Any] = [_ms(now), self._claim_ms, _id_prefix()]
        for announcement in announcements:
            args.extend((*announcement.where, announcement.event_id))
        return self._run(redisscripts.MARK_STORED, args).addCallback(_announcements)

    def restore(self, marks: Sequence[tuple[Where, float]]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._restore(marks))

    async def _restore(self, marks: Sequence[tuple[Where, float]]) -> None:
        if not self._client.connected:
            # At startup, before the first connection; later, a call fails
            # at once with the connection down.
            await self._client.ready
        # In slices, so that no one script holds Redis up for long.
        for start in range(0, len(marks), self._limit):
            args: list[Any] = []
            for where, deadline in marks[start : start + self._limit]:
                args.extend((*where, _ms(deadline)))
            await self._run(redisscripts.MARK_RESTORE, args)
