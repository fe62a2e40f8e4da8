"""
A fake Metered TURN REST API on a real loopback socket, for functional
tests that run the whole server against it.

L{FakeTurnApi} answers the two calls meteredrt makes (protocol §20.2) with
plausible data and counts them; L{start_fake_turn} serves it as a
C{twisted.web} site on an ephemeral port of 127.0.0.1 for one test and
closes every connection on cleanup, so the reactor is left clean.
L{listen_loopback} does the same for any resource (the WebRTC test's static
files).

Main names: L{FakeTurnApi}, L{start_fake_turn}, L{RunningTurnApi},
L{listen_loopback}.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: The account secret the fake accepts; tests put it in C{[apps.turn]}.
SECRET_KEY = "turn_secret_functional"

CREATE_PATH = b"/api/v1/turn/credential"
LIST_PATH = b"/api/v1/turn/credentials"


def ice_servers_for(number: int) -> list[dict[str, str]]:
    """
    The ICE server list of the fake's C{number}th credential, shaped like
    the hosted API's: STUN on :80, TURN over UDP and TCP.
    """
    turn = {"username": f"user{number}", "credential": f"password{number}"}
    return [
        {"urls": "stun:stun.relay.example:80"},
        {"urls": "turn:127.0.0.1:3478", **turn},
        {"urls": "turn:127.0.0.1:3478?transport=tcp", **turn},
        {"urls": "turns:127.0.0.1:5349?transport=tcp", **turn},
    ]


class FakeTurnApi(Resource):
    """
    C{POST /api/v1/turn/credential?secretKey=…} and
    C{GET /api/v1/turn/credentials?apiKey=…}, with a 401 for a wrong key.

    Set L{fail_with} to an HTTP status to make both calls fail with it.

    @ivar created: Credentials created (or refused by L{fail_with}).
    @ivar listed: List requests answered (or refused by L{fail_with}).
    @ivar served: Every ICE server list answered, in order.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.fail_with: int | None = None
        self.created = 0
        self.listed = 0
        self.served: list[list[dict[str, str]]] = []
        self._api_keys: dict[str, int] = {}

    def render(self, request: Request) -> bytes:
        """
        Count the call and answer it.
        """
        request.setHeader(b"content-type", b"application/json")
        # One request per connection: meteredrt's pooled connections would
        # otherwise outlive the test.
        request.setHeader(b"connection", b"close")
        if request.path == CREATE_PATH and request.method == b"POST":
            self.created += 1
            return self._answer(request, self._create)
        if request.path == LIST_PATH and request.method == b"GET":
            self.listed += 1
            return self._answer(request, self._list)
        request.setResponseCode(404)
        return b'{"message":"not found"}'

    def _answer(self, request: Request, ok: Any) -> bytes:
        if self.fail_with is not None:
            request.setResponseCode(self.fail_with)
            return json.dumps({"message": f"fake failure {self.fail_with}"}).encode()
        result: bytes = ok(request)
        return result

    def _create(self, request: Request) -> bytes:
        if request.args.get(b"secretKey") != [SECRET_KEY.encode()]:
            request.setResponseCode(401)
            return b'{"error":"Invalid secretKey"}'
        body = json.loads(request.content.read() or b"{}") if request.content else {}
        number = len(self._api_keys) + 1
        api_key = f"fake_api_key_{number}"
        self._api_keys[api_key] = number
        return json.dumps(
            {
                "username": f"user{number}",
                "password": f"password{number}",
                "expiryInSeconds": body.get("expiryInSeconds"),
                "label": body.get("label"),
                "apiKey": api_key,
            }
        ).encode()

    def _list(self, request: Request) -> bytes:
        api_key = (request.args.get(b"apiKey") or [b""])[0].decode()
        if api_key not in self._api_keys:
            request.setResponseCode(401)
            return b'{"error":"Invalid API Key"}'
        servers = ice_servers_for(self._api_keys[api_key])
        self.served.append(servers)
        return json.dumps(servers).encode()


class _TrackingFactory(WrappingFactory):
    """
    Remembers its open connections and can close them all and wait.
    """

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._lost: dict[ProtocolWrapper, Deferred[None]] = {}

    def registerProtocol(self, p: ProtocolWrapper) -> None:
        super().registerProtocol(p)
        self._lost[p] = Deferred()

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        lost = self._lost.pop(p, None)
        if lost is not None:
            lost.callback(None)

    def close_all(self) -> Deferred[list[None]]:
        """
        Abort every open connection; fire once all are gone.
        """
        waiting = list(self._lost.values())
        for protocol in list(self._lost):
            protocol.transport.abortConnection()
        return gatherResults(waiting, consumeErrors=True)


@frozen
class RunningTurnApi:
    """
    A fake TURN API started by L{start_fake_turn}.

    @ivar api_base: The origin to configure as C{[apps.turn] api_base}.
    """

    api: FakeTurnApi
    port: IListeningPort

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"


def listen_loopback(case: TestCase, resource: Resource) -> IListeningPort:
    """
    Serve C{resource} as a site on an ephemeral port of 127.0.0.1 until
    C{case} cleans up; cleanup also closes every connection still open.
    """
    site = Site(resource)
    site.noisy = False
    factory = _TrackingFactory(site)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    async def stop() -> None:
        await port.stopListening()
        await factory.close_all()

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return port


def start_fake_turn(case: TestCase) -> RunningTurnApi:
    """
    Serve a new L{FakeTurnApi} on 127.0.0.1 until C{case} cleans up.
    """
    api = FakeTurnApi()
    return RunningTurnApi(api, listen_loopback(case, api))
