"""
The slow-reader cut-off (§18) over real loopback sockets: the TCP transport
itself must pause the producer the WebSocket adapter registers once the
upgrade is done, or a reader that stops reading would make the server hold
every message for it in memory.
"""

from __future__ import annotations

import time

from autobahn.twisted.websocket import connectWS
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.trial.unittest import TestCase

from meteredrt.apps import ACTIONS, Key, KeyType
from meteredrt.auth import mint_token
from meteredrt.hub import Hub

from .support import APP_ID, SECRET, SECRET_KEY_ID, FramePeer, FramePeerFactory, RunningServer, frame_is, start_server

SECRET_KEY = Key(SECRET_KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET)
#: 9 MB: on Linux loopback the kernel's socket buffers took about 2.7 MB
#: before Twisted paused the producer and the 1 MiB outbound limit was
#: passed; this leaves room for larger buffers and stays within one
#: connection's burst of 200 frames.
PUBLISHES = 150
#: Under the 64 KiB message limit.
DATA_SIZE = 60_000

class SlowReaderTests(TestCase):
    """
    A reader that stops reading is cut off by the server while everyone
    else keeps receiving.
    """

    timeout = 30

    async def connect(self, server: RunningServer, peer_id: str) -> tuple[FramePeer, FramePeerFactory]:
        """
        Connect as C{peer_id} and wait for the welcome.
        """
        token = mint_token(SECRET_KEY, peer_id, now=int(time.time()), expires_in=600)
        factory = FramePeerFactory(f"{server.url}/v1?token={token}")
        connectWS(factory)
        peer = await factory.opened
        await peer.frame(frame_is("welcome"))
        return peer, factory

    async def subscribe(self, peer: FramePeer, channel: str) -> None:
        """
        Subscribe C{peer} to C{channel} and wait for the ack.
        """
        peer.send_json({"type": "subscribe", "channel": channel, "requestId": "s"})
        await peer.frame(frame_is("ack", requestId="s"))

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
        last = watcher.frame(frame_is("message", data=[PUBLISHES - 1, "x" * DATA_SIZE]))
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
