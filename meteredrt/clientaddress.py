"""
Which address a request comes from, behind trusted reverse proxies.

Behind a proxy every connection comes from the proxy's address, so per-IP
limits would put every client in one bucket. L{client_address} takes the
client from C{X-Forwarded-For} when, and only when, the TCP peer is a proxy
the operator trusts (C{[server] trusted_proxies}), walking the list from
the right: each trusted proxy appends the address it received the request
from, so the first untrusted address from the right is the last one a
trusted proxy vouched for. Whatever a client wrote further left is never
read.

Only C{X-Forwarded-For} is read, not C{Forwarded}: a proxy that maintains
one of them usually passes the other through from the client unchanged,
and reading both would let a client choose its address through whichever
one the proxy does not rewrite.

Per-IP rate limits key IPv6 clients by their /64 (L{rate_limit_key}): one
subscriber line or host is usually given a whole /64, so counting single
IPv6 addresses would hand it 2**64 separate budgets.

This module is pure: standard library only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

#: The networks whose peers may say, in C{X-Forwarded-For}, whom they
#: forward for.
TrustedProxies = tuple[IPv4Network | IPv6Network, ...]
#: How many client addresses' rate-limit keys L{rate_limit_key} remembers.
RATE_LIMIT_KEYS_CACHED = 4096


def client_address(peer_host: str, forwarded_for: Sequence[str] | None, trusted: TrustedProxies) -> str:
    """
    The address that a request counts as coming from.

    :param peer_host: the TCP peer's address as the transport reports it.
    :param forwarded_for: the values of every C{X-Forwarded-For} header of
        the request, in order (several headers are one comma-separated
        list), or ``None``.
    :param trusted: the networks of the trusted proxies.
    :return: ``peer_host`` unchanged unless the peer is trusted; otherwise
        the first address from the right of C{X-Forwarded-For} that is not
        trusted (the leftmost one if all are), in canonical form. An entry
        that is not an address ends the walk at ``peer_host``: nothing to
        its left can be vouched for.
    """
    if not trusted or not forwarded_for:
        return peer_host
    peer = _parse(peer_host)
    if peer is None or not _is_trusted(peer, trusted):
        return peer_host
    client: IPv4Address | IPv6Address | None = None
    for entry in _reversed_entries(forwarded_for):
        address = _parse_forwarded(entry)
        if address is None:
            return peer_host
        client = address
        if not _is_trusted(address, trusted):
            break
    return peer_host if client is None else str(client)


def is_trusted_proxy(peer_host: str, trusted: TrustedProxies) -> bool:
    """
    Whether the TCP peer C{peer_host} is one of the C{trusted} proxies.
    """
    if not trusted:
        return False
    peer = _parse(peer_host)
    return peer is not None and _is_trusted(peer, trusted)


@lru_cache(maxsize=RATE_LIMIT_KEYS_CACHED)
def rate_limit_key(address: str) -> str:
    """
    The bucket a per-IP rate limit counts a client address in.

    Asked twice per WebSocket connect (the connection cap, the upgrade
    limit) of the same few addresses, and parsing one with C{ipaddress}
    was ~2% of a connect's CPU: the answers for the most recent
    L{RATE_LIMIT_KEYS_CACHED} addresses are kept (a pure function of the
    text, so a cached answer is the answer).

    :param address: a client address as L{client_address} returns it.
    :return: for an IPv6 address, its /64 network (``2001:db8:1:2::/64``):
        a single host commonly holds a whole /64 and can pick any address
        in it. An IPv4-mapped IPv6 address counts as its IPv4 address. Any
        other text, an IPv4 address included, is returned unchanged.
    """
    parsed = _parse(address)
    if isinstance(parsed, IPv6Address):
        return f"{IPv6Address(int(parsed) >> 64 << 64)}/64"
    return address if parsed is None else str(parsed)


def _reversed_entries(headers: Sequence[str]) -> Iterator[str]:
    for header in reversed(headers):
        for entry in reversed(header.split(",")):
            entry = entry.strip()
            # HTTP list syntax allows empty elements; they mean nothing.
            if entry:
                yield entry


def _is_trusted(address: IPv4Address | IPv6Address, trusted: TrustedProxies) -> bool:
    return any(address in network for network in trusted)


def _parse(text: str) -> IPv4Address | IPv6Address | None:
    try:
        address = ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; they are
    # the IPv4 address for trust and for the bucket alike.
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_forwarded(entry: str) -> IPv4Address | IPv6Address | None:
    # Some proxies add the client's port: 1.2.3.4:5678 or [2001:db8::1]:5678.
    if entry.startswith("["):
        host, bracket, port = entry[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and _is_port(port[1:]))):
            return None
        # Brackets hold IPv6 only.
        return _parse(host) if ":" in host else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return _parse(host) if _is_port(port) else None
    return _parse(entry)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= 65535
