"""
Tests for L{meteredrt.guard}: the request deadline and the per-client
connection cap, over L{twisted.test.iosim} with one L{Clock}.
"""

from __future__ import annotations

import json
from ipaddress import ip_network
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from meteredrt.guard import (
    ConnectionCap,
    ConnectionCounts,
    CountedConnection,
    DeadlineChannel,
    GuardedSite,
    hold_client,
)

TIMEOUT = 5.0
HEAD = b"GET /thing HTTP/1.1\r\nHost: localhost\r\n"


class _Thing(Resource):
    """
    C{/thing}: answers at once, or, for C{/thing?slow}, when the test says so.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        if request.args.get(b"slow"):
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"thing:" + request.content.read()


class _Silent(Protocol):
    """
    A client that sends only what the test tells it to, and records the answer.
    """

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class DeadlineTests(SynchronousTestCase):
    """
    L{GuardedSite} gives every request L{TIMEOUT} seconds to arrive whole.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        root = Resource()
        self.thing = _Thing()
        root.putChild(b"thing", self.thing)
        self.site = GuardedSite(root, request_timeout=TIMEOUT, reactor=self.clock)

    def connect(self) -> tuple[_Silent, IOPump]:
        client = _Silent()
        address = IPv4Address("TCP", "192.0.2.7", 50000)
        _, _, pump = connectedServerAndClient(
            lambda: self.site.buildProtocol(address),
            lambda: client,
            serverTransportFactory=lambda protocol: FakeTransport(protocol, True, peerAddress=address),
            clock=self.clock,
        )
        return client, pump

    def send(self, client: _Silent, pump: IOPump, data: bytes) -> None:
        client.transport.write(data)
        pump.flush()

    def advance(self, pump: IOPump, seconds: float) -> None:
        self.clock.advance(seconds)
        pump.flush()

    def assertTimedOut(self, client: _Silent) -> None:
        """
        The client got a 408 with a JSON body naming the timeout, and the
        connection is closed.
        """
        head, _, body = client.data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), client.data[:60])
        self.assertIn(b"content-type: application/json", head.lower())
        self.assertEqual(json.loads(body)["error"], "request_timeout")
        self.assertIn("5 seconds", json.loads(body)["message"])
        self.assertTrue(client.lost)

    def test_half_request(self) -> None:
        """
        Headers that never end get a 408 at the deadline, not before.
        """
        client, pump = self.connect()
        self.send(client, pump, HEAD + b"X-A: 1\r\n")
        self.advance(pump, TIMEOUT - 0.1)
        self.assertEqual((client.data, client.lost), (b"", False))
        self.advance(pump, 0.2)
        self.assertTimedOut(client)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickle(self) -> None:
        """
        A byte a second does not extend the deadline: it counts from the
        connection, not from the last byte.
        """
        client, pump = self.connect()
        for byte in (HEAD + b"X-Padding: " + b"a" * 100)[: int(TIMEOUT) + 1]:
            self.send(client, pump, bytes([byte]))
            self.advance(pump, 1.0)
        self.assertTimedOut(client)

    def test_slow_body(self) -> None:
        """
        The body must arrive within the deadline too.
        """
        client, pump = self.connect()
        self.send(client, pump, HEAD + b"Content-Length: 10\r\n\r\nhalf")
        self.advance(pump, TIMEOUT)
        self.assertTimedOut(client)

    def test_silent_connection(self) -> None:
        """
        A connection that never sends a byte is closed at the deadline
        without an answer.
        """
        client, pump = self.connect()
        self.advance(pump, TIMEOUT)
        self.assertEqual((client.data, client.lost), (b"", True))

    def test_complete_request(self) -> None:
        """
        A request that arrives in time is answered, however long the answer
        takes; the next request on the connection gets a fresh deadline, and
        the idle connection after it is closed silently.
        """
        client, pump = self.connect()
        self.advance(pump, TIMEOUT - 1)
        self.send(client, pump, b"GET /thing?slow=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.advance(pump, TIMEOUT * 3)
        self.assertEqual((client.data, client.lost), (b"", False))
        [request] = self.thing.waiting
        request.write(b"late")
        request.finish()
        pump.flush()
        self.assertIn(b"200 OK", client.data)
        self.advance(pump, TIMEOUT - 1)
        client.data = b""
        self.send(client, pump, HEAD + b"Content-Length: 2\r\n\r\nhi")
        self.assertTrue(client.data.endswith(b"thing:hi"), client.data)
        self.assertFalse(client.lost)
        client.data = b""
        self.advance(pump, TIMEOUT)
        self.assertEqual((client.data, client.lost), (b"", True))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pipelined(self) -> None:
        """
        Two requests sent at once are both answered, and the connection
        then waits for a third within a fresh deadline.
        """
        client, pump = self.connect()
        self.send(client, pump, HEAD + b"\r\n" + HEAD + b"\r\n")
        self.assertEqual(client.data.count(b"200 OK"), 2)
        self.advance(pump, TIMEOUT - 1)
        self.assertFalse(client.lost)
        self.advance(pump, 1)
        self.assertTrue(client.lost)


def _request_on(counted: CountedConnection | None) -> http.Request:
    """
    A request on a channel that C{counted} counts.
    """
    channel = DeadlineChannel()
    channel.transport = FakeTransport(channel, True)
    channel.counted = counted
    return http.Request(channel)


def _cap_factory(per_client: int, trusted: Any = ()) -> ConnectionCap:
    return ConnectionCap(Factory.forProtocol(Protocol), per_client, trusted)


class ConnectionCountsTests(SynchronousTestCase):
    """
    Tests for L{ConnectionCounts}.
    """

    def test_cap(self) -> None:
        """
        Each key holds at most C{per_client}; releasing makes room, and a
        key with nothing open is forgotten.
        """
        counts = ConnectionCounts(2)
        self.assertEqual([counts.acquire("a") for _ in range(3)], [True, True, False])
        self.assertTrue(counts.acquire("b"))
        counts.release("a")
        self.assertTrue(counts.acquire("a"))
        for _ in range(2):
            counts.release("a")
        counts.release("b")
        self.assertEqual((counts.count("a"), counts.count("b")), (0, 0))
        self.assertEqual(counts._open, {})


class ConnectionCapTests(SynchronousTestCase):
    """
    L{ConnectionCap} refuses a client's connection over the cap at once.
    """

    def accept(self, cap: ConnectionCap, host: str) -> Any:
        """
        What the factory builds for a connection from C{host}, connected
        to a transport when there is one.
        """
        address = IPv6Address("TCP", host, 1) if ":" in host else IPv4Address("TCP", host, 1)
        protocol = cap.buildProtocol(address)
        if protocol is not None:
            protocol.makeConnection(FakeTransport(protocol, True, peerAddress=address))
        return protocol

    def test_cap_per_address(self) -> None:
        """
        The connection over the cap is refused; another address is not
        affected; a closed connection makes room.
        """
        cap = _cap_factory(2)
        first, second = self.accept(cap, "192.0.2.1"), self.accept(cap, "192.0.2.1")
        self.assertIsNone(self.accept(cap, "192.0.2.1"))
        self.assertIsNotNone(self.accept(cap, "192.0.2.2"))
        first.connectionLost(None)
        self.assertIsNotNone(self.accept(cap, "192.0.2.1"))
        self.assertIsNone(self.accept(cap, "192.0.2.1"))
        self.assertIsNotNone(second)
        self.assertEqual(cap.metrics.drops["connection_cap"], 2)

    def test_ipv6_by_64(self) -> None:
        """
        IPv6 addresses of one /64 share a cap.
        """
        cap = _cap_factory(1)
        self.assertIsNotNone(self.accept(cap, "2001:db8:1:2::1"))
        self.assertIsNone(self.accept(cap, "2001:db8:1:2::ffff"))
        self.assertIsNotNone(self.accept(cap, "2001:db8:1:3::1"))

    def test_trusted_proxy_not_capped(self) -> None:
        """
        A trusted proxy may hold any number of connections.
        """
        cap = _cap_factory(1, (ip_network("10.0.0.0/8"),))
        self.assertTrue(all(self.accept(cap, "10.0.0.5") is not None for _ in range(5)))
        self.assertIsNotNone(self.accept(cap, "192.0.2.1"))
        self.assertIsNone(self.accept(cap, "192.0.2.1"))

    def test_unix_socket_not_capped(self) -> None:
        """
        Peers without an IP address are not counted.
        """
        cap = _cap_factory(1)
        for _ in range(3):
            self.assertIsNotNone(cap.buildProtocol(UNIXAddress(None)))

    def test_hold_client(self) -> None:
        """
        L{hold_client} counts a connection against a forwarded client until
        it closes, once however often it is asked.
        """
        cap = _cap_factory(1, (ip_network("10.0.0.0/8"),))
        first, second = self.accept(cap, "10.0.0.5"), self.accept(cap, "10.0.0.5")
        request = _request_on(first)
        self.assertTrue(hold_client(request, "192.0.2.9"))
        self.assertTrue(hold_client(request, "192.0.2.9"))
        other = _request_on(second)
        self.assertFalse(hold_client(other, "192.0.2.9"))
        first.connectionLost(None)
        self.assertTrue(hold_client(other, "192.0.2.9"))

    def test_hold_client_without_cap(self) -> None:
        """
        A request whose connection is not behind a cap is never refused.
        """
        self.assertTrue(hold_client(_request_on(None), "192.0.2.9"))
