"""
Tests for L{meteredrt.webhooks.dispatcher}: batches, signatures, order,
and the retry schedule, against a receiver resource served by
L{treq.testing.StubTreq} and an injected clock.
"""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from meteredrt.apps import WebhookConfig
from meteredrt.backend import verify_webhook
from meteredrt.webhooks.dispatcher import (
    BACKLOG_WARNING,
    FIRST_RETRY_SECONDS,
    MAX_ANSWER_BYTES,
    MAX_RETRY_SECONDS,
    WebhookDispatcher,
    retry_delay,
)
from meteredrt.webhooks.events import MAX_BATCH_EVENTS, PEER_ONLINE, new_event
from meteredrt.webhooks.outbox import MemoryOutbox

SECRET = "s" * 32
CONFIG = WebhookConfig(url="http://hooks.example/in", secret=SECRET, retry_seconds=3600)


class Receiver(Resource):
    """
    A backend: answers each POST with the next status of C{statuses}
    (then 200), or holds it when the status is C{None}; keeps what it got.
    """

    isLeaf = True

    def __init__(self, clock: Clock, statuses: list[int | None] | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.statuses = list(statuses or [])
        self.received: list[tuple[str | None, bytes]] = []
        self.held: list[Request] = []

    def render_POST(self, request: Request) -> bytes | int:
        body = request.content.read()
        header = request.getHeader("Metered-Signature")
        self.received.append((header, body))
        status = self.statuses.pop(0) if self.statuses else 200
        if status is None:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(status)
        return b"ok"

    def events(self) -> list[dict]:
        """
        Every event received, verified, in arrival order.
        """
        out = []
        for header, body in self.received:
            out.extend(verify_webhook(SECRET, header, body, now=self.clock.seconds()))
        return out


class _EndlessAnswer(Resource):
    """
    A backend that answers 200 and then writes its answer in 64 KiB chunks
    for as long as anybody reads, never finishing it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0
        self.written = 0

    def render_POST(self, request: Request) -> int:
        self.answered += 1
        request.setResponseCode(200)
        chunk = b"x" * 65536
        # Bounded: far past any sane cap, and it stops once the reader does.
        while self.written < 64 * 1024 * 1024 and not request._disconnected:
            request.write(chunk)
            self.written += len(chunk)
        return NOT_DONE_YET


class RetryDelayTests(SynchronousTestCase):
    """
    The backoff schedule.
    """

    def test_exponential_with_cap(self) -> None:
        """
        Each retry waits twice as long as the one before, up to the cap;
        jitter scales by [0.5, 1).
        """
        self.assertEqual([retry_delay(n, 0.999999) // 1 for n in range(1, 6)], [0, 1, 3, 7, 15])
        self.assertEqual(retry_delay(1, 0.0), FIRST_RETRY_SECONDS / 2)
        self.assertEqual(retry_delay(50, 0.0), MAX_RETRY_SECONDS / 2)
        self.assertEqual(retry_delay(10_000, 0.5), MAX_RETRY_SECONDS * 0.75)


class DispatcherTests(SynchronousTestCase):
    """
    Delivery of stored events.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = MemoryOutbox()
        self.configs = {"a": CONFIG}

    def start(self, receiver: Receiver) -> WebhookDispatcher:
        self.stub = StubTreq(receiver)
        dispatcher = WebhookDispatcher(self.configs.get, self.outbox, self.stub, self.clock, rand=lambda: 0.5, timeout=10)
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        return dispatcher

    def add(self, count: int, app_id: str = "a", first: int = 0) -> None:
        self.outbox.append([new_event(PEER_ONLINE, app_id, 1.0, peer_id=f"p{first + i}") for i in range(count)], [])

    def pending(self, app_id: str = "a") -> int:
        return self.successResultOf(self.outbox.status(app_id)).pending

    def test_delivers_pending_at_start(self) -> None:
        """
        Events pending from an earlier run go out at start, signed, in order,
        and are then forgotten.
        """
        self.add(3)
        receiver = Receiver(self.clock)
        self.start(receiver)
        self.assertEqual([e["peerId"] for e in receiver.events()], ["p0", "p1", "p2"])
        self.assertEqual(self.pending(), 0)
        status = self.successResultOf(self.outbox.status("a"))
        self.assertEqual((status.delivered, status.last_success_at), (3, self.clock.seconds()))

    def test_batches(self) -> None:
        """
        At most L{MAX_BATCH_EVENTS} events go in one POST.
        """
        self.add(MAX_BATCH_EVENTS + 1)
        receiver = Receiver(self.clock)
        self.start(receiver)
        self.assertEqual([len(json.loads(body)["events"]) for _, body in receiver.received], [MAX_BATCH_EVENTS, 1])

    def test_wake(self) -> None:
        """
        Events stored later go out when the emitter wakes the dispatcher.
        """
        receiver = Receiver(self.clock)
        dispatcher = self.start(receiver)
        self.add(1)
        self.assertEqual(receiver.received, [])
        dispatcher.wake("a")
        self.assertEqual(len(receiver.events()), 1)

    def test_wake_while_sending(self) -> None:
        """
        Events stored while a batch is on its way go in the next batch.
        """
        receiver = Receiver(self.clock, [None])
        dispatcher = self.start(receiver)
        self.add(1)
        dispatcher.wake("a")
        self.add(1, first=1)
        dispatcher.wake("a")
        self.assertEqual(len(receiver.received), 1)
        request = receiver.held.pop()
        request.setResponseCode(200)
        request.finish()
        self.stub.flush()
        self.assertEqual([e["peerId"] for e in receiver.events()], ["p0", "p1"])
        self.assertEqual(self.pending(), 0)

    def test_5xx_retried_with_backoff(self) -> None:
        """
        A 5xx is retried, the same batch with the same ids, after 0.75 s,
        1.5 s, 3 s (with this jitter); nothing else goes out meanwhile.
        """
        self.add(2)
        receiver = Receiver(self.clock, [500, 503, 502])
        self.start(receiver)
        self.assertEqual(len(receiver.received), 1)
        for wait, count in [(0.74, 1), (0.02, 2), (1.49, 2), (0.02, 3), (2.99, 3), (0.02, 4)]:
            self.clock.advance(wait)
            self.assertEqual(len(receiver.received), count)
        bodies = {body for _, body in receiver.received}
        self.assertEqual(len(bodies), 1)
        self.assertEqual(self.pending(), 0)
        status = self.successResultOf(self.outbox.status("a"))
        self.assertEqual(status.last_error, "the receiver answered HTTP 502")

    def test_signed_at_each_attempt(self) -> None:
        """
        A retry is signed with the time it is sent, so it passes the
        receiver's replay window however late it comes.
        """
        self.add(1)
        receiver = Receiver(self.clock, [500] * 12)
        self.start(receiver)
        self.clock.pump([MAX_RETRY_SECONDS] * 13)
        self.assertEqual(len(receiver.received), 13)
        self.assertEqual(len(verify_webhook(SECRET, *receiver.received[-1], now=self.clock.seconds())), 1)

    def test_408_and_429_retried(self) -> None:
        """
        408 and 429 mean "later", like a 5xx.
        """
        self.add(1)
        receiver = Receiver(self.clock, [408, 429])
        self.start(receiver)
        self.clock.pump([1, 2])
        self.assertEqual(len(receiver.received), 3)
        self.assertEqual(self.pending(), 0)

    def test_4xx_fails_at_once(self) -> None:
        """
        Any other 4xx sets the batch aside as failed at once, and delivery
        goes on with the next batch.
        """
        self.add(MAX_BATCH_EVENTS + 1)
        receiver = Receiver(self.clock, [400])
        self.start(receiver)
        self.assertEqual(len(receiver.received), 2)
        status = self.successResultOf(self.outbox.status("a"))
        self.assertEqual((status.pending, status.failed), (0, MAX_BATCH_EVENTS))
        self.assertEqual(status.last_error, "the receiver answered HTTP 400")
        self.flushLoggedErrors()

    def test_redirect_not_followed(self) -> None:
        """
        A 3xx is not followed (it could point the signed batch anywhere)
        and sets the batch aside at once.
        """
        self.add(1)
        receiver = Redirecting()
        self.start(receiver)  # type: ignore[arg-type]
        self.assertEqual(receiver.requests, ["POST"])
        status = self.successResultOf(self.outbox.status("a"))
        self.assertEqual((status.pending, status.failed), (0, 1))
        self.assertEqual(status.last_error, "the receiver answered HTTP 303")
        self.flushLoggedErrors()

    def test_gives_up_after_retry_time(self) -> None:
        """
        A batch still refused when the app's retry time is over is set
        aside as failed; the last wait is cut to end at that time.
        """
        self.configs["a"] = WebhookConfig(url=CONFIG.url, secret=SECRET, retry_seconds=10)
        self.add(1)
        receiver = Receiver(self.clock, [500] * 100)
        self.start(receiver)
        self.clock.pump([0.5] * 40)
        status = self.successResultOf(self.outbox.status("a"))
        self.assertEqual((status.pending, status.failed), (0, 1))
        attempts = len(receiver.received)
        self.clock.advance(1000)
        self.assertEqual(len(receiver.received), attempts)

    def test_replayed_events_go_again(self) -> None:
        """
        After a replay (by another process: nobody wakes the dispatcher),
        failed events go out again with the same ids within a poll.
        """
        self.add(1)
        receiver = Receiver(self.clock, [400])
        self.start(receiver)
        self.flushLoggedErrors()
        first_id = json.loads(receiver.received[0][1])["events"][0]["id"]
        self.assertEqual(self.successResultOf(self.outbox.replay_failed("a")), 1)
        self.clock.advance(5)
        self.assertEqual(json.loads(receiver.received[1][1])["events"][0]["id"], first_id)
        self.assertEqual(self.pending(), 0)

    def test_timeout(self) -> None:
        """
        A receiver that does not answer within the timeout is retried.
        """
        self.add(1)
        receiver = Receiver(self.clock, [None])
        self.start(receiver)
        self.clock.advance(10)
        status = self.successResultOf(self.outbox.status("a"))
        self.assertEqual(status.last_error, "no answer within 10 s")
        self.clock.advance(0.75)
        self.assertEqual(len(receiver.received), 2)
        self.assertEqual(self.pending(), 0)

    def test_endless_answer_cut_off(self) -> None:
        """
        A receiver that accepts the batch and then streams an answer body
        without end is counted as having accepted it once the answer passes
        L{MAX_ANSWER_BYTES}: the body is dropped as it comes, never kept
        whole, and the exchange does not wait for the timeout.
        """
        self.add(1)
        receiver = _EndlessAnswer()
        self.start(receiver)
        self.assertEqual(receiver.answered, 1)
        self.assertGreater(receiver.written, MAX_ANSWER_BYTES)
        self.assertEqual(self.pending(), 0)
        self.assertIsNone(self.successResultOf(self.outbox.status("a")).last_error)

    def test_network_error(self) -> None:
        """
        A request that fails on the network is retried.
        """
        self.add(1)
        dispatcher = WebhookDispatcher(self.configs.get, self.outbox, _Refusing(), self.clock, rand=lambda: 0.5)
        dispatcher.startService()
        self.addCleanup(dispatcher.stopService)
        status = self.successResultOf(self.outbox.status("a"))
        self.assertIn("ConnectionRefusedError", status.last_error or "")
        self.assertEqual(status.pending, 1)

    def test_apps_apart(self) -> None:
        """
        A receiver that is down for one app does not hold back another's.
        """
        self.configs["b"] = WebhookConfig(url="http://b.example/in", secret=SECRET)
        self.add(1, "a")
        self.add(1, "b")
        receiver = Receiver(self.clock, [None])
        self.start(receiver)
        self.assertEqual(len(receiver.received), 2)
        self.assertEqual(self.pending("b"), 0)
        self.assertEqual(self.pending("a"), 1)

    def test_stop_cancels(self) -> None:
        """
        Stopping cancels requests and backoffs; their events stay pending.
        """
        self.add(1)
        receiver = Receiver(self.clock, [500])
        dispatcher = self.start(receiver)
        dispatcher.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.pending(), 1)

    def test_next_deliverer_resends_unacknowledged_batch(self) -> None:
        """
        A batch the backend took but whose answer the dispatcher never saw
        (it stopped: its node lost the delivery lease, or died) stays
        pending; the dispatcher of the next node sends it again, with the
        same event ids, then goes on in order.
        """
        self.add(2)
        receiver = Receiver(self.clock, [None])
        first = self.start(receiver)
        first.stopService()
        self.assertEqual(self.pending(), 2)
        self.add(1, first=2)
        self.start(receiver)
        [sent, again] = [json.loads(body)["events"] for _, body in receiver.received]
        self.assertEqual([e["id"] for e in again[:2]], [e["id"] for e in sent])
        self.assertEqual([e["peerId"] for e in again], ["p0", "p1", "p2"])
        self.assertEqual(self.pending(), 0)

    def test_no_config(self) -> None:
        """
        Pending events of an app without webhooks wait, with a warning.
        """
        self.add(1, "gone")
        receiver = Receiver(self.clock)
        self.start(receiver)
        self.assertEqual(receiver.received, [])
        self.assertEqual(self.pending("gone"), 1)

    def test_backlog(self) -> None:
        """
        An app over L{BACKLOG_WARNING} pending events is reported as
        backing up, and no longer once it caught up.
        """
        self.add(BACKLOG_WARNING + 1)
        receiver = Receiver(self.clock, [None])
        dispatcher = self.start(receiver)
        self.assertEqual(dispatcher.backlogged_apps(), {"a"})
        self.assertEqual(dispatcher.pending_by_app(), {"a": BACKLOG_WARNING + 1})
        receiver.held.pop().finish()
        self.stub.flush()
        self.assertEqual(dispatcher.backlogged_apps(), frozenset())
        self.assertEqual(dispatcher.pending_by_app(), {"a": 0})

    def test_delivering_while_running(self) -> None:
        """
        The dispatcher delivers (for the metrics) while it runs; stopped,
        as when another node took the delivery lease, it counts nothing.
        """
        self.add(2)
        receiver = Receiver(self.clock, [500])
        dispatcher = self.start(receiver)
        self.assertEqual((dispatcher.delivering, dispatcher.pending_by_app()), (True, {"a": 2}))
        dispatcher.stopService()
        self.assertEqual((dispatcher.delivering, dispatcher.pending_by_app()), (False, {}))


class Redirecting(Resource):
    """
    A backend that redirects every request elsewhere, and notes each.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def render(self, request: Request) -> bytes:
        self.requests.append(request.method.decode())
        request.setResponseCode(303)
        request.setHeader("Location", "http://hooks.example/internal-admin")
        return b""


class _Refusing:
    """
    A treq-like client whose every POST fails to connect.
    """

    def post(self, url: str, **kwargs: object) -> Deferred[object]:
        return fail(ConnectionRefusedError("refused"))
