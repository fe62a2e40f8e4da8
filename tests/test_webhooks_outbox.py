"""
One conformance suite for L{IWebhookOutbox}, run against L{MemoryOutbox}
and L{StoreOutbox} on SQLite and on a real throwaway PostgreSQL; then what
only the store does: adopt the files of earlier releases, survive a reopen,
and keep one app's order when several nodes append at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import TYPE_CHECKING, Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from meteredrt.interfaces import IWebhookOutbox
from meteredrt.store import webhooks as webhook_tables
from meteredrt.store.database import Database
from meteredrt.store.dialect import POSTGRESQL, SQLITE, DialectCursor
from meteredrt.store.webhooks import StoreOutbox, append_events
from meteredrt.webhooks.events import PEER_OFFLINE, PEER_ONLINE, PRESENCE_JOINED, WebhookEvent, new_event
from meteredrt.webhooks.outbox import (
    CHANNEL,
    PEER,
    MemoryOutbox,
    OnlineMark,
    OutboxStatus,
)
from tests.postgres_server import fresh_database

if TYPE_CHECKING:
    _MixinBase = TestCase
else:
    _MixinBase = object


def _events(app_id: str, count: int, kind: str = PEER_ONLINE) -> list[WebhookEvent]:
    return [new_event(kind, app_id, 1000.0 + i, peer_id=f"p{i}") for i in range(count)]


class OutboxTestsMixin(_MixinBase):
    """
    What every outbox does. Subclasses set C{outbox} in C{setUp}.
    """

    outbox: IWebhookOutbox

    def test_interface(self) -> None:
        """
        It provides L{IWebhookOutbox}.
        """
        self.assertTrue(verifyObject(IWebhookOutbox, self.outbox))

    async def test_order_and_batches(self) -> None:
        """
        Events come back per app, in the order appended, at most C{limit} at
        a time, and each keeps its id and fields.
        """
        first = _events("a", 3)
        await self.outbox.append(first + _events("b", 1), [])
        await self.outbox.append(_events("a", 2, PEER_OFFLINE), [])
        batch = await self.outbox.next_batch("a", 4)
        self.assertEqual([s.event for s in batch[:3]], first)
        self.assertEqual(batch[3].event.type, PEER_OFFLINE)
        self.assertEqual([s.seq for s in batch], sorted(s.seq for s in batch))
        self.assertEqual(await self.outbox.pending_apps(), ["a", "b"])

    async def test_metadata_round_trip(self) -> None:
        """
        Metadata, channels and unicode survive the store.
        """
        event = new_event(PRESENCE_JOINED, "a", 5.5, peer_id="ünï", channel="room/1", metadata={"n": [1, "x"]})
        await self.outbox.append([event], [])
        [stored] = await self.outbox.next_batch("a", 10)
        self.assertEqual(stored.event, event)

    async def test_delivered(self) -> None:
        """
        Delivered events are gone; the status counts them and the time.
        """
        await self.outbox.append(_events("a", 3), [])
        batch = await self.outbox.next_batch("a", 2)
        await self.outbox.delivered("a", [s.seq for s in batch], 50.0)
        rest = await self.outbox.next_batch("a", 10)
        self.assertEqual([s.event.peer_id for s in rest], ["p2"])
        status = await self.outbox.status("a")
        self.assertEqual(status, OutboxStatus(pending=1, failed=0, delivered=2, last_attempt_at=50.0,
                                              last_success_at=50.0))
        await self.outbox.delivered("a", [rest[0].seq], 51.0)
        self.assertEqual(await self.outbox.pending_apps(), [])

    async def test_delivered_twice(self) -> None:
        """
        A batch acknowledged twice (delivered by a node that lost the
        delivery lease and again by the next one) is counted once.
        """
        await self.outbox.append(_events("a", 2), [])
        seqs = [s.seq for s in await self.outbox.next_batch("a", 10)]
        await self.outbox.delivered("a", seqs, 50.0)
        await self.outbox.delivered("a", seqs, 51.0)
        status = await self.outbox.status("a")
        self.assertEqual((status.pending, status.delivered, status.last_success_at), (0, 2, 51.0))

    async def test_failed_and_replay(self) -> None:
        """
        Failed events leave the pending queue, are counted, and a replay
        brings them back in their original order, before later events.
        """
        await self.outbox.append(_events("a", 2), [])
        batch = await self.outbox.next_batch("a", 10)
        await self.outbox.failed("a", [s.seq for s in batch], "the receiver answered HTTP 400", 60.0)
        await self.outbox.append([new_event(PEER_OFFLINE, "a", 70.0, peer_id="late")], [])
        status = await self.outbox.status("a")
        self.assertEqual((status.pending, status.failed), (1, 2))
        self.assertEqual(status.last_error, "the receiver answered HTTP 400")
        self.assertEqual(status.last_success_at, None)
        self.assertEqual(await self.outbox.replay_failed("a"), 2)
        self.assertEqual(await self.outbox.replay_failed("a"), 0)
        again = await self.outbox.next_batch("a", 10)
        self.assertEqual([s.event.peer_id for s in again], ["p0", "p1", "late"])

    async def test_attempted(self) -> None:
        """
        A failed attempt is shown in the status and keeps events pending.
        """
        await self.outbox.append(_events("a", 1), [])
        await self.outbox.attempted("a", "no answer within 10 s", 80.0)
        status = await self.outbox.status("a")
        self.assertEqual((status.pending, status.last_attempt_at, status.last_error),
                         (1, 80.0, "no answer within 10 s"))

    async def test_status_of_unknown_app(self) -> None:
        """
        An app that never had events has an empty status.
        """
        self.assertEqual(await self.outbox.status("nobody"), OutboxStatus())

    async def test_marks(self) -> None:
        """
        Marks are set and cleared with the events, idempotently.
        """
        await self.outbox.append([], [OnlineMark("a", PEER, "alice"), OnlineMark("a", CHANNEL, "room"),
                                      OnlineMark("a", PEER, "alice")])
        await self.outbox.append(_events("a", 1), [OnlineMark("b", PEER, "bob"),
                                                   OnlineMark("a", CHANNEL, "room", online=False)])
        await self.outbox.append([], [OnlineMark("a", CHANNEL, "never", online=False)])
        self.assertEqual(await self.outbox.online_marks(),
                         [OnlineMark("a", PEER, "alice"), OnlineMark("b", PEER, "bob")])


class MemoryOutboxTests(OutboxTestsMixin, TestCase):
    """
    The conformance suite against L{MemoryOutbox}.
    """

    def setUp(self) -> None:
        self.outbox = MemoryOutbox()


class SQLiteOutboxTests(OutboxTestsMixin, TestCase):
    """
    The conformance suite against L{StoreOutbox} on SQLite, plus
    durability and the files of earlier releases.
    """

    def setUp(self) -> None:
        self.database = Database(self.mktemp())
        self.outbox = self._open()

    def _open(self) -> StoreOutbox:
        pool = self.database.open_pool(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS, reactor)
        outbox = StoreOutbox(pool, SQLITE)
        self.addCleanup(outbox.close)
        return outbox

    async def test_survives_reopen(self) -> None:
        """
        Events, marks, failures and the status outlive the process's pool.
        """
        await self.outbox.append(_events("a", 2), [OnlineMark("a", PEER, "alice")])
        [first, _] = await self.outbox.next_batch("a", 10)
        await self.outbox.delivered("a", [first.seq], 90.0)
        self.outbox.close()
        reopened = self._open()
        self.assertEqual([s.event.peer_id for s in await reopened.next_batch("a", 10)], ["p1"])
        self.assertEqual(await reopened.online_marks(), [OnlineMark("a", PEER, "alice")])
        self.assertEqual((await reopened.status("a")).delivered, 1)

    def test_path(self) -> None:
        """
        The outbox is a file of its own in the data directory, the one
        earlier releases wrote.
        """
        self.assertEqual(Database("/d").sqlite_path(webhook_tables.COMPONENT), "/d/webhooks.sqlite3")

    async def test_adopts_earlier_file(self) -> None:
        """
        A C{webhooks.sqlite3} written by a release that kept the outbox
        apart from the store (its tables, no schema version) is adopted:
        its pending events, failures, status and marks are all there, and
        new events come after the old ones.
        """
        self.outbox.close()
        os.remove(self.database.sqlite_path(webhook_tables.COMPONENT))
        old = sqlite3.connect(self.database.sqlite_path(webhook_tables.COMPONENT))
        old.executescript(_EARLIER_SCHEMA)
        body = json.dumps(_events("a", 1)[0].to_json())
        old.execute("INSERT INTO webhook_events (app_id, body) VALUES ('a', ?)", (body,))
        old.execute("INSERT INTO webhook_events (app_id, body, failed, error) VALUES ('a', ?, 1, 'HTTP 400')", (body,))
        old.execute("INSERT INTO webhook_status (app_id, delivered) VALUES ('a', 7)")
        old.execute("INSERT INTO webhook_online VALUES ('a', 'peer', 'alice')")
        old.commit()
        old.close()
        adopted = self._open()
        await adopted.append(_events("a", 1, PEER_OFFLINE), [])
        status = await adopted.status("a")
        self.assertEqual((status.pending, status.failed, status.delivered), (2, 1, 7))
        self.assertEqual(await adopted.online_marks(), [OnlineMark("a", PEER, "alice")])
        batch = await adopted.next_batch("a", 10)
        self.assertEqual([s.event.type for s in batch], [PEER_ONLINE, PEER_OFFLINE])

    async def test_sequence_never_reused(self) -> None:
        """
        After every event was delivered, the next one still gets a higher
        sequence number: a late acknowledgement of a delivered batch can
        never delete a newer event.
        """
        await self.outbox.append(_events("a", 1), [])
        [first] = await self.outbox.next_batch("a", 10)
        await self.outbox.delivered("a", [first.seq], 1.0)
        await self.outbox.append(_events("a", 1), [])
        [second] = await self.outbox.next_batch("a", 10)
        self.assertGreater(second.seq, first.seq)


#: The outbox schema of the releases before it moved into the store.
_EARLIER_SCHEMA = """
CREATE TABLE webhook_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    body TEXT NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX webhook_events_app ON webhook_events (app_id, failed, seq);
CREATE TABLE webhook_status (
    app_id TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,
    last_success_at REAL,
    last_error TEXT
);
CREATE TABLE webhook_online (
    app_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('peer', 'channel')),
    name TEXT NOT NULL,
    PRIMARY KEY (app_id, kind, name)
);
"""


class PostgreSQLOutboxTests(OutboxTestsMixin, TestCase):
    """
    The conformance suite against L{StoreOutbox} on a real PostgreSQL, plus
    several nodes appending into one outbox.
    """

    def setUp(self) -> None:
        self.database = Database(self.mktemp(), fresh_database())
        self.outbox = self._open()

    def _open(self) -> StoreOutbox:
        pool = self.database.open_pool(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS, reactor)
        outbox = StoreOutbox(pool, POSTGRESQL)
        self.addCleanup(outbox.close)
        return outbox

    async def test_nodes_append_concurrently(self) -> None:
        """
        Three nodes (pools of their own) appending to one app at once: every
        event is stored once, and each node's events keep the order that
        node appended them in.
        """
        nodes = [self._open() for _ in range(3)]
        rounds = 20

        async def node_appends(index: int, outbox: StoreOutbox) -> None:
            for n in range(rounds):
                await outbox.append([new_event(PEER_ONLINE, "a", float(n), peer_id=f"n{index}-{n}")], [])

        await gatherResults([Deferred.fromCoroutine(node_appends(i, o)) for i, o in enumerate(nodes)])
        batch = await self.outbox.next_batch("a", 1000)
        self.assertEqual(len(batch), 3 * rounds)
        for index in range(3):
            mine = [s.event.peer_id for s in batch if s.event.peer_id.startswith(f"n{index}-")]
            self.assertEqual(mine, [f"n{index}-{n}" for n in range(rounds)])

    def test_appends_of_one_app_commit_in_order(self) -> None:
        """
        While one node's append for an app is not committed, another node's
        append for the same app waits (here: gives up after its lock
        timeout) rather than committing a later sequence number the
        deliverer could send first; an append for another app goes on.
        """
        first = self._connect()
        second = self._connect()
        append_events(DialectCursor(first.cursor(), POSTGRESQL), _events("a", 1), [])
        cursor = second.cursor()
        cursor.execute("SET lock_timeout = '200ms'")
        second.commit()
        self.assertRaises(
            psycopg2.errors.LockNotAvailable,
            append_events, DialectCursor(cursor, POSTGRESQL), _events("a", 1, PEER_OFFLINE), [],
        )
        second.rollback()
        append_events(DialectCursor(cursor, POSTGRESQL), _events("b", 1), [])
        second.commit()
        first.commit()
        append_events(DialectCursor(cursor, POSTGRESQL), _events("a", 1, PEER_OFFLINE), [])
        second.commit()
        reader = self._connect().cursor()
        reader.execute("SELECT body FROM webhook_events WHERE app_id = 'a' ORDER BY seq")
        self.assertEqual([json.loads(body)["type"] for (body,) in reader.fetchall()], [PEER_ONLINE, PEER_OFFLINE])

    def _connect(self) -> Any:
        connection = self.database.connect(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS)
        self.addCleanup(connection.close)
        return connection
