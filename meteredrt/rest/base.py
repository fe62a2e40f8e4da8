"""
The JSON base resource every REST endpoint family builds on (§19.1).

L{JsonResource} does everything an endpoint has in common, in this order:
per-IP rate limit, route and method (404/405), secret-key authentication
(401) and the per-key rate limit (429), body cap (413), C{Content-Type} and
JSON parsing (400); then it runs the route's C{async def} handler under a
timeout and writes its answer, unless the client has gone away.
L{RequestGuard} holds what the endpoints share: the key store, the clock,
the rate limiters, the metrics (every request is counted by route and
status when it finishes). L{Route} is one documented operation; the same table
drives dispatch and C{openapi.json}.

Handlers raise L{ApiError} for every answer that is not a success; any
other exception is logged with a request id and answered 503
C{internal_error} naming that id, so no traceback reaches a client.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from meteredrt.apps import App, Key, KeyType
from meteredrt.clientaddress import TrustedProxies, rate_limit_key
from meteredrt.interfaces import BackendUnavailable, IKeyStore, StoreUnavailable
from meteredrt.metrics import Metrics
from meteredrt.ratelimit import KeyedLimiter
from meteredrt.site import MAX_BODY_BYTES, client_host, error_body, json_response

#: How long a handler may take before the request is answered 503.
DEFAULT_TIMEOUT = 10.0

#: The route label of a request that matched no operation.
UNMATCHED = "unmatched"
#: The status label of a request whose client left before the answer
#: (nginx's convention).
CLIENT_CLOSED = 499

UNAUTHORIZED_MESSAGE = "missing or invalid credentials; send Authorization: Bearer sk_id_...:sk_secret_..."


@frozen
class RestLimits:
    """
    Request rate limits and the handler timeout (defaults: per key 50/s, per IP 100/s).
    """

    per_key_rate: float = 50.0
    per_key_burst: float = 100.0
    per_ip_rate: float = 100.0
    per_ip_burst: float = 200.0
    timeout: float = DEFAULT_TIMEOUT


class ApiError(Exception):
    """
    An answer other than success, in the §19.1 envelope.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message


def invalid(message: str) -> ApiError:
    """
    A 400 C{invalid_request} naming the problem.
    """
    return ApiError(400, "invalid_request", message)


