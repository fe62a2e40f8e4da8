"""
What an attacker tries, over real loopback sockets, while a bystander on
the same server keeps exchanging messages.

Each test starts the composed server, connects a bystander (a publisher
and a subscriber publishing 50 messages a second to each other), runs one
bounded attack from another loopback address (127.0.0.2, so per-address
limits tell the two apart), and then checks that the attacker met the
documented refusal and that the bystander lost nothing and kept a latency
of milliseconds rather than seconds. The latency bound is deliberately
generous: the machine is shared; an attack that gets through costs
seconds.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from typing import Any

from autobahn.twisted.websocket import connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from meteredrt.apps import ACTIONS, Key, KeyType
from meteredrt.auth import mint_token
from meteredrt.hub import Hub
from meteredrt.ws import RealtimeServerFactory, RealtimeServerProtocol

from .support import (
    APP_ID,
    CONFIG,
    SECRET,
    SECRET_KEY_ID,
    Frame,
    FramePeer,
    FramePeerFactory,
    RunningServer,
    frame_is,
    start_server,
)

SECRET_KEY = Key(SECRET_KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET)
#: Where the attacker connects from.
ATTACKER_ADDRESS = "127.0.0.2"
#: The bystander's 99th-percentile latency must stay under this. Normal is
#: a few milliseconds; the attacks it guards against cost over a second.
LATENCY_LIMIT = 0.5
#: Bystander messages per second (under the 100/s message rate).
BYSTANDER_RATE = 50

def _token(peer_id: str) -> str:
    return mint_token(SECRET_KEY, peer_id, now=int(time.time()), expires_in=600)


class _Peer(FramePeer):
    """
    A bystander client: also records when each channel message arrived.
    """

    def __init__(self) -> None:
        super().__init__()
        self.latencies: list[float] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        if frame["type"] == "message":
            self.latencies.append(time.monotonic() - frame["data"]["t"])
        self.deliver(frame)


class _PeerFactory(FramePeerFactory):
    protocol = _Peer


class Bystander:
    """
    Two peers on the server under attack: one publishes a numbered,
    timestamped message to a channel every 1/L{BYSTANDER_RATE} s, the
    other is subscribed and records each message's latency.
    """

    def __init__(self, server: RunningServer) -> None:
        self._server = server
        self.sent = 0
        self._loop = LoopingCall(self._publish)

    async def _connect(self, peer_id: str) -> tuple[_Peer, _PeerFactory]:
        factory = _PeerFactory(f"{self._server.url}/v1?token={_token(peer_id)}")
        connectWS(factory)
        peer = await factory.opened
        await peer.frame(frame_is("welcome"))
        return peer, factory

    async def start(self) -> None:
        self.publisher, self._publisher_factory = await self._connect("bystander-publisher")
        self.receiver, self._receiver_factory = await self._connect("bystander-receiver")
        self.receiver.send_json({"type": "subscribe", "channel": "calm", "requestId": "s"})
        await self.receiver.frame(frame_is("ack", requestId="s"))
        self._loop.start(1.0 / BYSTANDER_RATE)

    def _publish(self) -> None:
        self.publisher.send_json({"type": "publish", "channel": "calm", "data": {"n": self.sent, "t": time.monotonic()}})
        self.sent += 1

    async def stop(self, case: TestCase) -> None:
        """
        Stop publishing, wait for the last message, and check that every
        message arrived, in order, with a bounded latency; then close.
        """
        self._loop.stop()
        last = self.sent - 1
        await _within(5.0, self.receiver.frame(lambda f: f["type"] == "message" and f["data"]["n"] == last))
        numbers = [f["data"]["n"] for f in self.receiver.frames if f["type"] == "message"]
        case.assertEqual(numbers, list(range(self.sent)), "the bystander lost or reordered messages")
        latencies = sorted(self.receiver.latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        case.assertLess(p99, LATENCY_LIMIT, f"bystander p99 latency {p99:.3f} s (max {latencies[-1]:.3f} s)")
        for peer, factory in ((self.publisher, self._publisher_factory), (self.receiver, self._receiver_factory)):
            peer.sendClose(1000)
            case.assertEqual(await _within(5.0, factory.closed), 1000)


async def _within(seconds: float, d: Deferred[Any]) -> Any:
    """
    Wait for C{d}, failing the test if it takes more than C{seconds}.
    """
    d.addTimeout(seconds, reactor)
    return await d


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def _masked(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """
    One client frame (masked, as RFC 6455 requires), with a zero mask key
    so the payload goes as it is.
    """
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


class RawWebSocket(Protocol):
    """
    An attacker's WebSocket: a hand-made upgrade, then whatever bytes the
    test writes. Parses what the server sends back, up to its close frame.
    """

    def __init__(self, query: str) -> None:
        self._query = query
        self._buffer = b""
        self._upgraded = False
        self.frames: list[Frame] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.welcomed: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET /v1?{self._query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
            ).encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                raise AssertionError(f"upgrade refused: {head[:60]!r}")
            self._upgraded, self._buffer = True, rest
        while len(self._buffer) >= 2:
            opcode, length = self._buffer[0] & 0x0F, self._buffer[1] & 0x7F
            start = 2
            if length == 126:
                (length,) = struct.unpack("!H", self._buffer[2:4])
                start = 4
            elif length == 127:
                (length,) = struct.unpack("!Q", self._buffer[2:10])
                start = 10
            if len(self._buffer) < start + length:
                return
            payload, self._buffer = self._buffer[start : start + length], self._buffer[start + length :]
            if opcode == 1:
                self.frames.append(json.loads(payload))
                if self.frames[0]["type"] == "welcome" and not self.welcomed.called:
                    self.welcomed.callback(None)
            elif opcode == 8 and self.close_code is None:
                (self.close_code,) = struct.unpack("!H", payload[:2])
                self.close_reason = payload[2:].decode()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class HalfRequest(Protocol):
    """
    A slowloris connection: half an HTTP request, then silence. Keeps how
    long the server let it stay.
    """

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self._connected_at = 0.0
        self.held_for = 0.0

    def connectionMade(self) -> None:
        self._connected_at = time.monotonic()
        self.transport.write(b"GET /v1?key=x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.held_for = time.monotonic() - self._connected_at
        self.lost.callback(None)


class AttackTests(TestCase):
    """
    One attack each, a bystander throughout.
    """

    timeout = 60

    async def start(self, server_settings: str = "") -> tuple[RunningServer, Bystander]:
        # CONFIG opens with its own [server] table: add to it.
        config = CONFIG.replace("[server]\n", f"[server]\n{server_settings}\n", 1)
        server = await start_server(self, config)
        bystander = Bystander(server)
        await bystander.start()
        # Some calm traffic before the attack, for a baseline.
        await _sleep(0.3)
        return server, bystander

    async def attacker(self, server: RunningServer, protocol: Protocol) -> Protocol:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port, bindAddress=(ATTACKER_ADDRESS, 0))
        return await connectProtocol(endpoint, protocol)

    def server_side(self, server: RunningServer, peer_id: str) -> RealtimeServerProtocol:
        """
        The server's protocol for C{peer_id}'s connection.
        """
        [hub] = [service for service in server.service if isinstance(service, Hub)]
        [sink] = [s.sink for s in hub.sessions() if s.peer_id == peer_id]
        assert isinstance(sink, RealtimeServerProtocol)
        return sink

    async def test_empty_continuation_flood(self) -> None:
        """
        200,000 empty continuation frames in one burst: the attacker is
        closed 4011 over_frame_rate within seconds and the server reads no
        more from it; the bystander does not notice.
        """
        server, bystander = await self.start()
        attacker = RawWebSocket(f"token={_token('attacker')}")
        await self.attacker(server, attacker)
        await _within(5.0, attacker.welcomed)
        attacker.transport.write(_masked(1, fin=False) + _masked(0, fin=False) * 200_000)
        await _within(10.0, attacker.lost)
        self.assertEqual((attacker.close_code, attacker.close_reason), (4011, "over_frame_rate"))
        await _sleep(0.5)
        await bystander.stop(self)

    async def test_ping_flood_without_reading(self) -> None:
        """
        A client that sends protocol pings and never reads is cut off 1008
        once the pongs it leaves unread pass the 1 MiB outbound limit; the
        server never holds much more than that for it. (The frame budget is
        lifted for this test so the pongs, not the budget, stop it.)
        """
        server, bystander = await self.start()
        factory: RealtimeServerFactory = self.server_side(server, "bystander-publisher").factory
        factory.frame_rate = factory.frame_burst = 10_000_000
        attacker = RawWebSocket(f"token={_token('pinger')}")
        await self.attacker(server, attacker)
        await _within(5.0, attacker.welcomed)
        target = self.server_side(server, "pinger")
        attacker.transport.pauseProducing()
        held: list[int] = []
        watch = LoopingCall(lambda: held.append(target._watch.held))
        watch.start(0.005)
        chunk = _masked(9, b"p" * 125) * 8000  # 1 MiB of pings
        for _ in range(32):  # at most 32 MiB
            if attacker.lost.called:
                break
            attacker.transport.write(chunk)
            await _sleep(0.05)
        await _within(10.0, attacker.lost)
        watch.stop()
        self.assertEqual(target.localCloseCode, 1008)
        self.assertLessEqual(max(held), factory.outbound_limit + 256)
        self.assertGreater(max(held), 0, "the server never paused its writes: the test proved nothing")
        await bystander.stop(self)

    async def test_slowloris(self) -> None:
        """
        300 connections that each send half a request: past the per-address
        cap they are closed at once, the rest get a 408 at the request
        deadline and are closed; the bystander, from another address, still
        connects and exchanges messages.
        """
        # Long enough for the 300 connections to be made before the first
        # held ones reach it, even on a slow machine: past it they go, and
        # the cap would let later ones in.
        deadline = 5.0
        server, bystander = await self.start(f"request_timeout_seconds = {deadline}\nmax_connections_per_ip = 100")
        started = time.monotonic()
        attackers = [HalfRequest() for _ in range(300)]
        for attacker in attackers:
            await self.attacker(server, attacker)
        # A newcomer from the bystander's address is not affected.
        newcomer_factory = _PeerFactory(f"{server.url}/v1?token={_token('newcomer')}")
        connectWS(newcomer_factory)
        newcomer = await _within(5.0, newcomer_factory.opened)
        await newcomer.frame(frame_is("welcome"))
        for attacker in attackers:
            await _within(10.0, attacker.lost)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, deadline + 8.0)
        # Told apart by what each was sent and how long each stayed, not by
        # which had gone at some moment: on a loaded machine the first ones
        # held may reach their deadline before the last ones are refused.
        refused = [a for a in attackers if not a.data]
        self.assertGreaterEqual(len(refused), 200)
        self.assertLess(max(a.held_for for a in refused), 1.0, "a connection past the cap was not closed at once")
        held = [a for a in attackers if a.data]
        self.assertTrue(held, "no connection was held up to the deadline")
        for attacker in held:
            self.assertTrue(attacker.data.startswith(b"HTTP/1.1 408 "), attacker.data[:40])
            self.assertIn(b'"error":"request_timeout"', attacker.data)
            self.assertGreaterEqual(attacker.held_for, deadline * 0.9)
        newcomer.sendClose(1000)
        await _within(5.0, newcomer_factory.closed)
        await bystander.stop(self)
