"""
Channel endpoints for backends: who is in a channel (§19.3) and publishing
into one (§19.4).

L{ChannelsResource} serves C{/v1/channels/{channel}/peers} and
C{/v1/channels/{channel}/publish}. The channel is everything between
C{/v1/channels/} and the final C{/peers} or C{/publish}: the raw path is
split on C{/} before each segment is percent-decoded, so an encoded C{%2F}
stays inside the name and the unencoded form printed in the docs works too.
Checks run in the protocol's validation order: shapes, reserved prefix,
action, channel authorization, then quota.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meteredrt.apps import Key
from meteredrt.auth import MAX_PEER_METADATA_BYTES
from meteredrt.globs import matches_any
from meteredrt.hub import Hub
from meteredrt.protocol import (
    ErrorCode,
    FrameError,
    concrete_channel_error,
    is_valid_peer_id,
    json_size,
    presence_entry,
)
from meteredrt.rest.base import ApiError, Call, JsonResource, RequestGuard, Route, decode_param, invalid

PEERS_PATH = "/v1/channels/{channel}/peers"
PUBLISH_PATH = "/v1/channels/{channel}/publish"

#: What C{message.from} says when the backend does not choose one.
DEFAULT_SENDER = "system"

ROUTES = (
    Route(
        "GET",
        PEERS_PATH,
        "listChannelPeers",
        "List the peers present in a concrete channel, one entry per peerId",
        handler="peers",
        response_schema="PeersResponse",
        errors=(400, 401, 403, 429, 503),
    ),
    Route(
        "POST",
        PUBLISH_PATH,
        "publishToChannel",
        "Publish a message to a concrete channel on behalf of the backend",
        handler="publish",
        request_schema="PublishRequest",
        response_schema="PublishResponse",
        errors=(400, 401, 403, 413, 429, 503),
    ),
)

_OPERATIONS = {b"peers": PEERS_PATH, b"publish": PUBLISH_PATH}


def _checked_channel(call: Call) -> str:
    channel = decode_param(call.params["channel"], "channel")
    problem = concrete_channel_error(channel)
    if problem is not None and problem[0] != ErrorCode.CHANNEL_RESERVED:
        raise invalid(f"channel: {problem[1]}")
    return channel


def _authorize(key: Key, channel: str, action: str) -> None:
    problem = concrete_channel_error(channel)
    if problem is not None:
        raise ApiError(400, ErrorCode.CHANNEL_RESERVED, f"{problem[1]}: {channel}")
    if action not in key.actions:
        raise ApiError(403, ErrorCode.ACTION_NOT_PERMITTED, f"the key lacks the {action} action")
    if not matches_any(key.channel_patterns, channel):
        raise ApiError(
            403, ErrorCode.CHANNEL_NOT_AUTHORIZED, f"channel outside the key's patterns: {channel}"
        )


class ChannelsResource(JsonResource):
    """
    C{/v1/channels/…}.
    """

    routes = ROUTES

    def __init__(self, guard: RequestGuard, hub: Hub) -> None:
        super().__init__(guard)
        self._hub = hub

    def locate(self, postpath: list[bytes]) -> tuple[str, dict[str, bytes]] | None:
        if len(postpath) < 2 or postpath[-1] not in _OPERATIONS:
            return None
        return _OPERATIONS[postpath[-1]], {"channel": b"/".join(postpath[:-1])}

    async def peers(self, call: Call) -> Mapping[str, Any]:
        """
        The channel's members in the presence-entry shape (§19.3), one entry per peerId.
        """
        channel = _checked_channel(call)
        _authorize(call.key, channel, "presence")
        members = await self._hub.members(call.app.app_id, channel)
        return {"channel": channel, "peers": [presence_entry(m.peer_id, m.metadata) for m in members]}

    async def publish(self, call: Call) -> Mapping[str, Any]:
        """
        Publish like a WebSocket C{publish}, counted as one message (§19.4).
        """
        channel = _checked_channel(call)
        body = call.body or {}
        if "data" not in body:
            raise invalid("data: required (null is allowed)")
        sender = body.get("from", DEFAULT_SENDER)
        if not is_valid_peer_id(sender):
            raise invalid("from: must be printable ASCII, 1-128 characters")
        sender_metadata = body.get("peerMetadata")
        if sender_metadata is not None:
            if not isinstance(sender_metadata, dict):
                raise invalid("peerMetadata: must be a JSON object")
            if json_size(sender_metadata) > MAX_PEER_METADATA_BYTES:
                raise invalid(f"peerMetadata: larger than {MAX_PEER_METADATA_BYTES} bytes serialized")
        _authorize(call.key, channel, "publish")
        try:
            delivered = await self._hub.publish_from_backend(
                call.app, channel, body["data"], sender, sender_metadata or None
            )
        except FrameError as e:
            if e.code != ErrorCode.OVER_MESSAGE_QUOTA:
                raise
            raise ApiError(403, ErrorCode.OVER_MESSAGE_QUOTA, e.message) from None
        return {"channel": channel, "delivered": delivered}
