"""
Reading an outbound request's answer without trusting its size.

A server we call (the TURN API, a webhook receiver) may answer with a body
of any length, or one that never ends. L{read_body} keeps at most a given
number of bytes and stops reading past them, which closes the connection
instead of holding memory (or the exchange) for as long as the other side
cares to send.
"""

from __future__ import annotations

import treq
from twisted.web.iweb import IResponse


class BodyTooLarge(Exception):
    """
    The answer's body went past the limit; reading stopped there.
    """


async def read_body(response: IResponse, limit: int, keep: bool = True) -> bytes:
    """
    The whole body of C{response}, if it is at most C{limit} bytes.

    @param keep: whether to keep the bytes; without, they are counted and
        dropped (the answer is only read so that the connection can be
        reused) and the result is empty.
    @raise BodyTooLarge: past C{limit} bytes, once reading has stopped.
    """
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise BodyTooLarge()
        if keep:
            chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)
