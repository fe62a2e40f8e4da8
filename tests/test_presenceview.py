"""
Tests for L{meteredrt.presenceview.ChannelView}: what a node has told its
subscribers, in plain values.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.envelopes import PresenceChange
from meteredrt.membership import Member
from meteredrt.presenceview import ChannelView


def joined(peer: str, version: int | None) -> PresenceChange:
    return PresenceChange("room", ({"peerId": peer},), (), None, version)


def left(peer: str, version: int | None) -> PresenceChange:
    return PresenceChange("room", (), ({"peerId": peer},), None, version)


class ChannelViewTests(SynchronousTestCase):
    """
    L{ChannelView} passes each change once, in version order per peer.
    """

    def test_passes_news(self) -> None:
        """
        A join and then a leave pass unchanged.
        """
        view = ChannelView()
        for change in (joined("a", 1), left("a", 2)):
            self.assertIs(view.accept(change), change)
        self.assertEqual(view.present(), [])

    def test_drops_repeats(self) -> None:
        """
        A joined of a present peer, or a left of an absent one, is dropped
        (a re-registration), whatever its version.
        """
        view = ChannelView()
        view.accept(joined("a", 1))
        self.assertIsNone(view.accept(joined("a", 5)))
        self.assertIsNone(view.accept(left("b", 6)))
        self.assertEqual(view.present(), ["a"])

    def test_drops_stale(self) -> None:
        """
        A change older than the last one told for that peer (late on the
        other stream) is dropped, even if it would change the state.
        """
        view = ChannelView()
        view.accept(joined("a", 1))
        view.accept(left("a", 4))
        self.assertIsNone(view.accept(joined("a", 3)))
        self.assertEqual(view.present(), [])

    def test_unversioned_pass(self) -> None:
        """
        Unversioned changes (one node) are not filtered.
        """
        view = ChannelView()
        change = joined("a", None)
        self.assertIs(view.accept(change), change)
        self.assertIs(view.accept(change), change)

    def test_partial(self) -> None:
        """
        Only the entries still news are kept.
        """
        view = ChannelView()
        view.accept(joined("a", 1))
        both = PresenceChange("room", ({"peerId": "a"}, {"peerId": "b"}), (), None, 2)
        self.assertEqual(view.accept(both), PresenceChange("room", ({"peerId": "b"},), (), None, 2))

    def test_catch_up(self) -> None:
        """
        Catching up with a read tells who joined and who left since, and
        makes the deltas up to that read stale.
        """
        view = ChannelView()
        view.accept(joined("gone", 1))
        view.accept(joined("stays", 2))
        view.accept(joined("newer", 9))
        news = view.catch_up([Member("stays", None), Member("new", {"m": 1})], 5)
        self.assertEqual(news, (({"peerId": "new", "metadata": {"m": 1}},), ({"peerId": "gone"},)))
        self.assertEqual(sorted(view.present()), ["new", "newer", "stays"])
        self.assertIsNone(view.accept(joined("new", 4)))
        self.assertIsNone(view.accept(left("gone", 3)))
        self.assertEqual(view.catch_up([Member("stays", None), Member("new", {"m": 1})], 5), ((), ()))
