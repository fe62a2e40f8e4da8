"""
Tests for L{meteredrt.hub}: channels, wildcard routing, presence and
directs, in memory over L{MemoryBroker} and L{MemoryPresence}, with
L{RecordingSink}s standing in for connections.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import ACTIONS, App, Plan
from meteredrt.auth import Grant, Refusal
from meteredrt.broker.memory import MemoryBroker
from meteredrt.envelopes import PresenceChange
from meteredrt.hub import _PENDING, BACKEND_ERROR_LOG_EVERY, Hub, Session, _fired, _start
from meteredrt.interfaces import BackendUnavailable
from meteredrt.metering import Meter
from meteredrt.presence.memory import MemoryPresence
from meteredrt.protocol import MAX_SUBSCRIPTIONS, SNAPSHOT_FRAME_BUDGET, CloseCode, FrameError, parse_frame
from meteredrt.testing import HeldAnswers, HeldBroker, HeldMeter, HeldPresence, RecordingSink
from meteredrt.usagestore import UsageStore


def make_grant(
    peer_id: str,
    app_id: str = "app_1",
    actions: frozenset[str] = ACTIONS,
    key_patterns: tuple[str, ...] = ("**",),
    claim_patterns: tuple[str, ...] | None = None,
    peer_metadata: dict | None = None,
) -> Grant:
    """
    A grant as L{meteredrt.auth.authenticate} would make it.
    """
    return Grant(
        app_id=app_id,
        key_id="sk_id_test",
        peer_id=peer_id,
        actions=actions,
        key_patterns=key_patterns,
        claim_patterns=claim_patterns,
        peer_metadata=peer_metadata,
        metadata=None,
        expires_at=None,
        auto_inject_turn=False,
    )


#: Every action but presence.
BLIND = ACTIONS - {"presence"}


@frozen
class CountingGrant(Grant):
    """
    A L{Grant} that records every question asked of it.
    """

    asked: ClassVar[list[str]] = []

    def may(self, action: str) -> bool:
        CountingGrant.asked.append(action)
        return super().may(action)


class HubTestCase(SynchronousTestCase):
    """
    A hub over the in-memory broker and presence, with an unstarted
    L{Meter} counting in memory, and helpers to drive it with real frames.
    """

    def setUp(self) -> None:
        self.apps: dict[str, App] = {"app_1": App("app_1"), "app_2": App("app_2")}
        self.clock = Clock()
        self.meter = Meter(self.clock, UsageStore(self.mktemp(), MemoryReactorClock()))
        self.presence = MemoryPresence()
        self.broker = MemoryBroker()
        self.hub = Hub(self.broker, self.presence, self.meter, self.apps.get, node_id="n1")

    def connect(self, peer_id: str, **kwargs: Any) -> tuple[Session, RecordingSink]:
        """
        Admit a connection; return its session and its sink.
        """
        session = self.successResultOf(self.hub.connect(RecordingSink, make_grant(peer_id, **kwargs)))
        assert isinstance(session.sink, RecordingSink)
        return session, session.sink

    def request(self, session: Session, **frame: Any) -> None:
        """
        Hand the hub one client frame, parsed as the adapter would.
        """
        self.successResultOf(self.hub.handle(session, parse_frame(json.dumps(frame))))

    def subscribe(self, session: Session, channel: str, **extra: Any) -> None:
        """
        Send a C{subscribe} frame.
        """
        self.request(session, type="subscribe", channel=channel, **extra)

    def publish(self, session: Session, channel: str, data: Any, **extra: Any) -> None:
        """
        Send a C{publish} frame.
        """
        self.request(session, type="publish", channel=channel, data=data, **extra)

    def send(self, session: Session, to: str, data: Any, **extra: Any) -> None:
        """
        Send a C{send} frame.
        """
        self.request(session, type="send", to=to, data=data, **extra)

    def assertError(self, sink: RecordingSink, code: str, request_id: str | None = "r1") -> None:
        """
        The sink's only frame is an error with this code, echoing the
        request id when there was one.
        """
        [frame] = sink.decoded
        self.assertEqual(frame["type"], "error")
        self.assertEqual(frame["code"], code)
        self.assertIsInstance(frame["message"], str)
        if request_id is None:
            self.assertNotIn("requestId", frame)
        else:
            self.assertEqual(frame["requestId"], request_id)


class ErrorCodeTests(HubTestCase):
    """
    Every refusal the hub makes is an C{error} frame with the §12 code, and
    the request has no effect.
    """

    def test_subscribe_action_not_permitted(self) -> None:
        """
        A subscribe without the C{subscribe} action is refused.
        """
        session, sink = self.connect("a", actions=frozenset({"publish"}))
        self.subscribe(session, "room", requestId="r1")
        self.assertError(sink, "action_not_permitted")
        self.assertEqual(session.subscriptions, {})

    def test_publish_action_not_permitted(self) -> None:
        """
        A publish without the C{publish} action is refused and not delivered.
        """
        listener, heard = self.connect("l")
        self.subscribe(listener, "room")
        heard.clear()
        session, sink = self.connect("a", actions=frozenset({"subscribe"}))
        self.publish(session, "room", 1, requestId="r1")
        self.assertError(sink, "action_not_permitted")
        self.assertEqual(heard.decoded, [])

    def test_send_action_not_permitted(self) -> None:
        """
        A send without the C{send} action is refused and not delivered.
        """
        target, heard = self.connect("b")
        session, sink = self.connect("a", actions=frozenset({"publish"}))
        self.send(session, "b", 1, requestId="r1")
        self.assertError(sink, "action_not_permitted")
        self.assertEqual(heard.decoded, [])

    def test_subscribe_concrete_not_authorized(self) -> None:
        """
        A concrete channel outside the key's patterns is refused.
        """
        session, sink = self.connect("a", key_patterns=("public/**",))
        self.subscribe(session, "private/x", requestId="r1")
        self.assertError(sink, "channel_not_authorized")
        self.assertEqual(session.subscriptions, {})

    def test_publish_not_authorized(self) -> None:
        """
        A publish outside the key's patterns is refused and not delivered.
        """
        listener, heard = self.connect("l")
        self.subscribe(listener, "private/x")
        heard.clear()
        session, sink = self.connect("a", key_patterns=("public/**",))
        self.publish(session, "private/x", 1, requestId="r1")
        self.assertError(sink, "channel_not_authorized")
        self.assertEqual(heard.decoded, [])

    def test_wildcard_not_provably_included(self) -> None:
        """
        A wildcard subscription that could match a channel outside the
        key's patterns is refused, even if some of its channels are allowed.
        """
        session, sink = self.connect("a", key_patterns=("public/*",))
        self.subscribe(session, "public/**", requestId="r1")
        self.assertError(sink, "channel_not_authorized")
        self.assertEqual(session.subscriptions, {})

    def test_wildcard_included(self) -> None:
        """
        A wildcard subscription inside the key's patterns is accepted.
        """
        session, sink = self.connect("a", key_patterns=("public/**",))
        self.subscribe(session, "public/*", requestId="r1")
        self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "r1"}])

    def test_channel_limit(self) -> None:
        """
        The 101st subscription is refused; re-subscribing one already held
        at the cap still succeeds.
        """
        session, sink = self.connect("a")
        for n in range(MAX_SUBSCRIPTIONS - 1):
            self.subscribe(session, f"c/{n}")
        self.subscribe(session, "w/*")
        sink.clear()
        self.subscribe(session, "c/extra", requestId="r1")
        self.assertError(sink, "channel_limit_exceeded")
        self.assertNotIn("c/extra", session.subscriptions)
        sink.clear()
        self.subscribe(session, "c/0", requestId="r2")
        self.assertEqual(sink.decoded[0], {"type": "ack", "requestId": "r2"})
        self.assertEqual(len(session.subscriptions), MAX_SUBSCRIPTIONS)

    def test_peer_not_found(self) -> None:
        """
        A send to a peer with no live connection is refused.
        """
        session, sink = self.connect("a")
        self.send(session, "nobody", 1, requestId="r1")
        self.assertError(sink, "peer_not_found")

    def test_send_to_self_alone(self) -> None:
        """
        A send to one's own peerId with no other connection finds nobody.
        """
        session, sink = self.connect("a")
        self.send(session, "a", 1, requestId="r1")
        self.assertError(sink, "peer_not_found")

    def test_over_message_quota(self) -> None:
        """
        Past the plan's message cap, publishes and sends are refused with
        C{over_message_quota} and delivered to nobody; presence still flows.
        """
        self.apps["app_1"] = App("app_1", Plan(max_messages_per_period=1))
        listener, heard = self.connect("l")
        self.subscribe(listener, "room")
        session, sink = self.connect("a")
        heard.clear()
        self.publish(session, "room", 1, requestId="r0")
        self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "r0"}])
        sink.clear()
        heard.clear()

        self.publish(session, "room", 2, requestId="r1")
        self.assertError(sink, "over_message_quota")
        sink.clear()
        self.send(session, "l", 3, requestId="r1")
        self.assertError(sink, "over_message_quota")
        self.assertEqual(heard.decoded, [])

        # Inbound traffic that is not a counted message still flows.
        newcomer, _ = self.connect("n")
        self.subscribe(newcomer, "room")
        self.assertEqual(heard.of_type("presence")[-1]["joined"], [{"peerId": "n"}])

    def test_peer_not_found_before_quota(self) -> None:
        """
        A send to an absent peer is C{peer_not_found} even over quota (the
        target is looked up first), and it still counts as a message.
        """
        self.apps["app_1"] = App("app_1", Plan(max_messages_per_period=1))
        session, sink = self.connect("a")
        self.send(session, "nobody", 1, requestId="r0")
        self.assertError(sink, "peer_not_found", "r0")
        sink.clear()
        self.send(session, "nobody", 2, requestId="r1")
        self.assertError(sink, "peer_not_found")
        sink.clear()
        self.connect("l")
        self.send(session, "l", 3, requestId="r2")
        self.assertError(sink, "over_message_quota", "r2")

    def test_errors_without_request_id(self) -> None:
        """
        An error is sent even when the request carried no requestId, and
        then has none.
        """
        session, sink = self.connect("a", key_patterns=("public/**",))
        self.subscribe(session, "private/x")
        self.assertError(sink, "channel_not_authorized", request_id=None)


class AckTests(HubTestCase):
    """
    Successful requests are acked exactly when they carry a requestId.
    """

    def test_acks_with_request_id(self) -> None:
        """
        Each of subscribe, publish, send and unsubscribe is acked once.
        """
        other, _ = self.connect("b", actions=frozenset({"subscribe"}))
        session, sink = self.connect("a", actions=frozenset({"subscribe", "publish", "send"}))
        self.subscribe(session, "room", requestId="s")
        self.publish(session, "room", 1, requestId="p")
        self.send(session, "b", 1, requestId="d")
        self.request(session, type="unsubscribe", channel="room", requestId="u")
        self.assertEqual(
            sink.decoded,
            [{"type": "ack", "requestId": r} for r in ("s", "p", "d", "u")],
        )

    def test_no_ack_without_request_id(self) -> None:
        """
        Without a requestId, a successful request draws no frame at all.
        """
        other, _ = self.connect("b")
        session, sink = self.connect("a", actions=frozenset({"subscribe", "publish", "send"}))
        self.subscribe(session, "room")
        self.publish(session, "room", 1)
        self.send(session, "b", 1)
        self.request(session, type="unsubscribe", channel="room")
        self.assertEqual(sink.decoded, [])

    def test_unsubscribe_unknown(self) -> None:
        """
        Unsubscribing a channel not held is still acked.
        """
        session, sink = self.connect("a")
        self.request(session, type="unsubscribe", channel="never", requestId="u")
        self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "u"}])


class AuthorizationTests(HubTestCase):
    """
    A connection may use a channel only if both its key's patterns and its
    token's channel claims allow it (§4.4).
    """

    def test_concrete_intersection(self) -> None:
        """
        A concrete channel must be inside the key and the claims.
        """
        session, sink = self.connect("a", key_patterns=("a/**",), claim_patterns=("a/x", "b/y"))
        self.subscribe(session, "a/x", requestId="in")
        self.subscribe(session, "b/y", requestId="outside-key")
        self.subscribe(session, "a/z", requestId="outside-claims")
        self.assertEqual(
            [(f["type"], f["requestId"]) for f in sink.decoded if f["type"] != "presence"],
            [("ack", "in"), ("error", "outside-key"), ("error", "outside-claims")],
        )

    def test_publish_intersection(self) -> None:
        """
        A publish is checked against the intersection as well.
        """
        session, sink = self.connect("a", key_patterns=("**",), claim_patterns=("a/*",))
        self.publish(session, "a/1", 1, requestId="in")
        self.publish(session, "b/1", 1, requestId="out")
        self.assertEqual(
            [(f["type"], f["requestId"]) for f in sink.decoded], [("ack", "in"), ("error", "out")]
        )

    def test_wildcard_intersection(self) -> None:
        """
        A wildcard must be included in the claims too, not only the key.
        """
        session, sink = self.connect("a", key_patterns=("**",), claim_patterns=("a/*",))
        self.subscribe(session, "a/*", requestId="in")
        self.subscribe(session, "a/**", requestId="out")
        self.assertEqual(
            [(f["type"], f["requestId"]) for f in sink.decoded], [("ack", "in"), ("error", "out")]
        )
        self.assertEqual(sink.decoded[1]["code"], "channel_not_authorized")

    def test_send_not_scoped_by_channels(self) -> None:
        """
        A send reaches a peer whatever the sender's channel claims.
        """
        target, heard = self.connect("b")
        session, sink = self.connect("a", key_patterns=("x/only",), claim_patterns=("x/only",))
        self.send(session, "b", 1, requestId="d")
        self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "d"}])
        self.assertEqual(heard.of_type("direct"), [{"type": "direct", "from": "a", "data": 1}])


class WildcardTests(HubTestCase):
    """
    Wildcard subscriptions receive publishes on every matching concrete
    channel (§9.4).
    """

    def test_concrete_name_delivered(self) -> None:
        """
        A wildcard subscriber's message carries the concrete channel name.
        """
        sub, heard = self.connect("s")
        self.subscribe(sub, "rooms/*")
        pub, _ = self.connect("p")
        self.publish(pub, "rooms/1", {"x": 1})
        self.assertEqual(
            heard.decoded, [{"type": "message", "channel": "rooms/1", "from": "p", "data": {"x": 1}}]
        )

    def test_single_star_stops_at_slash(self) -> None:
        """
        C{*} does not cross C{/}; C{**} does.
        """
        single, one = self.connect("s1")
        self.subscribe(single, "rooms/*")
        double, two = self.connect("s2")
        self.subscribe(double, "rooms/**")
        pub, _ = self.connect("p")
        self.publish(pub, "rooms/1", "a")
        self.publish(pub, "rooms/1/chat", "b")
        self.publish(pub, "other/1", "c")
        self.assertEqual([f["channel"] for f in one.decoded], ["rooms/1"])
        self.assertEqual([f["channel"] for f in two.decoded], ["rooms/1", "rooms/1/chat"])

    def test_once_per_connection(self) -> None:
        """
        A connection whose several subscriptions match gets one copy.
        """
        sub, heard = self.connect("s")
        for channel in ("rooms/*", "rooms/**", "**", "rooms/1"):
            self.subscribe(sub, channel)
        heard.clear()
        pub, _ = self.connect("p")
        self.publish(pub, "rooms/1", "hi")
        self.assertEqual(len(heard.of_type("message")), 1)

    def test_sender_metadata_or(self) -> None:
        """
        C{fromMetadata} is included when any matching subscription opted in,
        concrete or wildcard.
        """
        mixed, heard = self.connect("s1")
        self.subscribe(mixed, "rooms/*")
        self.subscribe(mixed, "rooms/**", includeSenderMetadata=True)
        concrete, heard_concrete = self.connect("s2")
        self.subscribe(concrete, "rooms/1")
        self.subscribe(concrete, "rooms/*", includeSenderMetadata=True)
        opted_concrete, heard_opted = self.connect("s3")
        self.subscribe(opted_concrete, "rooms/1", includeSenderMetadata=True)
        self.subscribe(opted_concrete, "rooms/*")
        neither, heard_neither = self.connect("s4")
        self.subscribe(neither, "rooms/*")
        self.subscribe(neither, "rooms/**")
        sinks = (heard, heard_concrete, heard_opted, heard_neither)
        for sink in sinks:
            sink.clear()
        pub, _ = self.connect("p", peer_metadata={"name": "Ada"})
        self.publish(pub, "rooms/1", "hi")
        [one], [two], [three], [four] = (sink.of_type("message") for sink in sinks)
        self.assertEqual(one["fromMetadata"], {"name": "Ada"})
        self.assertEqual(two["fromMetadata"], {"name": "Ada"})
        self.assertEqual(three["fromMetadata"], {"name": "Ada"})
        self.assertNotIn("fromMetadata", four)

    def test_publisher_excluded(self) -> None:
        """
        A publisher whose own wildcard matches does not hear itself; its
        other connection does.
        """
        publisher, own = self.connect("p")
        twin, twin_sink = self.connect("p")
        for session in (publisher, twin):
            self.subscribe(session, "rooms/*")
        self.publish(publisher, "rooms/1", "hi")
        self.assertEqual(own.decoded, [])
        self.assertEqual(len(twin_sink.of_type("message")), 1)

    def test_unsubscribe_wildcard(self) -> None:
        """
        After unsubscribing a pattern, nothing more arrives through it.
        """
        sub, heard = self.connect("s")
        self.subscribe(sub, "rooms/*")
        self.request(sub, type="unsubscribe", channel="rooms/*")
        pub, _ = self.connect("p")
        self.publish(pub, "rooms/1", "hi")
        self.assertEqual(heard.decoded, [])

    def test_wildcard_has_no_presence(self) -> None:
        """
        A wildcard subscriber gets no snapshot and no deltas, and does not
        appear in any channel's presence.
        """
        member, member_sink = self.connect("m")
        self.subscribe(member, "rooms/1")
        member_sink.clear()
        watcher, heard = self.connect("w")
        self.subscribe(watcher, "rooms/*", requestId="r")
        self.assertEqual(heard.decoded, [{"type": "ack", "requestId": "r"}])
        self.assertEqual(member_sink.decoded, [])
        self.assertEqual([m.peer_id for m in self.successResultOf(self.hub.members("app_1", "rooms/1"))], ["m"])
        newcomer, _ = self.connect("n")
        self.subscribe(newcomer, "rooms/1")
        self.assertEqual(heard.decoded, [{"type": "ack", "requestId": "r"}])


class PresenceTests(HubTestCase):
    """
    Presence per (app, channel, peerId) with connection refcounts (§10).
    """

    def test_ack_then_snapshot(self) -> None:
        """
        The subscriber gets its ack first, then a snapshot of everyone else
        with their peerMetadata, with both arrays present.
        """
        alice, _ = self.connect("alice", peer_metadata={"name": "Alice"})
        self.subscribe(alice, "room")
        bob, _ = self.connect("bob")
        self.subscribe(bob, "room")
        carol, sink = self.connect("carol", peer_metadata={"name": "Carol"})
        self.subscribe(carol, "room", requestId="r")
        self.assertEqual(
            sink.decoded,
            [
                {"type": "ack", "requestId": "r"},
                {
                    "type": "presence",
                    "channel": "room",
                    "joined": [{"peerId": "alice", "metadata": {"name": "Alice"}}, {"peerId": "bob"}],
                    "left": [],
                },
            ],
        )

    def test_empty_snapshot(self) -> None:
        """
        A subscriber to an empty channel still gets a snapshot, without
        itself in it.
        """
        session, sink = self.connect("a")
        self.subscribe(session, "room")
        self.assertEqual(sink.decoded, [{"type": "presence", "channel": "room", "joined": [], "left": []}])

    def test_joined_delta(self) -> None:
        """
        Other members get one C{joined} delta carrying the newcomer's
        peerMetadata.
        """
        alice, heard = self.connect("alice")
        self.subscribe(alice, "room")
        heard.clear()
        bob, _ = self.connect("bob", peer_metadata={"n": 1})
        self.subscribe(bob, "room")
        self.assertEqual(
            heard.decoded,
            [
                {
                    "type": "presence",
                    "channel": "room",
                    "joined": [{"peerId": "bob", "metadata": {"n": 1}}],
                    "left": [],
                }
            ],
        )

    def test_refcount(self) -> None:
        """
        A peer with two connections joins once and leaves once, when its
        last connection leaves.
        """
        observer, heard = self.connect("o")
        self.subscribe(observer, "room")
        heard.clear()
        first, _ = self.connect("alice")
        second, _ = self.connect("alice")
        self.subscribe(first, "room")
        self.subscribe(second, "room")
        self.assertEqual(
            heard.decoded, [{"type": "presence", "channel": "room", "joined": [{"peerId": "alice"}], "left": []}]
        )
        heard.clear()
        self.request(first, type="unsubscribe", channel="room")
        self.assertEqual(heard.decoded, [])
        self.successResultOf(self.hub.disconnect(second))
        self.assertEqual(
            heard.decoded, [{"type": "presence", "channel": "room", "joined": [], "left": [{"peerId": "alice"}]}]
        )

    def test_second_connection_snapshot(self) -> None:
        """
        A peer's second connection gets a snapshot without its own peerId.
        """
        first, _ = self.connect("alice")
        self.subscribe(first, "room")
        second, sink = self.connect("alice")
        self.subscribe(second, "room")
        self.assertEqual(sink.decoded, [{"type": "presence", "channel": "room", "joined": [], "left": []}])

    def test_repeat_subscribe(self) -> None:
        """
        A repeat subscribe is acked and gets a fresh snapshot; nobody else
        hears about it.
        """
        bob, heard = self.connect("bob")
        self.subscribe(bob, "room")
        alice, sink = self.connect("alice")
        self.subscribe(alice, "room")
        heard.clear()
        sink.clear()
        self.subscribe(alice, "room", requestId="again")
        self.assertEqual(
            sink.decoded,
            [
                {"type": "ack", "requestId": "again"},
                {"type": "presence", "channel": "room", "joined": [{"peerId": "bob"}], "left": []},
            ],
        )
        self.assertEqual(heard.decoded, [])

    def test_repeat_subscribe_replaces_flag(self) -> None:
        """
        The latest subscribe's C{includeSenderMetadata} wins.
        """
        sub, heard = self.connect("s")
        self.subscribe(sub, "room", includeSenderMetadata=True)
        self.subscribe(sub, "room")
        heard.clear()
        pub, _ = self.connect("p", peer_metadata={"n": 1})
        self.publish(pub, "room", 1)
        self.assertNotIn("fromMetadata", heard.of_type("message")[0])

    def test_left_on_unsubscribe(self) -> None:
        """
        Unsubscribing sends C{left} with the peer's metadata to the others
        and nothing to the unsubscriber.
        """
        observer, heard = self.connect("o")
        self.subscribe(observer, "room")
        alice, sink = self.connect("alice", peer_metadata={"n": 1})
        self.subscribe(alice, "room")
        heard.clear()
        sink.clear()
        self.request(alice, type="unsubscribe", channel="room")
        self.assertEqual(
            heard.decoded,
            [
                {
                    "type": "presence",
                    "channel": "room",
                    "joined": [],
                    "left": [{"peerId": "alice", "metadata": {"n": 1}}],
                }
            ],
        )
        self.assertEqual(sink.decoded, [])

    def test_left_on_disconnect(self) -> None:
        """
        Disconnecting ends every membership with C{left}; a second
        disconnect is harmless.
        """
        observer, heard = self.connect("o")
        self.subscribe(observer, "a")
        self.subscribe(observer, "b")
        alice, _ = self.connect("alice")
        self.subscribe(alice, "a")
        self.subscribe(alice, "b")
        heard.clear()
        self.successResultOf(self.hub.disconnect(alice))
        self.successResultOf(self.hub.disconnect(alice))
        self.assertEqual(
            sorted((f["channel"], f["left"]) for f in heard.decoded),
            [("a", [{"peerId": "alice"}]), ("b", [{"peerId": "alice"}])],
        )
        self.assertEqual(self.hub.connection_count, 1)

    def test_presence_action_required(self) -> None:
        """
        Presence frames go only to connections holding C{presence}; a peer
        without it still appears to the others.
        """
        blind, blind_sink = self.connect("blind", actions=frozenset({"subscribe"}))
        self.subscribe(blind, "room", requestId="r")
        self.assertEqual(blind_sink.decoded, [{"type": "ack", "requestId": "r"}])
        seer, seer_sink = self.connect("seer")
        self.subscribe(seer, "room")
        self.assertEqual(
            seer_sink.decoded,
            [{"type": "presence", "channel": "room", "joined": [{"peerId": "blind"}], "left": []}],
        )
        self.successResultOf(self.hub.disconnect(seer))
        self.assertEqual(blind_sink.decoded, [{"type": "ack", "requestId": "r"}])

    def test_join_touches_only_presence_holders(self) -> None:
        """
        A join's presence delta asks only the channel's presence holders
        whether they may see it: a subscribe asks the members' grants as
        many questions in a channel of 10 members without presence as in
        one of 1,000.
        """

        def join(hub: Hub, peer_id: str, channel: str, actions: frozenset[str]) -> Session:
            grant = CountingGrant(**attrs.asdict(make_grant(peer_id, actions=actions), recurse=False))
            session = self.successResultOf(hub.connect(RecordingSink, grant))
            self.successResultOf(hub.handle(session, parse_frame(json.dumps({"type": "subscribe", "channel": channel}))))
            return session

        asked_per_size = []
        for size in (10, 1000):
            hub = Hub(MemoryBroker(), MemoryPresence(), self.meter, self.apps.get, node_id="n1")
            for n in range(size):
                join(hub, f"blind-{n}", "room", BLIND)
            seer = join(hub, "seer", "room", ACTIONS)
            CountingGrant.asked.clear()
            join(hub, "new", "room", BLIND)
            asked_per_size.append(len(CountingGrant.asked))
            self.assertEqual(
                seer.sink.decoded[-1],  # type: ignore[attr-defined]
                {"type": "presence", "channel": "room", "joined": [{"peerId": "new"}], "left": []},
            )
        self.assertEqual(asked_per_size[0], asked_per_size[1])

    def test_presence_holders_follow_subscriptions(self) -> None:
        """
        After subscribes, unsubscribes, disconnects and resubscribes, a
        presence delta reaches exactly the channel's subscribers holding
        C{presence}, however they came and went.
        """
        sessions = {}
        for name in ("s1", "s2", "s3", "b1", "b2"):
            actions = BLIND if name.startswith("b") else ACTIONS
            sessions[name], _ = self.connect(name, actions=actions)
        for session in sessions.values():
            self.subscribe(session, "room")
            self.subscribe(session, "other")
        self.request(sessions["s1"], type="unsubscribe", channel="room")
        self.successResultOf(self.hub.disconnect(sessions["s2"]))
        self.request(sessions["b1"], type="unsubscribe", channel="room")
        self.request(sessions["s1"], type="unsubscribe", channel="other")
        self.subscribe(sessions["s1"], "other")
        s4, _ = self.connect("s4")
        self.subscribe(s4, "room")
        for session in sessions.values():
            session.sink.clear()  # type: ignore[attr-defined]
        s4.sink.clear()  # type: ignore[attr-defined]
        for channel, expected in (("room", {"s3", "s4"}), ("other", {"s1", "s3"})):
            count = self.hub.deliver("app_1", PresenceChange(channel, ({"peerId": "x"},), (), None))
            heard = {
                s.peer_id for s in [*sessions.values(), s4] if s.sink.decoded  # type: ignore[attr-defined]
            }
            self.assertEqual((count, heard), (len(expected), expected))
            for session in [*sessions.values(), s4]:
                session.sink.clear()  # type: ignore[attr-defined]
        for session in [*sessions.values(), s4]:
            self.successResultOf(self.hub.disconnect(session))
        self.assertEqual(self.hub.deliver("app_1", PresenceChange("room", ({"peerId": "x"},), (), None)), 0)

    def test_split_snapshot(self) -> None:
        """
        A snapshot too large for one frame is split into several of at most
        the budget, each with C{left: []}, together listing every member,
        all after the ack.
        """
        metadata = {"blob": "x" * 3900}
        for n in range(200):
            member, _ = self.connect(f"peer-{n}", peer_metadata=metadata)
            self.subscribe(member, "room")
        session, sink = self.connect("late")
        self.subscribe(session, "room", requestId="r")
        frames = sink.decoded
        self.assertEqual(frames[0], {"type": "ack", "requestId": "r"})
        snapshots = frames[1:]
        self.assertGreater(len(snapshots), 1)
        for payload in sink.frames[1:]:
            self.assertLessEqual(len(payload.payload), SNAPSHOT_FRAME_BUDGET)
        self.assertEqual({f["left"] == [] for f in snapshots}, {True})
        self.assertEqual(
            [e["peerId"] for f in snapshots for e in f["joined"]], [f"peer-{n}" for n in range(200)]
        )

    def test_members(self) -> None:
        """
        L{Hub.members} lists each peerId once with its metadata.
        """
        for _ in range(2):
            session, _ = self.connect("alice", peer_metadata={"n": 1})
            self.subscribe(session, "room")
        members = self.successResultOf(self.hub.members("app_1", "room"))
        self.assertEqual([(m.peer_id, m.metadata) for m in members], [("alice", {"n": 1})])


class JoinCostTests(HubTestCase):
    """
    A subscribe costs the same in a channel of ten members as in one of a
    thousand, unless its subscriber is to be shown them (protocol §10).
    """

    def test_snapshot_only_for_presence(self) -> None:
        """
        Subscribers without C{presence} join without the members being
        read, however many there are; one holding C{presence} reads them
        once, for its snapshot.
        """
        reads: list[int] = []

        class CountedMembers(dict):
            def values(self) -> Any:
                reads.append(len(self))
                return super().values()

        for n in range(1000):
            session, _ = self.connect(f"p{n}", actions=BLIND)
            self.subscribe(session, "room")
        room = self.presence._channels[("app_1", "room")]
        room.members = CountedMembers(room.members)
        blind, blind_sink = self.connect("blind", actions=BLIND)
        self.subscribe(blind, "room", requestId="r")
        self.assertEqual((reads, blind_sink.decoded), ([], [{"type": "ack", "requestId": "r"}]))
        seeing, seeing_sink = self.connect("seeing")
        self.subscribe(seeing, "room", requestId="r")
        self.assertEqual(reads, [1002])
        [ack, *snapshots] = seeing_sink.decoded
        self.assertEqual(ack, {"type": "ack", "requestId": "r"})
        self.assertEqual(sum(len(frame["joined"]) for frame in snapshots), 1001)


class DeliveryTests(HubTestCase):
    """
    Who receives publishes and directs, and with what.
    """

    def test_publisher_excluded(self) -> None:
        """
        The publishing connection does not hear its message; the same
        peer's other connection and other subscribers do.
        """
        publisher, own = self.connect("alice")
        twin, twin_sink = self.connect("alice")
        other, other_sink = self.connect("bob")
        for session in (publisher, twin, other):
            self.subscribe(session, "room")
        for sink in (own, twin_sink, other_sink):
            sink.clear()
        self.publish(publisher, "room", None)
        self.assertEqual(own.decoded, [])
        expected = [{"type": "message", "channel": "room", "from": "alice", "data": None}]
        self.assertEqual(twin_sink.decoded, expected)
        self.assertEqual(other_sink.decoded, expected)

    def assert_publisher_excluded(self, wildcard: str | None, sender_metadata: dict | None) -> None:
        """
        With the app holding C{wildcard} (if any) on another connection,
        a publish by a connection of a peer with C{sender_metadata} does
        not reach that connection; it reaches its twin (the same peer,
        subscribed too) without C{fromMetadata}, and a subscriber that
        asked for it with the metadata the sender has.
        """
        if wildcard is not None:
            holder, _ = self.connect("holder")
            self.subscribe(holder, wildcard)
        publisher, own = self.connect("alice", peer_metadata=sender_metadata)
        twin, twin_sink = self.connect("alice", peer_metadata=sender_metadata)
        rich, rich_sink = self.connect("bob")
        for session in (publisher, twin):
            self.subscribe(session, "room")
        self.subscribe(rich, "room", includeSenderMetadata=True)
        for sink in (own, twin_sink, rich_sink):
            sink.clear()
        self.publish(publisher, "room", None)
        self.assertEqual(own.decoded, [])
        plain = {"type": "message", "channel": "room", "from": "alice", "data": None}
        self.assertEqual(twin_sink.decoded, [plain])
        rich_frame = plain if sender_metadata is None else {**plain, "fromMetadata": sender_metadata}
        self.assertEqual(rich_sink.decoded, [rich_frame])

    # Delivery takes one of three paths by the app's wildcard subscriptions
    # (none, none matching, some matching), each split by whether the sender
    # carries metadata: every one of the six excludes the publisher.

    def test_excluded_without_wildcards(self) -> None:
        self.assert_publisher_excluded(None, None)

    def test_excluded_without_wildcards_with_metadata(self) -> None:
        self.assert_publisher_excluded(None, {"n": 1})

    def test_excluded_with_wildcards_not_matching(self) -> None:
        self.assert_publisher_excluded("lobby/*", None)

    def test_excluded_with_wildcards_not_matching_with_metadata(self) -> None:
        self.assert_publisher_excluded("lobby/*", {"n": 1})

    def test_excluded_with_a_wildcard_matching(self) -> None:
        self.assert_publisher_excluded("ro*", None)

    def test_excluded_with_a_wildcard_matching_with_metadata(self) -> None:
        self.assert_publisher_excluded("ro*", {"n": 1})

    def test_unsubscribed_hears_nothing(self) -> None:
        """
        After unsubscribing, a connection receives nothing from the channel.
        """
        sub, heard = self.connect("s")
        self.subscribe(sub, "room")
        self.request(sub, type="unsubscribe", channel="room")
        heard.clear()
        pub, _ = self.connect("p")
        self.publish(pub, "room", 1)
        self.assertEqual(heard.decoded, [])

    def test_direct_to_every_connection(self) -> None:
        """
        A send reaches every connection of the target.
        """
        first, one = self.connect("alice")
        second, two = self.connect("alice")
        sender, sink = self.connect("bob")
        self.send(sender, "alice", {"k": "offer"})
        expected = [{"type": "direct", "from": "bob", "data": {"k": "offer"}}]
        self.assertEqual(one.decoded, expected)
        self.assertEqual(two.decoded, expected)
        self.assertIs(one.frames[0], two.frames[0])

    def test_direct_to_self(self) -> None:
        """
        A send to one's own peerId reaches one's other connections only.
        """
        first, one = self.connect("alice")
        second, two = self.connect("alice")
        self.send(first, "alice", 1, requestId="d")
        self.assertEqual(one.decoded, [{"type": "ack", "requestId": "d"}])
        self.assertEqual(two.decoded, [{"type": "direct", "from": "alice", "data": 1}])

    def test_direct_from_metadata(self) -> None:
        """
        A direct always carries the sender's peerMetadata when it has one.
        """
        target, heard = self.connect("b")
        rich, _ = self.connect("a1", peer_metadata={"name": "Ada"})
        plain, _ = self.connect("a2")
        self.send(rich, "b", 1)
        self.send(plain, "b", 2)
        self.assertEqual(
            heard.decoded,
            [
                {"type": "direct", "from": "a1", "data": 1, "fromMetadata": {"name": "Ada"}},
                {"type": "direct", "from": "a2", "data": 2},
            ],
        )

    def test_shared_frames(self) -> None:
        """
        Receivers of one variant share one L{OutboundFrame} object; the
        variant with C{fromMetadata} is another single object.
        """
        sinks = {}
        for name, include in (("p1", False), ("p2", False), ("r1", True), ("r2", True)):
            session, sink = self.connect(name)
            self.subscribe(session, "room", includeSenderMetadata=include)
            sinks[name] = sink
        for sink in sinks.values():
            sink.clear()
        pub, _ = self.connect("pub", peer_metadata={"n": 1})
        self.publish(pub, "room", 1)
        self.assertIs(sinks["p1"].frames[-1], sinks["p2"].frames[-1])
        self.assertIs(sinks["r1"].frames[-1], sinks["r2"].frames[-1])
        self.assertIsNot(sinks["p1"].frames[-1], sinks["r1"].frames[-1])
        self.assertIn("fromMetadata", sinks["r1"].decoded[-1])
        presence = [sink.frames[-1] for sink in sinks.values()]
        self.subscribe(pub, "room")
        deltas = [sink.frames[-1] for sink in sinks.values()]
        self.assertNotIn(deltas[0], presence)
        self.assertEqual({id(frame) for frame in deltas}, {id(deltas[0])})

    def test_sender_fifo(self) -> None:
        """
        Everything one connection causes reaches a receiver in order: the
        C{joined} delta before a following direct, then publishes and
        directs interleaved as sent.
        """
        bob, heard = self.connect("bob")
        self.subscribe(bob, "room")
        heard.clear()
        alice, _ = self.connect("alice")
        self.subscribe(alice, "room")
        self.send(alice, "bob", "d1")
        self.publish(alice, "room", "m1")
        self.send(alice, "bob", "d2")
        self.publish(alice, "room", "m2")
        self.assertEqual(
            [(f["type"], f.get("data")) for f in heard.decoded],
            [("presence", None), ("direct", "d1"), ("message", "m1"), ("direct", "d2"), ("message", "m2")],
        )
        self.assertEqual(heard.decoded[0]["joined"], [{"peerId": "alice"}])


class IsolationTests(HubTestCase):
    """
    Two apps never meet, even with the same channel names and peerIds.
    """

    def test_channels(self) -> None:
        """
        A publish in one app reaches only that app's subscribers, concrete
        and wildcard, and presence stays per app.
        """
        one, one_sink = self.connect("bob", app_id="app_1")
        two, two_sink = self.connect("bob", app_id="app_2")
        wild, wild_sink = self.connect("w", app_id="app_2")
        self.subscribe(one, "room")
        self.subscribe(two, "room")
        self.subscribe(wild, "**")
        self.assertEqual(two_sink.decoded[-1]["joined"], [])
        for sink in (one_sink, two_sink, wild_sink):
            sink.clear()
        pub, _ = self.connect("alice", app_id="app_1")
        self.subscribe(pub, "room")
        self.publish(pub, "room", 1)
        self.assertEqual([f["type"] for f in one_sink.decoded], ["presence", "message"])
        self.assertEqual(two_sink.decoded, [])
        self.assertEqual(wild_sink.decoded, [])

    def test_directs(self) -> None:
        """
        A send reaches the target peerId in the sender's app only.
        """
        one, one_sink = self.connect("bob", app_id="app_1")
        two, two_sink = self.connect("bob", app_id="app_2")
        sender, _ = self.connect("alice", app_id="app_1")
        self.send(sender, "bob", 1)
        self.assertEqual(len(one_sink.decoded), 1)
        self.assertEqual(two_sink.decoded, [])
        lonely, lonely_sink = self.connect("carol", app_id="app_2")
        self.send(lonely, "alice", 1, requestId="r1")
        self.assertError(lonely_sink, "peer_not_found")


class BackendTests(HubTestCase):
    """
    The REST-facing operations: kick and backend publish.
    """

    def test_kick(self) -> None:
        """
        A kick closes every connection of the peer in one app with 4020 and
        reports how many.
        """
        first, one = self.connect("bob")
        second, two = self.connect("bob")
        other_app, three = self.connect("bob", app_id="app_2")
        other_peer, four = self.connect("carol")
        self.assertEqual(self.successResultOf(self.hub.kick("app_1", "bob")), 2)
        self.assertEqual(one.closes, [(CloseCode.ADMIN_DISCONNECT, "admin_disconnect")])
        self.assertEqual(two.closes, [(4020, "admin_disconnect")])
        self.assertEqual(three.closes, [])
        self.assertEqual(four.closes, [])
        self.assertEqual(self.successResultOf(self.hub.kick("app_1", "nobody")), 0)

    def test_publish_from_backend(self) -> None:
        """
        A backend publish reaches every subscriber, with the given sender
        name, and reports the count.
        """
        sinks = []
        for name in ("a", "b"):
            session, sink = self.connect(name)
            self.subscribe(session, "room", includeSenderMetadata=True)
            sink.clear()
            sinks.append(sink)
        wild, wild_sink = self.connect("w")
        self.subscribe(wild, "r*")
        sinks.append(wild_sink)
        delivered = self.successResultOf(
            self.hub.publish_from_backend(self.apps["app_1"], "room", {"t": 1}, "system", None)
        )
        self.assertEqual(delivered, 3)
        for sink in sinks:
            self.assertEqual(
                sink.decoded[-1], {"type": "message", "channel": "room", "from": "system", "data": {"t": 1}}
            )

    def test_publish_from_backend_quota(self) -> None:
        """
        A backend publish counts toward the quota and fails past it.
        """
        self.apps["app_1"] = App("app_1", Plan(max_messages_per_period=1))
        app = self.apps["app_1"]
        self.successResultOf(self.hub.publish_from_backend(app, "room", 1, "system", None))
        failure = self.failureResultOf(self.hub.publish_from_backend(app, "room", 2, "system", None), FrameError)
        self.assertEqual(failure.value.code, "over_message_quota")


class SuspensionTests(HubTestCase):
    """
    Closing the connections of one app: L{Hub.close_app} and
    L{Hub.close_suspended}.
    """

    def test_close_app(self) -> None:
        """
        Every connection of the app is closed with the given code and
        reason, and counted; another app's connections on the same channel
        name are untouched and hear nothing when the closed ones leave.
        """
        alice, alice_sink = self.connect("alice")
        bob, bob_sink = self.connect("bob")
        other, other_sink = self.connect("alice", app_id="app_2")
        for session in (alice, bob, other):
            self.subscribe(session, "room")
        other_sink.clear()
        closed = self.hub.close_app("app_1", CloseCode.ACCOUNT_SUSPENDED, "account_suspended")
        self.assertEqual(closed, 2)
        self.assertEqual(alice_sink.closes, [(4012, "account_suspended")])
        self.assertEqual(bob_sink.closes, [(4012, "account_suspended")])
        # What the adapter does once each WebSocket has closed.
        for session in (alice, bob):
            self.successResultOf(self.hub.disconnect(session))
        self.assertEqual(other_sink.closes, [])
        self.assertEqual(other_sink.frames, [])
        self.assertEqual(list(self.hub.sessions()), [other])
        self.assertEqual(self.successResultOf(self.hub.members("app_1", "room")), [])

    def test_close_app_without_connections(self) -> None:
        """
        Closing an app with no connections here closes nothing.
        """
        _, sink = self.connect("alice", app_id="app_2")
        self.assertEqual(self.hub.close_app("app_1", CloseCode.ACCOUNT_SUSPENDED, "account_suspended"), 0)
        self.assertEqual(sink.closes, [])

    def test_close_suspended(self) -> None:
        """
        Of the changed apps, only those suspended now have their
        connections closed with 4012; unknown ids are ignored.
        """
        _, one = self.connect("alice")
        _, two = self.connect("bob", app_id="app_2")
        self.apps["app_1"] = App("app_1", suspended=True)
        self.assertEqual(self.hub.close_suspended(frozenset({"app_1", "app_2", "gone"})), 1)
        self.assertEqual(one.closes, [(CloseCode.ACCOUNT_SUSPENDED, "account_suspended")])
        self.assertEqual(two.closes, [])

    def test_close_suspended_not_suspended(self) -> None:
        """
        A changed app that is not suspended (a resumed one, say) is left
        alone.
        """
        _, sink = self.connect("alice")
        self.assertEqual(self.hub.close_suspended(frozenset({"app_1"})), 0)
        self.assertEqual(sink.closes, [])


class ConnectionTests(HubTestCase):
    """
    Admission and release of connections.
    """

    def test_unknown_app(self) -> None:
        """
        A grant for an app that no longer exists is refused with 4001.
        """
        failure = self.failureResultOf(self.hub.connect(RecordingSink, make_grant("a", app_id="gone")), Refusal)
        self.assertEqual(failure.value.code, CloseCode.INVALID_TOKEN)

    def test_concurrent_limit(self) -> None:
        """
        Past the plan's connection cap a connection is refused with 4010; a
        disconnect makes room again.
        """
        self.apps["app_1"] = App("app_1", Plan(max_concurrent_connections=1))
        session, _ = self.connect("a")
        failure = self.failureResultOf(self.hub.connect(RecordingSink, make_grant("b")), Refusal)
        self.assertEqual(failure.value.code, CloseCode.OVER_CONCURRENT_LIMIT)
        self.successResultOf(self.hub.disconnect(session))
        self.connect("b")

    def test_unique_ids(self) -> None:
        """
        Each connection gets its own id, handed to its sink.
        """
        one, sink_one = self.connect("a")
        two, sink_two = self.connect("a")
        self.assertNotEqual(one.conn_id, two.conn_id)
        self.assertEqual(sink_one.conn_id, one.conn_id)


class HeldHubTestCase(HubTestCase):
    """
    A hub whose broker, presence and meter answers are held back by
    L{HeldAnswers} while C{self.answers.holding}, as a networked backend's
    could be, so a test can close a connection while a request waits.
    """

    def setUp(self) -> None:
        super().setUp()
        self.answers = HeldAnswers()
        self.held_broker = HeldBroker(MemoryBroker(), self.answers)
        self.held_presence = HeldPresence(MemoryPresence(), self.answers)
        self.hub = Hub(
            self.held_broker, self.held_presence, HeldMeter(self.meter, self.answers), self.apps.get, node_id="n1"
        )

    def start(self, session: Session, **frame: Any) -> Deferred[None]:
        """
        Hand the hub one client frame and return what it returns, which may
        not have fired yet.
        """
        return self.hub.handle(session, parse_frame(json.dumps(frame)))

    def release_all_but(self, name: str) -> None:
        """
        Let every held answer through except those of C{name}, as a backend
        that answers on several connections may.
        """
        while any(pending != name for pending in self.answers.pending):
            self.answers.release(next(pending for pending in self.answers.pending if pending != name))

    def assertNoMembers(self, channel: str = "room") -> None:
        """
        The channel has no members, as presence and REST see it (answers
        are no longer held).
        """
        self.answers.holding = False
        self.assertEqual(self.successResultOf(self.hub.members("app_1", channel)), [])

    def members(self, channel: str = "room") -> list[str]:
        """
        The peerIds of the channel's members (answers are no longer held).
        """
        self.answers.holding = False
        return [member.peer_id for member in self.successResultOf(self.hub.members("app_1", channel))]


class CloseDuringSubscribeTests(HeldHubTestCase):
    """
    A connection that closes while its subscribe waits on the broker or
    presence leaves no member behind, and the others hear of it either not
    at all or as a C{joined} followed by a C{left}: never one without the
    other. The presence announces each change in the step that makes it,
    and carries out one connection's calls in order, so the disconnect
    ends whatever the pending subscribe began.
    """

    def test_during_watch(self) -> None:
        """
        Closed while the channel watch is pending: no member, no delta, and
        the watch is withdrawn.
        """
        session, sink = self.connect("b")
        self.answers.holding = True
        done = self.start(session, type="subscribe", channel="room", requestId="r1")
        self.assertEqual(self.answers.pending, ["watch_channel"])
        closing = self.hub.disconnect(session)
        self.release_all_but("watch_channel")
        self.successResultOf(closing)
        self.answers.release_all()
        self.successResultOf(done)
        self.assertNoMembers()
        self.assertEqual(self.held_broker.watched, set())
        self.assertEqual(sink.decoded, [])
        listener, heard = self.connect("a")
        self.subscribe(listener, "room")
        self.assertEqual([frame["joined"] for frame in heard.of_type("presence")], [[]])

    def test_during_add_member(self) -> None:
        """
        Closed while add_member is pending: the membership is taken back,
        the other members hear its C{joined} then its C{left}, and the
        closed connection gets nothing.
        """
        listener, heard = self.connect("a")
        self.subscribe(listener, "room")
        heard.clear()
        session, sink = self.connect("b")
        self.answers.holding = True
        done = self.start(session, type="subscribe", channel="room", requestId="r1")
        self.assertEqual(self.answers.pending, ["add_member"])
        self.hub.disconnect(session)
        self.answers.release_all()
        self.successResultOf(done)
        self.assertEqual(self.members(), ["a"])
        self.assertEqual(
            heard.decoded,
            [
                {"type": "presence", "channel": "room", "joined": [{"peerId": "b"}], "left": []},
                {"type": "presence", "channel": "room", "joined": [], "left": [{"peerId": "b"}]},
            ],
        )
        self.assertEqual(sink.decoded, [])

    def test_no_ghost(self) -> None:
        """
        Released in the order a networked backend answers, the closed
        connection is not left a member, and every C{joined} the others
        heard is followed by a C{left}.
        """
        listener, heard = self.connect("a")
        self.subscribe(listener, "room")
        heard.clear()
        session, _ = self.connect("b")
        self.answers.holding = True
        done = self.start(session, type="subscribe", channel="room")
        self.hub.disconnect(session)
        while self.answers.pending:
            self.answers.release(self.answers.pending[0])
        self.successResultOf(done)
        self.assertNotIn("b", self.members())
        self.assertEqual(
            [(frame["joined"], frame["left"]) for frame in heard.of_type("presence")],
            [([{"peerId": "b"}], []), ([], [{"peerId": "b"}])],
        )

    def test_repeat_subscribe(self) -> None:
        """
        A repeat subscribe closed while add_member is pending: the member,
        announced by the first subscribe, leaves with C{left}.
        """
        listener, heard = self.connect("a")
        self.subscribe(listener, "room")
        session, _ = self.connect("b")
        self.subscribe(session, "room")
        heard.clear()
        self.answers.holding = True
        done = self.start(session, type="subscribe", channel="room")
        self.assertEqual(self.answers.pending, ["add_member"])
        self.hub.disconnect(session)
        self.answers.release_all()
        self.successResultOf(done)
        self.assertEqual(self.members(), ["a"])
        self.assertEqual(heard.decoded, [{"type": "presence", "channel": "room", "joined": [], "left": [{"peerId": "b"}]}])

    def test_other_connection_joined_meanwhile(self) -> None:
        """
        When another connection of the same peer joined while the closed
        one's join was pending, counting on its C{joined}, the others are
        still told.
        """
        listener, heard = self.connect("a")
        self.subscribe(listener, "room")
        heard.clear()
        closing, _ = self.connect("b")
        staying, _ = self.connect("b")
        self.answers.holding = True
        first = self.start(closing, type="subscribe", channel="room")
        second = self.start(staying, type="subscribe", channel="room")
        self.answers.release("add_member")  # the closing connection's: first
        self.hub.disconnect(closing)
        self.answers.release_all()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.members(), ["a", "b"])
        self.assertEqual(heard.decoded, [{"type": "presence", "channel": "room", "joined": [{"peerId": "b"}], "left": []}])

    def test_wildcard_during_watch(self) -> None:
        """
        A wildcard subscribe closed while its pattern watch is pending
        leaves the pattern unwatched.
        """
        session, _ = self.connect("b")
        self.answers.holding = True
        done = self.start(session, type="subscribe", channel="room/*")
        closing = self.hub.disconnect(session)
        self.release_all_but("watch_pattern")
        self.successResultOf(closing)
        self.answers.release_all()
        self.successResultOf(done)
        self.assertEqual(self.held_broker.watched, set())
        self.answers.holding = False
        publisher, _ = self.connect("p")
        self.publish(publisher, "room/x", 1)
        self.assertEqual(session.sink.decoded, [])  # type: ignore[attr-defined]

    def test_during_unsubscribe(self) -> None:
        """
        Closed while an unsubscribe waits: the unsubscribe still finishes,
        with C{left}, and no ack goes out.
        """
        listener, heard = self.connect("a")
        self.subscribe(listener, "room")
        session, sink = self.connect("b")
        self.subscribe(session, "room")
        heard.clear()
        sink.clear()
        self.answers.holding = True
        done = self.start(session, type="unsubscribe", channel="room", requestId="r1")
        self.assertEqual(self.answers.pending, ["remove_member"])
        self.hub.disconnect(session)
        self.answers.release_all()
        self.successResultOf(done)
        self.assertEqual(self.members(), ["a"])
        self.assertEqual(heard.decoded, [{"type": "presence", "channel": "room", "joined": [], "left": [{"peerId": "b"}]}])
        self.assertEqual(sink.decoded, [])


class BackendUnavailableTests(HubTestCase):
    """
    When a seam cannot reach shared state, the request answers
    C{backend_error} with the reason and leaves nothing half done.
    """

    def test_subscribe(self) -> None:
        """
        A subscribe whose membership cannot be recorded is refused and its
        subscription and watch are withdrawn.
        """
        broker = HeldBroker(MemoryBroker(), HeldAnswers())
        self.hub = Hub(broker, self.presence, self.meter, self.apps.get, node_id="n1")

        def unreachable(*args: Any, **kwargs: Any) -> Deferred[Any]:
            return fail(BackendUnavailable("presence is shared through Redis, which is unreachable"))

        self.presence.add_member = unreachable  # type: ignore[method-assign]
        session, sink = self.connect("a")
        self.subscribe(session, "room", requestId="r1")
        self.assertError(sink, "backend_error")
        self.assertIn("Redis", sink.decoded[0]["message"])
        self.assertEqual(session.subscriptions, {})
        self.assertEqual(broker.watched, {("peer", "app_1", "a")})


    def test_send_failed_at_once(self) -> None:
        """
        A send whose broker answers with a Deferred that has already
        failed is answered C{backend_error}, as one that fails later.
        """

        def unreachable(*args: Any) -> Deferred[Any]:
            return fail(BackendUnavailable("routing goes through Redis, which is unreachable"))

        self.broker.direct = unreachable  # type: ignore[method-assign]
        session, sink = self.connect("a")
        self.connect("b")
        self.send(session, "b", 1, requestId="r1")
        self.assertError(sink, "backend_error")


    def test_counted_and_logged_sparingly(self) -> None:
        """
        Every C{backend_error} is counted in the metrics, but an outage
        answered to a busy app does not write a log line per frame: the
        first failure is logged, then one line per
        L{BACKEND_ERROR_LOG_EVERY} with the count so far.
        """

        def unreachable(*args: Any) -> Deferred[Any]:
            return fail(BackendUnavailable("routing goes through Redis, which is unreachable"))

        self.broker.direct = unreachable  # type: ignore[method-assign]
        session, sink = self.connect("a")
        self.connect("b")
        observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        sends = BACKEND_ERROR_LOG_EVERY * 2 + 1
        for n in range(sends):
            self.send(session, "b", n)
        self.assertEqual(len(sink.of_type("error")), sends)
        self.assertEqual(self.hub.metrics.errors["backend_error"], sends)
        warnings = [e for e in observed if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["count"] for e in warnings], [1, BACKEND_ERROR_LOG_EVERY, BACKEND_ERROR_LOG_EVERY * 2])


class SendStepsTests(HeldHubTestCase):
    """
    A send runs without a coroutine while the meter and the broker answer
    at once, and carries on from whichever seam has to wait; each way it
    delivers, acks and refuses alike.
    """

    def test_at_once(self) -> None:
        """
        With every seam answering at once the send is done when
        L{Hub.handle} returns: delivered, acked, counted.
        """
        session, sink = self.connect("a")
        _, heard = self.connect("b")
        heard.clear()
        done = self.start(session, type="send", to="b", data=1, requestId="r1")
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(heard.decoded, [{"type": "direct", "from": "a", "data": 1}])
        self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "r1"}])
        self.assertEqual(self.hub.metrics.deliveries[2], 1)

    def test_count_waits(self) -> None:
        """
        When the meter's answer waits, nothing is routed until it comes;
        then the send goes on to the broker, and the ack follows its answer.
        """
        session, sink = self.connect("a")
        _, heard = self.connect("b")
        heard.clear()
        self.answers.holding = True
        done = self.start(session, type="send", to="b", data=1, requestId="r1")
        self.assertEqual(self.answers.pending, ["count_message"])
        self.assertNoResult(done)
        self.assertEqual(heard.decoded, [])
        self.answers.release("count_message")
        self.assertEqual(self.answers.pending, ["direct"])
        self.assertEqual(heard.decoded, [{"type": "direct", "from": "a", "data": 1}])
        self.assertEqual(sink.decoded, [])
        self.answers.release("direct")
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "r1"}])

    def test_count_waits_then_refuses(self) -> None:
        """
        A refusal that comes late is answered as one that comes at once:
        C{over_message_quota} for a present peer, nothing delivered.
        """
        self.apps["app_1"] = App("app_1", Plan(max_messages_per_period=0))
        session, sink = self.connect("a")
        _, heard = self.connect("b")
        heard.clear()
        self.answers.holding = True
        done = self.start(session, type="send", to="b", data=1, requestId="r1")
        self.answers.release("count_message")
        self.answers.release("connections_of")
        self.assertIsNone(self.successResultOf(done))
        self.assertError(sink, "over_message_quota")
        self.assertEqual(heard.decoded, [])

    def test_refused_at_once(self) -> None:
        """
        Over quota with every seam answering at once, the refusal still
        looks the peer up: C{over_message_quota} for a present peer,
        C{peer_not_found} for an absent one.
        """
        self.apps["app_1"] = App("app_1", Plan(max_messages_per_period=0))
        session, sink = self.connect("a")
        self.connect("b")
        self.successResultOf(self.start(session, type="send", to="b", data=1, requestId="r1"))
        self.assertError(sink, "over_message_quota")
        sink.clear()
        self.successResultOf(self.start(session, type="send", to="c", data=1, requestId="r1"))
        self.assertError(sink, "peer_not_found")

    def test_unknown_app(self) -> None:
        """
        A send from an app that is gone is refused like one over quota.
        """
        session, sink = self.connect("a")
        self.connect("b")
        del self.apps["app_1"]
        self.successResultOf(self.start(session, type="send", to="b", data=1, requestId="r1"))
        self.assertError(sink, "over_message_quota")

    def test_route_waits_then_finds_nobody(self) -> None:
        """
        A broker that answers later that it reached nobody gets the sender
        C{peer_not_found}, as an immediate answer does.
        """
        session, sink = self.connect("a")
        self.answers.holding = True
        done = self.start(session, type="send", to="nobody", data=1, requestId="r1")
        self.answers.release("count_message")
        self.assertNoResult(done)
        self.answers.release("direct")
        self.assertIsNone(self.successResultOf(done))
        self.assertError(sink, "peer_not_found")

    def test_nobody_at_once(self) -> None:
        """
        An immediate answer that nobody was reached is C{peer_not_found}.
        """
        session, sink = self.connect("a")
        self.successResultOf(self.start(session, type="send", to="nobody", data=1, requestId="r1"))
        self.assertError(sink, "peer_not_found")

    def test_not_permitted(self) -> None:
        """
        A connection without the C{send} action is refused before anything
        is counted.
        """
        session, sink = self.connect("a", actions=frozenset({"subscribe"}))
        self.connect("b")
        self.successResultOf(self.start(session, type="send", to="b", data=1, requestId="r1"))
        self.assertError(sink, "action_not_permitted")
        self.assertEqual(self.hub.metrics.deliveries[2], 0)

    def test_bug_at_once(self) -> None:
        """
        A seam that raises at once is logged and answered C{internal_error}.
        """

        def broken(*args: Any) -> Deferred[int]:
            raise ValueError("a bug")

        self.held_broker.direct = broken  # type: ignore[method-assign]
        session, sink = self.connect("a")
        self.successResultOf(self.start(session, type="send", to="b", data=1, requestId="r1"))
        self.assertError(sink, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_bug_later(self) -> None:
        """
        A seam that fails after waiting is logged and answered
        C{internal_error} too.
        """
        waiting: Deferred[int] = Deferred()
        self.held_broker.direct = lambda *args: waiting  # type: ignore[method-assign]
        session, sink = self.connect("a")
        done = self.start(session, type="send", to="b", data=1, requestId="r1")
        self.assertNoResult(done)
        waiting.errback(ValueError("a bug"))
        self.assertIsNone(self.successResultOf(done))
        self.assertError(sink, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_backend_later(self) -> None:
        """
        A broker that fails unreachable after waiting is C{backend_error}.
        """
        waiting: Deferred[int] = Deferred()
        self.held_broker.direct = lambda *args: waiting  # type: ignore[method-assign]
        session, sink = self.connect("a")
        done = self.start(session, type="send", to="b", data=1, requestId="r1")
        waiting.errback(BackendUnavailable("Redis is unreachable"))
        self.assertIsNone(self.successResultOf(done))
        self.assertError(sink, "backend_error")

    def test_not_an_exception(self) -> None:
        """
        What is not an C{Exception} (a cancellation, an exit) is not
        answered but handed back, as from any request.
        """

        def leaving(*args: Any) -> Deferred[int]:
            raise KeyboardInterrupt()

        self.held_broker.direct = leaving  # type: ignore[method-assign]
        session, sink = self.connect("a")
        self.failureResultOf(self.start(session, type="send", to="b", data=1), KeyboardInterrupt)
        self.assertEqual(sink.decoded, [])


class WatchInFlightTests(HeldHubTestCase):
    """
    A subscribe that joins a channel or pattern whose watch by the broker
    is still on its way waits for it before going on: until then the node
    would miss what is published after the ack.
    """

    def test_channel(self) -> None:
        """
        The second subscriber of a channel is acked only once the first
        one's watch is confirmed.
        """
        first, _ = self.connect("a")
        second, sink = self.connect("b")
        self.answers.holding = True
        one = self.start(first, type="subscribe", channel="room", requestId="r1")
        two = self.start(second, type="subscribe", channel="room", requestId="r2")
        self.assertEqual(self.answers.pending, ["watch_channel"])
        self.assertEqual(sink.decoded, [])
        self.answers.release("watch_channel")
        self.answers.release_all()
        self.successResultOf(one)
        self.successResultOf(two)
        self.assertEqual(sink.of_type("ack"), [{"type": "ack", "requestId": "r2"}])

    def test_pattern(self) -> None:
        """
        The same holds for a wildcard pattern.
        """
        first, _ = self.connect("a")
        second, sink = self.connect("b")
        self.answers.holding = True
        one = self.start(first, type="subscribe", channel="room/*", requestId="r1")
        two = self.start(second, type="subscribe", channel="room/*", requestId="r2")
        self.assertNoResult(two)
        self.assertEqual(sink.decoded, [])
        self.answers.release_all()
        self.successResultOf(one)
        self.successResultOf(two)
        self.assertEqual(sink.decoded, [{"type": "ack", "requestId": "r2"}])


class HeldPresenceOrderTests(HeldHubTestCase):
    """
    Presence deltas that arrive while a subscriber's snapshot is assembled
    are held back until after it (§10.2).
    """

    def test_delta_after_snapshot(self) -> None:
        """
        A C{joined} delivered while the snapshot is pending reaches the
        subscriber after its ack and its snapshot, in that order.
        """
        member, _ = self.connect("a")
        self.subscribe(member, "room")
        session, sink = self.connect("b")
        newcomer, _ = self.connect("c")
        self.answers.holding = True
        done = self.start(session, type="subscribe", channel="room", requestId="r1")
        self.assertEqual(self.answers.pending, ["add_member"])
        joining = self.start(newcomer, type="subscribe", channel="room")
        self.assertEqual(sink.decoded, [])  # c's joined is announced at once, and held
        self.answers.release("add_member")  # b's
        self.answers.release_all()
        self.successResultOf(done)
        self.successResultOf(joining)
        self.assertEqual(
            sink.decoded,
            [
                {"type": "ack", "requestId": "r1"},
                {"type": "presence", "channel": "room", "joined": [{"peerId": "a"}], "left": []},
                {"type": "presence", "channel": "room", "joined": [{"peerId": "c"}], "left": []},
            ],
        )

    def test_closed_before_snapshot_gets_nothing(self) -> None:
        """
        Deltas held for a subscriber that closes before its snapshot are
        dropped with it.
        """
        session, sink = self.connect("b")
        newcomer, _ = self.connect("c")
        self.answers.holding = True
        done = self.start(session, type="subscribe", channel="room", requestId="r1")
        self.answers.release("watch_channel")
        joining = self.start(newcomer, type="subscribe", channel="room")
        self.assertEqual(self.answers.pending, ["add_member", "add_member"])  # c's joined is held for b
        self.hub.disconnect(session)
        self.answers.release_all()
        self.successResultOf(done)
        self.successResultOf(joining)
        self.assertEqual(sink.decoded, [])
        self.assertEqual(self.members(), ["c"])


class CloseDuringAdmissionTests(HeldHubTestCase):
    """
    A connection that closes while it is being admitted is not left in the
    hub, and its count is released.
    """

    def setUp(self) -> None:
        super().setUp()
        self.apps["app_1"] = App("app_1", Plan(max_concurrent_connections=1))

    def assertReleased(self) -> None:
        """
        No session, peer or watch is left, and the app's one connection slot
        is free again (answers are no longer held).
        """
        self.answers.holding = False
        self.assertEqual(self.hub.connection_count, 0)
        self.assertEqual(self.hub.sessions(), [])
        self.assertEqual(self.successResultOf(self.held_presence.connections_of("app_1", "a")), frozenset())
        self.assertEqual(self.held_broker.watched, set())
        self.answers.holding = False
        session, _ = self.connect("b")
        self.successResultOf(self.hub.disconnect(session))

    def test_during_meter(self) -> None:
        """
        Closed while the meter decides: once admitted, the adapter
        disconnects the session it is handed, and everything is released.
        """
        self.answers.holding = True
        connecting = self.hub.connect(RecordingSink, make_grant("a"))
        self.assertEqual(self.answers.pending, ["admit_connection"])
        self.answers.release_all()
        session = self.successResultOf(connecting)
        self.answers.holding = False
        self.successResultOf(self.hub.disconnect(session))
        self.assertReleased()

    def test_during_presence(self) -> None:
        """
        Disconnected while the peer directory records it: admission stops
        short of watching the peer, and everything is released.
        """
        self.answers.holding = True
        connecting = self.hub.connect(RecordingSink, make_grant("a"))
        self.answers.release("admit_connection")
        self.assertEqual(self.answers.pending, ["add_connection"])
        [session] = self.hub.sessions()
        closing = self.hub.disconnect(session)
        self.release_all_but("add_connection")
        self.successResultOf(closing)
        self.answers.release_all()
        self.assertIs(self.successResultOf(connecting), session)
        self.assertTrue(session.closed)
        self.assertReleased()
        self.successResultOf(self.hub.disconnect(session))
        self.assertReleased()

    def test_during_watch(self) -> None:
        """
        Disconnected while the peer watch is pending: the watch is withdrawn.
        """
        self.answers.holding = True
        connecting = self.hub.connect(RecordingSink, make_grant("a"))
        self.answers.release("admit_connection")
        self.answers.release("add_connection")
        self.assertEqual(self.answers.pending, ["watch_peer"])
        [session] = self.hub.sessions()
        self.hub.disconnect(session)
        self.answers.release_all()
        self.assertIs(self.successResultOf(connecting), session)
        self.assertReleased()

    def test_failure_after_admission(self) -> None:
        """
        If the peer directory fails after the meter admitted the connection,
        the connection fails and leaves nothing counted or indexed.
        """
        self.answers.holding = True
        connecting = self.hub.connect(RecordingSink, make_grant("a"))
        self.answers.release("admit_connection")
        self.answers.fail("add_connection", ConnectionError("presence store down"))
        self.answers.release_all()
        self.failureResultOf(connecting, ConnectionError)
        self.assertReleased()


class StartTests(SynchronousTestCase):
    """
    L{meteredrt.hub._start} gives what C{ensureDeferred} gives.
    """

    def test_finished_at_once(self) -> None:
        """
        A coroutine that never suspends gives a fired Deferred with its
        result.
        """

        async def answer() -> int:
            return await succeed(41) + 1

        self.assertEqual(self.successResultOf(_start(answer())), 42)

    def test_fails_at_once(self) -> None:
        """
        A coroutine that raises in its first step gives a failed Deferred.
        """

        async def broken() -> None:
            raise ValueError("no")

        self.failureResultOf(_start(broken()), ValueError)

    def test_suspends(self) -> None:
        """
        A coroutine that waits is resumed with each result in turn, has
        failures thrown into it, and fires the Deferred when it returns.
        """
        first: Deferred[int] = Deferred()
        second: Deferred[int] = Deferred()
        seen: list[object] = []

        async def waits() -> str:
            seen.append(await first)
            try:
                await second
            except KeyError as e:
                seen.append(e.args)
            seen.append(await succeed(3))
            return "done"

        result = _start(waits())
        self.assertNoResult(result)
        first.callback(1)
        self.assertEqual(seen, [1])
        self.assertNoResult(result)
        second.errback(KeyError("k"))
        self.assertEqual(seen, [1, ("k",), 3])
        self.assertEqual(self.successResultOf(result), "done")

    def test_fails_after_suspending(self) -> None:
        """
        A failure the coroutine does not catch fails the Deferred.
        """
        waited: Deferred[int] = Deferred()

        async def waits() -> int:
            return await waited

        result = _start(waits())
        waited.errback(ValueError("late"))
        self.failureResultOf(result, ValueError)


class FiredTests(SynchronousTestCase):
    """
    L{meteredrt.hub._fired} gives what C{await} would give at once, and
    leaves everything else to C{await}.
    """

    def test_value(self) -> None:
        """
        A Deferred that has fired gives its value, C{None} included.
        """
        self.assertEqual(_fired(succeed(7)), 7)
        self.assertIsNone(_fired(succeed(None)))

    def test_waiting(self) -> None:
        """
        A Deferred without a result, or one paused waiting on another,
        is pending.
        """
        self.assertIs(_fired(Deferred()), _PENDING)
        inner: Deferred[int] = Deferred()
        outer = succeed(1)
        outer.addCallback(lambda _: inner)
        self.assertIs(_fired(outer), _PENDING)
        inner.callback(2)
        self.assertEqual(_fired(outer), 2)

    def test_failure(self) -> None:
        """
        A failed Deferred is pending, and keeps its failure for C{await}
        to raise.
        """
        failed: Deferred[int] = fail(ValueError("no"))
        self.assertIs(_fired(failed), _PENDING)
        self.failureResultOf(failed, ValueError)
