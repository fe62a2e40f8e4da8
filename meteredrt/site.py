"""
The HTTP resource tree that one C{Site} serves on every listening port.

C{/v1} is both the WebSocket endpoint and the REST base (§2, §19):
L{V1Resource} hands a bare C{/v1} upgrade to Autobahn's
C{WebSocketResource} after the pre-upgrade checks (drain, per-IP upgrade
rate, §5.2) and routes every longer path to its REST children; a plain
upgrade that passes those checks goes to Autobahn before C{twisted.web}
parses it at all (L{V1Resource.upgrade_directly}). C{/healthz}
and C{/readyz} serve load balancers. L{client_host} is the one way to ask
which address a request counts as coming from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from io import BytesIO
from typing import cast

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from meteredrt.clientaddress import TrustedProxies, client_address, is_trusted_proxy, rate_limit_key
from meteredrt.guard import DeadlineChannel, can_hold, connection_cap, hold_client, hold_on, take_over
from meteredrt.ratelimit import KeyedLimiter
from meteredrt.upgradehead import plain_upgrade
from meteredrt.ws import RealtimeServerFactory

#: REST request bodies are capped at this many bytes (§19.1: 413 above).
MAX_BODY_BYTES = 32 * 1024


class BoundedRequest(Request):
    """
    A request that keeps at most one byte more of its body than any
    resource accepts, in memory.

    Twisted buffers a whole body before a resource sees it, spooling large
    ones to a temporary file with blocking writes; a hostile upload would
    cost memory or disk and block the reactor before the 413. Here the
    excess is counted and dropped instead, so the resource still answers a
    proper 413, and a body past L{abort_after} bytes drops the connection.
    """

    keep = MAX_BODY_BYTES + 1
    abort_after = 16 * 1024 * 1024

    body_length = 0
    dropped = False
    _kept: BytesIO

    def gotLength(self, length: int | None) -> None:
        self.content = self._kept = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.dropped:
            return
        self.body_length += len(data)
        room = self.keep - self._kept.tell()
        if room > 0:
            self._kept.write(data[:room])
        if self.body_length > self.abort_after:
            self.dropped = True
            transport = self.channel.transport if self.channel is not None else None
            if transport is not None:
                cast(ITCPTransport, transport).abortConnection()

    def process(self) -> None:
        # Bytes already read in the same chunk may complete a dropped request.
        if not self.dropped:
            super().process()


def client_host(request: Request, trusted_proxies: TrustedProxies = ()) -> str:
    """
    The address a request counts as coming from, for per-IP limits and the
    access log: the TCP peer, or the client named in C{X-Forwarded-For}
    when the peer is one of C{trusted_proxies}
    (L{meteredrt.clientaddress.client_address}). C{-} when the peer has no
    IP address (a UNIX socket).
    """
    peer_host = getattr(request.getClientAddress(), "host", None) or "-"
    if not trusted_proxies:
        return peer_host
    headers = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    # latin-1 decodes any bytes; what is not an address is refused later.
    forwarded_for = None if headers is None else [value.decode("latin-1") for value in headers]
    return client_address(peer_host, forwarded_for, trusted_proxies)


def json_response(request: Request, status: int, body: dict | None) -> bytes:
    """
    Set a JSON response's status and headers; return its body.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return b"" if body is None else json.dumps(body, separators=(",", ":")).encode("utf-8")


def error_body(code: str, message: str) -> dict:
    """
    The REST error envelope of §19.1.
    """
    return {"error": code, "message": message}


class NotFound(Resource):
    """
    A JSON 404 for unknown paths: no Twisted error page reaches a client.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return json_response(request, 404, error_body("not_found", "no such endpoint"))


class JsonRoot(Resource):
    """
    A resource whose unknown children answer with the JSON 404.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()

    def render(self, request: Request) -> bytes | int:
        return json_response(request, 404, error_body("not_found", "no such endpoint"))


