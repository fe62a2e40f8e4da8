"""
Metered TURN credentials for welcome frames (protocol §20).

Two classes:

  - L{TurnApiClient} speaks the Metered TURN REST API (§20.2) over an
    injected treq-like HTTP client: it creates a credential and fetches the
    ICE server list for it, with a deadline on every call, and turns every
    unusable answer into a L{TurnApiError} that says why without revealing
    the account's C{secretKey}.
  - L{TurnCredentialCache} is the L{ITurnProvider} the hub asks on every
    connect. It keeps one ICE server list per app, refreshes it before it
    expires, makes one API round trip for any number of concurrent askers,
    never keeps a welcome waiting longer than C{wait_limit}, and backs off
    from an API that keeps failing.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IResponse
from zope.interface import implementer

from meteredrt.apps import App, TurnConfig
from meteredrt.httpbody import BodyTooLarge, read_body
from meteredrt.icelist import ice_servers_error
from meteredrt.interfaces import ITurnProvider
from meteredrt.metrics import Metrics

#: Injected TURN credentials live within these bounds (seconds)...
CREDENTIAL_LIFETIME_MIN, CREDENTIAL_LIFETIME_MAX = 3600, 86400
#: ...and this long for connections that never expire (publishable keys).
PUBLISHABLE_CREDENTIAL_LIFETIME = 12 * 3600


def credential_lifetime(remaining: float | None) -> int:
    """
    How long a TURN credential should live: the token's remaining lifetime
    within [1 h, 24 h], 12 h when the connection never expires.

    @param remaining: the lifetime left to the token that carries the
        credential, in seconds, or C{None} for a connection that never
        expires.
    @return: C{remaining} within one hour and one day; 12 hours for C{None}.
    """
    if remaining is None:
        return PUBLISHABLE_CREDENTIAL_LIFETIME
    return int(min(CREDENTIAL_LIFETIME_MAX, max(CREDENTIAL_LIFETIME_MIN, remaining)))

_log = Logger()

#: Query parameters whose values are credentials: never logged, never put in
#: an error message.
_SECRET_PARAMS = frozenset({"secretKey", "apiKey"})

#: What replaces a credential in URLs and body excerpts.
_REDACTED = "<redacted>"

#: The largest response body read from the TURN API. A legal ICE server list
#: (16 entries of 512-character URLs) is far smaller; this only stops a
#: misbehaving server from filling memory.
MAX_BODY_BYTES = 256 * 1024

#: How much of a response body an error message quotes.
_EXCERPT_CHARS = 200

#: The cached list is served while at least this fraction of the lifetime it
#: was minted with remains; after that the next caller triggers a refresh.
FRESH_FRACTION = 0.25


class TurnApiError(Exception):
    """
    The TURN API gave no usable answer.

    The message names the request (with credentials redacted) and the cause:
    the HTTP status and a body excerpt, invalid JSON, a wrong shape, a
    network error or a timeout.
    """


class _TreqLike(Protocol):
    """
    The part of the treq API that L{TurnApiClient} uses: the C{treq} module,
    a L{treq.client.HTTPClient} or a L{treq.testing.StubTreq}.

    The members are read-only callables rather than methods so that the
    module's functions match too: they spell out their keyword parameters
    where C{HTTPClient} takes C{**kwargs}, and every one of them accepts the
    C{params}, C{headers} and C{json} that L{TurnApiClient._exchange} passes.
    They return an Awaitable, not a Deferred, because Deferred is invariant
    and treq's fire with its own response class.
    """

    @property
    def get(self) -> Callable[..., Awaitable[IResponse]]: ...

    @property
    def post(self) -> Callable[..., Awaitable[IResponse]]: ...


class TurnApiClient:
    """
    A client of the Metered TURN REST API (protocol §20.2).

    Each call must finish, body included, within C{timeout} seconds of
    C{clock}; otherwise it is cancelled and fails with L{TurnApiError}.
    Every failure, whatever its cause, is a L{TurnApiError}. Every call is
    counted in L{Metrics.turn_calls} by operation and outcome (C{ok},
    C{failed}, or C{cancelled} by the caller).
    """

    def __init__(
        self, http: _TreqLike, clock: IReactorTime, timeout: float = 2.0, metrics: Metrics | None = None
    ) -> None:
        """
        :param http: Issues the requests; only C{get} and C{post} are used.
        :param clock: Measures the per-call deadline.
        :param timeout: Seconds each call may take.
        :param metrics: Counts the calls.
        """
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self.metrics = metrics if metrics is not None else Metrics()

    @contextmanager
    def _counted(self, operation: str) -> Iterator[None]:
        calls = self.metrics.turn_calls
        try:
            yield
        except CancelledError:
            calls[(operation, "cancelled")] += 1
            raise
        except Exception:
            calls[(operation, "failed")] += 1
            raise
        calls[(operation, "ok")] += 1

    async def create_credential(
        self, config: TurnConfig, expiry_seconds: int, label: str
    ) -> dict[str, Any]:
        """
        Create a TURN credential (C{POST /api/v1/turn/credential}).

        :param expiry_seconds: The credential's lifetime; at least 1.
        :param label: Shown in the Metered dashboard next to the credential.
        :return: The API's answer, C{{username, password, expiryInSeconds,
            label, apiKey}}; C{apiKey} is checked to be a non-empty string
            and C{expiryInSeconds}, when present, a positive integer.
        :raise TurnApiError: For any unusable answer.
        """
        if expiry_seconds < 1:
            raise ValueError(f"expiry_seconds must be at least 1, not {expiry_seconds}")
        with self._counted("create_credential"):
            return await self._create_credential(config, expiry_seconds, label)

    async def _create_credential(self, config: TurnConfig, expiry_seconds: int, label: str) -> dict[str, Any]:
        where, answer = await self._call(
            "POST",
            config,
            "/api/v1/turn/credential",
            {"secretKey": config.secret_key},
            json={"expiryInSeconds": expiry_seconds, "label": label},
        )
        if not isinstance(answer, dict):
            raise TurnApiError(f"{where}: expected a JSON object, got {type(answer).__name__}")
        api_key = answer.get("apiKey")
        if not isinstance(api_key, str) or not api_key:
            # The body holds a password: name the keys, never the values.
            raise TurnApiError(f"{where}: no apiKey in the answer (keys: {sorted(answer)})")
        expiry = answer.get("expiryInSeconds")
        if expiry is not None and (
            isinstance(expiry, bool) or not isinstance(expiry, int) or expiry < 1
        ):
            raise TurnApiError(f"{where}: expiryInSeconds is not a positive integer")
        return answer

    async def fetch_ice_servers(self, config: TurnConfig, api_key: str) -> list[dict[str, Any]]:
        """
        Fetch the ICE server list of one credential
        (C{GET /api/v1/turn/credentials}), in C{config.region} if set.

        :param api_key: The C{apiKey} from L{create_credential}.
        :return: A non-empty list the SDK accepts (see
            L{meteredrt.icelist.ice_servers_error}).
        :raise TurnApiError: For any unusable answer, including a list the
            SDK would silently discard.
        """
        with self._counted("fetch_ice_servers"):
            return await self._fetch_ice_servers(config, api_key)

    async def _fetch_ice_servers(self, config: TurnConfig, api_key: str) -> list[dict[str, Any]]:
        params = {"apiKey": api_key}
        if config.region:
            params["region"] = config.region
        where, answer = await self._call("GET", config, "/api/v1/turn/credentials", params)
        reason = ice_servers_error(answer)
        if reason is not None:
            raise TurnApiError(f"{where}: unusable ICE server list: {reason}")
        assert isinstance(answer, list)
        if not answer:
            raise TurnApiError(f"{where}: empty ICE server list")
        return answer

    async def _call(
        self,
        method: str,
        config: TurnConfig,
        path: str,
        params: dict[str, str],
        **kwargs: Any,
    ) -> tuple[str, object]:
        """
        Make one request and decode its JSON answer, within the deadline.

        :return: A description of the request safe to log, and the decoded
            JSON of a 2xx answer.
        """
        url = config.base_url.rstrip("/") + path
        send = self._http.post if method == "POST" else self._http.get
        shown = "&".join(
            f"{name}={_REDACTED if name in _SECRET_PARAMS else value}"
            for name, value in params.items()
        )
        where = f"{method} {url}?{shown}"
        secrets = [value for name, value in params.items() if name in _SECRET_PARAMS]

        def timed_out(result: object, timeout: float) -> object:
            # The Agent reports its cancellation in its own exceptions; after
            # the deadline, any failure is the timeout's doing.
            if isinstance(result, Failure):
                raise TurnApiError(f"{where}: no answer within {timeout:g} s")
            return result

        exchange = Deferred.fromCoroutine(self._exchange(send, url, params, kwargs))
        exchange.addTimeout(self._timeout, self._clock, onTimeoutCancel=timed_out)
        try:
            status, body = await exchange
        except (TurnApiError, CancelledError):
            raise
        except BodyTooLarge:
            raise TurnApiError(f"{where}: answer larger than {MAX_BODY_BYTES} bytes") from None
        except Exception as error:
            if _cancelled(error):
                raise CancelledError() from error
            cause = _redact(f"{type(error).__name__}: {error}", secrets)
            raise TurnApiError(f"{where}: {cause}") from error
        if not 200 <= status < 300:
            raise TurnApiError(f"{where}: HTTP {status}: {_excerpt(body, secrets)}")
        try:
            return where, json.loads(body)
        except ValueError:
            raise TurnApiError(
                f"{where}: HTTP {status} with invalid JSON: {_excerpt(body, secrets)}"
            ) from None

    async def _exchange(
        self,
        send: Callable[..., Awaitable[IResponse]],
        url: str,
        params: dict[str, str],
        kwargs: dict[str, Any],
    ) -> tuple[int, bytes]:
        """
        Send the request and read the whole body, up to L{MAX_BODY_BYTES}.
        """
        response = await send(
            url, params=params, headers={"Accept": ["application/json"]}, **kwargs
        )
        return response.code, await read_body(response, MAX_BODY_BYTES)


def _cancelled(error: Exception) -> bool:
    """
    Whether C{error} is how the HTTP Agent reports that its request was
    cancelled: one of its wrapper exceptions around a L{CancelledError}.
    """
    if not isinstance(error, (RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived)):
        return False
    reasons = error.reasons
    return any(reason.check(CancelledError) for reason in reasons)


def _redact(text: str, secrets: list[str]) -> str:
    """
    Replace every credential in C{text} with a marker.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    return text


