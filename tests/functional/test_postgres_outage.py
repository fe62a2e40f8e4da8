"""
A real C{twistd -n meteredrt} process on a real PostgreSQL that is stopped
the hard way (SIGQUIT, as ``pg_ctl stop -m immediate``) and started again:
admitted connections keep working, a key the server does not know is
answered with a transient error, the node recovers by itself, and no
count is lost.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from meteredrt.cli import main
from meteredrt.store.keystore import RELOAD_INTERVAL
from tests.postgres_server import PostgresServer

from .support import APP_ID, CONFIG, SECRET, SECRET_KEY_ID, TwistdProcess, start_twistd
from .test_metering_e2e import ClosedBeforeWelcome, connect_client, treq


class PostgreSQLOutageTests(TestCase):
    """
    The database goes away under a running server and comes back.
    """

    timeout = 120

    def setUp(self) -> None:
        # A server of its own: stopping it must not disturb other tests.
        self.postgres = PostgresServer()
        self.addCleanup(self.postgres.stop)
        self.database = self.postgres.create_database()
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        self.config = base / "meteredrt.toml"
        self.config.write_text(CONFIG)
        self.data_dir = str(base / "data")

    async def start(self) -> tuple[Any, TwistdProcess, int]:
        return await start_twistd(
            self, "--config", str(self.config), "--data-dir", self.data_dir, "--database", self.database
        )

    def operator(self, *argv: str) -> Any:
        """
        Run one C{meteredrt} command on the server's database; its JSON.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        status = main(
            [*argv, "--config", str(self.config), "--database", self.database, "--json"],
            stdout=stdout,
            stderr=stderr,
        )
        self.assertEqual(status, 0, stderr.getvalue())
        return json.loads(stdout.getvalue())

    async def rest_status(self, port: int, key_id: str, secret: str) -> int:
        response = await treq.get(
            f"http://127.0.0.1:{port}/v1/usage",
            headers={"Authorization": f"Bearer {key_id}:{secret}"},
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        await response.content()
        return int(response.code)

    async def refusal_code(self, port: int, key_id: str) -> int | None:
        """
        Connect with a publishable key; the close code if it is refused,
        ``None`` if it is welcomed.
        """
        try:
            client = await connect_client(self, port, f"key={key_id}")
        except ClosedBeforeWelcome as refused:
            return refused.code
        client.abort()
        return None

    async def test_outage_and_recovery(self) -> None:
        """
        With PostgreSQL down: an admitted connection keeps publishing (every
        publish acked and delivered); a known key still authenticates over
        REST; an unknown key is answered 503 over REST and 1011 on the
        WebSocket (both transient). Once PostgreSQL is back, a key created
        then connects within a re-read, and after SIGTERM the database holds
        every acked message.
        """
        process, child, port = await self.start()
        sender = await connect_client(self, port)
        receiver = await connect_client(self, port)
        self.assertEqual((await receiver.request({"type": "subscribe", "channel": "room"}))["type"], "ack")
        before = await gatherResults([sender.publish("room", n) for n in range(5)])
        self.assertEqual([answer["type"] for answer in before], ["ack"] * 5)

        self.postgres.stop_immediately()
        # Let the key store's next re-read find the database gone.
        await _pause(RELOAD_INTERVAL + 1)
        during = await gatherResults([sender.publish("room", n) for n in range(7)])
        self.assertEqual([answer["type"] for answer in during], ["ack"] * 7)
        await receiver.received(12)
        self.assertEqual(await self.rest_status(port, SECRET_KEY_ID, SECRET), 200)
        self.assertEqual(await self.rest_status(port, "sk_id_unknown", "sk_secret_unknown"), 503)
        self.assertEqual(await self.refusal_code(port, "pk_live_unknown"), 1011)

        self.postgres.start()
        created = self.operator("keys", "create", "--app", APP_ID, "--type", "publishable")
        started = time.monotonic()
        while (code := await self.refusal_code(port, created["keyId"])) is not None:
            self.assertIn(code, (1011, 4001))
            self.assertLess(time.monotonic() - started, RELOAD_INTERVAL * 2 + 3, "the node did not recover")
            await _pause(0.1)
        self.assertEqual(await self.refusal_code(port, "pk_live_unknown"), 4001)

        after = await gatherResults([sender.publish("room", n) for n in range(3)])
        self.assertEqual([answer["type"] for answer in after], ["ack"] * 3)
        process.signalProcess("TERM")
        self.assertIn(await child.ended, [(0, None), (None, 15)], child.text)
        # One line per outage and service, not a traceback per query.
        self.assertNotIn("Rollback failed", child.text)
        self.assertLessEqual(child.text.count("Traceback"), 4, child.text)
        report = self.operator("usage", "--app", APP_ID)
        self.assertEqual(report["messagesUsed"], 15)


def _pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)
