"""
What cluster nodes write to Redis: key and channel names, the message
format, and the mapping of channel patterns to Redis patterns.

Shared by L{meteredrt.broker.redis}, L{meteredrt.presence.redis} and
L{meteredrt.lease}, so that they agree on it; the Lua side lives in
L{meteredrt.redisscripts}. Pure apart from L{ClusterNode}'s counters.

Every message on a Redis channel is C{origin|seq|app|version|body}:

  - C{origin}: the node id that sent it, so the sender skips its own
    messages (it delivered them to its own connections when it sent them);
    presence changes made by a reaper or a resynchronization carry an
    origin no node has, so that every node delivers them;
  - C{seq}: a per-node counter making every message unique, which is what
    lets a node recognise the several copies Redis hands it when a publish
    matches more than one of its subscriptions (L{Deduplicator});
  - C{version}: the membership version of a presence delta, else empty;
  - C{body}: the envelope as a JSON array (L{encode_body}).

Keys (C{app} ids and node ids never contain C{:} or glob characters):

  - C{mrt:{app}:c:{channel}}: the pub/sub channel of a concrete channel;
  - C{mrt:n:{node}}: a node's inbox for directs and kicks;
  - C{mrt:{app}:m:{channel}}: hash peer -> C{joinversion|metadata JSON};
  - C{mrt:{app}:k:{len}:{channel}:{peer}}: set of the peer's connections
    in the channel (the refcount);
  - C{mrt:cs:{conn}}: set of the channels a connection is a member of;
  - C{mrt:{app}:r:{peer}}: hash conn -> node (the peer registry);
  - C{mrt:nc:{node}}: hash conn -> C{app:peer} (what a reaper removes);
  - C{mrt:version}: the membership version counter;
  - C{mrt:{app}:cc}: hash node -> the app's connections counted on it
    (the cluster-wide concurrent connection count is the sum);
  - C{mrt:ca:{node}}: set of the apps the node counts connections of
    (what a reaper removes from those hashes);
  - C{mrt:{app}:live}: hash node -> the app's live connections there, as
    the node last shared them (every app, capped or not; for usage reports);
  - C{mrt:{app}:pk:{period start}}: the period's sampled cluster-wide peak
    of the app's concurrent connections;
  - C{mrt:lease:{node}}, C{mrt:nodes}, C{mrt:reaped:{node}}: leases.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
from typing import Any

from meteredrt.envelopes import ChannelMessage, DirectMessage, Disconnect, PresenceChange
from meteredrt.protocol import presence_entry

PREFIX = b"mrt:"

#: The origin of presence changes every node must deliver, its sender's
#: included (reaping, resynchronization).
EVERYONE = "*"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def default_node_name() -> str:
    """
    C{host-pid}, reduced to the characters node names may hold.
    """
    return _UNSAFE.sub("-", f"{socket.gethostname()}-{os.getpid()}")[:64]


class ClusterNode:
    """
    This node's identity in the cluster and its message counter.

    @ivar node_id: the node name and a random suffix: a node restarted
        under the same name is a new incarnation, whose connection ids
        cannot collide with the old one's, which a survivor reaps.
    @ivar version_floor: the highest membership version this node has
        seen, to keep versions increasing if Redis comes back empty.
    """

    def __init__(self, name: str, suffix: str | None = None) -> None:
        self.name = name
        self.node_id = f"{name}.{suffix if suffix is not None else os.urandom(3).hex()}"
        self.origin = self.node_id.encode()
        self._seq = itertools.count(1)
        self.version_floor = 0

    def prefix(self, origin: str | None = None) -> bytes:
        """
        The C{origin|seq|} start of a new message (C{app|version|body}
        follows).
        """
        sender = self.origin if origin is None else origin.encode()
        return b"%s|%d|" % (sender, next(self._seq))

    def observe_version(self, version: int) -> None:
        if version > self.version_floor:
            self.version_floor = version


def topic(app_id: str, channel: str) -> bytes:
    """
    The Redis channel of one of our concrete channels.
    """
    return b"%s%s:c:%s" % (PREFIX, app_id.encode(), channel.encode())


def inbox(node_id: str) -> bytes:
    """
    The Redis channel of a node's directs and kicks.
    """
    return b"%sn:%s" % (PREFIX, node_id.encode())


_REDIS_SPECIAL = frozenset("*?[]\\")


def redis_pattern(app_id: str, pattern: str) -> bytes:
    """
    A Redis pattern matching at least every channel our C{pattern} matches.

    Redis's C{*} also crosses C{/}, so it can match more: the hub filters
    again with our own rules. Our wildcards (C{*}, C{**}) become C{*};
    literal characters that Redis treats specially are escaped.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            literal = pattern[i + 1]
            out.append("\\" + literal if literal in _REDIS_SPECIAL else literal)
            i += 2
            continue
        if c == "*":
            while i < len(pattern) and pattern[i] == "*":
                i += 1
            if not out or out[-1] != "*":
                out.append("*")
            continue
        out.append("\\" + c if c in _REDIS_SPECIAL else c)
        i += 1
    return topic(app_id, "") + "".join(out).encode()


