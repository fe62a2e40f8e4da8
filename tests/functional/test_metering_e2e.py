"""
Metering over real loopback sockets: many Autobahn clients connecting and
publishing at once against the composed server, and the official SDK seeing
the quota refusals of protocol §15.3.

L{RealtimeClient} and L{get_usage} are shared with
C{tests/functional/test_durability.py}.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from meteredrt.keystore import SQLiteKeyStore
from meteredrt.metering import Meter, period_bounds
from meteredrt.usagestore import read_ledger, read_usage, usage_database_path

from .node_harness import ensure_node_modules, run_sdk_scenario
from .support import APP_ID, CONFIG, PUBLISHABLE_KEY, SECRET, SECRET_KEY_ID, RunningServer, start_server
from .test_sdk import events_of, steps, token


def config_with_plan(plan: str) -> str:
    """
    The functional-test configuration with a C{[apps.plan]} table (TOML
    lines) for the app C{app_test}.
    """
    declaration = f'id = "{APP_ID}"\n'
    assert declaration in CONFIG
    return CONFIG.replace(declaration, f"{declaration}\n[apps.plan]\n{plan}\n", 1)


class ClosedBeforeWelcome(Exception):
    """
    The server closed the connection before welcoming it.

    :ivar code: the close code.
    """

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"closed before welcome: {code} {reason}")
        self.code = code


class RealtimeClient(WebSocketClientProtocol):
    """
    A minimal protocol client: sends frames with request ids and matches the
    answers (C{ack} or C{error}) to them; counts channel messages.
    """

    def __init__(self) -> None:
        super().__init__()
        self.welcomed: Deferred[dict[str, Any]] = Deferred()
        self.closed: Deferred[int | None] = Deferred()
        self.messages = 0
        self._pending: dict[str, Deferred[dict[str, Any]]] = {}
        self._request_ids = itertools.count(1)
        self._messages_wanted: tuple[int, Deferred[None]] | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        kind = frame["type"]
        if kind == "welcome":
            self.welcomed.callback(frame)
        elif kind in ("ack", "error") and frame.get("requestId") in self._pending:
            self._pending.pop(frame["requestId"]).callback(frame)
        elif kind == "message":
            self.messages += 1
            if self._messages_wanted is not None and self.messages >= self._messages_wanted[0]:
                _, waiting = self._messages_wanted
                self._messages_wanted = None
                waiting.callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.welcomed.called:
            self.welcomed.errback(ClosedBeforeWelcome(code, reason))
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            answer.errback(ConnectionError(f"closed with {code} before the answer"))
        self.closed.callback(code)

    def request(self, frame: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """
        Send one frame with a fresh C{requestId}; fires with its C{ack} or
        C{error} frame.
        """
        request_id = f"r{next(self._request_ids)}"
        answer: Deferred[dict[str, Any]] = Deferred()
        self._pending[request_id] = answer
        self.sendMessage(json.dumps({**frame, "requestId": request_id}).encode())
        return answer

    def publish(self, channel: str, data: Any) -> Deferred[dict[str, Any]]:
        """
        Publish once; fires with the answer frame.
        """
        return self.request({"type": "publish", "channel": channel, "data": data})

    def received(self, count: int) -> Deferred[None]:
        """
        Fires once C{count} channel messages have arrived in all.
        """
        waiting: Deferred[None] = Deferred()
        if self.messages >= count:
            waiting.callback(None)
        else:
            self._messages_wanted = (count, waiting)
        return waiting

    def abort(self) -> Deferred[int | None]:
        """
        Drop the connection unless it is closed; fires once it is.
        """
        if not self.closed.called and self.transport is not None:
            self.transport.abortConnection()
        return self.closed


async def connect_client(case: TestCase, port: int, query: str = f"key={PUBLISHABLE_KEY}") -> RealtimeClient:
    """
    Open a WebSocket to C{/v1?<query>} on a loopback port; fires with the
    client once it is welcomed. The connection is dropped on cleanup.
    """
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/v1?{query}")
    factory.protocol = RealtimeClient
    client: RealtimeClient = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    case.addCleanup(client.abort)
    await client.welcomed
    return client


async def get_usage(case: TestCase, port: int) -> dict[str, Any]:
    """
    C{GET /v1/usage} of C{app_test} with its secret key.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.get(
        f"http://127.0.0.1:{port}/v1/usage",
        headers={"Authorization": f"Bearer {SECRET_KEY_ID}:{SECRET}"},
        pool=pool,
    )
    case.assertEqual(response.code, 200)
    body: dict[str, Any] = await response.json()
    return body


