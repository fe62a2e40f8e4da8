"""
Tests for L{meteredrt.site}: the whole C{Site} over L{twisted.test.iosim},
raw HTTP for the refusals before the upgrade and a real Autobahn client for
the upgrade itself.
"""

from __future__ import annotations

import gc
import json
import weakref
from functools import partial
from io import StringIO
from ipaddress import ip_network
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.protocols.policies import WrappingFactory
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from meteredrt.guard import ConnectionCap, GuardedSite
from meteredrt.site import MAX_BODY_BYTES, BoundedRequest, V1Resource, access_log_line, build_root
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


def connect_to_site(site: Site, client: Any, clock: Clock, host: str = "192.0.2.7") -> Any:
    """
    Connect C{client} to C{site} over iosim as if from C{host}.
    """
    address = IPv4Address("TCP", host, 50000)
    return connectedServerAndClient(
        lambda: site.buildProtocol(address),
        lambda: client,
        serverTransportFactory=lambda protocol: FakeTransport(protocol, True, peerAddress=address),
        clock=clock,
    )


class SiteTests(WebSocketTestCase):
    """
    The C{/v1} resource and the JSON root.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ready = True
        self.v1 = V1Resource(self.factory, self.clock)
        self.site = self.make_site(build_root(self.v1, lambda: self.ready))

    def make_site(self, root: Resource) -> Site:
        """
        The site under test, serving C{root}.
        """
        return Site(root, reactor=Clock())

    def connect(self, client: Any, host: str = "192.0.2.7") -> Any:
        """
        Connect C{client} to the site from C{host} and run the exchange.
        """
        return connect_to_site(self.site, client, self.clock, host)

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

    def test_upgraded_request_freed(self) -> None:
        """
        Once the WebSocket has taken the connection over, the HTTP request
        is freed by reference counting alone: the channel, which lives on
        under the connection, no longer holds it, so the handshake leaves
        no cycle for the garbage collector.
        """
        requests: list[weakref.ref[Request]] = []

        class TrackedRequest(Request):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                requests.append(weakref.ref(self))

        self.site.requestFactory = TrackedRequest
        gc.disable()
        self.addCleanup(gc.enable)
        client = RawClient(b"GET /v1?token=secret HTTP/1.1\r\nHost: localhost\r\n" + UPGRADE_HEADERS + b"\r\n")
        self.connect(client)
        self.assertEqual(client.response()[0], 101)
        self.assertEqual([request() for request in requests], [None])

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

    def test_handshake_refused_by_autobahn(self) -> None:
        """
        An upgrade that Autobahn cannot accept (no C{Sec-WebSocket-Key}) is
        answered 400 by Autobahn, and no connection reaches the hub.
        """
        headers = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        status, _, _ = self.http(b"/v1?token=" + self.token("alice").encode(), headers)
        self.assertEqual(status, 400)
        self.assertEqual(self.hub.connection_count, 0)

    def test_upgrade_rate_counted_once(self) -> None:
        """
        Each upgrade refused for its address's rate is counted once.
        """
        for _ in range(60):
            self.http(b"/v1?x=1", UPGRADE_HEADERS)
        self.assertEqual(self.metrics.drops["upgrade_rate"], 0)
        self.assertEqual(self.http(b"/v1?x=1", UPGRADE_HEADERS)[0], 429)
        self.assertEqual(self.http(b"/v1?x=1", UPGRADE_HEADERS)[0], 429)
        self.assertEqual(self.metrics.drops["upgrade_rate"], 2)

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


class TrustedProxySiteTests(WebSocketTestCase):
    """
    Behind trusted proxies the per-IP upgrade limit and the access log go by
    the client named in C{X-Forwarded-For}; from anyone else the header is
    ignored.
    """

    trusted = (ip_network("10.0.0.0/8"), ip_network("::1"))

    def setUp(self) -> None:
        super().setUp()
        self.v1 = V1Resource(self.factory, self.clock, trusted_proxies=self.trusted)
        self.site = self.make_site(
            build_root(self.v1, lambda: True),
            reactor=Clock(),
            logFormatter=partial(access_log_line, trusted_proxies=self.trusted),
        )
        self.log = StringIO()
        self.site.logFile = self.log

    def make_site(self, root: Resource, **kwargs: Any) -> Site:
        """
        The site under test, serving C{root}.
        """
        return Site(root, **kwargs)

    def upgrade(self, host: str, forwarded_for: str | None = None, headers: bytes = UPGRADE_HEADERS) -> int:
        """
        Send one upgrade request from C{host} and return its status.
        """
        if forwarded_for is not None:
            headers += b"X-Forwarded-For: " + forwarded_for.encode("ascii") + b"\r\n"
        client = RawClient(b"GET /v1?token=secret HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
        connect_to_site(self.site, client, self.clock, host)
        return client.response()[0]

    def test_clients_behind_proxy_have_own_buckets(self) -> None:
        """
        Two clients behind one trusted proxy each get the full 60 upgrades;
        the 61st of one is refused while the other still gets in.
        """
        for _ in range(60):
            self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.1"), 101)
            self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.2"), 101)
        self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.1"), 429)
        self.assertEqual(self.upgrade("10.0.0.6", "203.0.113.9, 10.0.0.5"), 101)

    def test_proxy_itself_has_own_bucket(self) -> None:
        """
        Requests through the proxy do not use up the proxy address's own
        bucket.
        """
        for _ in range(60):
            self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.1"), 101)
        self.assertEqual(self.upgrade("10.0.0.5"), 101)

    def test_spoofing_untrusted_peer(self) -> None:
        """
        From a peer that is not a trusted proxy, a different
        C{X-Forwarded-For} on every attempt does not dodge the limit.
        """
        for n in range(60):
            self.assertEqual(self.upgrade("192.0.2.7", f"198.51.100.{n}"), 101)
        self.assertEqual(self.upgrade("192.0.2.7", "198.51.100.200"), 429)
        self.assertEqual(self.upgrade("192.0.2.7"), 429)

    def test_spoofing_through_proxy(self) -> None:
        """
        Through a trusted proxy, what the client itself wrote to the left of
        the address the proxy appended does not dodge the limit.
        """
        for n in range(60):
            self.assertEqual(self.upgrade("10.0.0.5", f"198.51.100.{n}, 192.0.2.7"), 101)
        self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.200, 192.0.2.7"), 429)

    def test_access_log(self) -> None:
        """
        The access log names the client behind a trusted proxy, the peer
        otherwise, and never the query string.
        """
        # A completed upgrade hands the connection to Autobahn and is never
        # logged; a refused one is.
        self.upgrade("10.0.0.5", "6.6.6.6, 198.51.100.1", headers=b"")
        self.upgrade("192.0.2.7", "198.51.100.1", headers=b"")
        first, second = self.log.getvalue().splitlines()
        self.assertTrue(first.startswith('"198.51.100.1" - - '), first)
        self.assertTrue(second.startswith('"192.0.2.7" - - '), second)
        for line in (first, second):
            self.assertIn('"GET /v1 HTTP/1.1" 426', line)
            self.assertNotIn("secret", line)
            self.assertNotIn("6.6.6.6", line)


class GuardedSiteTests(WebSocketTestCase):
    """
    The site as L{meteredrt.tap} composes it: L{GuardedSite} behind a
    L{ConnectionCap} of two connections per client, with a trusted proxy.
    """

    trusted = (ip_network("10.0.0.0/8"),)

    def setUp(self) -> None:
        super().setUp()
        self.v1 = V1Resource(self.factory, self.clock, trusted_proxies=self.trusted)
        self.site = self.make_site(build_root(self.v1, lambda: True))
        self.cap = ConnectionCap(self.site, 2, self.trusted)
        self.pumps: dict[RawClient, Any] = {}

    def make_site(self, root: Resource) -> GuardedSite:
        """
        The site under test, serving C{root}.
        """
        return GuardedSite(root, request_timeout=5.0, reactor=self.clock)

    def upgrade(self, host: str, forwarded_for: str) -> RawClient:
        """
        Send one upgrade request from C{host} for C{forwarded_for}; the
        connection stays open.
        """
        headers = UPGRADE_HEADERS + b"X-Forwarded-For: " + forwarded_for.encode("ascii") + b"\r\n"
        client = RawClient(
            b"GET /v1?token=" + self.token("p").encode() + b" HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n"
        )
        _, _, self.pumps[client] = connect_to_site(self.cap, client, self.clock, host)  # type: ignore[arg-type]
        return client

    def test_forwarded_client_capped(self) -> None:
        """
        Behind a trusted proxy, a client's WebSockets count against the cap
        by its forwarded address: the third is refused with 429 and a
        message, another client still gets in, and a closed connection
        makes room.
        """
        first, second = self.upgrade("10.0.0.5", "198.51.100.1"), self.upgrade("10.0.0.5", "198.51.100.1")
        self.assertEqual([first.response()[0], second.response()[0]], [101, 101])
        refused = self.upgrade("10.0.0.6", "198.51.100.1")
        status, headers, body = refused.response()
        self.assertEqual(status, 429)
        self.assertEqual(json.loads(body)["error"], "too_many_connections")
        self.assertIn("2 connections", json.loads(body)["message"])
        self.assertEqual(self.factory.metrics.drops["connection_cap"], 1)
        self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.2").response()[0], 101)
        first.transport.loseConnection()
        self.pumps[first].flush()
        self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.1").response()[0], 101)

    def test_cap_refusal_takes_one_upgrade_token(self) -> None:
        """
        An upgrade refused for the client's connection cap uses up one of
        its upgrades, as any upgrade attempt does, and only one.
        """
        self.v1 = V1Resource(self.factory, self.clock, upgrades_per_minute=3, trusted_proxies=self.trusted)
        self.cap = ConnectionCap(self.make_site(build_root(self.v1, lambda: True)), 1, self.trusted)
        self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.1").response()[0], 101)
        for _ in range(2):
            status, _, body = self.upgrade("10.0.0.5", "198.51.100.1").response()
            self.assertEqual((status, json.loads(body)["error"]), (429, "too_many_connections"))
        self.assertEqual(self.upgrade("10.0.0.5", "198.51.100.1").response()[:3:2], (429, b""))

    def test_websocket_outlives_deadline(self) -> None:
        """
        The request deadline ends with the upgrade: a WebSocket stays open
        long past it.
        """
        client_factory = WebSocketClientFactory("ws://localhost/v1?token=" + self.token("alice"))
        client_factory.protocol = RecordingClient
        client = client_factory.buildProtocol(CLIENT_ADDRESS)
        _, _, pump = connect_to_site(self.cap, client, self.clock)  # type: ignore[arg-type]
        self.assertEqual(client.received[0]["type"], "welcome")
        self.advance(60, pump)
        self.assertIsNone(client.closed)
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual(client.received[-1], {"type": "pong"})
        client.sendClose(1000)
        pump.flush()
        self.assertEqual(self.cap.counts.count("192.0.2.7"), 0)


def track_requests(site: Site) -> list[weakref.ref[Request]]:
    """
    Make C{site} record every request it builds; return the record.
    """
    requests: list[weakref.ref[Request]] = []

    class TrackedRequest(site.requestFactory):  # type: ignore[name-defined,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            requests.append(weakref.ref(self))

    site.requestFactory = TrackedRequest
    return requests


class TwoPieceClient(RawClient):
    """
    Sends its request in two writes, the second when L{finish} is called.
    """

    def __init__(self, request: bytes, split: int) -> None:
        super().__init__(request[:split])
        self.rest = request[split:]

    def finish(self) -> None:
        self.transport.write(self.rest)


class DirectSiteTests(SiteTests):
    """
    L{SiteTests} again, on a L{GuardedSite} that offers each connection's
    first bytes to L{V1Resource.upgrade_directly}: a plain upgrade reaches
    Autobahn without C{twisted.web}, and everything else (including every
    refusal) goes through C{twisted.web} as before.
    """

    def make_site(self, root: Resource) -> Site:
        site = GuardedSite(root, reactor=Clock(), direct_upgrade=self.v1.upgrade_directly)
        self.requests = track_requests(site)
        return site

    def plain_upgrade(self, peer_id: str = "alice") -> bytes:
        return (
            b"GET /v1?token="
            + self.token(peer_id).encode()
            + b" HTTP/1.1\r\nHost: localhost\r\n"
            + UPGRADE_HEADERS
            + b"\r\n"
        )

    def test_upgraded_request_freed(self) -> None:
        """
        A plain upgrade makes no C{Request} at all (in place of the base
        test: this site's requests are not freed but never made).
        """
        client = RawClient(self.plain_upgrade())
        self.connect(client)
        self.assertEqual(client.response()[0], 101)
        self.assertEqual(self.requests, [])

    def test_websocket_without_twisted_web(self) -> None:
        """
        An Autobahn client's upgrade is served without a C{Request}, gets
        its welcome and can talk.
        """
        self.test_websocket()
        self.assertEqual(self.requests, [])

    def test_under_wrapper(self) -> None:
        """
        Under a protocol wrapper (as under TLS without a connection cap)
        the WebSocket takes the wrapper's place above the transport.
        """
        wrapped = WrappingFactory(self.site)
        client_factory = WebSocketClientFactory("ws://localhost/v1?token=" + self.token("alice"))
        client_factory.protocol = RecordingClient
        client = client_factory.buildProtocol(CLIENT_ADDRESS)
        _, _, pump = connect_to_site(wrapped, client, self.clock)  # type: ignore[arg-type]
        self.assertEqual(client.received[0]["peerId"], "alice")
        self.assertEqual(self.requests, [])
        client.sendClose(1000)
        pump.flush()
        self.assertEqual(self.hub.connection_count, 0)

    def test_split_head(self) -> None:
        """
        A head that arrives in two pieces is parsed by C{twisted.web}, and
        upgraded as before.
        """
        client = TwoPieceClient(self.plain_upgrade(), 20)
        _, _, pump = self.connect(client)
        client.finish()
        pump.flush()
        self.assertEqual(client.response()[0], 101)
        self.assertEqual(len(self.requests), 1)
        self.assertEqual(self.hub.connection_count, 1)

    def test_bytes_after_head(self) -> None:
        """
        Bytes after the head in the same read (pipelined garbage, a frame
        sent before the answer) send the request through C{twisted.web},
        which upgrades it and drops them, as before.
        """
        for extra in (b"garbage", b"\x81\x85abcd12345", b"GET / HTTP/1.1\r\n\r\n"):
            client = RawClient(self.plain_upgrade() + extra)
            _, _, pump = self.connect(client)
            pump.flush()
            status, _, body = client.response()
            self.assertEqual(status, 101)
            self.assertTrue(body.startswith(b"\x81"), body)
            self.assertEqual(body.count(b"\x81"), 1, body)
        self.assertEqual(len(self.requests), 3)
        self.assertEqual(self.hub.connection_count, 3)


class DirectTrustedProxySiteTests(TrustedProxySiteTests):
    """
    L{TrustedProxySiteTests} with plain upgrades served straight to
    Autobahn.
    """

    def make_site(self, root: Resource, **kwargs: Any) -> Site:
        return GuardedSite(root, direct_upgrade=self.v1.upgrade_directly, **kwargs)


class DirectGuardedSiteTests(GuardedSiteTests):
    """
    L{GuardedSiteTests} with plain upgrades served straight to Autobahn, as
    L{meteredrt.tap} composes the site.
    """

    def make_site(self, root: Resource) -> GuardedSite:
        return GuardedSite(root, request_timeout=5.0, reactor=self.clock, direct_upgrade=self.v1.upgrade_directly)

    def test_partial_head_meets_deadline(self) -> None:
        """
        A connection whose first bytes are part of a head is left to the
        request deadline: 408 once it runs out.
        """
        client = RawClient(b"GET /v1?token=x HTTP/1.1\r\nHost: localhost\r\n")
        _, _, pump = connect_to_site(self.cap, client, self.clock)  # type: ignore[arg-type]
        self.advance(4, pump)
        self.assertEqual(client.data, b"")
        self.advance(1, pump)
        self.assertEqual(client.response()[0], 408)


class _BodyProbe(Resource):
    """
    Records what a request kept of its body.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def render_POST(self, request: Request) -> bytes:
        assert isinstance(request, BoundedRequest)
        self.seen.append((len(request.content.getvalue()), request.body_length))
        return b"ok"


class BoundedRequestTests(SynchronousTestCase):
    """
    L{BoundedRequest} never keeps more of a body than a resource accepts.
    """

    def post(self, site: Site, size: int) -> RawClient:
        body = b"x" * size
        client = RawClient(
            b"POST /probe HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size + body
        )
        _, _, pump = connect_to_site(site, client, Clock())
        pump.flush()
        return client

    def probe_site(self, request_factory: type[Request]) -> tuple[Site, _BodyProbe]:
        probe = _BodyProbe()
        root = Resource()
        root.putChild(b"probe", probe)
        return Site(root, requestFactory=request_factory, reactor=Clock()), probe

    def test_large_body_not_kept(self) -> None:
        """
        A 1 MiB body is counted in full but only one byte over the cap is
        kept, in memory, so the resource can still answer 413.
        """
        site, probe = self.probe_site(BoundedRequest)
        client = self.post(site, 1024 * 1024)
        self.assertEqual(probe.seen, [(MAX_BODY_BYTES + 1, 1024 * 1024)])
        self.assertEqual(client.response()[0], 200)

    def test_small_body_kept(self) -> None:
        """
        A body within the cap is kept whole.
        """
        site, probe = self.probe_site(BoundedRequest)
        self.post(site, 100)
        self.assertEqual(probe.seen, [(100, 100)])

    def test_huge_body_drops_connection(self) -> None:
        """
        Past the abort limit the connection is dropped without an answer.
        """

        class Small(BoundedRequest):
            abort_after = 64 * 1024

        site, probe = self.probe_site(Small)
        client = self.post(site, 200 * 1024)
        self.assertEqual((probe.seen, client.data), ([], b""))
