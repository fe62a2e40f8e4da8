"""
The WebSocket adapter: Autobahn frames in, hub calls out, frames back.

L{RealtimeServerFactory} holds the node-wide settings and the set of live
connections (for draining); L{RealtimeServerProtocol} is one connection. The
protocol authenticates after the upgrade (so refusals are close codes the
client can read, §5.3), sends the welcome, then feeds each parsed frame to
the hub one at a time. It is also the hub's L{IConnectionSink}: frames the
hub hands it are framed once (L{OutboundFrame.wire}) and written, and a
reader too slow to take them is cut off instead of growing memory.

Frames in and out are counted by type in the node's L{Metrics} (lists
indexed by kind) and in total per connection; when a connection ends it
writes one log line for the operator: app, peer, connection id, remote
address, duration, close code and reason, frames in and out. Never the
token.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.logger import Logger
from zope.interface import implementer

from meteredrt.apps import DEFAULT_MESSAGE_BURST, DEFAULT_MESSAGE_RATE, App, message_limits
from meteredrt.auth import Grant, Refusal, authenticate
from meteredrt.clientaddress import TrustedProxies, client_address
from meteredrt.expiry import ExpiryTimers
from meteredrt.hub import Hub, Session
from meteredrt.interfaces import IConnectionSink, IKeyStore, ITurnProvider, StoreUnavailable
from meteredrt.metrics import Metrics
from meteredrt.protocol import (
    INBOUND_FRAME_LIMIT,
    INVALID,
    OUTBOUND_TYPES,
    PONG,
    CloseCode,
    FrameError,
    OutboundFrame,
    Ping,
    error_frame,
    going_away_frame,
    parse_frame,
    welcome_frame,
)
from meteredrt.ratelimit import TokenBucket
from meteredrt.speedups import debug_skippable, speedups_installed
from meteredrt.turn import credential_lifetime
from meteredrt.turnwrite import HELD_LIMIT, TurnWriter, idle_tcp, send_held

#: §4.5: JWT connections close this long before C{exp}.
EXPIRY_LEAD_SECONDS = 0.25
#: A draining node closes each connection 1001 this long after its
#: C{going_away}, so the client reads the retry hint before the close.
GOING_AWAY_CLOSE_DELAY = 0.25
#: Frames that may wait for the welcome or a slow request before the
#: connection is considered abusive.
MAX_QUEUED_FRAMES = 1000
#: Frame-budget tokens taken from the bucket at a time (see onFrameBegin).
FRAME_CREDIT_BATCH = 64

#: What L{RealtimeServerProtocol} holds instead of a query once authenticated.
_NO_PARAMS: Mapping[str, list[str]] = MappingProxyType({})
#: Attributes in which Autobahn keeps the upgrade request and response after
#: the handshake, though nothing reads them again.
_HANDSHAKE_LEFTOVERS = (
    "http_request_data",
    "http_response_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_origin",
)

_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
#: RFC 6455 §7.4.1: no status code was present in the close frame.
_NO_STATUS = 1005


#: The first two bytes of a final, unmasked text frame (RFC 6455 §5.2) of
#: each payload length that fits in them.
_SHORT_TEXT_HEADERS = [bytes((0x81, size)) for size in range(126)]


def text_frame(payload: bytes) -> bytes:
    """
    C{payload} as one final, unmasked text frame: the bytes Autobahn's
    C{PreparedMessage} makes for a server (C{payloadHybi}), without an
    object, a list and a join per frame. C{tests/test_ws.py} compares them.
    """
    size = len(payload)
    if size < 126:
        return _SHORT_TEXT_HEADERS[size] + payload
    if size <= 0xFFFF:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


@implementer(IPushProducer)
class _WriteWatch:
    """
    Registered as the transport's producer so that Twisted tells us when
    its write buffer is full; what we write while paused is what a slow
    reader makes us hold in memory.

    It also counts the frames written: every write reads L{paused}
    anyway, so counting here touches no other memory per frame.

    @ivar sent: frames written to this connection.
    @ivar sent_by_kind: the node's frames written by kind
        (L{Metrics.frames_out}), shared by every connection.
    """

    __slots__ = ("paused", "held", "sent", "sent_by_kind")

    def __init__(self) -> None:
        self.paused = False
        self.held = 0
        self.sent = 0
        self.sent_by_kind = [0] * len(OUTBOUND_TYPES)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.held = 0

    def stopProducing(self) -> None:
        self.paused = False


@implementer(IConnectionSink)
class RealtimeServerProtocol(WebSocketServerProtocol):
    """
    One client connection.
    """

    # Not "log": Autobahn's own self.log must keep its txaio logger, which
    # drops debug events (one per frame, and the raw upgrade request with
    # its ?token=) before they are formatted or written.
    _log = Logger()
    factory: RealtimeServerFactory
    # Annotation only: the factory's protocol class carries it, with the
    # other options (_protocol_class).
    logOctets: bool
    conn_id: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._params: Mapping[str, list[str]] = _NO_PARAMS
        self._origin: str | None = None
        self._session: Session | None = None
        # Frames waiting for the welcome or for a slow request; made only
        # when one has to wait (most never do, and an empty deque is 760 B).
        self._queue: deque[Any] | None = None
        # Frames the hub routes here between admission and the welcome
        # (a direct to this peerId); None once the welcome is out.
        self._early: list[OutboundFrame] | None = []
        self._busy = False
        self._closing = False
        self._cut_off = False
        self._gone = False
        # The token's expiry instant while this connection waits for it in
        # the factory's expiry timers.
        self._expires_at: float | None = None
        self._farewell: IDelayedCall | None = None
        self._bucket: TokenBucket | None = None  # set once authenticated
        self._frames: TokenBucket | None = None  # set once the socket is open
        self._frame_credit = 0  # tokens already taken from _frames
        self._watch = _WriteWatch()
        self._grant: Grant | None = None
        self._remote = "-"
        self._upgraded_at = 0.0
        self._opened_at: float | None = None
        self._received = 0
        # Frames written this reactor turn, for the socket at its end
        # (meteredrt.turnwrite), and their size; None when none are held.
        self._held_out: list[bytes] | None = None
        self._held_size = 0

    # -- handshake -------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        # Refusals wait until after the upgrade: browsers cannot read an
        # HTTP status, but they can read a close code (§5.2).
        self._params = request.params
        self._origin = request.headers.get("origin")
        self._upgraded_at = self.factory.clock.seconds()
        peer = None if self.transport is None else getattr(self.transport.getPeer(), "host", None)
        forwarded_for = request.headers.get("x-forwarded-for")
        self._remote = client_address(
            peer or "-", None if forwarded_for is None else [forwarded_for], self.factory.trusted_proxies
        )

    def onOpen(self) -> None:
        # Autobahn types the transport as ITransport; under a WebSocket it is
        # the TCP or TLS transport, which is a consumer too.
        transport = cast("IConsumer | None", self.transport)
        if transport is not None and getattr(transport, "producer", None) is not None:
            # The HTTP channel that served the upgrade is still registered.
            transport.unregisterProducer()
        if transport is not None:
            transport.registerProducer(self._watch, True)
        factory = self.factory
        # The frame budget starts with the socket.
        self._frames = TokenBucket(factory.frame_burst, factory.frame_rate, factory.clock.seconds())
        factory.connections.add(self)
        self._opened_at = factory.clock.seconds()
        self._watch.sent_by_kind = factory.metrics.frames_out
        ensureDeferred(self._admit()).addErrback(self._admission_failed)
        # Authentication has read the query; nothing reads the handshake again.
        self._forget_handshake()

    def _forget_handshake(self) -> None:
        """
        Let go of the upgrade request: Autobahn keeps its text, headers and
        parsed query (the JWT in each) for the connection's lifetime though
        it reads them only during the handshake, about 2 KiB per idle
        connection.
        """
        self._params = _NO_PARAMS
        self._origin = None
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)

    async def _admit(self) -> None:
        factory = self.factory
        try:
            grant = authenticate(
                self._params, self._origin, factory.keys.key, factory.keys.app, factory.clock.seconds()
            )
            self._grant = grant
            # The bucket starts with the socket (this step runs within
            # onOpen): frames held for the welcome draw from it too.
            rate, burst = message_limits(factory.keys.app(grant.app_id))
            now = factory.clock.seconds()
            self._bucket = TokenBucket(burst, rate, now)
            rate_scale = max(1.0, rate / DEFAULT_MESSAGE_RATE)
            burst_scale = max(1.0, burst / DEFAULT_MESSAGE_BURST)
            if rate_scale > 1 or burst_scale > 1:
                # A plan above the default message limits must not meet the
                # frame budget first: the budget grows with it.
                self._frames = TokenBucket(factory.frame_burst * burst_scale, factory.frame_rate * rate_scale, now)
            session = await factory.hub.connect(self._sink_for, grant)
        except Refusal as refusal:
            factory.metrics.handshakes["refused"] += 1
            if refusal.code == CloseCode.OVER_CONCURRENT_LIMIT:
                factory.metrics.drops["connection_quota"] += 1
            self._close(refusal.code, refusal.reason)
            return
        except StoreUnavailable:
            # Transient (closed 1011): the SDK reconnects, and the key may well be
            # valid once the database is back.
            self._close(CloseCode.INTERNAL_ERROR, "store_unavailable")
            return
        if self._gone:
            factory.metrics.handshakes["abandoned"] += 1
            await factory.hub.disconnect(session)
            return
        try:
            metadata = await self._welcome_metadata(grant)
        except BaseException:
            # The hub already counts this connection; onClose cannot release
            # a session it was never given.
            await factory.hub.disconnect(session)
            raise
        if self._gone:
            factory.metrics.handshakes["abandoned"] += 1
            await factory.hub.disconnect(session)
            return
        self._session = session
        factory.metrics.handshakes["welcomed"] += 1
        factory.metrics.handshake_seconds.observe(factory.clock.seconds() - self._upgraded_at)
        self._write(welcome_frame(grant.peer_id, grant.expires_at, int(factory.clock.seconds()), metadata))
        early, self._early = self._early, None
        for frame in early or ():
            self._write(frame)
        if grant.expires_at is not None:
            self._expires_at = grant.expires_at
            factory.expiries.add(grant.expires_at, self)
        self._pump()

    def _sink_for(self, conn_id: str) -> IConnectionSink:
        self.conn_id = conn_id
        return self

    def _admission_failed(self, failure: Any) -> None:
        self.factory.metrics.handshakes["failed"] += 1
        self._log.failure("Handshake failed", failure)
        self._close(CloseCode.INTERNAL_ERROR, "internal_error")

    async def _welcome_metadata(self, grant: Grant) -> dict | None:
        """
        The JWT's C{metadata}, with auto-injected TURN credentials merged in
        when the key asks for them and the token brought none (§20.1).
        """
        metadata = grant.metadata
        turn = self.factory.turn
        app: App | None = self.factory.keys.app(grant.app_id)
        if (
            turn is None
            or app is None
            or app.turn is None
            or not grant.auto_inject_turn
            or (metadata is not None and "iceServers" in metadata)
        ):
            return metadata
        remaining = None if grant.expires_at is None else grant.expires_at - self.factory.clock.seconds()
        servers = await turn.ice_servers(app, credential_lifetime(remaining))
        if not servers:
            return metadata
        return {**(metadata or {}), "iceServers": servers}

    def token_expired(self) -> None:
        self._expires_at = None
        self._close(CloseCode.TOKEN_EXPIRED, "token_expired")

    # -- inbound ---------------------------------------------------------------

    def onFrameBegin(self) -> None:
        """
        Charge every frame's header to the frame budget before Autobahn
        handles it: data, continuation and control frames alike.

        The message bucket only sees complete messages, so a client could
        otherwise send empty continuation frames or pings without end,
        each costing the reactor Autobahn's per-frame work. A client over
        the budget is closed 4011 and what it already sent is dropped
        unparsed: no more frames from it reach Autobahn.

        Tokens are taken from the bucket in batches (L{FRAME_CREDIT_BATCH})
        and counted down here, so the clock is read once per batch rather
        than once per frame; a batch is only what the bucket holds, so the
        budget is exactly the bucket's.
        """
        credit = self._frame_credit - 1
        if credit >= 0:
            self._frame_credit = credit
            super().onFrameBegin()
            return
        frames = self._frames
        if frames is None:  # not open yet: Autobahn reads no frames then
            super().onFrameBegin()
            return
        taken = frames.take_up_to(self.factory.clock.seconds(), FRAME_CREDIT_BATCH)
        if taken:
            self._frame_credit = taken - 1
            super().onFrameBegin()
            return
        # Autobahn's loop stops when no frame is open and no bytes are left.
        self.current_frame = None  # type: ignore[assignment]  # Autobahn's own "no frame"
        self.data = b""
        if not self._closing:
            self._log.info("Closing frame flood from {conn}", conn=self.conn_id)
            self.factory.metrics.drops["frame_rate"] += 1
            self._cut_off = True
            self._close(CloseCode.OVER_MESSAGE_RATE, "over_frame_rate")
            self._stop_reading()

    def _stop_reading(self) -> None:
        """
        Read nothing more: write what is queued (the close frame), then
        drop the connection, or abort it a second later if the peer does
        not read.
        """
        transport = self.transport
        if transport is not None:
            self.flush_held()
            transport.loseConnection()
        if self._farewell is not None and self._farewell.active():
            self._farewell.cancel()
        self._farewell = self.factory.clock.callLater(1.0, self._abort)

    def dataReceived(self, data: bytes) -> None:
        """
        Autobahn's Twisted C{dataReceived}, minus the debug event (built on
        every read: C{hltype} and two C{hlval}s, ~0.6 us) when its logger
        would drop it (L{debug_skippable}: the speedups, which check that
        method's code, are installed).
        """
        if debug_skippable(self.log):
            self._dataReceived(data)
        else:
            super().dataReceived(data)

    def onMessageEnd(self) -> None:
        """
        Autobahn's C{onMessageEnd}, minus the C{message} signal to the
        protocol's listeners when it has none (nothing in meteredrt listens).

        The signal, with no listener, is a fired Deferred and an errback
        closure per message (~5% of a request's CPU) that nothing reads.
        Only with the speedups installed, which checks that Autobahn's
        C{onMessageEnd} is the code this copies; otherwise, or with a
        listener, Autobahn's own runs.
        """
        if self._listeners is not None or not speedups_installed():
            super().onMessageEnd()
            return
        if not self.failedByMe:
            if self.trackedTimings:
                self.trackedTimings.track("onMessage")
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closing:
            return
        if isBinary:
            self._close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
            return
        self._received += 1
        try:
            item: Any = parse_frame(payload)
            self.factory.metrics.frames_in[item.kind] += 1
        except FrameError as error:
            item = error
            self.factory.metrics.frames_in[INVALID] += 1
        # Everything but ping draws from the rate bucket, garbage too.
        if not isinstance(item, Ping):
            bucket = self._bucket
            if bucket is not None and not bucket.take(self.factory.clock.seconds()):
                self.factory.metrics.drops["message_rate"] += 1
                self._close(CloseCode.OVER_MESSAGE_RATE, "over_message_rate")
                return
        queue = self._queue
        session = self._session
        if not queue and not self._busy and session is not None:
            # Nothing waits ahead of it: what _pump would do, without the queue.
            self._process(session, item)
            return
        if queue is None:
            queue = self._queue = deque()
        if len(queue) >= MAX_QUEUED_FRAMES:
            self._close(CloseCode.POLICY_VIOLATION, "too many frames in flight")
            return
        queue.append(item)
        self._pump()

    def _pump(self) -> None:
        """
        Process queued frames in order; stop at the first request whose
        handling has to wait, and carry on when it is done.
        """
        session = self._session
        if session is None:
            return  # held until the welcome is out, then processed in order
        queue = self._queue
        while queue and not self._busy and not self._closing:
            self._process(session, queue.popleft())

    def _process(self, session: Session, item: Any) -> None:
        """
        Answer one parsed frame; mark the connection busy while a request
        waits on a seam.
        """
        if isinstance(item, Ping):
            self.send_frame(PONG)
        elif isinstance(item, FrameError):
            self.factory.metrics.errors[item.code] += 1
            self.send_frame(error_frame(item.code, item.message, item.request_id))
        else:
            done = self.factory.hub.handle(session, item)
            if not done.called:
                self._busy = True
                done.addBoth(self._resume)

    def _resume(self, result: object) -> None:
        self._busy = False
        self._pump()

    # -- IConnectionSink ----------------------------------------------------------

    def send_frame(self, frame: OutboundFrame) -> None:
        if self._early is not None:
            # The welcome must be the first frame (§8.1).
            self._early.append(frame)
            return
        self._write(frame)

    def _write(self, frame: OutboundFrame) -> None:
        # Autobahn's sendMessage() checks the state; our direct sendData()
        # must too. Autobahn answers a client's close, sets CLOSED and drops
        # the TCP before connectionLost reaches onClose, so a broadcast in
        # between would put data frames after the close frame (RFC 6455
        # §5.5.1). After our own close the state is CLOSING.
        if self.state != _STATE_OPEN:
            return
        watch = self._watch
        watch.sent += 1
        watch.sent_by_kind[frame.kind] += 1
        if self._perMessageCompress is None:
            # What sendPreparedMessage() does when nothing is compressed
            # (the factory accepts no compression offer), framed once per
            # frame object however many connections it goes to.
            wire = frame.wire
            if wire is None:
                wire = frame.wire = text_frame(frame.payload)
            self.sendData(wire)
        else:
            self.sendPreparedMessage(self.factory.prepareMessage(frame.payload))

    def _count_held(self, size: int) -> None:
        """
        Count C{size} bytes just written; past the outbound limit while the
        transport is paused, cut the reader off.

        Every write goes through L{sendData}, so messages, pongs, the
        server's own pings and close frames all count: a client that sends
        pings and never reads cannot make the server queue pongs without
        bound.
        """
        watch = self._watch
        if not watch.paused:
            return
        watch.held += size
        if watch.held > self.factory.outbound_limit and not self._cut_off:
            self._cut_off = True
            self._log.info("Closing slow reader {conn}", conn=self.conn_id)
            self.factory.metrics.drops["slow_reader"] += 1
            self._close(CloseCode.POLICY_VIOLATION, "slow_consumer")
            # A reader this far behind will not read the close frame;
            # this replaces a pending going-away close.
            if self._farewell is not None and self._farewell.active():
                self._farewell.cancel()
            self._farewell = self.factory.clock.callLater(1.0, self._abort)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        Autobahn's C{sendData}, minus the debug event its logger would drop.

        For a plain write (not C{sync}, not chopped, nothing queued behind
        a delayed write) Autobahn writes to the transport, then builds a
        debug event's arguments (C{hltype}, two C{hlval}s: a third of the
        server's CPU in a fan-out), then counts the octets. When the
        speedups are installed and Autobahn's logger drops debug events,
        this does the same write and the same counting without building
        the event; anything else goes to Autobahn's own C{sendData}. Both
        ways, what a paused transport holds is counted (L{_count_held}).
        C{tests/test_speedups.py} compares the two.

        On an open connection whose TCP transport has nothing buffered,
        that plain write is held for the end of the reactor turn and then
        given to the socket with the turn's other frames (on an opening
        one too: the upgrade's answer then leaves with the welcome)
        (L{meteredrt.turnwrite}: no write watch, so no C{epoll_ctl} pair
        per frame). Autobahn's own writes and closing the connection send
        what is held first; an abort drops it, as it drops Twisted's
        buffer.
        """
        transport = self.transport
        if sync or chopsize or self.send_queue or transport is None or not debug_skippable(self.log):
            self.flush_held()
            super().sendData(data, sync, chopsize)
            self._count_held(len(data))
            return
        state = self.state
        held = self._held_out
        if held is not None:
            size = self._held_size + len(data)
            if size <= HELD_LIMIT:
                held.append(data)
                self._held_size = size
            else:
                self.flush_held()
                transport.write(data)
        elif (
            (state == _STATE_OPEN or state == _STATE_CONNECTING)
            and not self._watch.paused
            and idle_tcp(transport) is not None
        ):
            self._held_out = [data]
            self._held_size = len(data)
            self.factory.turn_writer.hold(self)
        else:
            transport.write(data)
        self._count_held(len(data))
        if state == _STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state == _STATE_CONNECTING or state == WebSocketProtocol.STATE_PROXY_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)

    def flush_held(self) -> None:
        """
        Hand the frames held this turn to the socket (L{meteredrt.turnwrite}):
        at the end of the turn, and before anything else reaches the
        transport (a write Autobahn makes itself, closing the connection).
        """
        held = self._held_out
        if held is None:
            return
        self._held_out = None
        if self.transport is not None:
            send_held(self.transport, held[0] if len(held) == 1 else b"".join(held))

    def _closeConnection(self, abort: bool = False) -> None:
        # Twisted closes a transport with an empty buffer at once, and an
        # abort discards what is buffered.
        if abort:
            self._held_out = None
        else:
            self.flush_held()
        super()._closeConnection(abort)

    def close(self, code: int, reason: str) -> None:
        self._close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        # sendClose() only takes 1000 and 3000-4999; 1001, 1003, 1008, 1009
        # and 1011 are ours to send too (§13), so frame the close directly.
        self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)

    def _abort(self) -> None:
        self._farewell = None
        self._held_out = None
        if self.transport is not None:
            # Autobahn types the transport as ITransport; it is TCP or TLS.
            cast(ITCPTransport, self.transport).abortConnection()

    def going_away(self, retry_after_ms: int, close_after: float) -> None:
        """
        Tell the client this node is going down, then close 1001 (§17.1).
        """
        if self._closing or self._farewell is not None:
            return
        self.send_frame(going_away_frame(retry_after_ms))
        self._farewell = self.factory.clock.callLater(close_after, self._close_going_away)

    def _close_going_away(self) -> None:
        self._farewell = None
        self._close(CloseCode.GOING_AWAY, "going_away")

    # -- teardown ----------------------------------------------------------------

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gone = self._closing = True
        self._queue = None
        self._held_out = None
        if self._expires_at is not None:
            self.factory.expiries.discard(self._expires_at, self)
            self._expires_at = None
        farewell, self._farewell = self._farewell, None
        if farewell is not None and farewell.active():
            farewell.cancel()
        # Autobahn keeps its close-handshake timer past connectionLost when
        # the peer never answered our close (an aborted slow reader).
        handshake = self.closeHandshakeTimeoutCall
        if handshake is not None:
            handshake.cancel()
            self.closeHandshakeTimeoutCall = None
        # Autobahn has just resolved is_closed with the protocol itself: a
        # cycle that left every closed connection, with all it holds, to
        # the garbage collector's full collections. Nothing waits on it.
        self.is_closed = None
        self.factory.connections.discard(self)
        session, self._session = self._session, None
        if session is not None:
            self.factory.hub.disconnect(session).addErrback(
                lambda f: self._log.failure("Failed to clean up {conn}", f, conn=self.conn_id)
            )
        if self._opened_at is not None:
            self._report_end(code, reason)
        self.factory.closed_one()

    def _report_end(self, code: int | None, reason: str | None) -> None:
        """
        Count the closed session and write its one log line.

        The close code is the one this server sent when it closed first (a
        refusal, a slow reader, a drain), else the client's; 1006 when
        nobody sent one.
        """
        if self.closedByMe:
            side = "server"
            code = self.localCloseCode
            reason = (self.localCloseReason or b"").decode("utf-8", "replace")
        else:
            side = "server" if self.droppedByMe and self.remoteCloseCode is None else "client"
        code = _NO_STATUS if code is None else code
        metrics = self.factory.metrics
        # A client may close with any of some 2,000 codes: count those past
        # the standard range as one, so clients cannot mint metric series.
        counted = code if side == "server" or code <= _LAST_STANDARD_CLOSE_CODE else OTHER_CLIENT_CLOSE_CODE
        metrics.closes[(counted, side)] += 1
        grant = self._grant
        opened_at = self._opened_at or 0.0
        self._log.info(
            "WebSocket session ended: app={app} peer={peer} conn={conn} remote={remote} "
            "duration={duration:.3f}s code={code} by={closed_by} reason={reason!r} "
            "frames_in={frames_in} frames_out={frames_out}",
            event="session_end",
            app=grant.app_id if grant is not None else "-",
            peer=grant.peer_id if grant is not None else "-",
            conn=self.conn_id or "-",
            remote=self._remote,
            duration=self.factory.clock.seconds() - opened_at,
            code=code,
            closed_by=side,
            reason=reason or "",
            frames_in=self._received,
            frames_out=self._watch.sent,
        )


