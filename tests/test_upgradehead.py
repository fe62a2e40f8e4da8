"""
Tests for L{meteredrt.upgradehead}: which first bytes are a plain upgrade.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.upgradehead import MAX_HEAD_BYTES, MAX_HEADER_LINES, plain_upgrade

#: What the SDK's WebSocket (Node's C{ws}) sends, give or take the key.
SDK_HEAD = (
    b"GET /v1?token=eyJhbGciOiJIUzI1NiJ9.e30.sig HTTP/1.1\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: websocket\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"\r\n"
)


def with_header(line: bytes, head: bytes = SDK_HEAD) -> bytes:
    """
    C{head} with one more header line before its end.
    """
    return head[:-2] + line + b"\r\n\r\n"


class PlainUpgradeTests(SynchronousTestCase):
    """
    L{plain_upgrade} recognises only heads that C{twisted.web} would pass
    to Autobahn unchanged.
    """

    def test_sdk(self) -> None:
        """
        The SDK's upgrade, with or without a query, is recognised; it names
        no forwarded client.
        """
        head = plain_upgrade(SDK_HEAD)
        assert head is not None
        self.assertIsNone(head.forwarded_for)
        self.assertIsNotNone(plain_upgrade(SDK_HEAD.replace(b"/v1?token=eyJhbGciOiJIUzI1NiJ9.e30.sig", b"/v1")))

    def test_forwarded_for(self) -> None:
        """
        The C{X-Forwarded-For} value is kept, without surrounding spaces.
        """
        head = plain_upgrade(with_header(b"X-Forwarded-For:  198.51.100.1, 10.0.0.5\t"))
        assert head is not None
        self.assertEqual(head.forwarded_for, "198.51.100.1, 10.0.0.5")

    def test_case_and_spaces(self) -> None:
        """
        Header names and the C{websocket} token are case-insensitive.
        """
        self.assertIsNotNone(plain_upgrade(SDK_HEAD.replace(b"Upgrade: websocket", b"UPGRADE:WebSocket ")))

    def test_other_request_lines(self) -> None:
        """
        Any other method, path, version or spacing is left to C{twisted.web}.
        """
        for old, new in [
            (b"GET ", b"POST "),
            (b"GET ", b"get "),
            (b"GET /v1?", b"GET /v1/?"),
            (b"GET /v1?", b"GET /v10?"),
            (b"GET /v1?", b"GET /V1?"),
            (b"GET /v1?", b"GET //v1?"),
            (b"GET /v1?", b"GET /%761?"),
            (b"GET /v1?", b"GET http://host/v1?"),
            (b"GET /v1?", b"GET  /v1?"),
            (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n"),
            (b"HTTP/1.1\r\n", b"HTTP/1.1 \r\n"),
            (b"HTTP/1.1\r\n", b"HTTP/1.1\n"),
            (b"token=", b"tok en="),
            (b"token=", b"token=\xff"),
        ]:
            self.assertIsNone(plain_upgrade(SDK_HEAD.replace(old, new, 1)), new)

    def test_not_one_whole_head(self) -> None:
        """
        A head cut short, or followed by anything, is not recognised.
        """
        for data in (
            SDK_HEAD[:-1],
            SDK_HEAD[:-2],
            SDK_HEAD[:30],
            b"",
            SDK_HEAD + b"x",
            SDK_HEAD + SDK_HEAD,
            b"\r\n" + SDK_HEAD,
        ):
            self.assertIsNone(plain_upgrade(data), data)

    def test_odd_header_lines(self) -> None:
        """
        Header lines that C{twisted.web} and Autobahn might read
        differently, or refuse, are not recognised.
        """
        for line in (
            b"X-Odd : 1",
            b" folded",
            b"\tfolded",
            b": no name",
            b"no colon",
            b"X-Bin: \xc3\xa9",
            b"X-Ctl: a\x00b",
            b"X-Ctl: a\x7fb",
            b"X-Ctl: a\rb",
            b"Content-Length: 0",
            b"Transfer-Encoding: chunked",
            b"upgrade: websocket",
            b"Host: other",
        ):
            self.assertIsNone(plain_upgrade(with_header(line)), line)

    def test_no_websocket_upgrade(self) -> None:
        """
        Without C{Upgrade: websocket} the C{/v1} resource answers 426; that is
        left to it.
        """
        self.assertIsNone(plain_upgrade(SDK_HEAD.replace(b"Upgrade: websocket\r\n", b"")))
        self.assertIsNone(plain_upgrade(SDK_HEAD.replace(b"Upgrade: websocket", b"Upgrade: h2c")))
        self.assertIsNone(plain_upgrade(SDK_HEAD.replace(b"Upgrade: websocket", b"Upgrade: websocket, h2c")))

    def test_size_limits(self) -> None:
        """
        Heads past L{MAX_HEAD_BYTES} or with more than L{MAX_HEADER_LINES}
        header lines are not recognised; those at the limits are.
        """
        padding = MAX_HEAD_BYTES - len(SDK_HEAD) - len(b"X-Pad: \r\n")
        self.assertIsNotNone(plain_upgrade(with_header(b"X-Pad: " + b"a" * padding)))
        self.assertIsNone(plain_upgrade(with_header(b"X-Pad: " + b"a" * (padding + 1))))
        lines = SDK_HEAD.count(b"\r\n") - 2
        many = b"\r\n".join(b"X-%d: 1" % n for n in range(MAX_HEADER_LINES - lines))
        self.assertIsNotNone(plain_upgrade(with_header(many)))
        self.assertIsNone(plain_upgrade(with_header(many + b"\r\nX-Last: 1")))
        self.assertIsNone(plain_upgrade(b"GET /v1?" + b"a" * (2 * MAX_HEAD_BYTES) + SDK_HEAD[51:]))
