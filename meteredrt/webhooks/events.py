"""
What a presence webhook says: event types and the JSON shape of an event
and of a batch.

Pure values and functions; no I/O, no clock (C{now} is an argument).

Main names: L{WebhookEvent}, L{new_event}, L{new_event_id}, L{batch_body}; the per-app
configuration is L{meteredrt.apps.WebhookConfig}.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from attrs import frozen

from meteredrt.apps import WEBHOOK_EVENTS

PEER_ONLINE = "peer.online"
PEER_OFFLINE = "peer.offline"
CHANNEL_OCCUPIED = "channel.occupied"
CHANNEL_VACATED = "channel.vacated"
PRESENCE_JOINED = "presence.joined"
PRESENCE_LEFT = "presence.left"

#: Every event type an app may subscribe to, in documentation order.
EVENT_TYPES: tuple[str, ...] = WEBHOOK_EVENTS

#: At most this many events go in one POST.
MAX_BATCH_EVENTS = 100


@frozen
class WebhookEvent:
    """
    One event, as stored in the outbox and sent to the backend.

    @ivar event_id: stable across retries and replays, so the backend can
        de-duplicate (delivery is at least once).
    @ivar timestamp_ms: when the transition happened (Unix milliseconds),
        not when it was sent.
    """

    event_id: str
    type: str
    app_id: str
    timestamp_ms: int
    peer_id: str | None = None
    channel: str | None = None
    metadata: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """
        The event's JSON object in a batch.
        """
        return {
            "id": self.event_id,
            "type": self.type,
            "app": self.app_id,
            "peerId": self.peer_id,
            "channel": self.channel,
            "metadata": self.metadata,
            "timestamp": self.timestamp_ms,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> WebhookEvent:
        """
        Read back what L{to_json} wrote (the outbox stores that text).
        """
        return cls(
            event_id=value["id"],
            type=value["type"],
            app_id=value["app"],
            timestamp_ms=value["timestamp"],
            peer_id=value["peerId"],
            channel=value["channel"],
            metadata=value["metadata"],
        )


def new_event_id() -> str:
    """
    A fresh random event id.
    """
    return f"evt_{uuid.uuid4().hex}"


def new_event(
    event_type: str,
    app_id: str,
    now: float,
    *,
    peer_id: str | None = None,
    channel: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> WebhookEvent:
    """
    A fresh event with a random id, stamped at C{now} (Unix seconds).
    """
    return WebhookEvent(
        event_id=new_event_id(),
        type=event_type,
        app_id=app_id,
        timestamp_ms=int(now * 1000),
        peer_id=peer_id,
        channel=channel,
        metadata=metadata,
    )


def batch_body(app_id: str, events: list[WebhookEvent]) -> bytes:
    """
    The exact bytes POSTed for one batch; the signature covers them.
    """
    document = {"app": app_id, "events": [event.to_json() for event in events]}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
