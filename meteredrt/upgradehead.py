"""
Recognising, from a connection's first bytes, a WebSocket upgrade of
C{/v1} so plain that C{twisted.web} would parse it and hand it to Autobahn
unchanged.

Such a request can go to Autobahn straight (L{meteredrt.site.V1Resource.
upgrade_directly}), which parses the head anyway: C{twisted.web} parsing it
first, building a C{Request} and looking its resource up cost about a
sixth of a connect. Anything this does not recognise goes to
C{twisted.web} as before, so every odd or hostile request is answered as
it always was; what it recognises has to be a request that C{twisted.web}
accepts whole and Autobahn reads the same way:

 - exactly the bytes of one request head, nothing before or after it (no
   body, no pipelined bytes), read in one piece;
 - C{GET /v1} or C{GET /v1?…} with printable ASCII in the query, over
   C{HTTP/1.1};
 - well below C{twisted.web}'s size and count limits for headers
   (L{MAX_HEAD_BYTES}, L{MAX_HEADER_LINES});
 - every header line a token, a colon and printable ASCII or tabs: no
   folded lines, no space before the colon, nothing outside ASCII;
 - no header named twice (the two parsers join repeats differently), no
   C{Content-Length} or C{Transfer-Encoding} (a body), and
   C{Upgrade: websocket}, which the C{/v1} resource asks for.

Pure: bytes in, a decision out.
"""

from __future__ import annotations

import re

#: The longest head recognised; C{twisted.web} allows 16 KiB of request
#: line and headers together, and the SDK's requests are well under 2 KiB.
MAX_HEAD_BYTES = 8192
#: The most header lines recognised (C{twisted.web} allows 500).
MAX_HEADER_LINES = 100

_HEAD = re.compile(
    rb"GET /v1(?:\?[\x21-\x7e]*)? HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n){0," + str(MAX_HEADER_LINES).encode() + rb"})\r\n"
)

#: Headers that announce a body.
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})


class PlainUpgrade:
    """
    A recognised upgrade request.

    @ivar forwarded_for: the value of its C{X-Forwarded-For} header, if it
        has one.
    """

    __slots__ = ("forwarded_for",)

    def __init__(self, forwarded_for: str | None) -> None:
        self.forwarded_for = forwarded_for


def plain_upgrade(data: bytes) -> PlainUpgrade | None:
    """
    C{data} read as a plain upgrade of C{/v1} (see the module docstring),
    or C{None} when it is anything else.
    """
    if len(data) > MAX_HEAD_BYTES:
        return None
    match = _HEAD.fullmatch(data)
    if match is None:
        return None
    seen: set[bytes] = set()
    upgrade = False
    forwarded_for = None
    for line in match.group(1).split(b"\r\n")[:-1]:
        raw_name, _, value = line.partition(b":")
        name = raw_name.lower()
        if name in seen or name in _BODY_HEADERS:
            return None
        seen.add(name)
        if name == b"upgrade":
            upgrade = value.strip(b" \t").lower() == b"websocket"
        elif name == b"x-forwarded-for":
            forwarded_for = value.strip(b" \t").decode("ascii")
    return PlainUpgrade(forwarded_for) if upgrade else None
