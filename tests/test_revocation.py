"""
Revoking a key closes the sessions it authenticated, on a running server,
without a restart: the key store's re-read reports the revoked key and the
hub closes its sessions with 4001 (composed as C{meteredrt.tap.makeService}
composes them). Unit tests on a L{Clock}, a real SQLite key store and the
real CLI.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from meteredrt.apps import KeyType
from meteredrt.auth import mint_token, verify_publishable, verify_token
from meteredrt.broker.memory import MemoryBroker
from meteredrt.hub import Hub
from meteredrt.metering import Meter
from meteredrt.presence.memory import MemoryPresence
from meteredrt.protocol import CloseCode
from meteredrt.store import keys as key_tables
from meteredrt.store.database import Database
from meteredrt.store.keystore import KeyStore
from meteredrt.store.usage import UsageStore
from meteredrt.testing import RecordingSink
from tests.test_cli import NOW, CommandLineMixin


class RevocationTests(CommandLineMixin, TestCase):
    """
    C{meteredrt keys revoke} against a running key store and hub.
    """

    async def test_revoked_sessions_closed(self) -> None:
        """
        Within one re-read of a revocation, the sessions of the revoked
        publishable key and those of JWTs signed by the revoked secret key
        are closed with 4001; sessions of other keys stay open.
        """
        self.cli("apps", "create", "shop")
        pk = self.json("keys", "create", "--app", "shop", "--type", "publishable")["keyId"]
        other_pk = self.json("keys", "create", "--app", "shop", "--type", "publishable")["keyId"]
        sk = self.json("keys", "create", "--app", "shop", "--type", "secret")["keyId"]

        clock = Clock()
        clock.advance(NOW)
        database = Database(self.data_dir)
        pool = database.open_pool(key_tables.COMPONENT, key_tables.MIGRATIONS, reactor)
        store = KeyStore(pool, clock=clock)
        await store.startService()
        self.addCleanup(store.stopService)
        meter = Meter(clock, UsageStore(self.mktemp(), MemoryReactorClock()))
        hub = Hub(MemoryBroker(), MemoryPresence(), meter, store.app)
        store.on_keys_revoked(hub.close_revoked)

        def peer_id() -> str:
            return "p"

        signing_key = store.key(sk)
        assert signing_key is not None
        token = mint_token(signing_key, "alice", now=NOW, expires_in=600)
        sessions = {
            "pk": await hub.connect(RecordingSink, verify_publishable(pk, None, store.key, peer_id)),
            "other": await hub.connect(RecordingSink, verify_publishable(other_pk, None, store.key, peer_id)),
            "jwt": await hub.connect(RecordingSink, verify_token(token, store.key, NOW)),
        }
        sinks = {name: session.sink for name, session in sessions.items()}

        self.cli("keys", "revoke", pk)
        self.cli("keys", "revoke", sk)
        clock.advance(1.9)
        await pool.runInteraction(lambda cursor: None)
        self.assertEqual([sink.closes for sink in sinks.values()], [[], [], []])  # type: ignore[attr-defined]
        clock.advance(0.1)
        await pool.runInteraction(lambda cursor: None)
        revoked = [(CloseCode.INVALID_TOKEN, "key_revoked")]
        self.assertEqual(
            {name: sink.closes for name, sink in sinks.items()},  # type: ignore[attr-defined]
            {"pk": revoked, "other": [], "jwt": revoked},
        )
        self.assertEqual(store.key(pk).type, KeyType.PUBLISHABLE)  # type: ignore[union-attr]
        self.assertFalse(store.key(pk).active)  # type: ignore[union-attr]

    def test_close_revoked_counts(self) -> None:
        """
        L{Hub.close_revoked} closes nothing and says so when no session
        used the keys.
        """
        clock = Clock()
        hub = Hub(MemoryBroker(), MemoryPresence(), Meter(clock, UsageStore(self.mktemp(), MemoryReactorClock())), lambda app_id: None)
        self.assertEqual(hub.close_revoked({"pk_live_nobody"}), 0)
