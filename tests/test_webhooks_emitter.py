"""
Tests for L{meteredrt.webhooks.emitter.WebhookEmitter}: debouncing,
ordering, recovery after a crash, and writing to the outbox.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from meteredrt.apps import WebhookConfig
from meteredrt.interfaces import IPresenceObserver
from meteredrt.webhooks.emitter import MAX_UNWRITTEN, WebhookEmitter
from meteredrt.webhooks.events import WebhookEvent
from meteredrt.webhooks.marks import Announcement, MemoryMarks
from meteredrt.webhooks.outbox import CHANNEL, PEER, MemoryOutbox, OnlineMark

CONFIG = WebhookConfig(url="http://127.0.0.1:1/hooks", secret="s" * 32, offline_grace_seconds=3.0)


class HeldOutbox(MemoryOutbox):
    """
    A memory outbox whose appends wait until released (or fail), to see
    what the emitter does while a write is on its way.
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[Deferred[None], list[WebhookEvent], list[OnlineMark]]] = []

    def append(self, events, marks):  # type: ignore[no-untyped-def]
        held: Deferred[None] = Deferred()
        self.waiting.append((held, list(events), list(marks)))
        return held

    def release(self) -> None:
        held, events, marks = self.waiting.pop(0)
        MemoryOutbox.append(self, events, marks)
        held.callback(None)


