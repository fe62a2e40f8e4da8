"""
One conformance suite for L{IPresence}, run against L{MemoryPresence} and
L{RedisPresence} (two nodes' presences on one real C{redis-server}):
refcounted membership, snapshots taken with the change, announced deltas,
one-step disconnects and the peer directory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from meteredrt import redisscripts
from meteredrt.clusterwire import ClusterNode
from meteredrt.envelopes import PresenceChange
from meteredrt.interfaces import IDeliveryTarget, IPresence
from meteredrt.membership import Member
from meteredrt.presence import memory
from meteredrt.presence.memory import MemoryPresence
from meteredrt.presence.redis import RedisPresence
from meteredrt.redisclient import RedisClient, parse_redis_url
from tests.servers import RedisServer


@implementer(IDeliveryTarget)
class Announcements:
    """
    A delivery target that keeps the presence changes announced to it.
    """

    def __init__(self) -> None:
        self.changes: list[tuple[str, PresenceChange]] = []

    def deliver(self, app_id: str, envelope: object) -> int:
        assert isinstance(envelope, PresenceChange)
        self.changes.append((app_id, envelope))
        return 0

    def summary(self) -> list[tuple[str, list[str], list[str]]]:
        return [
            (change.channel, [e["peerId"] for e in change.joined], [e["peerId"] for e in change.left])
            for _, change in self.changes
        ]


class PresenceTestsMixin:
    """
    What every presence does. C{self.presence} and C{self.other} are two
    nodes' presences sharing state (the same object in memory).
    """

    presence: Any
    other: Any
    heard: Announcements

    async def make(self) -> tuple[Any, Any]:
        raise NotImplementedError

    async def setUpPresence(self) -> None:
        self.presence, self.other = await self.make()
        self.heard = Announcements()
        self.presence.attach(self.heard)

    async def add(self, peer_id: str, conn_id: str, metadata: dict | None = None, channel: str = "room") -> bool:
        return (await self.presence.add_member("app", channel, peer_id, conn_id, metadata, snapshot=False)).first

    async def remove(self, peer_id: str, conn_id: str, channel: str = "room") -> Member | None:
        return await self.presence.remove_member("app", channel, peer_id, conn_id)

    async def members(self, app_id: str = "app", channel: str = "room") -> list[Member]:
        return await self.presence.members(app_id, channel)

    async def test_interface(self) -> None:
        """
        It provides L{IPresence}.
        """
        await self.setUpPresence()
        self.assertTrue(verifyObject(IPresence, self.presence))  # type: ignore[attr-defined]

    async def test_first_connection_joins(self) -> None:
        """
        Only a peer's first connection in a channel makes it a new member,
        whichever node it is on.
        """
        await self.setUpPresence()
        self.assertTrue(await self.add("alice", "c1"))
        self.assertFalse(await self.add("alice", "c2"))
        self.assertFalse(await self.add("alice", "c1"))
        self.assertFalse((await self.other.add_member("app", "room", "alice", "c4", None, snapshot=False)).first)
        self.assertTrue(await self.add("bob", "c3"))

    async def test_last_connection_leaves(self) -> None:
        """
        Only the last connection's removal ends membership, on any node,
        returning the member as it was shown.
        """
        await self.setUpPresence()
        await self.add("alice", "c1", {"n": 1})
        await self.other.add_member("app", "room", "alice", "c2", {"n": 1}, snapshot=False)
        self.assertIsNone(await self.remove("alice", "c1"))
        self.assertEqual(await self.other.remove_member("app", "room", "alice", "c2"), Member("alice", {"n": 1}))
        self.assertEqual(await self.members(), [])

    async def test_remove_unknown(self) -> None:
        """
        Removing a connection that is not a member changes nothing.
        """
        await self.setUpPresence()
        await self.add("alice", "c1")
        self.assertIsNone(await self.remove("alice", "c9"))
        self.assertIsNone(await self.remove("bob", "c1"))
        self.assertIsNone(await self.remove("alice", "c1", channel="other"))
        self.assertEqual(await self.members(), [Member("alice", None)])

    async def test_members_in_join_order(self) -> None:
        """
        Members are listed once per peerId, in join order, with the most
        recent connection's metadata; the snapshot of an add shows the
        same.
        """
        await self.setUpPresence()
        await self.add("alice", "c1", {"v": 1})
        await self.add("bob", "c2")
        joining = await self.presence.add_member("app", "room", "alice", "c3", {"v": 2}, snapshot=True)
        expected = [Member("alice", {"v": 2}), Member("bob", None)]
        self.assertEqual(await self.members(), expected)
        self.assertEqual(list(joining.members), expected)

    async def test_join_without_snapshot(self) -> None:
        """
        A join not asking for the snapshot reads no members (C{None}), and
        is otherwise the same join: new or not, announced, versioned as a
        join with the snapshot; one asking for it is shown everyone.
        """
        await self.setUpPresence()
        await self.add("alice", "c1", {"v": 1})
        blind = await self.presence.add_member("app", "room", "bob", "c2", None, snapshot=False)
        again = await self.other.add_member("app", "room", "bob", "c3", {"v": 3}, snapshot=False)
        seeing = await self.presence.add_member("app", "room", "carol", "c4", None, snapshot=True)
        self.assertIsNone(blind.members)
        self.assertIsNone(again.members)
        self.assertEqual(
            list(seeing.members), [Member("alice", {"v": 1}), Member("bob", {"v": 3}), Member("carol", None)]
        )
        self.assertEqual((blind.first, again.first, seeing.first), (True, False, True))
        self.assertEqual(self.heard.summary(), [("room", ["alice"], []), ("room", ["bob"], []), ("room", ["carol"], [])])
        versions = [change.version for _, change in self.heard.changes]
        self.assertEqual([blind.version, seeing.version], versions[1:])
        if blind.version is not None:
            # A repeat join shows the version it saw, at or after its own.
            self.assertGreaterEqual(again.version, blind.version)
            self.assertLess(again.version, seeing.version)

    async def test_apps_and_channels_apart(self) -> None:
        """
        The same peer and channel in another app or channel are separate.
        """
        await self.setUpPresence()
        await self.add("alice", "c1")
        self.assertTrue((await self.presence.add_member("other", "room", "alice", "c2", None, snapshot=False)).first)
        self.assertTrue(await self.add("alice", "c1", channel="hall"))
        self.assertEqual(await self.members("other"), [Member("alice", None)])
        await self.remove("alice", "c1")
        self.assertEqual(await self.members("other"), [Member("alice", None)])
        self.assertEqual(await self.members(channel="hall"), [Member("alice", None)])

    async def test_announces_changes(self) -> None:
        """
        Each change that makes a C{joined} or C{left} announces it to the
        attached target, the joined excluding the joining connection; a
        versioned presence numbers them in order, and a snapshot's version
        covers exactly the deltas before it.
        """
        await self.setUpPresence()
        first = await self.presence.add_member("app", "room", "alice", "c1", {"a": 1}, snapshot=True)
        await self.add("alice", "c2")
        second = await self.presence.add_member("app", "room", "bob", "c3", None, snapshot=True)
        await self.remove("alice", "c1")
        await self.remove("alice", "c2")
        self.assertEqual(
            self.heard.summary(), [("room", ["alice"], []), ("room", ["bob"], []), ("room", [], ["alice"])]
        )
        changes = [change for _, change in self.heard.changes]
        self.assertEqual(changes[0].exclude_conn, "c1")
        self.assertEqual(changes[0].joined, ({"peerId": "alice", "metadata": {"a": 1}},))
        versions = [change.version for change in changes]
        if first.version is None:
            self.assertEqual(versions, [None] * 3)
        else:
            self.assertEqual(versions, sorted(versions))
            self.assertEqual(first.version, versions[0])
            self.assertEqual(second.version, versions[1])

    async def test_remove_connection_ends_memberships(self) -> None:
        """
        Removing a connection ends all its memberships in one call,
        announcing a C{left} where it was the peer's last connection, and
        takes it out of the directory.
        """
        await self.setUpPresence()
        await self.presence.add_connection("app", "alice", "c1")
        await self.presence.add_connection("app", "alice", "c2")
        for channel in ("a", "b", "c"):
            await self.add("alice", "c1", channel=channel)
        await self.add("alice", "c2", channel="b")
        self.heard.changes.clear()
        await self.presence.remove_connection("app", "alice", "c1")
        self.assertEqual(self.heard.summary(), [("a", [], ["alice"]), ("c", [], ["alice"])])
        self.assertEqual(await self.members(channel="b"), [Member("alice", None)])
        self.assertEqual(await self.members(channel="a"), [])
        self.assertEqual(await self.presence.connections_of("app", "alice"), frozenset({"c2"}))

    async def test_directory(self) -> None:
        """
        A peer's connections are those added and not yet removed, on every
        node, per app.
        """
        await self.setUpPresence()
        await self.presence.add_connection("app", "alice", "c1")
        await self.other.add_connection("app", "alice", "c2")
        self.assertEqual(await self.presence.connections_of("app", "alice"), frozenset({"c1", "c2"}))
        self.assertEqual(await self.other.connections_of("app", "alice"), frozenset({"c1", "c2"}))
        self.assertEqual(await self.presence.connections_of("two", "alice"), frozenset())
        await self.presence.remove_connection("app", "alice", "c1")
        await self.other.remove_connection("app", "alice", "c2")
        await self.other.remove_connection("app", "alice", "c2")
        self.assertEqual(await self.presence.connections_of("app", "alice"), frozenset())


class MemoryPresenceTests(PresenceTestsMixin, TestCase):
    """
    L{MemoryPresence}: one node, seen twice.
    """

    async def make(self) -> tuple[Any, Any]:
        presence = MemoryPresence()
        return presence, presence


class RedisPresenceTests(PresenceTestsMixin, TestCase):
    """
    L{RedisPresence}: two nodes on one real Redis.
    """

    async def make(self) -> tuple[Any, Any]:
        server = await RedisServer.start(self)
        made = []
        self.clients = []
        for name in ("one", "two"):
            client = RedisClient(reactor, parse_redis_url(server.url), timeout=5.0)
            presence = RedisPresence(client, ClusterNode(name))
            client.startService()
            self.addCleanup(client.stopService)
            await client.ready
            made.append(presence)
            self.clients.append(client)
        return made[0], made[1]

    async def test_join_reply_size(self) -> None:
        """
        The JOIN script's reply carries the members only when asked: a join
        without the snapshot into a channel of 200 gets none over the
        wire, one with it gets all 200.
        """
        await self.setUpPresence()
        for n in range(199):
            await self.add(f"p{n}", f"c{n}")
        client = self.clients[0]
        prefix = ClusterNode("one").prefix()
        join = ("app", "room", "new", "c-new", b"null", prefix)
        blind = await client.run(redisscripts.JOIN, (), (*join, b"0"))
        seeing = await client.run(redisscripts.JOIN, (), (*join, b"1"))
        self.assertEqual(blind[2], [])
        self.assertEqual(len(seeing[2]), 2 * 200)


class ObserverFailureTests(SynchronousTestCase):
    """
    A failing observer (the webhook side channel) never breaks presence.
    """

    def test_observer_raises(self) -> None:
        """
        An observer that raises on every call is logged; members and
        connections are still added and removed.
        """
        from meteredrt.presence.memory import MemoryPresence

        class Broken:
            def __getattr__(self, name: str) -> Any:
                def fail(*args: object) -> None:
                    raise RuntimeError(name)

                return fail

        presence = MemoryPresence(observer=Broken())  # type: ignore[arg-type]
        presence.add_connection("a", "alice", "c1")
        presence.add_member("a", "room", "alice", "c1", None, snapshot=False)
        presence.remove_connection("a", "alice", "c1")
        self.assertEqual(self.successResultOf(presence.members("a", "room")), [])
        self.assertEqual(self.successResultOf(presence.connections_of("a", "alice")), frozenset())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 6)


class MemoryJoinCostTests(SynchronousTestCase):
    """
    A join in a big channel costs what it costs in a small one: the
    snapshot reuses the members already there.
    """

    def test_members_built_per_join(self) -> None:
        """
        Joining a channel of 1 or of 1,000 members builds one L{Member}
        (the joiner), and the snapshot still lists everyone in join order.
        """
        built: list[str] = []

        class CountedMember(Member):
            def __init__(self, peer_id: str, metadata: dict | None) -> None:
                built.append(peer_id)
                super().__init__(peer_id, metadata)

        self.patch(memory, "Member", CountedMember)
        for size in (1, 1000):
            presence = MemoryPresence()
            for n in range(size):
                presence.add_member("a", "room", f"p{n}", f"c{n}", None, snapshot=False)
            del built[:]
            joining = self.successResultOf(presence.add_member("a", "room", "new", "c-new", {"m": 1}, snapshot=True))
            self.assertEqual(built, ["new"])
            self.assertEqual([m.peer_id for m in joining.members], [f"p{n}" for n in range(size)] + ["new"])
            self.assertEqual(joining.members[-1].metadata, {"m": 1})

    def test_join_without_snapshot_reads_no_members(self) -> None:
        """
        A join without the snapshot does not read the channel's members
        at all, however many there are; one with it reads them once.
        """
        reads = []

        class CountedMembers(dict):
            def values(self) -> Any:
                reads.append(len(self))
                return super().values()

        presence = MemoryPresence()
        for n in range(1000):
            presence.add_member("a", "room", f"p{n}", f"c{n}", None, snapshot=False)
        room = presence._channels[("a", "room")]
        room.members = CountedMembers(room.members)
        blind = self.successResultOf(presence.add_member("a", "room", "blind", "c-blind", None, snapshot=False))
        self.assertEqual((blind.members, reads), (None, []))
        seeing = self.successResultOf(presence.add_member("a", "room", "seeing", "c-seeing", None, snapshot=True))
        self.assertEqual(reads, [1002])
        self.assertEqual(len(seeing.members), 1002)
