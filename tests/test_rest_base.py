"""
Tests for L{meteredrt.rest.base}: what every REST endpoint shares —
authentication, rate limits, body handling, routing errors, faults and
timeouts — exercised through the real tree.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from meteredrt.rest import RestLimits
from meteredrt.rest.base import MAX_BODY_BYTES, UNAUTHORIZED_MESSAGE
from tests.rest_support import FULL, ORPHAN, OTHER_APP, PUBLISHABLE, REVOKED, RestWorld, bearer


class StalledMeter:
    """
    A meter whose usage report never arrives.
    """

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def usage(self, app: object) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class BrokenMeter:
    """
    A meter whose usage look-up fails.
    """

    def usage(self, app: object) -> Deferred:
        return fail(RuntimeError("usage store unreachable: /secret/path"))


class AuthenticationTests(SynchronousTestCase):
    """
    Every credential failure gets the same 401.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def assertUnauthorized(self, **kw: object) -> None:
        reply = self.world.get("/v1/usage", **kw)  # type: ignore[arg-type]
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.json, {"error": "unauthorized", "message": UNAUTHORIZED_MESSAGE})
        self.assertEqual(reply.header("WWW-Authenticate"), 'Bearer realm="meteredrt"')

    def test_valid_key(self) -> None:
        """
        A secret key pair in a Bearer header authenticates.
        """
        self.assertEqual(self.world.get("/v1/usage").status, 200)

    def test_store_unavailable(self) -> None:
        """
        While the key store cannot reach its database, an unknown key id is
        answered 503 (retry shortly), not 401; a known key still works.
        """
        self.world.keys.reachable = False
        reply = self.world.get("/v1/usage", authorization="Bearer sk_id_new:sk_secret_new")
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.json["error"], "internal_error")
        self.assertIn("cannot reach its database", reply.json["message"])
        self.assertEqual(self.world.get("/v1/usage").status, 200)

    def test_scheme_is_case_insensitive(self) -> None:
        """
        C{bearer} in lower case is accepted, as HTTP auth schemes are.
        """
        reply = self.world.get("/v1/usage", authorization=f"bearer {FULL.key_id}:{FULL.secret}")
        self.assertEqual(reply.status, 200)

    def test_missing_header(self) -> None:
        """
        No C{Authorization} header is a 401.
        """
        self.assertUnauthorized(key=None)

    def test_basic_scheme(self) -> None:
        """
        The right pair under the C{Basic} scheme is a 401.
        """
        self.assertUnauthorized(authorization=f"Basic {FULL.key_id}:{FULL.secret}")

    def test_id_without_secret(self) -> None:
        """
        A key id alone, with or without the colon, is a 401.
        """
        self.assertUnauthorized(authorization=f"Bearer {FULL.key_id}")
        self.assertUnauthorized(authorization=f"Bearer {FULL.key_id}:")

    def test_wrong_secret(self) -> None:
        """
        A known id with another secret is a 401.
        """
        self.assertUnauthorized(authorization=f"Bearer {FULL.key_id}:sk_secret_wrong")

    def test_unknown_key(self) -> None:
        """
        An id nobody issued is a 401 identical to a wrong secret.
        """
        self.assertUnauthorized(authorization="Bearer sk_id_nobody:sk_secret_x")

    def test_publishable_key(self) -> None:
        """
        A publishable key is a 401 whatever follows it.
        """
        self.assertUnauthorized(authorization=f"Bearer {PUBLISHABLE.key_id}:anything")
        self.assertUnauthorized(authorization=f"Bearer {PUBLISHABLE.key_id}")

    def test_revoked_key(self) -> None:
        """
        A revoked key with its right secret is a 401.
        """
        self.assertUnauthorized(key=REVOKED)

    def test_key_of_missing_app(self) -> None:
        """
        A key whose app is gone is a 401.
        """
        self.assertUnauthorized(key=ORPHAN)

    def test_non_ascii_header(self) -> None:
        """
        A header that is not ASCII is a 401, not a crash.
        """
        self.assertUnauthorized(authorization="Bearer sk_id_\u00e9:x")

    def test_openapi_needs_no_key(self) -> None:
        """
        The OpenAPI document is public.
        """
        self.assertEqual(self.world.get("/v1/openapi.json", key=None).status, 200)