class EmitterTests(SynchronousTestCase):
    """
    Presence transitions in, stored events out.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.outbox = MemoryOutbox()
        self.configs = {"a": CONFIG}
        self.woken: list[str] = []
        self.emitter = self._emitter(self.outbox)

    def _emitter(self, outbox: MemoryOutbox) -> WebhookEmitter:
        emitter = WebhookEmitter(self.configs.get, outbox, self.clock, on_stored=self.woken.append)
        emitter.startService()
        self.successResultOf(emitter.loaded)
        return emitter

    def stored(self, app_id: str = "a") -> list[tuple[str, str | None, str | None]]:
        batch = self.successResultOf(self.outbox.next_batch(app_id, 1000))
        return [(s.event.type, s.event.peer_id, s.event.channel) for s in batch]

    def test_interface(self) -> None:
        """
        The emitter is what the hub calls.
        """
        self.assertTrue(verifyObject(IPresenceObserver, self.emitter))

    def test_online_then_offline_after_grace(self) -> None:
        """
        A first connection sends C{peer.online} at once; the last close sends
        C{peer.offline} exactly once, only when the grace has passed.
        """
        self.emitter.peer_connected("a", "alice")
        self.assertEqual(self.stored(), [("peer.online", "alice", None)])
        self.assertEqual(self.woken, ["a"])
        self.emitter.peer_disconnected("a", "alice")
        self.clock.advance(2.9)
        self.assertEqual(len(self.stored()), 1)
        self.clock.advance(0.2)
        self.assertEqual(self.stored(), [("peer.online", "alice", None), ("peer.offline", "alice", None)])
        self.emitter.peer_disconnected("a", "alice")
        self.clock.advance(10)
        self.assertEqual(len(self.stored()), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timestamps(self) -> None:
        """
        Events carry the time of the transition in milliseconds, and the
        offline one the time the grace ran out.
        """
        self.emitter.peer_connected("a", "alice")
        self.emitter.peer_disconnected("a", "alice")
        self.clock.advance(3)
        batch = self.successResultOf(self.outbox.next_batch("a", 10))
        self.assertEqual([s.event.timestamp_ms for s in batch], [1_000_000, 1_003_000])

    def test_reconnect_inside_grace(self) -> None:
        """
        A reload (close, then connect inside the grace) sends nothing.
        """
        self.emitter.peer_connected("a", "alice")
        self.emitter.peer_disconnected("a", "alice")
        self.clock.advance(2.5)
        self.emitter.peer_connected("a", "alice")
        self.clock.advance(100)
        self.assertEqual(self.stored(), [("peer.online", "alice", None)])
        self.assertEqual(self.successResultOf(self.outbox.online_marks()), [OnlineMark("a", PEER, "alice")])

    def test_reconnect_after_grace(self) -> None:
        """
        Coming back after the grace is a new C{peer.online}.
        """
        self.emitter.peer_connected("a", "alice")
        self.emitter.peer_disconnected("a", "alice")
        self.clock.advance(3)
        self.emitter.peer_connected("a", "alice")
        self.assertEqual([t for t, _, _ in self.stored()], ["peer.online", "peer.offline", "peer.online"])

    def test_channel_occupied_and_vacated(self) -> None:
        """
        The first member of a channel sends C{channel.occupied}; the last
        one leaving sends C{channel.vacated} after the grace; presence
        deltas are mirrored at once with the member's metadata.
        """
        self.emitter.channel_occupied("a", "room")
        self.emitter.member_joined("a", "room", "alice", {"n": 1})
        self.emitter.member_joined("a", "room", "bob", None)
        self.emitter.member_left("a", "room", "alice", {"n": 1})
        self.emitter.member_left("a", "room", "bob", None)
        self.emitter.channel_vacated("a", "room")
        self.clock.advance(2.9)
        self.assertNotIn(("channel.vacated", None, "room"), self.stored())
        self.clock.advance(0.1)
        self.assertEqual(
            self.stored(),
            [
                ("channel.occupied", None, "room"),
                ("presence.joined", "alice", "room"),
                ("presence.joined", "bob", "room"),
                ("presence.left", "alice", "room"),
                ("presence.left", "bob", "room"),
                ("channel.vacated", None, "room"),
            ],
        )
        batch = self.successResultOf(self.outbox.next_batch("a", 10))
        self.assertEqual(batch[1].event.metadata, {"n": 1})

    def test_channel_refilled_inside_grace(self) -> None:
        """
        A channel that empties and fills again inside the grace is never
        reported vacated.
        """
        self.emitter.channel_occupied("a", "room")
        self.emitter.channel_vacated("a", "room")
        self.emitter.channel_occupied("a", "room")
        self.clock.advance(10)
        self.assertNotIn("channel.vacated", [t for t, _, _ in self.stored()])
        self.assertEqual([t for t, _, _ in self.stored()].count("channel.occupied"), 1)

    def test_event_filter(self) -> None:
        """
        Only the event types an app asked for are stored, but the marks are
        kept for all, so an unwanted online still gets its wanted offline.
        """
        self.configs["a"] = WebhookConfig(url=CONFIG.url, secret=CONFIG.secret, events=frozenset({"peer.offline"}))
        self.emitter.peer_connected("a", "alice")
        self.emitter.channel_occupied("a", "room")
        self.emitter.member_joined("a", "room", "alice", None)
        self.assertEqual(self.stored(), [])
        self.emitter.peer_disconnected("a", "alice")
        self.clock.advance(3)
        self.assertEqual(self.stored(), [("peer.offline", "alice", None)])

    def test_app_without_webhooks(self) -> None:
        """
        Apps without webhooks leave no trace: no events, marks or timers.
        """
        self.emitter.peer_connected("z", "alice")
        self.emitter.channel_occupied("z", "room")
        self.emitter.member_joined("z", "room", "alice", None)
        self.emitter.member_left("z", "room", "alice", None)
        self.emitter.channel_vacated("z", "room")
        self.emitter.peer_disconnected("z", "alice")
        self.assertEqual(self.successResultOf(self.outbox.online_marks()), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.woken, [])

    def test_recovery_after_crash(self) -> None:
        """
        Marks an earlier run left are announced gone after the grace, once,
        unless the peer or channel comes back first.
        """
        self.outbox.append([], [OnlineMark("a", PEER, "alice"), OnlineMark("a", PEER, "bob"),
                                OnlineMark("a", CHANNEL, "room")])
        emitter = self._emitter(self.outbox)
        emitter.peer_connected("a", "bob")
        self.clock.advance(3)
        self.assertEqual(sorted(self.stored()), [("channel.vacated", None, "room"), ("peer.offline", "alice", None)])
        self.assertEqual(self.successResultOf(self.outbox.online_marks()), [OnlineMark("a", PEER, "bob")])

    def test_recover_later(self) -> None:
        """
        Recovering again with a delay longer than the grace (after Redis
        lost the marks) announces the outbox's unknown marks gone only
        after the delay; known ones are left alone.
        """
        self.emitter.peer_connected("a", "alice")
        self.outbox.append([], [OnlineMark("a", PEER, "bob")])
        self.successResultOf(self.emitter.recover(10))
        self.clock.advance(9.9)
        self.assertEqual(self.stored(), [("peer.online", "alice", None)])
        self.clock.advance(0.1)
        self.assertEqual(self.stored(), [("peer.online", "alice", None), ("peer.offline", "bob", None)])
        self.clock.advance(100)
        self.assertEqual(len(self.stored()), 2)

    def test_stop_keeps_marks(self) -> None:
        """
        A graceful stop inside the grace sends nothing and keeps the mark,
        so the next start announces the peer gone unless it comes back.
        """
        self.emitter.peer_connected("a", "alice")
        self.emitter.peer_disconnected("a", "alice")
        self.successResultOf(self.emitter.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        restarted = self._emitter(self.outbox)
        restarted.peer_connected("a", "alice")
        self.clock.advance(10)
        self.assertEqual(self.stored(), [("peer.online", "alice", None)])

    def test_one_write_at_a_time_in_order(self) -> None:
        """
        While a write is on its way, later events wait and go in the next
        write, in order; stop waits for both.
        """
        outbox = HeldOutbox()
        emitter = WebhookEmitter(self.configs.get, outbox, self.clock, on_stored=self.woken.append)
        emitter.peer_connected("a", "alice")
        emitter.peer_connected("a", "bob")
        emitter.peer_connected("a", "carol")
        self.assertEqual(len(outbox.waiting), 1)
        stopped = emitter.stopService()
        outbox.release()
        self.assertNoResult(stopped)
        self.assertEqual([e.peer_id for e in outbox.waiting[0][1]], ["bob", "carol"])
        outbox.release()
        self.successResultOf(stopped)
        batch = self.successResultOf(outbox.next_batch("a", 10))
        self.assertEqual([s.event.peer_id for s in batch], ["alice", "bob", "carol"])
        self.assertEqual(self.woken, ["a", "a"])

    def test_failed_write_retried(self) -> None:
        """
        A failed write is logged and retried a second later with the same
        events first, then the newer ones.
        """
        outbox = HeldOutbox()
        emitter = WebhookEmitter(self.configs.get, outbox, self.clock, on_stored=self.woken.append)
        emitter.startService()
        emitter.peer_connected("a", "alice")
        held, _, _ = outbox.waiting.pop(0)
        held.errback(OSError("disk full"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        emitter.peer_connected("a", "bob")
        self.assertEqual(outbox.waiting, [])
        self.clock.advance(1)
        self.assertEqual([e.peer_id for e in outbox.waiting[0][1]], ["alice", "bob"])

    def test_bounded(self) -> None:
        """
        With the store stuck, at most C{max_unwritten} events wait (by
        default L{MAX_UNWRITTEN}); more are dropped and counted, with an
        error in the log.
        """
        self.assertEqual(MAX_UNWRITTEN, 100_000)
        outbox = HeldOutbox()
        emitter = WebhookEmitter(self.configs.get, outbox, self.clock, on_stored=self.woken.append, max_unwritten=10)
        for i in range(16):
            emitter.peer_connected("a", f"p{i}")
        # One is being written, ten wait, five are dropped.
        self.assertEqual(emitter.dropped, 5)
        self.assertEqual(len(outbox.waiting), 1)




class HeldMarks(MemoryMarks):
    """
    Memory marks whose arrivals answer only when released, as shared marks
    answer after a round trip.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[list[Announcement]], list[Announcement]]] = []

    def arrived(self, where, now, event_id):  # type: ignore[no-untyped-def]
        held: Deferred[list[Announcement]] = Deferred()
        MemoryMarks.arrived(self, where, now, event_id).addCallback(lambda answer: self.held.append((held, answer)))
        return held

    def release(self) -> None:
        held, answer = self.held.pop(0)
        held.callback(answer)


