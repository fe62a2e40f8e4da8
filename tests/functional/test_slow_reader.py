"""
The slow-reader cut-off (§18) over real loopback sockets: the TCP transport
itself must pause the producer the WebSocket adapter registers once the
upgrade is done, or a reader that stops reading would make the server hold
every message for it in memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase

from meteredrt.apps import ACTIONS, Key, KeyType
from meteredrt.auth import mint_token
from meteredrt.hub import Hub

from .support import APP_ID, SECRET, SECRET_KEY_ID, RunningServer, start_server

SECRET_KEY = Key(SECRET_KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET)
#: 9 MB: on Linux loopback the kernel's socket buffers took about 2.7 MB
#: before Twisted paused the producer and the 1 MiB outbound limit was
#: passed; this leaves room for larger buffers and stays within one
#: connection's burst of 200 frames.
PUBLISHES = 150
#: Under the 64 KiB message limit.
DATA_SIZE = 60_000

Frame = dict[str, Any]


class _Peer(WebSocketClientProtocol):
    """
    A client that records the frames it receives and lets a test wait for
    one that matches, and for the end of the connection.
    """

    factory: _PeerFactory

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self._waiting: list[tuple[Callable[[Frame], bool], Deferred[Frame]]] = []

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.frames.append(frame)
        still = []
        for match, d in self._waiting:
            if match(frame):
                d.callback(frame)
            else:
                still.append((match, d))
        self._waiting = still

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed.callback(code)

    def frame(self, match: Callable[[Frame], bool]) -> Deferred[Frame]:
        """
        Fire with the first frame, already received or yet to come, for
        which C{match} is true.
        """
        for frame in self.frames:
            if match(frame):
                return succeed(frame)
        d: Deferred[Frame] = Deferred()
        self._waiting.append((match, d))
        return d

    def send_json(self, frame: Frame) -> None:
        """
        Send C{frame} as one text frame.
        """
        self.sendMessage(json.dumps(frame).encode("utf-8"))

    def messages(self) -> list[Frame]:
        """
        The channel messages received so far.
        """
        return [f for f in self.frames if f["type"] == "message"]


class _PeerFactory(WebSocketClientFactory):
    """
    Makes one L{_Peer} and fires when it opens and when it closes.
    """

    protocol = _Peer

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # Autobahn's client drops the link 1 s after its close (1006) if the
        # server has not answered; a loaded CI machine may take longer.
        self.setProtocolOptions(closeHandshakeTimeout=5)
        self.opened: Deferred[_Peer] = Deferred()
        self.closed: Deferred[int | None] = Deferred()


def _is(kind: str, **fields: Any) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items())


class SlowReaderTests(TestCase):
    """
    A reader that stops reading is cut off by the server while everyone
    else keeps receiving.
    """

    timeout = 30

    async def connect(self, server: RunningServer, peer_id: str) -> tuple[_Peer, _PeerFactory]:
        """
        Connect as C{peer_id} and wait for the welcome.
        """
        token = mint_token(SECRET_KEY, peer_id, now=int(time.time()), expires_in=600)
        factory = _PeerFactory(f"{server.url}/v1?token={token}")
        connectWS(factory)
        peer = await factory.opened
        await peer.frame(_is("welcome"))
        return peer, factory

    async def subscribe(self, peer: _Peer, channel: str) -> None:
        """
        Subscribe C{peer} to C{channel} and wait for the ack.
        """
        peer.send_json({"type": "subscribe", "channel": channel, "requestId": "s"})
        await peer.frame(_is("ack", requestId="s"))

    async def test_paused_reader_cut_off(self) -> None:
        """
        A subscriber whose socket stops being read is disconnected once the
        server holds more than its outbound limit for it: its session ends,
        its departure is announced, a healthy subscriber gets every message,
        and the paused client finds its connection gone when it reads again.
        """
        server = await start_server(self)
        [hub] = [service for service in server.service if isinstance(service, Hub)]

        watcher, watcher_factory = await self.connect(server, "watcher")
        await self.subscribe(watcher, "room")
        reader, reader_factory = await self.connect(server, "reader")
        await self.subscribe(reader, "room")
        await watcher.frame(lambda f: f["type"] == "presence" and f["joined"] == [{"peerId": "reader"}])
        # The reader's kernel buffer fills, then the server's, then
        # Twisted's write buffer on the server, which pauses our producer.
        reader.transport.pauseProducing()

        publisher, publisher_factory = await self.connect(server, "publisher")
        left = watcher.frame(lambda f: f["type"] == "presence" and f["left"] == [{"peerId": "reader"}])
        last = watcher.frame(_is("message", data=[PUBLISHES - 1, "x" * DATA_SIZE]))
        for n in range(PUBLISHES):
            publisher.send_json({"type": "publish", "channel": "room", "data": [n, "x" * DATA_SIZE]})

        await last
        # Each message was written to the reader before the watcher could
        # read it, so the cut-off has happened by now (the session itself
        # ends when the server aborts the silent reader a second later).
        reader_connection = next((s.sink for s in hub.sessions() if s.peer_id == "reader"), None)
        self.assertNotEqual(
            getattr(reader_connection, "state", None),
            WebSocketProtocol.STATE_OPEN,
            "every message was written and the paused reader is still open",
        )
        await left
        self.assertEqual([f["data"][0] for f in watcher.messages()], list(range(PUBLISHES)))
        self.assertEqual(sorted(s.peer_id for s in hub.sessions()), ["publisher", "watcher"])

        reader.transport.resumeProducing()
        await reader_factory.closed
        self.assertLess(len(reader.messages()), PUBLISHES)

        for peer, factory in ((watcher, watcher_factory), (publisher, publisher_factory)):
            peer.sendClose(1000)
            self.assertEqual(await factory.closed, 1000)
