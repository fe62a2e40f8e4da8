"""
Tests for L{meteredrt.ws}: a real Autobahn client talks to
L{RealtimeServerProtocol} over L{twisted.test.iosim}, with every timer
(ours and Autobahn's) on one L{Clock}.
"""

from __future__ import annotations

import gc
import json
import uuid
import weakref
from ipaddress import ip_network
from typing import Any

import attrs
import jwt
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, WebSocketServerFactory
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop
from zope.interface import implementer

from meteredrt.apps import ACTIONS, App, Key, KeyType, Plan, TurnConfig
from meteredrt.auth import MAX_EXP, mint_token
from meteredrt.broker.memory import MemoryBroker
from meteredrt.hub import Hub
from meteredrt.interfaces import ITurnProvider
from meteredrt.logs import json_line
from meteredrt.metering import Meter
from meteredrt.metrics import Metrics
from meteredrt.presence.memory import MemoryPresence
from meteredrt.protocol import INBOUND_FRAME_LIMIT, MAX_MESSAGE_SIZE
from meteredrt.testing import MemoryKeyStore
from meteredrt.usagestore import UsageStore
from meteredrt.ws import RealtimeServerFactory, RealtimeServerProtocol, text_frame

txaio.use_twisted()

#: Where the tests' clock starts: a plausible Unix time.
START = 1_767_222_000
SECRET_KEY = Key(
    "sk_id_test",
    "app_1",
    KeyType.SECRET,
    ("**",),
    ACTIONS,
    secret="sk_secret_0123456789abcdef0123456789abcdef",
    auto_inject_turn=False,
)
PUBLISHABLE_KEY = Key(
    "pk_live_test", "app_1", KeyType.PUBLISHABLE, ("**",), frozenset({"subscribe", "publish", "presence"})
)
#: Five messages at once, then one per second, per connection.
SLOW_PLAN = Plan(message_rate=1.0, message_burst=5)
CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 50000)


