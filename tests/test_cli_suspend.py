"""
Tests for C{meteredrt apps suspend} and C{meteredrt apps resume}, end to end:
the CLI writes the flag, and a running key store and hub act on it at the
next re-read.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.broker.memory import MemoryBroker
from meteredrt.hub import Hub
from meteredrt.keystore import SQLiteKeyStore, open_pool, prepare_database
from meteredrt.metering import Meter
from meteredrt.presence.memory import MemoryPresence
from meteredrt.protocol import CloseCode
from meteredrt.testing import RecordingSink
from meteredrt.usagestore import UsageStore
from tests.test_cli import CommandLineMixin
from tests.test_hub import make_grant


class SuspendCommandTests(CommandLineMixin, SynchronousTestCase):
    """
    Tests for C{meteredrt apps suspend} and C{meteredrt apps resume}.
    """

    def status(self, app_id: str, *argv: str) -> bool:
        """
        Whether C{apps list} shows the app suspended.
        """
        [app] = [app for app in self.json("apps", "list", *argv) if app["appId"] == app_id]
        suspended: bool = app["suspended"]
        return suspended

    def test_round_trip(self) -> None:
        """
        A suspended app is listed as suspended, a resumed one as active
        again; either command prints the app with C{--json}.
        """
        self.cli("apps", "create", "shop")
        app = self.json("apps", "suspend", "shop")
        self.assertEqual(app, {"appId": "shop", "source": "store", "suspended": True, "plan": None, "activeKeys": 0})
        self.assertTrue(self.status("shop"))
        out, _ = self.cli("apps", "list")
        self.assertEqual(out.splitlines()[1].split(), ["shop", "store", "-", "0", "suspended"])
        self.assertFalse(self.json("apps", "resume", "shop")["suspended"])
        self.assertFalse(self.status("shop"))

    def test_idempotent(self) -> None:
        """
        Suspending a suspended app, or resuming an active one, succeeds and
        changes nothing.
        """
        self.cli("apps", "create", "shop")
        self.cli("apps", "resume", "shop")
        self.assertFalse(self.status("shop"))
        self.cli("apps", "suspend", "shop")
        self.cli("apps", "suspend", "shop")
        self.assertTrue(self.status("shop"))

    def test_text(self) -> None:
        """
        Without C{--json} the commands say what they did and when a running
        server applies it.
        """
        self.cli("apps", "create", "shop")
        out, err = self.cli("apps", "suspend", "shop")
        self.assertEqual(err, "")
        self.assertEqual(out.splitlines()[0], "Suspended app shop.")
        self.assertIn("(4012) within about 2 s", out)
        out, _ = self.cli("apps", "resume", "shop")
        self.assertEqual(out.splitlines()[0], "Resumed app shop.")

    def test_declared_app(self) -> None:
        """
        An app declared in the configuration file is suspended through a
        stored flag (its row is stored now, as for C{keys create}), keeping
        its declared plan; without C{--config} it is unknown until then.
        """
        config = self.write_config()
        self.fail_with("meteredrt: error: no app 'app_demo'", "apps", "suspend", "app_demo")
        app = self.json("apps", "suspend", "app_demo", "--config", config)
        self.assertEqual((app["source"], app["suspended"], app["plan"]["name"]), ("config", True, "FREE"))
        self.assertTrue(self.status("app_demo", "--config", config))
        stored = self.json("apps", "list")
        self.assertEqual(stored, [{"appId": "app_demo", "source": "store", "suspended": True, "plan": None, "activeKeys": 0}])
        self.assertFalse(self.json("apps", "resume", "app_demo", "--config", config)["suspended"])
        self.assertFalse(self.status("app_demo", "--config", config))

    def test_unknown_app(self) -> None:
        """
        Suspending or resuming an unknown app fails in one line.
        """
        self.fail_with("meteredrt: error: no app 'nope'", "apps", "suspend", "nope")
        self.fail_with("meteredrt: error: no app 'nope'", "apps", "resume", "nope")

    def test_app_required(self) -> None:
        """
        The app id is required.
        """
        self.fail_with("APP_ID", "apps", "suspend")


class SuspensionReloadTests(CommandLineMixin, TestCase):
    """
    A suspension made with the CLI reaches a running server without a
    restart: the key store's re-read tells the hub, which closes the app's
    connections (composed as C{meteredrt.tap.makeService} composes them).
    """

    async def test_connections_closed_within_seconds(self) -> None:
        """
        After the next re-read, the suspended app's connections are closed
        with 4012 and other apps' are not, then or on resumption.
        """
        self.cli("apps", "create", "shop")
        self.cli("apps", "create", "other")
        clock = Clock()
        pool = open_pool(prepare_database(self.data_dir), reactor)
        store = SQLiteKeyStore(pool, clock=clock)
        await store.startService()
        self.addCleanup(store.stopService)
        meter = Meter(clock, UsageStore(self.mktemp(), MemoryReactorClock()))
        hub = Hub(MemoryBroker(), MemoryPresence(), meter, store.app)
        store.on_apps_changed(hub.close_suspended)
        shop = await hub.connect(RecordingSink, make_grant("alice", app_id="shop"))
        other = await hub.connect(RecordingSink, make_grant("alice", app_id="other"))
        assert isinstance(shop.sink, RecordingSink) and isinstance(other.sink, RecordingSink)

        self.cli("apps", "suspend", "shop")
        clock.advance(1.9)
        await pool.runInteraction(lambda cursor: None)
        self.assertEqual(shop.sink.closes, [])
        clock.advance(0.1)
        await pool.runInteraction(lambda cursor: None)
        self.assertEqual(shop.sink.closes, [(CloseCode.ACCOUNT_SUSPENDED, "account_suspended")])
        self.assertEqual(other.sink.closes, [])

        await hub.disconnect(shop)
        self.cli("apps", "resume", "shop")
        clock.advance(2)
        await pool.runInteraction(lambda cursor: None)
        self.assertFalse(store.app("shop").suspended)  # type: ignore[union-attr]
        self.assertEqual(other.sink.closes, [])
        self.assertEqual(list(hub.sessions()), [other])
