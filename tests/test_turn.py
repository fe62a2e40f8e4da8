"""
Tests for L{meteredrt.turn}, against a fake Metered TURN API served through
L{treq.testing.StubTreq}.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from meteredrt.apps import App, TurnConfig
from meteredrt.interfaces import ITurnProvider
from meteredrt.turn import MAX_BODY_BYTES, TurnApiClient, TurnApiError, TurnCredentialCache

#: The account secret the fake API accepts; its characters need URL quoting.
SECRET = "sk+s3cr3t/=&?"

#: An hour, the minimum credential lifetime.
HOUR = 3600

CREATE_PATH = b"/api/v1/turn/credential"
LIST_PATH = b"/api/v1/turn/credentials"


class FakeTurnApi(Resource):
    """
    A stateful stand-in for the two Metered TURN API calls meteredrt makes.

    Set C{create_mode} / C{list_mode} to make the matching endpoint
    misbehave: C{"unauthorized"}, C{"bad_request"}, C{"server_error"},
    C{"malformed"}, C{"oversized"}, C{"bad_scheme"}, C{"huge"} or
    C{"hang"} (the request is parked until L{release}). Each credential gets
    its own username, so lists from different credentials differ.

    @ivar requests: C{(method, path, args, json_body)} for every request.
    @ivar pending: Parked requests.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.create_mode = "ok"
        self.list_mode = "ok"
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]], Any]] = []
        self.pending: list[Request] = []
        self.credentials: dict[str, str] = {}

    def calls(self) -> Counter[bytes]:
        """
        How many requests each path received.
        """
        return Counter(path for _, path, _, _ in self.requests)

    def render(self, request: Request) -> bytes | int:
        """
        Record the request and answer according to the endpoint's mode.
        """
        assert request.method is not None and request.path is not None
        body = request.content.read() if request.content is not None else b""
        self.requests.append(
            (request.method, request.path, dict(request.args or {}), json.loads(body) if body else None)
        )
        request.setHeader(b"content-type", b"application/json")
        mode = self.create_mode if request.path == CREATE_PATH else self.list_mode
        if mode == "hang":
            self.pending.append(request)
            return NOT_DONE_YET
        return self._answer(request, mode)

    def release(self) -> None:
        """
        Answer every parked request as if nothing had gone wrong.
        """
        pending, self.pending = self.pending, []
        for request in pending:
            request.write(self._answer(request, "ok"))
            request.finish()

    def _answer(self, request: Request, mode: str) -> bytes:
        """
        The body for one request in one mode, setting the status code.
        """
        if mode == "unauthorized":
            request.setResponseCode(401)
            return b'{"error":"Invalid API Key"}'
        if mode == "bad_request":
            request.setResponseCode(400)
            return b'{"message":"expiryInSeconds must be a positive number"}'
        if mode == "server_error":
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body>Internal Server Error " + b"." * 500 + b"</body></html>"
        if mode == "malformed":
            return b'{"username": "abc", "pass'
        if mode == "huge":
            return b"[" + b" " * MAX_BODY_BYTES + b"]"
        if request.path == CREATE_PATH:
            return self._create(request)
        if request.path == LIST_PATH:
            return self._list(request, mode)
        request.setResponseCode(404)
        return b'{"message":"not found"}'

    def _create(self, request: Request) -> bytes:
        """
        C{POST /api/v1/turn/credential}.
        """
        if request.method != b"POST" or request.args.get(b"secretKey") != [SECRET.encode()]:
            request.setResponseCode(401)
            return b'{"error":"Invalid secretKey"}'
        body = self.requests[-1][3] or {}
        number = len(self.credentials) + 1
        api_key = f"key{number}"
        self.credentials[api_key] = f"user{number}"
        return json.dumps(
            {
                "username": f"user{number}",
                "password": f"password{number}",
                "expiryInSeconds": body.get("expiryInSeconds"),
                "label": body.get("label"),
                "apiKey": api_key,
            }
        ).encode()

    def _list(self, request: Request, mode: str) -> bytes:
        """
        C{GET /api/v1/turn/credentials}.
        """
        api_key = (request.args.get(b"apiKey") or [b""])[0].decode()
        if api_key not in self.credentials:
            request.setResponseCode(401)
            return b'{"error":"Invalid API Key"}'
        username = self.credentials[api_key]
        servers: list[dict[str, str]] = [{"urls": "stun:stun.relay.metered.ca:80"}]
        turn = {"username": username, "credential": "password"}
        servers += [
            {"urls": "turn:global.relay.metered.ca:80", **turn},
            {"urls": "turns:global.relay.metered.ca:443?transport=tcp", **turn},
        ]
        if mode == "oversized":
            servers = servers * 6
        if mode == "bad_scheme":
            servers.append({"urls": "https://global.relay.metered.ca/", **turn})
        return json.dumps(servers).encode()