class RecordingClient(WebSocketClientProtocol):
    """
    An Autobahn client that records decoded text frames and how it closed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []
        self.opened = False
        self.closed: tuple[bool, int | None, str | None] | None = None
        self.answer_pings = True

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(json.loads(payload))

    def onPing(self, payload: bytes) -> None:
        if self.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)

    def send_json(self, frame: object) -> None:
        """
        Send one text frame holding C{frame} as JSON.
        """
        self.sendMessage(json.dumps(frame).encode("utf-8"))

    @property
    def close_code(self) -> int | None:
        """
        The close code the server sent, once closed.
        """
        return None if self.closed is None else self.closed[1]


@implementer(ITurnProvider)
class PendingTurn:
    """
    A TURN provider whose answers the test fires by hand.
    """

    def __init__(self) -> None:
        self.waiting: list[Deferred[list[dict] | None]] = []

    def ice_servers(self, app: App, ttl: int) -> Deferred[list[dict] | None]:
        d: Deferred[list[dict] | None] = Deferred()
        self.waiting.append(d)
        return d


Connection = tuple[RecordingClient, RealtimeServerProtocol, IOPump]


class WebSocketTestCase(SynchronousTestCase):
    """
    A hub, a key store and a L{RealtimeServerFactory} on one L{Clock}, and a
    way to connect Autobahn clients to it.
    """

    factory_options: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        loop = replace_loop(self.clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.keys = MemoryKeyStore()
        self.keys.add_app(App("app_1"))
        self.keys.add_key(SECRET_KEY)
        self.keys.add_key(PUBLISHABLE_KEY)
        self.meter = Meter(self.clock, UsageStore(self.mktemp(), MemoryReactorClock()))
        self.metrics = Metrics()
        self.hub = Hub(MemoryBroker(), MemoryPresence(), self.meter, self.keys.app, node_id="n1", metrics=self.metrics)
        self.turn = PendingTurn()
        self.factory = RealtimeServerFactory(
            self.hub, self.keys, self.clock, turn=self.turn, metrics=self.metrics, **self.factory_options
        )

    def token(self, peer_id: str = "alice", expires_in: int = 3600, **claims: Any) -> str:
        """
        A JWT for C{peer_id} signed with the test secret key, issued now.
        """
        return mint_token(SECRET_KEY, peer_id, now=int(self.clock.seconds()), expires_in=expires_in, **claims)

    def open(self, query: str, origin: str | None = None) -> Connection:
        """
        Connect a client to C{/v1?query} and run the handshake.
        """
        client_factory = WebSocketClientFactory(f"ws://localhost/v1?{query}", origin=origin)
        client_factory.protocol = RecordingClient
        client, server, pump = connectedServerAndClient(
            lambda: self.factory.buildProtocol(CLIENT_ADDRESS),
            lambda: client_factory.buildProtocol(CLIENT_ADDRESS),
            clock=self.clock,
        )
        return client, server, pump

    def open_token(self, peer_id: str = "alice", **claims: Any) -> Connection:
        """
        Connect a client with a fresh JWT for C{peer_id}.
        """
        return self.open("token=" + self.token(peer_id, **claims))

    def advance(self, seconds: float, *pumps: IOPump, step: float = 1.0) -> None:
        """
        Move time forward in steps, moving the bytes of every connection
        after each.
        """
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            for pump in pumps:
                pump.flush()

    def assertClosed(self, client: RecordingClient, code: int) -> None:
        """
        The client has been closed with C{code}.
        """
        self.assertIsNotNone(client.closed, "the connection is still open")
        self.assertEqual(client.close_code, code)

    def assertNoTimers(self) -> None:
        """
        Nothing is left scheduled: every timer was cancelled with its
        connection.
        """
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HandshakeTests(WebSocketTestCase):
    """
    Authentication after the upgrade and the welcome (§5, §8.1).
    """

    def test_token_welcome(self) -> None:
        """
        A JWT connection's first frame is the welcome with the token's
        subject and expiry and the server's time.
        """
        client, server, pump = self.open_token("alice", expires_in=600)
        self.assertEqual(
            client.received,
            [
                {
                    "type": "welcome",
                    "peerId": "alice",
                    "expiresAt": START + 600,
                    "serverTime": START,
                    "maxMessageSize": MAX_MESSAGE_SIZE,
                }
            ],
        )
        self.assertIsNone(client.closed)
        self.assertEqual(self.hub.connection_count, 1)

    def test_handshake_forgotten(self) -> None:
        """
        Once open, the connection keeps nothing of the upgrade request: no
        attribute holds the token or the request text, and no frame queue
        exists while nothing waits.
        """
        token = self.token("alice")
        client, server, pump = self.open("token=" + token)
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual(client.received[-1], {"type": "pong"})

        def reaches_token(value: object, depth: int = 0) -> bool:
            if isinstance(value, (str, bytes)):
                return (token if isinstance(value, str) else token.encode()) in value
            if depth < 3 and isinstance(value, dict):
                return any(reaches_token(k, depth + 1) or reaches_token(v, depth + 1) for k, v in value.items())
            if depth < 3 and isinstance(value, (list, tuple)):
                return any(reaches_token(v, depth + 1) for v in value)
            return False

        self.assertEqual([name for name, value in vars(server).items() if reaches_token(value)], [])
        self.assertIsNone(server._queue)

    def test_token_metadata(self) -> None:
        """
        The token's C{metadata} claim rides in the welcome untouched.
        """
        client, server, pump = self.open_token("alice", metadata={"room": "r1"})
        self.assertEqual(client.received[0]["metadata"], {"room": "r1"})

    def test_token_never_logged(self) -> None:
        """
        No log event of a connection's life mentions its token: Autobahn's
        debug events (the raw upgrade request among them) stay below the
        log level instead of reaching the operator's log.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        token = self.token("alice")
        client, server, pump = self.open("token=" + token)
        client.send_json({"type": "subscribe", "channel": "room", "requestId": "s"})
        pump.flush()
        self.assertEqual(client.received[0]["type"], "welcome")
        client.sendClose()
        pump.flush()
        rendered = [formatEvent(event) + repr(event) for event in events]
        self.assertEqual([text for text in rendered if token in text], [])
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.debug], [])

    def test_publishable_welcome(self) -> None:
        """
        A publishable-key connection gets a fresh UUID peerId and an explicit
        C{expiresAt: null}.
        """
        client, server, pump = self.open("key=pk_live_test")
        [welcome] = client.received
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(str(uuid.UUID(welcome["peerId"])), welcome["peerId"])
        self.assertIn("expiresAt", welcome)
        self.assertIsNone(welcome["expiresAt"])
        self.assertEqual(welcome["maxMessageSize"], MAX_MESSAGE_SIZE)
        other, _, _ = self.open("key=pk_live_test")
        self.assertNotEqual(other.received[0]["peerId"], welcome["peerId"])

    def test_bad_token(self) -> None:
        """
        A bad token is refused with 4001 after the upgrade, without a
        welcome, and takes no hub slot.
        """
        client, server, pump = self.open("token=not.a.token")
        self.assertTrue(client.opened)
        self.assertClosed(client, 4001)
        self.assertEqual(client.received, [])
        self.assertEqual(self.hub.connection_count, 0)
        self.assertNoTimers()

    def test_no_credential(self) -> None:
        """
        Neither token nor key is refused with 4001.
        """
        client, server, pump = self.open("x=1")
        self.assertTrue(client.opened)
        self.assertClosed(client, 4001)
        self.assertEqual(client.received, [])

    def test_store_unavailable(self) -> None:
        """
        While the key store cannot reach its database, a key it does not
        know is refused with 1011 (transient: it may exist by now) rather
        than 4001; a known key still connects.
        """
        self.keys.reachable = False
        client, server, pump = self.open("key=pk_live_created_during_outage")
        self.assertTrue(client.opened)
        self.assertClosed(client, 1011)
        self.assertEqual(client.received, [])
        self.assertEqual(self.hub.connection_count, 0)
        known, _, _ = self.open("key=pk_live_test")
        self.assertEqual(known.received[0]["type"], "welcome")

    def test_expired_token(self) -> None:
        """
        A token already expired is refused with 4002 after the upgrade.
        """
        token = mint_token(SECRET_KEY, "alice", now=START - 7200, expires_in=3600)
        client, server, pump = self.open("token=" + token)
        self.assertTrue(client.opened)
        self.assertClosed(client, 4002)
        self.assertEqual(client.received, [])

    def signed(self, **claims: Any) -> str:
        """
        A token signed with the test secret key carrying exactly C{claims}
        and C{sub}, as a careless or hostile backend could sign it.
        """
        assert SECRET_KEY.secret is not None
        return jwt.encode(
            {"sub": "alice", **claims}, SECRET_KEY.secret, algorithm="HS256", headers={"kid": SECRET_KEY.key_id}
        )

    def test_absurd_exp(self) -> None:
        """
        A correctly signed exp too large for a float is refused with 4001
        before admission: no welcome, no hub slot, no timer, no logged
        error.
        """
        for exp in (10**400, MAX_EXP + 1):
            client, server, pump = self.open("token=" + self.signed(exp=exp))
            self.assertClosed(client, 4001)
            self.assertEqual(client.received, [])
        self.assertEqual(self.hub.connection_count, 0)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertNoTimers()

    def test_absurd_nbf_and_iat(self) -> None:
        """
        An nbf too large for a float is refused with 4001; an absurd iat is
        ignored and the connection works.
        """
        exp = START + 600
        refused, _, _ = self.open("token=" + self.signed(exp=exp, nbf=10**400))
        self.assertClosed(refused, 4001)
        for iat in (10**400, -(10**400), True, 0.5):
            client, server, pump = self.open("token=" + self.signed(exp=exp, nbf=-(10**400), iat=iat))
            self.assertEqual(client.received[0]["type"], "welcome")
            client.sendClose()
            pump.flush()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_farthest_exp(self) -> None:
        """
        The largest accepted exp, with TURN credentials to inject, is
        welcomed and its expiry timer armed without overflowing.
        """
        self.keys.add_app(App("app_1", turn=TurnConfig("demo", "secret")))
        self.keys.add_key(attrs.evolve(SECRET_KEY, auto_inject_turn=True))
        client, server, pump = self.open("token=" + self.signed(exp=MAX_EXP))
        [waiting] = self.turn.waiting
        waiting.callback([{"urls": "turn:turn.example:3478"}])
        pump.flush()
        self.assertEqual(client.received[0]["expiresAt"], MAX_EXP)
        self.assertIsNone(client.closed)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_suspended(self) -> None:
        """
        A connection to a suspended app is refused with 4012 after the
        upgrade.
        """
        self.keys.add_app(App("app_1", suspended=True))
        client, server, pump = self.open_token()
        self.assertTrue(client.opened)
        self.assertClosed(client, 4012)
        self.assertEqual(client.received, [])

    def test_allowed_origins(self) -> None:
        """
        A publishable key with allowed origins refuses another browser
        origin with 4001 and admits a listed one or none at all.
        """
        self.keys.add_key(attrs.evolve(PUBLISHABLE_KEY, allowed_origins=("https://good.example",)))
        refused, _, _ = self.open("key=pk_live_test", origin="https://evil.example")
        self.assertClosed(refused, 4001)
        self.assertEqual(refused.received, [])
        for origin in ("https://good.example", None):
            admitted, _, _ = self.open("key=pk_live_test", origin=origin)
            self.assertEqual(admitted.received[0]["type"], "welcome")

    def test_null_origin(self) -> None:
        """
        C{Origin: null} (sandboxed iframes) and C{file://} pages are welcomed
        when the key allows every origin, token or publishable key alike,
        instead of failing the HTTP upgrade.
        """
        for origin in ("null", "file://"):
            for query in ("key=pk_live_test", "token=" + self.token("alice")):
                client, server, pump = self.open(query, origin=origin)
                self.assertTrue(client.opened, f"{origin} {query[:5]}: upgrade refused")
                self.assertEqual(client.received[0]["type"], "welcome")
                client.sendClose()
                pump.flush()

    def test_null_origin_refused(self) -> None:
        """
        A key that lists its origins refuses C{Origin: null} with 4001 after
        the upgrade, like any other unlisted origin, unless it lists
        C{null} itself.
        """
        self.keys.add_key(attrs.evolve(PUBLISHABLE_KEY, allowed_origins=("https://good.example",)))
        client, server, pump = self.open("key=pk_live_test", origin="null")
        self.assertTrue(client.opened)
        self.assertClosed(client, 4001)
        self.assertEqual(client.closed[2] if client.closed else None, "origin_not_allowed")
        self.keys.add_key(attrs.evolve(PUBLISHABLE_KEY, allowed_origins=("null",)))
        client, server, pump = self.open("key=pk_live_test", origin="null")
        self.assertEqual(client.received[0]["type"], "welcome")

    def test_options_on_class(self) -> None:
        """
        A connection reads the factory's protocol options from its class,
        none from its own attributes, and logs as L{RealtimeServerProtocol}.
        """
        client, server, pump = self.open_token("alice")
        self.assertEqual(client.received[0]["type"], "welcome")
        self.assertIsInstance(server, RealtimeServerProtocol)
        self.assertEqual(server._log.namespace, "meteredrt.ws.RealtimeServerProtocol")
        self.assertEqual([name for name in server.CONFIG_ATTRS if name in vars(server)], [])
        for name in server.CONFIG_ATTRS:
            self.assertEqual(getattr(server, name), getattr(self.factory, name), name)
        self.assertEqual((server.autoPingInterval, server.openHandshakeTimeout), (30, 0))

    def test_compression_offer_declined(self) -> None:
        """
        A client's offer of compression is declined: the option, a function,
        is called as one.
        """
        from autobahn.websocket.compress import PerMessageDeflateOffer

        client_factory = WebSocketClientFactory("ws://localhost/v1?token=" + self.token("alice"))
        client_factory.protocol = RecordingClient
        client_factory.setProtocolOptions(perMessageCompressionOffers=[PerMessageDeflateOffer()])
        client, server, pump = connectedServerAndClient(
            lambda: self.factory.buildProtocol(CLIENT_ADDRESS),
            lambda: client_factory.buildProtocol(CLIENT_ADDRESS),
            clock=self.clock,
        )
        self.assertEqual(client.received[0]["type"], "welcome")
        self.assertIsNone(server._perMessageCompress)

    def test_auto_ping_options(self) -> None:
        """
        The factory pings every 30 s and allows 10 s for the answer (§16).
        """
        self.assertEqual(self.factory.autoPingInterval, 30)
        self.assertEqual(self.factory.autoPingTimeout, 10)

    def test_dead_link_dropped(self) -> None:
        """
        A client that stops answering protocol pings is dropped after the
        grace period and its presence ends.
        """
        watcher, _, watcher_pump = self.open_token("bob")
        watcher.send_json({"type": "subscribe", "channel": "room"})
        watcher_pump.flush()
        client, server, pump = self.open_token("alice")
        client.send_json({"type": "subscribe", "channel": "room"})
        pump.flush()
        watcher_pump.flush()
        client.answer_pings = False
        self.advance(30, pump, watcher_pump)
        self.assertIsNone(client.closed)
        self.advance(11, pump, watcher_pump)
        self.assertIsNotNone(client.closed)
        watcher_pump.flush()
        self.assertEqual(
            watcher.received[-1],
            {"type": "presence", "channel": "room", "joined": [], "left": [{"peerId": "alice"}]},
        )
        self.assertEqual(self.hub.connection_count, 1)