# ASCII output: client data may hold lone surrogates (escaped in its JSON),
# which UTF-8 cannot carry. One encoder, built once.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(value: Any) -> bytes:
    """
    C{value} as compact ASCII JSON.
    """
    return _ENCODER.encode(value).encode("ascii")


def encode_body(envelope: object) -> bytes:
    """
    An envelope as the JSON array Redis carries.
    """
    if isinstance(envelope, ChannelMessage):
        e = envelope
        return dumps(["m", e.channel, e.sender, e.data, e.sender_metadata, e.sender_conn])
    if isinstance(envelope, DirectMessage):
        d = envelope
        return dumps(["d", d.to, d.sender, d.data, d.sender_metadata, d.sender_conn])
    if isinstance(envelope, Disconnect):
        return dumps(["x", envelope.peer_id, envelope.code, envelope.reason])
    if isinstance(envelope, PresenceChange):
        p = envelope
        joined = [[entry["peerId"], entry.get("metadata")] for entry in p.joined]
        left = [[entry["peerId"], entry.get("metadata")] for entry in p.left]
        return dumps(["p", p.channel, joined, left, p.exclude_conn])
    raise TypeError(f"cannot carry {envelope!r}")


def encode(node: ClusterNode, app_id: str, envelope: object) -> bytes:
    """
    A whole message from this node.
    """
    return b"%s%s||%s" % (node.prefix(), app_id.encode(), encode_body(envelope))


class MalformedMessage(ValueError):
    """
    A message on one of our Redis channels that we did not write.
    """


def decode(payload: bytes) -> tuple[bytes, str, object]:
    """
    Read a message: C{(origin, app_id, envelope)}.

    @raise MalformedMessage: for anything else.
    """
    try:
        origin, _seq, app, version, body = payload.split(b"|", 4)
        value = json.loads(body)
        kind = value[0]
        if kind == "m":
            envelope: object = ChannelMessage(value[1], value[2], value[3], value[4], value[5])
        elif kind == "d":
            envelope = DirectMessage(value[1], value[2], value[3], value[4], value[5])
        elif kind == "x":
            envelope = Disconnect(value[1], int(value[2]), value[3])
        elif kind == "p":
            envelope = PresenceChange(
                value[1],
                tuple(presence_entry(peer, metadata) for peer, metadata in value[2]),
                tuple(presence_entry(peer, metadata) for peer, metadata in value[3]),
                value[4],
                int(version) if version else None,
            )
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return origin, app.decode(), envelope
    except (ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise MalformedMessage(f"{e}: {payload[:100]!r}") from None


class Deduplicator:
    """
    Recognises the copies of one publish on one subscriber connection.

    A node whose subscriptions overlap (C{room/1} and C{room/*}) receives
    one publish as a C{message} and a C{pmessage} per matching pattern.
    Redis writes them all while executing that one PUBLISH, so they are
    adjacent in the connection's stream; every message is unique (its
    origin and sequence number), so a message equal to the one before it is
    a copy. The hub delivers each envelope to every local receiver it
    concerns, so one delivery per publish is exactly once per connection.
    """

    def __init__(self) -> None:
        self._last: bytes | None = None

    def first(self, payload: bytes) -> bool:
        """
        Whether C{payload} is the first copy of its publish.
        """
        if payload == self._last:
            return False
        self._last = payload
        return True

    def reset(self) -> None:
        """
        A new connection: nothing before it can be repeated.
        """
        self._last = None
