"""
Shutdown of a real C{twistd -n meteredrt} as a load balancer sees it: on
SIGTERM C{/readyz} answers 503 at once while the port still accepts, live
connections carry on for the drain grace, then get C{going_away} and 1001,
then the port closes and the process exits cleanly.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from .support import CONFIG, TwistdProcess, kill_twistd
from .test_metering_e2e import connect_client

ROOT = Path(__file__).resolve().parents[2]
TWISTD = "from twisted.scripts.twistd import run; run()"

#: The grace the server is configured with: long enough to observe, short
#: enough for a test.
GRACE = 2.0
POLL_INTERVAL = 0.05


class DrainTests(TestCase):
    """
    SIGTERM: not ready, grace, drain, close, exit.
    """

    timeout = 60

    async def status(self, port: int, path: str) -> int | None:
        """
        The HTTP status of C{GET path}, or C{None} if the port refuses
        connections.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        try:
            response = await treq.get(f"http://127.0.0.1:{port}{path}", pool=pool, timeout=5)
        except ConnectError:
            return None
        await response.content()
        code: int = response.code
        return code


    async def test_sigterm_sequence(self) -> None:
        """
        After SIGTERM, /readyz is 503 while the port accepts and a live
        connection still publishes; the connection is closed 1001 only after
        the grace; then the port refuses connections and the process exits
        without an error.
        """
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        config = base / "meteredrt.toml"
        assert "drain_grace_seconds = 0" in CONFIG
        config.write_text(CONFIG.replace("drain_grace_seconds = 0", f"drain_grace_seconds = {GRACE}"))
        child = TwistdProcess()
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [
                sys.executable, "-c", TWISTD, "--pidfile=", "-n", "meteredrt",
                "--config", str(config), "--data-dir", str(base / "data"),
                "--listen", "tcp:0:interface=127.0.0.1",
            ],  # fmt: skip
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(base)},
            path=str(ROOT),
        )
        self.addCleanup(kill_twistd, process, child)
        port = await child.listening
        client = await connect_client(self, port)
        self.assertEqual(await self.status(port, "/readyz"), 200)

        process.signalProcess("TERM")
        started = time.monotonic()
        while (status := await self.status(port, "/readyz")) == 200:
            await deferLater(reactor, POLL_INTERVAL)
        self.assertEqual(status, 503)
        self.assertLess(time.monotonic() - started, GRACE, "readyz turned 503 only after the grace")
        self.assertEqual(await self.status(port, "/healthz"), 200)
        answer = await client.publish("room", {"n": 1})
        self.assertEqual(answer["type"], "ack")
        self.assertFalse(client.closed.called)

        self.assertEqual(await client.closed, 1001)
        self.assertGreaterEqual(time.monotonic() - started, GRACE * 0.9)
        for _ in range(int(10 / POLL_INTERVAL)):
            if await self.status(port, "/healthz") is None:
                break
            await deferLater(reactor, POLL_INTERVAL)
        self.assertIsNone(await self.status(port, "/healthz"), "the port is still open")

        self.assertIn(await child.ended, [(0, None), (None, 15)], child.text)
        self.assertIn("Server Shut Down.", child.text)
        for sign_of_trouble in ("#error]", "#critical]", "Unhandled Error", "Traceback"):
            self.assertNotIn(sign_of_trouble, child.text)