class InboundTests(WebSocketTestCase):
    """
    What the server does with client frames.
    """

    def setUp(self) -> None:
        super().setUp()
        self.keys.add_app(App("app_1", plan=SLOW_PLAN))

    def test_ping(self) -> None:
        """
        A C{ping} is answered with exactly C{pong}.
        """
        client, server, pump = self.open_token()
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual(client.received[1:], [{"type": "pong"}])

    def test_malformed_and_unknown(self) -> None:
        """
        Garbage and unknown types draw errors and leave the connection open.
        """
        client, server, pump = self.open_token()
        client.sendMessage(b"{not json")
        client.send_json({"type": "dance", "requestId": "r1"})
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual(
            [(f["type"], f.get("code"), f.get("requestId")) for f in client.received[1:]],
            [("error", "malformed_message", None), ("error", "unknown_type", "r1"), ("pong", None, None)],
        )
        self.assertIsNone(client.closed)

    def test_invalid_pattern(self) -> None:
        """
        A wildcard subscribe with an invalid escape is refused in-band as
        C{invalid_channel}, not as a server fault.
        """
        client, server, pump = self.open_token()
        client.send_json({"type": "subscribe", "channel": "rooms/\\q*", "requestId": "r1"})
        pump.flush()
        self.assertEqual(
            [(f["type"], f.get("code"), f.get("requestId")) for f in client.received[1:]],
            [("error", "invalid_channel", "r1")],
        )
        self.assertIsNone(client.closed)

    def test_binary(self) -> None:
        """
        A binary frame closes the connection with 1003.
        """
        client, server, pump = self.open_token()
        client.sendMessage(b"{}", isBinary=True)
        pump.flush()
        self.assertClosed(client, 1003)
        self.assertEqual(self.hub.connection_count, 0)
        self.assertNoTimers()

    def test_frame_at_limit(self) -> None:
        """
        A frame of exactly the inbound limit is read (and here refused as
        garbage), not cut off.
        """
        client, server, pump = self.open_token()
        client.sendMessage(b"x" * INBOUND_FRAME_LIMIT)
        pump.flush()
        self.assertEqual(client.received[-1]["code"], "malformed_message")
        self.assertIsNone(client.closed)

    def test_frame_too_big(self) -> None:
        """
        A frame over 65536 + 1024 bytes closes the connection with 1009.
        """
        client, server, pump = self.open_token()
        client.sendMessage(b"x" * (MAX_MESSAGE_SIZE + 1024 + 1))
        pump.flush()
        self.assertClosed(client, 1009)
        self.assertEqual(self.hub.connection_count, 0)

    def test_rate_limit(self) -> None:
        """
        Past the burst, a frame closes the connection with 4011; pings do
        not count, garbage does.
        """
        client, server, pump = self.open_token()
        for _ in range(20):
            client.send_json({"type": "ping"})
        client.sendMessage(b"garbage")
        for n in range(4):
            client.send_json({"type": "publish", "channel": "room", "data": n})
        pump.flush()
        self.assertIsNone(client.closed)
        self.assertEqual(sum(f["type"] == "pong" for f in client.received), 20)
        client.send_json({"type": "publish", "channel": "room", "data": 5})
        pump.flush()
        self.assertClosed(client, 4011)

    def test_rate_of_the_plan(self) -> None:
        """
        The bucket's size and refill come from the app's plan; an app
        without a plan gets the defaults, 200 at once.
        """
        for plan, burst in ((Plan(message_rate=1.0, message_burst=300), 300), (None, 200)):
            self.keys.add_app(App("app_1", plan=plan))
            client, server, pump = self.open_token()
            for n in range(burst):
                client.send_json({"type": "publish", "channel": "room", "data": n})
            pump.flush()
            self.assertIsNone(client.closed)
            client.send_json({"type": "publish", "channel": "room", "data": "one too many"})
            pump.flush()
            self.assertClosed(client, 4011)

    def test_plan_above_the_frame_budget(self) -> None:
        """
        A plan that allows more messages than the default frame budget
        (1000/s, 2000 at once, for 100 messages/s and bursts of 200)
        raises the connection's frame budget in proportion, so the plan's
        burst goes through.
        """
        self.keys.add_app(App("app_1", plan=Plan(message_rate=5000.0, message_burst=3000)))
        client, server, pump = self.open_token()
        for n in range(3000):
            client.send_json({"type": "publish", "channel": "room", "data": n})
        pump.flush()
        self.assertIsNone(client.closed)
        frames = server._frames
        assert frames is not None
        self.assertEqual((frames.capacity, frames.rate), (30000, 50000.0))

    def test_rate_refills(self) -> None:
        """
        The bucket refills with time.
        """
        client, server, pump = self.open_token()
        for n in range(5):
            client.send_json({"type": "publish", "channel": "room", "data": n})
        pump.flush()
        self.clock.advance(2)
        for n in range(2):
            client.send_json({"type": "publish", "channel": "room", "data": n})
        pump.flush()
        self.assertIsNone(client.closed)

    def test_frames_before_welcome(self) -> None:
        """
        Frames that arrive before the welcome is out are processed after
        it, in order.
        """
        self.keys.add_app(App("app_1", turn=TurnConfig("demo", "secret")))
        client, server, pump = self.open("key=pk_live_test")
        self.assertTrue(client.opened)
        self.assertEqual(client.received, [])
        client.send_json({"type": "subscribe", "channel": "room", "requestId": "s"})
        client.send_json({"type": "ping"})
        client.send_json({"type": "publish", "channel": "room", "data": 1, "requestId": "p"})
        pump.flush()
        self.assertEqual(client.received, [])
        [waiting] = self.turn.waiting
        waiting.callback([{"urls": "stun:stun.example.org:3478"}])
        pump.flush()
        self.assertEqual(
            [f["type"] for f in client.received], ["welcome", "ack", "presence", "pong", "ack"]
        )
        self.assertEqual(client.received[0]["metadata"], {"iceServers": [{"urls": "stun:stun.example.org:3478"}]})
        self.assertEqual([f.get("requestId") for f in client.received if f["type"] == "ack"], ["s", "p"])

    def test_flood_before_welcome(self) -> None:
        """
        Frames held for the welcome draw from the rate bucket too: a flood
        while the welcome waits on TURN closes with 4011.
        """
        self.keys.add_app(App("app_1", plan=SLOW_PLAN, turn=TurnConfig("demo", "secret")))
        client, server, pump = self.open("key=pk_live_test")
        for n in range(6):
            client.send_json({"type": "publish", "channel": "room", "data": n})
        pump.flush()
        self.assertClosed(client, 4011)
        self.assertEqual(client.received, [])

    def test_nothing_before_welcome(self) -> None:
        """
        Frames the hub routes to a connection whose welcome is not out yet
        (here a direct to its peerId) follow the welcome.
        """
        self.keys.add_app(App("app_1", turn=TurnConfig("demo", "secret")))
        self.keys.add_key(attrs.evolve(SECRET_KEY, auto_inject_turn=True))
        client, server, pump = self.open_token("alice")
        self.assertEqual(client.received, [])
        bob, _, bob_pump = self.open_token("bob")
        [waiting, bobs] = self.turn.waiting
        bobs.callback(None)
        bob.send_json({"type": "send", "to": "alice", "data": 1, "requestId": "d"})
        bob_pump.flush()
        pump.flush()
        self.assertEqual(client.received, [])
        waiting.callback(None)
        pump.flush()
        self.assertEqual(
            client.received,
            [
                {
                    "type": "welcome",
                    "peerId": "alice",
                    "expiresAt": START + 3600,
                    "serverTime": START,
                    "maxMessageSize": MAX_MESSAGE_SIZE,
                },
                {"type": "direct", "from": "bob", "data": 1},
            ],
        )

    def test_welcome_failure(self) -> None:
        """
        A failure while preparing the welcome closes 1011 and releases the
        connection's place in the hub.
        """
        self.keys.add_app(App("app_1", turn=TurnConfig("demo", "secret")))
        client, server, pump = self.open("key=pk_live_test")
        self.assertEqual(self.hub.connection_count, 1)
        [waiting] = self.turn.waiting
        waiting.errback(RuntimeError("TURN API exploded"))
        pump.flush()
        self.assertClosed(client, 1011)
        self.assertEqual(client.received, [])
        self.assertEqual(self.hub.connection_count, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_messaging(self) -> None:
        """
        Two clients exchange channel and direct messages through the hub.
        """
        bob, _, bob_pump = self.open_token("bob", peer_metadata={"name": "Bob"})
        bob.send_json({"type": "subscribe", "channel": "room"})
        bob_pump.flush()
        alice, _, alice_pump = self.open_token("alice")
        alice.send_json({"type": "subscribe", "channel": "room", "requestId": "s"})
        alice.send_json({"type": "publish", "channel": "room", "data": "hi"})
        alice_pump.flush()
        bob.send_json({"type": "send", "to": "alice", "data": {"k": 1}})
        bob_pump.flush()
        alice_pump.flush()
        self.assertEqual(
            alice.received[1:],
            [
                {"type": "ack", "requestId": "s"},
                {
                    "type": "presence",
                    "channel": "room",
                    "joined": [{"peerId": "bob", "metadata": {"name": "Bob"}}],
                    "left": [],
                },
                {"type": "direct", "from": "bob", "data": {"k": 1}, "fromMetadata": {"name": "Bob"}},
            ],
        )
        self.assertEqual(
            bob.received[1:],
            [
                {"type": "presence", "channel": "room", "joined": [], "left": []},
                {"type": "presence", "channel": "room", "joined": [{"peerId": "alice"}], "left": []},
                {"type": "message", "channel": "room", "from": "alice", "data": "hi"},
            ],
        )

    def test_close_cleans_up(self) -> None:
        """
        A client's close ends its presence and its hub session, and leaves
        no timers behind.
        """
        bob, _, bob_pump = self.open_token("bob")
        bob.send_json({"type": "subscribe", "channel": "room"})
        bob_pump.flush()
        alice, _, alice_pump = self.open_token("alice")
        alice.send_json({"type": "subscribe", "channel": "room"})
        alice_pump.flush()
        alice.sendClose(1000)
        alice_pump.flush()
        bob_pump.flush()
        self.assertEqual(bob.received[-1]["left"], [{"peerId": "alice"}])
        self.assertEqual(self.hub.connection_count, 1)
        bob.sendClose(1000)
        bob_pump.flush()
        self.assertEqual(self.hub.connection_count, 0)
        self.assertNoTimers()


def frame_opcodes(wire: bytes) -> list[int]:
    """
    The opcodes of the unmasked (server-to-client) WebSocket frames in
    C{wire}, in order.
    """
    opcodes = []
    offset = 0
    while offset < len(wire):
        opcodes.append(wire[offset] & 0x0F)
        length = wire[offset + 1] & 0x7F
        offset += 2
        if length == 126:
            length = int.from_bytes(wire[offset : offset + 2], "big")
            offset += 2
        elif length == 127:
            length = int.from_bytes(wire[offset : offset + 8], "big")
            offset += 8
        offset += length
    return opcodes


#: RFC 6455 §5.2 opcodes.
TEXT, CLOSE = 0x1, 0x8


class CloseOrderTests(WebSocketTestCase):
    """
    Nothing follows the close frame on the wire (RFC 6455 §5.5.1).
    """

    def test_nothing_after_client_close(self) -> None:
        """
        A message the hub routes to a connection after the server answered
        its client's close, but before the connection is gone, is not
        written after the close frame.
        """
        bob, _, bob_pump = self.open_token("bob")
        bob.send_json({"type": "subscribe", "channel": "room"})
        bob_pump.flush()
        alice, server, pump = self.open_token("alice")
        alice.send_json({"type": "subscribe", "channel": "room"})
        pump.flush()
        bob_pump.flush()
        # iosim drops what is written after loseConnection; TCP sends it.
        wire: list[bytes] = []
        write = server.transport.write

        def record(data: bytes) -> None:
            wire.append(data)
            write(data)

        self.patch(server.transport, "write", record)
        alice.sendClose(1000)
        # One round: the server reads the close, answers it and drops the
        # TCP, whose loss it has not been told of yet.
        pump.pump()
        self.assertEqual(server.state, server.STATE_CLOSED)
        self.assertEqual(self.hub.connection_count, 2)
        bob.send_json({"type": "publish", "channel": "room", "data": "late"})
        bob_pump.flush()
        pump.flush()
        self.assertEqual(frame_opcodes(b"".join(wire)), [CLOSE])
        self.assertEqual(alice.close_code, 1000)
        self.assertEqual(self.hub.connection_count, 1)

    def test_nothing_after_own_close(self) -> None:
        """
        After the server's own close (here a kick), frames the hub routes to
        the connection are not written either.
        """
        bob, _, bob_pump = self.open_token("bob")
        bob.send_json({"type": "subscribe", "channel": "room"})
        bob_pump.flush()
        alice, server, pump = self.open_token("alice")
        alice.send_json({"type": "subscribe", "channel": "room"})
        pump.flush()
        bob_pump.flush()
        wire: list[bytes] = []
        write = server.transport.write

        def record(data: bytes) -> None:
            wire.append(data)
            write(data)

        self.patch(server.transport, "write", record)
        server.close(4020, "kicked")
        bob.send_json({"type": "publish", "channel": "room", "data": "late"})
        bob_pump.flush()
        self.assertEqual(frame_opcodes(b"".join(wire)), [CLOSE])
        pump.flush()
        self.assertClosed(alice, 4020)


class ExpiryTests(WebSocketTestCase):
    """
    JWT connections close 4002 about 250 ms before C{exp} (§4.5).
    """

    def test_expiry(self) -> None:
        """
        The connection stays open until 250 ms before C{exp}, then closes
        with 4002 and leaves presence.
        """
        client, server, pump = self.open_token("alice", expires_in=100)
        client.send_json({"type": "subscribe", "channel": "room"})
        pump.flush()
        self.advance(99.74, pump)
        self.assertIsNone(client.closed)
        self.advance(0.02, pump)
        self.assertClosed(client, 4002)
        self.assertEqual(self.successResultOf(self.hub.members("app_1", "room")), [])
        self.assertNoTimers()

    def test_closed_before_expiry(self) -> None:
        """
        Connections whose tokens expire in the same second wait on one
        timer; one that closes first is not closed again, and the last one
        to close takes the timer with it.
        """
        first, _, first_pump = self.open_token("alice", expires_in=100)
        second, _, second_pump = self.open_token("bob", expires_in=100)
        expiry_calls = [call for call in self.clock.getDelayedCalls() if call.time == START + 99.75]
        self.assertEqual(len(expiry_calls), 1)
        first.sendClose(1000)
        first_pump.flush()
        self.advance(100, second_pump)
        self.assertEqual(first.close_code, 1000)
        self.assertClosed(second, 4002)
        third, _, third_pump = self.open_token("carol", expires_in=100)
        third.sendClose(1000)
        third_pump.flush()
        self.assertNoTimers()

    def test_publishable_never_expires(self) -> None:
        """
        A publishable-key connection has no expiry timer.
        """
        client, server, pump = self.open("key=pk_live_test")
        self.advance(3 * 86400, pump, step=20)
        self.assertIsNone(client.closed)


class SlowReaderTests(WebSocketTestCase):
    """
    A connection that cannot keep up is cut off with 1008 instead of
    holding memory without bound (§18).
    """

    factory_options = {"outbound_limit": 10_000}

    def setUp(self) -> None:
        super().setUp()
        self.slow, self.slow_server, self.slow_pump = self.open_token("slow")
        self.slow.send_json({"type": "subscribe", "channel": "room"})
        self.slow_pump.flush()
        self.fast, _, self.fast_pump = self.open_token("fast")
        self.fast.send_json({"type": "subscribe", "channel": "room"})
        self.fast_pump.flush()

    def publish(self, size: int) -> None:
        """
        The fast client publishes C{size} bytes of data to the room.
        """
        self.fast.send_json({"type": "publish", "channel": "room", "data": "x" * size})
        self.fast_pump.flush()

    def test_cut_off(self) -> None:
        """
        Past the limit of bytes written while the transport is paused, the
        connection closes 1008 and leaves presence.
        """
        self.slow_server._watch.pauseProducing()
        self.publish(4000)
        self.publish(4000)
        self.assertIsNone(self.slow.closed)
        self.publish(4000)
        self.slow_pump.flush()
        self.assertClosed(self.slow, 1008)
        self.fast_pump.flush()
        self.assertEqual(self.fast.received[-1]["left"], [{"peerId": "slow"}])
        self.assertEqual(self.hub.connection_count, 1)

    def test_pongs_count(self) -> None:
        """
        Pongs the server owes a client that sends pings and never reads
        count against the same limit as messages: the pinger is cut off
        with 1008 and the server queues no more for it.
        """
        self.slow_server._watch.pauseProducing()
        for _ in range(100):
            self.slow.sendPing(b"p" * 125)
        self.slow_pump.flush()
        self.assertClosed(self.slow, 1008)
        self.assertEqual(self.slow.closed[2] if self.slow.closed else None, "slow_consumer")
        self.assertLessEqual(self.slow_server._watch.held, self.factory.outbound_limit + 200)

    def test_every_write_counts(self) -> None:
        """
        Whatever the server writes while the transport is paused counts,
        its own protocol pings too, in wire bytes.
        """
        watch = self.slow_server._watch
        watch.pauseProducing()
        self.slow_server.sendPing(b"x" * 100)
        self.assertEqual(watch.held, 102)
        self.publish(4000)
        self.assertGreater(watch.held, 4102)

    def test_resume_forgives(self) -> None:
        """
        What was written before the transport resumed does not count.
        """
        self.slow_server._watch.pauseProducing()
        self.publish(4000)
        self.publish(4000)
        self.slow_server._watch.resumeProducing()
        self.slow_server._watch.pauseProducing()
        self.publish(4000)
        self.publish(4000)
        self.slow_pump.flush()
        self.assertIsNone(self.slow.closed)

    def test_unpaused_unlimited(self) -> None:
        """
        A reader that keeps up may receive any amount.
        """
        for _ in range(10):
            self.publish(4000)
        self.slow_pump.flush()
        self.assertIsNone(self.slow.closed)
        self.assertEqual(len([f for f in self.slow.received if f["type"] == "message"]), 10)

    def test_cut_off_while_draining(self) -> None:
        """
        A slow reader cut off while its goodbye is pending leaves no timer
        behind once it is gone.
        """
        self.factory.drain()
        self.slow_pump.flush()
        self.fast_pump.flush()
        self.slow_server._watch.pauseProducing()
        for _ in range(3):
            self.publish(4000)
        self.slow_pump.flush()
        self.assertClosed(self.slow, 1008)
        self.fast.sendClose(1000)
        self.fast_pump.flush()
        self.assertNoTimers()

    def test_abort_if_silent(self) -> None:
        """
        A slow reader that never answers the close is aborted a second
        later, and none of its timers outlives it.
        """
        # It reads nothing more, so it never sees the close frame.
        self.patch(self.slow, "dataReceived", lambda data: None)
        self.slow_server._watch.pauseProducing()
        for _ in range(3):
            self.publish(4000)
        self.assertTrue(self.slow_server._closing)
        transport = self.slow_server.transport
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)
        self.slow_pump.flush()
        self.fast.sendClose(1000)
        self.fast_pump.flush()
        self.assertNoTimers()


