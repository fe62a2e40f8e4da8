"""
Tests for L{meteredrt.metrics} and L{meteredrt.prometheus}: what the server
counts, read back from the Prometheus text a scrape returns after driving
real Autobahn clients through the hub over L{twisted.test.iosim}.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import define
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import App, Plan, TurnConfig
from meteredrt.metrics import HANDSHAKE_BUCKETS, LatencyHistogram, Metrics
from meteredrt.prometheus import build_registry
from meteredrt.protocol import INBOUND_TYPES, OUTBOUND_TYPES
from meteredrt.turn import TurnApiClient, TurnApiError

from .rest_support import RestWorld
from .test_turn import HOUR, FakeTurnApi, StubTreq, config
from .test_ws import WebSocketTestCase

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics, clock: Clock) -> Samples:
    """
    Scrape a registry built over C{metrics} as Prometheus would and parse
    the text back: C{(sample name, sorted labels) -> value}.
    """
    text = generate_latest(build_registry(metrics, clock)).decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """
    One sample's value; fails the test (KeyError) when it is not exposed.
    """
    return samples[(name, tuple(sorted(labels.items())))]


class LatencyHistogramTests(SynchronousTestCase):
    """
    Tests for L{LatencyHistogram}.
    """

    def test_buckets(self) -> None:
        """
        An observation counts in the first bucket whose bound it does not
        exceed and in every later one; sum and count add up.
        """
        histogram = LatencyHistogram((0.1, 1.0))
        for seconds in (0.05, 0.1, 0.5, 3.0):
            histogram.observe(seconds)
        self.assertEqual(histogram.cumulative(), [(0.1, 2), (1.0, 3), (float("inf"), 4)])
        self.assertEqual(histogram.count, 4)
        self.assertAlmostEqual(histogram.sum, 3.65)


class ScrapeTests(WebSocketTestCase):
    """
    What a scrape shows after clients talked through the WebSocket adapter
    and the hub.
    """

    def scrape(self) -> Samples:
        return scrape(self.metrics, self.clock)

    def test_known_labels_at_zero(self) -> None:
        """
        Before anything happens, every frame type, drop reason, handshake
        outcome and delivery kind is exposed at zero.
        """
        samples = self.scrape()
        for name in INBOUND_TYPES:
            self.assertEqual(value(samples, "meteredrt_frames_received_total", type=name), 0)
        for name in OUTBOUND_TYPES:
            self.assertEqual(value(samples, "meteredrt_frames_sent_total", type=name), 0)
        for reason in ("slow_reader", "message_quota", "connection_quota", "message_rate", "upgrade_rate"):
            self.assertEqual(value(samples, "meteredrt_drops_total", reason=reason), 0)
        for outcome in ("welcomed", "refused", "abandoned", "failed"):
            self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome=outcome), 0)
        self.assertEqual(value(samples, "meteredrt_handshake_seconds_count"), 0)
        self.assertEqual(value(samples, "meteredrt_deliveries_total", kind="message"), 0)

    def test_messaging(self) -> None:
        """
        Connections by app, frames by type in and out, deliveries and close
        codes follow a publish to a subscriber and the subscriber's close.
        """
        alice, _, alice_pump = self.open_token("alice")
        bob, _, bob_pump = self.open_token("bob")
        for client, pump in ((alice, alice_pump), (bob, bob_pump)):
            client.send_json({"type": "subscribe", "channel": "room", "requestId": "s"})
            pump.flush()
        alice_pump.flush()
        alice.send_json({"type": "publish", "channel": "room", "data": "hi", "requestId": "p"})
        alice.send_json({"type": "ping"})
        alice_pump.flush()
        bob_pump.flush()
        self.assertEqual(bob.received[-1]["type"], "message")

        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_connections", app="app_1"), 2)
        self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome="welcomed"), 2)
        self.assertEqual(value(samples, "meteredrt_frames_received_total", type="subscribe"), 2)
        self.assertEqual(value(samples, "meteredrt_frames_received_total", type="publish"), 1)
        self.assertEqual(value(samples, "meteredrt_frames_received_total", type="ping"), 1)
        self.assertEqual(value(samples, "meteredrt_frames_sent_total", type="welcome"), 2)
        self.assertEqual(value(samples, "meteredrt_frames_sent_total", type="ack"), 3)
        self.assertEqual(value(samples, "meteredrt_frames_sent_total", type="message"), 1)
        self.assertEqual(value(samples, "meteredrt_frames_sent_total", type="pong"), 1)
        # Two snapshots and alice hearing bob join.
        self.assertEqual(value(samples, "meteredrt_frames_sent_total", type="presence"), 3)
        self.assertEqual(value(samples, "meteredrt_deliveries_total", kind="message"), 1)
        # alice's own join reached nobody; bob's reached alice.
        self.assertEqual(value(samples, "meteredrt_deliveries_total", kind="presence"), 1)

        bob.sendClose(1000)
        bob_pump.flush()
        alice_pump.flush()
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_connections", app="app_1"), 1)
        self.assertEqual(value(samples, "meteredrt_closes_total", code="1000", by="client"), 1)
        # Any code past the standard range that a client picks is one series.
        for code in (4321, 3999):
            client, _, pump = self.open_token(f"c{code}")
            client.sendClose(code)
            pump.flush()
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_closes_total", code="0", by="client"), 2)
        # bob's frames stay counted after his connection is gone.
        self.assertEqual(value(samples, "meteredrt_frames_received_total", type="subscribe"), 2)
        self.assertEqual(value(samples, "meteredrt_frames_sent_total", type="message"), 1)
        self.assertEqual(value(samples, "meteredrt_deliveries_total", kind="presence"), 2)

    def test_handshake_latency(self) -> None:
        """
        The handshake histogram measures from the upgrade to the welcome,
        here held 0.3 s by a TURN call.
        """
        self.keys.add_app(App("app_1", turn=TurnConfig("demo", "secret")))
        client, server, pump = self.open("key=pk_live_test")
        self.clock.advance(0.3)
        [waiting] = self.turn.waiting
        waiting.callback(None)
        pump.flush()
        self.assertEqual(client.received[0]["type"], "welcome")
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_handshake_seconds_count"), 1)
        self.assertAlmostEqual(value(samples, "meteredrt_handshake_seconds_sum"), 0.3)
        self.assertEqual(value(samples, "meteredrt_handshake_seconds_bucket", le="0.25"), 0)
        self.assertEqual(value(samples, "meteredrt_handshake_seconds_bucket", le="0.5"), 1)
        self.assertEqual(value(samples, "meteredrt_handshake_seconds_bucket", le="+Inf"), 1)
        self.assertEqual(len(HANDSHAKE_BUCKETS) + 1, len([k for k in samples if k[0].endswith("_bucket")]))

    def test_refused_and_failed(self) -> None:
        """
        A refused handshake counts as refused with its close code; a failed
        welcome as failed with 1011.
        """
        client, _, _ = self.open("token=not-a-jwt")
        self.assertClosed(client, 4001)
        self.keys.add_app(App("app_1", turn=TurnConfig("demo", "secret")))
        failing, _, pump = self.open("key=pk_live_test")
        [waiting] = self.turn.waiting
        waiting.errback(RuntimeError("TURN API exploded"))
        pump.flush()
        self.assertClosed(failing, 1011)
        self.flushLoggedErrors(RuntimeError)
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome="refused"), 1)
        self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome="failed"), 1)
        self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome="welcomed"), 0)
        self.assertEqual(value(samples, "meteredrt_closes_total", code="4001", by="server"), 1)
        self.assertEqual(value(samples, "meteredrt_closes_total", code="1011", by="server"), 1)

    def test_abandoned(self) -> None:
        """
        A client that leaves while its welcome is being prepared counts as
        abandoned.
        """
        self.keys.add_app(App("app_1", turn=TurnConfig("demo", "secret")))
        client, _, pump = self.open("key=pk_live_test")
        client.transport.loseConnection()
        pump.flush()
        [waiting] = self.turn.waiting
        waiting.callback(None)
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome="abandoned"), 1)
        self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome="welcomed"), 0)
        self.assertNotIn(("meteredrt_connections", (("app", "app_1"),)), samples)

    def test_errors_by_code(self) -> None:
        """
        Error frames count by code, whether the frame was refused by the
        parser or by the hub; refused frames count as invalid.
        """
        client, _, pump = self.open("key=pk_live_test")
        client.sendMessage(b"{nope")
        client.send_json({"type": "send", "to": "bob", "data": 1})
        pump.flush()
        self.assertEqual([f["code"] for f in client.received[1:]], ["malformed_message", "action_not_permitted"])
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_errors_total", code="malformed_message"), 1)
        self.assertEqual(value(samples, "meteredrt_errors_total", code="action_not_permitted"), 1)
        self.assertEqual(value(samples, "meteredrt_frames_received_total", type="invalid"), 1)
        self.assertEqual(value(samples, "meteredrt_frames_received_total", type="send"), 1)
        self.assertEqual(value(samples, "meteredrt_frames_sent_total", type="error"), 2)

    def test_message_quota(self) -> None:
        """
        A message refused for the app's quota counts as a message_quota
        drop.
        """
        self.keys.add_app(App("app_1", plan=Plan(max_messages_per_period=1)))
        client, _, pump = self.open_token("alice")
        for _ in range(2):
            client.send_json({"type": "publish", "channel": "room", "data": 1})
        pump.flush()
        self.assertEqual(client.received[-1]["code"], "over_message_quota")
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_drops_total", reason="message_quota"), 1)

    def test_connection_quota(self) -> None:
        """
        A connection over the app's concurrent limit counts as a refused
        handshake, a connection_quota drop and a 4010 close.
        """
        self.keys.add_app(App("app_1", plan=Plan(max_concurrent_connections=1)))
        self.open_token("alice")
        second, _, _ = self.open_token("bob")
        self.assertClosed(second, 4010)
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_drops_total", reason="connection_quota"), 1)
        self.assertEqual(value(samples, "meteredrt_handshakes_total", outcome="refused"), 1)
        self.assertEqual(value(samples, "meteredrt_closes_total", code="4010", by="server"), 1)

    def test_message_rate(self) -> None:
        """
        A connection closed for its message rate counts as a message_rate
        drop and a 4011 close.
        """
        client, _, pump = self.open_token("alice")
        for n in range(300):
            client.send_json({"type": "publish", "channel": "room", "data": n})
        pump.flush()
        self.assertClosed(client, 4011)
        samples = self.scrape()
        self.assertEqual(value(samples, "meteredrt_drops_total", reason="message_rate"), 1)
        self.assertEqual(value(samples, "meteredrt_closes_total", code="4011", by="server"), 1)


class SlowReaderScrapeTests(WebSocketTestCase):
    """
    A slow reader cut off shows as a drop.
    """

    factory_options = {"outbound_limit": 10_000}

    def test_slow_reader(self) -> None:
        """
        The cut-off counts as a slow_reader drop and a 1008 close by the
        server.
        """
        slow, slow_server, slow_pump = self.open_token("slow")
        slow.send_json({"type": "subscribe", "channel": "room"})
        slow_pump.flush()
        fast, _, fast_pump = self.open_token("fast")
        slow_server._watch.pauseProducing()
        for _ in range(3):
            fast.send_json({"type": "publish", "channel": "room", "data": "x" * 4000})
            fast_pump.flush()
        slow_pump.flush()
        self.assertClosed(slow, 1008)
        self.advance(2, slow_pump)
        samples = scrape(self.metrics, self.clock)
        self.assertEqual(value(samples, "meteredrt_drops_total", reason="slow_reader"), 1)
        self.assertEqual(value(samples, "meteredrt_closes_total", code="1008", by="server"), 1)


@define
class _MeterView:
    last_flush: float
    flush_failures: int


class MeterFlushScrapeTests(SynchronousTestCase):
    """
    The meter's flush lag is read at scrape time.
    """

    def test_lag(self) -> None:
        """
        The lag is the time since the meter's last flush by the scrape's
        clock; without a watched meter neither metric is exposed.
        """
        clock = Clock()
        metrics = Metrics()
        self.assertNotIn(("meteredrt_meter_flush_lag_seconds", ()), scrape(metrics, clock))
        clock.advance(100)
        metrics.watch(meter=_MeterView(last_flush=95.5, flush_failures=2))
        samples = scrape(metrics, clock)
        self.assertEqual(value(samples, "meteredrt_meter_flush_lag_seconds"), 4.5)
        self.assertEqual(value(samples, "meteredrt_meter_flush_failures_total"), 2)


@define
class _WebhooksView:
    delivering: bool
    pending: dict[str, int]

    def pending_by_app(self) -> dict[str, int]:
        return self.pending


class WebhookScrapeTests(SynchronousTestCase):
    """
    Whether this node delivers webhooks, and the pending events per app,
    are read at scrape time.
    """

    def test_delivering(self) -> None:
        """
        The delivering node exposes 1 and each app's pending events; a node
        that does not deliver exposes 0; without a watched dispatcher
        neither metric is exposed.
        """
        clock = Clock()
        metrics = Metrics()
        self.assertNotIn(("meteredrt_webhooks_delivering", ()), scrape(metrics, clock))
        metrics.watch_webhooks(_WebhooksView(True, {"a": 1500, "b": 0}))
        samples = scrape(metrics, clock)
        self.assertEqual(value(samples, "meteredrt_webhooks_delivering"), 1)
        self.assertEqual(value(samples, "meteredrt_webhooks_pending", app="a"), 1500)
        self.assertEqual(value(samples, "meteredrt_webhooks_pending", app="b"), 0)
        metrics.watch_webhooks(_WebhooksView(False, {}))
        samples = scrape(metrics, clock)
        self.assertEqual(value(samples, "meteredrt_webhooks_delivering"), 0)
        self.assertNotIn(("meteredrt_webhooks_pending", (("app", "a"),)), samples)


class RestScrapeTests(SynchronousTestCase):
    """
    REST requests count by operation and status.
    """

    def test_routes_and_statuses(self) -> None:
        """
        A request counts against its operation once dispatch matched it,
        whatever the status; a path no route of the family matches counts
        as unmatched.
        """
        world = RestWorld(self, check_contract=False)
        world.get("/v1/usage")
        world.get("/v1/usage", key=None)
        world.get("/v1/usage/extra")
        samples = scrape(world.guard.metrics, world.clock)
        self.assertEqual(value(samples, "meteredrt_rest_requests_total", route="getUsage", status="200"), 1)
        self.assertEqual(value(samples, "meteredrt_rest_requests_total", route="getUsage", status="401"), 1)
        self.assertEqual(value(samples, "meteredrt_rest_requests_total", route="unmatched", status="404"), 1)


class TurnScrapeTests(SynchronousTestCase):
    """
    TURN API calls count by operation and outcome.
    """

    def calls(self, client: TurnApiClient) -> Iterable[tuple[str, str, float]]:
        samples = scrape(client.metrics, Clock())
        return sorted(
            (dict(labels)["operation"], dict(labels)["outcome"], count)
            for (name, labels), count in samples.items()
            if name == "meteredrt_turn_api_calls_total"
        )

    def test_ok_failed_cancelled(self) -> None:
        """
        A call that answers counts ok, one that fails counts failed, one
        its caller cancels counts cancelled.
        """
        api = FakeTurnApi()
        clock = Clock()
        client = TurnApiClient(StubTreq(api), clock)
        self.successResultOf(Deferred.fromCoroutine(client.create_credential(config(), HOUR, "x")))
        api.create_mode = "server_error"
        self.failureResultOf(Deferred.fromCoroutine(client.create_credential(config(), HOUR, "x")), TurnApiError)
        self.successResultOf(Deferred.fromCoroutine(client.fetch_ice_servers(config(), "key1")))
        api.list_mode = "hang"
        pending = Deferred.fromCoroutine(client.fetch_ice_servers(config(), "key1"))
        pending.cancel()
        self.failureResultOf(pending, CancelledError)
        self.assertEqual(
            list(self.calls(client)),
            [
                ("create_credential", "failed", 1),
                ("create_credential", "ok", 1),
                ("fetch_ice_servers", "cancelled", 1),
                ("fetch_ice_servers", "ok", 1),
            ],
        )
