"""
Frames written during a reactor turn go to the socket at its end, in one
C{send()}, without Twisted's write watch.

Twisted's TCP transport buffers every write and registers the socket for
writability (an C{epoll_ctl}), sends once the next poll reports it
writable, then unregisters it (another C{epoll_ctl}). A server answering
requests one at a time pays those two system calls and a poll event for
every frame it sends: in ping-pong, more CPU than meteredrt's own work on
the frame. Sending at once instead (as asyncio does) wakes the peer while
the server still has frames of the same turn to handle, which measured as
a loss on two cores; sending at the end of the turn keeps Twisted's
batching and leaves out the write watch.

L{TurnWriter} is node-wide: a connection whose transport has nothing
buffered holds the frames of this turn (L{RealtimeServerProtocol}
<meteredrt.ws.RealtimeServerProtocol>) and asks the writer to call it back
once the turn's events are handled (C{callLater(0)}: Twisted runs due calls
before it polls again). It then offers them to the socket with the
transport's own C{writeSomeData}; whatever the socket does not take, and
any error, goes to C{transport.write}, so Twisted's buffer, its producer
pausing (which the slow-reader cut-off counts on) and its handling of a
lost connection stay in charge of everything but the common case.

Only a plain TCP transport qualifies (L{idle_tcp}): TLS, a transport with
bytes already buffered, one closing or closed write their frames through
C{transport.write} as before.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.tcp import Connection

#: A connection holds at most this many bytes for the end of the turn (the
#: size of Twisted's write buffer before it pauses a producer); past it,
#: its held frames and the rest go through the transport at once.
HELD_LIMIT = 64 * 1024


class HoldsWrites(Protocol):
    """
    What L{TurnWriter} calls back: a connection holding frames.
    """

    def flush_held(self) -> None: ...


def idle_tcp(transport: Any) -> Connection | None:
    """
    C{transport} when it is a plain TCP connection, open, neither closing
    nor aborted, with nothing in Twisted's write buffer: then bytes given straight to its
    socket come after everything written before them.

    The buffer and the closing flags are private attributes of Twisted's
    transport (the same from Twisted 16 to 26): read with defaults that
    mean "not idle", so that a Twisted that renamed one writes every frame
    through C{transport.write} (slower, still right) instead of failing;
    C{tests/test_turnwrite.py} fails on such a Twisted.
    """
    if (
        isinstance(transport, Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_aborting", True)
        and not getattr(transport, "_writeDisconnected", True)
        and not getattr(transport, "dataBuffer", True)
        and not getattr(transport, "_tempDataBuffer", True)
    ):
        return transport
    return None


def send_held(transport: Any, data: bytes) -> None:
    """
    Write C{data} on C{transport}: as much as the socket takes at once, if
    the transport is still idle, and the rest (or all of it, on any error)
    through Twisted's buffer.
    """
    tcp = idle_tcp(transport)
    if tcp is not None:
        sent = tcp.writeSomeData(data)
        if isinstance(sent, int):
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


class TurnWriter:
    """
    The connections holding frames until the end of this reactor turn.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._held: list[HoldsWrites] = []
        self._call: Any = None

    def hold(self, connection: HoldsWrites) -> None:
        """
        Call C{connection.flush_held()} at the end of this turn.
        """
        self._held.append(connection)
        if self._call is None:
            self._call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._call = None
        held, self._held = self._held, []
        for connection in held:
            connection.flush_held()
