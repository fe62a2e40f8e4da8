"""
C{POST /v1/tokens}: mint a connect token for a backend (§19.2).

L{TokensResource} checks the JSON shapes of the request and leaves every
claim rule (caps, the key's patterns and actions) to
L{meteredrt.auth.mint_token}, so the REST endpoint and the CLI mint exactly
the same JWT.

Extension (not in Metered's API): C{"turn": true} embeds fresh Metered TURN
credentials of the key's app in C{metadata.iceServers}, through
L{meteredrt.backend.mint_token_with_turn}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meteredrt.auth import DEFAULT_TOKEN_LIFETIME, MintError, mint_token
from meteredrt.backend import mint_token_with_turn
from meteredrt.protocol import is_valid_peer_id
from meteredrt.rest.base import ApiError, Call, JsonResource, RequestGuard, Route, invalid
from meteredrt.turn import TurnApiClient, TurnApiError

ROUTES = (
    Route(
        "POST",
        "/v1/tokens",
        "mintToken",
        "Mint a connect token (HS256 JWT signed with the authenticating secret key)",
        handler="mint",
        request_schema="TokenRequest",
        response_schema="TokenResponse",
        errors=(400, 401, 403, 413, 429, 502, 503),
    ),
)


def _optional_list(body: Mapping[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid(f"{name}: must be an array of strings")
    return value


def _optional_object(body: Mapping[str, Any], name: str) -> dict | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(f"{name}: must be a JSON object")
    return value


class TokensResource(JsonResource):
    """
    C{/v1/tokens}.
    """

    routes = ROUTES

    def __init__(self, guard: RequestGuard, turn: TurnApiClient | None = None) -> None:
        """
        @param turn: mints TURN credentials for C{"turn": true}; without it
            such requests are refused.
        """
        super().__init__(guard)
        self._turn = turn

    def locate(self, postpath: list[bytes]) -> tuple[str, dict[str, bytes]] | None:
        return ("/v1/tokens", {}) if not postpath else None

    async def mint(self, call: Call) -> Mapping[str, Any]:
        """
        Mint the token; 400/403 with the code L{MintError} names.
        """
        body = call.body or {}
        peer_id = body.get("peerId")
        # The isinstance only narrows for mypy; is_valid_peer_id checks it too.
        if not isinstance(peer_id, str) or not is_valid_peer_id(peer_id):
            raise invalid("peerId: required; printable ASCII, 1-128 characters")
        expires_in = body.get("expiresInSec", DEFAULT_TOKEN_LIFETIME)
        if expires_in is None:
            expires_in = DEFAULT_TOKEN_LIFETIME
        if not isinstance(expires_in, int) or isinstance(expires_in, bool):
            raise invalid("expiresInSec: must be an integer")
        channels = _optional_list(body, "channels")
        permissions = _optional_list(body, "permissions")
        metadata = _optional_object(body, "metadata")
        peer_metadata = _optional_object(body, "peerMetadata")
        with_turn = body.get("turn", False)
        if not isinstance(with_turn, bool):
            raise invalid("turn: must be a boolean")
        now = int(self._guard.clock.seconds())
        claims: dict[str, Any] = dict(
            now=now,
            expires_in=expires_in,
            channels=channels,
            permissions=permissions,
            metadata=metadata,
            peer_metadata=peer_metadata,
        )
        try:
            if not with_turn:
                return {"token": mint_token(call.key, peer_id, **claims), "expiresAt": now + expires_in}
            turn_config = call.app.turn
            if self._turn is None or turn_config is None:
                raise invalid("turn: the app has no TURN configuration ([apps.turn])")
            token, expires_at = await mint_token_with_turn(call.key, peer_id, self._turn, turn_config, **claims)
        except MintError as e:
            status = 400 if e.code == "invalid_request" else 403
            raise ApiError(status, e.code, f"{e.field}: {e.message}") from None
        except TurnApiError as e:
            raise ApiError(502, "backend_error", f"the TURN API failed: {e}") from None
        return {"token": token, "expiresAt": expires_at}
