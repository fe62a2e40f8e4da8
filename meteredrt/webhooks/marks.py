"""
Webhook marks in memory: L{MemoryMarks}, the L{IWebhookMarks} of a single
node, and the value types every implementation speaks.

The marks say which peers and channels the backend was told are present.
A going-away (C{peer.offline}, C{channel.vacated}) waits out the app's
grace as a pending deadline that an arrival cancels; an announcement
handed to the emitter stays "under way" until the emitter confirms it is
in the outbox, and nothing contradicting it is decided meanwhile, so the
events of one peer (channel) are stored in the order they were decided.
L{meteredrt.webhooks.redismarks.RedisMarks} keeps the same state in Redis
for a cluster; the two run one conformance suite.

Main names: L{MemoryMarks}, L{Announcement}, L{Where}, L{CLAIM_SECONDS}.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import define, frozen
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from meteredrt.interfaces import IWebhookMarks
from meteredrt.webhooks.events import new_event_id

#: A peer or a channel of an app: C{(app_id, kind, name)}, where kind is
#: L{meteredrt.webhooks.outbox.PEER} or L{meteredrt.webhooks.outbox.CHANNEL}.
Where = tuple[str, str, str]

#: How long an announcement may be under way to an outbox before it is
#: handed out again (its node died, or its outbox stopped answering).
CLAIM_SECONDS = 30.0


@frozen
class Announcement:
    """
    A decided C{peer.online}/C{channel.occupied} (C{present}) or
    C{peer.offline}/C{channel.vacated} event, to store and then confirm.

    @ivar event_id: the event's id; the same when it is handed out again.
    @ivar at: when it happened (Unix seconds): the arrival, or the end of
        the grace.
    """

    where: Where
    present: bool
    event_id: str
    at: float


@define
class _UnderWay:
    announcement: Announcement
    retry_at: float
    # The opposite is due as soon as this is stored (it came back, or its
    # grace ran out, meanwhile).
    then: bool = False


@implementer(IWebhookMarks)
class MemoryMarks:
    """
    The marks of one node, in dicts. Knows no presence of its own: on one
    node the transitions arrive in the order they happened, so an arrival
    always cancels the going-away it follows.
    """

    def __init__(self, claim_seconds: float = CLAIM_SECONDS) -> None:
        self._claim_seconds = claim_seconds
        self._marked: set[Where] = set()
        self._under_way: dict[Where, _UnderWay] = {}
        self._pending: dict[Where, float] = {}

    def _claim(self, where: Where, present: bool, event_id: str, at: float, now: float) -> Announcement:
        announcement = Announcement(where, present, event_id, at)
        self._under_way[where] = _UnderWay(announcement, now + self._claim_seconds)
        self._marked.add(where)
        return announcement

    def arrived(self, where: Where, now: float, event_id: str) -> Deferred[list[Announcement]]:
        self._pending.pop(where, None)
        under_way = self._under_way.get(where)
        if under_way is not None:
            under_way.then = not under_way.announcement.present
            return succeed([])
        if where in self._marked:
            return succeed([])
        return succeed([self._claim(where, True, event_id, now, now)])

    def going(self, where: Where, deadline: float) -> Deferred[None]:
        under_way = self._under_way.get(where)
        if under_way is not None and not under_way.announcement.present:
            under_way.then = False
        elif where in self._marked:
            self._pending.setdefault(where, deadline)
        return succeed(None)

    def due(self, now: float) -> Deferred[list[Announcement]]:
        out = []
        for where in sorted(self._under_way):
            stale = self._under_way[where]
            if stale.retry_at <= now:
                stale.retry_at = now + self._claim_seconds
                out.append(stale.announcement)
        for deadline, where in sorted((d, w) for w, d in self._pending.items() if d <= now):
            del self._pending[where]
            under_way = self._under_way.get(where)
            if under_way is not None:
                if under_way.announcement.present:
                    under_way.then = True
            elif where in self._marked:
                out.append(self._claim(where, False, new_event_id(), deadline, now))
        return succeed(out)

    def stored(self, announcements: Sequence[Announcement], now: float) -> Deferred[list[Announcement]]:
        out = []
        for announcement in announcements:
            where = announcement.where
            under_way = self._under_way.get(where)
            if under_way is None or under_way.announcement.event_id != announcement.event_id:
                continue
            del self._under_way[where]
            if under_way.then:
                out.append(self._claim(where, not announcement.present, new_event_id(), now, now))
            elif not announcement.present:
                self._marked.discard(where)
        return succeed(out)

    def restore(self, marks: Sequence[tuple[Where, float]]) -> Deferred[None]:
        for where, deadline in marks:
            if where not in self._marked:
                self._marked.add(where)
                self._pending.setdefault(where, deadline)
        return succeed(None)
