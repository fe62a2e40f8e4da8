"""
C{DELETE /v1/peers/{peerId}}: disconnect a peer (§19.5).

L{PeersResource} closes every connection of the peer in the caller's app
with 4020 and reports how many; other apps' peers of the same id are
untouched, and C{0} is a success.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meteredrt.hub import Hub
from meteredrt.protocol import is_valid_peer_id
from meteredrt.rest.base import Call, JsonResource, RequestGuard, Route, decode_param, invalid

ROUTES = (
    Route(
        "DELETE",
        "/v1/peers/{peerId}",
        "kickPeer",
        "Close every connection of a peer in the key's app with close code 4020",
        handler="kick",
        response_schema="KickResponse",
        errors=(400, 401, 429, 503),
    ),
)


class PeersResource(JsonResource):
    """
    C{/v1/peers/…}.
    """

    routes = ROUTES

    def __init__(self, guard: RequestGuard, hub: Hub) -> None:
        super().__init__(guard)
        self._hub = hub

    def locate(self, postpath: list[bytes]) -> tuple[str, dict[str, bytes]] | None:
        # A peerId may hold '/'; like a channel, it may arrive encoded or not.
        if not postpath:
            return None
        return "/v1/peers/{peerId}", {"peerId": b"/".join(postpath)}

    async def kick(self, call: Call) -> Mapping[str, Any]:
        """
        Kick the peer; answer how many connections were closed.
        """
        peer_id = decode_param(call.params["peerId"], "peerId")
        if not is_valid_peer_id(peer_id):
            raise invalid("peerId: must be printable ASCII, 1-128 characters")
        closed = await self._hub.kick(call.app.app_id, peer_id)
        return {"peerId": peer_id, "closed": closed}
