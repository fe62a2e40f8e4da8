"""
A whole REST tree in memory for the C{tests/test_rest_*} modules.

L{RestWorld} builds the real resource tree (L{build_root} with the real
L{V1Resource} and L{install_rest}) over a real L{Hub} with the memory
broker and presence, an unstarted L{Meter}, a L{MemoryKeyStore} and a
L{Clock}, and talks to it with L{StubTreq}. Every response it sees is
checked against C{/v1/openapi.json} (L{check_response}: a small
structural validator always, and C{jsonschema} as well when it is
installed), so each test is also a contract test. Keys and connections are the public fakes of
L{meteredrt.testing}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from ipaddress import ip_network
from typing import Any

from attrs import define
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from meteredrt.apps import ACTIONS, App, Key, KeyType
from meteredrt.auth import Grant
from meteredrt.broker.memory import MemoryBroker
from meteredrt.hub import Hub, Session
from meteredrt.interfaces import IMeter
from meteredrt.metering import Meter
from meteredrt.presence.memory import MemoryPresence
from meteredrt.protocol import parse_frame
from meteredrt.rest import RestLimits, install_rest
from meteredrt.site import V1Resource, build_root
from meteredrt.testing import MemoryKeyStore, RecordingSink
from meteredrt.turn import TurnApiClient
from meteredrt.usagestore import UsageStore
from meteredrt.ws import RealtimeServerFactory

try:
    from jsonschema import Draft202012Validator
except ImportError:  # pragma: no cover - a declared test extra, absent in some dev venvs
    Draft202012Validator = None

#: 2023-11-14T22:13:20Z: any fixed, recent time.
START = 1_700_000_000.0

APP_A = "app_a"
APP_B = "app_b"


def secret_key(key_id: str, app_id: str, patterns: tuple[str, ...] = ("**",), actions=ACTIONS, **kw: Any) -> Key:
    """
    A secret key whose secret is derived from its id, for readable tests.
    """
    return Key(key_id, app_id, KeyType.SECRET, patterns, frozenset(actions), secret=f"sk_secret_{key_id}_0123456789abcdef0123456789", **kw)


#: The keys of the fixture, by role.
FULL = secret_key("sk_id_full", APP_A, ("demo/**",))
NARROW = secret_key("sk_id_narrow", APP_A, ("demo/*",), {"subscribe"})
REVOKED = secret_key("sk_id_revoked", APP_A, revoked=True)
OTHER_APP = secret_key("sk_id_other", APP_B)
PUBLISHABLE = Key("pk_live_a", APP_A, KeyType.PUBLISHABLE, ("**",), ACTIONS)
#: A secret key whose app has vanished from the store.
ORPHAN = secret_key("sk_id_orphan", "app_gone")


def bearer(key: Key) -> str:
    """
    The REST credential of a secret key.
    """
    return f"Bearer {key.key_id}:{key.secret}"


class UnusedPool:
    """
    A usage-store pool for a meter that is never started: it must not run.
    """

    def runInteraction(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the meter is not started in REST tests")

    def close(self) -> None:
        pass


@define
class Reply:
    """
    One HTTP response, read completely.
    """

    status: int
    headers: Any
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if not values else values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]


class RestWorld:
    """
    The real REST tree over real services, driven synchronously.

    @param meter: replaces the real meter (for failure and timeout tests).
    @param turn: the TURN API client for C{"turn": true} mints.
    @param trusted_proxies: networks (as text) trusted to name the client
        in C{X-Forwarded-For}; L{StubTreq} always connects from
        C{127.0.0.1}.
    """

    def __init__(
        self,
        test: Any,
        limits: RestLimits | None = None,
        meter: IMeter | None = None,
        check_contract: bool = True,
        turn: TurnApiClient | None = None,
        trusted_proxies: tuple[str, ...] = (),
    ) -> None:
        self.test = test
        self.clock = Clock()
        self.clock.advance(START)
        self.keys = MemoryKeyStore()
        for app_id in (APP_A, APP_B):
            self.keys.add_app(App(app_id))
        for key in (FULL, NARROW, REVOKED, OTHER_APP, PUBLISHABLE, ORPHAN):
            self.keys.add_key(key)
        self.meter = meter if meter is not None else Meter(self.clock, UsageStore.with_pool(UnusedPool()))
        self.hub = Hub(MemoryBroker(), MemoryPresence(), self.meter, self.keys.app)
        self.factory = RealtimeServerFactory(self.hub, self.keys, self.clock)
        trusted = tuple(ip_network(network) for network in trusted_proxies)
        self.v1 = V1Resource(self.factory, self.clock, trusted_proxies=trusted)
        self.guard = install_rest(
            self.v1,
            keys=self.keys,
            hub=self.hub,
            meter=self.meter,
            clock=self.clock,
            limits=limits,
            turn=turn,
            trusted_proxies=trusted,
        )
        self.root: Resource = build_root(self.v1, ready=lambda: True)
        self.http = StubTreq(self.root)
        self._check_contract = check_contract
        self._document: dict | None = None
        self._sinks = 0

    # -- HTTP ------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        key: Key | None = FULL,
        authorization: str | None = None,
        body: Any = None,
        data: bytes | None = None,
        content_type: str | None = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """
        Send one request and read its whole response.

        @param key: sends C{bearer(key)} unless C{authorization} is given.
        @param body: sent as JSON; C{data} sends raw bytes instead.
        """
        all_headers: dict[str, list[str]] = {}
        if authorization is not None:
            all_headers["Authorization"] = [authorization]
        elif key is not None:
            all_headers["Authorization"] = [bearer(key)]
        if data is None and body is not None:
            data = json.dumps(body).encode("utf-8")
        if data is not None and content_type is not None:
            all_headers["Content-Type"] = [content_type]
        for name, value in (headers or {}).items():
            all_headers[name] = [value]
        deferred = self.http.request(method, "http://127.0.0.1:8080" + path, headers=all_headers, data=data)
        self.http.flush()
        response = self.test.successResultOf(deferred)
        raw = self.test.successResultOf(self.http.content(response))
        reply = Reply(response.code, response.headers, raw)
        if self._check_contract:
            self.check(method, path, reply)
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body=body, **kw)

    def delete(self, path: str, **kw: Any) -> Reply:
        return self.request("DELETE", path, **kw)

    # -- contract --------------------------------------------------------

    @property
    def document(self) -> dict:
        """
        C{/v1/openapi.json} as served.
        """
        if self._document is None:
            saved, self._check_contract = self._check_contract, False
            reply = self.get("/v1/openapi.json", key=None)
            self._check_contract = saved
            self.test.assertEqual(reply.status, 200)
            self._document = reply.json
        return self._document

    def check(self, method: str, path: str, reply: Reply) -> None:
        """
        Fail the test unless the reply is what C{openapi.json} documents.
        """
        problems = check_response(self.document, method, path, reply)
        if problems:
            self.test.fail(f"{method} {path} -> {reply.status} {reply.raw[:300]!r}: " + "; ".join(problems))

    # -- hub -------------------------------------------------------------

    def connect(self, peer_id: str, app_id: str = APP_A, peer_metadata: dict | None = None) -> tuple[Session, RecordingSink]:
        """
        Connect a recording peer to the hub with every action on every
        channel.
        """
        self._sinks += 1
        sink = RecordingSink(f"test:{self._sinks}")
        grant = Grant(
            app_id=app_id,
            key_id="sk_id_test",
            peer_id=peer_id,
            actions=ACTIONS,
            key_patterns=("**",),
            claim_patterns=None,
            peer_metadata=peer_metadata,
            metadata=None,
            expires_at=None,
            auto_inject_turn=False,
        )
        session = self.test.successResultOf(self.hub.connect(lambda conn_id: sink, grant))
        return session, sink

    def subscribe(self, session: Session, channel: str, include_sender_metadata: bool = False) -> None:
        """
        Subscribe a connected peer as a WebSocket C{subscribe} would.
        """
        frame = {"type": "subscribe", "channel": channel, "includeSenderMetadata": include_sender_metadata}
        self.test.successResultOf(self.hub.handle(session, parse_frame(json.dumps(frame))))



# -- a small validator for the OpenAPI subset our schemas use ----------------

_IGNORED = {"description", "default", "title", "examples", "format"}
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(schema: Mapping[str, Any], value: Any, document: Mapping[str, Any], where: str = "$") -> list[str]:
    """
    Problems of C{value} against a JSON Schema using only the keywords our
    OpenAPI document uses; an unknown keyword is itself a problem, so the
    subset cannot silently drift.
    """
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return validate(document["components"]["schemas"][name], value, document, where)
    problems: list[str] = []
    for keyword in schema:
        if keyword not in _IGNORED and keyword not in {
            "type", "properties", "required", "additionalProperties", "items",
            "maxItems", "enum", "minimum", "maximum", "minLength", "maxLength",
        }:
            problems.append(f"{where}: validator does not know keyword {keyword!r}")
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in names):
            return problems + [f"{where}: {value!r} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{where}: longer than {schema['maxLength']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{where}: more than {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                problems += validate(schema["items"], item, document, f"{where}[{index}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{where}: missing {name!r}")
        for name, item in value.items():
            if name in properties:
                problems += validate(properties[name], item, document, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}: unexpected property {name!r}")
    return problems


def operation_for(document: Mapping[str, Any], method: str, path: str) -> Mapping[str, Any] | None:
    """
    The documented operation a concrete request path falls under.

    Path parameters match any text, slashes included, as the channel and
    peer routes do (an empty one is that operation's 400).
    """
    for template, operations in document["paths"].items():
        pattern = re.sub(r"\\\{\w+\\\}", ".*", re.escape(template))
        if re.fullmatch(pattern, path.split("?", 1)[0]) and method.lower() in operations:
            return operations[method.lower()]
    return None


def check_response(document: Mapping[str, Any], method: str, path: str, reply: Reply) -> list[str]:
    """
    Problems of a live reply against the document: undocumented status,
    body not matching its schema, 429 without C{Retry-After} or with a body.
    """
    operation = operation_for(document, method, path)
    if operation is None or reply.status in (404, 405):
        # Unknown endpoint or wrong method: only the envelope is promised.
        if reply.status in (404, 405):
            return validate({"$ref": "#/components/schemas/Error"}, json.loads(reply.raw), document)
        return [f"no documented operation for {method} {path}"]
    response = operation["responses"].get(str(reply.status))
    if response is None:
        return [f"status {reply.status} is not documented for {method} {path}"]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    if reply.status == 429:
        problems = [] if reply.header("Retry-After") else ["429 without Retry-After"]
        return problems + (["429 with a body"] if reply.raw else [])
    content = response.get("content", {}).get("application/json")
    if content is None:
        return []
    if reply.header("Content-Type") != "application/json":
        return [f"Content-Type is {reply.header('Content-Type')!r}"]
    body = json.loads(reply.raw)
    problems = validate(content["schema"], body, document)
    if Draft202012Validator is not None:
        # OpenAPI 3.1 schemas are JSON Schema 2020-12; carrying the
        # components along lets "#/components/..." references resolve.
        full = {**content["schema"], "components": document["components"]}
        problems += [f"jsonschema: {e.message}" for e in Draft202012Validator(full).iter_errors(body)]
    return problems
