"""
Tests for L{meteredrt.protocol}: client frame parsing and validation
(protocol §6, §7, §9.1, §9.2, §12) and the server frame builders (§8).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meteredrt import protocol
from meteredrt.apps import KeyType
from meteredrt.protocol import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_SIZE,
    PONG,
    ErrorCode,
    FrameError,
    OutboundFrame,
    Ping,
    Publish,
    Send,
    Subscribe,
    Unsubscribe,
    ack_frame,
    channel_error,
    concrete_channel_error,
    direct_frame,
    error_frame,
    going_away_frame,
    has_control_characters,
    is_valid_peer_id,
    json_too_deep,
    message_frame,
    parse_frame,
    presence_entry,
    presence_frame,
    snapshot_frames,
    welcome_frame,
)


def _frame(**fields: Any) -> str:
    """
    A client frame holding C{fields}, serialized as the SDK would send it.
    """
    return json.dumps(fields)


def _code(problem: tuple[str, str] | None) -> str | None:
    """
    The error code of a channel check's result.
    """
    return None if problem is None else problem[0]


def _decode(frame: OutboundFrame) -> Any:
    """
    The JSON value a server frame carries.
    """
    return json.loads(frame.payload)


class _ParseAssertions(SynchronousTestCase):
    """
    Helpers shared by the L{parse_frame} test cases.
    """

    def assertRefused(self, payload: bytes | str, code: str, request_id: str | None = None) -> FrameError:
        """
        C{payload} is refused with exactly C{code}, echoing exactly C{request_id}.
        """
        error = self.assertRaises(FrameError, parse_frame, payload)
        self.assertEqual((error.code, error.request_id), (code, request_id))
        self.assertIsInstance(error.message, str)
        self.assertTrue(error.message)
        return error


class ParseFrameMalformedTests(_ParseAssertions):
    """
    Frames that are not a JSON object with a string C{type} are
    C{malformed_message} (§7, §12), never an exception of another kind.
    """

    def test_not_json(self) -> None:
        """
        Text that is not JSON is C{malformed_message}.
        """
        self.assertRefused("{not json", ErrorCode.MALFORMED_MESSAGE)

    def test_empty_payload(self) -> None:
        """
        An empty frame is C{malformed_message}.
        """
        self.assertRefused("", ErrorCode.MALFORMED_MESSAGE)

    def test_invalid_utf8_bytes(self) -> None:
        """
        A byte payload that is not UTF-8 is C{malformed_message}.
        """
        self.assertRefused(b'{"type":"ping","x":"\xff"}', ErrorCode.MALFORMED_MESSAGE)

    def test_trailing_garbage(self) -> None:
        """
        A JSON object followed by more text is C{malformed_message}.
        """
        self.assertRefused('{"type":"ping"} {}', ErrorCode.MALFORMED_MESSAGE)

    def test_json_scalar(self) -> None:
        """
        A JSON string, number or null is not an object and is C{malformed_message}.
        """
        for payload in ['"ping"', "42", "null", "true"]:
            self.assertRefused(payload, ErrorCode.MALFORMED_MESSAGE)

    def test_json_array(self) -> None:
        """
        A JSON array, even one holding a valid frame, is C{malformed_message}.
        """
        self.assertRefused('[{"type":"ping"}]', ErrorCode.MALFORMED_MESSAGE)

    def test_no_type(self) -> None:
        """
        An object without C{type} is C{malformed_message}, even with a valid requestId.
        """
        self.assertRefused(_frame(channel="a", requestId="r-1"), ErrorCode.MALFORMED_MESSAGE)

    def test_non_string_type(self) -> None:
        """
        A C{type} that is not a string is C{malformed_message}.
        """
        for kind in [None, 1, ["ping"], {"t": "ping"}, True]:
            self.assertRefused(_frame(type=kind), ErrorCode.MALFORMED_MESSAGE)

    def test_nan_literal(self) -> None:
        """
        The non-JSON literal C{NaN} is C{malformed_message}, wherever it is.
        """
        self.assertRefused('{"type":"publish","channel":"a","data":NaN}', ErrorCode.MALFORMED_MESSAGE)

    def test_infinity_literals(self) -> None:
        """
        The non-JSON literals C{Infinity} and C{-Infinity} are C{malformed_message}.
        """
        for literal in ["Infinity", "-Infinity"]:
            self.assertRefused(
                '{"type":"publish","channel":"a","data":%s}' % (literal,), ErrorCode.MALFORMED_MESSAGE
            )

    def test_overflowing_number(self) -> None:
        """
        A number too large for a double (which would parse as infinity and could
        not be relayed as JSON) is C{malformed_message}.
        """
        self.assertRefused('{"type":"publish","channel":"a","data":1e400}', ErrorCode.MALFORMED_MESSAGE)

    def test_deeply_nested_arrays(self) -> None:
        """
        100000 nested arrays are C{malformed_message}, not a recursion crash.
        """
        self.assertRefused("[" * 100000, ErrorCode.MALFORMED_MESSAGE)

    def test_deeply_nested_data(self) -> None:
        """
        Well-formed but very deeply nested C{data} is C{malformed_message}, not
        a recursion crash.
        """
        depth = 100000
        payload = '{"type":"publish","channel":"a","data":' + "[" * depth + "]" * depth + "}"
        self.assertRefused(payload, ErrorCode.MALFORMED_MESSAGE)

    def test_empty_request_id(self) -> None:
        """
        An empty requestId is C{malformed_message} and is not echoed.
        """
        self.assertRefused(_frame(type="subscribe", channel="a", requestId=""), ErrorCode.MALFORMED_MESSAGE)

    def test_request_id_too_long(self) -> None:
        """
        A requestId of 129 bytes is C{malformed_message} and is not echoed.
        """
        self.assertRefused(
            _frame(type="subscribe", channel="a", requestId="r" * 129), ErrorCode.MALFORMED_MESSAGE
        )

    def test_request_id_multibyte_too_long(self) -> None:
        """
        requestId length counts UTF-8 bytes: 65 two-byte characters (130 bytes) are refused.
        """
        self.assertRefused(
            _frame(type="subscribe", channel="a", requestId="\u00e9" * 65), ErrorCode.MALFORMED_MESSAGE
        )

    def test_request_id_max_length(self) -> None:
        """
        A requestId of exactly 128 bytes is accepted and kept.
        """
        request_id = "r" * 128
        frame = parse_frame(_frame(type="subscribe", channel="a", requestId=request_id))
        self.assertEqual(frame, Subscribe("a", False, request_id, False))

    def test_request_id_non_string(self) -> None:
        """
        A requestId that is a number, boolean, array or object is
        C{malformed_message} with no requestId echoed.
        """
        for request_id in [7, True, ["r"], {"r": 1}]:
            self.assertRefused(
                _frame(type="publish", channel="a", data=1, requestId=request_id),
                ErrorCode.MALFORMED_MESSAGE,
            )

    def test_request_id_lone_surrogate(self) -> None:
        """
        A requestId holding a lone surrogate is C{malformed_message} with no
        requestId echoed, since it could not be sent back.
        """
        self.assertRefused(
            '{"type":"subscribe","channel":"a","requestId":"r\\ud800"}', ErrorCode.MALFORMED_MESSAGE
        )

    def test_request_id_checked_before_type(self) -> None:
        """
        An invalid requestId on an unknown type is C{malformed_message}, not C{unknown_type}.
        """
        self.assertRefused(_frame(type="bogus", requestId=""), ErrorCode.MALFORMED_MESSAGE)


class ParseFrameTypeTests(_ParseAssertions):
    """
    Frame types: the five known ones and C{unknown_type}.
    """

    def test_unknown_type(self) -> None:
        """
        An unknown string C{type} is C{unknown_type} and echoes the requestId.
        """
        self.assertRefused(_frame(type="history", requestId="r-9"), ErrorCode.UNKNOWN_TYPE, "r-9")

    def test_unknown_type_without_request_id(self) -> None:
        """
        An unknown type without requestId is C{unknown_type} with no requestId.
        """
        self.assertRefused(_frame(type="Subscribe", channel="a"), ErrorCode.UNKNOWN_TYPE)

    def test_ping(self) -> None:
        """
        C{ping} parses to L{Ping}, ignoring unknown fields.
        """
        self.assertEqual(parse_frame(_frame(type="ping", extra=1)), Ping())

    def test_bytes_payload(self) -> None:
        """
        A UTF-8 byte payload is parsed like text.
        """
        frame = parse_frame(_frame(type="publish", channel="caf\u00e9", data="\u00e9").encode("utf-8"))
        self.assertEqual(frame, Publish("caf\u00e9", "\u00e9", None))


class ParseSubscribeTests(_ParseAssertions):
    """
    C{subscribe} field shapes (§7.1, §9.1).
    """

    def test_minimal(self) -> None:
        """
        A subscribe with only a channel defaults C{includeSenderMetadata} to false.
        """
        self.assertEqual(
            parse_frame(_frame(type="subscribe", channel="demo/room-7")),
            Subscribe("demo/room-7", False, None, False),
        )

    def test_full(self) -> None:
        """
        A subscribe keeps the flag and requestId; unknown fields are ignored.
        """
        frame = parse_frame(
            _frame(type="subscribe", channel="demo/room-7", includeSenderMetadata=True, requestId="r-1", x=[1])
        )
        self.assertEqual(frame, Subscribe("demo/room-7", True, "r-1", False))

    def test_wildcard(self) -> None:
        """
        A subscribe to a pattern is accepted and marked as a wildcard.
        """
        frame = parse_frame(_frame(type="subscribe", channel="devices/*/events", requestId="r"))
        self.assertEqual(frame, Subscribe("devices/*/events", False, "r", True))

    def test_escaped_star_is_not_wildcard(self) -> None:
        """
        An escaped star is a literal character, not a wildcard.
        """
        frame = parse_frame(_frame(type="subscribe", channel="a\\*b"))
        self.assertEqual(frame, Subscribe("a\\*b", False, None, False))

    def test_invalid_pattern(self) -> None:
        """
        A wildcard subscribe whose pattern has a bad escape is C{invalid_channel},
        not a failure further down.
        """
        for channel in ["a\\x*", "a/*\\", "\\q/**"]:
            self.assertRefused(
                _frame(type="subscribe", channel=channel, requestId="r"), ErrorCode.INVALID_CHANNEL, "r"
            )

    def test_concrete_name_with_backslash(self) -> None:
        """
        A concrete channel is taken literally, so a backslash that is no valid escape is allowed.
        """
        self.assertEqual(parse_frame(_frame(type="subscribe", channel="a\\b")), Subscribe("a\\b", False, None, False))

    def test_missing_channel(self) -> None:
        """
        A subscribe without channel is C{invalid_channel} and echoes the requestId.
        """
        self.assertRefused(_frame(type="subscribe", requestId="r-1"), ErrorCode.INVALID_CHANNEL, "r-1")

    def test_empty_channel(self) -> None:
        """
        An empty channel is C{invalid_channel}.
        """
        self.assertRefused(_frame(type="subscribe", channel="", requestId="r-1"), ErrorCode.INVALID_CHANNEL, "r-1")

    def test_non_string_channel(self) -> None:
        """
        A channel that is not a string is C{invalid_channel}.
        """
        for channel in [None, 5, ["a"], {"a": 1}, True]:
            self.assertRefused(
                _frame(type="subscribe", channel=channel, requestId="r"), ErrorCode.INVALID_CHANNEL, "r"
            )

    def test_include_sender_metadata_non_bool(self) -> None:
        """
        A non-boolean C{includeSenderMetadata} is C{malformed_message} and echoes the requestId.
        """
        for value in [1, "true", None, [True]]:
            self.assertRefused(
                _frame(type="subscribe", channel="a", includeSenderMetadata=value, requestId="r-2"),
                ErrorCode.MALFORMED_MESSAGE,
                "r-2",
            )

    def test_reserved_prefixes(self) -> None:
        """
        Channels under the reserved prefixes, compared case-insensitively, are C{channel_reserved}.
        """
        for channel in ["_metered/x", "_internal/x", "_system/x", "_Internal/x", "_METERED/a/b", "_System/"]:
            self.assertRefused(
                _frame(type="subscribe", channel=channel, requestId="r"), ErrorCode.CHANNEL_RESERVED, "r"
            )

    def test_reserved_wildcard(self) -> None:
        """
        A wildcard under a reserved prefix is C{channel_reserved}.
        """
        self.assertRefused(_frame(type="subscribe", channel="_system/**"), ErrorCode.CHANNEL_RESERVED)

    def test_near_reserved_names(self) -> None:
        """
        Names that only resemble a reserved prefix are ordinary channels.
        """
        for channel in ["_metered", "x/_metered/y", "metered/x", "_internalx/y"]:
            self.assertEqual(parse_frame(_frame(type="subscribe", channel=channel)).channel, channel)


class ChannelErrorTests(SynchronousTestCase):
    """
    Tests for L{channel_error} and L{concrete_channel_error} (§9.1).
    """

    def test_valid(self) -> None:
        """
        Ordinary, non-ASCII and wildcard names are acceptable channels.
        """
        for channel in ["a", "demo/room-7", "caf\u00e9/\u4e2d\u6587", "\U0001f600", "a/**", "a b"]:
            self.assertIsNone(channel_error(channel))

    def test_max_length_ascii(self) -> None:
        """
        A channel of exactly 256 bytes is valid; 257 bytes is C{invalid_channel}.
        """
        self.assertIsNone(channel_error("c" * 256))
        self.assertEqual(_code(channel_error("c" * 257)), ErrorCode.INVALID_CHANNEL)

    def test_length_counts_utf8_bytes(self) -> None:
        """
        Length is counted in UTF-8 bytes: 128 two-byte characters are 256 bytes
        (valid) and one more ASCII byte is too long.
        """
        self.assertIsNone(channel_error("\u00e9" * 128))
        self.assertEqual(_code(channel_error("\u00e9" * 128 + "x")), ErrorCode.INVALID_CHANNEL)
        # 86 three-byte characters are 258 bytes but only 86 code points.
        self.assertEqual(_code(channel_error("\u4e2d" * 86)), ErrorCode.INVALID_CHANNEL)
        # 64 four-byte characters are exactly 256 bytes (and 128 UTF-16 units).
        self.assertIsNone(channel_error("\U0001f600" * 64))

    def test_control_characters(self) -> None:
        """
        Every C0 control, DEL and every C1 control is C{invalid_channel}.
        """
        controls = [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)]
        for control in controls:
            self.assertEqual(
                channel_error(f"a{control}b"), (ErrorCode.INVALID_CHANNEL, "channel contains control characters")
            )

    def test_boundary_printables(self) -> None:
        """
        The characters just outside the control ranges are allowed.
        """
        for char in [" ", "~", "\u00a0", "\u00ff"]:
            self.assertIsNone(channel_error(f"a{char}b"))

    def test_lone_surrogate(self) -> None:
        """
        A lone surrogate is C{invalid_channel}.
        """
        self.assertEqual(_code(channel_error("a\ud800")), ErrorCode.INVALID_CHANNEL)

    def test_concrete_refuses_wildcards(self) -> None:
        """
        L{concrete_channel_error} refuses unescaped stars with C{invalid_channel}.
        """
        for channel in ["a/*", "a/**", "*", "room-*"]:
            self.assertEqual(_code(concrete_channel_error(channel)), ErrorCode.INVALID_CHANNEL)
        self.assertIsNone(concrete_channel_error("a/\\*"))
        self.assertIsNone(concrete_channel_error("a/b"))

    def test_concrete_reserved(self) -> None:
        """
        L{concrete_channel_error} reports a reserved concrete name as C{channel_reserved}.
        """
        self.assertEqual(_code(concrete_channel_error("_internal/x")), ErrorCode.CHANNEL_RESERVED)


class ParseChannelFieldTests(_ParseAssertions):
    """
    The channel rules of §9.1 applied through L{parse_frame}.
    """

    def test_257_bytes(self) -> None:
        """
        A 257-byte channel (multibyte characters counted in bytes) is C{invalid_channel}.
        """
        for channel in ["x" * 257, "\u00e9" * 128 + "x"]:
            self.assertRefused(
                _frame(type="subscribe", channel=channel, requestId="r"), ErrorCode.INVALID_CHANNEL, "r"
            )

    def test_256_bytes_multibyte(self) -> None:
        """
        A 256-byte channel of two-byte characters is accepted.
        """
        channel = "\u00e9" * 128
        self.assertEqual(parse_frame(_frame(type="subscribe", channel=channel)).channel, channel)

    def test_control_characters(self) -> None:
        """
        U+0000, U+001F, U+007F, U+0085 and U+009F in a channel are C{invalid_channel}.
        """
        for control in ["\u0000", "\u001f", "\u007f", "\u0085", "\u009f"]:
            self.assertRefused(
                _frame(type="subscribe", channel=f"room{control}1", requestId="r"), ErrorCode.INVALID_CHANNEL, "r"
            )

    def test_lone_surrogate_escape(self) -> None:
        """
        A channel holding a lone surrogate via a C{\\ud800} escape is C{invalid_channel}.
        """
        self.assertRefused(
            '{"type":"subscribe","channel":"room\\ud800","requestId":"r"}', ErrorCode.INVALID_CHANNEL, "r"
        )

    def test_surrogate_pair_escape(self) -> None:
        """
        A properly paired surrogate escape is one valid character.
        """
        frame = parse_frame('{"type":"subscribe","channel":"room\\ud83d\\ude00"}')
        self.assertEqual(frame, Subscribe("room\U0001f600", False, None, False))


class ParseUnsubscribeTests(_ParseAssertions):
    """
    C{unsubscribe} field shapes (§7.2: syntax only).
    """

    def test_valid(self) -> None:
        """
        An unsubscribe keeps its channel and requestId.
        """
        self.assertEqual(
            parse_frame(_frame(type="unsubscribe", channel="demo/room-7", requestId="r-2")),
            Unsubscribe("demo/room-7", "r-2", False),
        )

    def test_wildcard(self) -> None:
        """
        An unsubscribe of a pattern is marked as a wildcard.
        """
        self.assertEqual(parse_frame(_frame(type="unsubscribe", channel="a/**")), Unsubscribe("a/**", None, True))

    def test_invalid_channel(self) -> None:
        """
        Missing, empty, over-long and control-character channels are C{invalid_channel}.
        """
        for fields in [{}, {"channel": ""}, {"channel": 3}, {"channel": "x" * 257}, {"channel": "a\u0085"}]:
            self.assertRefused(
                _frame(type="unsubscribe", requestId="r", **fields), ErrorCode.INVALID_CHANNEL, "r"
            )


class ParsePublishTests(_ParseAssertions):
    """
    C{publish} field shapes (§7.3).
    """

    def test_valid(self) -> None:
        """
        A publish keeps channel, data and requestId.
        """
        self.assertEqual(
            parse_frame(_frame(type="publish", channel="demo/room-7", data={"text": "hi"}, requestId="r-3")),
            Publish("demo/room-7", {"text": "hi"}, "r-3"),
        )

    def test_null_data(self) -> None:
        """
        C{data: null} is a valid payload, not C{missing_data}.
        """
        self.assertEqual(parse_frame(_frame(type="publish", channel="a", data=None)), Publish("a", None, None))

    def test_falsy_data(self) -> None:
        """
        False, zero, empty string, array and object are all valid payloads.
        """
        for data in [False, 0, "", [], {}]:
            self.assertEqual(parse_frame(_frame(type="publish", channel="a", data=data)), Publish("a", data, None))

    def test_missing_data(self) -> None:
        """
        A publish without C{data} is C{missing_data} and echoes the requestId.
        """
        self.assertRefused(_frame(type="publish", channel="a", requestId="r-3"), ErrorCode.MISSING_DATA, "r-3")

    def test_wildcard(self) -> None:
        """
        Publishing to a pattern is C{invalid_channel}.
        """
        for channel in ["a/*", "a/**", "*"]:
            self.assertRefused(
                _frame(type="publish", channel=channel, data=1, requestId="r"), ErrorCode.INVALID_CHANNEL, "r"
            )

    def test_escaped_star(self) -> None:
        """
        Publishing to a name with an escaped star is allowed.
        """
        self.assertEqual(parse_frame(_frame(type="publish", channel="a\\*", data=1)), Publish("a\\*", 1, None))

    def test_invalid_channel(self) -> None:
        """
        Missing, empty, non-string, over-long, control-character and
        lone-surrogate channels are C{invalid_channel}.
        """
        for fields in [{}, {"channel": ""}, {"channel": None}, {"channel": "x" * 257}, {"channel": "a\u0000"}]:
            self.assertRefused(
                _frame(type="publish", data=1, requestId="r", **fields), ErrorCode.INVALID_CHANNEL, "r"
            )
        self.assertRefused(
            '{"type":"publish","channel":"\\ud800","data":1,"requestId":"r"}', ErrorCode.INVALID_CHANNEL, "r"
        )

    def test_invalid_channel_before_missing_data(self) -> None:
        """
        A bad channel is reported before missing data (validation order, §7).
        """
        self.assertRefused(_frame(type="publish", channel="", requestId="r"), ErrorCode.INVALID_CHANNEL, "r")

    def test_reserved(self) -> None:
        """
        Publishing to a reserved channel is C{channel_reserved}.
        """
        for channel in ["_metered/x", "_Internal/x", "_system/"]:
            self.assertRefused(
                _frame(type="publish", channel=channel, data=1, requestId="r"), ErrorCode.CHANNEL_RESERVED, "r"
            )

    def test_missing_data_before_reserved(self) -> None:
        """
        Missing data is a field-shape error and comes before the reserved-prefix check (§7).
        """
        self.assertRefused(_frame(type="publish", channel="_system/x", requestId="r"), ErrorCode.MISSING_DATA, "r")


class ParseSendTests(_ParseAssertions):
    """
    C{send} field shapes (§7.4, §9.2).
    """

    def test_valid(self) -> None:
        """
        A send keeps target, data and requestId.
        """
        self.assertEqual(
            parse_frame(_frame(type="send", to="u_2077", data={"kind": "offer"}, requestId="r-4")),
            Send("u_2077", {"kind": "offer"}, "r-4"),
        )

    def test_null_data(self) -> None:
        """
        C{data: null} is a valid direct payload.
        """
        self.assertEqual(parse_frame(_frame(type="send", to="p", data=None)), Send("p", None, None))

    def test_missing_data(self) -> None:
        """
        A send without C{data} is C{missing_data}.
        """
        self.assertRefused(_frame(type="send", to="p", requestId="r"), ErrorCode.MISSING_DATA, "r")

    def test_target_128_bytes(self) -> None:
        """
        A target of exactly 128 bytes is accepted, and non-ASCII characters are allowed.
        """
        for to in ["p" * 128, "\u00e9" * 64, "user 1"]:
            self.assertEqual(parse_frame(_frame(type="send", to=to, data=1)), Send(to, 1, None))

    def test_invalid_target(self) -> None:
        """
        Missing, empty, non-string, 129-byte and control-character targets are
        C{invalid_peer_id} and echo the requestId.
        """
        for fields in [
            {},
            {"to": ""},
            {"to": 5},
            {"to": None},
            {"to": ["p"]},
            {"to": "p" * 129},
            {"to": "\u00e9" * 64 + "x"},
            {"to": "p\u0000"},
            {"to": "p\u001f"},
            {"to": "p\u007f"},
            {"to": "p\u0085"},
            {"to": "p\u009f"},
        ]:
            self.assertRefused(
                _frame(type="send", data=1, requestId="r", **fields), ErrorCode.INVALID_PEER_ID, "r"
            )

    def test_lone_surrogate_target(self) -> None:
        """
        A target holding a lone surrogate is C{invalid_peer_id}.
        """
        self.assertRefused('{"type":"send","to":"p\\udc00","data":1,"requestId":"r"}', ErrorCode.INVALID_PEER_ID, "r")

    def test_invalid_target_before_missing_data(self) -> None:
        """
        An invalid target is reported before missing data.
        """
        self.assertRefused(_frame(type="send", to="", requestId="r"), ErrorCode.INVALID_PEER_ID, "r")


class IsValidPeerIdTests(SynchronousTestCase):
    """
    Tests for L{is_valid_peer_id} (§9.2: printable ASCII, 1-128 bytes).
    """

    def test_valid(self) -> None:
        """
        Printable ASCII of 1 to 128 characters is valid.
        """
        for peer_id in ["a", "u_1042", " ", "~", "p" * 128, "".join(chr(c) for c in range(0x20, 0x7F))]:
            self.assertTrue(is_valid_peer_id(peer_id))

    def test_invalid(self) -> None:
        """
        Empty, 129 characters, non-ASCII, control characters and non-strings are invalid.
        """
        for peer_id in ["", "p" * 129, "caf\u00e9", "a\x00", "a\x1f", "a\x7f", "a\t", None, 5, b"abc"]:
            self.assertFalse(is_valid_peer_id(peer_id))


class BuilderTests(SynchronousTestCase):
    """
    The server frame builders produce exactly the fields of §8.
    """

    def test_welcome_publishable(self) -> None:
        """
        A welcome without expiry carries an explicit C{expiresAt: null} and no metadata.
        """
        frame = welcome_frame("3b0f", None, 1767222000, None)
        self.assertIn(b'"expiresAt":null', frame.payload)
        self.assertEqual(
            _decode(frame),
            {
                "type": "welcome",
                "peerId": "3b0f",
                "expiresAt": None,
                "serverTime": 1767222000,
                "maxMessageSize": 65536,
            },
        )

    def test_welcome_empty_metadata_omitted(self) -> None:
        """
        An empty metadata object is omitted from the welcome.
        """
        self.assertNotIn("metadata", _decode(welcome_frame("p", 1, 0, {})))

    def test_welcome_with_metadata(self) -> None:
        """
        A JWT welcome carries expiry, server time, the advertised size and the metadata untouched.
        """
        metadata = {"iceServers": [{"urls": "stun:stun.example.org:3478"}], "x": [1, None]}
        self.assertEqual(
            _decode(welcome_frame("u_1042", 1767225600, 1767222000, metadata)),
            {
                "type": "welcome",
                "peerId": "u_1042",
                "expiresAt": 1767225600,
                "serverTime": 1767222000,
                "maxMessageSize": MAX_MESSAGE_SIZE,
                "metadata": metadata,
            },
        )
        self.assertEqual(MAX_MESSAGE_SIZE, 65536)

    def test_ack(self) -> None:
        """
        An ack carries exactly its type and the requestId.
        """
        self.assertEqual(_decode(ack_frame("r-3")), {"type": "ack", "requestId": "r-3"})

    def test_error_with_request_id(self) -> None:
        """
        An error echoes the requestId when there is one.
        """
        self.assertEqual(
            _decode(error_frame(ErrorCode.MISSING_DATA, "no data", "r-1")),
            {"type": "error", "code": "missing_data", "message": "no data", "requestId": "r-1"},
        )

    def test_error_without_request_id(self) -> None:
        """
        An error without requestId omits the key rather than sending null.
        """
        frame = error_frame(ErrorCode.MALFORMED_MESSAGE, "bad")
        self.assertEqual(_decode(frame), {"type": "error", "code": "malformed_message", "message": "bad"})
        self.assertNotIn(b"requestId", frame.payload)

    def test_message(self) -> None:
        """
        A message carries channel, sender, data (null included) and fromMetadata when given.
        """
        self.assertEqual(
            _decode(message_frame("c", "u_1", None, None)),
            {"type": "message", "channel": "c", "from": "u_1", "data": None},
        )
        self.assertEqual(
            _decode(message_frame("c", "u_1", [1], {"name": "Ada"})),
            {"type": "message", "channel": "c", "from": "u_1", "data": [1], "fromMetadata": {"name": "Ada"}},
        )

    def test_message_empty_metadata_omitted(self) -> None:
        """
        An empty sender metadata object is omitted from a message.
        """
        self.assertNotIn(b"fromMetadata", message_frame("c", "u", 1, {}).payload)

    def test_direct(self) -> None:
        """
        A direct carries sender and data, fromMetadata when given, and never a channel.
        """
        self.assertEqual(_decode(direct_frame("u_1", None, None)), {"type": "direct", "from": "u_1", "data": None})
        self.assertEqual(
            _decode(direct_frame("u_1", {"sdp": "v=0"}, {"name": "Ada"})),
            {"type": "direct", "from": "u_1", "data": {"sdp": "v=0"}, "fromMetadata": {"name": "Ada"}},
        )

    def test_presence_entry(self) -> None:
        """
        A presence entry omits metadata when the peer has none.
        """
        self.assertEqual(presence_entry("a", None), {"peerId": "a"})
        self.assertEqual(presence_entry("a", {}), {"peerId": "a"})
        self.assertEqual(presence_entry("a", {"n": 1}), {"peerId": "a", "metadata": {"n": 1}})

    def test_presence_both_arrays(self) -> None:
        """
        A presence frame always carries both C{joined} and C{left}, even when empty.
        """
        self.assertEqual(
            _decode(presence_frame("c", [], [])), {"type": "presence", "channel": "c", "joined": [], "left": []}
        )
        self.assertEqual(
            _decode(presence_frame("c", (), [{"peerId": "b"}])),
            {"type": "presence", "channel": "c", "joined": [], "left": [{"peerId": "b"}]},
        )

    def test_going_away(self) -> None:
        """
        A going_away frame carries the retry hint.
        """
        self.assertEqual(_decode(going_away_frame(1500)), {"type": "going_away", "retryAfterMs": 1500})

    def test_pong(self) -> None:
        """
        The pong frame is exactly C{{"type":"pong"}}.
        """
        self.assertEqual(PONG.payload, b'{"type":"pong"}')

    def test_ascii_bytes(self) -> None:
        """
        Frames are ASCII bytes, non-ASCII data is escaped, and they parse back to the same value.
        """
        data = {"text": "caf\u00e9 \u4e2d \U0001f600", "lone": "\ud800", "ctl": "\u0085"}
        frame = message_frame("caf\u00e9", "u", data, {"name": "\u00c5da"})
        self.assertIsInstance(frame.payload, bytes)
        frame.payload.decode("ascii")
        self.assertEqual(
            json.loads(frame.payload),
            {
                "type": "message",
                "channel": "caf\u00e9",
                "from": "u",
                "data": data,
                "fromMetadata": {"name": "\u00c5da"},
            },
        )

    def test_compact(self) -> None:
        """
        Frames are serialized without whitespace between tokens.
        """
        self.assertEqual(ack_frame("r").payload, b'{"type":"ack","requestId":"r"}')

    def test_relays_parsed_data(self) -> None:
        """
        Any C{data} that L{parse_frame} accepts can be relayed in a message frame unchanged.
        """
        payload = '{"type":"publish","channel":"a","data":{"f":1.5e300,"n":-0.0,"s":"\\ud800\\u0000","big":%s}}' % (
            "9" * 400,
        )
        frame = parse_frame(payload)
        assert isinstance(frame, Publish)
        self.assertEqual(_decode(message_frame("a", "u", frame.data, None))["data"], frame.data)


class SnapshotFramesTests(SynchronousTestCase):
    """
    Tests for L{snapshot_frames} (§10.2).
    """

    def _entries(self, count: int) -> list[dict]:
        """
        C{count} presence entries of varying sizes, some without metadata.
        """
        return [
            presence_entry(f"peer-{i:05d}", {"name": "\u00c5da " * (i % 7), "i": i} if i % 3 else None)
            for i in range(count)
        ]

    def test_empty(self) -> None:
        """
        An empty channel still gets exactly one snapshot frame with empty arrays.
        """
        frames = snapshot_frames("c", [])
        self.assertEqual([_decode(f) for f in frames], [{"type": "presence", "channel": "c", "joined": [], "left": []}])

    def test_small_single_frame(self) -> None:
        """
        A snapshot under the budget is one frame listing every entry in order.
        """
        entries = self._entries(20)
        frames = snapshot_frames("room", iter(entries))
        self.assertEqual(
            [_decode(f) for f in frames], [{"type": "presence", "channel": "room", "joined": entries, "left": []}]
        )

    def test_split_under_budget(self) -> None:
        """
        A large snapshot is split into several frames, each at most the budget
        in bytes, all with C{left: []}, together listing every entry once in order.
        """
        entries = self._entries(500)
        budget = 2000
        frames = snapshot_frames("caf\u00e9/room", entries, budget=budget)
        self.assertGreater(len(frames), 10)
        joined: list[dict] = []
        for frame in frames:
            self.assertLessEqual(len(frame.payload), budget)
            decoded = _decode(frame)
            self.assertEqual(set(decoded), {"type", "channel", "joined", "left"})
            self.assertEqual((decoded["type"], decoded["channel"], decoded["left"]), ("presence", "caf\u00e9/room", []))
            self.assertTrue(decoded["joined"])
            joined.extend(decoded["joined"])
        self.assertEqual(joined, entries)

    def test_exact_fit(self) -> None:
        """
        A snapshot that fits within the budget stays one frame; one that is a
        byte too large is split in two.
        """
        entries = self._entries(5)
        whole = len(presence_frame("c", entries, []).payload)
        self.assertEqual(len(snapshot_frames("c", entries, budget=whole + 1)), 1)
        self.assertEqual(len(snapshot_frames("c", entries, budget=whole - 1)), 2)

    def test_default_budget(self) -> None:
        """
        By default frames stay within 512 KiB, well under the SDK's 1 MiB cap.
        """
        entries = [presence_entry(f"p{i}", {"blob": "x" * 1000}) for i in range(1200)]
        frames = snapshot_frames("c", entries)
        self.assertGreater(len(frames), 1)
        for frame in frames:
            self.assertLessEqual(len(frame.payload), 512 * 1024)
        self.assertEqual([e for f in frames for e in _decode(f)["joined"]], entries)


def _typed(value: Any) -> Any:
    """
    A parsed JSON value with the type of every scalar spelled out, so that
    C{1}, C{1.0}, C{True}, C{0.0} and C{-0.0} compare unequal.
    """
    if isinstance(value, dict):
        return ("dict", [(k, _typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_typed(v) for v in value])
    return (type(value).__name__, repr(value))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFFFF)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=12,
)
#: What a frame may carry: JSON values as any parser here makes them, and
#: the non-finite floats that only the stdlib encoder's refusal keeps out.
encodable_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(alphabet=st.characters(exclude_categories=())),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=12,
)
_STDLIB_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


class _SpyEncoder:
    """
    The stdlib encoder, recording what it is asked to encode.
    """

    def __init__(self, calls: list[object]) -> None:
        self.calls = calls

    def encode(self, value: object) -> str:
        self.calls.append(value)
        return _STDLIB_ENCODER.encode(value)


_JSONISH = [
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"a", b"1", b"-", b".", b"e", b"400", b"9" * 20,
    b"NaN", b"Infinity", b"true", b"null", b" ", b"\\", b"\\u", b"d800", b"\xef\xbb\xbf", b"\xff",
    b"\xc3\xa9", b"\x00", b'"type"', b'"ping"',
]  # fmt: skip


class SharedCodecTests(SynchronousTestCase):
    """
    The shared JSON decoder and encoder behave as C{json.loads} and
    C{json.dumps} with the same arguments did.
    """

    def assertSameParse(self, payload: bytes | str) -> None:
        """
        L{protocol._loads} (orjson where it agrees) and the stdlib decoder
        accept or refuse C{payload} alike, and give the same values, down
        to the type of every number and the sign of zero.
        """
        try:
            expected: Any = ("ok", _typed(protocol._stdlib_loads(payload)))
        except (ValueError, RecursionError):
            expected = "refused"
        try:
            got: Any = ("ok", _typed(protocol._loads(payload)))
        except (ValueError, RecursionError):
            got = "refused"
        self.assertEqual(got, expected, payload)

    @settings(max_examples=300, deadline=None)
    @given(json_values, st.booleans())
    def test_orjson_agrees_on_documents(self, value: Any, ascii_only: bool) -> None:
        """
        Documents of every shape, with integers beyond 64 bits, floats at
        the edges, non-ASCII and lone surrogates, parse as the stdlib parses
        them, as bytes and as text.
        """
        text = json.dumps(value, ensure_ascii=ascii_only)
        self.assertSameParse(text)
        self.assertSameParse(text.encode("utf-8", "surrogatepass"))

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from(_JSONISH), max_size=12).map(b"".join))
    def test_orjson_agrees_on_garbage(self, payload: bytes) -> None:
        """
        Near-JSON bytes (constants, huge exponents, BOMs, bad UTF-8, stray
        characters) are refused or accepted as the stdlib decides.
        """
        self.assertSameParse(payload)

    def test_orjson_edge_cases(self) -> None:
        """
        The documents where orjson alone would differ parse as the stdlib
        parses them.
        """
        for payload in [
            b"[123456789012345678901234567890]",
            b"[18446744073709551616]",
            b"[-9223372036854775809]",
            b"[9223372036854775807]",
            b"[1e400]",
            b"[NaN]",
            b'["\\ud800"]',
            b"\xef\xbb\xbf[1]",
            b"[-0]",
            b"[-0.0]",
            b"[" * 200 + b"]" * 200,
        ]:
            self.assertSameParse(payload)

    def test_bom(self) -> None:
        """
        A UTF-8 BOM is skipped in bytes (as C{json.loads} does) and refused
        in a str.
        """
        self.assertEqual(parse_frame(b'\xef\xbb\xbf{"type":"ping"}'), Ping())
        error = self.assertRaises(FrameError, parse_frame, '\ufeff{"type":"ping"}')
        self.assertEqual(error.code, ErrorCode.MALFORMED_MESSAGE)

    def test_utf16(self) -> None:
        """
        Bytes in UTF-16 are detected as C{json.loads} detects them.
        """
        self.assertEqual(parse_frame('{"type":"ping"}'.encode("utf-16-le")), Ping())

    def test_encoding_unchanged(self) -> None:
        """
        Server frames are the compact, ASCII-only text of C{json.dumps}, and
        non-finite numbers are still refused.
        """
        data = {"s": "é\ud800", "n": [1, 2.5, None, True]}
        self.assertEqual(
            message_frame("c", "p", data, {"m": 1}).payload,
            json.dumps(
                {"type": "message", "channel": "c", "from": "p", "data": data, "fromMetadata": {"m": 1}},
                separators=(",", ":"),
                allow_nan=False,
            ).encode("ascii"),
        )
        self.assertRaises(ValueError, message_frame, "c", "p", float("inf"), None)

    def assertSameEncoding(self, value: Any) -> None:
        """
        L{protocol._dumps} (orjson where it cannot differ) writes the bytes
        the stdlib encoder writes, or refuses what it refuses.
        """
        frame = {"type": "direct", "from": "p", "data": value}
        try:
            expected: Any = _STDLIB_ENCODER.encode(frame).encode("ascii")
        except ValueError:
            expected = "refused"
        try:
            got: Any = protocol._dumps(frame)
        except ValueError:
            got = "refused"
        self.assertEqual(got, expected, repr(value))

    @settings(max_examples=500, deadline=None)
    @given(encodable_values)
    def test_fast_encoding_agrees_on_documents(self, value: Any) -> None:
        """
        Documents of every shape, with integers beyond 64 bits, floats of
        every magnitude and non-finite ones, any character including lone
        surrogates, encode as the stdlib encodes them.
        """
        self.assertSameEncoding(value)

    def test_fast_encoding_edge_cases(self) -> None:
        """
        Every character up to U+01FF, DEL, NaN, the infinities, the integers
        at orjson's 64-bit limits, the floats at each side of the notation
        thresholds, strings that look like floats, a lone surrogate, a StrEnum and data
        nested past orjson's limit encode as the stdlib encodes them.
        """
        for code in range(0x200):
            self.assertSameEncoding(f"a{chr(code)}b")
        for number in [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 0, -0.0]:
            self.assertSameEncoding(number)
        for magnitude in range(-330, 310):
            for mantissa in ("1", "1.5", "4.9406564584124654", "9.999999999999999"):
                value = float(f"{mantissa}e{magnitude}")
                self.assertSameEncoding(value)
                self.assertSameEncoding(-value)
        for special in [float("nan"), float("inf"), -float("inf"), None, "null", "0.00001", "1e-05", "2e+16", "\ud800"]:
            self.assertSameEncoding(special)
        self.assertSameEncoding(KeyType.SECRET)
        self.assertSameEncoding([[[]]] * 3)
        self.assertSameEncoding(functools.reduce(lambda inner, _: [inner], range(300), []))

    def test_fast_encoding_used(self) -> None:
        """
        A frame of strings, integers and a float between the thresholds is
        written by orjson (the stdlib encoder is not called).
        """
        calls: list[object] = []
        self.patch(protocol, "_ENCODER", _SpyEncoder(calls))
        frame = direct_frame("p", {"t": 1234.5, "n": [1, -2], "ok": True, "s": "x"}, None)
        self.assertEqual(frame.payload, b'{"type":"direct","from":"p","data":{"t":1234.5,"n":[1,-2],"ok":true,"s":"x"}}')
        self.assertEqual(calls, [])
        direct_frame("p", "é", None)
        self.assertEqual(len(calls), 1)

    def test_control_characters(self) -> None:
        """
        L{has_control_characters} flags exactly C0, DEL and C1.
        """
        for code in range(0x200):
            c = chr(code)
            self.assertEqual(
                has_control_characters(f"a{c}b"), c < "\x20" or "\x7f" <= c <= "\x9f", hex(code)
            )


class NestingTests(SynchronousTestCase):
    """
    Frames may not nest deeper than L{MAX_JSON_DEPTH}.
    """

    def test_too_deep(self) -> None:
        """
        A publish whose data nests past the limit is C{malformed_message}
        without a requestId, before anything could try to re-encode it.
        """
        data = "[" * (MAX_JSON_DEPTH + 10) + "]" * (MAX_JSON_DEPTH + 10)
        payload = '{"type":"publish","channel":"a","requestId":"r1","data":' + data + "}"
        error = self.assertRaises(FrameError, parse_frame, payload.encode())
        self.assertEqual((error.code, error.request_id), ("malformed_message", None))

    def test_deep_but_allowed(self) -> None:
        """
        Data nested just within the limit (the frame object is one level)
        parses and encodes back.
        """
        depth = MAX_JSON_DEPTH - 1
        payload = '{"type":"publish","channel":"a","data":' + "[" * depth + "]" * depth + "}"
        frame = parse_frame(payload)
        assert isinstance(frame, Publish)
        self.assertTrue(message_frame("a", "p", frame.data, None).payload.startswith(b'{"type":"message"'))

    def test_many_brackets_shallow(self) -> None:
        """
        Many brackets side by side are not depth.
        """
        data = "[" + ",".join(["[]"] * 2000) + "]"
        frame = parse_frame('{"type":"publish","channel":"a","data":' + data + "}")
        assert isinstance(frame, Publish)
        self.assertEqual(len(frame.data), 2000)

    def test_json_too_deep(self) -> None:
        """
        L{json_too_deep} counts objects and arrays alike, and is iterative.
        """
        value: object = 1
        for n in range(5000):
            value = [value] if n % 2 else {"k": value}
        self.assertTrue(json_too_deep(value))
        self.assertFalse(json_too_deep({"a": [{"b": [1]}]}, limit=4))
        self.assertTrue(json_too_deep({"a": [{"b": [1]}]}, limit=3))
