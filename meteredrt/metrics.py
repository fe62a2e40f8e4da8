"""
What the server counts for its operator, in plain Python numbers.

L{Metrics} is one node's tally: the WebSocket adapter, the hub, the REST
resources, the TURN client and the meter each add to it (or, for what they
know anyway, are read at scrape time through L{Metrics.watch}), and
L{meteredrt.prometheus} turns it into the Prometheus text format when
scraped. Nothing here imports Prometheus or Twisted: counting stays a
plain integer addition, so the hot path pays the same whether or not
anyone scrapes, and tests read the numbers directly.

Per-frame counts are node-wide lists indexed by the frame's kind
(L{meteredrt.protocol.INBOUND_TYPES}, L{meteredrt.protocol.OUTBOUND_TYPES}),
so a frame costs one index and one addition into a list every connection
shares (and so stays in the CPU's cache), never a look-up by label. A
per-connection list cost about 5% of the fan-out CPU in a profile: one
more object per receiver to fetch from memory (C{docs/performance.md}).

In a cluster the node's Redis client records its calls here too
(L{Metrics.redis_call}: latency per command in a L{LatencyHistogram},
failures counted by command).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from meteredrt.protocol import INBOUND_TYPES, OUTBOUND_TYPES

#: Upper bounds (seconds) of the handshake latency buckets: from a local
#: JWT check (well under a millisecond) to a TURN API call that times out.
#: Redis round trips on a LAN are well under a millisecond; the top
#: buckets show a Redis that is struggling (the client gives up at 2 s).
REDIS_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: How a WebSocket handshake ended.
HANDSHAKE_OUTCOMES = ("welcomed", "refused", "abandoned", "failed")

#: Why the server dropped a connection or refused a message; see
#: C{docs/operator-guide.md} for each.
DROP_REASONS = (
    "slow_reader",
    "message_quota",
    "connection_quota",
    "message_rate",
    "frame_rate",
    "upgrade_rate",
    "connection_cap",
)

#: The envelopes the hub delivers, by index into L{Metrics.deliveries}.
DELIVERY_KINDS = ("message", "presence", "direct", "disconnect")


class LatencyHistogram:
    """
    Observations counted into fixed buckets, as a Prometheus histogram
    reports them (cumulative counts per upper bound, a sum and a count).
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """
        Count one observation.
        """
        # bisect_left: a value equal to a bound belongs to that bucket (le).
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """
        C{(upper bound, observations at or below it)} per bucket, the last
        bound being infinity.
        """
        total = 0
        result = []
        for bound, count in zip((*self.bounds, float("inf")), self._counts, strict=True):
            total += count
            result.append((bound, total))
        return result


class HubView(Protocol):
    """
    What L{Metrics.watch} reads from the hub: its live sessions' apps.
    """

    def connections_by_app(self) -> dict[str, int]: ...


class MeterView(Protocol):
    """
    What L{Metrics.watch} reads from the meter.
    """

    @property
    def last_flush(self) -> float: ...

    @property
    def flush_failures(self) -> int: ...


class WebhooksView(Protocol):
    """
    What L{Metrics.watch_webhooks} reads from the webhook dispatcher.
    """

    @property
    def delivering(self) -> bool: ...

    def pending_by_app(self) -> dict[str, int]: ...


class Metrics:
    """
    One node's counters, histograms and the live state read at scrape time.

    @ivar frames_in: client frames received, by
        L{meteredrt.protocol.INBOUND_TYPES} index.
    @ivar frames_out: server frames written, by
        L{meteredrt.protocol.OUTBOUND_TYPES} index.
    @ivar deliveries: connections handed a routed envelope, by
        L{DELIVERY_KINDS} index.
    @ivar handshakes: handshakes by outcome (L{HANDSHAKE_OUTCOMES}).
    @ivar handshake_seconds: from the upgrade request to the welcome.
    @ivar closes: closed connections by C{(code, side)}, C{side} being
        C{"server"} when this server closed it, else C{"client"}.
    @ivar errors: C{error} frames sent, by protocol error code.
    @ivar drops: by reason (L{DROP_REASONS}).
    @ivar rest_requests: REST requests by C{(route, HTTP status)}.
    @ivar turn_calls: TURN API calls by C{(operation, outcome)}, the
        outcome being C{"ok"} or C{"failed"}.
    """

    def __init__(self) -> None:
        self.frames_in = [0] * len(INBOUND_TYPES)
        self.frames_out = [0] * len(OUTBOUND_TYPES)
        self.deliveries = [0] * len(DELIVERY_KINDS)
        self.handshakes: Counter[str] = Counter()
        self.handshake_seconds = LatencyHistogram(HANDSHAKE_BUCKETS)
        self.closes: Counter[tuple[int, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.rest_requests: Counter[tuple[str, int]] = Counter()
        self.turn_calls: Counter[tuple[str, str]] = Counter()
        self.redis_call_seconds: dict[str, LatencyHistogram] = {}
        self.redis_errors: Counter[str] = Counter()
        self._hub: HubView | None = None
        self._meter: MeterView | None = None
        self._webhooks: WebhooksView | None = None

    def redis_call(self, operation: str, seconds: float | None) -> None:
        """
        One call of the cluster's Redis client: its round trip, or C{None}
        when it failed (an error reply, a timeout, no connection).
        """
        if seconds is None:
            self.redis_errors[operation] += 1
            return
        histogram = self.redis_call_seconds.get(operation)
        if histogram is None:
            histogram = self.redis_call_seconds[operation] = LatencyHistogram(REDIS_BUCKETS)
        histogram.observe(seconds)

    def watch(self, *, hub: HubView | None = None, meter: MeterView | None = None) -> None:
        """
        Read these at scrape time: the hub (connections by app), the meter
        (flush lag).
        """
        if hub is not None:
            self._hub = hub
        if meter is not None:
            self._meter = meter

    def watch_webhooks(self, dispatcher: WebhooksView) -> None:
        """
        Read the webhook dispatcher at scrape time: whether this node
        delivers, and the pending events per app it last counted.
        """
        self._webhooks = dispatcher

    def webhook_delivery(self) -> tuple[bool, dict[str, int]] | None:
        """
        Whether this node delivers webhooks and, if it does, the pending
        events per app; C{None} when no dispatcher is watched.
        """
        if self._webhooks is None:
            return None
        return self._webhooks.delivering, self._webhooks.pending_by_app()

    def connections_by_app(self) -> dict[str, int]:
        """
        Live connections per app id (empty when no hub is watched).
        """
        return {} if self._hub is None else self._hub.connections_by_app()

    def meter_flush(self, now: float) -> tuple[float, int] | None:
        """
        Seconds since the meter last wrote its counts (or started), and
        how many of its flushes failed; C{None} when no meter is watched.
        """
        if self._meter is None:
            return None
        return max(0.0, now - self._meter.last_flush), self._meter.flush_failures
