"""
The wire format, as pure functions: client frames in, server frames out.

Nothing here does I/O or reads a clock. L{parse_frame} turns one inbound
text frame into a typed request (L{Subscribe}, L{Unsubscribe}, L{Publish},
L{Send}, L{Ping}) or raises L{FrameError} carrying the protocol error code
of §12; the C{*_frame} builders make the server frames of §8 as
L{OutboundFrame}s, each serialized once however many connections it goes to.

Validation here covers the first steps of the validation order (§7): JSON and type,
field shapes (C{invalid_channel}, C{invalid_peer_id}, C{missing_data}) and
reserved prefixes. Permission and authorization checks need a connection's
grant and live in L{meteredrt.hub}.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import orjson
from attrs import frozen

from meteredrt.globs import is_wildcard, pattern_error

#: Advertised in the welcome; the SDK refuses to send larger C{data}.
MAX_MESSAGE_SIZE = 65536
#: Inbound frames above this close with 1009 (1 KiB of room for the envelope around maximal data).
INBOUND_FRAME_LIMIT = MAX_MESSAGE_SIZE + 1024
MAX_REQUEST_ID_BYTES = 128
MAX_CHANNEL_BYTES = 256
MAX_PEER_ID_BYTES = 128
MAX_SUBSCRIPTIONS = 100
#: Presence snapshots are split into frames no larger than this (§10.2).
SNAPSHOT_FRAME_BUDGET = 512 * 1024
RESERVED_PREFIXES = ("_metered/", "_internal/", "_system/")
#: Deeper JSON is refused: the stdlib parser accepts nesting its encoder
#: cannot write back out, and nothing real nests this far.
MAX_JSON_DEPTH = 128

#: The client frames a connection counts, by C{kind} (the index here): the
#: parsed requests' L{Subscribe.kind} and the like, and C{INVALID} for a
#: frame L{parse_frame} refused. Small ints, so that counting a frame is an
#: index into a list rather than a look-up by name.
INBOUND_TYPES = ("subscribe", "unsubscribe", "publish", "send", "ping", "invalid")
INVALID = INBOUND_TYPES.index("invalid")

#: The server frames, by L{OutboundFrame.kind} (the index here).
OUTBOUND_TYPES = ("welcome", "ack", "error", "message", "direct", "presence", "pong", "going_away")
_OUTBOUND_KIND = {name: kind for kind, name in enumerate(OUTBOUND_TYPES)}


class ErrorCode:
    """
    The in-band error codes of §12.
    """

    MALFORMED_MESSAGE = "malformed_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_CHANNEL = "invalid_channel"
    INVALID_PEER_ID = "invalid_peer_id"
    CHANNEL_NOT_AUTHORIZED = "channel_not_authorized"
    CHANNEL_RESERVED = "channel_reserved"
    CHANNEL_LIMIT_EXCEEDED = "channel_limit_exceeded"
    PEER_NOT_FOUND = "peer_not_found"
    MISSING_DATA = "missing_data"
    ACTION_NOT_PERMITTED = "action_not_permitted"
    OVER_MESSAGE_QUOTA = "over_message_quota"
    BACKEND_ERROR = "backend_error"
    INTERNAL_ERROR = "internal_error"


class CloseCode:
    """
    The WebSocket close codes of §13 that the server sends.
    """

    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    INVALID_TOKEN = 4001
    TOKEN_EXPIRED = 4002
    OVER_CONCURRENT_LIMIT = 4010
    OVER_MESSAGE_RATE = 4011
    ACCOUNT_SUSPENDED = 4012
    ADMIN_DISCONNECT = 4020


class FrameError(Exception):
    """
    A client frame was refused; the connection answers with an C{error}
    frame and stays open.

    @ivar code: the §12 error code.
    @ivar message: human-readable detail, safe to send to the client.
    @ivar request_id: the request's id when it had a valid one, else C{None}.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.request_id = request_id


@frozen
class Subscribe:
    kind: ClassVar[int] = 0
    channel: str
    include_sender_metadata: bool
    request_id: str | None
    wildcard: bool


@frozen
class Unsubscribe:
    kind: ClassVar[int] = 1
    channel: str
    request_id: str | None
    wildcard: bool


@frozen
class Publish:
    kind: ClassVar[int] = 2
    channel: str
    data: Any
    request_id: str | None


@frozen
class Send:
    kind: ClassVar[int] = 3
    to: str
    data: Any
    request_id: str | None


@frozen
class Ping:
    kind: ClassVar[int] = 4


ClientFrame = Subscribe | Unsubscribe | Publish | Send | Ping


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON syntax but parses to infinity, which no server
    # frame could carry on.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


# One decoder and one encoder for every frame: json.loads/json.dumps with
# any non-default argument build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


