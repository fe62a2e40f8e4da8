"""
Cluster-wide membership and peer registry in Redis.

L{RedisPresence} implements L{IPresence} with one Lua script per change
(L{meteredrt.redisscripts}): the script changes the membership, bumps the
membership version, publishes the delta to the other nodes and returns what
this node needs to announce the same delta to its own connections, all in
one atomic step and one round trip. A subscriber's snapshot comes from the
same step that adds it, with the version it shows; deltas at or below that
version are already in it, later ones are not (the hub drops the former).

Every call goes over the node's one command connection
(L{meteredrt.redisclient.RedisClient}), so Redis carries out one
connection's calls in the order the hub made them, and this node's deltas
reach the others in that order, behind the same connection's earlier
publishes (per-sender FIFO across nodes).

The presence also keeps a mirror of this node's live connections and their
memberships; after Redis was unreachable, or the node was fenced, L{resync}
makes Redis agree with it in one script.

Every script also returns the cluster-wide transitions its step made (a
peer's first connection anywhere and its last one gone, a channel's first
member and its last one gone, a member's join and leave), and the node
that ran it tells its L{IPresenceObserver} (the webhooks): each transition
is told once in the whole cluster, by one node, without a round trip of
its own. A dead node's transitions are told by the node that reaps it
(L{report}, from L{meteredrt.lease.NodeLease}); a resynchronization tells
what it changed: the connections that closed while Redis could not hear of
them go (possibly a peer's last), and connections a reaper removed while
this node was cut off come back (possibly a peer's first again).
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from meteredrt import redisscripts
from meteredrt.clusterwire import EVERYONE, ClusterNode, dumps
from meteredrt.envelopes import PresenceChange
from meteredrt.interfaces import BackendUnavailable, IDeliveryTarget, IPresence, IPresenceObserver
from meteredrt.membership import Joining, Member
from meteredrt.protocol import presence_entry
from meteredrt.redisclient import RedisClient, RedisUnavailable


@define
class _Connection:
    app_id: str
    peer_id: str
    metadata: bytes = b"null"
    channels: set[str] = field(factory=set)


def _json(metadata: dict | None) -> bytes:
    return dumps(metadata) if metadata else b"null"


def _members(flat: list[bytes]) -> tuple[Member, ...]:
    """
    The members of an C{HGETALL} of a members hash, by join version.
    """
    rows = []
    for i in range(0, len(flat), 2):
        version, _, metadata = flat[i + 1].partition(b"|")
        # Most peers have no metadata: skip the JSON parser for them.
        rows.append((int(version), flat[i].decode(), None if metadata == b"null" else json.loads(metadata)))
    rows.sort(key=lambda row: row[0])
    return tuple(Member(peer, metadata) for _, peer, metadata in rows)


@implementer(IPresence)
class RedisPresence:
    """
    Presence shared by every node on one Redis.

    @param observer: told of the cluster-wide transitions this node's
        steps make (and those of the nodes it reaps).
    """

    log = Logger()

    def __init__(self, client: RedisClient, node: ClusterNode, observer: IPresenceObserver | None = None) -> None:
        self._client = client
        self._node = node
        self._observer = observer
        self._target: IDeliveryTarget | None = None
        self._connections: dict[str, _Connection] = {}
        for script in redisscripts.ALL:
            client.register(script)

    def attach(self, target: IDeliveryTarget) -> None:
        self._target = target

    def report(self, transitions: list[bytes]) -> None:
        """
        Tell the observer, if any, of the transitions a script returned
        (five fields each, see L{meteredrt.redisscripts}), in order. A side
        channel that fails is logged and never stops presence itself.
        """
        observer = self._observer
        if observer is None:
            return
        for i in range(0, len(transitions), 5):
            tag, app, name, peer, meta = (value.decode() for value in transitions[i : i + 5])
            try:
                if tag == "P+":
                    observer.peer_connected(app, name)
                elif tag == "P-":
                    observer.peer_disconnected(app, name)
                elif tag == "C+":
                    observer.channel_occupied(app, name)
                elif tag == "C-":
                    observer.channel_vacated(app, name)
                elif tag == "J":
                    observer.member_joined(app, name, peer, json.loads(meta))
                elif tag == "L":
                    observer.member_left(app, name, peer, json.loads(meta))
            except Exception:
                self.log.failure("The presence observer failed on {tag} {app} {name}", tag=tag, app=app, name=name)

    def _announce(self, app_id: str, change: PresenceChange) -> None:
        if change.version is not None:
            self._node.observe_version(change.version)
        if self._target is not None:
            self._target.deliver(app_id, change)

    async def _run(self, script: Any, *args: Any) -> Any:
        try:
            return await self._client.run(script, (), args)
        except RedisUnavailable as e:
            raise BackendUnavailable(f"presence is shared through Redis, which is unreachable: {e}") from None

    async def _add_member(
        self, app_id: str, channel: str, peer_id: str, conn_id: str, metadata: dict | None, snapshot: bool
    ) -> Joining:
        local = self._connections.get(conn_id)
        new = local is not None and channel not in local.channels
        if local is not None:
            local.channels.add(channel)
            local.metadata = _json(metadata)
        try:
            first, version, flat, transitions = await self._run(
                redisscripts.JOIN,
                app_id,
                channel,
                peer_id,
                conn_id,
                _json(metadata),
                self._node.prefix(),
                b"1" if snapshot else b"0",
            )
        except BackendUnavailable:
            if new and local is not None:
                local.channels.discard(channel)  # the hub refuses the subscribe
            raise
        if first:
            joined = (presence_entry(peer_id, metadata),)
            self._announce(app_id, PresenceChange(channel, joined, (), conn_id, version))
        else:
            self._node.observe_version(version)
        self.report(transitions)
        return Joining(bool(first), _members(flat) if snapshot else None, version)

    def add_member(
        self, app_id: str, channel: str, peer_id: str, conn_id: str, metadata: dict | None, *, snapshot: bool
    ) -> Deferred[Joining]:
        return Deferred.fromCoroutine(self._add_member(app_id, channel, peer_id, conn_id, metadata, snapshot))

    def _announce_lefts(self, app_id: str, peer_id: str, flat: list[bytes]) -> Member | None:
        gone = None
        for i in range(0, len(flat), 3):
            channel, version, metadata = flat[i].decode(), int(flat[i + 1]), json.loads(flat[i + 2])
            left = (presence_entry(peer_id, metadata),)
            self._announce(app_id, PresenceChange(channel, (), left, None, version))
            gone = Member(peer_id, metadata)
        return gone

    async def _remove_member(self, app_id: str, channel: str, peer_id: str, conn_id: str) -> Member | None:
        local = self._connections.get(conn_id)
        if local is not None:
            local.channels.discard(channel)
        try:
            flat, transitions = await self._client.run(
                redisscripts.LEAVE, (), (app_id, channel, peer_id, conn_id, self._node.prefix())
            )
        except RedisUnavailable:
            # Done here; Redis forgets the membership when it is back (resync)
            # and the others hear the left then (the hub's reconcile).
            return None
        gone = self._announce_lefts(app_id, peer_id, flat)
        self.report(transitions)
        return gone

    def remove_member(self, app_id: str, channel: str, peer_id: str, conn_id: str) -> Deferred[Member | None]:
        return Deferred.fromCoroutine(self._remove_member(app_id, channel, peer_id, conn_id))

    async def _snapshot(self, app_id: str, channel: str) -> Joining:
        version, flat = await self._run(redisscripts.SNAPSHOT, app_id, channel)
        return Joining(False, _members(flat), version)

    def snapshot(self, app_id: str, channel: str) -> Deferred[Joining]:
        return Deferred.fromCoroutine(self._snapshot(app_id, channel))

    async def _members_of(self, app_id: str, channel: str) -> list[Member]:
        try:
            flat = await self._client.execute("HGETALL", f"mrt:{app_id}:m:{channel}")
        except RedisUnavailable as e:
            raise BackendUnavailable(f"presence is shared through Redis, which is unreachable: {e}") from None
        return list(_members(flat))

    def members(self, app_id: str, channel: str) -> Deferred[list[Member]]:
        return Deferred.fromCoroutine(self._members_of(app_id, channel))

    async def _add_connection(self, app_id: str, peer_id: str, conn_id: str) -> None:
        self._connections[conn_id] = _Connection(app_id, peer_id)
        try:
            transitions = await self._client.run(
                redisscripts.CONNECT, (), (app_id, peer_id, conn_id, self._node.node_id)
            )
        except RedisUnavailable:
            # The connection works locally; the registry learns of it when
            # Redis is back (resync).
            return
        self.report(transitions)

    def add_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._add_connection(app_id, peer_id, conn_id))

    async def _remove_connection(self, app_id: str, peer_id: str, conn_id: str) -> None:
        self._connections.pop(conn_id, None)
        try:
            flat, transitions = await self._client.run(
                redisscripts.DISCONNECT, (), (app_id, peer_id, conn_id, self._node.node_id, self._node.prefix())
            )
        except RedisUnavailable:
            # Resync drops it from Redis, announcing its lefts, when Redis
            # is back.
            return
        self._announce_lefts(app_id, peer_id, flat)
        self.report(transitions)

    def remove_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._remove_connection(app_id, peer_id, conn_id))

    async def _connections_of(self, app_id: str, peer_id: str) -> frozenset[str]:
        try:
            registry = await self._client.execute("HKEYS", f"mrt:{app_id}:r:{peer_id}")
        except RedisUnavailable as e:
            raise BackendUnavailable(f"the peer registry is in Redis, which is unreachable: {e}") from None
        return frozenset(conn.decode() for conn in registry)

    def connections_of(self, app_id: str, peer_id: str) -> Deferred[frozenset[str]]:
        return Deferred.fromCoroutine(self._connections_of(app_id, peer_id))

    def resync(self) -> Deferred[None]:
        """
        Make Redis hold exactly this node's live connections and their
        memberships, after an outage or a fence: what is gone leaves (with
        C{left}), what is missing joins (with C{joined}), for every node.
        """
        return Deferred.fromCoroutine(self._resync())

    async def _resync(self) -> None:
        args: list[Any] = [self._node.node_id, self._node.prefix(EVERYONE), self._node.version_floor]
        for conn_id, local in self._connections.items():
            args.extend((conn_id, local.app_id, local.peer_id, local.metadata, len(local.channels)))
            args.extend(sorted(local.channels))
        try:
            count, transitions = await self._client.run(redisscripts.RESYNC, (), args)
        except Exception:
            self.log.failure("Resynchronizing presence with Redis failed; retrying at the next lease renewal")
            raise
        self.report(transitions)
        self.log.info("Presence resynchronized with Redis: {count} live connections", count=count)
