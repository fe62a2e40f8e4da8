"""
The webhook outbox's tables, and L{StoreOutbox}: the server's
L{meteredrt.interfaces.IWebhookOutbox} over them, on SQLite or PostgreSQL.

  - C{webhook_events}: pending and failed events, in the order they were
    appended (C{seq}, assigned by the database, increasing and never
    reused). Delivered events are deleted; failed ones are kept, marked,
    for C{meteredrt webhooks replay}.
  - C{webhook_status}: per app, what was delivered and the last attempt,
    for C{meteredrt webhooks status}.
  - C{webhook_online}: the online marks: which peers (C{peer.online} sent)
    and channels (C{channel.occupied} sent) the backend believes present.
    Written in the same transaction as the events that change them, so
    after a crash the server knows exactly whom to announce offline.

On SQLite the tables are C{webhooks.sqlite3} in the data directory, the
file earlier releases wrote with the same tables: it is adopted as schema
version 1. On PostgreSQL they are in the one shared database, where every
node of a cluster appends and one node delivers.

Order with several writers: a PostgreSQL sequence hands out numbers when a
row is inserted, not when it commits, so two nodes appending for one app at
once could commit out of order, and the deliverer could send the later
event before the earlier one is visible. L{append_events} therefore takes a
per-app advisory lock first: for each app, appends commit one after the
other, and the visible events are always a prefix of the app's order.

The module-level functions take a L{DialectCursor}, so the
C{meteredrt webhooks} command runs the same statements as the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from zope.interface import implementer

from meteredrt.interfaces import IWebhookOutbox
from meteredrt.store.dialect import POSTGRESQL, SQLITE, Dialect, DialectCursor, in_dialect
from meteredrt.store.schema import Migration, statements
from meteredrt.webhooks.events import WebhookEvent
from meteredrt.webhooks.outbox import OnlineMark, OutboxStatus, StoredEvent

#: The component name of these tables (L{meteredrt.store.schema}).
COMPONENT = "webhooks"

#: The first key of the PostgreSQL advisory locks that order one app's
#: appends ("mrt" + 2); the second is a hash of the app id.
_APPEND_LOCK = 0x6D727402

_T = TypeVar("_T")

#: The outbox's schema. Version 1 is the schema of the releases that kept
#: the outbox in a file of its own, so their files are adopted as they are.
MIGRATIONS = (
    Migration(
        1,
        "webhook events, delivery status and online marks",
        statements(
            """
            CREATE TABLE IF NOT EXISTS webhook_events (
                seq {serial},
                app_id TEXT NOT NULL,
                body TEXT NOT NULL,
                failed {int} NOT NULL DEFAULT 0,
                error TEXT
            )
            """,
            "CREATE INDEX IF NOT EXISTS webhook_events_app ON webhook_events (app_id, failed, seq)",
            """
            CREATE TABLE IF NOT EXISTS webhook_status (
                app_id TEXT PRIMARY KEY,
                delivered {int} NOT NULL DEFAULT 0,
                last_attempt_at {float},
                last_success_at {float},
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
        ),
    ),
)


def append_events(cursor: DialectCursor, events: Sequence[WebhookEvent], marks: Sequence[OnlineMark]) -> None:
    """
    Append events after every earlier one of their apps and set or clear
    online marks, in the caller's transaction.
    """
    if cursor.dialect is POSTGRESQL:
        # Sorted, so that two appends spanning the same apps cannot deadlock.
        for app_id in sorted({event.app_id for event in events}):
            cursor.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_APPEND_LOCK, app_id))
    cursor.executemany(
        "INSERT INTO webhook_events (app_id, body) VALUES (?, ?)",
        [(event.app_id, json.dumps(event.to_json(), separators=(",", ":"))) for event in events],
    )
    for mark in marks:
        if mark.online:
            cursor.execute(
                "INSERT INTO webhook_online (app_id, kind, name) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (mark.app_id, mark.kind, mark.name),
            )
        else:
            cursor.execute(
                "DELETE FROM webhook_online WHERE app_id = ? AND kind = ? AND name = ?",
                (mark.app_id, mark.kind, mark.name),
            )


def _touch_status(cursor: DialectCursor, app_id: str) -> None:
    cursor.execute("INSERT INTO webhook_status (app_id) VALUES (?) ON CONFLICT DO NOTHING", (app_id,))


def mark_delivered(cursor: DialectCursor, app_id: str, seqs: Sequence[int], at: float) -> None:
    """
    Forget delivered events and count them. Events already gone (delivered
    by an earlier holder of the delivery lease) are not counted twice.
    """
    gone = 0
    for seq in seqs:
        cursor.execute("DELETE FROM webhook_events WHERE seq = ? AND app_id = ?", (seq, app_id))
        gone += cursor.rowcount
    _touch_status(cursor, app_id)
    cursor.execute(
        "UPDATE webhook_status SET delivered = delivered + ?, last_attempt_at = ?, last_success_at = ?"
        " WHERE app_id = ?",
        (gone, at, at, app_id),
    )