#: A run of digits long enough to spell an integer outside 64 bits, which
#: orjson would turn into a float; such documents go to the stdlib decoder.
#: In bytes (what Autobahn hands over) it is found by mapping every digit to
#: "0" and looking for 19 zeros: two C loops, several times cheaper than
#: the regular expression (which text frames still use).
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def _loads(payload: bytes | str) -> Any:
    """
    Parse a frame as L{_stdlib_loads} does, with orjson (several times
    faster) for the documents on which both agree.

    orjson refuses everything the stdlib decoder configured here refuses
    (NaN and infinities, a BOM, invalid UTF-8, lone surrogates, other
    encodings than UTF-8, numbers that overflow a double) and some it
    accepts: whatever orjson refuses goes to the stdlib decoder, whose
    verdict stands. The one document orjson accepts differently, an integer
    outside 64 bits (made a float), never reaches it.
    """
    if isinstance(payload, str):
        long_number = _LONG_DIGITS_TEXT.search(payload) is not None
    else:
        long_number = has_long_digit_run(payload)
    if not long_number:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            pass
    return _stdlib_loads(payload)


def has_long_digit_run(payload: bytes) -> bool:
    """
    Whether C{payload} has a run of digits long enough to spell an integer
    outside 64 bits, which orjson would parse as a float where the stdlib
    decoder makes an int: such a document must go to the stdlib decoder.
    """
    return _LONG_RUN in payload.translate(_DIGITS_AS_ZERO)