class SharedMarksEmitterTests(SynchronousTestCase):
    """
    The emitter over marks that answer later or that other emitters share,
    as in a cluster (here: one L{MemoryMarks} shared by two emitters).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000)
        self.outbox = MemoryOutbox()

    def emitter(self, marks: MemoryMarks, sweep_seconds: float | None = None) -> WebhookEmitter:
        emitter = WebhookEmitter({"a": CONFIG}.get, self.outbox, self.clock, on_stored=lambda app_id: None,
                                 marks=marks, sweep_seconds=sweep_seconds)
        emitter.startService()
        return emitter

    def stored(self) -> list[tuple[str, str | None, str | None]]:
        batch = self.successResultOf(self.outbox.next_batch("a", 1000))
        return [(s.event.type, s.event.peer_id, s.event.channel) for s in batch]

    def test_decisions_stored_in_order(self) -> None:
        """
        A presence delta that follows a transition the marks have not
        answered yet waits for it: events are stored in the order they came.
        """
        marks = HeldMarks()
        emitter = self.emitter(marks)
        emitter.peer_connected("a", "alice")
        emitter.channel_occupied("a", "room")
        emitter.member_joined("a", "room", "alice", None)
        self.assertEqual(self.stored(), [])
        marks.release()
        self.assertEqual(self.stored(), [("peer.online", "alice", None)])
        marks.release()
        self.assertEqual(
            self.stored(),
            [("peer.online", "alice", None), ("channel.occupied", None, "room"), ("presence.joined", "alice", "room")],
        )

    def test_other_emitter_sweeps(self) -> None:
        """
        A going-away started by an emitter that stopped (its node died) is
        announced by another emitter's periodic sweep, once.
        """
        marks = MemoryMarks()
        first = self.emitter(marks)
        second = self.emitter(marks, sweep_seconds=1.0)
        first.peer_connected("a", "alice")
        first.peer_disconnected("a", "alice")
        first.stopService()
        self.clock.advance(2)
        self.assertEqual(self.stored(), [("peer.online", "alice", None)])
        self.clock.advance(1)
        self.clock.advance(10)
        self.assertEqual(self.stored(), [("peer.online", "alice", None), ("peer.offline", "alice", None)])
        self.successResultOf(second.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_arrival_after_stored_going_away(self) -> None:
        """
        A peer that comes back while its offline is being written is
        announced online once that write is done, not before.
        """
        outbox = HeldOutbox()
        self.outbox = outbox
        emitter = self.emitter(MemoryMarks())
        emitter.peer_connected("a", "alice")
        outbox.release()
        emitter.peer_disconnected("a", "alice")
        self.clock.advance(3)
        self.assertEqual([e.type for e in outbox.waiting[0][1]], ["peer.offline"])
        emitter.peer_connected("a", "alice")
        self.assertEqual(len(outbox.waiting), 1)
        outbox.release()
        self.assertEqual([e.type for e in outbox.waiting[0][1]], ["peer.online"])
        outbox.release()
        self.assertEqual([t for t, _, _ in self.stored()], ["peer.online", "peer.offline", "peer.online"])

    def test_dropped_arrival_blocks_nothing(self) -> None:
        """
        An online dropped because the outbox is stuck does not hold up the
        peer's offline later.
        """
        outbox = HeldOutbox()
        self.outbox = outbox
        emitter = WebhookEmitter({"a": CONFIG}.get, outbox, self.clock, on_stored=lambda app_id: None,
                                 max_unwritten=1)
        emitter.peer_connected("a", "p0")
        emitter.peer_connected("a", "p1")
        emitter.peer_connected("a", "alice")
        self.assertEqual(emitter.dropped, 1)
        self.flushLoggedErrors()
        emitter.peer_disconnected("a", "alice")
        outbox.release()
        outbox.release()
        self.assertEqual(outbox.waiting, [])
        self.clock.advance(3)
        self.assertEqual([(e.type, e.peer_id) for e in outbox.waiting[0][1]], [("peer.offline", "alice")])

    def test_flushed_waits_for_marks(self) -> None:
        """
        A stop waits for the marks to answer what was decided before it,
        and stores the answer.
        """
        marks = HeldMarks()
        emitter = self.emitter(marks)
        emitter.peer_connected("a", "alice")
        stopped = emitter.stopService()
        self.assertNoResult(stopped)
        marks.release()
        self.successResultOf(stopped)
        self.assertEqual(self.stored(), [("peer.online", "alice", None)])

    def test_no_timer_after_stop(self) -> None:
        """
        A last connection that closes after the emitter stopped (the node
        reaping itself on its way out) is handed to the marks, with no
        timer left behind.
        """
        marks = MemoryMarks()
        emitter = self.emitter(marks)
        emitter.peer_connected("a", "alice")
        self.successResultOf(emitter.stopService())
        emitter.peer_disconnected("a", "alice")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.successResultOf(marks.due(self.clock.seconds() + 3))), 1)

    def test_sweep_failures_logged_once(self) -> None:
        """
        Sweeps failing one after the other (Redis away) are logged once,
        and once more when a sweep works again.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        marks = MemoryMarks()
        broken = [True]
        working_due = marks.due

        def due(now: float) -> Deferred[list[Announcement]]:
            return fail(OSError("Redis away")) if broken[0] else working_due(now)

        marks.due = due  # type: ignore[method-assign]
        self.emitter(marks, sweep_seconds=1.0)
        self.clock.advance(1)
        self.clock.advance(1)
        broken[0] = False
        self.clock.advance(1)
        self.clock.advance(1)
        texts = [formatEvent(event) for event in logged if "sweep" in formatEvent(event).lower()]
        self.assertEqual(texts, ["Could not sweep the webhook marks: Redis away; retrying",
                                 "Sweeping the webhook marks works again"])
