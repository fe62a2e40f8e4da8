"""
The webhook outbox: L{MemoryOutbox} and L{SQLiteOutbox}, both
L{IWebhookOutbox}.

Events are kept per app in the order they were appended (a sequence number
the store assigns) until the backend accepts them; delivered events are
deleted, and events that could not be delivered within the retry time are
kept, marked failed, for C{meteredrt webhooks replay}.

The online marks remember which peers (C{peer.online} sent) and channels
(C{channel.occupied} sent) the backend currently believes present. They are
written in the same transaction as the events that change them, so after a
crash the server knows exactly whom to announce offline.

The module-level C{read_*} functions take a plain DB-API cursor, so the
C{meteredrt webhooks} command reads the file with the standard library
L{sqlite3} module while a server runs (WAL mode).

Main names: L{SQLiteOutbox}, L{MemoryOutbox}, L{StoredEvent},
L{OnlineMark}, L{OutboxStatus}, L{webhooks_database_path}.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

from attrs import evolve, frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorCore
from zope.interface import implementer

from meteredrt.interfaces import IWebhookOutbox
from meteredrt.webhooks.events import WebhookEvent

#: The file name of the outbox inside the data directory.
WEBHOOKS_DB_NAME = "webhooks.sqlite3"

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


_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS webhook_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        app_id TEXT NOT NULL,
        body TEXT NOT NULL,
        failed INTEGER NOT NULL DEFAULT 0,
        error TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS webhook_events_app ON webhook_events (app_id, failed, seq)",
    """
    CREATE TABLE IF NOT EXISTS webhook_status (
        app_id TEXT PRIMARY KEY,
        delivered INTEGER NOT NULL DEFAULT 0,
        last_attempt_at REAL,
        last_success_at REAL,
        last_error TEXT
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS webhook_online (
        app_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('peer', 'channel')),
        name TEXT NOT NULL,
        PRIMARY KEY (app_id, kind, name)
    )
    """,
)


def webhooks_database_path(data_dir: str) -> str:
    """
    Where the outbox lives in a data directory.
    """
    return os.path.join(data_dir, WEBHOOKS_DB_NAME)


def _prepare_connection(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=5000")
    for statement in _SCHEMA:
        connection.execute(statement)
    connection.commit()


def _append(cursor: Any, events: Sequence[WebhookEvent], marks: Sequence[OnlineMark]) -> None:
    cursor.executemany(
        "INSERT INTO webhook_events (app_id, body) VALUES (?, ?)",
        [(event.app_id, json.dumps(event.to_json(), separators=(",", ":"))) for event in events],
    )
    for mark in marks:
        if mark.online:
            cursor.execute(
                "INSERT OR IGNORE INTO webhook_online (app_id, kind, name) VALUES (?, ?, ?)",
                (mark.app_id, mark.kind, mark.name),
            )
        else:
            cursor.execute(
                "DELETE FROM webhook_online WHERE app_id = ? AND kind = ? AND name = ?",
                (mark.app_id, mark.kind, mark.name),
            )


def _touch_status(cursor: Any, app_id: str) -> None:
    cursor.execute("INSERT OR IGNORE INTO webhook_status (app_id) VALUES (?)", (app_id,))


def _delivered(cursor: Any, app_id: str, seqs: Sequence[int], at: float) -> None:
    cursor.executemany("DELETE FROM webhook_events WHERE seq = ? AND app_id = ?", [(s, app_id) for s in seqs])
    _touch_status(cursor, app_id)
    cursor.execute(
        "UPDATE webhook_status SET delivered = delivered + ?, last_attempt_at = ?, last_success_at = ?"
        " WHERE app_id = ?",
        (len(seqs), at, at, app_id),
    )


def _failed(cursor: Any, app_id: str, seqs: Sequence[int], error: str, at: float) -> None:
    cursor.executemany(
        "UPDATE webhook_events SET failed = 1, error = ? WHERE seq = ? AND app_id = ?",
        [(error, s, app_id) for s in seqs],
    )
    _attempted(cursor, app_id, error, at)


def _attempted(cursor: Any, app_id: str, error: str, at: float) -> None:
    _touch_status(cursor, app_id)
    cursor.execute(
        "UPDATE webhook_status SET last_attempt_at = ?, last_error = ? WHERE app_id = ?", (at, error, app_id)
    )


def replay_failed(cursor: Any, app_id: str) -> int:
    """
    Make an app's failed events pending again (their order is their
    sequence numbers, which do not change).
    """
    cursor.execute("UPDATE webhook_events SET failed = 0, error = NULL WHERE app_id = ? AND failed = 1", (app_id,))
    return int(cursor.rowcount)


def read_status(cursor: Any, app_id: str) -> OutboxStatus:
    """
    The status of one app's webhooks.
    """
    cursor.execute(
        "SELECT COALESCE(SUM(failed = 0), 0), COALESCE(SUM(failed = 1), 0) FROM webhook_events WHERE app_id = ?",
        (app_id,),
    )
    pending, failed = cursor.fetchone()
    cursor.execute(
        "SELECT delivered, last_attempt_at, last_success_at, last_error FROM webhook_status WHERE app_id = ?",
        (app_id,),
    )
    row = cursor.fetchone()
    delivered, last_attempt_at, last_success_at, last_error = row if row else (0, None, None, None)
    return OutboxStatus(int(pending), int(failed), int(delivered), last_attempt_at, last_success_at, last_error)


def _pending_apps(cursor: Any) -> list[str]:
    cursor.execute("SELECT DISTINCT app_id FROM webhook_events WHERE failed = 0 ORDER BY app_id")
    return [row[0] for row in cursor.fetchall()]


def _next_batch(cursor: Any, app_id: str, limit: int) -> list[StoredEvent]:
    cursor.execute(
        "SELECT seq, body FROM webhook_events WHERE app_id = ? AND failed = 0 ORDER BY seq LIMIT ?",
        (app_id, limit),
    )
    return [StoredEvent(seq, WebhookEvent.from_json(json.loads(body))) for seq, body in cursor.fetchall()]


def _online_marks(cursor: Any) -> list[OnlineMark]:
    cursor.execute("SELECT app_id, kind, name FROM webhook_online ORDER BY app_id, kind, name")
    return [OnlineMark(app_id, kind, name) for app_id, kind, name in cursor.fetchall()]


@implementer(IWebhookOutbox)
class SQLiteOutbox:
    """
    The outbox in C{<data_dir>/webhooks.sqlite3}, written through a
    one-thread L{adbapi.ConnectionPool} so the reactor never waits on disk.

    Durability is the usage store's: WAL with C{synchronous=NORMAL}, so an
    appended event survives C{kill -9} of the server once L{append} fired.
    """

    def __init__(self, path: str, reactor: IReactorCore) -> None:
        self.path = path
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_prepare_connection,
            cp_reactor=reactor,
        )

    def append(self, events: Sequence[WebhookEvent], marks: Sequence[OnlineMark]) -> Deferred[None]:
        return self._pool.runInteraction(_append, list(events), list(marks))

    def pending_apps(self) -> Deferred[list[str]]:
        return self._pool.runInteraction(_pending_apps)

    def next_batch(self, app_id: str, limit: int) -> Deferred[list[StoredEvent]]:
        return self._pool.runInteraction(_next_batch, app_id, limit)

    def delivered(self, app_id: str, seqs: Sequence[int], at: float) -> Deferred[None]:
        return self._pool.runInteraction(_delivered, app_id, list(seqs), at)

    def failed(self, app_id: str, seqs: Sequence[int], error: str, at: float) -> Deferred[None]:
        return self._pool.runInteraction(_failed, app_id, list(seqs), error, at)

    def attempted(self, app_id: str, error: str, at: float) -> Deferred[None]:
        return self._pool.runInteraction(_attempted, app_id, error, at)

    def replay_failed(self, app_id: str) -> Deferred[int]:
        return self._pool.runInteraction(replay_failed, app_id)

    def status(self, app_id: str) -> Deferred[OutboxStatus]:
        return self._pool.runInteraction(read_status, app_id)

    def online_marks(self) -> Deferred[list[OnlineMark]]:
        return self._pool.runInteraction(_online_marks)

    def close(self) -> None:
        """
        Close the pool (after the last write has fired). Closing twice is
        harmless.
        """
        if self._pool.running:
            self._pool.close()
