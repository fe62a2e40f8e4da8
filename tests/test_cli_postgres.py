"""
The C{meteredrt} command line on a PostgreSQL database (C{--database} or
C{[storage] database}), through the same store as the server: what it
writes a server's key store reads, and usage a meter flushed there is
reported.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from meteredrt.apps import App
from meteredrt.metering import Meter
from meteredrt.store import keys as key_tables
from meteredrt.store import usage as usage_tables
from meteredrt.store.database import Database
from meteredrt.store.dialect import POSTGRESQL
from meteredrt.store.keystore import KeyStore
from meteredrt.store.usage import UsageStore
from tests.postgres_server import fresh_database
from tests.test_cli import NOW, CommandLineMixin
from tests.test_tap import hide_module


class PostgreSQLCommandLineTests(CommandLineMixin, TestCase):
    """
    CLI commands with C{--database postgresql://…}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.url = fresh_database()

    def test_apps_and_keys(self) -> None:
        """
        Apps and keys created, suspended and revoked with the CLI are in
        PostgreSQL (nothing in the data directory) and listed back.
        """
        self.cli("apps", "create", "shop", "--database", self.url)
        key = self.json("keys", "create", "--app", "shop", "--type", "publishable", "--database", self.url)
        self.cli("apps", "suspend", "shop", "--database", self.url)
        self.cli("keys", "revoke", key["keyId"], "--database", self.url)
        [app] = self.json("apps", "list", "--database", self.url)
        self.assertEqual((app["appId"], app["suspended"], app["activeKeys"]), ("shop", True, 0))
        [listed] = self.json("keys", "list", "--app", "shop", "--database", self.url)
        self.assertEqual((listed["keyId"], listed["status"]), (key["keyId"], "revoked"))
        self.assertFalse(os.path.exists(self.data_dir))
        # Without --database the CLI looks in the (missing) data directory,
        # and says so rather than listing no apps.
        _, error = self.cli("apps", "list", status=2)
        self.assertIn("no meteredrt data", error)

    def test_config_storage(self) -> None:
        """
        Without C{--database}, the configuration's C{[storage] database}
        decides.
        """
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f'[storage]\ndatabase = "{self.url}"\n')
        self.cli("apps", "create", "shop", "--config", config)
        self.assertEqual([app["appId"] for app in self.json("apps", "list", "--database", self.url)], ["shop"])

    async def test_server_sees_cli_writes(self) -> None:
        """
        A key store on the same database loads what the CLI wrote.
        """
        self.cli("apps", "create", "shop", "--database", self.url)
        key = self.json("keys", "create", "--app", "shop", "--type", "secret", "--database", self.url)
        database = Database(self.data_dir, self.url)
        store = KeyStore(
            database.open_pool(key_tables.COMPONENT, key_tables.MIGRATIONS, reactor),
            clock=Clock(),
            dialect=POSTGRESQL,
        )
        await store.startService()
        self.addCleanup(store.stopService)
        self.assertEqual(store.key(key["keyId"]).secret, key["secret"])  # type: ignore[union-attr]

    async def test_usage(self) -> None:
        """
        C{usage} reports what a meter flushed to the database.
        """
        self.cli("apps", "create", "shop", "--database", self.url)
        clock = Clock()
        clock.advance(NOW)
        database = Database(self.data_dir, self.url)
        store = UsageStore.with_pool(
            database.open_pool(usage_tables.COMPONENT, usage_tables.MIGRATIONS, reactor), POSTGRESQL
        )
        self.addCleanup(store.close)
        meter = Meter(clock, store)
        meter.startService()
        await meter.loaded
        for _ in range(3):
            await meter.count_message(App("shop"))
        await meter.stopService()
        report = self.json("usage", "--app", "shop", "--database", self.url)
        self.assertEqual(report["messagesUsed"], 3)

    def test_driver_missing(self) -> None:
        """
        Without psycopg2, a PostgreSQL URL is one line saying what to
        install.
        """
        hide_module(self, "psycopg2")
        self.fail_with("pip install 'meteredrt[postgresql]'", "apps", "list", "--database", self.url)

    def test_unreachable(self) -> None:
        """
        A database that cannot be reached is one line on stderr.
        """
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.fail_with("database:", "apps", "list", "--database", f"postgresql://x@127.0.0.1:{port}/none")