class RateLimitTests(SynchronousTestCase):
    """
    Per-key and per-IP limits answer 429 with Retry-After and no body code.
    """

    def test_defaults(self) -> None:
        """
        The defaults: per key 50/s burst 100, per IP 100/s burst
        200.
        """
        limits = RestLimits()
        self.assertEqual(
            (limits.per_key_rate, limits.per_key_burst, limits.per_ip_rate, limits.per_ip_burst),
            (50.0, 100.0, 100.0, 200.0),
        )

    def test_per_key(self) -> None:
        """
        Past its burst a key gets 429 with Retry-After; another key from
        the same address does not, and the key recovers after the refill.
        """
        world = RestWorld(self, RestLimits(per_key_rate=1, per_key_burst=2, per_ip_rate=100, per_ip_burst=100))
        self.assertEqual([world.get("/v1/usage").status for _ in range(2)], [200, 200])
        limited = world.get("/v1/usage")
        self.assertEqual(limited.status, 429)
        self.assertEqual(limited.header("Retry-After"), "1")
        self.assertEqual(limited.raw, b"")
        self.assertEqual(world.get("/v1/usage", key=OTHER_APP).status, 200)
        world.clock.advance(1)
        self.assertEqual(world.get("/v1/usage").status, 200)

    def test_per_ip(self) -> None:
        """
        Past the address's burst every request from it gets 429, even
        unauthenticated ones and ones with fresh keys.
        """
        world = RestWorld(
            self, RestLimits(per_key_rate=100, per_key_burst=100, per_ip_rate=0.5, per_ip_burst=3), check_contract=False
        )
        self.assertEqual(world.get("/v1/usage").status, 200)
        self.assertEqual(world.get("/v1/usage", key=None).status, 401)
        self.assertEqual(world.get("/v1/openapi.json", key=None).status, 200)
        limited = world.get("/v1/usage", key=OTHER_APP)
        self.assertEqual(limited.status, 429)
        self.assertEqual(limited.header("Retry-After"), "2")
        world.clock.advance(2)
        self.assertEqual(world.get("/v1/usage", key=OTHER_APP).status, 200)

    def proxied_world(self, trusted: str) -> RestWorld:
        """
        A world with a per-IP burst of 3 whose requests (from C{127.0.0.1})
        come through the proxies of C{trusted}.
        """
        limits = RestLimits(per_key_rate=100, per_key_burst=100, per_ip_rate=0.5, per_ip_burst=3)
        return RestWorld(self, limits, check_contract=False, trusted_proxies=(trusted,))

    def test_per_ip_behind_trusted_proxy(self) -> None:
        """
        Behind a trusted proxy each client named in C{X-Forwarded-For} has
        its own per-IP bucket.
        """
        world = self.proxied_world("127.0.0.1")
        first = {"X-Forwarded-For": "198.51.100.1"}
        second = {"X-Forwarded-For": "6.6.6.6, 198.51.100.2"}
        self.assertEqual([world.get("/v1/usage", headers=first).status for _ in range(3)], [200] * 3)
        self.assertEqual(world.get("/v1/usage", headers=first).status, 429)
        self.assertEqual([world.get("/v1/usage", headers=second).status for _ in range(3)], [200] * 3)
        self.assertEqual(world.get("/v1/usage").status, 200)

    def test_per_ip_untrusted_peer(self) -> None:
        """
        From a peer that is not a trusted proxy, C{X-Forwarded-For} is
        ignored: a new address on every request does not dodge the limit.
        """
        world = self.proxied_world("10.0.0.0/8")
        statuses = [
            world.get("/v1/usage", headers={"X-Forwarded-For": f"198.51.100.{n}"}).status for n in range(4)
        ]
        self.assertEqual(statuses, [200, 200, 200, 429])
        self.assertEqual(world.get("/v1/usage").status, 429)

    def test_failed_authentication_does_not_drain_key(self) -> None:
        """
        Requests with a wrong secret do not use up the real key's budget.
        """
        world = RestWorld(self, RestLimits(per_key_rate=1, per_key_burst=1, per_ip_rate=100, per_ip_burst=100))
        for _ in range(3):
            world.get("/v1/usage", authorization=f"Bearer {FULL.key_id}:wrong")
        self.assertEqual(world.get("/v1/usage").status, 200)


