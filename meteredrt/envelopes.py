"""
What the broker carries between nodes.

An envelope is a plain immutable value holding everything a receiving node
needs to build the frames for its own connections: a L{ChannelMessage} for a
publish, a L{PresenceChange} for a join or leave delta, a L{DirectMessage}
for a C{send}. Keeping them free of connection objects is what will let a
cluster broker (L{meteredrt.broker.redis}) serialize them unchanged.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen


@frozen
class ChannelMessage:
    """
    A publish to a concrete channel.

    @ivar sender_conn: the publishing connection, which must not hear its
        own message; C{None} for a REST publish.
    """

    channel: str
    sender: str
    data: Any
    sender_metadata: dict | None
    sender_conn: str | None


@frozen
class PresenceChange:
    """
    A presence delta for one channel.

    @ivar joined: presence entries (C{{"peerId", "metadata"?}}).
    @ivar exclude_conn: the subscribing connection, which gets a snapshot
        instead of the delta.
    @ivar version: the channel membership's version this delta made (see
        L{meteredrt.membership.Joining}); C{None} on one node.
    """

    channel: str
    joined: tuple[dict, ...]
    left: tuple[dict, ...]
    exclude_conn: str | None
    version: int | None = None


@frozen
class DirectMessage:
    """
    A C{send} to every connection of one peer except the sending one.
    """

    to: str
    sender: str
    data: Any
    sender_metadata: dict | None
    sender_conn: str


@frozen
class Disconnect:
    """
    Close every connection of a peer (the REST kick).
    """

    peer_id: str
    code: int
    reason: str
