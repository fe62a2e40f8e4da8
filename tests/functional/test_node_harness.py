"""
Tests for L{tests.functional.node_harness} and C{sdk_client.mjs}.

They drive the official SDK under Node against L{FakeRealtimeFactory}, a
scripted Autobahn server on a loopback port, so the harness is known to work
before any test relies on it against meteredrt itself.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort, IReactorProcess, IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.functional.node_harness import (
    NodeScriptError,
    NodeScriptTimeout,
    ensure_node_modules,
    run_node_script,
    run_sdk_scenario,
)

MAX_MESSAGE_SIZE = 65536


class FakeRealtimeProtocol(WebSocketServerProtocol):
    """
    One connection to L{FakeRealtimeFactory}: welcome (or an early close),
    then acks, channel messages and direct messages between its peers.
    """

    factory: FakeRealtimeFactory
    peer_id: str
    lost: Deferred[None]

    def onConnect(self, request: ConnectionRequest) -> None:
        self.factory.requests.append(request)

    def onOpen(self) -> None:
        if self.factory.close_before_welcome is not None:
            code, reason = self.factory.close_before_welcome
            self.sendClose(code=code, reason=reason)
            return
        self.peer_id = f"p{len(self.factory.peers) + 1}"
        self.factory.peers[self.peer_id] = self
        self._send(
            {
                "type": "welcome",
                "peerId": self.peer_id,
                "expiresAt": None,
                "serverTime": int(time.time()),
                "maxMessageSize": MAX_MESSAGE_SIZE,
            }
        )

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.factory.frames.append(frame)
        kind = frame.get("type")
        if kind == "ping":
            self._send({"type": "pong"})
            return
        if kind == "subscribe":
            self.factory.subscribers.setdefault(frame["channel"], []).append(self)
        elif kind == "publish":
            for peer in self.factory.subscribers.get(frame["channel"], []):
                peer._send(
                    {
                        "type": "message",
                        "channel": frame["channel"],
                        "from": self.peer_id,
                        "data": frame["data"],
                    }
                )
        elif kind == "send":
            self.factory.peers[frame["to"]]._send(
                {"type": "direct", "from": self.peer_id, "data": frame["data"]}
            )
        self._send({"type": "ack", "requestId": frame["requestId"]})

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.factory.lost.append(reason)
        self.lost.callback(None)

    def _send(self, frame: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(frame).encode("utf-8"))


class FakeRealtimeFactory(WebSocketServerFactory):
    """
    A stand-in Metered Realtime server that records what the SDK sends.

    @ivar close_before_welcome: a C{(code, reason)} to close every
        connection with instead of welcoming it.
    """

    protocol = FakeRealtimeProtocol

    def __init__(self, close_before_welcome: tuple[int, str] | None = None) -> None:
        super().__init__()
        self.close_before_welcome = close_before_welcome
        self.requests: list[ConnectionRequest] = []
        self.frames: list[dict[str, Any]] = []
        self.peers: dict[str, FakeRealtimeProtocol] = {}
        self.subscribers: dict[str, list[FakeRealtimeProtocol]] = {}
        self.lost: list[Failure] = []
        self.connections: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> FakeRealtimeProtocol:
        protocol = super().buildProtocol(addr)
        protocol.lost = Deferred()
        self.connections.append(protocol.lost)
        return protocol


@implementer(IReactorProcess, IReactorTime)
class _ProcessesWithFakeTime:
    """
    Real child processes, with timeouts scheduled on a L{Clock}.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        from twisted.internet import reactor

        return reactor.spawnProcess(*args, **kwargs)

    def callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self._clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self._clock.seconds()

    def getDelayedCalls(self) -> Any:
        return self._clock.getDelayedCalls()


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """
    The events called C{name}, in order.
    """
    return [event for event in events if event["event"] == name]


