"""
One conformance suite for L{IWebhookMarks}, run against L{MemoryMarks} and
L{RedisMarks} (on a real C{redis-server}): marks, the grace, claims handed
out once, announcements under way and what waits for them, restoring an
outbox's marks. Times are explicit (Unix seconds), as the emitter passes
its clock's.

Then what only shared marks do: two nodes sweeping at once, and a
going-away not announced while presence holds the peer on any node.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from meteredrt.clusterwire import ClusterNode
from meteredrt.interfaces import IWebhookMarks
from meteredrt.presence.redis import RedisPresence
from meteredrt.redisclient import RedisClient, parse_redis_url
from meteredrt.webhooks.marks import Announcement, MemoryMarks, Where
from meteredrt.webhooks.outbox import CHANNEL, PEER
from meteredrt.webhooks.redismarks import RedisMarks
from tests.servers import RedisServer

ALICE: Where = ("a", PEER, "alice")
ROOM: Where = ("a", CHANNEL, "room")
T0 = 1_700_000_000.0
CLAIM = 30.0


class MarksTestsMixin:
    """
    What every implementation of the marks does.
    """

    marks: Any

    async def make(self) -> Any:
        raise NotImplementedError

    async def setUpMarks(self) -> None:
        self.marks = await self.make()

    async def online(self, where: Where = ALICE, at: float = T0) -> Announcement:
        """
        Announce C{where} present at C{at} and store it.
        """
        [announcement] = await self.marks.arrived(where, at, "evt_on")
        self.assertEqual(await self.marks.stored([announcement], at), [])  # type: ignore[attr-defined]
        return announcement

    async def test_interface(self) -> None:
        """
        It provides L{IWebhookMarks}.
        """
        await self.setUpMarks()
        self.assertTrue(verifyObject(IWebhookMarks, self.marks))  # type: ignore[attr-defined]

    async def test_first_arrival_announced_once(self) -> None:
        """
        A first arrival is announced present with the caller's id and time;
        arriving again, stored or not, announces nothing.
        """
        await self.setUpMarks()
        first = await self.marks.arrived(ALICE, T0, "evt_1")
        self.assertEqual(first, [Announcement(ALICE, True, "evt_1", T0)])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.arrived(ALICE, T0 + 1, "evt_2"), [])  # type: ignore[attr-defined]
        await self.marks.stored(first, T0 + 1)
        self.assertEqual(await self.marks.arrived(ALICE, T0 + 2, "evt_3"), [])  # type: ignore[attr-defined]

    async def test_gone_after_deadline_once(self) -> None:
        """
        A going-away is due at its deadline, not before, stamped with the
        deadline, and handed out once.
        """
        await self.setUpMarks()
        await self.online()
        await self.marks.going(ALICE, T0 + 3)
        self.assertEqual(await self.marks.due(T0 + 2.9), [])  # type: ignore[attr-defined]
        [gone] = await self.marks.due(T0 + 3.5)
        self.assertEqual((gone.where, gone.present, gone.at), (ALICE, False, T0 + 3))  # type: ignore[attr-defined]
        self.assertTrue(gone.event_id.startswith("evt_"))  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + 4), [])  # type: ignore[attr-defined]

    async def test_arrival_inside_grace_cancels(self) -> None:
        """
        Arriving again before the deadline cancels the going-away: nothing
        is announced, ever.
        """
        await self.setUpMarks()
        await self.online()
        await self.marks.going(ALICE, T0 + 3)
        self.assertEqual(await self.marks.arrived(ALICE, T0 + 2, "evt_2"), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + 100), [])  # type: ignore[attr-defined]

    async def test_not_marked_not_going(self) -> None:
        """
        Something never announced present is never announced gone.
        """
        await self.setUpMarks()
        await self.marks.going(ALICE, T0 + 3)
        self.assertEqual(await self.marks.due(T0 + 100), [])  # type: ignore[attr-defined]

    async def test_earliest_deadline_kept(self) -> None:
        """
        Going away twice keeps the first deadline.
        """
        await self.setUpMarks()
        await self.online()
        await self.marks.going(ALICE, T0 + 3)
        await self.marks.going(ALICE, T0 + 5)
        [gone] = await self.marks.due(T0 + 4)
        self.assertEqual(gone.at, T0 + 3)  # type: ignore[attr-defined]

    async def test_stored_going_away_clears_mark(self) -> None:
        """
        Once its going-away is stored, an arrival is announced again.
        """
        await self.setUpMarks()
        await self.online()
        await self.marks.going(ALICE, T0 + 3)
        gone = await self.marks.due(T0 + 3)
        self.assertEqual(await self.marks.stored(gone, T0 + 3), [])  # type: ignore[attr-defined]
        again = await self.marks.arrived(ALICE, T0 + 10, "evt_again")
        self.assertEqual(again, [Announcement(ALICE, True, "evt_again", T0 + 10)])  # type: ignore[attr-defined]

    async def test_arrival_waits_for_stored_going_away(self) -> None:
        """
        Arriving while a going-away is being stored announces nothing yet;
        once it is stored, the arrival follows (stamped then), so the two
        are stored in order.
        """
        await self.setUpMarks()
        await self.online()
        await self.marks.going(ALICE, T0 + 3)
        gone = await self.marks.due(T0 + 3)
        self.assertEqual(await self.marks.arrived(ALICE, T0 + 4, "evt_early"), [])  # type: ignore[attr-defined]
        [back] = await self.marks.stored(gone, T0 + 5)
        self.assertEqual((back.where, back.present, back.at), (ALICE, True, T0 + 5))  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.stored([back], T0 + 5), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.arrived(ALICE, T0 + 6, "evt_x"), [])  # type: ignore[attr-defined]

    async def test_arrival_and_going_while_going_away_stored(self) -> None:
        """
        Arriving and going again while a going-away is being stored leaves
        nothing to follow it.
        """
        await self.setUpMarks()
        await self.online()
        await self.marks.going(ALICE, T0 + 3)
        gone = await self.marks.due(T0 + 3)
        await self.marks.arrived(ALICE, T0 + 4, "evt_early")
        await self.marks.going(ALICE, T0 + 7)
        self.assertEqual(await self.marks.stored(gone, T0 + 5), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + 100), [])  # type: ignore[attr-defined]

    async def test_going_away_waits_for_stored_arrival(self) -> None:
        """
        A grace that runs out while the arrival is still being stored
        announces nothing yet; once the arrival is stored, the going-away
        follows at once.
        """
        await self.setUpMarks()
        [arrival] = await self.marks.arrived(ALICE, T0, "evt_on")
        await self.marks.going(ALICE, T0 + 3)
        self.assertEqual(await self.marks.due(T0 + 3), [])  # type: ignore[attr-defined]
        [gone] = await self.marks.stored([arrival], T0 + 4)
        self.assertEqual((gone.where, gone.present, gone.at), (ALICE, False, T0 + 4))  # type: ignore[attr-defined]

    async def test_back_before_arrival_stored(self) -> None:
        """
        Going and arriving again while the arrival is being stored: once
        stored, nothing follows and the mark stays.
        """
        await self.setUpMarks()
        [arrival] = await self.marks.arrived(ALICE, T0, "evt_on")
        await self.marks.going(ALICE, T0 + 3)
        self.assertEqual(await self.marks.due(T0 + 3), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.arrived(ALICE, T0 + 3.5, "evt_2"), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.stored([arrival], T0 + 4), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + 100), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.arrived(ALICE, T0 + 101, "evt_3"), [])  # type: ignore[attr-defined]

    async def test_unconfirmed_handed_out_again(self) -> None:
        """
        An announcement not confirmed within the claim time is handed out
        again, with the same id and time, once per claim time; confirmed,
        it is not; a confirmation of something else changes nothing.
        """
        await self.setUpMarks()
        [arrival] = await self.marks.arrived(ALICE, T0, "evt_on")
        self.assertEqual(await self.marks.due(T0 + CLAIM - 1), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + CLAIM), [arrival])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + CLAIM + 1), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + 2 * CLAIM), [arrival])  # type: ignore[attr-defined]
        other = Announcement(ALICE, True, "evt_other", T0)
        self.assertEqual(await self.marks.stored([other], T0 + 61), [])  # type: ignore[attr-defined]
        self.assertEqual(await self.marks.due(T0 + 3 * CLAIM), [arrival])  # type: ignore[attr-defined]
        await self.marks.stored([arrival], T0 + 91)
        self.assertEqual(await self.marks.due(T0 + 10 * CLAIM), [])  # type: ignore[attr-defined]

    async def test_peers_channels_apps_apart(self) -> None:
        """
        A peer and a channel of the same name, and the same peer in two
        apps, are marked apart.
        """
        await self.setUpMarks()
        await self.online(ALICE)
        [room] = await self.marks.arrived(("a", CHANNEL, "alice"), T0, "evt_c")
        [other] = await self.marks.arrived(("b", PEER, "alice"), T0, "evt_b")
        self.assertEqual((room.where, other.where), (("a", CHANNEL, "alice"), ("b", PEER, "alice")))  # type: ignore[attr-defined]
        await self.marks.stored([room, other], T0)
        await self.marks.going(ALICE, T0 + 3)
        [gone] = await self.marks.due(T0 + 3)
        self.assertEqual(gone.where, ALICE)  # type: ignore[attr-defined]

    async def test_restore(self) -> None:
        """
        Restored marks not known go away at their deadlines unless they
        arrive first; a restored mark already known is left alone.
        """
        await self.setUpMarks()
        await self.online(ROOM)
        bob: Where = ("a", PEER, "bob")
        await self.marks.restore([(ALICE, T0 + 3), (bob, T0 + 4), (ROOM, T0 + 3)])
        self.assertEqual(await self.marks.arrived(bob, T0 + 1, "evt_bob"), [])  # type: ignore[attr-defined]
        gone = await self.marks.due(T0 + 10)
        self.assertEqual([(g.where, g.present, g.at) for g in gone], [(ALICE, False, T0 + 3)])  # type: ignore[attr-defined]


class MemoryMarksTests(MarksTestsMixin, TestCase):
    """
    L{MemoryMarks}.
    """

    async def make(self) -> Any:
        return MemoryMarks(claim_seconds=CLAIM)


async def redis_client(case: TestCase, server: RedisServer) -> RedisClient:
    client = RedisClient(reactor, parse_redis_url(server.url), timeout=5.0)
    client.startService()
    case.addCleanup(client.stopService)
    await client.ready
    return client


class RedisMarksTests(MarksTestsMixin, TestCase):
    """
    L{RedisMarks} on a real Redis, and what sharing them across nodes adds.
    """

    async def make(self) -> Any:
        self.server = await RedisServer.start(self)
        self.client = await redis_client(self, self.server)
        return RedisMarks(self.client, claim_seconds=CLAIM)

    async def test_one_sweeper_claims(self) -> None:
        """
        Two nodes sweeping at once: each due going-away is handed to
        exactly one of them.
        """
        await self.setUpMarks()
        other = RedisMarks(await redis_client(self, self.server), claim_seconds=CLAIM)
        wheres = [("a", PEER, f"p{i}") for i in range(50)]
        for where in wheres:
            await self.online(where)
            await self.marks.going(where, T0 + 3)
        mine, theirs = await gatherResults([self.marks.due(T0 + 3), other.due(T0 + 3)])
        self.assertEqual(sorted(a.where for a in mine + theirs), sorted(wheres))
        self.assertEqual(len({a.event_id for a in mine + theirs}), 50)

    async def test_many_due_in_rounds(self) -> None:
        """
        More due going-aways than one script takes are all claimed by one
        sweep, in rounds.
        """
        await self.setUpMarks()
        small = RedisMarks(self.client, claim_seconds=CLAIM, limit=7)
        wheres = [("a", PEER, f"p{i}") for i in range(30)]
        for where in wheres:
            await self.online(where)
            await self.marks.going(where, T0 + 3)
        self.assertEqual(len(await small.due(T0 + 3)), 30)

    async def test_present_elsewhere_not_gone(self) -> None:
        """
        A going-away that reached Redis after the peer connected again on
        another node (or a channel got a member again) is dropped at its
        deadline: presence holds them.
        """
        await self.setUpMarks()
        presence = RedisPresence(self.client, ClusterNode("n"))
        await self.online(ALICE)
        await self.online(ROOM)
        await presence.add_connection("a", "alice", "c1")
        await presence.add_member("a", "room", "alice", "c1", None, snapshot=False)
        await self.marks.going(ALICE, T0 + 3)
        await self.marks.going(ROOM, T0 + 3)
        self.assertEqual(await self.marks.due(T0 + 3), [])
        await presence.remove_connection("a", "alice", "c1")
        await self.marks.going(ALICE, T0 + 10)
        await self.marks.going(ROOM, T0 + 10)
        gone = await self.marks.due(T0 + 10)
        self.assertEqual(sorted(g.where for g in gone), sorted([ALICE, ROOM]))

    async def test_back_elsewhere_while_going_away_stored(self) -> None:
        """
        A peer connected on some node when its going-away is confirmed is
        announced present again, even if no arrival reached the marks.
        """
        await self.setUpMarks()
        await self.online(ALICE)
        await self.marks.going(ALICE, T0 + 3)
        gone = await self.marks.due(T0 + 3)
        presence = RedisPresence(self.client, ClusterNode("n"))
        await presence.add_connection("a", "alice", "c1")
        [back] = await self.marks.stored(gone, T0 + 4)
        self.assertEqual((back.where, back.present), (ALICE, True))
