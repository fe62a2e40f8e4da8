"""
Channel membership and the peer directory, in memory.

L{MemoryPresence} implements L{IPresence} for a single node. Membership is
refcounted per (app, channel, peerId) by connection id, so a peer
with two tabs joins once and leaves once. Each change announces its own
delta to the attached hub in the same call, which is the atomic step the
seam asks for: on one node nothing can come between a change and its
announcement.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from meteredrt.envelopes import PresenceChange
from meteredrt.interfaces import IDeliveryTarget, IPresence, IPresenceObserver
from meteredrt.membership import Joining, Member
from meteredrt.protocol import presence_entry


@define
class _Channel:
    """
    One channel's membership.

    @ivar members: peer id -> the member as snapshots show it, in join
        order. Kept as L{Member}s so that a join's snapshot is a copy of
        this dict's values, not a new L{Member} for everyone already there.
    @ivar connections: peer id -> its connections in the channel.
    """

    members: dict[str, Member]
    connections: dict[str, set[str]]

_log = Logger()


@implementer(IPresence)
class MemoryPresence:
    """
    Presence state of one node, answering synchronously through fired
    Deferreds.

    @param observer: told of every transition this presence makes, in the
        step that makes it: a peer's first and last connection, a channel's
        first and last member, a member's join and leave (the presence
        webhooks).
    """

    def __init__(self, observer: IPresenceObserver | None = None) -> None:
        self._observer = observer
        # Dicts keep insertion order, which is join order for snapshots.
        self._channels: dict[tuple[str, str], _Channel] = {}
        self._peers: dict[tuple[str, str], set[str]] = {}
        # conn id -> the channels it is a member of, for one-step disconnects
        self._held: dict[str, set[str]] = {}
        self._target: IDeliveryTarget | None = None

    def _tell(self, event: str, *args: Any) -> None:
        """
        Tell the observer, if any, of one transition. A side channel that
        fails is logged and never stops presence itself.
        """
        if self._observer is None:
            return
        try:
            getattr(self._observer, event)(*args)
        except Exception:
            _log.failure("The presence observer failed on {event}", event=event)

    def attach(self, target: IDeliveryTarget) -> None:
        self._target = target

    def _announce(self, app_id: str, change: PresenceChange) -> None:
        if self._target is not None:
            self._target.deliver(app_id, change)

    def add_member(
        self, app_id: str, channel: str, peer_id: str, conn_id: str, metadata: dict | None, *, snapshot: bool
    ) -> Deferred[Joining]:
        room = self._channels.get((app_id, channel))
        if room is None:
            room = self._channels[(app_id, channel)] = _Channel({}, {})
        self._held.setdefault(conn_id, set()).add(channel)
        connections = room.connections.get(peer_id)
        first = connections is None
        if first and not room.connections:
            self._tell("channel_occupied", app_id, channel)
        # A rejoining peer keeps its place; the most recent connection's
        # peerMetadata is shown.
        room.members[peer_id] = Member(peer_id, metadata)
        if connections is None:
            room.connections[peer_id] = {conn_id}
            joined = (presence_entry(peer_id, metadata),)
            self._announce(app_id, PresenceChange(channel, joined, (), conn_id))
            self._tell("member_joined", app_id, channel, peer_id, metadata)
        else:
            connections.add(conn_id)
        return succeed(Joining(first, tuple(room.members.values()) if snapshot else None))

    def _leave(self, app_id: str, channel: str, peer_id: str, conn_id: str) -> Member | None:
        room = self._channels.get((app_id, channel))
        connections = room.connections.get(peer_id) if room is not None else None
        if room is None or connections is None or conn_id not in connections:
            return None
        connections.discard(conn_id)
        if connections:
            return None
        del room.connections[peer_id]
        gone = room.members.pop(peer_id)
        vacated = not room.connections
        if vacated:
            del self._channels[(app_id, channel)]
        left = (presence_entry(peer_id, gone.metadata),)
        self._announce(app_id, PresenceChange(channel, (), left, None))
        self._tell("member_left", app_id, channel, peer_id, gone.metadata)
        if vacated:
            self._tell("channel_vacated", app_id, channel)
        return gone

    def remove_member(self, app_id: str, channel: str, peer_id: str, conn_id: str) -> Deferred[Member | None]:
        held = self._held.get(conn_id)
        if held is not None:
            held.discard(channel)
        return succeed(self._leave(app_id, channel, peer_id, conn_id))

    def members(self, app_id: str, channel: str) -> Deferred[list[Member]]:
        room = self._channels.get((app_id, channel))
        return succeed(list(room.members.values()) if room is not None else [])

    def snapshot(self, app_id: str, channel: str) -> Deferred[Joining]:
        room = self._channels.get((app_id, channel))
        return succeed(Joining(False, tuple(room.members.values()) if room is not None else ()))

    def add_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        connections = self._peers.setdefault((app_id, peer_id), set())
        connections.add(conn_id)
        if len(connections) == 1:
            self._tell("peer_connected", app_id, peer_id)
        return succeed(None)

    def remove_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        for channel in sorted(self._held.pop(conn_id, ())):
            self._leave(app_id, channel, peer_id, conn_id)
        connections = self._peers.get((app_id, peer_id))
        if connections is not None:
            connections.discard(conn_id)
            if not connections:
                del self._peers[(app_id, peer_id)]
                self._tell("peer_disconnected", app_id, peer_id)
        return succeed(None)

    def connections_of(self, app_id: str, peer_id: str) -> Deferred[frozenset[str]]:
        return succeed(frozenset(self._peers.get((app_id, peer_id), ())))
