"""
Tests for C{meteredrt webhooks status} and C{meteredrt webhooks replay}
against an outbox a real L{StoreOutbox} wrote, on SQLite in the data
directory and on PostgreSQL (C{--database}).
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from meteredrt.store import webhooks as webhook_tables
from meteredrt.store.database import Database
from meteredrt.store.webhooks import StoreOutbox
from meteredrt.webhooks.events import PEER_ONLINE, new_event
from tests.postgres_server import fresh_database
from tests.test_cli import CommandLineMixin

WEBHOOK_CONFIG = """
[server]
data_dir = "{data_dir}"

[[apps]]
id = "hooked"

[apps.webhooks]
url = "https://backend.example/metered-hooks"
secret = "whsec_0123456789abcdef0123456789abcdef"
events = ["peer.online", "peer.offline"]
offline_grace_seconds = 5

[[apps]]
id = "plain"
"""


class WebhooksCommandTests(CommandLineMixin, TestCase):
    """
    The CLI reads and replays the outbox the server writes.
    """

    def setUp(self) -> None:
        super().setUp()
        os.makedirs(self.data_dir)
        self.config = self.mktemp()
        with open(self.config, "w") as f:
            f.write(WEBHOOK_CONFIG.format(data_dir=self.data_dir))

    def database(self) -> Database:
        return Database(self.data_dir)

    def outbox(self) -> StoreOutbox:
        database = self.database()
        pool = database.open_pool(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS, reactor)
        outbox = StoreOutbox(pool, database.dialect)
        self.addCleanup(outbox.close)
        return outbox

    def test_status_without_outbox(self) -> None:
        """
        Before the server wrote anything, the status shows the target and
        nothing pending, and creates no file.
        """
        data = self.json("webhooks", "status", "--app", "hooked", "--config", self.config)
        self.assertEqual(data["url"], "https://backend.example/metered-hooks")
        self.assertEqual(data["events"], ["peer.offline", "peer.online"])
        self.assertEqual((data["pending"], data["failed"], data["delivered"]), (0, 0, 0))
        self.assertFalse(os.path.exists(self.database().sqlite_path(webhook_tables.COMPONENT)))

    def test_status_unconfigured(self) -> None:
        """
        An app without webhooks says so.
        """
        out, _ = self.cli("webhooks", "status", "--app", "plain", "--config", self.config)
        self.assertIn("not configured", out)

    def test_unknown_app(self) -> None:
        """
        An unknown app is a one-line error.
        """
        self.fail_with("no app 'nope'", "webhooks", "status", "--app", "nope", "--config", self.config)
        self.fail_with("no app 'nope'", "webhooks", "replay", "--app", "nope", "--config", self.config)

    async def test_status_and_replay(self) -> None:
        """
        The status counts pending, failed and delivered events and shows
        the last error; a replay makes failed events pending again.
        """
        outbox = self.outbox()
        await outbox.append([new_event(PEER_ONLINE, "hooked", 1.0, peer_id=f"p{i}") for i in range(4)], [])
        batch = await outbox.next_batch("hooked", 10)
        await outbox.delivered("hooked", [batch[0].seq], 1_700_000_000.0)
        await outbox.failed("hooked", [batch[1].seq, batch[2].seq], "the receiver answered HTTP 400", 1_700_000_100.0)
        data = self.json("webhooks", "status", "--app", "hooked", "--config", self.config)
        self.assertEqual((data["pending"], data["failed"], data["delivered"]), (1, 2, 1))
        self.assertEqual(data["lastError"], "the receiver answered HTTP 400")
        self.assertEqual(data["lastSuccessAt"], 1_700_000_000.0)
        out, _ = self.cli("webhooks", "status", "--app", "hooked", "--config", self.config)
        self.assertIn("failed:         2 (meteredrt webhooks replay sends them again)", out)
        self.assertIn("last success:   2023-11-14 22:13:20 UTC", out)
        out, _ = self.cli("webhooks", "replay", "--app", "hooked", "--config", self.config)
        self.assertEqual(out, "2 failed events of hooked are pending again.\n")
        self.assertEqual(self.json("webhooks", "replay", "--app", "hooked", "--config", self.config)["replayed"], 0)
        pending = await outbox.next_batch("hooked", 10)
        self.assertEqual([s.event.peer_id for s in pending], ["p1", "p2", "p3"])


class PostgreSQLWebhooksCommandTests(WebhooksCommandTests):
    """
    The same commands on the outbox a cluster shares in PostgreSQL, named
    by the configuration's C{[storage] database}.
    """

    def setUp(self) -> None:
        self.url = fresh_database()
        super().setUp()
        with open(self.config, "a") as f:
            f.write(f'\n[storage]\ndatabase = "{self.url}"\n')

    def database(self) -> Database:
        return Database(self.data_dir, self.url)