def _protocol_class(factory: WebSocketServerFactory) -> type[RealtimeServerProtocol]:
    """
    A subclass of L{RealtimeServerProtocol} that holds each of
    C{factory}'s protocol options as a class attribute.

    Autobahn copies each of its options (C{CONFIG_ATTRS}, 29 of them) from
    the factory into every new connection's C{__dict__}, unless the
    protocol already has the attribute: the copying cost ~3 us per
    connect, and the 29 keys took the dictionary of each connection's
    attributes a size up. Read from the class, each is the value the copy
    would have held; as with the copies, these are the values when the
    class is made (the factory sets its options once, in C{__init__}).
    """
    base = RealtimeServerProtocol
    values: dict[str, Any] = {}
    for name in base.CONFIG_ATTRS:
        value = getattr(factory, name)
        # A function (perMessageCompressionAccept) must not become a method.
        values[name] = staticmethod(value) if callable(value) else value
    # Same name and module: log namespaces follow the class.
    values.update(__module__=base.__module__, __qualname__=base.__qualname__)
    return type(base.__name__, (base,), values)


#: The highest close code RFC 6455 (and its registry) defines.
_LAST_STANDARD_CLOSE_CODE = 1015

#: How C{meteredrt_closes_total} counts any other code a client closed with.
OTHER_CLIENT_CLOSE_CODE = 0


