"""
One conformance suite for L{IWebhookOutbox}, run against
L{MemoryOutbox} and L{SQLiteOutbox}.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from meteredrt.interfaces import IWebhookOutbox
from meteredrt.webhooks.events import PEER_OFFLINE, PEER_ONLINE, PRESENCE_JOINED, WebhookEvent, new_event
from meteredrt.webhooks.outbox import (
    CHANNEL,
    PEER,
    MemoryOutbox,
    OnlineMark,
    OutboxStatus,
    SQLiteOutbox,
    webhooks_database_path,
)

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
    The conformance suite against L{SQLiteOutbox}, plus durability.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.outbox = self._open()

    def _open(self) -> SQLiteOutbox:
        outbox = SQLiteOutbox(webhooks_database_path(self.directory), reactor)
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
        The outbox is a file of its own in the data directory.
        """
        self.assertEqual(webhooks_database_path("/d"), "/d/webhooks.sqlite3")

