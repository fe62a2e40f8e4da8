"""
Tests for L{meteredrt.presence.MemoryPresence}: refcounted membership and
the peer directory.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from meteredrt.interfaces import IPresence
from meteredrt.membership import Member
from meteredrt.presence.memory import MemoryPresence


class MembershipTests(SynchronousTestCase):
    """
    Channel membership per (app, channel, peerId), counted by connection.
    """

    def setUp(self) -> None:
        self.presence = MemoryPresence()

    def add(self, peer_id: str, conn_id: str, metadata: dict | None = None, channel: str = "room") -> bool:
        return self.successResultOf(self.presence.add_member("app", channel, peer_id, conn_id, metadata)).first

    def remove(self, peer_id: str, conn_id: str, channel: str = "room") -> Member | None:
        return self.successResultOf(self.presence.remove_member("app", channel, peer_id, conn_id))

    def members(self, app_id: str = "app", channel: str = "room") -> list[Member]:
        return self.successResultOf(self.presence.members(app_id, channel))

    def test_interface(self) -> None:
        """
        L{MemoryPresence} provides L{IPresence}.
        """
        self.assertTrue(verifyObject(IPresence, self.presence))

    def test_first_connection_joins(self) -> None:
        """
        Only a peer's first connection in a channel makes it a new member.
        """
        self.assertTrue(self.add("alice", "c1"))
        self.assertFalse(self.add("alice", "c2"))
        self.assertFalse(self.add("alice", "c1"))
        self.assertTrue(self.add("bob", "c3"))

    def test_last_connection_leaves(self) -> None:
        """
        Only the last connection's removal ends membership, returning the
        member as it was shown.
        """
        self.add("alice", "c1", {"n": 1})
        self.add("alice", "c2", {"n": 1})
        self.assertIsNone(self.remove("alice", "c1"))
        self.assertEqual(self.remove("alice", "c2"), Member("alice", {"n": 1}))
        self.assertEqual(self.members(), [])

    def test_remove_unknown(self) -> None:
        """
        Removing a connection that is not a member changes nothing.
        """
        self.add("alice", "c1")
        self.assertIsNone(self.remove("alice", "c9"))
        self.assertIsNone(self.remove("bob", "c1"))
        self.assertIsNone(self.remove("alice", "c1", channel="other"))
        self.assertEqual(self.members(), [Member("alice", None)])

    def test_members_in_join_order(self) -> None:
        """
        Members are listed once per peerId, in join order, with the most
        recent connection's metadata.
        """
        self.add("alice", "c1", {"v": 1})
        self.add("bob", "c2")
        self.add("alice", "c3", {"v": 2})
        self.assertEqual(self.members(), [Member("alice", {"v": 2}), Member("bob", None)])

    def test_apps_and_channels_apart(self) -> None:
        """
        The same peer and channel in another app or channel are separate.
        """
        self.add("alice", "c1")
        self.assertTrue(self.successResultOf(self.presence.add_member("other", "room", "alice", "c2", None)).first)
        self.assertTrue(self.add("alice", "c1", channel="hall"))
        self.assertEqual(self.members("other"), [Member("alice", None)])
        self.remove("alice", "c1")
        self.assertEqual(self.members("other"), [Member("alice", None)])
        self.assertEqual(self.members(channel="hall"), [Member("alice", None)])


class DirectoryTests(SynchronousTestCase):
    """
    The live connections of each peer, for routing directs.
    """

    def setUp(self) -> None:
        self.presence = MemoryPresence()

    def connections(self, app_id: str, peer_id: str) -> frozenset[str]:
        return self.successResultOf(self.presence.connections_of(app_id, peer_id))

    def test_add_remove(self) -> None:
        """
        A peer's connections are those added and not yet removed.
        """
        self.successResultOf(self.presence.add_connection("app", "alice", "c1"))
        self.successResultOf(self.presence.add_connection("app", "alice", "c2"))
        self.assertEqual(self.connections("app", "alice"), frozenset({"c1", "c2"}))
        self.successResultOf(self.presence.remove_connection("app", "alice", "c1"))
        self.assertEqual(self.connections("app", "alice"), frozenset({"c2"}))
        self.successResultOf(self.presence.remove_connection("app", "alice", "c2"))
        self.successResultOf(self.presence.remove_connection("app", "alice", "c2"))
        self.assertEqual(self.connections("app", "alice"), frozenset())

    def test_apps_apart(self) -> None:
        """
        The same peerId in two apps has separate connections.
        """
        self.successResultOf(self.presence.add_connection("one", "alice", "c1"))
        self.assertEqual(self.connections("two", "alice"), frozenset())