class BodyTests(SynchronousTestCase):
    """
    The body cap, Content-Type and JSON checks.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def test_body_at_cap(self) -> None:
        """
        A body of exactly 32 KB is accepted.
        """
        prefix = b'{"peerId":"u1","metadata":{"pad":"'
        suffix = b'"}}'
        data = prefix + b"x" * (MAX_BODY_BYTES - len(prefix) - len(suffix)) + suffix
        self.assertEqual(len(data), MAX_BODY_BYTES)
        reply = self.world.post("/v1/tokens", data=data)
        # Accepted as a body; refused by the 8 KB metadata rule.
        self.assertEqual(reply.status, 400)
        self.assertIn("metadata", reply.json["message"])

    def test_body_over_cap(self) -> None:
        """
        32 KB + 1 byte is a 413 C{invalid_request}.
        """
        reply = self.world.post("/v1/tokens", data=b" " * (MAX_BODY_BYTES + 1))
        self.assertEqual(reply.status, 413)
        self.assertEqual(reply.json["error"], "invalid_request")

    def test_wrong_content_type(self) -> None:
        """
        A JSON body labelled as something else is a 400.
        """
        reply = self.world.post("/v1/tokens", data=b'{"peerId":"u1"}', content_type="text/plain")
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.json["error"], "invalid_request")
        self.assertIn("Content-Type", reply.json["message"])

    def test_missing_content_type(self) -> None:
        """
        A body without Content-Type is a 400.
        """
        reply = self.world.post("/v1/tokens", data=b'{"peerId":"u1"}', content_type=None)
        self.assertEqual(reply.status, 400)

    def test_content_type_parameters(self) -> None:
        """
        C{application/json; charset=utf-8} is JSON.
        """
        reply = self.world.post(
            "/v1/tokens", data=b'{"peerId":"u1"}', content_type="Application/JSON; charset=utf-8"
        )
        self.assertEqual(reply.status, 200)

    def test_invalid_json(self) -> None:
        """
        Text that is not JSON is a 400 naming where parsing failed.
        """
        reply = self.world.post("/v1/tokens", data=b'{"peerId": }')
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.json["error"], "invalid_request")
        self.assertIn("not valid JSON", reply.json["message"])
        self.assertIn("column", reply.json["message"])

    def test_nan_is_not_json(self) -> None:
        """
        C{NaN} is refused although Python's parser would take it.
        """
        reply = self.world.post("/v1/tokens", data=b'{"peerId":"u1","expiresInSec":NaN}')
        self.assertEqual(reply.status, 400)

    def test_not_utf8(self) -> None:
        """
        A body that is not UTF-8 is a 400.
        """
        reply = self.world.post("/v1/tokens", data=b'{"peerId":"\xff"}')
        self.assertEqual(reply.status, 400)
        self.assertIn("UTF-8", reply.json["message"])

    def test_deep_nesting(self) -> None:
        """
        Deeply nested JSON is a 400, not a crash.
        """
        reply = self.world.post("/v1/tokens", data=b"[" * 30000 + b"]" * 2000)
        self.assertEqual(reply.status, 400)

    def test_not_an_object(self) -> None:
        """
        A JSON array or an empty body is a 400.
        """
        self.assertEqual(self.world.post("/v1/tokens", body=["peerId"]).status, 400)
        self.assertEqual(self.world.post("/v1/tokens", data=b"").status, 400)

    def test_authentication_before_body(self) -> None:
        """
        Without a credential the body is not looked at: 401, not 400.
        """
        reply = self.world.post("/v1/tokens", data=b"not json", key=None)
        self.assertEqual(reply.status, 401)


class RoutingTests(SynchronousTestCase):
    """
    Unknown paths and wrong methods answer in JSON.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def test_unknown_path(self) -> None:
        """
        Unknown paths under C{/v1} and below an endpoint are JSON 404s.
        """
        for path in ("/v1/nothing", "/v1/usage/extra", "/v1/tokens/", "/v1/channels/x", "/v1/channels/x/other", "/v1/peers"):
            reply = self.world.get(path)
            self.assertEqual((path, reply.status, reply.json["error"]), (path, 404, "not_found"))

    def test_wrong_method(self) -> None:
        """
        A wrong method is a JSON 405 with an Allow header.
        """
        reply = self.world.get("/v1/tokens")
        self.assertEqual(reply.status, 405)
        self.assertEqual(reply.header("Allow"), "POST")
        self.assertEqual(reply.json["error"], "invalid_request")
        reply = self.world.request("PUT", "/v1/channels/demo%2Fa/peers")
        self.assertEqual((reply.status, reply.header("Allow")), (405, "GET"))

    def test_request_id_header(self) -> None:
        """
        Every REST answer carries an X-Request-Id.
        """
        self.assertTrue(self.world.get("/v1/usage").header("X-Request-Id"))