class SdkClientTests(TestCase):
    """
    Tests for C{sdk_client.mjs} driving the official SDK through the harness.
    """

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    def serve(self, factory: FakeRealtimeFactory) -> str:
        """
        Listen with C{factory} on a loopback port until the test ends and
        every connection has gone; return the URL for the SDK.
        """
        from twisted.internet import reactor

        port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")

        def stop() -> Deferred[Any]:
            # Node may exit before the server has seen its connection close.
            closed = gatherResults(factory.connections)
            closed.addCallback(lambda _: port.stopListening())
            return closed

        self.addCleanup(stop)
        return f"ws://127.0.0.1:{port.getHost().port}"

    async def test_connect_and_subscribe(self) -> None:
        """
        The SDK connects with a publishable key to /v1, reports the welcome
        on C{connected} and resolves a subscribe the server acks.
        """
        factory = FakeRealtimeFactory()
        url = self.serve(factory)
        events = await run_sdk_scenario(
            {
                "url": url,
                "apiKey": "pk_live_harness",
                "steps": [
                    {"op": "connect"},
                    {"op": "subscribe", "channel": "room/1"},
                    {"op": "close"},
                ],
            }
        )
        [connected] = events_named(events, "connected")
        self.assertEqual(
            (connected["peerId"], connected["expiresAt"], connected["maxMessageSize"]),
            ("p1", None, MAX_MESSAGE_SIZE),
        )
        self.assertEqual(
            [(s["op"], s["ok"]) for s in events_named(events, "step")],
            [("connect", True), ("subscribe", True), ("close", True)],
        )
        self.assertEqual(events[-1]["event"], "done")
        [request] = factory.requests
        self.assertEqual(
            (request.path, request.params),
            ("/v1", {"key": ["pk_live_harness"]}),
        )
        self.assertIn(
            {"type": "subscribe", "channel": "room/1"},
            [{k: v for k, v in f.items() if k != "requestId"} for f in factory.frames],
        )

    async def test_close_before_welcome(self) -> None:
        """
        A 4001 close before the welcome fails the connect step with a
        SignallingConnectError carrying the close code and reason.
        """
        url = self.serve(FakeRealtimeFactory(close_before_welcome=(4001, "invalid_token")))
        events = await run_sdk_scenario(
            {"url": url, "token": "not.a.jwt", "steps": [{"op": "connect"}]}
        )
        [step] = events_named(events, "step")
        self.assertFalse(step["ok"])
        self.assertEqual(
            (step["error"]["name"], step["error"]["closeCode"], step["error"]["closeReason"]),
            ("SignallingConnectError", 4001, "invalid_token"),
        )
        [disconnected] = events_named(events, "disconnected")
        self.assertEqual(
            (disconnected["code"], disconnected["willReconnect"]), (4001, False)
        )

    async def test_clients_address_each_other(self) -> None:
        """
        In a two-client scenario, C{peerIdOf} names the other client's peer
        and C{wait} sees the direct and channel messages arrive.
        """
        factory = FakeRealtimeFactory()
        url = self.serve(factory)
        events = await run_sdk_scenario(
            {
                "clients": {
                    "a": {"url": url, "apiKey": "pk_live_a"},
                    "b": {"url": url, "apiKey": "pk_live_b"},
                },
                "steps": [
                    {"op": "connect", "client": "a"},
                    {"op": "connect", "client": "b"},
                    {"op": "subscribe", "client": "b", "channel": "room"},
                    {"op": "send", "client": "a", "to": {"peerIdOf": "b"}, "data": 1},
                    {"op": "publish", "client": "a", "channel": "room", "data": {"n": 2}},
                    {"op": "wait", "client": "b", "event": "direct", "timeoutMs": 5000},
                    {
                        "op": "wait",
                        "client": "b",
                        "event": "message",
                        "where": {"channel": "room"},
                        "timeoutMs": 5000,
                    },
                ],
            }
        )
        self.assertTrue(all(s["ok"] for s in events_named(events, "step")))
        [direct] = events_named(events, "direct")
        [message] = events_named(events, "message")
        self.assertEqual(
            (direct["client"], direct["from"], direct["data"]), ("b", "p1", 1)
        )
        self.assertEqual(
            (message["client"], message["from"], message["data"]), ("b", "p1", {"n": 2})
        )

    async def test_wait_times_out(self) -> None:
        """
        A C{wait} for an event that never comes reports a TimeoutError step.
        """
        url = self.serve(FakeRealtimeFactory())
        events = await run_sdk_scenario(
            {
                "url": url,
                "apiKey": "pk_live_harness",
                "steps": [
                    {"op": "connect"},
                    {"op": "wait", "event": "message", "timeoutMs": 1},
                ],
            }
        )
        wait = events_named(events, "step")[-1]
        self.assertEqual((wait["ok"], wait["error"]["name"]), (False, "TimeoutError"))

    async def test_broken_scenario_fails(self) -> None:
        """
        An unknown step fails the run with exit code 1 and a C{fatal} event.
        """
        error = await self.assertFailure(
            run_sdk_scenario(
                {"url": "ws://127.0.0.1:9", "apiKey": "pk_live_x", "steps": [{"op": "nope"}]}
            ),
            NodeScriptError,
        )
        self.assertEqual(error.exit_code, 1)
        [fatal] = events_named(error.events, "fatal")
        self.assertIn("unknown step op 'nope'", fatal["error"]["message"])

    async def test_large_scenario(self) -> None:
        """
        A scenario too large for one command-line argument still runs.
        """
        url = self.serve(FakeRealtimeFactory())
        big = "x" * 100_000
        events = await run_sdk_scenario(
            {
                "url": url,
                "apiKey": "pk_live_harness",
                "steps": [
                    {"op": "connect"},
                    {"op": "publish", "channel": "c", "data": big},
                    {"op": "close"},
                ],
            }
        )
        publish = events_named(events, "step")[1]
        self.assertEqual(
            (publish["ok"], publish["error"]["name"], publish["error"]["cap"]),
            (False, "OversizedPayloadError", MAX_MESSAGE_SIZE),
        )