def expected_list(number: int) -> list[dict[str, str]]:
    """
    The ICE servers the fake API answers for its C{number}th credential.
    """
    turn = {"username": f"user{number}", "credential": "password"}
    return [
        {"urls": "stun:stun.relay.metered.ca:80"},
        {"urls": "turn:global.relay.metered.ca:80", **turn},
        {"urls": "turns:global.relay.metered.ca:443?transport=tcp", **turn},
    ]


def config(**kwargs: Any) -> TurnConfig:
    """
    A TURN configuration pointing at the fake API.
    """
    return TurnConfig(
        app_name="acme", secret_key=SECRET, api_base="https://turn.example/", **kwargs
    )


class TurnApiClientTests(SynchronousTestCase):
    """
    Tests for L{TurnApiClient}.
    """

    def setUp(self) -> None:
        self.api = FakeTurnApi()
        self.stub = StubTreq(self.api)
        self.clock = Clock()
        self.client = TurnApiClient(self.stub, self.clock)

    def create(self, turn: TurnConfig | None = None) -> Deferred[dict[str, Any]]:
        """
        Create a credential of an hour.
        """
        return Deferred.fromCoroutine(
            self.client.create_credential(turn or config(), HOUR, "meteredrt:app1")
        )

    def fetch(self, turn: TurnConfig | None = None, api_key: str = "key1") -> Deferred[list[Any]]:
        """
        Fetch the ICE servers of a credential.
        """
        return Deferred.fromCoroutine(self.client.fetch_ice_servers(turn or config(), api_key))

    def assertApiError(self, deferred: Deferred[Any], *fragments: str) -> str:
        """
        C{deferred} failed with a L{TurnApiError} whose message contains
        every fragment and no credential.
        """
        message = str(self.failureResultOf(deferred, TurnApiError).value)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn(SECRET, message)
        self.assertNotIn("key1", message)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        return message

    def test_create_credential(self) -> None:
        """
        Creating a credential posts its lifetime and label with the secret
        key and returns the API's answer.
        """
        answer = self.successResultOf(self.create())
        self.assertEqual(
            answer,
            {
                "username": "user1",
                "password": "password1",
                "expiryInSeconds": HOUR,
                "label": "meteredrt:app1",
                "apiKey": "key1",
            },
        )
        [(method, path, args, body)] = self.api.requests
        self.assertEqual((method, path), (b"POST", CREATE_PATH))
        self.assertEqual(args, {b"secretKey": [SECRET.encode()]})
        self.assertEqual(body, {"expiryInSeconds": HOUR, "label": "meteredrt:app1"})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_create_rejects_nonpositive_expiry(self) -> None:
        """
        A lifetime below one second is a caller error, not an API call.
        """
        self.failureResultOf(
            Deferred.fromCoroutine(self.client.create_credential(config(), 0, "x")), ValueError
        )
        self.assertEqual(self.api.requests, [])

    def test_fetch_ice_servers(self) -> None:
        """
        Fetching with the credential's apiKey returns the API's list.
        """
        self.successResultOf(self.create())
        self.assertEqual(self.successResultOf(self.fetch()), expected_list(1))
        method, path, args, _ = self.api.requests[-1]
        self.assertEqual((method, path, args), (b"GET", LIST_PATH, {b"apiKey": [b"key1"]}))

    def test_fetch_region(self) -> None:
        """
        A configured region is passed along.
        """
        self.successResultOf(self.create())
        self.successResultOf(self.fetch(config(region="europe")))
        self.assertEqual(self.api.requests[-1][2], {b"apiKey": [b"key1"], b"region": [b"europe"]})

    def test_unauthorized(self) -> None:
        """
        A 401 fails with its status and the API's message.
        """
        self.assertApiError(
            self.fetch(), "GET https://turn.example/api/v1/turn/credentials?apiKey=<redacted>",
            "HTTP 401", "Invalid API Key",
        )

    def test_wrong_secret(self) -> None:
        """
        A wrong secret key fails without appearing in the message.
        """
        message = self.assertApiError(
            self.create(TurnConfig("acme", "wrong-secret", api_base="https://turn.example")),
            "POST https://turn.example/api/v1/turn/credential?secretKey=<redacted>",
            "HTTP 401",
        )
        self.assertNotIn("wrong-secret", message)

    def test_bad_request(self) -> None:
        """
        A 400 fails with its status and message.
        """
        self.api.create_mode = "bad_request"
        self.assertApiError(self.create(), "HTTP 400", "positive number")

    def test_server_error(self) -> None:
        """
        A 500 fails with its status and a shortened body excerpt.
        """
        self.api.create_mode = "server_error"
        message = self.assertApiError(self.create(), "HTTP 500", "Internal Server Error")
        self.assertLess(len(message), 400)

    def test_malformed(self) -> None:
        """
        A 200 whose body is not JSON fails, quoting the body.
        """
        self.api.create_mode = "malformed"
        self.assertApiError(self.create(), "HTTP 200 with invalid JSON", '"pass')

    def test_too_large(self) -> None:
        """
        A body larger than the limit fails instead of filling memory.
        """
        self.api.create_mode = "huge"
        self.assertApiError(self.create(), f"larger than {MAX_BODY_BYTES} bytes")

    def test_credential_without_api_key(self) -> None:
        """
        A credential answer without an apiKey fails, naming its keys but
        not the password.
        """
        stub = StubTreq(_Static(b'{"username": "u", "password": "pw-shown-nowhere"}'))
        client = TurnApiClient(stub, self.clock)
        failure = self.failureResultOf(
            Deferred.fromCoroutine(client.create_credential(config(), HOUR, "x")), TurnApiError
        )
        self.assertIn("no apiKey", str(failure.value))
        self.assertIn("password", str(failure.value))
        self.assertNotIn("pw-shown-nowhere", str(failure.value))

    def test_credential_not_object(self) -> None:
        """
        A credential answer that is not a JSON object fails.
        """
        client = TurnApiClient(StubTreq(_Static(b"[]")), self.clock)
        failure = self.failureResultOf(
            Deferred.fromCoroutine(client.create_credential(config(), HOUR, "x")), TurnApiError
        )
        self.assertIn("expected a JSON object", str(failure.value))

    def test_oversized_list(self) -> None:
        """
        A list of more than 16 entries fails: the SDK would drop it.
        """
        self.successResultOf(self.create())
        self.api.list_mode = "oversized"
        self.assertApiError(self.fetch(), "unusable ICE server list", "18 entries")

    def test_bad_scheme(self) -> None:
        """
        A list with a non-ICE URL fails, naming the entry.
        """
        self.successResultOf(self.create())
        self.api.list_mode = "bad_scheme"
        self.assertApiError(self.fetch(), "unusable ICE server list", "iceServers[3]")

    def test_empty_list(self) -> None:
        """
        An empty list fails: it would take TURN away from the peer.
        """
        client = TurnApiClient(StubTreq(_Static(b"[]")), self.clock)
        failure = self.failureResultOf(
            Deferred.fromCoroutine(client.fetch_ice_servers(config(), "k")), TurnApiError
        )
        self.assertIn("empty ICE server list", str(failure.value))

    def test_timeout(self) -> None:
        """
        A call that gets no answer within the timeout fails and is
        cancelled.
        """
        self.api.create_mode = "hang"
        created = self.create()
        self.clock.advance(1.9)
        self.assertNoResult(created)
        self.clock.advance(0.1)
        self.assertApiError(created, "no answer within 2 s")

    def test_network_error(self) -> None:
        """
        A connection failure becomes a L{TurnApiError} naming it.
        """
        client = TurnApiClient(_Refusing(), self.clock)
        self.assertApiError(
            Deferred.fromCoroutine(client.create_credential(config(), HOUR, "x")),
            "ConnectionRefusedError",
        )