class RealtimeServerFactory(WebSocketServerFactory):
    """
    Node-wide WebSocket settings, and the live connections for draining.

    Lifecycle belongs to the services: C{WebSocketResource} never calls a
    factory's start/stop hooks, so L{drain} is called by the composition
    root's shutdown service.
    """

    # Autobahn's factory is a bare ServerFactory, so Twisted's stubs want a
    # protocol whose factory is any Factory; ours reads its settings from a
    # RealtimeServerFactory, which the stubs cannot express.
    protocol = RealtimeServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        hub: Hub,
        keys: IKeyStore,
        clock: IReactorTime,
        turn: ITurnProvider | None = None,
        frame_rate: float = 1000.0,
        frame_burst: float = 2000.0,
        outbound_limit: int = 1024 * 1024,
        auto_ping_interval: float = 30.0,
        auto_ping_timeout: float = 10.0,
        metrics: Metrics | None = None,
        trusted_proxies: TrustedProxies = (),
    ) -> None:
        """
        @param metrics: where connections count what they do; the node's
            totals are read from it at scrape time.
        @param trusted_proxies: the proxies whose C{X-Forwarded-For} names
            the client that a session's log line shows.
        """
        super().__init__()
        self.hub = hub
        self.keys = keys
        self.clock = clock
        self.turn = turn
        self.frame_rate = frame_rate
        self.frame_burst = frame_burst
        self.outbound_limit = outbound_limit
        self.connections: set[RealtimeServerProtocol] = set()
        self.expiries = ExpiryTimers(clock, EXPIRY_LEAD_SECONDS)
        self.turn_writer = TurnWriter(clock)
        self.metrics = metrics if metrics is not None else Metrics()
        self.trusted_proxies = trusted_proxies
        self.draining = False
        self._drained: list[Deferred[None]] = []
        self._drain_calls: list[IDelayedCall] = []
        self.setProtocolOptions(
            maxFramePayloadSize=INBOUND_FRAME_LIMIT,
            maxMessagePayloadSize=INBOUND_FRAME_LIMIT,
            autoPingInterval=auto_ping_interval,
            autoPingTimeout=auto_ping_timeout,
            # No timer of Autobahn's for the opening handshake: it only ever
            # sees a complete request head (the direct upgrade takes only a
            # complete one, twisted.web hands over a parsed request), whose
            # handshake ends within that read. A slow head meets the HTTP
            # channel's deadline instead (meteredrt.guard). The timer cost
            # ~4% of a connect's CPU to arm and cancel.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=2,
            # Close frames carry the codes clients branch on (1009 included).
            failByDrop=False,
            # Origins are checked after the upgrade, per key, so that a
            # refusal is a close code; Autobahn's own check must let
            # every origin through, "null" (sandboxed iframes, file://
            # pages) included, or the browser sees only 1006 and retries.
            allowedOrigins=["*"],
            allowNullOrigin=True,
            perMessageCompressionAccept=lambda offers: None,
        )
        self.protocol = _protocol_class(self)

    def closed_one(self) -> None:
        """
        A connection has gone; wake up L{drain} once the last one has.
        """
        if not self.connections and self._drained:
            self._finish_drain()

    def _finish_drain(self) -> None:
        for call in self._drain_calls:
            if call.active():
                call.cancel()
        self._drain_calls = []
        waiting, self._drained = self._drained, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    def drain(self, batch: int = 500, interval: float = 0.05, timeout: float = 10.0) -> Deferred[None]:
        """
        Stop admitting upgrades, send C{going_away} to every connection and
        close each with 1001, in batches so a large node spreads the
        reconnect burst (§17.1).

        @return: fires when every connection is gone, or after C{timeout}.
        """
        self.draining = True
        if not self.connections:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        protocols = list(self.connections)
        for start in range(0, len(protocols), batch):
            group = protocols[start : start + batch]
            self._drain_calls.append(
                self.clock.callLater((start // batch) * interval, self._say_going_away, group)
            )
        self._drain_calls.append(self.clock.callLater(timeout, self._finish_drain))
        return done

    def _say_going_away(self, group: list[RealtimeServerProtocol]) -> None:
        for protocol in group:
            protocol.going_away(1000 + random.randint(0, 2000), GOING_AWAY_CLOSE_DELAY)

