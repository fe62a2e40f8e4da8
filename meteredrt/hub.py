"""
The messaging service: channels, wildcard routing, presence and directs.

L{Hub} is a Twisted service that knows nothing about WebSockets. An adapter
(L{meteredrt.ws}) authenticates a connection, calls L{Hub.connect} with an
L{IConnectionSink} for it, then hands every parsed client frame to
L{Hub.handle}; the hub answers through the sink with acks, errors and
deliveries. Routing goes through an L{IBroker}, membership through an
L{IPresence}, counting through an L{IMeter}: on one node all three answer at
once, which keeps everything one sender causes in its original order.

The hub also implements L{IDeliveryTarget}: the broker hands it envelopes
(L{meteredrt.envelopes}) to turn into frames for local connections, each
frame serialized once per variant and shared by every receiver.

What the hub does is counted in a L{Metrics} (deliveries per envelope, not
per receiver; error frames by code; messages refused for quota), and
L{Hub.connections_by_app} answers the scrape's connections gauge.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Sequence
from typing import Any, TypeVar, cast

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, ensureDeferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meteredrt.apps import App
from meteredrt.auth import Grant, Refusal
from meteredrt.envelopes import ChannelMessage, DirectMessage, Disconnect, PresenceChange
from meteredrt.globs import WildcardIndex
from meteredrt.interfaces import BackendUnavailable, IBroker, IConnectionSink, IDeliveryTarget, IMeter, IPresence
from meteredrt.membership import Joining, Member
from meteredrt.metrics import DELIVERY_KINDS, Metrics
from meteredrt.presenceview import ChannelView
from meteredrt.protocol import (
    MAX_SUBSCRIPTIONS,
    CloseCode,
    ErrorCode,
    FrameError,
    OutboundFrame,
    Ping,
    Publish,
    Send,
    Subscribe,
    Unsubscribe,
    ack_frame,
    direct_frame,
    error_frame,
    message_frame,
    presence_entry,
    presence_frame,
    snapshot_frames,
)


@define(eq=False)
class Subscription:
    """
    One subscription of one connection.

    @ivar held_presence: presence deltas that arrived while this concrete
        subscription's snapshot was being assembled; they are sent right
        after it, so nobody sees a delta before the snapshot (§10.2).
    @ivar presence_version: the membership version the snapshot showed:
        deltas at or below it are already in the snapshot and are dropped
        (in a cluster they may arrive after it).
    """

    include_sender_metadata: bool
    wildcard: bool
    held_presence: list[tuple[int | None, OutboundFrame]] | None = None
    presence_version: int | None = None


@define(eq=False)
class Session:
    """
    The hub's view of one authenticated connection.
    """

    conn_id: str
    sink: IConnectionSink
    grant: Grant
    subscriptions: dict[str, Subscription] = field(factory=dict)
    closed: bool = False

    @property
    def app_id(self) -> str:
        return self.grant.app_id

    @property
    def peer_id(self) -> str:
        return self.grant.peer_id


_T = TypeVar("_T")


def _start(coro: Coroutine[Any, Any, _T]) -> Deferred[_T]:
    """
    C{ensureDeferred(coro)}, with less work when C{coro} finishes at once.

    On one node the broker, presence and meter answer with fired
    Deferreds, and awaiting a fired Deferred does not suspend, so most
    requests run to the end in their first step. That step is taken here;
    only a coroutine that does suspend is handed to Twisted, which resumes
    it exactly as C{ensureDeferred} would have. (The first step runs in the
    caller's C{contextvars} context rather than a copy; nothing here uses
    context variables.)
    """
    try:
        awaited = coro.send(None)
    except StopIteration as done:
        return succeed(done.value)
    except BaseException:
        return fail()
    return Deferred.fromCoroutine(_resume(coro, awaited))


def _resume(coro: Coroutine[Any, Any, _T], awaited: Any) -> Generator[Any, Any, _T]:
    """
    Carry on a coroutine suspended on C{awaited}, as C{await} would: what
    the driver (Twisted's C{inlineCallbacks} loop) sends or throws in goes
    to C{coro}, what C{coro} yields goes out to the driver.
    """
    while True:
        try:
            result = yield awaited
        except BaseException as e:
            try:
                awaited = coro.throw(e)
            except StopIteration as done:
                return done.value
        else:
            try:
                awaited = coro.send(result)
            except StopIteration as done:
                return done.value


class _Pending:
    """
    The type of L{_PENDING}.
    """


#: What L{_fired} says of a Deferred that has no value yet.
_PENDING = _Pending()


def _fired(answer: Deferred[_T]) -> _T | _Pending:
    """
    The value C{await answer} would give at once, or L{_PENDING} when it
    would suspend or raise: then the caller awaits C{answer} as usual.

    On one node every seam answers with a fired Deferred; taking its value
    here spares the request a generator and a C{StopIteration} per seam
    (C{Deferred.__await__}), the same reading of C{called}, C{paused} and
    C{result} that it does.
    """
    if answer.called and not answer.paused:
        result = answer.result
        if not isinstance(result, Failure):
            return cast(_T, result)
    return _PENDING


def _peer_not_found(frame: Send) -> FrameError:
    return FrameError(ErrorCode.PEER_NOT_FOUND, f"peer not connected: {frame.to}", frame.request_id)


#: While shared state is unreachable every request that needs it fails: the
#: first failure is logged, then one in this many (each is counted in the
#: metrics), so that an outage under load does not flood the log.
BACKEND_ERROR_LOG_EVERY = 1000

_MESSAGE, _PRESENCE, _DIRECT, _DISCONNECT = (
    DELIVERY_KINDS.index(kind) for kind in ("message", "presence", "direct", "disconnect")
)


def _entry(member: Member) -> dict:
    return presence_entry(member.peer_id, member.metadata)


@implementer(IDeliveryTarget)
class Hub(Service):
    """
    Channels, presence and direct routing for the connections of one node.

    @param apps: looks up the current L{App} of an id; plans change at run
        time, so the hub never caches them.
    @param metrics: where the hub counts deliveries, errors and drops.
    """

    log = Logger()

    def __init__(
        self,
        broker: IBroker,
        presence: IPresence,
        meter: IMeter,
        apps: Callable[[str], App | None],
        node_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._broker = broker
        self._presence = presence
        self._meter = meter
        self._apps = apps
        self._node_id = node_id or os.urandom(6).hex()
        self._conn_ids = itertools.count(1)
        self._sessions: dict[str, Session] = {}
        self._channels: dict[tuple[str, str], dict[str, Session]] = {}
        # The subset of each _channels entry that holds the presence action:
        # the only receivers of presence deltas. A join storm then costs
        # per join the number of watchers, not the number of members.
        self._watchers: dict[tuple[str, str], dict[str, Session]] = {}
        self._patterns: dict[str, WildcardIndex[Session]] = {}
        self._peers: dict[tuple[str, str], dict[str, Session]] = {}
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(hub=self)
        self._deliveries = self.metrics.deliveries
        # (app, channel or pattern, wildcard) -> subscribes waiting for the
        # broker to confirm the node's first watch of it
        self._watches_in_flight: dict[tuple[str, str, bool], list[Deferred[None]]] = {}
        # (app, channel) -> what this node's subscribers were told of its
        # members, for every concrete channel with local subscribers
        self._views: dict[tuple[str, str], ChannelView] = {}
        broker.attach(self)
        presence.attach(self)

    # -- connection lifecycle ------------------------------------------------

    def connect(self, sink_factory: Callable[[str], IConnectionSink], grant: Grant) -> Deferred[Session]:
        """
        Admit an authenticated connection (it counts toward concurrency from here).

        @param sink_factory: called with the new connection id.
        @return: fires with the L{Session}; fails with L{Refusal} (4010,
            4001) when the connection may not stay.
        """
        return ensureDeferred(self._connect(sink_factory, grant))

    async def _connect(self, sink_factory: Callable[[str], IConnectionSink], grant: Grant) -> Session:
        app = self._apps(grant.app_id)
        if app is None:
            raise Refusal(CloseCode.INVALID_TOKEN, "key not found")
        if not await self._meter.admit_connection(app):
            raise Refusal(CloseCode.OVER_CONCURRENT_LIMIT, "over_concurrent_limit")
        conn_id = f"{self._node_id}:{next(self._conn_ids)}"
        session = Session(conn_id, sink_factory(conn_id), grant)
        self._sessions[conn_id] = session
        peer_key = (grant.app_id, grant.peer_id)
        local = self._peers.setdefault(peer_key, {})
        local[conn_id] = session
        try:
            await self._presence.add_connection(grant.app_id, grant.peer_id, conn_id)
            # A disconnect while we waited has undone all of the above (the
            # session was indexed before the wait), so only stop here.
            if len(local) == 1 and not session.closed:
                await self._broker.watch_peer(grant.app_id, grant.peer_id)
        except BaseException:
            # The connection is counted and indexed, but the caller gets no
            # session to disconnect: release it here.
            await self._disconnect(session)
            raise
        return session

    def disconnect(self, session: Session) -> Deferred[None]:
        """
        Forget a closed connection: its memberships end (with C{left}
        deltas), its count is released. Safe to call twice.
        """
        return ensureDeferred(self._disconnect(session))

    # A disconnect does not wait for the connection's request in flight (at
    # most one: the adapter hands over a frame once the previous one is
    # done). It undoes at once everything the hub's indexes show, and ends
    # every membership of the connection in one presence call. A membership
    # whose add_member is still on its way is among them: the presence
    # carries out a connection's calls in the order they were made (one
    # ordered connection to Redis), so the add happened first and the
    # disconnect takes it back, announcing what it changed. A request that
    # resumes after the disconnect sees C{session.closed} and stops. Waiting
    # for the request instead would hold the connection's release behind a
    # slow broker.

    async def _disconnect(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        del self._sessions[session.conn_id]
        self._meter.release_connection(session.app_id)
        unwatches = [self._unwatch(session, channel) for channel in list(session.subscriptions)]
        peer_key = (session.app_id, session.peer_id)
        local = self._peers[peer_key]
        del local[session.conn_id]
        try:
            await self._presence.remove_connection(session.app_id, session.peer_id, session.conn_id)
        finally:
            for unwatch in unwatches:
                await unwatch
            if not local:
                del self._peers[peer_key]
                await self._broker.unwatch_peer(session.app_id, session.peer_id)

    @property
    def connection_count(self) -> int:
        """
        How many connections this node holds.
        """
        return len(self._sessions)

    def sessions(self) -> Iterable[Session]:
        """
        The live sessions of this node.
        """
        return list(self._sessions.values())

    def connections_by_app(self) -> dict[str, int]:
        """
        How many connections this node holds per app id; for the metrics
        scrape, not the hot path (it walks every session).
        """
        return dict(Counter(session.grant.app_id for session in self._sessions.values()))

    # -- client requests -----------------------------------------------------

    def handle(self, session: Session, frame: object) -> Deferred[None]:
        """
        Carry out one parsed client frame, answering through the session's
        sink. Never fails: refusals become C{error} frames.

        The adapter waits for the returned Deferred before handing over the
        connection's next frame, which keeps each sender's requests in order
        even when the broker has to wait on the network.
        """
        if isinstance(frame, Send):
            return self._handle_send(session, frame)
        return _start(self._handle(session, frame))

    def _handle_send(self, session: Session, frame: Send) -> Deferred[None]:
        """
        L{handle} for a send, without a coroutine while the seams answer at
        once (one node: the meter and the broker always do). The first
        seam that has to wait hands the rest to a coroutine (L{_finish}),
        which answers failures the same way.
        """
        try:
            rest = self._send_now(session, frame)
        except Exception as e:
            self._failed(session, frame, e)
            return succeed(None)
        except BaseException:
            return fail()
        if rest is None:
            return succeed(None)
        return _start(self._finish(session, frame, rest))

    async def _finish(self, session: Session, frame: object, rest: Awaitable[None]) -> None:
        try:
            await rest
        except Exception as e:
            self._failed(session, frame, e)

    async def _handle(self, session: Session, frame: object) -> None:
        try:
            if isinstance(frame, Publish):
                await self._publish(session, frame)
            elif isinstance(frame, Subscribe):
                await self._subscribe(session, frame)
            elif isinstance(frame, Unsubscribe):
                await self._unsubscribe(session, frame)
            elif isinstance(frame, Ping):
                raise AssertionError("pings are answered by the adapter")
        except Exception as e:
            self._failed(session, frame, e)

    def _failed(self, session: Session, frame: object, error: Exception) -> None:
        """
        Answer a request that raised C{error}: a refusal's error frame, or a
        backend or internal error (logged). Called in the C{except} block.
        """
        request_id = getattr(frame, "request_id", None)
        if isinstance(error, FrameError):
            if not session.closed:
                self.metrics.errors[error.code] += 1
                session.sink.send_frame(error_frame(error.code, error.message, error.request_id))
        elif isinstance(error, BackendUnavailable):
            self.metrics.errors[ErrorCode.BACKEND_ERROR] += 1
            count = self.metrics.errors[ErrorCode.BACKEND_ERROR]
            if count == 1 or count % BACKEND_ERROR_LOG_EVERY == 0:
                self.log.warn(
                    "{frame!r} from {conn} failed: {why} ({count} backend errors since start)",
                    frame=frame,
                    conn=session.conn_id,
                    why=str(error),
                    count=count,
                )
            if not session.closed:
                session.sink.send_frame(error_frame(ErrorCode.BACKEND_ERROR, str(error), request_id))
        else:
            self.log.failure("Failed to handle {frame!r} from {conn}", frame=frame, conn=session.conn_id)
            if not session.closed:
                self.metrics.errors[ErrorCode.INTERNAL_ERROR] += 1
                session.sink.send_frame(
                    error_frame(ErrorCode.INTERNAL_ERROR, "internal error, retry with backoff", request_id)
                )

    def _require(self, session: Session, action: str, request_id: str | None) -> None:
        if not session.grant.may(action):
            raise FrameError(ErrorCode.ACTION_NOT_PERMITTED, f"the {action} action is not granted", request_id)

    def _ack(self, session: Session, request_id: str | None) -> None:
        if request_id is not None and not session.closed:
            session.sink.send_frame(ack_frame(request_id))

    async def _count(self, app_id: str, request_id: str | None) -> None:
        app = self._apps(app_id)
        if app is not None:
            counted = self._meter.count_message(app)
            answer = _fired(counted)
            if await counted if isinstance(answer, _Pending) else answer:
                return
        self.metrics.drops["message_quota"] += 1
        raise FrameError(ErrorCode.OVER_MESSAGE_QUOTA, "message quota exhausted", request_id)

    # A publish or send whose connection closes while it waits carries on:
    # it is delivered like one sent just before the close and leaves nothing
    # behind; only its ack is dropped (L{_ack}).

    async def _publish(self, session: Session, frame: Publish) -> None:
        self._require(session, "publish", frame.request_id)
        if not session.grant.allows_channel(frame.channel):
            raise FrameError(
                ErrorCode.CHANNEL_NOT_AUTHORIZED, f"channel not authorized: {frame.channel}", frame.request_id
            )
        await self._count(session.app_id, frame.request_id)
        envelope = ChannelMessage(
            frame.channel, session.peer_id, frame.data, session.grant.peer_metadata, session.conn_id
        )
        routed = self._broker.publish(session.app_id, frame.channel, envelope)
        fired = _fired(routed)
        if isinstance(fired, _Pending):
            await routed
        self._ack(session, frame.request_id)

    def _send_now(self, session: Session, frame: Send) -> Awaitable[None] | None:
        """
        Carry out a send as far as the seams have answered: C{None} when it
        is done, else what finishes it once the waiting seam answers.
        """
        # Finding the target and routing to it are one broker call (one
        # round trip in a cluster). An authorized send that finds nobody
        # still counts as a message, so the count comes first; an absent
        # peer is answered peer_not_found rather than over_message_quota,
        # which only the refused path has to look up on its own.
        self._require(session, "send", frame.request_id)
        app = self._apps(session.app_id)
        if app is None:
            return self._send_refused(session, frame)
        counted = self._meter.count_message(app)
        allowed = _fired(counted)
        if isinstance(allowed, _Pending):
            return self._send_counted(session, frame, counted)
        if not allowed:
            return self._send_refused(session, frame)
        return self._route_send(session, frame)

    async def _send_counted(self, session: Session, frame: Send, counted: Deferred[bool]) -> None:
        if not await counted:
            await self._send_refused(session, frame)
        rest = self._route_send(session, frame)
        if rest is not None:
            await rest

    async def _send_refused(self, session: Session, frame: Send) -> None:
        targets = await self._presence.connections_of(session.app_id, frame.to)
        if not targets - {session.conn_id}:
            raise _peer_not_found(frame)
        raise FrameError(ErrorCode.OVER_MESSAGE_QUOTA, "message quota exhausted", frame.request_id)

    def _route_send(self, session: Session, frame: Send) -> Awaitable[None] | None:
        envelope = DirectMessage(
            frame.to, session.peer_id, frame.data, session.grant.peer_metadata, session.conn_id
        )
        routed = self._broker.direct(session.app_id, frame.to, envelope)
        delivered = _fired(routed)
        if isinstance(delivered, _Pending):
            return self._send_routed(session, frame, routed)
        self._sent(session, frame, delivered)
        return None

    async def _send_routed(self, session: Session, frame: Send, routed: Deferred[int]) -> None:
        self._sent(session, frame, await routed)

    def _sent(self, session: Session, frame: Send, delivered: int) -> None:
        if not delivered:
            raise _peer_not_found(frame)
        self._ack(session, frame.request_id)

    async def _subscribe(self, session: Session, frame: Subscribe) -> None:
        self._require(session, "subscribe", frame.request_id)
        channel = frame.channel
        allowed = (
            session.grant.allows_pattern(channel) if frame.wildcard else session.grant.allows_channel(channel)
        )
        if not allowed:
            raise FrameError(ErrorCode.CHANNEL_NOT_AUTHORIZED, f"channel not authorized: {channel}", frame.request_id)
        existing = session.subscriptions.get(channel)
        if existing is None and len(session.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise FrameError(
                ErrorCode.CHANNEL_LIMIT_EXCEEDED,
                f"a connection holds at most {MAX_SUBSCRIPTIONS} subscriptions",
                frame.request_id,
            )
        if existing is not None:
            # Last subscribe wins for the flag (§7.1 step 5).
            existing.include_sender_metadata = frame.include_sender_metadata
            subscription = existing
        else:
            subscription = Subscription(frame.include_sender_metadata, frame.wildcard)
            session.subscriptions[channel] = subscription
            await self._watch(session, channel, frame.wildcard)
            if session.closed:
                # The disconnect dropped this subscription, watch included.
                return

        if frame.wildcard:
            self._ack(session, frame.request_id)
            return

        wants_presence = session.grant.may("presence")
        if wants_presence:
            subscription.held_presence = []
        try:
            # The presence announces the joined itself, in the same step
            # that takes the snapshot (IPresence). Only a subscriber holding
            # presence is shown the members: the others' joins do not read
            # them, which keeps a join's cost apart from the channel's size.
            try:
                joining = await self._presence.add_member(
                    session.app_id,
                    channel,
                    session.peer_id,
                    session.conn_id,
                    session.grant.peer_metadata,
                    snapshot=wants_presence,
                )
            except BackendUnavailable:
                # Refused: a new subscription does not stay half made.
                if existing is None and not session.closed and channel in session.subscriptions:
                    await self._unwatch(session, channel)
                raise
            if session.closed:
                # The disconnect ended this membership too (see _disconnect).
                return
            subscription.presence_version = joining.version
            if joining.version is not None:
                # The others hear now of what the snapshot shows that they
                # were not told yet (a delta still on its way, which then
                # arrives stale).
                self._catch_up(session.app_id, channel, joining, session.conn_id)
            # Ack, then the snapshot: MeteredPeer drops a snapshot that
            # arrives before the subscribe resolves (§7.1).
            self._ack(session, frame.request_id)
            if wants_presence and joining.members is not None:
                entries = [_entry(m) for m in joining.members if m.peer_id != session.peer_id]
                for snapshot in snapshot_frames(channel, entries):
                    session.sink.send_frame(snapshot)
        finally:
            held, subscription.held_presence = subscription.held_presence, None
            if held and not session.closed:
                seen = subscription.presence_version
                for version, delta in held:
                    if seen is None or version is None or version > seen:
                        session.sink.send_frame(delta)

    async def _watch(self, session: Session, channel: str, wildcard: bool) -> None:
        app_id = session.app_id
        if wildcard:
            index = self._patterns.setdefault(app_id, WildcardIndex())
            index.add(channel, session)
            first = index.subscriber_count(channel) == 1
        else:
            local = self._channels.setdefault((app_id, channel), {})
            local[session.conn_id] = session
            # Presence deltas go only to the subscribers that may see them.
            if session.grant.may("presence"):
                self._watchers.setdefault((app_id, channel), {})[session.conn_id] = session
            first = len(local) == 1
            if first:
                self._views[(app_id, channel)] = ChannelView()
        key = (app_id, channel, wildcard)
        if not first:
            # Another subscriber's watch may still be on its way: until the
            # broker routes the channel here, this one would miss what is
            # published after its ack (or a delta after its snapshot).
            waiters = self._watches_in_flight.get(key)
            if waiters is not None:
                waiting: Deferred[None] = Deferred()
                waiters.append(waiting)
                await waiting
            return
        watched = (self._broker.watch_pattern if wildcard else self._broker.watch_channel)(app_id, channel)
        if watched.called:
            await watched
            return
        waiters = self._watches_in_flight[key] = []
        try:
            await watched
        finally:
            if self._watches_in_flight.get(key) is waiters:
                del self._watches_in_flight[key]
            for waiting in waiters:
                waiting.callback(None)

    async def _unsubscribe(self, session: Session, frame: Unsubscribe) -> None:
        if frame.channel in session.subscriptions:
            await self._drop_subscription(session, frame.channel)
        self._ack(session, frame.request_id)

    async def _drop_subscription(self, session: Session, channel: str) -> None:
        wildcard = session.subscriptions[channel].wildcard
        unwatched = self._unwatch(session, channel)
        if not wildcard:
            # The presence announces the left itself.
            await self._presence.remove_member(session.app_id, channel, session.peer_id, session.conn_id)
        await unwatched

    def _unwatch(self, session: Session, channel: str) -> Deferred[None]:
        """
        Take one subscription out of this node's indexes at once, and tell
        the broker if it was the node's last on that channel or pattern.
        """
        subscription = session.subscriptions.pop(channel)
        app_id = session.app_id
        if subscription.wildcard:
            index = self._patterns[app_id]
            index.remove(channel, session)
            gone = index.subscriber_count(channel) == 0
            if not len(index):
                del self._patterns[app_id]
            return self._broker.unwatch_pattern(app_id, channel) if gone else succeed(None)
        local = self._channels[(app_id, channel)]
        del local[session.conn_id]
        watchers = self._watchers.get((app_id, channel))
        if watchers is not None and watchers.pop(session.conn_id, None) is not None and not watchers:
            del self._watchers[(app_id, channel)]
        if local:
            return succeed(None)
        del self._channels[(app_id, channel)]
        del self._views[(app_id, channel)]
        return self._broker.unwatch_channel(app_id, channel)

    # -- backend (REST) operations -------------------------------------------

    def publish_from_backend(
        self, app: App, channel: str, data: Any, sender: str, sender_metadata: dict | None
    ) -> Deferred[int | None]:
        """
        Publish on behalf of a backend (§19.4): counted like any publish,
        delivered like one, with no publishing connection to exclude.

        @return: fires with the number of connections it was delivered to,
            C{None} if the broker cannot tell; fails with L{FrameError}
            C{over_message_quota}.
        """
        return ensureDeferred(self._publish_from_backend(app, channel, data, sender, sender_metadata))

    async def _publish_from_backend(
        self, app: App, channel: str, data: Any, sender: str, sender_metadata: dict | None
    ) -> int | None:
        await self._count(app.app_id, None)
        envelope = ChannelMessage(channel, sender, data, sender_metadata, None)
        return await self._broker.publish(app.app_id, channel, envelope)

    def members(self, app_id: str, channel: str) -> Deferred[list[Member]]:
        """
        The members of a concrete channel, one per peerId (§19.3).
        """
        return self._presence.members(app_id, channel)

    def kick(self, app_id: str, peer_id: str, code: int = CloseCode.ADMIN_DISCONNECT) -> Deferred[int]:
        """
        Close every connection of a peer in one app (§19.5), on every node.

        @return: fires with how many connections were closed; fails with
            L{BackendUnavailable} when other nodes cannot be reached.
        """
        return self._broker.direct(app_id, peer_id, Disconnect(peer_id, code, "admin_disconnect"))

    def close_app(self, app_id: str, code: int, reason: str) -> int:
        """
        Close every connection of one app that this node holds, with this
        code and reason. Each session leaves the hub (and its channels, with
        C{left} deltas) when its adapter reports the close, as for any other
        server-side close.

        Local only: unlike L{kick}, this does not go through the broker. A
        cluster broker will need to fan it out to the other nodes, as
        L{kick} does with a L{Disconnect} envelope, unless every node
        observes the key store itself.

        @return: how many connections were closed.
        """
        sessions = [session for session in self._sessions.values() if session.app_id == app_id]
        for session in sessions:
            session.sink.close(code, reason)
        return len(sessions)

    def close_suspended(self, app_ids: Iterable[str]) -> int:
        """
        Close with 4012 (§13) the local connections of those of these apps
        that are suspended now; the others are left alone.

        The key store's observer of changed apps
        (L{meteredrt.store.keystore.KeyStore.on_apps_changed}), so that a
        suspension reaches live connections within one re-read; new
        connections are refused at authentication.

        @return: how many connections were closed.
        """
        closed = 0
        for app_id in sorted(app_ids):
            app = self._apps(app_id)
            if app is None or not app.suspended:
                continue
            count = self.close_app(app_id, CloseCode.ACCOUNT_SUSPENDED, "account_suspended")
            self.log.info("App {app_id} is suspended: closed {count} connections", app_id=app_id, count=count)
            closed += count
        return closed

    def close_revoked(self, key_ids: Iterable[str]) -> int:
        """
        Close with 4001 (§5.3) the local connections authenticated with
        these keys: publishable-key sessions of the key itself and JWT
        sessions whose token that secret key signed.

        The key store's observer of revoked keys
        (L{meteredrt.store.keystore.KeyStore.on_keys_revoked}), so that a
        revocation reaches live connections within one re-read; new
        connections are refused at authentication.

        @return: how many connections were closed.
        """
        revoked = frozenset(key_ids)
        sessions = [session for session in self._sessions.values() if session.grant.key_id in revoked]
        for session in sessions:
            session.sink.close(CloseCode.INVALID_TOKEN, "key_revoked")
        if sessions:
            self.log.info(
                "Keys {key_ids} are revoked: closed {count} connections",
                key_ids=", ".join(sorted(revoked)),
                count=len(sessions),
            )
        return len(sessions)

    # -- IDeliveryTarget -----------------------------------------------------

    def deliver(self, app_id: str, envelope: object) -> int:
        """
        Turn one routed envelope into frames for the local connections it
        concerns.

        @return: how many local connections received it.
        """
        if isinstance(envelope, ChannelMessage):
            count = self._deliver_message(app_id, envelope)
            self._deliveries[_MESSAGE] += count
        elif isinstance(envelope, PresenceChange):
            count = self._deliver_presence(app_id, envelope)
            self._deliveries[_PRESENCE] += count
        elif isinstance(envelope, DirectMessage):
            count = self._deliver_direct(app_id, envelope)
            self._deliveries[_DIRECT] += count
        elif isinstance(envelope, Disconnect):
            count = self._deliver_disconnect(app_id, envelope)
            self._deliveries[_DISCONNECT] += count
        else:
            raise TypeError(f"unknown envelope {envelope!r}")
        return count

    def _deliver_message(self, app_id: str, envelope: ChannelMessage) -> int:
        channel = envelope.channel
        sender_conn = envelope.sender_conn
        local = self._channels.get((app_id, channel), {})
        index = self._patterns.get(app_id)
        # Wildcard subscribers reached, with their matching patterns: a
        # publish that none of the app's patterns match (the common case,
        # however many there are) takes the concrete-only paths below.
        by_pattern = index.subscribers_matching(channel) if index is not None else None
        # receiver -> whether it wants fromMetadata
        wants: Iterable[tuple[Session, bool]]
        if not by_pattern:
            if not envelope.sender_metadata:
                # The common case: concrete subscribers are distinct
                # connections and all get the same frame.
                everyone = [session for conn_id, session in local.items() if conn_id != sender_conn]
                return self._send_message(envelope, everyone, ())
            wants = (
                (session, session.subscriptions[channel].include_sender_metadata)
                for conn_id, session in local.items()
                if conn_id != sender_conn
            )
        else:
            # The dict keeps one delivery per connection however many
            # subscriptions match.
            merged: dict[Session, bool] = {
                session: session.subscriptions[channel].include_sender_metadata
                for conn_id, session in local.items()
                if conn_id != sender_conn
            }
            for session, patterns in by_pattern.items():
                if session.conn_id != sender_conn:
                    flag = any(session.subscriptions[p].include_sender_metadata for p in patterns)
                    merged[session] = merged.get(session, False) or flag
            wants = merged.items()
        plain: list[Session] = []
        rich: list[Session] = []
        for session, wants_metadata in wants:
            (rich if wants_metadata and envelope.sender_metadata else plain).append(session)
        return self._send_message(envelope, plain, rich)

    def _send_message(
        self, envelope: ChannelMessage, plain: Sequence[Session], rich: Sequence[Session]
    ) -> int:
        """
        Send a message without C{fromMetadata} to C{plain} and with it to
        C{rich}: each variant is serialized once, if anyone gets it, and the
        same frame object goes to every one of its receivers.
        """
        for receivers, metadata in ((plain, None), (rich, envelope.sender_metadata)):
            if receivers:
                frame = message_frame(envelope.channel, envelope.sender, envelope.data, metadata)
                for session in receivers:
                    session.sink.send_frame(frame)
        return len(plain) + len(rich)

    def _catch_up(self, app_id: str, channel: str, snapshot: Joining, exclude_conn: str | None) -> None:
        view = self._views.get((app_id, channel))
        # A join without a snapshot (its subscriber does not hold presence)
        # has nothing to catch up with: the deltas it would have
        # anticipated still arrive, each in its turn.
        if view is None or snapshot.version is None or snapshot.members is None:
            return
        joined, left = view.catch_up(snapshot.members, snapshot.version)
        if joined or left:
            change = PresenceChange(channel, joined, left, exclude_conn, snapshot.version)
            self._deliver_presence(app_id, change, through_view=False)

    def _caught_up(self, snapshot: Joining, app_id: str, channel: str) -> None:
        self._catch_up(app_id, channel, snapshot, None)

    def reconcile_presence(self) -> Deferred[None]:
        """
        Read the membership of every channel with local subscribers again
        and tell them what they missed: after an outage, deltas may have
        been lost, or Redis may have come back empty and been refilled.
        """
        return ensureDeferred(self._reconcile_presence())

    async def _reconcile_presence(self) -> None:
        # All reads at once (pipelined), each applied as it answers.
        reads = []
        for app_id, channel in list(self._views):
            read = self._presence.snapshot(app_id, channel)
            reads.append(read.addCallback(self._caught_up, app_id, channel))
        try:
            await gatherResults(reads, consumeErrors=True)
        except FirstError as e:
            self.log.warn("Presence not fully reconciled: {why}", why=str(e.subFailure.value))

    def _deliver_presence(self, app_id: str, envelope: PresenceChange, through_view: bool = True) -> int:
        if through_view and envelope.version is not None:
            view = self._views.get((app_id, envelope.channel))
            if view is not None:
                accepted = view.accept(envelope)
                if accepted is None:
                    return 0
                envelope = accepted
        frame: OutboundFrame | None = None
        count = 0
        for conn_id, session in self._watchers.get((app_id, envelope.channel), {}).items():
            if conn_id == envelope.exclude_conn:
                continue
            subscription = session.subscriptions[envelope.channel]
            version = envelope.version
            seen = subscription.presence_version
            if version is not None and seen is not None and version <= seen:
                continue  # already in this subscriber's snapshot
            if frame is None:
                frame = presence_frame(envelope.channel, envelope.joined, envelope.left)
            held = subscription.held_presence
            if held is not None:
                held.append((version, frame))
            else:
                session.sink.send_frame(frame)
            count += 1
        return count

    def _deliver_direct(self, app_id: str, envelope: DirectMessage) -> int:
        frame: OutboundFrame | None = None
        count = 0
        for conn_id, session in self._peers.get((app_id, envelope.to), {}).items():
            if conn_id == envelope.sender_conn:
                continue
            if frame is None:
                frame = direct_frame(envelope.sender, envelope.data, envelope.sender_metadata)
            session.sink.send_frame(frame)
            count += 1
        return count

    def _deliver_disconnect(self, app_id: str, envelope: Disconnect) -> int:
        sessions = list(self._peers.get((app_id, envelope.peer_id), {}).values())
        for session in sessions:
            session.sink.close(envelope.code, envelope.reason)
        return len(sessions)
