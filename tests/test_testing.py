"""
Tests for the public fakes of L{meteredrt.testing}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from meteredrt.apps import App, Key, KeyType, Plan
from meteredrt.interfaces import IConnectionSink, IKeyStore
from meteredrt.protocol import ack_frame, error_frame
from meteredrt.testing import MemoryKeyStore, RecordingSink


class RecordingSinkTests(SynchronousTestCase):
    """
    L{RecordingSink} keeps what the hub hands it.
    """

    def test_interface(self) -> None:
        """
        It provides L{IConnectionSink}, with the id it was given.
        """
        sink = RecordingSink("n:1")
        self.assertTrue(verifyObject(IConnectionSink, sink))
        self.assertEqual(sink.conn_id, "n:1")

    def test_frames(self) -> None:
        """
        Frames are kept as given and decoded in order; C{of_type} filters;
        C{clear} forgets them.
        """
        sink = RecordingSink()
        ack = ack_frame("r")
        sink.send_frame(ack)
        sink.send_frame(error_frame("peer_not_found", "gone"))
        self.assertIs(sink.frames[0], ack)
        self.assertEqual(
            sink.decoded,
            [
                {"type": "ack", "requestId": "r"},
                {"type": "error", "code": "peer_not_found", "message": "gone"},
            ],
        )
        self.assertEqual(sink.of_type("ack"), [{"type": "ack", "requestId": "r"}])
        sink.clear()
        self.assertEqual(sink.decoded, [])

    def test_closes(self) -> None:
        """
        Each close is recorded with its code and reason.
        """
        sink = RecordingSink()
        sink.close(4020, "admin_disconnect")
        self.assertEqual(sink.closes, [(4020, "admin_disconnect")])


class MemoryKeyStoreTests(SynchronousTestCase):
    """
    L{MemoryKeyStore} behaves like a key store held in memory.
    """

    def setUp(self) -> None:
        self.store = MemoryKeyStore()

    def test_interface(self) -> None:
        """
        It provides L{IKeyStore}.
        """
        self.assertTrue(verifyObject(IKeyStore, self.store))

    def test_apps(self) -> None:
        """
        Apps are created once, listed by id and found by id.
        """
        self.successResultOf(self.store.create_app("b"))
        self.successResultOf(self.store.create_app("a", Plan(name="FREE")))
        self.failureResultOf(self.store.create_app("a"), ValueError)
        self.assertEqual([app.app_id for app in self.store.apps()], ["a", "b"])
        self.assertEqual(self.store.app("a"), App("a", Plan(name="FREE")))
        self.assertIsNone(self.store.app("c"))

    def test_create_key(self) -> None:
        """
        Created keys get typed ids, a secret for secret keys only, and are
        found by id and by app.
        """
        self.successResultOf(self.store.create_app("a"))
        secret = self.successResultOf(
            self.store.create_key("a", KeyType.SECRET, ("**",), frozenset({"send"}))
        )
        public = self.successResultOf(
            self.store.create_key("a", KeyType.PUBLISHABLE, ("p/**",), frozenset({"subscribe"}), ("https://x",))
        )
        self.assertTrue(secret.key_id.startswith("sk_id_"))
        self.assertTrue(secret.secret.startswith("sk_secret_"))
        self.assertTrue(public.key_id.startswith("pk_live_"))
        self.assertIsNone(public.secret)
        self.assertEqual(public.allowed_origins, ("https://x",))
        self.assertEqual(self.store.key(secret.key_id), secret)
        self.assertEqual(
            sorted(k.key_id for k in self.store.keys_of("a")), sorted([secret.key_id, public.key_id])
        )
        self.assertEqual(self.store.keys_of("b"), [])
        self.failureResultOf(self.store.create_key("zz", KeyType.SECRET, ("**",), frozenset()), ValueError)

    def test_revoke(self) -> None:
        """
        A revoked key is still found but no longer active.
        """
        key = self.store.add_key(Key("pk_live_1", "a", KeyType.PUBLISHABLE, ("**",), frozenset()))
        self.assertTrue(self.successResultOf(self.store.revoke_key(key.key_id)))
        self.assertFalse(self.store.key(key.key_id).active)
        self.assertFalse(self.successResultOf(self.store.revoke_key("pk_live_none")))

    def test_set_plan(self) -> None:
        """
        A new plan replaces the app's plan.
        """
        self.store.add_app(App("a", suspended=True))
        app = self.successResultOf(self.store.set_plan("a", Plan(max_concurrent_connections=3)))
        self.assertEqual(app, App("a", Plan(max_concurrent_connections=3), suspended=True))
        self.assertEqual(self.store.app("a"), app)
        self.failureResultOf(self.store.set_plan("b", None), ValueError)
