"""
Tests for what L{meteredrt.presence.memory.MemoryPresence} tells its
L{IPresenceObserver} as the hub drives it, and for the hub and
L{WebhookEmitter} together.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from meteredrt.apps import WebhookConfig
from meteredrt.hub import Hub
from meteredrt.interfaces import IPresenceObserver
from meteredrt.presence.memory import MemoryPresence
from meteredrt.webhooks.emitter import WebhookEmitter
from meteredrt.webhooks.outbox import MemoryOutbox
from tests.test_hub import HubTestCase


@implementer(IPresenceObserver)
class RecordingObserver:
    """
    Keeps every call, in order.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def peer_connected(self, app_id: str, peer_id: str) -> None:
        self.calls.append(("connected", app_id, peer_id))

    def peer_disconnected(self, app_id: str, peer_id: str) -> None:
        self.calls.append(("disconnected", app_id, peer_id))

    def member_joined(self, app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        self.calls.append(("joined", app_id, channel, peer_id, metadata))

    def member_left(self, app_id: str, channel: str, peer_id: str, metadata: dict[str, Any] | None) -> None:
        self.calls.append(("left", app_id, channel, peer_id, metadata))

    def channel_occupied(self, app_id: str, channel: str) -> None:
        self.calls.append(("occupied", app_id, channel))

    def channel_vacated(self, app_id: str, channel: str) -> None:
        self.calls.append(("vacated", app_id, channel))


class HubObserverTests(HubTestCase):
    """
    Presence reports a peer's first and last connection and the presence
    deltas it announces, and nothing else.
    """

    def setUp(self) -> None:
        super().setUp()
        self.observer = RecordingObserver()
        self.presence = MemoryPresence(observer=self.observer)
        self.hub = Hub(self.broker, self.presence, self.meter, self.apps.get, node_id="n1")

    def test_first_and_last_connection(self) -> None:
        """
        Only a peer's first connection and its last close are reported.
        """
        one, _ = self.connect("alice")
        two, _ = self.connect("alice")
        self.successResultOf(self.hub.disconnect(one))
        self.assertEqual(self.observer.calls, [("connected", "app_1", "alice")])
        self.successResultOf(self.hub.disconnect(two))
        self.assertEqual(self.observer.calls[-1], ("disconnected", "app_1", "alice"))
        self.successResultOf(self.hub.disconnect(two))
        self.assertEqual(len(self.observer.calls), 2)

    def test_members(self) -> None:
        """
        A peer's first concrete subscription is a join with its metadata,
        its last one leaving (unsubscribe or close) is a leave; wildcard
        subscriptions are no membership.
        """
        one, _ = self.connect("alice", peer_metadata={"name": "A"})
        two, _ = self.connect("alice", peer_metadata={"name": "A"})
        self.subscribe(one, "room")
        self.subscribe(two, "room")
        self.request(one, type="unsubscribe", channel="room")
        self.successResultOf(self.hub.disconnect(two))
        members = [call for call in self.observer.calls if call[0] in ("joined", "left")]
        self.assertEqual(
            members,
            [("joined", "app_1", "room", "alice", {"name": "A"}), ("left", "app_1", "room", "alice", {"name": "A"})],
        )

    def test_wildcards_are_not_members(self) -> None:
        """
        A wildcard subscription reports nothing.
        """
        session, _ = self.connect("alice")
        self.subscribe(session, "room/*")
        self.successResultOf(self.hub.disconnect(session))
        self.assertEqual([call[0] for call in self.observer.calls], ["connected", "disconnected"])

    def test_close_leaves_channels(self) -> None:
        """
        A close reports a leave for every channel the peer leaves (each
        channel vacated after its last member's leave), then the disconnect;
        a channel is occupied before its first member's join.
        """
        session, _ = self.connect("bob")
        self.subscribe(session, "a")
        self.subscribe(session, "b")
        self.successResultOf(self.hub.disconnect(session))
        self.assertEqual(
            [call[0:3] for call in self.observer.calls],
            [("connected", "app_1", "bob"), ("occupied", "app_1", "a"), ("joined", "app_1", "a"),
             ("occupied", "app_1", "b"), ("joined", "app_1", "b"),
             ("left", "app_1", "a"), ("vacated", "app_1", "a"), ("left", "app_1", "b"), ("vacated", "app_1", "b"),
             ("disconnected", "app_1", "bob")],
        )

    def test_channel_occupied_once(self) -> None:
        """
        A second member neither occupies the channel again nor vacates it
        when it leaves first.
        """
        one, _ = self.connect("alice")
        two, _ = self.connect("bob")
        self.subscribe(one, "room")
        self.subscribe(two, "room")
        self.request(one, type="unsubscribe", channel="room")
        self.assertEqual(
            [call[0] for call in self.observer.calls if call[0] in ("occupied", "vacated")], ["occupied"]
        )
        self.request(two, type="unsubscribe", channel="room")
        self.assertEqual(self.observer.calls[-1], ("vacated", "app_1", "room"))


class HubWebhookTests(HubTestCase):
    """
    The hub feeding a real emitter: what a backend would be sent.
    """

    def setUp(self) -> None:
        super().setUp()
        self.outbox = MemoryOutbox()
        config = WebhookConfig(url="http://127.0.0.1:1/", secret="s" * 32, offline_grace_seconds=3)
        self.emitter = WebhookEmitter({"app_1": config}.get, self.outbox, self.clock, on_stored=lambda app: None)
        self.emitter.startService()
        self.presence = MemoryPresence(observer=self.emitter)
        self.hub = Hub(self.broker, self.presence, self.meter, self.apps.get, node_id="n1")

    def sent(self) -> list[tuple[str, str | None, str | None]]:
        batch = self.successResultOf(self.outbox.next_batch("app_1", 100))
        return [(s.event.type, s.event.peer_id, s.event.channel) for s in batch]

    def test_reload_sends_nothing(self) -> None:
        """
        A page reload (close, reconnect, resubscribe inside the grace)
        sends only the presence deltas the other members saw.
        """
        first, _ = self.connect("alice")
        self.subscribe(first, "room")
        self.successResultOf(self.hub.disconnect(first))
        self.clock.advance(1)
        second, _ = self.connect("alice")
        self.subscribe(second, "room")
        self.clock.advance(10)
        self.assertEqual(
            self.sent(),
            [("peer.online", "alice", None), ("channel.occupied", None, "room"), ("presence.joined", "alice", "room"),
             ("presence.left", "alice", "room"), ("presence.joined", "alice", "room")],
        )

    def test_close_sends_one_offline(self) -> None:
        """
        A close sends exactly one C{peer.offline}, after the grace, even
        with two connections closing.
        """
        one, _ = self.connect("alice")
        two, _ = self.connect("alice")
        self.successResultOf(self.hub.disconnect(one))
        self.successResultOf(self.hub.disconnect(two))
        self.clock.advance(3)
        self.assertEqual(self.sent(), [("peer.online", "alice", None), ("peer.offline", "alice", None)])
