"""
Tests for L{meteredrt.turnwrite} and the connection's frames held for the
end of a reactor turn (L{meteredrt.ws.RealtimeServerProtocol.sendData}).

The transports are Twisted's real TCP transport over an in-memory
C{socketpair}, under a reactor that only records which descriptors it was
asked to watch: no network, no polling.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import txaio
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.protocol import direct_frame
from meteredrt.speedups import install_speedups
from meteredrt.turnwrite import HELD_LIMIT, TurnWriter, idle_tcp, send_held
from tests.test_speedups import restore_speedups
from tests.test_ws import CLIENT_ADDRESS, WebSocketTestCase


class WatchRecorder:
    """
    The part of a reactor a TCP transport calls: it records the
    descriptors registered for writing.
    """

    def __init__(self) -> None:
        self.writers: list[Any] = []
        self.added_writers = 0
        self.clock = Clock()
        self.callLater = self.clock.callLater

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass

    def addWriter(self, writer: Any) -> None:
        self.added_writers += 1
        if writer not in self.writers:
            self.writers.append(writer)

    def removeWriter(self, writer: Any) -> None:
        if writer in self.writers:
            self.writers.remove(writer)


def tcp_pair(case: SynchronousTestCase, protocol: Any = None) -> tuple[tcp.Server, socket.socket, WatchRecorder]:
    """
    A Twisted TCP transport over one end of a socketpair, the other end
    (non-blocking) for the test to read, and the recording reactor.
    """
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    reactor = WatchRecorder()
    transport = tcp.Server(ours, protocol or Protocol(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    case.addCleanup(ours.close)
    case.addCleanup(peer.close)
    return transport, peer, reactor


def received(peer: socket.socket) -> bytes:
    """
    What the peer end can read now.
    """
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def fill(transport: tcp.Server) -> None:
    """
    Fill the socket's send buffer until it takes nothing more.
    """
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    while True:
        try:
            transport.socket.send(b"." * 4096)
        except BlockingIOError:
            return


class IdleTcpTests(SynchronousTestCase):
    """
    L{idle_tcp} lets only an open, plain TCP transport with an empty buffer
    be written to directly.
    """

    def test_idle(self) -> None:
        transport, _, _ = tcp_pair(self)
        self.assertIs(idle_tcp(transport), transport)

    def test_buffered(self) -> None:
        transport, _, _ = tcp_pair(self)
        transport.write(b"x")
        self.assertIsNone(idle_tcp(transport))

    def test_partly_sent(self) -> None:
        transport, _, _ = tcp_pair(self)
        transport.dataBuffer = b"rest"
        self.assertIsNone(idle_tcp(transport))

    def test_closing(self) -> None:
        transport, _, _ = tcp_pair(self)
        transport.loseConnection()
        self.assertIsNone(idle_tcp(transport))

    def test_closed(self) -> None:
        transport, _, _ = tcp_pair(self)
        transport.connected = False
        self.assertIsNone(idle_tcp(transport))

    def test_write_side_closed(self) -> None:
        transport, _, _ = tcp_pair(self)
        transport._writeDisconnected = True
        self.assertIsNone(idle_tcp(transport))

    def test_aborted(self) -> None:
        transport, _, _ = tcp_pair(self)
        transport.abortConnection()
        self.assertIsNone(idle_tcp(transport))

    def test_tls(self) -> None:
        transport, _, _ = tcp_pair(self)
        transport.TLS = True
        self.assertIsNone(idle_tcp(transport))

    def test_not_tcp(self) -> None:
        self.assertIsNone(idle_tcp(StringTransport()))

    def test_unknown_transport_internals(self) -> None:
        """
        A Twisted whose transport lacks one of the private attributes read
        is taken as never idle: frames go through C{transport.write}.
        """
        for name in ("_aborting", "_writeDisconnected", "dataBuffer", "_tempDataBuffer"):
            transport, _, _ = tcp_pair(self)
            hidden = type("Renamed", (tcp.Server,), {"__getattribute__": _hiding(name)})
            transport.__class__ = hidden
            self.assertIsNone(idle_tcp(transport), name)


class SendHeldTests(SynchronousTestCase):
    """
    L{send_held} gives the socket what it takes and Twisted's buffer the rest.
    """

    def test_straight_to_socket(self) -> None:
        """
        An idle transport's socket gets the bytes at once, and the reactor is
        never asked to watch it for writing.
        """
        transport, peer, reactor = tcp_pair(self)
        send_held(transport, b"hello")
        self.assertEqual(received(peer), b"hello")
        self.assertEqual(reactor.added_writers, 0)

    def test_busy_transport(self) -> None:
        """
        Behind bytes already in Twisted's buffer, the bytes join the buffer.
        """
        transport, peer, reactor = tcp_pair(self)
        transport.write(b"first ")
        send_held(transport, b"second")
        self.assertEqual(received(peer), b"")
        transport.doWrite()
        self.assertEqual(received(peer), b"first second")

    def test_socket_full(self) -> None:
        """
        What the socket does not take goes to Twisted's buffer, in order, and
        Twisted watches the socket to send it.
        """
        transport, peer, reactor = tcp_pair(self)
        fill(transport)
        received(peer)
        data = bytes(range(256)) * 1024
        send_held(transport, data)
        self.assertEqual(reactor.writers, [transport])
        got = b""
        while reactor.writers:
            got += received(peer)
            transport.doWrite()
        got += received(peer)
        self.assertEqual(got[-len(data) :], data)
        self.assertTrue(got[: -len(data)].strip(b".") == b"")

    def test_error_left_to_twisted(self) -> None:
        """
        When the socket refuses the bytes (the peer is gone), they go to
        Twisted's buffer and its next write finds the connection lost.
        """
        transport, peer, reactor = tcp_pair(self)
        peer.close()
        send_held(transport, b"x" * 100_000)
        self.assertEqual(reactor.writers, [transport])
        self.assertIsInstance(transport.doWrite(), Exception)


class Recorder:
    def __init__(self) -> None:
        self.flushes = 0

    def flush_held(self) -> None:
        self.flushes += 1


class TurnWriterTests(SynchronousTestCase):
    """
    L{TurnWriter} calls each holding connection back once, at the end of the
    turn (one delayed call of 0 s for all of them).
    """

    def test_end_of_turn(self) -> None:
        clock = Clock()
        writer = TurnWriter(clock)
        first, second = Recorder(), Recorder()
        writer.hold(first)
        writer.hold(second)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual((first.flushes, second.flushes), (0, 0))
        clock.advance(0)
        self.assertEqual((first.flushes, second.flushes), (1, 1))
        self.assertEqual(clock.getDelayedCalls(), [])
        writer.hold(first)
        clock.advance(0)
        self.assertEqual((first.flushes, second.flushes), (2, 1))


def use_speedups(case: SynchronousTestCase) -> None:
    """
    Install the speedups for C{case} (frames are held only with them), and
    put back what was installed before.
    """
    restore_speedups(case)
    if not install_speedups(enabled=True):
        case.skipTest("the installed Autobahn runs without the speedups")


class HeldFramesTests(WebSocketTestCase):
    """
    A connection on an idle TCP transport holds its frames until the end of
    the turn and sends them in one go; anything else goes through the
    transport as before.
    """

    def setUp(self) -> None:
        super().setUp()
        use_speedups(self)
        self.client, self.server, pump = self.open_token("alice")
        pump.flush()
        self.assertEqual([f["type"] for f in self.client.received], ["welcome"])
        self.tcp, self.peer, self.reactor = tcp_pair(self, self.server)
        self.server.transport = self.tcp

    def turn_calls(self) -> list[Any]:
        """
        The delayed calls due now: the end of the turn.
        """
        return [call for call in self.clock.getDelayedCalls() if call.getTime() <= self.clock.seconds()]

    def frame(self, n: int, size: int = 10) -> Any:
        return direct_frame("bob", {"n": n, "pad": "x" * size}, None)

    def wire(self, *frames: Any) -> bytes:
        return b"".join(self.factory.prepareMessage(f.payload).payloadHybi for f in frames)

    def decoded(self, data: bytes) -> list[Any]:
        """
        The frames a client makes of C{data}.
        """
        before = len(self.client.received)
        self.client.dataReceived(data)
        return self.client.received[before:]

    def test_held_until_turn_end(self) -> None:
        """
        Frames written during a turn reach the socket together at its end,
        and the reactor never watches the socket for writing; they are
        counted when written.
        """
        stats = self.server.trafficStats
        octets, sent = stats.outgoingOctetsWireLevel, self.server._watch.sent
        one, two = self.frame(1), self.frame(2)
        self.server.send_frame(one)
        self.server.send_frame(two)
        self.assertEqual(received(self.peer), b"")
        self.assertEqual(stats.outgoingOctetsWireLevel - octets, len(self.wire(one, two)))
        self.assertEqual(self.server._watch.sent - sent, 2)
        self.clock.advance(0)
        data = received(self.peer)
        self.assertEqual(data, self.wire(one, two))
        self.assertEqual([f["data"]["n"] for f in self.decoded(data)], [1, 2])
        self.assertEqual(self.reactor.added_writers, 0)
        self.assertEqual(self.turn_calls(), [])

    def test_busy_transport_writes_through(self) -> None:
        """
        Behind bytes already in Twisted's buffer a frame joins the buffer at
        once, and nothing waits for the end of the turn.
        """
        self.tcp.write(b"ahead")
        frame = self.frame(1)
        self.server.send_frame(frame)
        self.assertEqual(self.turn_calls(), [])
        self.tcp.doWrite()
        self.assertEqual(received(self.peer), b"ahead" + self.wire(frame))

    def test_paused_transport_writes_through(self) -> None:
        """
        While the transport is paused a frame goes to its buffer and counts
        toward the slow-reader limit.
        """
        self.server._watch.pauseProducing()
        frame = self.frame(1)
        self.server.send_frame(frame)
        self.assertEqual(self.turn_calls(), [])
        self.assertEqual(self.server._watch.held, len(self.wire(frame)))
        self.assertEqual(self.reactor.writers, [self.tcp])

    def test_limit(self) -> None:
        """
        Past L{HELD_LIMIT} bytes held, what is held and the new frame go out
        at once, in order.
        """
        frames = [self.frame(n, 8000) for n in range(HELD_LIMIT // 8000 + 1)]
        for frame in frames:
            self.server.send_frame(frame)
        self.assertIsNone(self.server._held_out)
        self.tcp.doWrite()
        self.assertEqual(received(self.peer), self.wire(*frames))

    def test_close_sends_held_first(self) -> None:
        """
        Held frames reach the socket before the connection is closed, and
        the close frame after them.
        """
        frame = self.frame(1)
        self.server.send_frame(frame)
        self.server.close(4000, "bye")
        self.server.dropConnection(abort=False)
        data = received(self.peer)
        self.assertTrue(data.startswith(self.wire(frame)), data)
        self.assertEqual(self.decoded(data)[0]["data"]["n"], 1)
        self.assertTrue(self.tcp.disconnecting)

    def test_stop_reading_sends_held_first(self) -> None:
        """
        A flood's cut-off closes the transport after the held frames.
        """
        frame = self.frame(1)
        self.server.send_frame(frame)
        self.server._stop_reading()
        self.assertEqual(received(self.peer), self.wire(frame))
        self.assertTrue(self.tcp.disconnecting)

    def test_abort_drops_held(self) -> None:
        """
        An aborted connection sends nothing more, held frames included.
        """
        self.server.send_frame(self.frame(1))
        self.server.dropConnection(abort=True)
        self.clock.advance(0)
        self.assertEqual(received(self.peer), b"")

    def test_our_abort_drops_held(self) -> None:
        """
        So does a slow reader's abort.
        """
        self.server.send_frame(self.frame(1))
        self.server._abort()
        self.clock.advance(0)
        self.assertEqual(received(self.peer), b"")

    def test_autobahn_write_after_held(self) -> None:
        """
        A write Autobahn makes itself (its C{sendData}, used while its
        logger keeps debug events) comes after the frames held before it.
        """
        frame = self.frame(1)
        self.server.send_frame(frame)
        level = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, level)
        self.server.sendData(b"after")
        self.tcp.doWrite()
        self.assertEqual(received(self.peer), self.wire(frame) + b"after")

    def test_closed_connection_drops_held(self) -> None:
        """
        Frames held by a connection that is lost before the turn ends are
        dropped, as Twisted drops its buffer.
        """
        self.server.send_frame(self.frame(1))
        self.server.onClose(False, 1006, None)
        self.clock.advance(0)
        self.assertEqual(received(self.peer), b"")


class HeldHandshakeTests(WebSocketTestCase):
    """
    The upgrade's answer is held like a frame: on an idle TCP transport the
    101 and the welcome reach the socket together at the end of the turn.
    """

    def setUp(self) -> None:
        super().setUp()
        use_speedups(self)
        self.server = self.factory.buildProtocol(CLIENT_ADDRESS)
        self.tcp, self.peer, self.reactor = tcp_pair(self, self.server)
        self.server.makeConnection(self.tcp)
        # The socketpair is a Unix socket: Twisted logs that it refused
        # Autobahn's TCP_NODELAY.
        self.flushLoggedErrors(OSError)

    def upgrade(self, version: int = 13) -> None:
        self.server.dataReceived(
            b"GET /v1?token=" + self.token("alice").encode() + b" HTTP/1.1\r\n"
            b"Host: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: " + str(version).encode() + b"\r\n\r\n"
        )

    def test_answer_and_welcome_together(self) -> None:
        """
        Nothing reaches the socket during the turn; at its end the 101 and
        the welcome frame do, in one piece, and the reactor never watched
        the socket for writing. Autobahn arms no timer of its own for the
        opening handshake, which ends within the read.
        """
        self.assertIsNone(self.server.openHandshakeTimeoutCall)
        self.upgrade()
        self.assertEqual(received(self.peer), b"")
        self.clock.advance(0)
        head, _, frames = received(self.peer).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertEqual(frames[:1], b"\x81")
        self.assertEqual(json.loads(frames[2 : 2 + frames[1]])["type"], "welcome")
        self.assertEqual(len(frames), 2 + frames[1])
        self.assertEqual(self.reactor.added_writers, 0)

    def test_refusal_sent_before_close(self) -> None:
        """
        An upgrade Autobahn refuses is answered before the connection
        closes, though the answer was held.
        """
        self.upgrade(version=12)
        self.assertTrue(received(self.peer).startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.tcp.disconnecting)


def _hiding(name: str) -> Any:
    """
    A C{__getattribute__} that behaves as if C{name} did not exist.
    """

    def get(self: object, attribute: str) -> Any:
        if attribute == name:
            raise AttributeError(attribute)
        return object.__getattribute__(self, attribute)

    return get