class V1Resource(JsonRoot):
    """
    C{/v1}: the WebSocket upgrade at exactly this path, REST below it.

    @param trusted_proxies: the proxies whose C{X-Forwarded-For} names the
        client that the upgrade limit counts (L{client_host}).
    """

    def __init__(
        self,
        factory: RealtimeServerFactory,
        clock: IReactorTime,
        upgrades_per_minute: int = 60,
        trusted_proxies: TrustedProxies = (),
    ) -> None:
        super().__init__()
        self._websocket = WebSocketResource(factory)
        self._factory = factory
        self._clock = clock
        self._upgrades = KeyedLimiter(upgrades_per_minute, upgrades_per_minute / 60.0)
        self._trusted_proxies = trusted_proxies

    def render(self, request: Request) -> bytes | int:
        upgrade = (request.getHeader("upgrade") or "").lower()
        if upgrade != "websocket":
            request.setHeader(b"upgrade", b"websocket")
            body = json_response(request, 426, error_body("invalid_request", "this endpoint needs a WebSocket upgrade"))
            request.setResponseCode(426, b"Upgrade Required")
            return body
        if self._factory.draining:
            request.setHeader(b"retry-after", b"1")
            return json_response(request, 503, error_body("internal_error", "server is shutting down"))
        client = client_host(request, self._trusted_proxies)
        host = rate_limit_key(client)
        now = self._clock.seconds()
        if not self._upgrades.take(host, now):
            self._factory.metrics.drops["upgrade_rate"] += 1
            retry = max(1, int(self._upgrades.retry_after(host, now) + 0.999))
            request.setHeader(b"retry-after", str(retry).encode())
            return json_response(request, 429, None)
        # A trusted proxy's connections are not counted when accepted (all
        # its clients share its address); the WebSocket counts against the
        # client the proxy names, from now until it closes.
        peer = getattr(request.getClientAddress(), "host", None)
        if peer is not None and is_trusted_proxy(peer, self._trusted_proxies) and not hold_client(request, client):
            self._factory.metrics.drops["connection_cap"] += 1
            request.setHeader(b"retry-after", b"10")
            cap = connection_cap(request)
            return json_response(
                request,
                429,
                error_body("too_many_connections", f"at most {cap} connections per client address"),
            )
        return take_over(request, self._websocket.render)

    def upgrade_directly(self, channel: DeadlineChannel, data: bytes) -> bool:
        """
        Give a connection whose first bytes C{data} are a plain upgrade
        (L{meteredrt.upgradehead}) to Autobahn straight, when L{render}
        would: not draining, within the address's upgrade rate and, behind
        a trusted proxy, within the client's connection cap. Autobahn
        reads the same bytes that C{render} would have handed it.

        Anything else is declined, before any count is taken, so that
        C{twisted.web} can parse the request and L{render} refuse it with
        its usual status, headers and counters. (An address over its
        upgrade rate is asked twice at the same instant: a refused take
        takes nothing.)

        @return: whether the connection was taken over.
        """
        head = plain_upgrade(data)
        factory = self._factory
        if head is None or factory.draining:
            return False
        transport = channel.transport
        if transport is None:
            return False
        address = transport.getPeer()
        peer = getattr(address, "host", None)
        trusted = self._trusted_proxies
        if not trusted:
            client = peer or "-"
        else:
            forwarded_for = None if head.forwarded_for is None else [head.forwarded_for]
            client = client_address(peer or "-", forwarded_for, trusted)
        behind_proxy = peer is not None and is_trusted_proxy(peer, trusted)
        counted = channel.counted
        if behind_proxy and not can_hold(counted, client):
            return False
        if not self._upgrades.take(rate_limit_key(client), self._clock.seconds()):
            return False
        protocol = factory.buildProtocol(address)
        if protocol is None:
            return False
        if behind_proxy:
            hold_on(counted, client)
        channel.hand_over(protocol)
        protocol.dataReceived(data)
        return True


class Probe(Resource):
    """
    A load-balancer probe: 200 while C{healthy()} holds, else 503.
    """

    isLeaf = True

    def __init__(self, healthy: Callable[[], bool]) -> None:
        super().__init__()
        self._healthy = healthy

    def render_GET(self, request: Request) -> bytes:
        ok = self._healthy()
        return json_response(request, 200 if ok else 503, {"status": "ok" if ok else "unavailable"})


def access_log_line(timestamp: str, request: Request, trusted_proxies: TrustedProxies = ()) -> str:
    """
    The combined log format without the query string: C{?token=} carries a
    live credential, and access logs are not the place for it.

    The remote host is L{client_host}: behind C{trusted_proxies}, the
    client the limits counted rather than the proxy.
    """
    referrer = _escape(request.getHeader(b"referer") or b"-")
    agent = _escape(request.getHeader(b"user-agent") or b"-")
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        _escape(client_host(request, trusted_proxies)),
        timestamp,
        _escape(request.method),
        _escape(request.path),
        _escape(request.clientproto),
        request.code,
        request.sentLength or "-",
        referrer,
        agent,
    )


def _escape(value: bytes | str) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "backslashreplace")
    return repr(value)[1:-1].replace('"', '\\"')


def build_root(v1: V1Resource, ready: Callable[[], bool]) -> Resource:
    """
    The site root: C{/v1}, C{/healthz} (process up), C{/readyz} (stores
    reachable and not draining).
    """
    root = JsonRoot()
    root.putChild(b"v1", v1)
    root.putChild(b"healthz", Probe(lambda: True))
    root.putChild(b"readyz", Probe(ready))
    return root