async def start_stoppable_server(case: TestCase, config: str) -> RunningServer:
    """
    L{start_server} for a test that stops the server itself: the cleanup
    stops it only if it is still running (the key store's pool cannot be
    closed twice).
    """

    class StopOnceCase:
        mktemp = case.mktemp

        def addCleanup(self, stop: Callable[[], object]) -> None:
            service = stop.__self__  # type: ignore[attr-defined]
            case.addCleanup(lambda: stop() if service.running else None)

    return await start_server(StopOnceCase(), config=config)  # type: ignore[arg-type]


def stored_usage(data_dir: str, app_id: str = APP_ID) -> tuple[Any, list[Any]]:
    """
    The app's usage row of the current period and that period's ledger, as
    the server last flushed them.
    """
    start, _ = period_bounds(time.time())
    connection = sqlite3.connect(usage_database_path(data_dir))
    try:
        cursor = connection.cursor()
        return read_usage(cursor, app_id, start), read_ledger(cursor, app_id, start)
    finally:
        connection.close()


CLIENTS = 20
PUBLISHES = 25
#: Below what is sent, so that the last sends are billed overage.
WITHIN_PLAN = 400
CONCURRENCY_PLAN = f"""
name = "LOAD"
max_messages_per_period = {WITHIN_PLAN}
overages_allowed = true
overage_rate_per_1000_messages = 1000.0
balance = 1000.0
"""


class ConcurrencyTests(TestCase):
    """
    Counting is exact when many clients connect and publish at once.
    """

    timeout = 60

    async def test_many_clients_at_once(self) -> None:
        """
        Twenty clients connecting at once and publishing 25 messages each
        on one channel they all subscribe to are counted exactly: 500
        messages whatever the fan-out, a peak of 20, 100 overage messages
        with one ledger unit each, in memory and after a graceful stop on
        disk.
        """
        server = await start_stoppable_server(self, config_with_plan(CONCURRENCY_PLAN))
        [meter] = [child for child in server.service if isinstance(child, Meter)]
        clients = await gatherResults(
            [Deferred.fromCoroutine(connect_client(self, server.port)) for _ in range(CLIENTS)],
            consumeErrors=True,
        )
        subscribed = await gatherResults(
            [client.request({"type": "subscribe", "channel": "load/room"}) for client in clients],
            consumeErrors=True,
        )
        self.assertEqual({frame["type"] for frame in subscribed}, {"ack"})

        answers = await gatherResults(
            [
                client.publish("load/room", {"client": index, "n": n})
                for n in range(PUBLISHES)
                for index, client in enumerate(clients)
            ],
            consumeErrors=True,
        )
        sent = CLIENTS * PUBLISHES
        self.assertEqual([frame["type"] for frame in answers], ["ack"] * sent)
        await gatherResults(
            [client.received((CLIENTS - 1) * PUBLISHES) for client in clients], consumeErrors=True
        )
        self.assertEqual({client.messages for client in clients}, {(CLIENTS - 1) * PUBLISHES})

        usage = await get_usage(self, server.port)
        overage = sent - WITHIN_PLAN
        self.assertEqual(
            {name: usage[name] for name in ("messagesUsed", "peakConcurrent", "concurrentNow", "overageMessages")},
            {"messagesUsed": sent, "peakConcurrent": CLIENTS, "concurrentNow": CLIENTS, "overageMessages": overage},
        )
        self.assertEqual(usage["plan"]["name"], "LOAD")
        [keys] = [child for child in server.service if isinstance(child, SQLiteKeyStore)]
        self.assertAlmostEqual(meter.balance(keys.app(APP_ID)), 1000.0 - overage)

        await gatherResults([client.abort() for client in clients], consumeErrors=True)
        await server.service.stopService()
        row, ledger = stored_usage(server.data_dir)
        self.assertEqual(
            (row.messages_used, row.peak_concurrent, row.overage_messages, row.overage_connections),
            (sent, CLIENTS, overage, 0),
        )
        self.assertEqual(sum(entry.units for entry in ledger if entry.kind == "charge"), overage)
        self.assertAlmostEqual(sum(entry.amount for entry in ledger if entry.kind == "charge"), float(overage))
        self.assertEqual([entry for entry in ledger if entry.kind == "recharge"], [])


