"""
Tests for L{meteredrt.prometheus.MetricsResource} and how the composition
root serves it: behind a bearer token on the main listener, or without one
on a listener of its own, and nowhere by default.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from prometheus_client import REGISTRY, generate_latest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from meteredrt import prometheus
from meteredrt.hub import Hub
from meteredrt.metrics import Metrics
from meteredrt.prometheus import MetricsResource, build_registry, metrics_root
from meteredrt.tap import Options, makeService

TOKEN = "metrics-token-0123456789abcdef"


class Reply:
    """
    A response read whole.
    """

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[0]


def fetch(case: SynchronousTestCase, root: Resource, path: str, method: str = "GET", **headers: str) -> Reply:
    """
    Send one request to C{root} in memory and read the whole answer.
    """
    http = StubTreq(root)
    d = http.request(method, "http://127.0.0.1:8080" + path, headers={k: [v] for k, v in headers.items()})
    http.flush()
    response = case.successResultOf(d)
    body = case.successResultOf(http.content(response))
    return Reply(response.code, response.headers, body)


class MetricsResourceTests(SynchronousTestCase):
    """
    Tests for L{MetricsResource}.
    """

    def setUp(self) -> None:
        self.metrics = Metrics()
        self.metrics.errors["malformed_message"] += 3
        self.registry = build_registry(self.metrics, Clock())

    def root(self, token: str | None) -> Resource:
        return metrics_root(MetricsResource(self.registry, token))

    def test_with_token(self) -> None:
        """
        The right bearer token gets the text format.
        """
        reply = fetch(self, self.root(TOKEN), "/metrics", Authorization=f"Bearer {TOKEN}")
        self.assertEqual(reply.code, 200)
        self.assertTrue((reply.header("content-type") or "").startswith("text/plain; version="))
        self.assertIn(b'meteredrt_errors_total{code="malformed_message"} 3.0', reply.body)

    def test_without_token(self) -> None:
        """
        No credential, a wrong token, another scheme or a token with
        something appended: 401 with a challenge, and no metrics.
        """
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789abcdef"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": TOKEN},
        ):
            reply = fetch(self, self.root(TOKEN), "/metrics", **headers)
            self.assertEqual(reply.code, 401, headers)
            self.assertEqual(reply.header("www-authenticate"), 'Bearer realm="meteredrt-metrics"')
            self.assertNotIn(b"meteredrt_errors_total", reply.body)

    def test_constant_time(self) -> None:
        """
        The token is compared with C{hmac.compare_digest}, whose time does
        not depend on where the strings first differ.
        """
        compared: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def recording(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return real(a, b)

        self.patch(prometheus.hmac, "compare_digest", recording)
        fetch(self, self.root(TOKEN), "/metrics", Authorization="Bearer nope")
        self.assertEqual(compared, [(b"Bearer nope", f"Bearer {TOKEN}".encode())])

    def test_no_token_needed(self) -> None:
        """
        Without a token (a listener of its own), anyone reaching it may
        scrape.
        """
        reply = fetch(self, self.root(None), "/metrics")
        self.assertEqual(reply.code, 200)
        self.assertIn(b"meteredrt_errors_total", reply.body)

    def test_other_paths_and_methods(self) -> None:
        """
        Only GET and HEAD of C{/metrics}: other methods get a JSON 405,
        other paths a JSON 404.
        """
        reply = fetch(self, self.root(None), "/metrics", method="POST")
        self.assertEqual((reply.code, reply.header("allow")), (405, "GET, HEAD"))
        self.assertEqual(fetch(self, self.root(None), "/elsewhere").code, 404)
        self.assertEqual(fetch(self, self.root(None), "/metrics", method="HEAD").code, 200)


class CompositionTests(SynchronousTestCase):
    """
    Where L{makeService} serves C{/metrics}, from the C{[metrics]} table.
    """

    def make(self, metrics_table: str) -> tuple[MemoryReactorClock, Any]:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "meteredrt.toml")
        with open(path, "w") as f:
            f.write(metrics_table)
        options = Options()
        options.parseOptions(["--config", path, "--data-dir", os.path.join(directory, "data")])
        reactor = MemoryReactorClock()
        return reactor, makeService(options, reactor)

    def listeners(self, service: Any) -> list[Any]:
        return list(service.getServiceNamed("listeners"))

    def site_root(self, listener: Any) -> Resource:
        # The main listeners serve the site through the per-client cap.
        factory = listener._factory
        return getattr(factory, "wrappedFactory", factory).resource

    def test_off_by_default(self) -> None:
        """
        Without a C{[metrics]} table, C{/metrics} is a 404 and nothing else
        listens.
        """
        reactor, service = self.make("")
        [main] = self.listeners(service)
        reply = fetch(self, self.site_root(main), "/metrics", Authorization=f"Bearer {TOKEN}")
        self.assertEqual(reply.code, 404)

    def test_token_on_main_listener(self) -> None:
        """
        With a token, the main listener serves C{/metrics} to requests that
        carry it.
        """
        reactor, service = self.make(f'[metrics]\ntoken = "{TOKEN}"\n')
        [main] = self.listeners(service)
        self.assertEqual(fetch(self, self.site_root(main), "/metrics").code, 401)
        reply = fetch(self, self.site_root(main), "/metrics", Authorization=f"Bearer {TOKEN}")
        self.assertEqual(reply.code, 200)
        self.assertIn(b"meteredrt_connections", reply.body)

    def test_separate_listener(self) -> None:
        """
        With C{listen}, a listener of its own serves only C{/metrics}, with
        no token; the main listener does not serve it.
        """
        reactor, service = self.make('[metrics]\nlisten = "tcp:9100:interface=127.0.0.1"\n')
        main, scrape = self.listeners(service)
        self.assertEqual(scrape.description, "tcp:9100:interface=127.0.0.1")
        self.assertEqual(fetch(self, self.site_root(scrape), "/metrics").code, 200)
        self.assertEqual(fetch(self, self.site_root(scrape), "/v1/usage").code, 404)
        self.assertEqual(fetch(self, self.site_root(main), "/metrics").code, 404)

    def test_registries_apart(self) -> None:
        """
        Two servers in one process keep their numbers apart: each counts
        into a registry of its own, not C{prometheus_client}'s global one.
        """
        _, first = self.make(f'[metrics]\ntoken = "{TOKEN}"\n')
        _, second = self.make(f'[metrics]\ntoken = "{TOKEN}"\n')
        [first_hub] = [child for child in first if isinstance(child, Hub)]
        first_hub.metrics.errors["malformed_message"] += 1
        sample = b'meteredrt_errors_total{code="malformed_message"} 1.0'
        for service, shown in ((first, True), (second, False)):
            [main] = self.listeners(service)
            body = fetch(self, self.site_root(main), "/metrics", Authorization=f"Bearer {TOKEN}").body
            self.assertEqual(sample in body, shown)
        self.assertNotIn(b"meteredrt_", generate_latest(REGISTRY))


class RedisMetricsTests(SynchronousTestCase):
    """
    A cluster node's Redis calls are exposed by command.
    """

    def test_families(self) -> None:
        """
        Round trips become a histogram and failures a counter, each labelled
        with the command.
        """
        from prometheus_client import generate_latest
        from twisted.internet.task import Clock

        from meteredrt.metrics import Metrics
        from meteredrt.prometheus import build_registry

        metrics = Metrics()
        metrics.redis_call("PUBLISH", 0.0007)
        metrics.redis_call("PUBLISH", 0.02)
        metrics.redis_call("EVALSHA", None)
        text = generate_latest(build_registry(metrics, Clock())).decode()
        self.assertIn('meteredrt_redis_call_seconds_count{operation="PUBLISH"} 2.0', text)
        self.assertIn('meteredrt_redis_call_seconds_bucket{le="0.001",operation="PUBLISH"} 1.0', text)
        self.assertIn('meteredrt_redis_errors_total{operation="EVALSHA"} 1.0', text)