def mark_failed(cursor: DialectCursor, app_id: str, seqs: Sequence[int], error: str, at: float) -> None:
    """
    Set events aside as failed, with the error.
    """
    cursor.executemany(
        "UPDATE webhook_events SET failed = 1, error = ? WHERE seq = ? AND app_id = ?",
        [(error, seq, app_id) for seq in seqs],
    )
    note_attempt(cursor, app_id, error, at)


def note_attempt(cursor: DialectCursor, app_id: str, error: str, at: float) -> None:
    """
    Record a failed delivery attempt in the app's status.
    """
    _touch_status(cursor, app_id)
    cursor.execute(
        "UPDATE webhook_status SET last_attempt_at = ?, last_error = ? WHERE app_id = ?", (at, error, app_id)
    )


def replay_failed(cursor: DialectCursor, app_id: str) -> int:
    """
    Make an app's failed events pending again (their order is their
    sequence numbers, which do not change); return how many.
    """
    cursor.execute("UPDATE webhook_events SET failed = 0, error = NULL WHERE app_id = ? AND failed = 1", (app_id,))
    return cursor.rowcount


def read_status(cursor: DialectCursor, app_id: str) -> OutboxStatus:
    """
    The status of one app's webhooks.
    """
    cursor.execute(
        "SELECT COALESCE(SUM(CASE WHEN failed = 0 THEN 1 ELSE 0 END), 0),"
        " COALESCE(SUM(CASE WHEN failed = 1 THEN 1 ELSE 0 END), 0)"
        " FROM webhook_events WHERE app_id = ?",
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


def read_pending_apps(cursor: DialectCursor) -> list[str]:
    """
    The ids of the apps with pending events.
    """
    cursor.execute("SELECT DISTINCT app_id FROM webhook_events WHERE failed = 0 ORDER BY app_id")
    return [row[0] for row in cursor.fetchall()]


def read_next_batch(cursor: DialectCursor, app_id: str, limit: int) -> list[StoredEvent]:
    """
    At most C{limit} of the app's oldest pending events.
    """
    cursor.execute(
        "SELECT seq, body FROM webhook_events WHERE app_id = ? AND failed = 0 ORDER BY seq LIMIT ?",
        (app_id, limit),
    )
    return [StoredEvent(int(seq), WebhookEvent.from_json(json.loads(body))) for seq, body in cursor.fetchall()]


def read_online_marks(cursor: DialectCursor) -> list[OnlineMark]:
    """
    Every set online mark, ordered by app, kind and name.
    """
    cursor.execute("SELECT app_id, kind, name FROM webhook_online ORDER BY app_id, kind, name")
    return [OnlineMark(app_id, kind, name) for app_id, kind, name in cursor.fetchall()]


@implementer(IWebhookOutbox)
class StoreOutbox:
    """
    The outbox in the store, each method one transaction on an C{adbapi}
    pool, so the reactor never waits for the database.

    Durability is the store's: on SQLite, WAL with C{synchronous=NORMAL},
    so an appended event survives C{kill -9} of the server once L{append}
    fired; on PostgreSQL, a committed transaction.

    :param pool: from L{meteredrt.store.database.Database.open_pool} for
        L{COMPONENT}; the outbox closes it (L{close}).
    :param dialect: the pool's database.
    """

    def __init__(self, pool: adbapi.ConnectionPool, dialect: Dialect = SQLITE) -> None:
        self._pool = pool
        self._dialect = dialect

    def _run(self, interaction: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return self._pool.runInteraction(in_dialect(self._dialect, interaction), *args)

    def append(self, events: Sequence[WebhookEvent], marks: Sequence[OnlineMark]) -> Deferred[None]:
        return self._run(append_events, list(events), list(marks))

    def pending_apps(self) -> Deferred[list[str]]:
        return self._run(read_pending_apps)

    def next_batch(self, app_id: str, limit: int) -> Deferred[list[StoredEvent]]:
        return self._run(read_next_batch, app_id, limit)

    def delivered(self, app_id: str, seqs: Sequence[int], at: float) -> Deferred[None]:
        return self._run(mark_delivered, app_id, list(seqs), at)

    def failed(self, app_id: str, seqs: Sequence[int], error: str, at: float) -> Deferred[None]:
        return self._run(mark_failed, app_id, list(seqs), error, at)

    def attempted(self, app_id: str, error: str, at: float) -> Deferred[None]:
        return self._run(note_attempt, app_id, error, at)

    def replay_failed(self, app_id: str) -> Deferred[int]:
        return self._run(replay_failed, app_id)

    def status(self, app_id: str) -> Deferred[OutboxStatus]:
        return self._run(read_status, app_id)

    def online_marks(self) -> Deferred[list[OnlineMark]]:
        return self._run(read_online_marks)

    def close(self) -> None:
        """
        Close the pool (after the last write has fired). Closing twice is
        harmless.
        """
        if self._pool.running:
            self._pool.close()