class _Static(Resource):
    """
    Answers every request with one fixed 200 body.
    """

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body

    def render(self, request: Request) -> bytes:
        return self._body


class _Refusing:
    """
    An HTTP client whose connections are all refused.
    """

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError())

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError())


class _Broken:
    """
    A TURN client with a bug.
    """

    async def create_credential(self, config: TurnConfig, expiry_seconds: int, label: str) -> Any:
        raise ZeroDivisionError("bug")


class TurnCredentialCacheTests(SynchronousTestCase):
    """
    Tests for L{TurnCredentialCache}.
    """

    def setUp(self) -> None:
        self.api = FakeTurnApi()
        self.stub = StubTreq(self.api)
        self.clock = Clock()
        self.events = EventLoggingObserver()
        self.cache = self.make_cache()
        self.app = App("app1", turn=config())

    def make_cache(self, timeout: float = 2.0) -> TurnCredentialCache:
        """
        A cache over the fake API whose client has this C{timeout}.
        """
        client = TurnApiClient(self.stub, self.clock, timeout=timeout)
        return TurnCredentialCache(client, self.clock, log=Logger(observer=self.events))

    def ask(self, app: App | None = None, ttl: int = HOUR) -> Deferred[list[Any] | None]:
        """
        Ask the cache for an app's ICE servers.
        """
        return self.cache.ice_servers(app or self.app, ttl)

    def messages(self) -> list[str]:
        """
        Every message logged so far, formatted.
        """
        return [formatEvent(event) for event in self.events]

    def assertFailureLogged(self, *fragments: str) -> None:
        """
        Exactly one warning was logged, with every fragment, no traceback
        and no credential.
        """
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertNotIn("log_failure", event)
        message = formatEvent(event)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn(SECRET, message)
        self.assertNotIn("key1", message)

    def test_interface(self) -> None:
        """
        The cache is an L{ITurnProvider}.
        """
        self.assertTrue(verifyObject(ITurnProvider, self.cache))

    def test_no_turn(self) -> None:
        """
        An app without TURN configuration gets C{None} at once and costs no
        request.
        """
        self.assertIsNone(self.successResultOf(self.ask(App("plain"))))
        self.assertEqual(self.api.requests, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mint(self) -> None:
        """
        The first ask creates a labelled credential of the requested
        lifetime and fires with its ICE servers.
        """
        self.assertEqual(self.successResultOf(self.ask(ttl=2 * HOUR)), expected_list(1))
        self.assertEqual(self.api.calls(), {CREATE_PATH: 1, LIST_PATH: 1})
        self.assertEqual(
            self.api.requests[0][3], {"expiryInSeconds": 2 * HOUR, "label": "meteredrt:app1"}
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_configured_ttl_wins(self) -> None:
        """
        An app's configured ttl overrides the caller's.
        """
        self.successResultOf(self.ask(App("app1", turn=config(ttl=600)), ttl=HOUR))
        self.assertEqual(self.api.requests[0][3]["expiryInSeconds"], 600)

    def test_cached(self) -> None:
        """
        While most of the lifetime remains, asks are answered from the
        cache without a request.
        """
        self.successResultOf(self.ask())
        self.clock.advance(0.75 * HOUR)
        self.assertEqual(self.successResultOf(self.ask()), expected_list(1))
        self.assertEqual(self.api.calls(), {CREATE_PATH: 1, LIST_PATH: 1})

    def test_copies(self) -> None:
        """
        Each caller gets its own copy of the list.
        """
        first = self.successResultOf(self.ask())
        assert first is not None
        first[0]["urls"] = "changed"
        self.assertEqual(self.successResultOf(self.ask()), expected_list(1))

    def test_refresh(self) -> None:
        """
        Once less than a quarter of the lifetime remains, the next ask mints
        a new credential.
        """
        self.successResultOf(self.ask())
        self.clock.advance(0.76 * HOUR)
        self.assertEqual(self.successResultOf(self.ask()), expected_list(2))
        self.assertEqual(self.api.calls(), {CREATE_PATH: 2, LIST_PATH: 2})

    def test_keyed_per_app(self) -> None:
        """
        Each app has its own credential.
        """
        self.successResultOf(self.ask())
        self.assertEqual(self.successResultOf(self.ask(App("app2", turn=config()))), expected_list(2))
        self.assertEqual(self.api.requests[2][3]["label"], "meteredrt:app2")

    def test_burst(self) -> None:
        """
        A thousand concurrent asks make one create and one list request,
        and all fire with the list.
        """
        self.api.create_mode = "hang"
        asks = [self.ask() for _ in range(1000)]
        for ask in asks:
            self.assertNoResult(ask)
        self.api.release()
        self.stub.flush()
        for ask in asks:
            self.assertEqual(self.successResultOf(ask), expected_list(1))
        self.assertEqual(self.api.calls(), {CREATE_PATH: 1, LIST_PATH: 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wait_limit(self) -> None:
        """
        A caller waits at most two seconds, then gets C{None}; the slow
        fetch is logged once however many callers it kept waiting.
        """
        self.cache = self.make_cache(timeout=10.0)
        self.api.create_mode = "hang"
        asks = [self.ask() for _ in range(3)]
        self.clock.advance(1.9)
        self.assertNoResult(asks[0])
        later = self.ask()
        self.clock.advance(0.1)
        for ask in asks:
            self.assertIsNone(self.successResultOf(ask))
        self.assertNoResult(later)
        self.assertEqual(self.cache.timeouts["app1"], 3)
        [message] = self.messages()
        self.assertIn("app1 within 2 s", message)

    def test_late_answer_fills_cache(self) -> None:
        """
        A fetch that outlasts the callers' wait still fills the cache.
        """
        self.cache = self.make_cache(timeout=10.0)
        self.api.create_mode = "hang"
        ask = self.ask()
        self.clock.advance(2.5)
        self.assertIsNone(self.successResultOf(ask))
        self.api.release()
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(self.ask()), expected_list(1))
        self.assertEqual(self.api.calls(), {CREATE_PATH: 1, LIST_PATH: 1})
        self.assertEqual(self.cache.failures, {})

    def test_timeout_is_failure(self) -> None:
        """
        A fetch the client gives up on counts as a failure and is logged
        with its cause.
        """
        self.cache = self.make_cache(timeout=5.0)
        self.api.create_mode = "hang"
        ask = self.ask()
        self.clock.advance(2)
        self.assertIsNone(self.successResultOf(ask))
        self.clock.advance(3)
        self.assertEqual(self.cache.failures["app1"], 1)
        slow, failed = self.messages()
        self.assertIn("no answer within 5 s", failed)
        self.assertNotIn(SECRET, failed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def assertFailsWith(self, create_mode: str, list_mode: str, *fragments: str) -> None:
        """
        With the API in these modes an ask fires with C{None}, and the
        failure is counted and logged once with its cause.
        """
        self.api.create_mode = create_mode
        self.api.list_mode = list_mode
        self.assertIsNone(self.successResultOf(self.ask()))
        self.assertEqual(self.cache.failures["app1"], 1)
        self.assertFailureLogged("app1", *fragments)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unauthorized(self) -> None:
        """
        A 401 gives C{None} and is logged with its status and message.
        """
        self.assertFailsWith("ok", "unauthorized", "HTTP 401", "Invalid API Key")

    def test_bad_request(self) -> None:
        """
        A 400 gives C{None} and is logged.
        """
        self.assertFailsWith("bad_request", "ok", "HTTP 400", "positive number")

    def test_server_error(self) -> None:
        """
        A 500 gives C{None} and is logged.
        """
        self.assertFailsWith("server_error", "ok", "HTTP 500")

    def test_malformed(self) -> None:
        """
        Invalid JSON gives C{None} and is logged.
        """
        self.assertFailsWith("malformed", "ok", "invalid JSON")

    def test_oversized(self) -> None:
        """
        A list the SDK would drop for its length gives C{None} and is
        logged.
        """
        self.assertFailsWith("ok", "oversized", "18 entries")

    def test_bad_scheme(self) -> None:
        """
        A list the SDK would drop for a URL scheme gives C{None} and is
        logged.
        """
        self.assertFailsWith("ok", "bad_scheme", "iceServers[3]", "does not start with")

    def test_unexpected_error(self) -> None:
        """
        A bug in the client gives C{None} and is logged with its traceback.
        """
        cache = TurnCredentialCache(_Broken(), self.clock, log=Logger(observer=self.events))  # type: ignore[arg-type]
        self.assertIsNone(self.successResultOf(cache.ice_servers(self.app, HOUR)))
        self.assertEqual(cache.failures["app1"], 1)
        [event] = self.events
        self.assertIsInstance(event["log_failure"].value, ZeroDivisionError)

    def test_backoff(self) -> None:
        """
        After a failure the app is not retried for five seconds, then ten
        after a second failure; success resets it.
        """
        self.api.create_mode = "server_error"
        self.assertIsNone(self.successResultOf(self.ask()))
        self.clock.advance(4.9)
        self.assertIsNone(self.successResultOf(self.ask()))
        self.assertEqual(self.api.calls()[CREATE_PATH], 1)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(self.ask()))
        self.assertEqual(self.api.calls()[CREATE_PATH], 2)
        self.clock.advance(9.9)
        self.ask()
        self.assertEqual(self.api.calls()[CREATE_PATH], 2)
        self.api.create_mode = "ok"
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(self.ask()), expected_list(1))
        self.assertEqual(self.cache.failures["app1"], 2)
        self.assertIn("next attempt in 10 s", self.messages()[1])
        self.clock.advance(0.76 * HOUR)
        self.api.create_mode = "server_error"
        self.successResultOf(self.ask())
        self.assertIn("next attempt in 5 s", self.messages()[2])

    def test_stale_fallback(self) -> None:
        """
        When a refresh fails, callers get the previous list while it has
        not expired, and C{None} afterwards.
        """
        self.successResultOf(self.ask())
        self.clock.advance(0.8 * HOUR)
        self.api.create_mode = "server_error"
        self.assertEqual(self.successResultOf(self.ask()), expected_list(1))
        self.clock.advance(0.2 * HOUR)
        self.assertIsNone(self.successResultOf(self.ask()))

    def test_stale_fallback_on_wait_limit(self) -> None:
        """
        A caller whose wait for a refresh runs out gets the previous list
        while it has not expired.
        """
        self.successResultOf(self.ask())
        self.clock.advance(0.8 * HOUR)
        self.api.create_mode = "hang"
        ask = self.ask()
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(ask), expected_list(1))

    def test_caller_cancels(self) -> None:
        """
        A caller may cancel its wait without disturbing the others.
        """
        self.api.create_mode = "hang"
        gone, kept = self.ask(), self.ask()
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.api.release()
        self.stub.flush()
        self.assertEqual(self.successResultOf(kept), expected_list(1))

    def test_close(self) -> None:
        """
        Closing answers every waiter with C{None}, abandons the fetch
        without counting it as a failure, and leaves no timer.
        """
        self.api.create_mode = "hang"
        asks = [self.ask(), self.ask(App("app2", turn=config()))]
        self.cache.close()
        for ask in asks:
            self.assertIsNone(self.successResultOf(ask))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.cache.failures, {})
        self.assertEqual(self.messages(), [])

    def test_stop_service(self) -> None:
        """
        Stopping the service closes the cache.
        """
        self.cache.startService()
        self.api.create_mode = "hang"
        ask = self.ask()
        self.cache.stopService()
        self.assertIsNone(self.successResultOf(ask))
        self.assertEqual(self.clock.getDelayedCalls(), [])