class FaultTests(SynchronousTestCase):
    """
    Unexpected failures and stalls become 503 with a request id; no
    traceback reaches the client and nothing is written twice.
    """

    def test_unexpected_exception(self) -> None:
        """
        A failing dependency is logged with the request id and answered 503
        C{internal_error} naming that id, without its details.
        """
        world = RestWorld(self, meter=BrokenMeter())  # type: ignore[arg-type]
        reply = world.get("/v1/usage")
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.json["error"], "internal_error")
        request_id = reply.header("X-Request-Id")
        assert request_id is not None
        self.assertIn(request_id, reply.json["message"])
        self.assertNotIn("secret", reply.raw.decode())
        self.assertNotIn("Traceback", reply.raw.decode())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_timeout(self) -> None:
        """
        A handler still waiting after the timeout is answered 503 and its
        work cancelled; no timer is left behind.
        """
        meter = StalledMeter()
        world = RestWorld(self, RestLimits(timeout=10.0), meter=meter)  # type: ignore[arg-type]
        deferred = world.http.request(
            "GET", "http://127.0.0.1:8080/v1/usage", headers={"Authorization": [bearer(FULL)]}
        )
        world.http.flush()
        self.assertNoResult(deferred)
        world.clock.advance(9.9)
        world.http.flush()
        self.assertNoResult(deferred)
        world.clock.advance(0.1)
        world.http.flush()
        response = self.successResultOf(deferred)
        self.assertEqual(response.code, 503)
        body = json.loads(self.successResultOf(world.http.content(response)))
        self.assertEqual(body["error"], "internal_error")
        self.assertIn("timed out", body["message"])
        self.assertEqual(world.clock.getDelayedCalls(), [])
        self.assertTrue(meter.pending[0].called)

    def test_client_gone(self) -> None:
        """
        When the client disconnects first, the handler is cancelled and
        nothing is written to the dead request, then or at the timeout.
        """
        meter = StalledMeter()
        world = RestWorld(self, meter=meter)  # type: ignore[arg-type]
        request = DummyRequest([])
        request.method = b"GET"
        request.requestHeaders.addRawHeader(b"authorization", bearer(FULL).encode())
        usage = world.v1.children[b"usage"]
        request.render(usage)
        self.assertEqual(request.written, [])
        request.processingFailed(Failure(ConnectionError("gone")))
        world.clock.advance(60)
        self.assertEqual((request.written, request.finished), ([], 0))
        self.assertEqual(world.clock.getDelayedCalls(), [])
        self.assertTrue(meter.pending[0].called)
