"""
From presence transitions to stored webhook events: L{WebhookEmitter}.

The presence tells the emitter (an L{IPresenceObserver}) when a peer's
first connection opens or its last one closes, when a channel gets its
first member or loses its last one, and when a member joins or leaves a
channel: each transition once, by the step that made it (on one node, or
anywhere in a cluster). The emitter:

  - debounces going away through the marks (L{IWebhookMarks}):
    C{peer.offline} and C{channel.vacated} wait for the app's grace, and a
    peer (channel) that comes back inside it cancels them, so a reload, a
    token refresh or a drain-and-reconnect sends nothing at all. The marks
    are in memory on one node (L{meteredrt.webhooks.marks.MemoryMarks}) and
    in Redis in a cluster (L{meteredrt.webhooks.redismarks.RedisMarks}),
    where any node may announce what another node's peer did;
  - sweeps the marks for due going-aways when a grace it started runs out
    and, when the marks are shared, every C{sweep_seconds} (for graces
    other nodes started, and announcements a dead node never stored);
  - keeps the online marks also in the outbox, written with the events that
    change them: after a crash or a restart every mark left over is
    announced offline (vacated) once the grace passes without the peer
    coming back;
  - writes events to the outbox in the order they were decided, one write
    at a time, batching whatever arrived meanwhile; an event counts as
    emitted once its write has fired, and then the dispatcher is woken and
    the marks are told it is stored.

Nothing here waits for the outbox on the hub's path: the hub's calls only
take note. What waits to be written is bounded (L{MAX_UNWRITTEN}); past
that, events are dropped with an error in the log, which only a store that
stopped answering can cause.

Main name: L{WebhookEmitter}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from meteredrt.apps import WebhookConfig
from meteredrt.interfaces import IPresenceObserver, IWebhookMarks, IWebhookOutbox
from meteredrt.webhooks.events import (
    CHANNEL_OCCUPIED,
    CHANNEL_VACATED,
    PEER_OFFLINE,
    PEER_ONLINE,
    PRESENCE_JOINED,
    PRESENCE_LEFT,
    WebhookEvent,
    new_event,
    new_event_id,
)
from meteredrt.webhooks.marks import Announcement, MemoryMarks, Where
from meteredrt.webhooks.outbox import CHANNEL, PEER, OnlineMark

#: At most this many events wait in memory for the outbox.
MAX_UNWRITTEN = 100_000

_GONE_EVENT = {PEER: PEER_OFFLINE, CHANNEL: CHANNEL_VACATED}
_PRESENT_EVENT = {PEER: PEER_ONLINE, CHANNEL: CHANNEL_OCCUPIED}

# What one outbox write holds per decision: the event (None when the app
# does not want it), the mark it sets or clears, the announcement to
# confirm once stored.
_Entry = tuple[WebhookEvent | None, OnlineMark | None, Announcement | None]


@define
class _Step:
    """
    One decision in the order the transitions came, filled when the marks
    have answered.
    """

    entries: list[_Entry] | None = None


@implementer(IPresenceObserver)
class WebhookEmitter(Service):
    """
    Debounces presence transitions into webhook events and stores them.

    @param configs: the current webhook configuration of an app id, or
        C{None} when the app has none (then nothing is tracked for it).
    @param on_stored: called with an app id after events of that app were
        stored (the dispatcher's C{wake}).
    @param max_unwritten: how many events may wait for the outbox.
    @param marks: where the marks live; a fresh L{MemoryMarks} (one node)
        by default.
    @param sweep_seconds: with shared marks, how often to sweep them for
        going-aways and unconfirmed announcements other nodes left; C{None}
        (one node) sweeps only when a grace this emitter started runs out.
    """

    log = Logger()

    def __init__(
        self,
        configs: Callable[[str], WebhookConfig | None],
        outbox: IWebhookOutbox,
        clock: IReactorTime,
        on_stored: Callable[[str], None],
        max_unwritten: int = MAX_UNWRITTEN,
        marks: IWebhookMarks | None = None,
        sweep_seconds: float | None = None,
    ) -> None:
        self._configs = configs
        self._max_unwritten = max_unwritten
        self._outbox = outbox
        self._clock = clock
        self._on_stored = on_stored
        self._marks: IWebhookMarks = MemoryMarks() if marks is None else marks
        self._sweep_seconds = sweep_seconds
        self._sweeper: LoopingCall | None = None
        # One sweep per deadline a grace started here runs out at.
        self._wakeups: dict[float, IDelayedCall] = {}
        # Decisions not yet answered by the marks, in the order they came.
        self._order: deque[_Step] = deque()
        self._releasing = False
        self._stopped = False
        self._sweep_failing = False
        self._unwritten: list[_Entry] = []
        self._writing: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        self.dropped = 0
        self.loaded: Deferred[None] = Deferred()

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.recover().addBoth(lambda _: self.loaded.callback(None))
        if self._sweep_seconds is not None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self._clock
            self._sweeper.start(self._sweep_seconds, now=False)

    def recover(self, delay: float = 0.0) -> Deferred[None]:
        """
        Hand the marks every online mark the outbox holds that they do not
        know, to be announced gone after the grace (or C{delay}, if longer)
        unless it comes back first. At start, those are an earlier run's,
        whose connections no longer exist. In a cluster the shared marks
        know them all, unless Redis lost its data: then this runs again
        when the node reconnects, with a C{delay} long enough for every
        node to register its connections again (a peer connected anywhere
        by the deadline is not announced gone).
        """
        return self._outbox.online_marks().addCallback(self._restore, delay).addErrback(self._recovery_failed)

    def _restore(self, stored: list[OnlineMark], delay: float) -> Deferred[None]:
        now = self._clock.seconds()
        marks = [
            ((mark.app_id, mark.kind, mark.name), now + max(delay, self._grace(mark.app_id))) for mark in stored
        ]
        for _, deadline in marks:
            self._wake_at(deadline)
        return self._marks.restore(marks)

    def _recovery_failed(self, failure: Any) -> None:
        self.log.failure("Could not restore the webhook online marks; no offline events for them", failure)

    def stopService(self) -> Deferred[None]:
        """
        Stop timers and finish writing. Pending going-away announcements are
        not sent by this process: their marks stay stored, and the next
        start (or, in a cluster, another node's sweep) announces them after
        the grace, so a restart inside the grace sends nothing.
        """
        super().stopService()
        self._stopped = True
        for call in self._wakeups.values():
            if call.active():
                call.cancel()
        self._wakeups.clear()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        if self._retry is not None and self._retry.active():
            # One last try now rather than a retry after the process ends.
            self._retry.cancel()
            self._retry = None
            self._next()
        return self.flushed()

    def flushed(self) -> Deferred[None]:
        """
        Fires once every decision taken so far is answered and stored.
        """
        if self._idle():
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiters.append(done)
        return done

    # -- IPresenceObserver --------------------------------------------------

    def peer_connected(self, app_id: str, peer_id: str) -> None:
        if self._configs(app_id) is not None:
            self._arrived((app_id, PEER, peer_id))

    def peer_disconnected(self, app_id: str, peer_id: str) -> None:
        if self._configs(app_id) is not None:
            self._going((app_id, PEER, peer_id))

    def channel_occupied(self, app_id: str, channel: str) -> None:
        if self._configs(app_id) is not None:
            self._arrived((app_id, CHANNEL, channel))

    def channel_vacated(self, app_id: str, channel: str) -> None:
        if self._configs(app_id) is not None:
            self._going((app_id, CHANNEL, channel))

    def member_joined(self, app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        self._delta(PRESENCE_JOINED, app_id, channel, peer_id, metadata)

    def member_left(self, app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        self._delta(PRESENCE_LEFT, app_id, channel, peer_id, metadata)

    def _delta(self, event_type: str, app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        config = self._configs(app_id)
        if config is None or not config.wants(event_type):
            return
        event = new_event(event_type, app_id, self._clock.seconds(), peer_id=peer_id, channel=channel,
                          metadata=metadata)
        self._in_order(succeed([(event, None, None)]))

    # -- debouncing -----------------------------------------------------------

    def _grace(self, app_id: str) -> float:
        config = self._configs(app_id)
        return 0.0 if config is None else config.offline_grace_seconds

    def _arrived(self, where: Where) -> None:
        self._decided(self._marks.arrived(where, self._clock.seconds(), new_event_id()))

    def _going(self, where: Where) -> None:
        deadline = self._clock.seconds() + self._grace(where[0])
        self._marks.going(where, deadline).addErrback(
            lambda f: self.log.failure("The webhook marks could not take note of {where} going", f, where=where)
        )
        self._wake_at(deadline)

    def _idle(self) -> bool:
        return self._writing is None and not self._unwritten and not self._order

    def _wake_at(self, deadline: float) -> None:
        if self._stopped or deadline in self._wakeups:
            # Stopped: the marks keep the deadline (for the next start, or
            # another node's sweep).
            return
        delay = max(0.0, deadline - self._clock.seconds())
        self._wakeups[deadline] = self._clock.callLater(delay, self._woken, deadline)

    def _woken(self, deadline: float) -> None:
        del self._wakeups[deadline]
        self._sweep()

    def _sweep(self) -> None:
        self._in_order(self._marks.due(self._clock.seconds()).addCallbacks(self._swept, self._sweep_failed))

    def _swept(self, announcements: list[Announcement]) -> list[_Entry]:
        if self._sweep_failing:
            self._sweep_failing = False
            self.log.info("Sweeping the webhook marks works again")
        return [self._entry(a) for a in announcements]

    def _sweep_failed(self, failure: Any) -> list[_Entry]:
        # Every second while Redis is away: say so once, not every time.
        if not self._sweep_failing:
            self._sweep_failing = True
            self.log.warn("Could not sweep the webhook marks: {why}; retrying", why=failure.getErrorMessage())
        return []

    def _decided(self, announced: Deferred[list[Announcement]]) -> None:
        self._in_order(announced.addCallback(lambda announcements: [self._entry(a) for a in announcements]))

    def _entry(self, announcement: Announcement) -> _Entry:
        app_id, kind, name = announcement.where
        event_type = (_PRESENT_EVENT if announcement.present else _GONE_EVENT)[kind]
        config = self._configs(app_id)
        event = None
        if config is not None and config.wants(event_type):
            event = WebhookEvent(
                event_id=announcement.event_id,
                type=event_type,
                app_id=app_id,
                timestamp_ms=int(round(announcement.at * 1000)),
                peer_id=name if kind == PEER else None,
                channel=name if kind == CHANNEL else None,
            )
        return event, OnlineMark(app_id, kind, name, online=announcement.present), announcement

    def _in_order(self, entries: Deferred[list[_Entry]]) -> None:
        """
        Note what a decision yields once the marks answered it, after
        everything decided before it (the marks answer in order, the
        memory ones at once; presence deltas need no answer but wait their
        turn).
        """
        step = _Step()
        self._order.append(step)

        def answered(result: list[_Entry]) -> None:
            step.entries = result
            self._release_in_order()

        def failed(failure: Any) -> None:
            self.log.failure("The webhook marks could not decide a transition", failure)
            step.entries = []
            self._release_in_order()

        entries.addCallbacks(answered, failed)

    def _release_in_order(self) -> None:
        if self._releasing:
            return  # noting can decide more (a write that fired at once): the loop below takes it
        self._releasing = True
        try:
            while self._order:
                entries = self._order[0].entries
                if entries is None:
                    return
                self._order.popleft()
                for entry in entries:
                    self._note(entry)
        finally:
            self._releasing = False
        if self._idle():
            self._release_waiters()

    # -- writing --------------------------------------------------------------

    def _note(self, entry: _Entry) -> None:
        if len(self._unwritten) >= self._max_unwritten:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                self.log.error(
                    "Webhook outbox is not keeping up: {dropped} events dropped so far", dropped=self.dropped
                )
            announcement = entry[2]
            if announcement is not None:
                # Lost, but it must not hold up what the marks decide next.
                self._confirm([announcement])
            return
        self._unwritten.append(entry)
        if self._writing is None and self._retry is None:
            self._write()

    def _write(self) -> None:
        batch, self._unwritten = self._unwritten, []
        events = [event for event, _, _ in batch if event is not None]
        marks = [mark for _, mark, _ in batch if mark is not None]
        announcements = [announcement for _, _, announcement in batch if announcement is not None]
        self._writing = self._outbox.append(events, marks)
        self._writing.addCallbacks(self._written, self._write_failed, callbackArgs=(events, announcements),
                                   errbackArgs=(batch,))

    def _written(self, _: None, events: list[WebhookEvent], announcements: list[Announcement]) -> None:
        self._writing = None
        for app_id in dict.fromkeys(event.app_id for event in events):
            self._on_stored(app_id)
        if announcements:
            self._confirm(announcements)
        self._next()

    def _confirm(self, announcements: list[Announcement]) -> None:
        """
        Tell the marks these announcements are stored; what had to wait for
        them (an arrival after a stored going-away, or the reverse) is
        decided now.
        """
        self._decided(self._marks.stored(announcements, self._clock.seconds()))

    def _write_failed(self, failure: Any, batch: list[_Entry]) -> None:
        self._writing = None
        if not self.running:
            self.log.failure("Stopping: could not store {count} webhook events", failure, count=len(batch))
            self._release_waiters()
            return
        self.log.failure("Could not store {count} webhook events; retrying in 1 s", failure, count=len(batch))
        # Put them back in front, in order, and try again shortly.
        self._unwritten[:0] = batch
        self._retry = self._clock.callLater(1.0, self._next)

    def _next(self) -> None:
        self._retry = None
        if self._writing is not None:
            return
        if self._unwritten:
            self._write()
            return
        if not self._order:
            self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
