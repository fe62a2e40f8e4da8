"""
Delivering stored webhook events: L{WebhookDispatcher}.

One delivery loop per app with pending events, apart from the messaging
path: it reads the app's oldest events from the outbox (at most
L{MAX_BATCH_EVENTS}), POSTs them as one signed JSON batch, and deletes them
once the backend answers 2xx. A network error, a timeout, a 408, a 429 or a
5xx is retried, the same batch, after an exponential backoff with jitter
(L{retry_delay}); after the app's retry time (default a day) the batch is
set aside as failed and the loop goes on with the next one. Any other
answer (a 4xx: the backend refuses the request as such; a 3xx, which is
never followed) fails the batch at once. Failed batches wait for C{meteredrt webhooks replay}.

Events of one app leave in the order they were stored, one batch at a
time, so every peer's events arrive in order; a batch the backend did not
acknowledge is sent again (at least once: the backend de-duplicates by
event id).

In a cluster every node appends to one outbox in PostgreSQL and one node
runs the dispatcher, the holder of the L{DELIVERY_ROLE} lease; it finds the
other nodes' events by polling (L{POLL_SECONDS}). Stopped when the lease is
lost and started again when it is taken, the dispatcher begins each time
with the oldest pending batch: a batch the previous holder sent but had not
marked delivered is sent again, with the same event ids.

Main names: L{WebhookDispatcher}, L{retry_delay}.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from meteredrt.apps import WebhookConfig
from meteredrt.httpbody import BodyTooLarge, read_body
from meteredrt.interfaces import IWebhookOutbox
from meteredrt.webhooks.events import MAX_BATCH_EVENTS, batch_body
from meteredrt.webhooks.signing import SIGNATURE_HEADER, signature_header

#: The first retry waits about this long; each next one twice as long.
FIRST_RETRY_SECONDS = 1.0

#: No retry waits longer than this.
MAX_RETRY_SECONDS = 300.0

#: A request (answer body included) must finish within this many seconds.
REQUEST_TIMEOUT_SECONDS = 10.0

#: The receiver's answer body is read (and dropped) up to this many bytes,
#: so that its connection can be reused; past it the connection is closed
#: and the answer's status alone counts. A hostile receiver can neither
#: hold memory nor keep the exchange busy until the timeout with an
#: endless body.
MAX_ANSWER_BYTES = 64 * 1024

#: An app with more pending events than this is logged as backing up.
BACKLOG_WARNING = 1_000

#: How often the outbox is checked for events nobody woke the dispatcher
#: for (replayed with the CLI, or stored by another process).
POLL_SECONDS = 5.0

#: In a cluster, the role whose lease (L{meteredrt.leadership.Leadership})
#: says which node runs the dispatcher: Redis key C{mrt:leader:webhooks}.
DELIVERY_ROLE = "webhooks"

#: Answers that mean "try again later" rather than "never".
_RETRIED_STATUSES = frozenset({408, 429})


class _TreqLike(Protocol):
    @property
    def post(self) -> Callable[..., Awaitable[IResponse]]: ...


def retry_delay(attempt: int, rand: float) -> float:
    """
    How long to wait before retry number C{attempt} (1 for the first).

    Exponential from L{FIRST_RETRY_SECONDS}, capped at
    L{MAX_RETRY_SECONDS}, then scaled by a jitter factor in [0.5, 1) drawn
    from C{rand} (in [0, 1)), so many apps whose backend went down together
    do not retry in step.
    """
    base = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** min(attempt - 1, 30))
    return base * (0.5 + rand / 2)


class DeliveryError(Exception):
    """
    One delivery attempt failed; C{retry} says whether to try again.
    """

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class WebhookDispatcher(Service):
    """
    Sends each app's stored events to its backend, in order, with retries.

    @param http: a treq-like client (C{post}); tests pass
        L{treq.testing.StubTreq}.
    @param rand: the jitter source (L{random.random} by default).
    @param poll_seconds: how often to look for pending events nobody
        announced (L{POLL_SECONDS}).
    """

    log = Logger()

    def __init__(
        self,
        configs: Callable[[str], WebhookConfig | None],
        outbox: IWebhookOutbox,
        http: _TreqLike,
        clock: IReactorTime,
        *,
        rand: Callable[[], float] = random.random,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._configs = configs
        self._outbox = outbox
        self._http = http
        self._clock = clock
        self._rand = rand
        self._timeout = timeout
        self._loops: dict[str, Deferred[None]] = {}
        self._again: set[str] = set()
        self._backlogged: set[str] = set()
        self._pending: dict[str, int] = {}
        self._poll = LoopingCall(self._check)
        self._poll.clock = clock
        self._poll_seconds = poll_seconds

    def startService(self) -> None:
        super().startService()
        self._poll.start(self._poll_seconds, now=True)

    def _check(self) -> Deferred[None]:
        """
        Wake the loop of every app with pending events (cheap for apps
        whose loop runs already).
        """
        return self._outbox.pending_apps().addCallbacks(self._wake_all, self._log_failure)

    def _wake_all(self, app_ids: list[str]) -> None:
        for app_id in app_ids:
            self.wake(app_id)

    def _log_failure(self, failure: Any) -> None:
        self.log.failure("Could not list the apps with pending webhook events", failure)

    def stopService(self) -> None:
        """
        Stop every loop: a request in flight or a backoff is cancelled; its
        batch stays pending in the outbox for the next start.
        """
        super().stopService()
        if self._poll.running:
            self._poll.stop()
        loops, self._loops = self._loops, {}
        for loop in loops.values():
            loop.cancel()
        # Counted by whichever node delivers now.
        self._pending.clear()

    def wake(self, app_id: str) -> None:
        """
        The app has new pending events: start its loop, or have the running
        one look again before it stops.
        """
        if not self.running:
            return
        if app_id in self._loops:
            self._again.add(app_id)
            return
        loop = ensureDeferred(self._run(app_id))
        self._loops[app_id] = loop
        loop.addErrback(self._loop_failed, app_id)
        loop.addBoth(self._loop_done, app_id, loop)

    def _loop_failed(self, failure: Any, app_id: str) -> None:
        if not self.running:
            return
        self.log.failure("Webhook delivery for {app_id} stopped; it resumes with the next event", failure,
                         app_id=app_id)

    def _loop_done(self, _: object, app_id: str, loop: Deferred[None]) -> None:
        if self._loops.get(app_id) is loop:
            del self._loops[app_id]

    async def _run(self, app_id: str) -> None:
        while self.running:
            self._again.discard(app_id)
            config = self._configs(app_id)
            if config is None:
                self.log.warn("Webhook events of {app_id} are pending, but it has no webhook URL", app_id=app_id)
                return
            batch = await self._outbox.next_batch(app_id, MAX_BATCH_EVENTS)
            if not batch:
                self._pending[app_id] = 0
                if app_id not in self._again:
                    return
                continue
            await self._note_backlog(app_id)
            await self._deliver(app_id, config, batch)

    async def _note_backlog(self, app_id: str) -> None:
        status = await self._outbox.status(app_id)
        self._pending[app_id] = status.pending
        if status.pending > BACKLOG_WARNING and app_id not in self._backlogged:
            self._backlogged.add(app_id)
            self.log.warn(
                "Webhooks of {app_id} are backing up: {pending} events pending (is the receiver down or slow?)",
                app_id=app_id,
                pending=status.pending,
            )
        elif status.pending <= BACKLOG_WARNING and app_id in self._backlogged:
            self._backlogged.discard(app_id)
            self.log.info("Webhooks of {app_id} caught up", app_id=app_id)

    @property
    def delivering(self) -> bool:
        """
        Whether this node delivers: always once started on a single node,
        while it holds the delivery lease in a cluster.
        """
        return bool(self.running)

    def pending_by_app(self) -> dict[str, int]:
        """
        Pending events per app, as counted before each batch (0 once the
        app's queue is empty); empty while not delivering.
        """
        return dict(self._pending)

    def backlogged_apps(self) -> frozenset[str]:
        """
        The apps whose pending events are over L{BACKLOG_WARNING}.
        """
        return frozenset(self._backlogged)

    async def _deliver(self, app_id: str, config: WebhookConfig, batch: list[Any]) -> None:
        seqs = [stored.seq for stored in batch]
        body = batch_body(app_id, [stored.event for stored in batch])
        started = self._clock.seconds()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._post(config, body)
            except DeliveryError as e:
                now = self._clock.seconds()
                if not e.retry or now - started >= config.retry_seconds:
                    self.log.error(
                        "Webhook batch of {count} events for {app_id} failed: {error}; kept for replay",
                        count=len(seqs),
                        app_id=app_id,
                        error=str(e),
                    )
                    await self._outbox.failed(app_id, seqs, str(e), now)
                    return
                await self._outbox.attempted(app_id, str(e), now)
                delay = min(retry_delay(attempt, self._rand()), max(0.0, started + config.retry_seconds - now))
                await deferLater(self._clock, delay, lambda: None)
                continue
            await self._outbox.delivered(app_id, seqs, self._clock.seconds())
            return

    async def _post(self, config: WebhookConfig, body: bytes) -> None:
        timestamp = int(self._clock.seconds())
        headers = {
            "Content-Type": ["application/json"],
            SIGNATURE_HEADER: [signature_header(config.secret, timestamp, body)],
            "User-Agent": ["meteredrt-webhooks"],
        }
        exchange = ensureDeferred(self._exchange(config.url, headers, body))

        def timed_out(result: object, timeout: float) -> object:
            raise DeliveryError(f"no answer within {timeout:g} s", retry=True)

        exchange.addTimeout(self._timeout, self._clock, onTimeoutCancel=timed_out)
        await exchange

    async def _exchange(self, url: str, headers: dict[str, list[str]], body: bytes) -> None:
        try:
            # Never follow a redirect: it would send the signed batch (or a
            # GET) wherever the receiver points, past any address policy,
            # and count as delivered what nobody took.
            response = await self._http.post(url, data=body, headers=headers, allow_redirects=False)
            try:
                # Read (and drop) the answer so that the connection can be
                # reused; past the limit it is closed instead.
                await read_body(response, MAX_ANSWER_BYTES, keep=False)
            except BodyTooLarge:
                pass
        except CancelledError:
            raise
        except Exception as e:
            raise DeliveryError(f"request failed: {type(e).__name__}: {e}", retry=True) from e
        code = response.code
        if 200 <= code < 300:
            return
        retry = code >= 500 or code in _RETRIED_STATUSES
        raise DeliveryError(f"the receiver answered HTTP {code}", retry=retry)
