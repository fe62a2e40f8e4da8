"""
The official C{@metered-ca/realtime} SDK, under Node, against a real server.

Each test starts meteredrt in-process on a loopback port and drives one SDK
scenario (see C{tests/functional/node/sdk_client.mjs}); assertions are on the
events the SDK itself reported.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from meteredrt.apps import ACTIONS, Key, KeyType
from meteredrt.auth import mint_token

from .node_harness import ensure_node_modules, run_sdk_scenario
from .support import (
    APP_ID,
    OTHER_APP_ID,
    OTHER_SECRET,
    OTHER_SECRET_KEY_ID,
    PUBLISHABLE_KEY,
    PUBLISHABLE_NO_SEND,
    SECRET,
    SECRET_KEY_ID,
    start_server,
)

SECRET_KEY = Key(SECRET_KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET)
OTHER_KEY = Key(OTHER_SECRET_KEY_ID, OTHER_APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=OTHER_SECRET)


def token(peer_id: str, key: Key = SECRET_KEY, expires_in: int = 600, **claims: Any) -> str:
    return mint_token(key, peer_id, now=int(time.time()), expires_in=expires_in, **claims)


def events_of(events: list[dict], name: str, client: str | None = None) -> list[dict]:
    return [e for e in events if e["event"] == name and (client is None or e.get("client") == client)]


def steps(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "step"]


class SDKTestCase(TestCase):
    """
    Shared set-up: the pinned SDK is installed (or the test errors: it is
    never skipped) and a server is running.
    """

    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.server = await start_server(self)

    def run_scenario(self, scenario: dict) -> Deferred[list[dict]]:
        if "clients" in scenario:
            for client in scenario["clients"].values():
                client.setdefault("url", self.server.url)
        else:
            scenario.setdefault("url", self.server.url)
        return run_sdk_scenario(scenario, timeout=60)


class ConnectTests(SDKTestCase):
    """
    The handshake as the SDK sees it (issue 2).
    """

    async def test_token_connect(self) -> None:
        """
        A JWT connection is welcomed with the token's sub, exp and the
        advertised message size.
        """
        jwt = token("u_1042", expires_in=900)
        events = await self.run_scenario({"token": jwt, "steps": [{"op": "connect"}]})
        [connected] = events_of(events, "connected")
        self.assertEqual(connected["peerId"], "u_1042")
        self.assertEqual(connected["maxMessageSize"], 65536)
        self.assertLess(abs(connected["expiresAt"] - (time.time() + 900)), 30)
        self.assertLess(abs(connected["serverTime"] - time.time()), 30)
        self.assertIsInstance(connected["serverTime"], int)
        self.assertTrue(steps(events)[0]["ok"])

    async def test_publishable_connect(self) -> None:
        """
        A publishable key gets a fresh UUID peerId and expiresAt null.
        """
        events = await self.run_scenario({"apiKey": PUBLISHABLE_KEY, "steps": [{"op": "connect"}]})
        [connected] = events_of(events, "connected")
        self.assertEqual(str(uuid.UUID(connected["peerId"])), connected["peerId"])
        self.assertIsNone(connected["expiresAt"])

    async def test_invalid_token(self) -> None:
        """
        A token signed with the wrong secret surfaces as a
        SignallingConnectError with close code 4001.
        """
        forged = mint_token(
            Key(SECRET_KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret="sk_secret_wrong"),
            "u_1",
            now=int(time.time()),
        )
        events = await self.run_scenario({"token": forged, "steps": [{"op": "connect"}]})
        [step] = steps(events)
        self.assertFalse(step["ok"])
        self.assertEqual(step["error"]["name"], "SignallingConnectError")
        self.assertEqual(step["error"]["closeCode"], 4001)
        self.assertEqual(events_of(events, "connected"), [])

    async def test_expired_token(self) -> None:
        """
        An expired token surfaces as a SignallingConnectError with 4002.
        """
        expired = mint_token(SECRET_KEY, "u_1", now=int(time.time()) - 120, expires_in=60)
        events = await self.run_scenario({"token": expired, "steps": [{"op": "connect"}]})
        [step] = steps(events)
        self.assertEqual(step["error"]["name"], "SignallingConnectError")
        self.assertEqual(step["error"]["closeCode"], 4002)


class MessagingTests(SDKTestCase):
    """
    Channels, presence and directs between two SDK clients (issue 3).
    """

    async def test_channel_messages_and_presence(self) -> None:
        """
        Two peers see each other join with metadata, exchange channel
        messages (with fromMetadata only where asked for) and the leaver is
        reported as left.
        """
        scenario = {
            "clients": {
                "a": {"token": token("alice", peer_metadata={"name": "Ada"})},
                "b": {"token": token("bob", peer_metadata={"name": "Bob"})},
            },
            "steps": [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "b"},
                {"op": "subscribe", "client": "a", "channel": "demo/room-7", "includeSenderMetadata": True},
                {"op": "subscribe", "client": "b", "channel": "demo/room-7"},
                {"op": "wait", "client": "a", "event": "presence", "where": {"channel": "demo/room-7"}, "count": 2},
                {"op": "publish", "client": "b", "channel": "demo/room-7", "data": {"text": "hi from b"}},
                {"op": "publish", "client": "a", "channel": "demo/room-7", "data": {"text": "hi from a"}},
                {"op": "wait", "client": "a", "event": "message"},
                {"op": "wait", "client": "b", "event": "message"},
                {"op": "close", "client": "b"},
                {"op": "wait", "client": "a", "event": "presence", "count": 3},
            ],
        }
        events = await self.run_scenario(scenario)
        self.assertTrue(all(s["ok"] for s in steps(events)), steps(events))

        presence_a = events_of(events, "presence", "a")
        joined = [p for e in presence_a for p in e["joined"]]
        left = [p for e in presence_a for p in e["left"]]
        self.assertIn({"peerId": "bob", "metadata": {"name": "Bob"}}, joined)
        self.assertEqual(left, [{"peerId": "bob", "metadata": {"name": "Bob"}}])
        # b's snapshot lists a with its metadata.
        presence_b = events_of(events, "presence", "b")
        self.assertIn({"peerId": "alice", "metadata": {"name": "Ada"}}, presence_b[0]["joined"])

        [to_a] = events_of(events, "message", "a")
        self.assertEqual(to_a["from"], "bob")
        self.assertEqual(to_a["data"], {"text": "hi from b"})
        self.assertEqual(to_a["fromMetadata"], {"name": "Bob"})
        [to_b] = events_of(events, "message", "b")
        self.assertEqual(to_b["data"], {"text": "hi from a"})
        self.assertNotIn("fromMetadata", to_b)

    async def test_direct_messages(self) -> None:
        """
        A send reaches the target peer with the sender's metadata, and a
        send to nobody is rejected with peer_not_found.
        """
        scenario = {
            "clients": {
                "a": {"token": token("alice", peer_metadata={"name": "Ada"})},
                "b": {"token": token("bob")},
            },
            "steps": [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "b"},
                {"op": "send", "client": "a", "to": "bob", "data": {"kind": "offer", "sdp": "v=0"}},
                {"op": "wait", "client": "b", "event": "direct"},
                {"op": "send", "client": "b", "to": "alice", "data": None},
                {"op": "wait", "client": "a", "event": "direct"},
                {"op": "send", "client": "a", "to": "nobody", "data": 1},
            ],
        }
        events = await self.run_scenario(scenario)
        [to_b] = events_of(events, "direct", "b")
        self.assertEqual(
            (to_b["from"], to_b["data"], to_b["fromMetadata"]), ("alice", {"kind": "offer", "sdp": "v=0"}, {"name": "Ada"})
        )
        [to_a] = events_of(events, "direct", "a")
        self.assertEqual((to_a["from"], to_a["data"]), ("bob", None))
        last = steps(events)[-1]
        self.assertEqual((last["op"], last["ok"], last["error"]["name"]), ("send", False, "peer_not_found"))

    async def test_wildcard_subscription(self) -> None:
        """
        A wildcard subscriber receives publishes on every matching concrete
        channel, named concretely, and nothing from channels outside it.
        """
        scenario = {
            "clients": {
                "watcher": {"token": token("watcher")},
                "device": {"token": token("device")},
            },
            "steps": [
                {"op": "connect", "client": "watcher"},
                {"op": "connect", "client": "device"},
                {"op": "subscribe", "client": "watcher", "channel": "devices/*/events"},
                {"op": "publish", "client": "device", "channel": "devices/d1/events", "data": 1},
                {"op": "publish", "client": "device", "channel": "devices/d1/x/events", "data": 2},
                {"op": "publish", "client": "device", "channel": "devices/d2/events", "data": 3},
                {"op": "wait", "client": "watcher", "event": "message", "count": 2},
            ],
        }
        events = await self.run_scenario(scenario)
        received = [(e["channel"], e["data"]) for e in events_of(events, "message", "watcher")]
        self.assertEqual(received, [("devices/d1/events", 1), ("devices/d2/events", 3)])

    async def test_rejections_keep_the_connection(self) -> None:
        """
        Every in-band rejection reaches the SDK with its code, and the
        connection keeps working afterwards.
        """
        scenario = {
            "apiKey": PUBLISHABLE_NO_SEND,
            "steps": [
                {"op": "connect"},
                {"op": "subscribe", "channel": "private/x"},
                {"op": "subscribe", "channel": "_metered/x"},
                {"op": "send", "to": "someone", "data": 1},
                {"op": "subscribe", "channel": "public/**"},
                {"op": "publish", "channel": "public/a", "data": "still here"},
                {"op": "state"},
            ],
        }
        events = await self.run_scenario(scenario)
        outcomes = [(s["op"], s["ok"], s.get("error", {}).get("name")) for s in steps(events)]
        self.assertEqual(
            outcomes,
            [
                ("connect", True, None),
                ("subscribe", False, "channel_not_authorized"),
                ("subscribe", False, "channel_reserved"),
                ("send", False, "action_not_permitted"),
                ("subscribe", True, None),
                ("publish", True, None),
                ("state", True, None),
            ],
        )
        self.assertEqual(steps(events)[-1]["state"], "connected")

    async def test_limits_surface_with_their_codes(self) -> None:
        """
        A wildcard publish is C{invalid_channel} and the 101st subscription
        C{channel_limit_exceeded}; the connection goes on working. (The SDK
        itself refuses empty or over-long channels, bad peer ids and missing
        data before anything is sent.)
        """
        subscribes = [{"op": "subscribe", "channel": f"rooms/{n}"} for n in range(101)]
        scenario = {
            "apiKey": PUBLISHABLE_KEY,
            "steps": [
                {"op": "connect"},
                {"op": "publish", "channel": "rooms/*", "data": 1},
                *subscribes,
                {"op": "unsubscribe", "channel": "rooms/0"},
                {"op": "subscribe", "channel": "rooms/100"},
            ],
        }
        events = await self.run_scenario(scenario)
        outcomes = [(s["op"], s["ok"], s.get("error", {}).get("name")) for s in steps(events)]
        self.assertEqual(outcomes[1], ("publish", False, "invalid_channel"))
        self.assertEqual(outcomes[2:102], [("subscribe", True, None)] * 100)
        self.assertEqual(outcomes[102], ("subscribe", False, "channel_limit_exceeded"))
        self.assertEqual(outcomes[103:], [("unsubscribe", True, None), ("subscribe", True, None)])

    async def test_apps_are_isolated(self) -> None:
        """
        The same channel and peerId in two apps never meet.
        """
        scenario = {
            "clients": {
                "a": {"token": token("same")},
                "other": {"token": token("same", key=OTHER_KEY)},
                "b": {"token": token("b")},
            },
            "steps": [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "other"},
                {"op": "connect", "client": "b"},
                {"op": "subscribe", "client": "a", "channel": "room"},
                {"op": "subscribe", "client": "other", "channel": "room"},
                {"op": "publish", "client": "b", "channel": "room", "data": "for app_test"},
                {"op": "send", "client": "b", "to": "same", "data": "direct"},
                {"op": "wait", "client": "a", "event": "direct"},
                {"op": "wait", "client": "a", "event": "message"},
            ],
        }
        events = await self.run_scenario(scenario)
        self.assertEqual(len(events_of(events, "message", "a")), 1)
        self.assertEqual(events_of(events, "message", "other"), [])
        self.assertEqual(events_of(events, "direct", "other"), [])
        other_presence = events_of(events, "presence", "other")
        self.assertEqual([p["joined"] for p in other_presence], [[]])
