"""
Tests for the public fakes of L{meteredrt.testing}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from meteredrt.apps import App, Key, KeyType, Plan
from meteredrt.broker.memory import MemoryBroker
from meteredrt.interfaces import IBroker, IConnectionSink, IDeliveryTarget, IKeyStore, IMeter, IPresence
from meteredrt.membership import Member
from meteredrt.presence.memory import MemoryPresence
from meteredrt.protocol import ack_frame, error_frame
from meteredrt.testing import (
    HeldAnswers,
    HeldBroker,
    HeldMeter,
    HeldPresence,
    MemoryKeyStore,
    RecordingSink,
)


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


@implementer(IDeliveryTarget)
class _Target:
    """
    An L{IDeliveryTarget} that keeps what it is handed.
    """

    def __init__(self) -> None:
        self.delivered: list[tuple[str, object]] = []

    def deliver(self, app_id: str, envelope: object) -> int:
        self.delivered.append((app_id, envelope))
        return 1


@implementer(IMeter)
class _Meter:
    """
    An L{IMeter} that admits two connections and counts everything.
    """

    def __init__(self) -> None:
        self.live = 0
        self.messages = 0

    def admit_connection(self, app: App) -> Deferred[bool]:
        if self.live == 2:
            return succeed(False)
        self.live += 1
        return succeed(True)

    def release_connection(self, app_id: str) -> None:
        self.live -= 1

    def count_message(self, app: App) -> Deferred[bool]:
        self.messages += 1
        return succeed(True)

    def usage(self, app: App) -> Deferred[dict[str, object]]:
        return succeed({"messages": self.messages})


class HeldAnswersTests(SynchronousTestCase):
    """
    L{HeldAnswers} holds answers back in call order until released.
    """

    def test_passes_through(self) -> None:
        """
        While not holding, the answer itself is returned.
        """
        answers = HeldAnswers()
        answer = succeed(1)
        self.assertIs(answers.hold("f", answer), answer)
        self.assertEqual(answers.pending, [])

    def test_release_by_name(self) -> None:
        """
        C{release} lets through the oldest held answer of one name and
        leaves the others held.
        """
        answers = HeldAnswers()
        answers.holding = True
        first = answers.hold("f", succeed(1))
        other = answers.hold("g", succeed(2))
        second = answers.hold("f", succeed(3))
        self.assertEqual(answers.pending, ["f", "g", "f"])
        answers.release("f")
        self.assertEqual(self.successResultOf(first), 1)
        self.assertNoResult(other)
        self.assertNoResult(second)
        self.assertEqual(answers.pending, ["g", "f"])
        self.assertRaises(KeyError, answers.release, "h")

    def test_fail(self) -> None:
        """
        C{fail} fails the oldest held call of one name with the reason
        given, whatever its answer was.
        """
        answers = HeldAnswers()
        answers.holding = True
        first = answers.hold("f", succeed(1))
        second = answers.hold("f", succeed(2))
        answers.fail("f", ValueError("down"))
        self.failureResultOf(first, ValueError)
        self.assertNoResult(second)
        self.assertEqual(answers.pending, ["f"])
        self.assertRaises(KeyError, answers.fail, "g", ValueError("down"))

    def test_release_all(self) -> None:
        """
        C{release_all} lets everything through, oldest first, including
        answers held by calls made while releasing; failures pass through.
        """
        answers = HeldAnswers()
        answers.holding = True
        order: list[object] = []
        later: list[Deferred[int]] = []
        first = answers.hold("f", succeed(1))

        def call_again(n: int) -> None:
            later.append(answers.hold("f", succeed(n + 1)))
            order.append(n)

        first.addCallback(call_again)
        failed: Deferred[int] = answers.hold("g", fail(ValueError("no")))
        failed.addErrback(lambda f: order.append("failed"))
        answers.release_all()
        self.assertEqual(order, [1, "failed"])
        self.assertEqual(self.successResultOf(later[0]), 2)
        self.assertEqual(answers.pending, [])


class HeldBrokerTests(SynchronousTestCase):
    """
    L{HeldBroker} routes through the wrapped broker at once, holds its
    answers, and keeps track of the interest registered.
    """

    def test_interface(self) -> None:
        """
        It provides L{IBroker}.
        """
        self.assertTrue(verifyObject(IBroker, HeldBroker(MemoryBroker(), HeldAnswers())))

    def test_routes_at_call_time(self) -> None:
        """
        A publish or direct is delivered when made; its answer waits.
        """
        answers = HeldAnswers()
        broker = HeldBroker(MemoryBroker(), answers)
        target = _Target()
        broker.attach(target)
        answers.holding = True
        published = broker.publish("a", "room", "m1")
        directed = broker.direct("a", "p", "m2")
        self.assertEqual(target.delivered, [("a", "m1"), ("a", "m2")])
        self.assertEqual(answers.pending, ["publish", "direct"])
        self.assertNoResult(published)
        answers.release_all()
        self.assertEqual(self.successResultOf(published), 1)
        self.assertEqual(self.successResultOf(directed), 1)

    def test_watched(self) -> None:
        """
        Each kind of interest is recorded when registered and forgotten
        when withdrawn; the answers are held under the method names.
        """
        answers = HeldAnswers()
        broker = HeldBroker(MemoryBroker(), answers)
        answers.holding = True
        broker.watch_channel("a", "room")
        broker.watch_pattern("a", "r/*")
        broker.watch_peer("a", "p")
        self.assertEqual(
            broker.watched, {("channel", "a", "room"), ("pattern", "a", "r/*"), ("peer", "a", "p")}
        )
        broker.unwatch_channel("a", "room")
        broker.unwatch_pattern("a", "r/*")
        broker.unwatch_peer("a", "p")
        self.assertEqual(broker.watched, set())
        self.assertEqual(
            answers.pending,
            ["watch_channel", "watch_pattern", "watch_peer", "unwatch_channel", "unwatch_pattern", "unwatch_peer"],
        )


class HeldPresenceTests(SynchronousTestCase):
    """
    L{HeldPresence} changes the wrapped presence at once and holds its
    answers.
    """

    def test_interface(self) -> None:
        """
        It provides L{IPresence}.
        """
        self.assertTrue(verifyObject(IPresence, HeldPresence(MemoryPresence(), HeldAnswers())))

    def test_changes_at_call_time(self) -> None:
        """
        Each call takes effect when made, and answers on release with what
        the wrapped presence answered then.
        """
        answers = HeldAnswers()
        inner = MemoryPresence()
        presence = HeldPresence(inner, answers)
        answers.holding = True
        added = presence.add_member("a", "room", "p", "c1", {"n": 1}, snapshot=True)
        members = presence.members("a", "room")
        removed = presence.remove_member("a", "room", "p", "c1")
        connected = presence.add_connection("a", "p", "c1")
        connections = presence.connections_of("a", "p")
        disconnected = presence.remove_connection("a", "p", "c1")
        self.assertEqual(self.successResultOf(inner.members("a", "room")), [])
        self.assertEqual(self.successResultOf(inner.connections_of("a", "p")), frozenset())
        self.assertEqual(
            answers.pending,
            ["add_member", "members", "remove_member", "add_connection", "connections_of", "remove_connection"],
        )
        self.assertNoResult(added)
        answers.release_all()
        self.assertIs(self.successResultOf(added).first, True)
        self.assertEqual(self.successResultOf(members), [Member("p", {"n": 1})])
        self.assertEqual(self.successResultOf(removed), Member("p", {"n": 1}))
        self.assertIsNone(self.successResultOf(connected))
        self.assertEqual(self.successResultOf(connections), frozenset({"c1"}))
        self.assertIsNone(self.successResultOf(disconnected))


class HeldMeterTests(SynchronousTestCase):
    """
    L{HeldMeter} decides and counts through the wrapped meter at once and
    holds its answers.
    """

    def test_interface(self) -> None:
        """
        It provides L{IMeter}.
        """
        self.assertTrue(verifyObject(IMeter, HeldMeter(_Meter(), HeldAnswers())))

    def test_counts_at_call_time(self) -> None:
        """
        Admission and counting happen when called; release is immediate.
        """
        answers = HeldAnswers()
        inner = _Meter()
        meter = HeldMeter(inner, answers)
        app = App("a")
        answers.holding = True
        admitted = meter.admit_connection(app)
        counted = meter.count_message(app)
        usage = meter.usage(app)
        self.assertEqual((inner.live, inner.messages), (1, 1))
        self.assertEqual(answers.pending, ["admit_connection", "count_message", "usage"])
        self.assertNoResult(admitted)
        meter.release_connection("a")
        self.assertEqual(inner.live, 0)
        answers.release_all()
        self.assertIs(self.successResultOf(admitted), True)
        self.assertIs(self.successResultOf(counted), True)
        self.assertEqual(self.successResultOf(usage), {"messages": 1})