class FrameFloodTests(WebSocketTestCase):
    """
    Every frame a client sends, data, continuation and control alike,
    draws from a per-connection frame budget; a flood closes 4011 and the
    rest of it is not parsed.
    """

    factory_options = {"frame_rate": 10.0, "frame_burst": 50.0}

    def count_frames(self, server: RealtimeServerProtocol) -> list[int]:
        """
        Count the frames whose end the server parses from now on.
        """
        seen = [0]
        original = server.onFrameEnd

        def counting() -> bool | None:
            seen[0] += 1
            return original()

        self.patch(server, "onFrameEnd", counting)
        return seen

    def assertFlooded(self, client: RecordingClient, server: RealtimeServerProtocol, pump: IOPump) -> None:
        """
        The client was refused with 4011 C{over_frame_rate}, and the server
        stopped reading from it.
        """
        transport = server.transport
        pump.flush()
        self.assertClosed(client, 4011)
        self.assertEqual(client.closed[2] if client.closed else None, "over_frame_rate")
        self.assertTrue(transport is None or transport.disconnecting)
        self.assertEqual(self.hub.connection_count, 0)
        self.assertEqual(self.metrics.drops["frame_rate"], 1)

    def test_empty_continuation_flood(self) -> None:
        """
        A message started and continued by empty fragments forever is cut
        off once the budget is spent; the frames behind it in the same read
        are dropped unparsed.
        """
        client, server, pump = self.open_token()
        seen = self.count_frames(server)
        client.sendFrame(opcode=1, payload=b"", fin=False)
        for _ in range(2000):
            client.sendFrame(opcode=0, payload=b"", fin=False)
        self.assertFlooded(client, server, pump)
        self.assertLessEqual(seen[0], 51)
        self.assertEqual(server.data, b"")

    def test_ping_flood(self) -> None:
        """
        Protocol pings draw from the frame budget.
        """
        client, server, pump = self.open_token()
        for _ in range(100):
            client.sendPing(b"p")
        self.assertFlooded(client, server, pump)

    def test_messages_are_frames(self) -> None:
        """
        Complete messages count as frames too; the frame budget is checked
        as they arrive.
        """
        client, server, pump = self.open_token()
        for _ in range(60):
            client.sendMessage(b'{"type":"ping"}')
        self.assertFlooded(client, server, pump)

    def test_budget_refills(self) -> None:
        """
        A client that stays within the rate sends any number of frames over
        time.
        """
        client, server, pump = self.open_token()
        for _ in range(10):
            for _ in range(10):
                client.sendPing(b"p")
            client.sendMessage(b'{"type":"ping"}')
            pump.flush()
            self.clock.advance(1.1)
        pump.flush()
        self.assertIsNone(client.closed)
        self.assertEqual([f["type"] for f in client.received[1:]], ["pong"] * 10)

    def test_default_budget(self) -> None:
        """
        By default a connection may send 1000 frames a second with bursts
        of 2000: ten times the message rate, so only a flood meets it.
        """
        factory = RealtimeServerFactory(self.hub, self.keys, self.clock)
        self.assertEqual((factory.frame_rate, factory.frame_burst), (1000.0, 2000.0))


