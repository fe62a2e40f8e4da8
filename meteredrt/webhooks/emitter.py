"""
From presence transitions to stored webhook events: L{WebhookEmitter}.

The hub tells the emitter (an L{IPresenceObserver}) when a peer's first
connection opens or its last one closes, and when a member joins or leaves
a channel. The emitter:

  - debounces going away: C{peer.offline} and C{channel.vacated} wait for
    the app's grace, and a peer (channel) that comes back inside it cancels
    them, so a reload, a token refresh or a drain-and-reconnect sends
    nothing at all;
  - keeps the online marks (which peers and channels the backend was told
    are present) in the outbox, written with the events that change them;
    after a crash or a restart every mark left over is announced offline
    (vacated) once the grace passes without the peer coming back;
  - writes events to the outbox in the order they happened, one write at a
    time, batching whatever arrived meanwhile; an event counts as emitted
    once its write has fired, and then the dispatcher is woken.

Nothing here waits for the outbox on the hub's path: the hub's calls only
take note. What waits to be written is bounded (L{MAX_UNWRITTEN}); past
that, events are dropped with an error in the log, which only a store that
stopped answering can cause.

Main name: L{WebhookEmitter}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from meteredrt.apps import WebhookConfig
from meteredrt.interfaces import IPresenceObserver, IWebhookOutbox
from meteredrt.webhooks.events import (
    CHANNEL_OCCUPIED,
    CHANNEL_VACATED,
    PEER_OFFLINE,
    PEER_ONLINE,
    PRESENCE_JOINED,
    PRESENCE_LEFT,
    WebhookEvent,
    new_event,
)
from meteredrt.webhooks.outbox import CHANNEL, PEER, OnlineMark

#: At most this many events wait in memory for the outbox.
MAX_UNWRITTEN = 100_000

_Where = tuple[str, str, str]  # (app_id, PEER or CHANNEL, name)

_GONE_EVENT = {PEER: PEER_OFFLINE, CHANNEL: CHANNEL_VACATED}
_PRESENT_EVENT = {PEER: PEER_ONLINE, CHANNEL: CHANNEL_OCCUPIED}


@implementer(IPresenceObserver)
class WebhookEmitter(Service):
    """
    Debounces presence transitions into webhook events and stores them.

    @param configs: the current webhook configuration of an app id, or
        C{None} when the app has none (then nothing is tracked for it).
    @param on_stored: called with an app id after events of that app were
        stored (the dispatcher's C{wake}).
    @param max_unwritten: how many events may wait for the outbox.
    """

    log = Logger()

    def __init__(
        self,
        configs: Callable[[str], WebhookConfig | None],
        outbox: IWebhookOutbox,
        clock: IReactorTime,
        on_stored: Callable[[str], None],
        max_unwritten: int = MAX_UNWRITTEN,
    ) -> None:
        self._configs = configs
        self._max_unwritten = max_unwritten
        self._outbox = outbox
        self._clock = clock
        self._on_stored = on_stored
        # What the backend was (or is being) told is present.
        self._present: set[_Where] = set()
        # Going-away announcements waiting out the grace.
        self._leaving: dict[_Where, IDelayedCall] = {}
        # Members per channel, to see a channel fill and empty.
        self._members: dict[tuple[str, str], int] = {}
        self._unwritten: list[tuple[WebhookEvent | None, OnlineMark | None]] = []
        self._writing: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        self.dropped = 0
        self.loaded: Deferred[None] = Deferred()

    # -- lifecycle ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._outbox.online_marks().addCallbacks(self._recover, self._recovery_failed)

    def _recover(self, marks: list[OnlineMark]) -> None:
        """
        Marks left by an earlier run belong to peers and channels that no
        connection of this process holds: announce them gone after the
        grace, unless they come back first.
        """
        for mark in marks:
            where = (mark.app_id, mark.kind, mark.name)
            if where in self._present or where in self._leaving:
                continue
            self._present.add(where)
            self._going(where)
        self.loaded.callback(None)

    def _recovery_failed(self, failure: Any) -> None:
        self.log.failure("Could not read the webhook online marks; no offline events for an earlier run", failure)
        self.loaded.callback(None)

    def stopService(self) -> Deferred[None]:
        """
        Stop timers and finish writing. Pending going-away announcements are
        not sent: their marks stay stored, and the next start announces
        them after the grace (so a restart inside the grace sends nothing).
        """
        super().stopService()
        for call in self._leaving.values():
            call.cancel()
        self._leaving.clear()
        if self._retry is not None and self._retry.active():
            # One last try now rather than a retry after the process ends.
            self._retry.cancel()
            self._retry = None
            self._next()
        return self.flushed()

    def flushed(self) -> Deferred[None]:
        """
        Fires once everything noted so far is stored.
        """
        if self._writing is None and not self._unwritten:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiters.append(done)
        return done

    # -- IPresenceObserver --------------------------------------------------

    def peer_connected(self, app_id: str, peer_id: str) -> None:
        config = self._configs(app_id)
        if config is not None:
            self._arrived(config, (app_id, PEER, peer_id))

    def peer_disconnected(self, app_id: str, peer_id: str) -> None:
        if self._configs(app_id) is not None:
            self._going((app_id, PEER, peer_id))

    def member_joined(self, app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        config = self._configs(app_id)
        if config is None:
            return
        key = (app_id, channel)
        self._members[key] = self._members.get(key, 0) + 1
        if self._members[key] == 1:
            self._arrived(config, (app_id, CHANNEL, channel))
        if config.wants(PRESENCE_JOINED):
            self._note(new_event(PRESENCE_JOINED, app_id, self._clock.seconds(), peer_id=peer_id,
                                 channel=channel, metadata=metadata), None)

    def member_left(self, app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        config = self._configs(app_id)
        if config is None:
            return
        if config.wants(PRESENCE_LEFT):
            self._note(new_event(PRESENCE_LEFT, app_id, self._clock.seconds(), peer_id=peer_id,
                                 channel=channel, metadata=metadata), None)
        key = (app_id, channel)
        count = self._members.get(key, 0) - 1
        if count > 0:
            self._members[key] = count
            return
        self._members.pop(key, None)
        self._going((app_id, CHANNEL, channel))

    # -- debouncing -----------------------------------------------------------

    def _arrived(self, config: WebhookConfig, where: _Where) -> None:
        pending = self._leaving.pop(where, None)
        if pending is not None:
            # Back inside the grace: the backend never hears it was gone.
            pending.cancel()
            return
        if where in self._present:
            return
        self._present.add(where)
        app_id, kind, name = where
        event_type = _PRESENT_EVENT[kind]
        event = self._event(event_type, where) if config.wants(event_type) else None
        self._note(event, OnlineMark(app_id, kind, name))

    def _going(self, where: _Where) -> None:
        if where not in self._present or where in self._leaving:
            return
        config = self._configs(where[0])
        grace = 0.0 if config is None else config.offline_grace_seconds
        self._leaving[where] = self._clock.callLater(grace, self._gone, where)

    def _gone(self, where: _Where) -> None:
        del self._leaving[where]
        self._present.discard(where)
        app_id, kind, name = where
        config = self._configs(app_id)
        event_type = _GONE_EVENT[kind]
        event = self._event(event_type, where) if config is not None and config.wants(event_type) else None
        self._note(event, OnlineMark(app_id, kind, name, online=False))

    def _event(self, event_type: str, where: _Where) -> WebhookEvent:
        app_id, kind, name = where
        now = self._clock.seconds()
        if kind == PEER:
            return new_event(event_type, app_id, now, peer_id=name)
        return new_event(event_type, app_id, now, channel=name)

    # -- writing --------------------------------------------------------------

    def _note(self, event: WebhookEvent | None, mark: OnlineMark | None) -> None:
        if len(self._unwritten) >= self._max_unwritten:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                self.log.error(
                    "Webhook outbox is not keeping up: {dropped} events dropped so far", dropped=self.dropped
                )
            return
        self._unwritten.append((event, mark))
        if self._writing is None and self._retry is None:
            self._write()

    def _write(self) -> None:
        batch, self._unwritten = self._unwritten, []
        events = [event for event, _ in batch if event is not None]
        marks = [mark for _, mark in batch if mark is not None]
        self._writing = self._outbox.append(events, marks)
        self._writing.addCallbacks(self._written, self._write_failed, callbackArgs=(events,),
                                   errbackArgs=(batch,))

    def _written(self, _: None, events: list[WebhookEvent]) -> None:
        self._writing = None
        for app_id in dict.fromkeys(event.app_id for event in events):
            self._on_stored(app_id)
        self._next()

    def _write_failed(self, failure: Any, batch: list[tuple[WebhookEvent | None, OnlineMark | None]]) -> None:
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
        self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