def _excerpt(body: bytes, secrets: list[str]) -> str:
    """
    Quote the start of a response body for an error message: decoded,
    redacted, shortened, and C{repr}-quoted so it stays on one line.
    """
    text = _redact(body.decode("utf-8", "replace"), secrets)
    if len(text) > _EXCERPT_CHARS:
        text = text[:_EXCERPT_CHARS] + "..."
    return repr(text)


@frozen
class _Minted:
    """
    One app's cached ICE server list and the span of time it is good for.
    """

    ice_servers: list[dict[str, Any]]
    minted_at: float
    expires_at: float

    def fresh(self, now: float) -> bool:
        """
        Whether enough lifetime remains to hand the list out without
        refreshing it: at least L{FRESH_FRACTION} of the whole.
        """
        return self.expires_at - now >= (self.expires_at - self.minted_at) * FRESH_FRACTION

    def valid(self, now: float) -> bool:
        """
        Whether the credentials still work at all.
        """
        return now < self.expires_at


@define(eq=False)
class _Waiter:
    """
    One caller waiting for a refresh, with the answer to give if the refresh
    does not deliver in time.
    """

    fallback: list[dict[str, Any]] | None
    deferred: Deferred[list[dict[str, Any]] | None] = field(init=False)
    timer: IDelayedCall | None = field(init=False, default=None)


