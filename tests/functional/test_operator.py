"""
What an operator watches, over real sockets: C{/metrics} scraped over HTTP
from a running server after official-SDK clients exchanged messages, and
the JSON log of a real C{twistd} process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from .node_harness import ensure_node_modules, run_sdk_scenario
from .support import CONFIG, PUBLISHABLE_KEY, TWISTD, TwistdProcess, kill_twistd, start_server
from .test_metering_e2e import connect_client
from .test_sdk import events_of, token

ROOT = Path(__file__).resolve().parents[2]
METRICS_TOKEN = "functional-metrics-token-0123456789"


def free_port() -> int:
    """
    A loopback port nobody listens on right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http_get(url: str, **headers: str) -> tuple[int, str]:
    """
    GET C{url}; the status and the body as text.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.get(url, headers={k: [v] for k, v in headers.items()}, pool=pool, timeout=10)
    body = await response.text()
    return response.code, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    The Prometheus text format parsed: C{(name, sorted labels) -> value}.
    """
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class MetricsEndpointTests(TestCase):
    """
    C{/metrics} over real HTTP.
    """

    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    async def test_scrape_after_sdk_exchange(self) -> None:
        """
        After two SDK clients exchanged a channel message, the main
        listener answers C{/metrics} only with the token, the separate
        listener without one, and both show the handshakes, the frames,
        the delivery and the closes.
        """
        scrape_port = free_port()
        config = CONFIG + (
            f'\n[metrics]\ntoken = "{METRICS_TOKEN}"\nlisten = "tcp:{scrape_port}:interface=127.0.0.1"\n'
        )
        server = await start_server(self, config)
        scenario = {
            "clients": {
                "a": {"url": server.url, "token": token("alice")},
                "b": {"url": server.url, "token": token("bob")},
            },
            "steps": [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "b"},
                {"op": "subscribe", "client": "a", "channel": "ops/room"},
                {"op": "subscribe", "client": "b", "channel": "ops/room"},
                {"op": "publish", "client": "b", "channel": "ops/room", "data": {"text": "hi"}},
                {"op": "wait", "client": "a", "event": "message"},
                {"op": "close", "client": "a"},
                {"op": "close", "client": "b"},
            ],
        }
        events = await run_sdk_scenario(scenario, timeout=60)
        self.assertEqual(len(events_of(events, "message", "a")), 1)

        code, body = await http_get(f"{server.http}/metrics")
        self.assertEqual(code, 401)
        self.assertNotIn("meteredrt_", body)
        code, _ = await http_get(f"{server.http}/metrics", Authorization="Bearer not-the-token-0123456789")
        self.assertEqual(code, 401)
        code, main = await http_get(f"{server.http}/metrics", Authorization=f"Bearer {METRICS_TOKEN}")
        self.assertEqual(code, 200)
        code, separate = await http_get(f"http://127.0.0.1:{scrape_port}/metrics")
        self.assertEqual(code, 200)
        code, _ = await http_get(f"http://127.0.0.1:{scrape_port}/v1/usage")
        self.assertEqual(code, 404)

        for text in (main, separate):
            values = samples(text)
            self.assertEqual(values[("meteredrt_handshakes_total", (("outcome", "welcomed"),))], 2)
            self.assertEqual(values[("meteredrt_frames_received_total", (("type", "publish"),))], 1)
            self.assertEqual(values[("meteredrt_frames_received_total", (("type", "subscribe"),))], 2)
            self.assertEqual(values[("meteredrt_frames_sent_total", (("type", "message"),))], 1)
            self.assertEqual(values[("meteredrt_deliveries_total", (("kind", "message"),))], 1)
            self.assertEqual(values[("meteredrt_handshake_seconds_count", ())], 2)
            self.assertLess(values[("meteredrt_meter_flush_lag_seconds", ())], 60)
            closes = sum(v for (name, _), v in values.items() if name == "meteredrt_closes_total")
            self.assertEqual(closes, 2)


class JsonLogTests(TestCase):
    """
    C{[log] format = "json"} in a real C{twistd} process.
    """

    timeout = 120

    async def test_json_lines(self) -> None:
        """
        Every line twistd writes is one JSON object, and a session's end is
        one of them, with its fields.
        """
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        config_path = base / "meteredrt.toml"
        config_path.write_text(CONFIG + '\n[log]\nformat = "json"\nlevel = "info"\n')
        child = TwistdProcess()
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [
                sys.executable, "-c", TWISTD, "--pidfile=", "-n", "meteredrt",
                "--config", str(config_path),
                "--data-dir", str(base / "data"),
                "--listen", "tcp:0:interface=127.0.0.1",
            ],  # fmt: skip
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/")},
            path=str(ROOT),
        )
        self.addCleanup(kill_twistd, process, child)
        port = await child.listening
        client = await connect_client(self, port, f"key={PUBLISHABLE_KEY}")
        client.sendClose(1000)
        await client.closed
        process.signalProcess("TERM")
        await child.ended

        records: list[dict[str, Any]] = [json.loads(line) for line in child.text.splitlines() if line.strip()]
        self.assertGreater(len(records), 3)
        for record in records:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record), record)
        [session] = [r for r in records if r.get("event") == "session_end"]
        self.assertEqual(
            (session["app"], session["code"], session["closed_by"], session["remote"], session["level"]),
            ("app_test", 1000, "client", "127.0.0.1", "info"),
        )
        self.assertEqual(session["namespace"], "meteredrt.ws.RealtimeServerProtocol")