class TooManyRequests(Exception):
    """
    A rate limit refused the request: 429 with C{Retry-After}, no body code.
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


@frozen
class Route:
    """
    One REST operation: what dispatch matches and what C{openapi.json} shows.

    @ivar path: the OpenAPI path template, e.g. C{/v1/peers/{peerId}}.
    @ivar handler: the name of the resource's C{async def} method.
    @ivar request_schema: the component schema of the JSON body, or
        C{None} for operations without a body.
    @ivar response_schema: the component schema of the 200 body.
    @ivar errors: the error statuses the operation can answer with.
    """

    method: str
    path: str
    operation_id: str
    summary: str
    handler: str
    response_schema: str
    request_schema: str | None = None
    auth: bool = True
    errors: tuple[int, ...] = field(default=())
    description: str = ""


@frozen
class Caller:
    """
    The authenticated key of a request and its app.
    """

    key: Key
    app: App


@frozen
class Call:
    """
    Everything a handler gets: the route's path parameters (percent-decoded
    bytes), the parsed body, and the caller when the route is authenticated.
    """

    request_id: str
    params: Mapping[str, bytes]
    body: dict[str, Any] | None
    caller: Caller | None

    @property
    def key(self) -> Key:
        assert self.caller is not None
        return self.caller.key

    @property
    def app(self) -> App:
        assert self.caller is not None
        return self.caller.app


def _parse_bearer(header: bytes | None) -> tuple[str, str] | None:
    if header is None:
        return None
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    scheme, _, credential = text.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    key_id, colon, secret = credential.strip().partition(":")
    if not colon or not key_id or not secret:
        return None
    return key_id, secret


class RequestGuard:
    """
    Authentication and rate limiting shared by every REST resource.

    Every refused credential takes the same path through one
    C{hmac.compare_digest} (against a random dummy secret when the key id is
    unknown or unusable) and gets the same 401, so neither timing nor the
    message tells whether a key id exists.

    The per-IP limit counts L{client_host}: behind C{trusted_proxies}, the
    client named in C{X-Forwarded-For}.
    """

    def __init__(
        self,
        keys: IKeyStore,
        clock: IReactorTime,
        limits: RestLimits = RestLimits(),
        trusted_proxies: TrustedProxies = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.keys = keys
        self.clock = clock
        self.limits = limits
        self.metrics = metrics if metrics is not None else Metrics()
        self._trusted_proxies = trusted_proxies
        self._per_key = KeyedLimiter(limits.per_key_burst, limits.per_key_rate)
        self._per_ip = KeyedLimiter(limits.per_ip_burst, limits.per_ip_rate)
        self._dummy_secret = ("sk_secret_" + secrets.token_urlsafe(32)).encode("ascii")

    def admit_ip(self, request: Request) -> None:
        """
        Take one request from the client address's bucket.

        @raise TooManyRequests: when it is empty.
        """
        self._take(self._per_ip, rate_limit_key(client_host(request, self._trusted_proxies)))

    def authenticate(self, request: Request) -> Caller:
        """
        Check C{Authorization: Bearer sk_id_…:sk_secret_…}, then take one
        request from that key's bucket.

        @raise ApiError: 401 C{unauthorized}, whatever was wrong.
        @raise TooManyRequests: when the key's bucket is empty.
        """
        parsed = _parse_bearer(request.getHeader(b"authorization"))
        key_id, secret = parsed if parsed is not None else ("", "")
        key = self.keys.key(key_id) if key_id else None
        if key is None or key.type is not KeyType.SECRET or not key.active or not key.secret:
            key = None
        # Compare even when there is nothing to compare against, so an
        # unknown id costs what a wrong secret does.
        expected = key.secret.encode("utf-8") if key is not None and key.secret else self._dummy_secret
        matches = hmac.compare_digest(secret.encode("utf-8"), expected)
        app = self.keys.app(key.app_id) if key is not None else None
        if not matches or key is None or app is None:
            raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE)
        self._take(self._per_key, key.key_id)
        return Caller(key, app)

    def _take(self, limiter: KeyedLimiter, bucket: str) -> None:
        now = self.clock.seconds()
        if not limiter.take(bucket, now):
            raise TooManyRequests(limiter.retry_after(bucket, now))


def _is_json_content_type(header: bytes | None) -> bool:
    if header is None:
        return False
    media_type = header.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json_body(request: Request) -> dict[str, Any]:
    """
    The request body as a JSON object, within the §19.1 cap.

    @raise ApiError: 413 over the cap; 400 for a wrong C{Content-Type},
        text that is not UTF-8 JSON, or a top level that is not an object.
    """
    length = request.getHeader(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, "invalid_request", f"request body is larger than {MAX_BODY_BYTES} bytes")
    content = request.content
    raw = b""
    if content is not None:
        content.seek(0)
        raw = content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "invalid_request", f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not _is_json_content_type(request.getHeader(b"content-type")):
        raise invalid("Content-Type must be application/json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("request body is not valid UTF-8") from None
    if not text.strip():
        raise invalid("request body must be a JSON object")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise invalid(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise invalid(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise invalid("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    return body


Handler = Callable[[Call], Coroutine[Any, Any, Mapping[str, Any]]]


class JsonResource(Resource):
    """
    A leaf resource serving one endpoint family's L{Route}s.

    Subclasses set C{routes} and implement L{locate} (which route template,
    if any, the remaining path names, with its parameters) and one
    C{async def} per route, named by L{Route.handler}, that returns the 200
    body or raises L{ApiError}.
    """

    isLeaf = True
    routes: tuple[Route, ...] = ()
    log = Logger()

    def __init__(self, guard: RequestGuard) -> None:
        super().__init__()
        self._guard = guard

    def locate(self, postpath: list[bytes]) -> tuple[str, dict[str, bytes]] | None:
        """
        Match the path below this resource (percent-decoded segments).

        @return: the matching route template and its parameters, or
            C{None} for a 404.
        """
        raise NotImplementedError

    def render(self, request: Request) -> bytes | int:
        request_id = secrets.token_hex(8)
        request.setHeader(b"x-request-id", request_id.encode("ascii"))
        # The route is known once dispatch has matched it, and a refusal
        # after that (401, 413, ...) still counts against it.
        operation = [UNMATCHED]
        request.notifyFinish().addBoth(self._count, request, operation)
        try:
            route, call = self._admit(request, request_id, operation)
        except ApiError as e:
            if e.status == 401:
                request.setHeader(b"www-authenticate", b'Bearer realm="meteredrt"')
            return json_response(request, e.status, error_body(e.code, e.message))
        except TooManyRequests as e:
            return self._too_many(request, e.retry_after)
        except StoreUnavailable:
            return json_response(
                request, 503, _internal(request_id, "the key store cannot reach its database")
            )
        except Exception:
            self.log.failure("REST request {request_id} failed before its handler", request_id=request_id)
            return json_response(request, 503, _internal(request_id))
        self._run(request, route, call)
        return NOT_DONE_YET

    def _count(self, result: object, request: Request, operation: list[str]) -> None:
        status = CLIENT_CLOSED if isinstance(result, Failure) else request.code
        self._guard.metrics.rest_requests[(operation[0], status)] += 1

    def _admit(self, request: Request, request_id: str, operation: list[str]) -> tuple[Route, Call]:
        self._guard.admit_ip(request)
        located = self.locate(list(request.postpath or []))
        if located is None:
            raise ApiError(404, "not_found", "no such endpoint")
        template, params = located
        by_method = {r.method: r for r in self.routes if r.path == template}
        method = (request.method or b"").decode("ascii", "replace")
        route = by_method.get(method)
        if route is None:
            allowed = ", ".join(sorted(by_method))
            request.setHeader(b"allow", allowed.encode("ascii"))
            raise ApiError(405, "invalid_request", f"method {method} not allowed here; use {allowed}")
        operation[0] = route.operation_id
        caller = self._guard.authenticate(request) if route.auth else None
        body = read_json_body(request) if route.request_schema is not None else None
        return route, Call(request_id, params, body, caller)

    def _run(self, request: Request, route: Route, call: Call) -> None:
        handler: Handler = getattr(self, route.handler)
        gone: list[bool] = []
        running = Deferred.fromCoroutine(handler(call))

        def client_left(failure: Failure) -> None:
            gone.append(True)
            running.cancel()

        request.notifyFinish().addErrback(client_left)
        running.addTimeout(self._guard.limits.timeout, self._guard.clock)

        def answered(body: Mapping[str, Any]) -> None:
            self._write(request, gone, 200, body)

        def failed(failure: Failure) -> None:
            if gone:
                return
            error = failure.value
            if isinstance(error, ApiError):
                self._write(request, gone, error.status, error_body(error.code, error.message))
            elif isinstance(error, BackendUnavailable):
                self.log.warn(
                    "REST request {request_id} ({operation}) needs shared state: {why}",
                    request_id=call.request_id,
                    operation=route.operation_id,
                    why=str(error),
                )
                # §19.1 has one 503 code; the message says what is missing.
                self._write(request, gone, 503, _internal(call.request_id, str(error)))
            elif failure.check(TimeoutError, CancelledError):
                self.log.warn(
                    "REST request {request_id} ({operation}) timed out",
                    request_id=call.request_id,
                    operation=route.operation_id,
                )
                self._write(request, gone, 503, _internal(call.request_id, "timed out"))
            else:
                self.log.failure(
                    "REST request {request_id} ({operation}) failed",
                    failure,
                    request_id=call.request_id,
                    operation=route.operation_id,
                )
                self._write(request, gone, 503, _internal(call.request_id))

        running.addCallbacks(answered, failed)
        running.addErrback(
            lambda f: self.log.failure("Answering REST request {request_id} failed", f, request_id=call.request_id)
        )

    def _write(self, request: Request, gone: list[bool], status: int, body: Mapping[str, Any]) -> None:
        if gone or request.finished:
            return
        request.write(json_response(request, status, dict(body)))
        request.finish()

    def _too_many(self, request: Request, retry_after: float) -> bytes:
        request.setHeader(b"retry-after", str(max(1, math.ceil(retry_after))).encode("ascii"))
        return json_response(request, 429, None)


def _internal(request_id: str, what: str = "internal error") -> dict[str, str]:
    return error_body("internal_error", f"{what}; retry shortly (request id {request_id})")


def decode_param(value: bytes, name: str) -> str:
    """
    A percent-decoded path parameter as text.

    @raise ApiError: 400 when it is not UTF-8.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"{name} is not valid UTF-8") from None
