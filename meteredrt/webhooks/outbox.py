"""
What the webhook outbox holds (L{StoredEvent}, L{OnlineMark},
L{OutboxStatus}) and L{MemoryOutbox}, the reference L{IWebhookOutbox}; the
server's outbox is in the store (L{meteredrt.store.webhooks.StoreOutbox},
SQLite or PostgreSQL).

Events are kept per app in the order they were appended (a sequence number
the store assigns) until the backend accepts them; delivered events are
deleted, and events that could not be delivered within the retry time are
kept, marked failed, for C{meteredrt webhooks replay}.

The online marks remember which peers (C{peer.online} sent) and channels
(C{channel.occupied} sent) the backend currently believes present. They are
written in the same transaction as the events that change them, so after a
crash the server knows exactly whom to announce offline.

Main names: L{MemoryOutbox}, L{StoredEvent}, L{OnlineMark},
L{OutboxStatus}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import evolve, frozen
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from meteredrt.interfaces import IWebhookOutbox
from meteredrt.webhooks.events import WebhookEvent

#: The two kinds of online mark.
PEER = "peer"
CHANNEL = "channel"


@frozen
class StoredEvent:
    """
    An event in the outbox, with its place in the app's order.
    """

    seq: int
    event: WebhookEvent


@frozen
class OnlineMark:
    """
    Set (C{online=True}) or clear the mark of a peer or a channel.

    @ivar kind: L{PEER} or L{CHANNEL}.
    """

    app_id: str
    kind: str
    name: str
    online: bool = True


@frozen
class OutboxStatus:
    """
    What C{meteredrt webhooks status} shows of one app.
    """

    pending: int = 0
    failed: int = 0
    delivered: int = 0
    last_attempt_at: float | None = None
    last_success_at: float | None = None
    last_error: str | None = None


@implementer(IWebhookOutbox)
class MemoryOutbox:
    """
    An outbox in dicts, for tests and as the reference behaviour of the
    conformance suite. Forgets everything with the process.
    """

    def __init__(self) -> None:
        self._next_seq = 1
        self._events: dict[int, tuple[StoredEvent, bool, str | None]] = {}
        self._status: dict[str, OutboxStatus] = {}
        self._marks: dict[tuple[str, str, str], OnlineMark] = {}

    def append(self, events: Sequence[WebhookEvent], marks: Sequence[OnlineMark]) -> Deferred[None]:
        for event in events:
            self._events[self._next_seq] = (StoredEvent(self._next_seq, event), False, None)
            self._next_seq += 1
        for mark in marks:
            where = (mark.app_id, mark.kind, mark.name)
            if mark.online:
                self._marks[where] = mark
            else:
                self._marks.pop(where, None)
        return succeed(None)

    def pending_apps(self) -> Deferred[list[str]]:
        apps = {stored.event.app_id for stored, failed, _ in self._events.values() if not failed}
        return succeed(sorted(apps))

    def next_batch(self, app_id: str, limit: int) -> Deferred[list[StoredEvent]]:
        batch = [
            stored
            for seq, (stored, failed, _) in sorted(self._events.items())
            if stored.event.app_id == app_id and not failed
        ]
        return succeed(batch[:limit])

    def _update(self, app_id: str, **changes: Any) -> None:
        self._status[app_id] = evolve(self._status.get(app_id, OutboxStatus()), **changes)

    def delivered(self, app_id: str, seqs: Sequence[int], at: float) -> Deferred[None]:
        gone = [seq for seq in seqs if self._events.pop(seq, None) is not None]
        status = self._status.get(app_id, OutboxStatus())
        self._update(app_id, delivered=status.delivered + len(gone), last_attempt_at=at, last_success_at=at)
        return succeed(None)

    def failed(self, app_id: str, seqs: Sequence[int], error: str, at: float) -> Deferred[None]:
        for seq in seqs:
            if seq in self._events:
                self._events[seq] = (self._events[seq][0], True, error)
        self._update(app_id, last_attempt_at=at, last_error=error)
        return succeed(None)

    def attempted(self, app_id: str, error: str, at: float) -> Deferred[None]:
        self._update(app_id, last_attempt_at=at, last_error=error)
        return succeed(None)

    def replay_failed(self, app_id: str) -> Deferred[int]:
        count = 0
        for seq, (stored, failed, _) in list(self._events.items()):
            if failed and stored.event.app_id == app_id:
                self._events[seq] = (stored, False, None)
                count += 1
        return succeed(count)

    def status(self, app_id: str) -> Deferred[OutboxStatus]:
        mine = [failed for stored, failed, _ in self._events.values() if stored.event.app_id == app_id]
        status = self._status.get(app_id, OutboxStatus())
        return succeed(evolve(status, pending=mine.count(False), failed=mine.count(True)))

    def online_marks(self) -> Deferred[list[OnlineMark]]:
        return succeed([self._marks[where] for where in sorted(self._marks)])