class DrainCountTests(TestCase):
    """
    What is accepted while the server drains is still counted.
    """

    async def test_publish_during_drain_is_persisted(self) -> None:
        """
        A publish acked after shutdown began (between going_away and the
        1001 close) is in the usage file once the server has stopped: the
        meter's last flush waits for the connections to drain.
        """
        server = await start_stoppable_server(self, CONFIG)
        client = await connect_client(self, server.port)
        self.assertEqual((await client.publish("room", 1))["type"], "ack")
        stopping = server.service.stopService()
        answer = await client.publish("room", 2)
        self.assertEqual(answer["type"], "ack")
        self.assertEqual(await client.closed, 1001)
        await stopping
        row, _ = stored_usage(server.data_dir)
        self.assertEqual(row.messages_used, 2)


class SDKQuotaTests(TestCase):
    """
    The official SDK meets the quota refusals of §15.3.
    """

    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    async def test_over_message_quota(self) -> None:
        """
        With two messages per period and no overage, the third publish is
        rejected with over_message_quota, the connection stays open, and
        the soft drop is counted.
        """
        server = await start_server(self, config=config_with_plan("max_messages_per_period = 2"))
        scenario = {
            "url": server.url,
            "token": token("u_quota"),
            "steps": [
                {"op": "connect"},
                {"op": "publish", "channel": "quota/room", "data": 1},
                {"op": "publish", "channel": "quota/room", "data": 2},
                {"op": "publish", "channel": "quota/room", "data": 3},
                {"op": "subscribe", "channel": "quota/room"},
                {"op": "state"},
            ],
        }
        events = await run_sdk_scenario(scenario, timeout=60)
        outcomes = [(s["op"], s["ok"], s.get("error", {}).get("name")) for s in steps(events)]
        self.assertEqual(
            outcomes,
            [
                ("connect", True, None),
                ("publish", True, None),
                ("publish", True, None),
                ("publish", False, "over_message_quota"),
                ("subscribe", True, None),
                ("state", True, None),
            ],
        )
        self.assertEqual(steps(events)[-1]["state"], "connected")
        usage = await get_usage(self, server.port)
        self.assertEqual((usage["messagesUsed"], usage["overageMessages"]), (3, 0))

    async def test_over_connection_cap(self) -> None:
        """
        With one concurrent connection allowed and no overage, a second SDK
        connect is refused with SignallingConnectError close code 4010 while
        the first stays connected.
        """
        server = await start_server(self, config=config_with_plan("max_concurrent_connections = 1"))
        scenario = {
            "clients": {
                "a": {"url": server.url, "token": token("u_a")},
                "b": {"url": server.url, "token": token("u_b")},
            },
            "steps": [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "b"},
                {"op": "state", "client": "a"},
            ],
        }
        events = await run_sdk_scenario(scenario, timeout=60)
        first, second, state = steps(events)
        self.assertTrue(first["ok"], first)
        self.assertFalse(second["ok"], second)
        self.assertEqual(second["error"]["name"], "SignallingConnectError")
        self.assertEqual(second["error"]["closeCode"], 4010)
        self.assertEqual(state["state"], "connected")
        self.assertEqual(len(events_of(events, "connected", "a")), 1)
        self.assertEqual(events_of(events, "connected", "b"), [])
        usage = await get_usage(self, server.port)
        self.assertEqual(usage["peakConcurrent"], 1)

