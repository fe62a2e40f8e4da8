"""
Tests for L{meteredrt.clientaddress}: which address a request counts as,
given the TCP peer, the C{X-Forwarded-For} headers and the trusted proxies.
"""

from __future__ import annotations

from ipaddress import ip_network

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.clientaddress import (
    RATE_LIMIT_KEYS_CACHED,
    TrustedProxies,
    client_address,
    is_trusted_proxy,
    rate_limit_key,
)

LOOPBACK: TrustedProxies = (ip_network("127.0.0.1"), ip_network("::1"))
INTERNAL: TrustedProxies = (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))


class ClientAddressTests(SynchronousTestCase):
    """
    L{client_address} walks C{X-Forwarded-For} from the right through
    trusted proxies only.
    """

    def assertClient(self, peer: str, forwarded_for: list[str] | None, trusted: TrustedProxies, expected: str) -> None:
        """
        The client address of a request from C{peer} with these headers is
        C{expected}.
        """
        self.assertEqual(client_address(peer, forwarded_for, trusted), expected, (peer, forwarded_for, trusted))

    def test_nobody_trusted(self) -> None:
        """
        With no trusted proxies the header is ignored: the peer is the client.
        """
        self.assertClient("127.0.0.1", ["1.2.3.4"], (), "127.0.0.1")
        self.assertClient("10.0.0.5", ["1.2.3.4"], (), "10.0.0.5")

    def test_untrusted_peer(self) -> None:
        """
        From a peer outside the trusted networks the header is ignored, so
        a client cannot choose its own address.
        """
        self.assertClient("192.0.2.7", ["1.2.3.4"], LOOPBACK, "192.0.2.7")
        self.assertClient("192.0.2.7", ["1.2.3.4"], INTERNAL, "192.0.2.7")

    def test_no_header(self) -> None:
        """
        A trusted peer without the header, or with an empty one, is the
        client.
        """
        self.assertClient("127.0.0.1", None, LOOPBACK, "127.0.0.1")
        self.assertClient("127.0.0.1", [], LOOPBACK, "127.0.0.1")
        self.assertClient("127.0.0.1", [""], LOOPBACK, "127.0.0.1")
        self.assertClient("127.0.0.1", [" , "], LOOPBACK, "127.0.0.1")

    def test_trusted_peer(self) -> None:
        """
        From a trusted peer the address it forwarded for is the client.
        """
        self.assertClient("127.0.0.1", ["1.2.3.4"], LOOPBACK, "1.2.3.4")
        self.assertClient("10.0.0.5", ["  198.51.100.9  "], INTERNAL, "198.51.100.9")

    def test_chain(self) -> None:
        """
        Walking from the right, trusted hops are skipped and the first
        untrusted address is the client; what the client wrote to the left
        of it does not count.
        """
        self.assertClient("10.0.0.9", ["evil, 1.2.3.4, 10.0.0.5"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["6.6.6.6, 1.2.3.4, 10.0.0.5"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["6.6.6.6, 1.2.3.4"], INTERNAL, "1.2.3.4")

    def test_all_trusted(self) -> None:
        """
        When every forwarded address is trusted, the leftmost is the client:
        a request from inside the proxy network.
        """
        self.assertClient("10.0.0.9", ["10.1.1.1, 10.0.0.5"], INTERNAL, "10.1.1.1")
        self.assertClient("127.0.0.1", ["127.0.0.1"], LOOPBACK, "127.0.0.1")

    def test_malformed_rightmost(self) -> None:
        """
        An entry that is not an address stops the walk at the peer: nothing
        to the left of it can be vouched for.
        """
        for header in ("garbage", "unknown", "1.2.3.4, garbage", "1.2.3.4, 10.0.0.5, 300.1.1.1", "1.2.3.4/32"):
            self.assertClient("10.0.0.9", [header], INTERNAL, "10.0.0.9")
        self.assertClient("10.0.0.9", ["1.2.3.4, \u00e9, 10.0.0.5"], INTERNAL, "10.0.0.9")

    def test_malformed_left_of_client(self) -> None:
        """
        A malformed entry left of the first untrusted address is never read.
        """
        self.assertClient("10.0.0.9", ["garbage, 1.2.3.4"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["1.2.3.4:80:90, 198.51.100.9, 10.0.0.5"], INTERNAL, "198.51.100.9")

    def test_empty_elements_skipped(self) -> None:
        """
        Empty list elements are ignored, as HTTP list syntax asks.
        """
        self.assertClient("10.0.0.9", ["1.2.3.4,, 10.0.0.5,"], INTERNAL, "1.2.3.4")

    def test_port(self) -> None:
        """
        An address with a port, as some proxies write it, counts as the
        address.
        """
        self.assertClient("10.0.0.9", ["1.2.3.4:5678"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["[2001:db8::1]:443"], INTERNAL, "2001:db8::1")
        self.assertClient("10.0.0.9", ["[2001:db8::1]"], INTERNAL, "2001:db8::1")
        self.assertClient("10.0.0.9", ["1.2.3.4, 10.0.0.5:8080"], INTERNAL, "1.2.3.4")
        for header in ("1.2.3.4:", "1.2.3.4:port", "[2001:db8::1", "[2001:db8::1]x", "[1.2.3.4]:80", "1.2.3.4:99999"):
            self.assertClient("10.0.0.9", [header], INTERNAL, "10.0.0.9")

    def test_ipv6(self) -> None:
        """
        IPv6 peers, proxies and clients work alike; the client address is
        written in its canonical form, so spellings share one bucket.
        """
        self.assertClient("::1", ["2001:db8::1"], LOOPBACK, "2001:db8::1")
        self.assertClient("::1", ["2001:DB8:0:0::1"], LOOPBACK, "2001:db8::1")
        self.assertClient("fd00::2", ["2001:db8::7, fd12::1"], INTERNAL, "2001:db8::7")
        self.assertClient("2001:db8::9", ["1.2.3.4"], LOOPBACK, "2001:db8::9")
        self.assertClient("10.0.0.9", ["2001:db8::1, 1.2.3.4"], INTERNAL, "1.2.3.4")

    def test_ipv4_mapped(self) -> None:
        """
        An IPv4 address written as IPv4-mapped IPv6, as a dual-stack socket
        reports its peers, is the IPv4 address: for trust and as the client.
        """
        self.assertClient("::ffff:10.0.0.5", ["1.2.3.4"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["::ffff:1.2.3.4"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["1.2.3.4, ::ffff:10.0.0.5"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["[::ffff:1.2.3.4]:80"], INTERNAL, "1.2.3.4")

    def test_several_headers(self) -> None:
        """
        Several C{X-Forwarded-For} headers are one list, in order.
        """
        self.assertClient("10.0.0.9", ["6.6.6.6", "1.2.3.4", "10.0.0.5"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["6.6.6.6, 1.2.3.4", "10.0.0.5, 10.0.0.6"], INTERNAL, "1.2.3.4")
        self.assertClient("10.0.0.9", ["1.2.3.4", "garbage"], INTERNAL, "10.0.0.9")

    def test_peer_not_an_address(self) -> None:
        """
        A peer that is not an IP address (a UNIX socket) is never trusted
        and is returned as it is.
        """
        self.assertClient("-", ["1.2.3.4"], INTERNAL, "-")


class RateLimitKeyTests(SynchronousTestCase):
    """
    L{rate_limit_key} counts an IPv6 client by its /64 and anything else
    by itself.
    """

    def test_ipv6_by_64(self) -> None:
        """
        Addresses in the same /64 share a key; another /64 has its own.
        """
        self.assertEqual(rate_limit_key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(rate_limit_key("2001:db8:1:2::ffff"), "2001:db8:1:2::/64")
        self.assertEqual(rate_limit_key("2001:0db8:0001:0002::1"), "2001:db8:1:2::/64")
        self.assertEqual(rate_limit_key("2001:db8:1:3::1"), "2001:db8:1:3::/64")
        self.assertEqual(rate_limit_key("::1"), "::/64")

    def test_scoped_ipv6(self) -> None:
        """
        A link-local address with a zone counts by its /64, without the zone.
        """
        self.assertEqual(rate_limit_key("fe80::1%eth0"), "fe80::/64")

    def test_ipv4(self) -> None:
        """
        IPv4 addresses count one by one, IPv4-mapped IPv6 ones as the IPv4
        address.
        """
        self.assertEqual(rate_limit_key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(rate_limit_key("::ffff:192.0.2.7"), "192.0.2.7")

    def test_not_an_address(self) -> None:
        """
        Anything that is not an address, such as the C{-} of a UNIX socket
        peer, is its own key.
        """
        self.assertEqual(rate_limit_key("-"), "-")
        self.assertEqual(rate_limit_key(""), "")
        self.assertEqual(rate_limit_key("unix:/run/x.sock"), "unix:/run/x.sock")


    def test_remembered(self) -> None:
        """
        Asking again for a recent address answers from the cache, and
        the cache is bounded.
        """
        rate_limit_key.cache_clear()
        rate_limit_key("198.51.100.7")
        self.assertEqual(rate_limit_key("198.51.100.7"), "198.51.100.7")
        self.assertEqual(rate_limit_key.cache_info().hits, 1)
        self.assertEqual(rate_limit_key.cache_info().maxsize, RATE_LIMIT_KEYS_CACHED)


class IsTrustedProxyTests(SynchronousTestCase):
    """
    Tests for L{is_trusted_proxy}.
    """

    def test_trusted(self) -> None:
        """
        A peer inside a trusted network is a proxy, an IPv4-mapped one too.
        """
        trusted = (ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"))
        for peer in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1"):
            self.assertTrue(is_trusted_proxy(peer, trusted), peer)

    def test_untrusted(self) -> None:
        """
        Any other peer, text that is no address, and every peer when nothing
        is trusted, is not.
        """
        trusted = (ip_network("10.0.0.0/8"),)
        for peer in ("192.0.2.1", "-", "", "unix"):
            self.assertFalse(is_trusted_proxy(peer, trusted), peer)
        self.assertFalse(is_trusted_proxy("10.1.2.3", ()))