@define(eq=False)
class _Refresh:
    """
    One in-flight round trip to the TURN API for one app, and who waits
    for it.
    """

    waiters: list[_Waiter] = field(factory=list)
    deferred: Deferred[None] | None = None
    slow_reported: bool = False


@implementer(ITurnProvider)
class TurnCredentialCache(Service):
    """
    ICE server lists for welcome frames, one cached per app.

    Freshness: a list is served from the cache while at least
    L{FRESH_FRACTION} (a quarter) of the lifetime it was minted with
    remains. After that the next caller starts a refresh, so a list handed
    to a peer is good for at least a quarter of its lifetime (15 minutes at
    the minimum lifetime of one hour). Nothing is refreshed on a timer: an app
    nobody connects to costs no API calls.

    Lifetime: C{app.turn.ttl} if configured, else the C{ttl} of the call
    that triggers the refresh (the caller applies L{credential_lifetime}). The cache keys on
    the app alone, so later callers share that credential.

    Coalescing: all callers that find the cache stale while a refresh is
    in flight wait for that one refresh: one credential creation and one
    list fetch, however many connects arrive.

    Deadline: no caller waits more than C{wait_limit} seconds. A caller
    whose wait runs out gets the previous list if it has not expired yet,
    else C{None}; the refresh carries on and fills the cache for later
    callers. Such callers are counted in L{timeouts}, and the first of each
    refresh is logged.

    Failure: a failed refresh gives its waiters the same fallback, is
    counted in L{failures} and logged once with its cause. The app is then
    not retried for C{backoff} seconds, doubling with each consecutive
    failure up to C{max_backoff}; meanwhile callers get the fallback at
    once.

    @ivar failures: Failed refreshes, per app id.
    @ivar timeouts: Callers answered without a fresh list because the
        refresh outlasted C{wait_limit}, per app id.
    """

    def __init__(
        self,
        client: TurnApiClient,
        clock: IReactorTime,
        log: Logger | None = None,
        wait_limit: float = 2.0,
        backoff: float = 5.0,
        max_backoff: float = 300.0,
    ) -> None:
        """
        :param client: Talks to the TURN API.
        :param clock: Measures lifetimes, waits and back-off.
        :param log: Where failures are reported.
        :param wait_limit: The longest a caller waits for a refresh, in
            seconds.
        :param backoff: Seconds without retrying an app after its first
            consecutive failure.
        :param max_backoff: The longest back-off, in seconds.
        """
        self._client = client
        self._clock = clock
        self._log = log if log is not None else _log
        self._wait_limit = wait_limit
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._minted: dict[str, _Minted] = {}
        self._refreshes: dict[str, _Refresh] = {}
        self._failure_streaks: Counter[str] = Counter()
        self._retry_at: dict[str, float] = {}
        self.failures: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()

    def ice_servers(self, app: App, ttl: int) -> Deferred[list[dict[str, Any]] | None]:
        """
        Fire with an ICE server list for one of C{app}'s welcomes, or with
        C{None} when none can be had within C{wait_limit}.

        Each caller gets its own copy of the list.

        :param ttl: The credential lifetime L{credential_lifetime} chose, in seconds; used
            unless the app configures its own.
        """
        config = app.turn
        if config is None:
            return succeed(None)
        lifetime = config.ttl or ttl
        if lifetime < 1:
            raise ValueError(f"TURN credential lifetime must be at least 1 s, not {lifetime}")
        now = self._clock.seconds()
        minted = self._minted.get(app.app_id)
        if minted is not None and minted.fresh(now):
            return succeed(copy.deepcopy(minted.ice_servers))
        fallback = minted.ice_servers if minted is not None and minted.valid(now) else None
        refresh = self._refreshes.get(app.app_id)
        if refresh is None and now < self._retry_at.get(app.app_id, now):
            return succeed(copy.deepcopy(fallback))
        if refresh is not None:
            return self._wait(app.app_id, refresh, fallback)
        refresh = self._refreshes[app.app_id] = _Refresh()
        # Wait first, so that a refresh that completes synchronously still
        # finds its caller.
        waiting = self._wait(app.app_id, refresh, fallback)
        refresh.deferred = (
            Deferred.fromCoroutine(self._refresh(app.app_id, config, lifetime))
            .addCallback(self._settle, app.app_id, refresh)
            .addErrback(self._bookkeeping_failed, app.app_id)
        )
        return waiting

    def close(self) -> None:
        """
        Abandon every refresh in flight and answer its waiters with their
        fallback; no timers remain afterwards. The cache stays usable.
        """
        refreshes, self._refreshes = self._refreshes, {}
        for refresh in refreshes.values():
            self._answer(refresh, None)
            if refresh.deferred is not None:
                refresh.deferred.cancel()

    def stopService(self) -> Deferred[None] | None:
        """
        Stop with the service tree: L{close}.
        """
        self.close()
        return super().stopService()

    def _wait(
        self, app_id: str, refresh: _Refresh, fallback: list[dict[str, Any]] | None
    ) -> Deferred[list[dict[str, Any]] | None]:
        """
        Join C{refresh} as a new waiter whose wait ends after C{wait_limit}.
        """
        waiter = _Waiter(fallback)
        waiter.deferred = Deferred(lambda _: self._withdraw(refresh, waiter))
        waiter.timer = self._clock.callLater(
            self._wait_limit, self._give_up, app_id, refresh, waiter
        )
        refresh.waiters.append(waiter)
        return waiter.deferred

    def _withdraw(self, refresh: _Refresh, waiter: _Waiter) -> None:
        """
        Forget a waiter whose caller cancelled its Deferred.
        """
        refresh.waiters.remove(waiter)
        if waiter.timer is not None:
            waiter.timer.cancel()

    def _give_up(self, app_id: str, refresh: _Refresh, waiter: _Waiter) -> None:
        """
        End one caller's wait with its fallback; the refresh continues.
        """
        waiter.timer = None
        refresh.waiters.remove(waiter)
        self.timeouts[app_id] += 1
        if not refresh.slow_reported:
            refresh.slow_reported = True
            self._log.warn(
                "TURN API gave no ICE servers for app {app_id} within {wait_limit:g} s;"
                " welcomes go out without fresh iceServers until it answers",
                app_id=app_id,
                wait_limit=self._wait_limit,
            )
        waiter.deferred.callback(copy.deepcopy(waiter.fallback))

    def _settle(self, ice_servers: list[dict[str, Any]] | None, app_id: str, refresh: _Refresh) -> None:
        """
        A refresh ended: answer everybody still waiting for it.
        """
        if self._refreshes.get(app_id) is refresh:
            del self._refreshes[app_id]
        self._answer(refresh, ice_servers)

    def _answer(self, refresh: _Refresh, ice_servers: list[dict[str, Any]] | None) -> None:
        """
        Fire every waiter of C{refresh} with C{ice_servers}, or with its
        fallback if that is C{None}.
        """
        waiters, refresh.waiters = refresh.waiters, []
        for waiter in waiters:
            if waiter.timer is not None:
                waiter.timer.cancel()
                waiter.timer = None
            answer = ice_servers if ice_servers is not None else waiter.fallback
            waiter.deferred.callback(copy.deepcopy(answer))

    async def _refresh(
        self, app_id: str, config: TurnConfig, lifetime: int
    ) -> list[dict[str, Any]] | None:
        """
        Mint a credential, fetch its ICE servers and cache them.

        :return: The new list, or C{None} after a failure (logged here) or
            when L{close} abandoned the refresh.
        """
        started = self._clock.seconds()
        try:
            credential = await self._client.create_credential(
                config, lifetime, f"meteredrt:{app_id}"
            )
            ice_servers = await self._client.fetch_ice_servers(config, credential["apiKey"])
        except CancelledError:
            return None
        except TurnApiError as error:
            self._failed(app_id, str(error), None)
            return None
        except Exception:
            self._failed(app_id, "unexpected error", Failure())
            return None
        granted = credential.get("expiryInSeconds")
        if isinstance(granted, int):
            lifetime = min(lifetime, granted)
        # Count the lifetime from before the request: the API's clock
        # started no earlier.
        self._minted[app_id] = _Minted(ice_servers, started, started + lifetime)
        del self._failure_streaks[app_id]
        self._retry_at.pop(app_id, None)
        return ice_servers

    def _bookkeeping_failed(self, failure: Failure, app_id: str) -> None:
        """
        Log a bug in settling a refresh, which L{_refresh} cannot catch.
        """
        self._log.failure("Settling the TURN refresh of app {app_id} failed", failure, app_id=app_id)

    def _failed(self, app_id: str, reason: str, failure: Failure | None) -> None:
        """
        Count, log and back off from one failed refresh.
        """
        self.failures[app_id] += 1
        self._failure_streaks[app_id] += 1
        delay = min(
            self._backoff * 2 ** (self._failure_streaks[app_id] - 1), self._max_backoff
        )
        self._retry_at[app_id] = self._clock.seconds() + delay
        fields = {"app_id": app_id, "reason": reason, "retry_in": delay}
        message = (
            "TURN credentials for app {app_id} unavailable: {reason};"
            " next attempt in {retry_in:g} s"
        )
        if failure is None:
            self._log.warn(message, **fields)
        else:
            self._log.failure(message, failure, **fields)