class DrainTests(WebSocketTestCase):
    """
    Draining sends C{going_away}, then closes 1001 (§17.1).
    """

    def test_drain(self) -> None:
        """
        Every connection gets C{going_away} then close 1001, and the drain
        finishes when they are gone.
        """
        first, _, first_pump = self.open_token("a")
        second, _, second_pump = self.open_token("b")
        done = self.factory.drain()
        self.assertTrue(self.factory.draining)
        self.assertNoResult(done)
        first_pump.flush()
        second_pump.flush()
        for client in (first, second):
            going = client.received[-1]
            self.assertEqual(going["type"], "going_away")
            self.assertTrue(1000 <= going["retryAfterMs"] <= 3000)
            self.assertIsNone(client.closed)
        self.clock.advance(0.25)
        first_pump.flush()
        second_pump.flush()
        self.assertClosed(first, 1001)
        self.assertClosed(second, 1001)
        self.successResultOf(done)
        self.assertEqual(self.hub.connection_count, 0)
        self.assertNoTimers()

    def test_drain_twice(self) -> None:
        """
        Draining again while a drain is under way says goodbye once and
        leaves no timer behind.
        """
        client, server, pump = self.open_token("a")
        self.factory.drain()
        pump.flush()
        self.factory.drain()
        pump.flush()
        self.assertEqual([f["type"] for f in client.received], ["welcome", "going_away"])
        self.clock.advance(0.25)
        pump.flush()
        self.assertClosed(client, 1001)
        self.assertNoTimers()

    def test_drain_empty(self) -> None:
        """
        Draining a node without connections is done at once.
        """
        self.successResultOf(self.factory.drain())
        self.assertTrue(self.factory.draining)

    def test_drain_timeout(self) -> None:
        """
        The drain gives up waiting after its timeout.
        """
        client, server, pump = self.open_token("a")
        done = self.factory.drain(timeout=5.0)
        self.clock.advance(5.0)
        self.successResultOf(done)