def _stdlib_loads(payload: bytes | str) -> Any:
    """
    C{json.loads(payload, parse_constant=..., parse_float=...)} with the
    shared decoder: the same encoding detection for bytes, the same refusal
    of a BOM in a str.
    """
    if isinstance(payload, str):
        if payload.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", payload, 0)
        return _DECODER.decode(payload)
    return _DECODER.decode(payload.decode(json.detect_encoding(payload), "surrogatepass"))


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def _utf8_len(text: str) -> int | None:
    """
    The UTF-8 length of C{text}, or C{None} if it holds a lone surrogate
    (which no UTF-8 peer could receive).
    """
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def json_too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """
    Whether C{value} nests arrays or objects more than C{limit} deep.
    Iterative, so hostile input cannot exhaust the stack.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _may_be_too_deep(payload: bytes | str) -> bool:
    """
    A cheap bound: a frame with fewer brackets than the limit cannot nest
    past it, so the walk runs only for the rare frame that might.
    """
    if isinstance(payload, bytes):
        return payload.count(b"[") + payload.count(b"{") > MAX_JSON_DEPTH
    return payload.count("[") + payload.count("{") > MAX_JSON_DEPTH


def has_control_characters(text: str) -> bool:
    """
    Whether C{text} holds a C0 control, DEL or a C1 control (§9.1).
    """
    return _CONTROL_CHARACTER.search(text) is not None


def channel_error(channel: object) -> tuple[str, str] | None:
    """
    Check a channel name or pattern against §9.1.

    @return: C{None} if acceptable, else C{(code, message)}.
    """
    if not isinstance(channel, str) or not channel:
        return ErrorCode.INVALID_CHANNEL, "channel must be a non-empty string"
    size = _utf8_len(channel)
    if size is None:
        return ErrorCode.INVALID_CHANNEL, "channel is not valid Unicode"
    if size > MAX_CHANNEL_BYTES:
        return ErrorCode.INVALID_CHANNEL, f"channel is longer than {MAX_CHANNEL_BYTES} bytes"
    if has_control_characters(channel):
        return ErrorCode.INVALID_CHANNEL, "channel contains control characters"
    if channel.lower().startswith(RESERVED_PREFIXES):
        return ErrorCode.CHANNEL_RESERVED, "channel prefix is reserved"
    return None


def concrete_channel_error(channel: object) -> tuple[str, str] | None:
    """
    Like L{channel_error}, and also refuse wildcards where a concrete
    channel is needed (publish, REST): C{invalid_channel}.
    """
    problem = channel_error(channel)
    if problem is None and is_wildcard(channel):  # type: ignore[arg-type]
        return ErrorCode.INVALID_CHANNEL, "wildcards are not allowed here"
    return problem


def is_valid_peer_id(peer_id: object) -> bool:
    """
    Whether C{peer_id} is printable ASCII of 1-128 bytes (JWT C{sub}, REST).
    """
    return (
        isinstance(peer_id, str)
        and 0 < len(peer_id) <= MAX_PEER_ID_BYTES
        and all(" " <= c <= "~" for c in peer_id)
    )


def _send_target_ok(to: object) -> bool:
    """
    The looser rule for C{send.to} (§9.2): non-empty, at most 128 bytes, no
    control characters.
    """
    if not isinstance(to, str) or not to:
        return False
    size = _utf8_len(to)
    return size is not None and size <= MAX_PEER_ID_BYTES and not has_control_characters(to)


def parse_frame(payload: bytes | str) -> ClientFrame:
    """
    Decode and validate one client text frame.

    @raise FrameError: with the §12 code for the first problem found, in
        the protocol's validation order (§7).
    """
    try:
        frame = _loads(payload)
    except (ValueError, RecursionError):
        raise FrameError(ErrorCode.MALFORMED_MESSAGE, "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise FrameError(ErrorCode.MALFORMED_MESSAGE, "frame is not a JSON object")
    if _may_be_too_deep(payload) and json_too_deep(frame):
        raise FrameError(ErrorCode.MALFORMED_MESSAGE, f"frame nests deeper than {MAX_JSON_DEPTH} levels")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise FrameError(ErrorCode.MALFORMED_MESSAGE, "frame has no string type")

    request_id = frame.get("requestId")
    if request_id is not None:
        size = _utf8_len(request_id) if isinstance(request_id, str) else None
        if size is None or not 0 < size <= MAX_REQUEST_ID_BYTES:
            raise FrameError(
                ErrorCode.MALFORMED_MESSAGE,
                f"requestId must be a non-empty string of at most {MAX_REQUEST_ID_BYTES} bytes",
            )

    if kind == "ping":
        return Ping()
    if kind == "subscribe":
        channel = _checked_channel(frame, request_id)
        wildcard = is_wildcard(channel)
        bad_pattern = pattern_error(channel) if wildcard else None
        if bad_pattern is not None:
            raise FrameError(ErrorCode.INVALID_CHANNEL, f"invalid pattern: {bad_pattern}", request_id)
        include = frame.get("includeSenderMetadata", False)
        if not isinstance(include, bool):
            raise FrameError(
                ErrorCode.MALFORMED_MESSAGE, "includeSenderMetadata must be a boolean", request_id
            )
        return Subscribe(channel, include, request_id, wildcard)
    if kind == "unsubscribe":
        target = frame.get("channel")
        problem = channel_error(target)
        # Unsubscribing a reserved name is harmless: nobody can hold it.
        if problem is not None and problem[0] != ErrorCode.CHANNEL_RESERVED:
            raise FrameError(problem[0], problem[1], request_id)
        assert isinstance(target, str)  # channel_error let only strings by
        return Unsubscribe(target, request_id, is_wildcard(target))
    if kind == "publish":
        problem = concrete_channel_error(frame.get("channel"))
        if problem is not None and problem[0] == ErrorCode.INVALID_CHANNEL:
            raise FrameError(problem[0], problem[1], request_id)
        if "data" not in frame:
            raise FrameError(ErrorCode.MISSING_DATA, "publish needs a data field", request_id)
        if problem is not None:
            raise FrameError(problem[0], problem[1], request_id)
        return Publish(frame["channel"], frame["data"], request_id)
    if kind == "send":
        to = frame.get("to")
        if not _send_target_ok(to):
            raise FrameError(
                ErrorCode.INVALID_PEER_ID,
                "to must be a non-empty peerId of at most 128 bytes without control characters",
                request_id,
            )
        if "data" not in frame:
            raise FrameError(ErrorCode.MISSING_DATA, "send needs a data field", request_id)
        return Send(to, frame["data"], request_id)  # type: ignore[arg-type]
    raise FrameError(ErrorCode.UNKNOWN_TYPE, "unknown frame type", request_id)


def _checked_channel(frame: dict, request_id: str | None) -> str:
    problem = channel_error(frame.get("channel"))
    if problem is not None:
        raise FrameError(problem[0], problem[1], request_id)
    return frame["channel"]


class OutboundFrame:
    """
    One server frame, serialized once.

    The same instance is handed to every connection that receives it; the
    WebSocket adapter caches its framed form in L{wire} on first use,
    so a fan-out to a thousand subscribers frames the payload once.

    @ivar kind: the frame's type as an index into L{OUTBOUND_TYPES}, for
        counting frames sent by type.
    """

    __slots__ = ("kind", "payload", "wire")

    def __init__(self, payload: bytes, kind: int) -> None:
        self.payload = payload
        self.kind = kind
        self.wire: bytes | None = None

    def __repr__(self) -> str:
        return f"OutboundFrame({self.payload!r})"


#: orjson leaves subclasses of str, int, dict and list (a C{StrEnum}, say)
#: and dates to the stdlib encoder, which writes or refuses them its own way.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _like_stdlib(fast: bytes) -> bool:
    """
    Whether orjson's C{fast} is what the stdlib encoder would have written.

    They differ only where C{fast} has a byte outside printable ASCII (the
    stdlib escapes every non-ASCII character and DEL; orjson writes UTF-8
    and a raw DEL), C{null} (orjson also writes NaN and the infinities so,
    which the stdlib encoder refuses), or a float below 1e-4: both write the
    shortest digits that read back as the same double, and large numbers
    alike (C{1e+16}), but small ones each their own way (C{0.00001} and
    C{1e-7} against C{1e-05} and C{1e-07}), which shows as C{e-} or
    C{0.0000}. Any of these inside a string only costs the fallback.
    C{tests/test_protocol.py} compares the two on random documents and
    floats of every magnitude.
    """
    return (
        fast.isascii()
        and b"\x7f" not in fast
        and b"null" not in fast
        and b"e-" not in fast
        and b"0.0000" not in fast
    )


def _dumps(frame: dict) -> bytes:
    """
    The bytes of C{_ENCODER.encode(frame)}: compact, ASCII-only (so lone
    surrogates that arrived escaped in client JSON stay representable),
    non-finite numbers refused.

    orjson (several times faster) writes them when its output cannot differ
    (L{_like_stdlib}). Everything else, and whatever orjson refuses
    (integers beyond 64 bits, lone surrogates, deep nesting, non-string
    keys), goes to the stdlib encoder, whose output or error stands. Frames
    hold JSON values only (what a JSON parser made, and the server's own
    strings and numbers).
    """
    try:
        fast = orjson.dumps(frame, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        pass
    else:
        if _like_stdlib(fast):
            return fast
    return _ENCODER.encode(frame).encode("ascii")


def encode(frame: dict) -> OutboundFrame:
    """
    Serialize a server frame, as L{_dumps} says.
    """
    return OutboundFrame(_dumps(frame), _OUTBOUND_KIND[frame["type"]])


def json_size(value: object) -> int:
    """
    The size of C{value} serialized compactly as UTF-8, as caps count it.
    """
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


def welcome_frame(
    peer_id: str, expires_at: int | None, server_time: int, metadata: dict | None
) -> OutboundFrame:
    frame: dict[str, Any] = {
        "type": "welcome",
        "peerId": peer_id,
        "expiresAt": expires_at,
        "serverTime": server_time,
        "maxMessageSize": MAX_MESSAGE_SIZE,
    }
    if metadata:
        frame["metadata"] = metadata
    return encode(frame)


def ack_frame(request_id: str) -> OutboundFrame:
    return encode({"type": "ack", "requestId": request_id})


def error_frame(code: str, message: str, request_id: str | None = None) -> OutboundFrame:
    frame = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        frame["requestId"] = request_id
    return encode(frame)


def message_frame(channel: str, sender: str, data: Any, from_metadata: dict | None) -> OutboundFrame:
    frame = {"type": "message", "channel": channel, "from": sender, "data": data}
    if from_metadata:
        frame["fromMetadata"] = from_metadata
    return encode(frame)


def direct_frame(sender: str, data: Any, from_metadata: dict | None) -> OutboundFrame:
    frame = {"type": "direct", "from": sender, "data": data}
    if from_metadata:
        frame["fromMetadata"] = from_metadata
    return encode(frame)


def presence_entry(peer_id: str, metadata: dict | None) -> dict:
    """
    One C{joined}/C{left} entry; C{metadata} is omitted when empty (§8.6).
    """
    return {"peerId": peer_id, "metadata": metadata} if metadata else {"peerId": peer_id}


def presence_frame(channel: str, joined: Sequence[dict], left: Sequence[dict]) -> OutboundFrame:
    return encode({"type": "presence", "channel": channel, "joined": list(joined), "left": list(left)})


def snapshot_frames(
    channel: str, entries: Iterable[dict], budget: int = SNAPSHOT_FRAME_BUDGET
) -> list[OutboundFrame]:
    """
    A presence snapshot as one frame, or several of at most C{budget} bytes
    each when it is too large for the SDK's 1 MiB frame cap; each part has C{left: []}.

    Always at least one frame, so an empty channel still gets its snapshot.
    """
    overhead = len(presence_frame(channel, [], []).payload)
    frames: list[OutboundFrame] = []
    batch: list[dict] = []
    size = overhead
    for entry in entries:
        # ASCII-only output: as many bytes as characters.
        entry_size = len(_ENCODER.encode(entry)) + 1
        if batch and size + entry_size > budget:
            frames.append(presence_frame(channel, batch, []))
            batch, size = [], overhead
        batch.append(entry)
        size += entry_size
    frames.append(presence_frame(channel, batch, []))
    return frames


def going_away_frame(retry_after_ms: int) -> OutboundFrame:
    return encode({"type": "going_away", "retryAfterMs": retry_after_ms})


PONG = encode({"type": "pong"})


def is_finite_json_number(value: object) -> bool:
    """
    Whether C{value} is an int (not a bool) or a finite float.
    """
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
