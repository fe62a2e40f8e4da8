"""
Tests for L{meteredrt.clusterwire}: the message format, the pattern mapping
and the duplicate filter, in plain values.
"""

from __future__ import annotations

import fnmatch

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.clusterwire import (
    ClusterNode,
    Deduplicator,
    MalformedMessage,
    decode,
    encode,
    redis_pattern,
    topic,
)
from meteredrt.envelopes import ChannelMessage, DirectMessage, Disconnect, PresenceChange
from meteredrt.globs import matches, pattern_error


def redis_matches(pattern: bytes, channel: bytes) -> bool:
    """
    Redis's glob, for the characters our mapping produces (C{*} and
    backslash escapes): C{fnmatchcase} after turning escapes into classes.
    """
    text, out, i = pattern.decode(), [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append("[" + text[i + 1] + "]" if text[i + 1] != "]" else "[]]")
            i += 2
        else:
            out.append(text[i])
            i += 1
    return fnmatch.fnmatchcase(channel.decode(), "".join(out))


class EncodingTests(SynchronousTestCase):
    """
    Envelopes survive the trip through Redis unchanged.
    """

    def test_round_trip(self) -> None:
        """
        Every envelope kind decodes to an equal envelope, with its origin
        and app.
        """
        node = ClusterNode("n", "x")
        for envelope in (
            ChannelMessage("a/b", "p", {"k": [1, "é"]}, {"m": 1}, "n.x:1"),
            ChannelMessage("a|b", "p", None, None, None),
            ChannelMessage("c", "p", "lone \ud800 surrogate", {"k": "\udfff"}, None),
            DirectMessage("t", "s", "hi", None, "n.x:2"),
            Disconnect("p", 4020, "admin_disconnect"),
            PresenceChange("c", ({"peerId": "p", "metadata": {"a": 1}},), ({"peerId": "q"},), "n.x:3"),
        ):
            self.assertEqual(decode(encode(node, "app_1", envelope)), (b"n.x", "app_1", envelope))

    def test_unique(self) -> None:
        """
        Two publishes of the same envelope are different messages.
        """
        node = ClusterNode("n")
        envelope = ChannelMessage("c", "p", 1, None, None)
        self.assertNotEqual(encode(node, "a", envelope), encode(node, "a", envelope))

    def test_malformed(self) -> None:
        """
        Anything we did not write is refused with L{MalformedMessage}.
        """
        for payload in (
            b"",
            b"a|b",
            b"o|1|a||not json",
            b'o|1|a||["?"]',
            b'o|1|a||["m"]',
            b'o|1|a|x|["p","c",[],[],null]',
        ):
            self.assertRaises(MalformedMessage, decode, payload)


class RedisPatternTests(SynchronousTestCase):
    """
    L{redis_pattern} maps our patterns to Redis patterns matching a
    superset.
    """

    def test_examples(self) -> None:
        """
        Wildcards become C{*}, Redis's special characters are escaped.
        """
        self.assertEqual(redis_pattern("a", "room/*"), b"mrt:a:c:room/*")
        self.assertEqual(redis_pattern("a", "x/**/y"), b"mrt:a:c:x/*/y")
        self.assertEqual(redis_pattern("a", "q?[1]"), b"mrt:a:c:q\\?\\[1\\]")
        self.assertEqual(redis_pattern("a", "lit\\*"), b"mrt:a:c:lit\\*")

    @given(
        st.text(alphabet="ab/*?[]\\", max_size=8),
        st.text(alphabet="ab/*?[]\\", max_size=8),
    )
    def test_superset(self, pattern: str, channel: str) -> None:
        """
        Every channel our pattern matches, the Redis pattern matches.
        """
        if pattern_error(pattern) is None and matches(pattern, channel):
            self.assertTrue(redis_matches(redis_pattern("a", pattern), topic("a", channel)))


class DeduplicatorTests(SynchronousTestCase):
    """
    L{Deduplicator} passes the first of adjacent equal messages.
    """

    def test_adjacent_copies(self) -> None:
        """
        Copies right after each other are dropped; the same bytes later
        (impossible for our unique messages) and after a reset pass.
        """
        dedupe = Deduplicator()
        self.assertEqual([dedupe.first(m) for m in (b"1", b"1", b"1", b"2", b"1")], [True, False, False, True, True])
        dedupe.reset()
        self.assertTrue(dedupe.first(b"1"))