class TeardownTests(WebSocketTestCase):
    """
    What a closed connection leaves behind.
    """

    def test_freed_without_collector(self) -> None:
        """
        A closed connection is freed by reference counting alone, once its
        transport has let go of it (as TCP's does when the connection is
        lost): nothing it holds waits for a full collection of the garbage
        collector, whether the client closed it or the server refused it.
        """
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for query, client_closes in [("token=" + self.token("alice"), True), ("token=not-a-jwt", False)]:
            client, server, pump = self.open(query)
            pump.flush()
            if client_closes:
                client.sendClose(1000)
                pump.flush()
            self.assertIsNotNone(client.closed)
            server.transport.protocol = client.transport.protocol = None
            freed = weakref.ref(server)
            del client, server, pump
            self.assertIsNone(freed(), query)


class KickTests(WebSocketTestCase):
    """
    The hub's kick reaches the WebSocket as close 4020.
    """

    def test_kick(self) -> None:
        """
        Every connection of the kicked peer closes with 4020.
        """
        first, _, first_pump = self.open_token("a")
        second, _, second_pump = self.open_token("a")
        self.assertEqual(self.successResultOf(self.hub.kick("app_1", "a")), 2)
        first_pump.flush()
        second_pump.flush()
        self.assertClosed(first, 4020)
        self.assertClosed(second, 4020)
        self.assertEqual(self.hub.connection_count, 0)


