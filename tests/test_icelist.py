"""
Tests for L{meteredrt.icelist}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.icelist import MAX_ENTRIES, MAX_SECRET_LENGTH, MAX_URL_LENGTH, ice_servers_error

#: What the Metered TURN API typically answers (protocol §20.2).
METERED_LIST: list[object] = [
    {"urls": "stun:stun.relay.metered.ca:80"},
    {"urls": "turn:global.relay.metered.ca:80", "username": "u", "credential": "c"},
    {"urls": "turn:global.relay.metered.ca:80?transport=tcp", "username": "u", "credential": "c"},
    {"urls": "turn:global.relay.metered.ca:443", "username": "u", "credential": "c"},
    {"urls": "turns:global.relay.metered.ca:443?transport=tcp", "username": "u", "credential": "c"},
]


def _url(length: int, scheme: str = "turn:") -> str:
    """
    A URL of exactly C{length} characters.
    """
    return scheme + "x" * (length - len(scheme))


class IceServersErrorTests(SynchronousTestCase):
    """
    Tests for L{ice_servers_error}.
    """

    def assertRejected(self, value: object, *fragments: str) -> None:
        """
        C{value} is rejected with a reason containing every fragment.
        """
        reason = ice_servers_error(value)
        self.assertIsNotNone(reason)
        assert reason is not None
        for fragment in fragments:
            self.assertIn(fragment, reason)

    def test_metered_list(self) -> None:
        """
        The list the Metered TURN API hands out is accepted.
        """
        self.assertIsNone(ice_servers_error(METERED_LIST))

    def test_empty_list(self) -> None:
        """
        An empty list is accepted, as the SDK accepts it.
        """
        self.assertIsNone(ice_servers_error([]))

    def test_urls_array(self) -> None:
        """
        C{urls} may be an array of strings.
        """
        self.assertIsNone(
            ice_servers_error([{"urls": ["stun:a:3478", "stuns:a:5349", "turn:a", "turns:a"]}])
        )

    def test_scheme_any_case(self) -> None:
        """
        Schemes match regardless of letter case, as in the SDK.
        """
        self.assertIsNone(ice_servers_error([{"urls": ["STUN:a", "Turns:a"]}]))

    def test_extra_fields(self) -> None:
        """
        Fields the SDK does not look at do not make a list invalid.
        """
        self.assertIsNone(ice_servers_error([{"urls": "turn:a", "credentialType": "password"}]))

    def test_not_a_list(self) -> None:
        """
        Anything but a JSON array is rejected, naming what it was.
        """
        self.assertRejected({"urls": "turn:a"}, "must be an array", "object")
        self.assertRejected(None, "must be an array", "null")
        self.assertRejected("turn:a", "must be an array", "string")
        self.assertRejected(({"urls": "turn:a"},), "must be an array", "tuple")

    def test_entry_limit(self) -> None:
        """
        Sixteen entries are accepted; seventeen are rejected.
        """
        entry = {"urls": "turn:a"}
        self.assertIsNone(ice_servers_error([entry] * MAX_ENTRIES))
        self.assertRejected([entry] * (MAX_ENTRIES + 1), "17 entries", "at most 16")

    def test_entry_not_object(self) -> None:
        """
        An entry that is not an object is rejected by its index.
        """
        self.assertRejected([{"urls": "turn:a"}, "turn:b"], "iceServers[1]", "must be an object")
        self.assertRejected([[{"urls": "turn:a"}]], "iceServers[0]", "an array")

    def test_missing_urls(self) -> None:
        """
        An entry without C{urls} is rejected.
        """
        self.assertRejected([{"username": "u"}], "iceServers[0]", "has no urls")

    def test_urls_wrong_type(self) -> None:
        """
        C{urls} that is neither a string nor an array is rejected.
        """
        self.assertRejected([{"urls": None}], "iceServers[0]", "urls must be a string or an array")
        self.assertRejected([{"urls": {"a": "turn:a"}}], "an object")

    def test_urls_empty_array(self) -> None:
        """
        An empty C{urls} array is rejected.
        """
        self.assertRejected([{"urls": []}], "iceServers[0]", "empty array")

    def test_urls_member_not_string(self) -> None:
        """
        A non-string in a C{urls} array is rejected by both indexes.
        """
        self.assertRejected(
            [{"urls": "turn:a"}, {"urls": ["turn:b", 3478]}], "iceServers[1]", "urls[1]", "a number"
        )

    def test_bad_scheme(self) -> None:
        """
        A URL outside the four ICE schemes is rejected, quoting it.
        """
        self.assertRejected(
            METERED_LIST + [{"urls": "https://relay.example/turn"}],
            "iceServers[5]",
            "'https://relay.example/turn'",
            "does not start with stun:, stuns:, turn: or turns:",
        )
        self.assertRejected([{"urls": ["turn:a", "javascript:alert(1)"]}], "urls[1]")
        self.assertRejected([{"urls": "turn"}], "iceServers[0]")

    def test_quote_shortened(self) -> None:
        """
        A long bad URL is quoted only in part.
        """
        reason = ice_servers_error([{"urls": "http://" + "y" * 400}])
        assert reason is not None
        self.assertNotIn("y" * 100, reason)

    def test_empty_url(self) -> None:
        """
        An empty URL is rejected.
        """
        self.assertRejected([{"urls": ""}], "iceServers[0]", "is empty")

    def test_url_length(self) -> None:
        """
        A URL of 512 characters is accepted; one of 513 is rejected.
        """
        self.assertIsNone(ice_servers_error([{"urls": _url(MAX_URL_LENGTH)}]))
        self.assertRejected([{"urls": [_url(MAX_URL_LENGTH + 1)]}], "urls[0]", "513 characters")

    def test_url_length_utf16(self) -> None:
        """
        Length is counted in UTF-16 code units, as JavaScript counts it: a
        character outside the BMP counts twice.
        """
        url = _url(MAX_URL_LENGTH - 1) + "\N{GRINNING FACE}"
        self.assertEqual(len(url), MAX_URL_LENGTH)
        self.assertRejected([{"urls": url}], "513 characters")

    def test_secret_lengths(self) -> None:
        """
        C{username} and C{credential} may be 1024 characters, not 1025.
        """
        fits = "u" * MAX_SECRET_LENGTH
        self.assertIsNone(ice_servers_error([{"urls": "turn:a", "username": fits, "credential": fits}]))
        self.assertRejected(
            [{"urls": "turn:a", "username": fits + "u"}], "iceServers[0]", "username", "1025"
        )
        self.assertRejected(
            [{"urls": "turn:a", "credential": fits + "c"}], "iceServers[0]", "credential", "1025"
        )

    def test_secret_not_string(self) -> None:
        """
        A C{username} or C{credential} that is not a string is rejected.
        """
        self.assertRejected([{"urls": "turn:a", "username": None}], "username must be a string", "null")
        self.assertRejected([{"urls": "turn:a", "credential": 5}], "credential must be a string")

    def test_secret_not_quoted(self) -> None:
        """
        A reason never repeats a C{username} or C{credential}.
        """
        secret = "hunter2" * 200
        reason = ice_servers_error([{"urls": "turn:a", "username": "u", "credential": secret}])
        assert reason is not None
        self.assertNotIn("hunter2", reason)
