"""
What every connection meets before any resource sees it: a deadline for
its HTTP request and a cap on connections per client address, the two
defences against clients that hold connections instead of using them
(slowloris).

L{DeadlineChannel} gives a client C{request_timeout} seconds to send a
whole request, headers and body, counted from the moment it connects or
its previous response ended. Twisted's own C{timeOut} is an idle timeout,
reset by every byte, so a client sending one byte every few seconds would
hold a connection for hours. A request cut off half-way is answered 408
with a JSON body; a connection idle between requests is closed silently.
A WebSocket upgrade is a complete request, so the deadline ends there and
Autobahn's opening-handshake timeout takes over.

A L{GuardedSite} may be given a C{direct_upgrade}: each connection's first
bytes are offered to it before C{twisted.web} parses them, and when it
takes them (a plain WebSocket upgrade, L{meteredrt.upgradehead}) it hands
the connection to a WebSocket protocol with L{DeadlineChannel.hand_over};
C{twisted.web} never sees that connection. Whatever it declines, it leaves
untouched, and the channel goes on as if it had not been asked.

L{ConnectionCap} wraps the site's factory and counts open TCP connections
per client address (L{meteredrt.clientaddress.rate_limit_key}: IPv6 by
its /64); one over the cap is closed as soon as it is accepted, before a
byte is read. Peers in C{trusted_proxies} are not counted at this level:
every client of a reverse proxy arrives from the proxy's address. Their
clients are counted by the address the proxy vouches for once the request
headers are read, by L{hold_client}, which the C{/v1} resource calls for
WebSocket upgrades (the connections that last); the count is released
when the TCP connection closes, whichever protocol owns it by then.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from meteredrt.clientaddress import TrustedProxies, is_trusted_proxy, rate_limit_key
from meteredrt.metrics import Metrics


class ConnectionCounts:
    """
    Open connections per client key, each key capped at C{per_client}.

    Pure bookkeeping: a key is in the table only while it holds a
    connection, so memory follows the open connections.
    """

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """
        Count one more connection for C{key}, unless it is at the cap.
        """
        if not self.has_room(key):
            return False
        self._open[key] = self._open.get(key, 0) + 1
        return True

    def has_room(self, key: str) -> bool:
        """
        Whether C{key} may hold one more connection.
        """
        return self._open.get(key, 0) < self.per_client

    def release(self, key: str) -> None:
        """
        Count one connection of C{key} less.
        """
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def count(self, key: str) -> int:
        """
        The connections C{key} holds now.
        """
        return self._open.get(key, 0)


_CONNECTION_DONE = Failure(ConnectionDone())


class CountedConnection(ProtocolWrapper):
    """
    One accepted connection: releases the counts it holds when it closes.

    It sits between the transport and the protocol for what comes in (data
    and the end of the connection) but hands the protocol the transport
    itself, so that writes, the hot path, cost nothing extra and the
    protocol sees the real TCP or TLS transport. It is a
    C{ProtocolWrapper} so that Autobahn's C{WebSocketResource}, taking a
    plain TCP connection over, puts the WebSocket protocol under it
    rather than in its place; under TLS, L{take_over} puts it back.
    """

    factory: ConnectionCap

    def __init__(self, factory: ConnectionCap, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self.held: list[str] = []

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        if isinstance(self.wrappedProtocol, DeadlineChannel):
            self.wrappedProtocol.counted = self
        self.wrappedProtocol.makeConnection(transport)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        held, self.held = self.held, []
        for key in held:
            self.factory.counts.release(key)
        wrapped: Any = self.wrappedProtocol
        # Breaks the reference cycle, as ProtocolWrapper does.
        self.wrappedProtocol = None  # type: ignore[assignment]
        if wrapped is not None:
            wrapped.connectionLost(reason)


class ConnectionCap(WrappingFactory[CountedConnection]):
    """
    Wraps a factory (the site) and refuses a connection from a client
    address that already holds C{counts.per_client} of them, by closing it
    at once.
    """

    protocol = CountedConnection

    def __init__(
        self,
        wrappedFactory: Any,
        per_client: int,
        trusted_proxies: TrustedProxies = (),
        metrics: Metrics | None = None,
    ) -> None:
        """
        :param metrics: where refusals are counted (the C{connection_cap}
            drop reason); a refusal is not logged, or a flood of connects
            would flood the log too.
        """
        super().__init__(wrappedFactory)
        self.counts = ConnectionCounts(per_client)
        self.trusted_proxies = trusted_proxies
        self.metrics = metrics if metrics is not None else Metrics()

    def buildProtocol(self, addr: IAddress | None) -> CountedConnection | None:  # type: ignore[override]
        host = getattr(addr, "host", None)
        # A UNIX socket has no address to count; a trusted proxy's clients
        # are counted by hold_client.
        key = None if not host or is_trusted_proxy(host, self.trusted_proxies) else rate_limit_key(host)
        if key is not None and not self.counts.acquire(key):
            self.metrics.drops["connection_cap"] += 1
            # Twisted closes a connection whose factory builds no protocol.
            return None
        protocol: CountedConnection | None = super().buildProtocol(addr)
        if key is not None:
            if protocol is None:
                self.counts.release(key)
            else:
                protocol.held.append(key)
        return protocol


def hold_client(request: http.Request, client: str) -> bool:
    """
    Count the connection that carries C{request} against C{client} (the
    address a trusted proxy forwards for) until it closes.

    @return: C{False} if C{client} is at the cap: refuse the request. C{True}
        when counted, or when the connection is not behind a
        L{ConnectionCap} (nothing to count against).
    """
    return hold_on(_counted(request), client)


def can_hold(connection: CountedConnection | None, client: str) -> bool:
    """
    Whether L{hold_on} would count C{connection} against C{client}, without
    counting it.
    """
    if connection is None:
        return True
    key = rate_limit_key(client)
    return key in connection.held or connection.factory.counts.has_room(key)


def hold_on(connection: CountedConnection | None, client: str) -> bool:
    """
    L{hold_client} for a connection rather than a request.
    """
    if connection is None:
        return True
    key = rate_limit_key(client)
    if key in connection.held:
        return True
    if not connection.factory.counts.acquire(key):
        return False
    connection.held.append(key)
    return True


def connection_cap(request: http.Request) -> int | None:
    """
    The per-client cap of the L{ConnectionCap} that accepted C{request}'s
    connection, if one did.
    """
    connection = _counted(request)
    return None if connection is None else connection.factory.counts.per_client


def _counted(request: http.Request) -> CountedConnection | None:
    return getattr(request.channel, "counted", None)


def take_over(request: http.Request, render: Callable[[http.Request], Any]) -> Any:
    """
    Let C{render} (Autobahn's C{WebSocketResource.render}) take the
    request's connection over, and keep the connection counted until it
    closes.

    Under TLS, Autobahn makes the WebSocket protocol the TLS layer's own
    protocol, in place of the L{CountedConnection} that would release the
    count; this puts it back in between.

    Once the WebSocket has the connection, the HTTP channel forgets the
    request it will never finish. Request and channel refer to each other,
    and that cycle, with the request's headers, address and body buffer
    (about 27 objects), was left to the garbage collector on every
    connection: collecting it, and the full collections that the
    promoted leftovers brought forward, cost more than any other step of a
    connect.
    """
    counted = _counted(request)
    channel = request.channel
    transport = channel.transport if channel is not None else None
    result = render(request)
    if channel is not None and transport is not None and channel.transport is None:
        channel.requests.clear()
    if (
        counted is not None
        and isinstance(transport, ProtocolWrapper)
        and transport.wrappedProtocol is not counted
        and counted.wrappedProtocol is not None
    ):
        counted.wrappedProtocol = transport.wrappedProtocol
        transport.wrappedProtocol = counted
    return result


#: Sent to a client whose request did not arrive in time.
_TIMEOUT_HEAD = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    b"Cache-Control: no-store\r\n"
    b"Connection: close\r\n"
)


class DeadlineChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that gives each request C{request_timeout} seconds
    to arrive in full (see the module docstring).
    """

    request_timeout: float = 15.0
    #: What counts this connection, if anything does.
    counted: CountedConnection | None = None
    site: GuardedSite
    _deadline: IDelayedCall | None = None
    _receiving = False
    #: Until the connection's first bytes have arrived.
    _fresh = True

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._receiving = False
        self._deadline = self.callLater(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self._fresh:
            self._fresh = False
            direct = self.site.direct_upgrade
            if direct is not None and direct(self, data):
                return
        self._receiving = True
        super().dataReceived(data)

    def hand_over(self, protocol: Any) -> Any:
        """
        Give this channel's connection to C{protocol} before any request
        was parsed: what C{WebSocketResource} does for a parsed upgrade,
        keeping the L{CountedConnection} in between as L{take_over} does.

        @return: the transport C{protocol} is now connected to.
        """
        transport: Any = self.transport
        self._disarm()
        self.setTimeout(None)
        self.transport = None
        counted = self.counted
        if counted is not None:
            counted.wrappedProtocol = protocol
        elif isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol  # TLS without a cap
        elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def allContentReceived(self) -> None:
        # The request is in; how long answering it takes is not the
        # client's doing (Twisted suspends its idle timeout here too).
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Armed first: a pipelined request already buffered is parsed in
        # requestDone and disarms it again once complete.
        if self.persistent:
            self._arm()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is None:
            return  # handed over to another protocol
        if self._receiving:
            seconds = f"{self.request_timeout:g}"
            body = json.dumps(
                {"error": "request_timeout", "message": f"the request did not arrive within {seconds} seconds"},
                separators=(",", ":"),
            ).encode()
            self.transport.write(_TIMEOUT_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        # Closes after the write, and aborts abortTimeout seconds later if
        # the client does not read.
        self.timeoutConnection()


class GuardedSite(Site):
    """
    A C{Site} whose channels are L{DeadlineChannel}s (HTTP/1.1 only).

    @ivar direct_upgrade: offered each connection's first bytes with its
        channel; returns whether it took the connection over (see the
        module docstring).
    """

    protocol = DeadlineChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        request_timeout: float = 15.0,
        direct_upgrade: Callable[[DeadlineChannel, bytes], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.request_timeout = request_timeout
        self.direct_upgrade = direct_upgrade

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel = super().buildProtocol(addr)
        channel.request_timeout = self.request_timeout
        return channel