class SessionLogTests(WebSocketTestCase):
    """
    One log line per WebSocket session end, with what an operator needs and
    never the token.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def open_from(self, query: str, peer: IPv4Address, headers: dict[str, str] | None = None) -> Connection:
        """
        Connect like L{open}, from C{peer}, sending C{headers}.
        """
        client_factory = WebSocketClientFactory(f"ws://localhost/v1?{query}", headers=headers)
        client_factory.protocol = RecordingClient
        return connectedServerAndClient(
            lambda: self.factory.buildProtocol(peer),
            lambda: client_factory.buildProtocol(peer),
            serverTransportFactory=lambda protocol: FakeTransport(protocol, isServer=True, peerAddress=peer),
            clock=self.clock,
        )

    def session_ends(self) -> list[dict]:
        return [event for event in self.events if event.get("event") == "session_end"]

    def test_fields(self) -> None:
        """
        The line names app, peer, connection id, remote address, duration,
        close code, who closed and why, and the frames in and out.
        """
        token = self.token("alice")
        client, _, pump = self.open_from("token=" + token, CLIENT_ADDRESS)
        client.send_json({"type": "subscribe", "channel": "room", "requestId": "s"})
        client.send_json({"type": "ping"})
        pump.flush()
        self.clock.advance(12.5)
        client.sendClose(1000, "bye")
        pump.flush()
        [event] = self.session_ends()
        # The legacy log bridge adds keys of its own (format, time, ...).
        fields = {name: event[name] for name in event if not name.startswith("log_")}
        for legacy in ("format", "isError", "message", "system", "time"):
            fields.pop(legacy, None)
        self.assertEqual(
            fields,
            {
                "event": "session_end",
                "app": "app_1",
                "peer": "alice",
                "conn": "n1:1",
                "remote": "192.0.2.7",
                "duration": 12.5,
                "code": 1000,
                "closed_by": "client",
                "reason": "bye",
                "frames_in": 2,
                # welcome, ack, the snapshot, pong
                "frames_out": 4,
            },
        )
        self.assertEqual(
            formatEvent(event),
            "WebSocket session ended: app=app_1 peer=alice conn=n1:1 remote=192.0.2.7 duration=12.500s "
            "code=1000 by=client reason='bye' frames_in=2 frames_out=4",
        )
        rendered = [formatEvent(e) + repr(e) + json_line(e) for e in self.events]
        self.assertEqual([text for text in rendered if token in text], [])
        self.assertEqual([text for text in rendered if SECRET_KEY.secret in text], [])  # type: ignore[operator]

    def test_refused(self) -> None:
        """
        A refused connection's line has no app or peer, the server's close
        code and reason, and no token.
        """
        client, _, pump = self.open_from("token=not.a.jwt", CLIENT_ADDRESS)
        self.assertClosed(client, 4001)
        [event] = self.session_ends()
        self.assertEqual(
            (event["app"], event["peer"], event["conn"], event["code"], event["closed_by"]),
            ("-", "-", "-", 4001, "server"),
        )
        self.assertNotIn("not.a.jwt", formatEvent(event) + json_line(event))

    def test_server_close(self) -> None:
        """
        When the server closes first (here the hub kicks the peer), the line
        carries the server's code and reason.
        """
        client, _, pump = self.open_token("alice")
        self.hub.kick("app_1", "alice")
        pump.flush()
        self.assertClosed(client, 4020)
        [event] = self.session_ends()
        self.assertEqual((event["code"], event["closed_by"], event["reason"]), (4020, "server", "admin_disconnect"))

    def test_dropped(self) -> None:
        """
        A connection dropped without a closing handshake logs 1006.
        """
        client, _, pump = self.open_token("alice")
        client.transport.loseConnection()
        pump.flush()
        [event] = self.session_ends()
        self.assertEqual((event["code"], event["closed_by"]), (1006, "client"))

    def test_forwarded_for(self) -> None:
        """
        Behind a trusted proxy, the remote address is the client that
        C{X-Forwarded-For} names; from anyone else the header is ignored.
        """
        self.factory.trusted_proxies = (ip_network("10.0.0.0/8"),)
        proxy = IPv4Address("TCP", "10.1.2.3", 40000)
        for peer, expected in ((proxy, "203.0.113.9"), (CLIENT_ADDRESS, "192.0.2.7")):
            client, _, pump = self.open_from("key=pk_live_test", peer, {"X-Forwarded-For": "203.0.113.9"})
            client.sendClose(1000)
            pump.flush()
            self.assertEqual(self.session_ends()[-1]["remote"], expected)

    def test_never_opened(self) -> None:
        """
        An upgrade Autobahn refuses before the WebSocket opens is no
        session and logs no session line.
        """
        client, _, pump = self.open("key=pk_live_test", origin="http://example.com:notaport")
        self.assertFalse(client.opened)
        self.assertEqual(self.session_ends(), [])


class TextFrameTests(SynchronousTestCase):
    """
    L{text_frame} makes the bytes Autobahn's C{PreparedMessage} makes for a
    server's text frame.
    """

    def test_as_autobahn(self) -> None:
        """
        Every length class of the header: 7 bits, 16 bits and 64 bits, at
        and around their bounds.
        """
        factory = WebSocketServerFactory()
        sizes = [*range(0, 130), 0xFFFE, 0xFFFF, 0x10000, 0x10001, 200_000]
        for size in sizes:
            payload = bytes(i % 251 for i in range(size))
            self.assertEqual(text_frame(payload), factory.prepareMessage(payload).payloadHybi, size)
