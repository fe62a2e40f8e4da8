"""
Channel membership and the peer directory, in memory.

L{MemoryPresence} implements L{IPresence} for a single node. Membership is
refcounted per (app, channel, peerId) by connection id, so a peer
with two tabs joins once and leaves once. Keying by connection id is what
will let a cluster implementation (Redis, not written yet) keep the same
shape per node, so that a crashed node's entries can be reaped by the
survivors.
"""

from __future__ import annotations

from attrs import define, frozen
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from meteredrt.interfaces import IPresence


@frozen
class Member:
    """
    One peer in one channel, as presence frames and REST show it.
    """

    peer_id: str
    metadata: dict | None


@define
class _Membership:
    metadata: dict | None
    connections: set[str]


@implementer(IPresence)
class MemoryPresence:
    """
    Presence state of one node, answering synchronously through fired
    Deferreds.
    """

    def __init__(self) -> None:
        # Dicts keep insertion order, which is join order for snapshots.
        self._channels: dict[tuple[str, str], dict[str, _Membership]] = {}
        self._peers: dict[tuple[str, str], set[str]] = {}

    def add_member(
        self, app_id: str, channel: str, peer_id: str, conn_id: str, metadata: dict | None
    ) -> Deferred[bool]:
        members = self._channels.setdefault((app_id, channel), {})
        membership = members.get(peer_id)
        if membership is None:
            members[peer_id] = _Membership(metadata, {conn_id})
            return succeed(True)
        # The most recent connection's peerMetadata is shown.
        membership.metadata = metadata
        membership.connections.add(conn_id)
        return succeed(False)

    def remove_member(self, app_id: str, channel: str, peer_id: str, conn_id: str) -> Deferred[Member | None]:
        members = self._channels.get((app_id, channel))
        membership = members.get(peer_id) if members else None
        if membership is None or conn_id not in membership.connections:
            return succeed(None)
        membership.connections.discard(conn_id)
        if membership.connections:
            return succeed(None)
        del members[peer_id]  # type: ignore[union-attr]
        if not members:
            del self._channels[(app_id, channel)]
        return succeed(Member(peer_id, membership.metadata))

    def members(self, app_id: str, channel: str) -> Deferred[list[Member]]:
        members = self._channels.get((app_id, channel), {})
        return succeed([Member(peer_id, m.metadata) for peer_id, m in members.items()])

    def add_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        self._peers.setdefault((app_id, peer_id), set()).add(conn_id)
        return succeed(None)

    def remove_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        connections = self._peers.get((app_id, peer_id))
        if connections is not None:
            connections.discard(conn_id)
            if not connections:
                del self._peers[(app_id, peer_id)]
        return succeed(None)

    def connections_of(self, app_id: str, peer_id: str) -> Deferred[frozenset[str]]:
        return succeed(frozenset(self._peers.get((app_id, peer_id), ())))
