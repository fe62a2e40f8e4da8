"""
Tests for L{meteredrt.site}: the whole C{Site} over L{twisted.test.iosim},
raw HTTP for the refusals before the upgrade and a real Autobahn client for
the upgrade itself.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from twisted.web.server import Site

from meteredrt.site import V1Resource, build_root
from tests.test_ws import CLIENT_ADDRESS, RecordingClient, WebSocketTestCase

UPGRADE_HEADERS = (
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


class RawClient(Protocol):
    """
    Sends one HTTP request and keeps every byte of the answer.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """
        The status, lower-cased headers and body of the answer.
        """
        head, _, body = self.data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers, body


class SiteTests(WebSocketTestCase):
    """
    The C{/v1} resource and the JSON root.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ready = True
        self.v1 = V1Resource(self.factory, self.clock)
        self.site = Site(build_root(self.v1, lambda: self.ready), reactor=Clock())

    def connect(self, client: Any, host: str = "192.0.2.7") -> Any:
        """
        Connect C{client} to the site from C{host} and run the exchange.
        """
        address = IPv4Address("TCP", host, 50000)
        return connectedServerAndClient(
            lambda: self.site.buildProtocol(address),
            lambda: client,
            serverTransportFactory=lambda protocol: FakeTransport(protocol, True, peerAddress=address),
            clock=self.clock,
        )

    def http(
        self, path: bytes, headers: bytes = b"", host: str = "192.0.2.7"
    ) -> tuple[int, dict[str, str], bytes]:
        """
        Send one GET and return the response.
        """
        client = RawClient(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
        self.connect(client, host)
        return client.response()

    def test_no_upgrade(self) -> None:
        """
        A plain GET of C{/v1} is answered 426 with a JSON body.
        """
        status, headers, body = self.http(b"/v1")
        self.assertEqual(status, 426)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["upgrade"].lower(), "websocket")
        self.assertEqual(json.loads(body)["error"], "invalid_request")

    def test_draining(self) -> None:
        """
        While draining, upgrades are refused with 503 before the upgrade.
        """
        self.successResultOf(self.factory.drain())
        status, headers, body = self.http(b"/v1?key=pk_live_test", UPGRADE_HEADERS)
        self.assertEqual(status, 503)
        self.assertIn("retry-after", headers)
        self.assertEqual(json.loads(body)["error"], "internal_error")

    def test_upgrade_rate(self) -> None:
        """
        The 61st upgrade attempt from one address within a minute is
        refused with 429 and Retry-After; other addresses are unaffected,
        and time lets the address in again.
        """
        for _ in range(60):
            status, _, _ = self.http(b"/v1?x=1", UPGRADE_HEADERS)
            self.assertEqual(status, 101)
        status, headers, _ = self.http(b"/v1?x=1", UPGRADE_HEADERS)
        self.assertEqual(status, 429)
        self.assertGreaterEqual(int(headers["retry-after"]), 1)
        status, _, _ = self.http(b"/v1?x=1", UPGRADE_HEADERS, host="192.0.2.8")
        self.assertEqual(status, 101)
        self.clock.advance(int(headers["retry-after"]))
        status, _, _ = self.http(b"/v1?x=1", UPGRADE_HEADERS)
        self.assertEqual(status, 101)

    def test_not_found(self) -> None:
        """
        Unknown paths, at the root and under C{/v1}, get a JSON 404.
        """
        for path in (b"/nope", b"/v1/nope", b"/"):
            status, headers, body = self.http(path)
            self.assertEqual(status, 404, path)
            self.assertEqual(headers["content-type"], "application/json")
            self.assertEqual(json.loads(body), {"error": "not_found", "message": "no such endpoint"})

    def test_probes(self) -> None:
        """
        C{/healthz} is always 200; C{/readyz} follows readiness.
        """
        self.assertEqual(self.http(b"/healthz")[0], 200)
        self.assertEqual(self.http(b"/readyz")[0], 200)
        self.ready = False
        self.assertEqual(self.http(b"/readyz")[0], 503)
        self.assertEqual(self.http(b"/healthz")[0], 200)

    def test_websocket(self) -> None:
        """
        A WebSocket client upgrading at C{/v1} through the site gets its
        welcome and can talk.
        """
        client_factory = WebSocketClientFactory("ws://localhost/v1?token=" + self.token("alice"))
        client_factory.protocol = RecordingClient
        client = client_factory.buildProtocol(CLIENT_ADDRESS)
        _, _, pump = self.connect(client)
        self.assertEqual(client.received[0]["peerId"], "alice")
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual(client.received[-1], {"type": "pong"})
        client.sendClose(1000)
        pump.flush()
        self.assertEqual(self.hub.connection_count, 0)