class RunNodeScriptTests(TestCase):
    """
    Tests for L{run_node_script} with small throwaway scripts.
    """

    def script(self, source: str) -> str:
        """
        Write C{source} to a temporary C{.mjs} file and return its path.
        """
        path = os.path.abspath(self.mktemp() + ".mjs")
        with open(path, "w", encoding="utf-8") as script_file:
            script_file.write(source)
        return path

    async def test_events_and_environment(self) -> None:
        """
        Each stdout line becomes one event, and C{env} reaches the child.
        """
        path = self.script(
            "console.log(JSON.stringify({event: 'a', v: process.env.HARNESS_PROBE}));\n"
            "process.stdout.write('\\n' + JSON.stringify({event: 'b'}));\n"
        )
        events = await run_node_script(path, [], env={"HARNESS_PROBE": "42"})
        self.assertEqual(events, [{"event": "a", "v": "42"}, {"event": "b"}])

    async def test_exit_status(self) -> None:
        """
        A non-zero exit fails with the exit code, stderr and events so far.
        """
        path = self.script(
            "console.log(JSON.stringify({event: 'started'}));\n"
            "console.error('boom');\n"
            "process.exit(3);\n"
        )
        error = await self.assertFailure(run_node_script(path, []), NodeScriptError)
        self.assertEqual(
            (error.exit_code, error.stderr.strip(), error.events),
            (3, "boom", [{"event": "started"}]),
        )
        self.assertIn("boom", str(error))

    async def test_not_json(self) -> None:
        """
        A stdout line that is not a JSON object fails the run.
        """
        path = self.script("console.log('hello');\nconsole.log('[1]');\n")
        error = await self.assertFailure(run_node_script(path, []), NodeScriptError)
        self.assertIn("'hello'", str(error))
        self.assertIn("'[1]'", str(error))

    async def test_timeout_kills(self) -> None:
        """
        A script still running at the deadline is killed and the run fails
        with L{NodeScriptTimeout}.
        """
        clock = Clock()
        path = self.script(
            "console.log(JSON.stringify({event: 'started'}));\n"
            "setInterval(() => {}, 1000);\n"
        )
        result = run_node_script(
            path, [], timeout=30, reactor=_ProcessesWithFakeTime(clock)
        )
        clock.advance(30)
        error = await self.assertFailure(result, NodeScriptTimeout)
        self.assertEqual(error.signal, 9)
        self.assertEqual(clock.getDelayedCalls(), [])
