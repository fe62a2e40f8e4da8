"""
The Prometheus endpoint: L{Metrics} in the text exposition format.

L{MetricsCollector} reads a L{Metrics} (and through it the live hub,
connections and meter) each time it is scraped; L{build_registry} puts it
in a registry of its own, never C{prometheus_client}'s global one, so that
two servers in one process (tests, several services) never mix their
numbers. L{MetricsResource} serves C{/metrics}, behind a bearer token when
it shares the public listener.

Every metric, its labels and what it means are listed in
C{docs/operator-guide.md} ("Metrics"); a cluster node also reports its
Redis calls (C{meteredrt_redis_call_seconds{operation}},
C{meteredrt_redis_errors_total{operation}}).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from meteredrt.metrics import DELIVERY_KINDS, DROP_REASONS, HANDSHAKE_OUTCOMES, Metrics
from meteredrt.protocol import INBOUND_TYPES, OUTBOUND_TYPES
from meteredrt.site import JsonRoot, error_body, json_response


class MetricsCollector(Collector):
    """
    Turns one L{Metrics} into metric families at scrape time.

    Label values known in advance (frame types, drop reasons, handshake
    outcomes, delivery kinds) are always exposed, at zero until something
    happens, so that rates and alerts have a series from the first scrape.
    """

    def __init__(self, metrics: Metrics, clock: IReactorTime) -> None:
        self._metrics = metrics
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics

        connections = GaugeMetricFamily(
            "meteredrt_connections", "Authenticated WebSocket connections open on this node.", labels=["app"]
        )
        for app, count in sorted(metrics.connections_by_app().items()):
            connections.add_metric([app], count)
        yield connections

        handshakes = CounterMetricFamily(
            "meteredrt_handshakes",
            "WebSocket handshakes by outcome: welcomed, refused (a close code 4xxx), "
            "abandoned (the client left first), failed (a server error, 1011).",
            labels=["outcome"],
        )
        for outcome in HANDSHAKE_OUTCOMES:
            handshakes.add_metric([outcome], metrics.handshakes[outcome])
        yield handshakes

        histogram = metrics.handshake_seconds
        latency = HistogramMetricFamily(
            "meteredrt_handshake_seconds",
            "Time from the WebSocket upgrade request to the welcome frame.",
            buckets=[(floatToGoString(bound), count) for bound, count in histogram.cumulative()],
            sum_value=histogram.sum,
        )
        yield latency

        redis_calls = HistogramMetricFamily(
            "meteredrt_redis_call_seconds",
            "Round trips of the cluster's Redis calls that answered, by command.",
            labels=["operation"],
        )
        for operation, calls in sorted(metrics.redis_call_seconds.items()):
            redis_calls.add_metric(
                [operation],
                buckets=[(floatToGoString(bound), count) for bound, count in calls.cumulative()],
                sum_value=calls.sum,
            )
        yield redis_calls
        redis_errors = CounterMetricFamily(
            "meteredrt_redis_errors",
            "Redis calls that failed (error reply, timeout, no connection), by command.",
            labels=["operation"],
        )
        for operation, count in sorted(metrics.redis_errors.items()):
            redis_errors.add_metric([operation], count)
        yield redis_errors

        frames_in, frames_out = metrics.frames_in, metrics.frames_out
        received = CounterMetricFamily(
            "meteredrt_frames_received", "Client frames received, by type (invalid: refused).", labels=["type"]
        )
        for kind, name in enumerate(INBOUND_TYPES):
            received.add_metric([name], frames_in[kind])
        yield received
        sent = CounterMetricFamily("meteredrt_frames_sent", "Server frames written, by type.", labels=["type"])
        for kind, name in enumerate(OUTBOUND_TYPES):
            sent.add_metric([name], frames_out[kind])
        yield sent

        deliveries = CounterMetricFamily(
            "meteredrt_deliveries",
            "Local connections handed a routed message, presence change, direct message or disconnect.",
            labels=["kind"],
        )
        for index, name in enumerate(DELIVERY_KINDS):
            deliveries.add_metric([name], metrics.deliveries[index])
        yield deliveries

        drops = CounterMetricFamily(
            "meteredrt_drops",
            "Connections cut off or refused and messages refused, by reason.",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            drops.add_metric([reason], metrics.drops[reason])
        yield drops

        errors = CounterMetricFamily("meteredrt_errors", "Error frames sent, by protocol error code.", labels=["code"])
        for code, count in sorted(metrics.errors.items()):
            errors.add_metric([code], count)
        yield errors

        closes = CounterMetricFamily(
            "meteredrt_closes",
            "Closed WebSocket sessions by close code and by who closed first (server or client).",
            labels=["code", "by"],
        )
        for (close_code, side), count in sorted(metrics.closes.items()):
            closes.add_metric([str(close_code), side], count)
        yield closes

        rest = CounterMetricFamily(
            "meteredrt_rest_requests",
            "REST requests by operation (unmatched: no route) and HTTP status (499: client left).",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(metrics.rest_requests.items()):
            rest.add_metric([route, str(status)], count)
        yield rest

        turn = CounterMetricFamily(
            "meteredrt_turn_api_calls",
            "Calls to the Metered TURN API by operation and outcome (ok, failed, cancelled).",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), count in sorted(metrics.turn_calls.items()):
            turn.add_metric([operation, outcome], count)
        yield turn

        flush = metrics.meter_flush(self._clock.seconds())
        if flush is not None:
            lag, failures = flush
            yield GaugeMetricFamily(
                "meteredrt_meter_flush_lag_seconds",
                "Seconds since the usage meter last wrote all its counts (what a kill -9 would lose).",
                value=lag,
            )
            yield CounterMetricFamily(
                "meteredrt_meter_flush_failures", "Usage meter flushes that failed.", value=failures
            )

        webhooks = metrics.webhook_delivery()
        if webhooks is not None:
            delivering, pending_by_app = webhooks
            yield GaugeMetricFamily(
                "meteredrt_webhooks_delivering",
                "1 when this node delivers presence webhooks (in a cluster: holds the delivery lease), else 0.",
                value=int(delivering),
            )
            pending = GaugeMetricFamily(
                "meteredrt_webhooks_pending",
                "Presence webhook events waiting for delivery per app, as the delivering node last counted "
                "them (an app far over its usual figure is backing up: is its receiver down or slow?).",
                labels=["app"],
            )
            for app, count in sorted(pending_by_app.items()):
                pending.add_metric([app], count)
            yield pending


def build_registry(metrics: Metrics, clock: IReactorTime) -> CollectorRegistry:
    """
    A registry of its own holding one L{MetricsCollector}.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics, clock))
    return registry


class MetricsResource(Resource):
    """
    C{GET /metrics}: the registry in the Prometheus text format.

    With a C{token}, a request must carry C{Authorization: Bearer <token>}
    (compared in constant time) or gets a 401; without one, anyone who
    reaches the listener may scrape, which is what a separate listener on a
    private interface is for.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, token: str | None = None) -> None:
        super().__init__()
        self._registry = registry
        self._expected = None if token is None else b"Bearer " + token.encode("utf-8")

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return json_response(request, 405, error_body("invalid_request", "use GET"))
        if self._expected is not None:
            given = request.getHeader(b"authorization") or b""
            if not hmac.compare_digest(given, self._expected):
                request.setHeader(b"www-authenticate", b'Bearer realm="meteredrt-metrics"')
                return json_response(
                    request, 401, error_body("unauthorized", "send Authorization: Bearer <the [metrics] token>")
                )
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self._registry)


def metrics_root(resource: MetricsResource) -> Resource:
    """
    The root of a listener that serves only C{/metrics} (JSON 404 elsewhere).
    """
    root = JsonRoot()
    root.putChild(b"metrics", resource)
    return root
