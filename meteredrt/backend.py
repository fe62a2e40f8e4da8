"""
The customer-backend recipe of protocol §20.4 as one call: mint TURN
credentials and the realtime token in one step.

A backend that signs its own tokens (or serves C{POST /v1/tokens}) calls
L{mint_token_with_turn}: it creates a Metered TURN credential for the peer,
fetches that credential's ICE server list, and mints the connect JWT with
the list at C{metadata.iceServers}, where the SDK looks for it in the
welcome (§20.1). The TURN C{secretKey} never leaves the backend.

It also checks the signature of the presence webhooks the server sends
(L{verify_webhook}).

Main names: L{mint_token_with_turn}, L{verify_webhook}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from meteredrt.apps import Key, TurnConfig
from meteredrt.auth import DEFAULT_TOKEN_LIFETIME, mint_token
from meteredrt.turn import TurnApiClient, credential_lifetime
from meteredrt.webhooks.signing import DEFAULT_TOLERANCE_SECONDS, SignatureError, verify_signature

__all__ = ["SignatureError", "mint_token_with_turn", "verify_webhook"]


def verify_webhook(
    secret: str,
    signature: str | None,
    body: bytes,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> list[dict]:
    """
    Check a webhook request and return its events.

    Call it with the raw request body (before any JSON parsing) and the
    C{Metered-Signature} header::

        events = verify_webhook(secret, request.headers["Metered-Signature"],
                                raw_body, now=time.time())

    :param secret: The app's webhook secret (C{[apps.webhooks] secret}).
    :param now: Your clock, in Unix seconds.
    :param tolerance: The replay window in seconds: a request signed
        further from C{now} is refused, so a captured request cannot be
        replayed later.
    :return: The batch's events, oldest first. Each has a stable C{id}:
        delivery is at least once, so de-duplicate by it.
    :raise SignatureError: When the header is missing, malformed, outside
        the window or does not match the body.
    """
    verify_signature(secret, signature, body, now, tolerance)
    try:
        document = json.loads(body)
        events = document["events"]
    except (ValueError, TypeError, KeyError) as e:
        raise SignatureError(f"signed body is not a webhook batch: {e}") from None
    if not isinstance(events, list):
        raise SignatureError("signed body is not a webhook batch: events is not a list")
    return events


async def mint_token_with_turn(
    key: Key,
    peer_id: str,
    turn: TurnApiClient,
    turn_config: TurnConfig,
    *,
    now: int,
    expires_in: int = DEFAULT_TOKEN_LIFETIME,
    channels: Iterable[str] | None = None,
    permissions: Iterable[str] | None = None,
    metadata: dict | None = None,
    peer_metadata: dict | None = None,
) -> tuple[str, int]:
    """
    Mint a connect JWT whose C{metadata.iceServers} holds fresh Metered
    TURN credentials for C{peer_id}.

    The claims are checked first, exactly as L{mint_token} checks them, so
    a request that cannot be minted costs no TURN credential. Then one
    credential is created (labelled with C{peer_id}, living
    L{credential_lifetime} of C{expires_in}; C{turn_config.ttl} is for
    auto-injection and is not used here), its ICE server list is fetched
    and checked against the SDK's shape rules by L{TurnApiClient}, and the
    list is added to C{metadata} next to the caller's own fields.

    A C{metadata} that already carries C{iceServers} wins, as it does for
    auto-injection (§20.1): the list is checked and the token minted with
    it, and the TURN API is not called.

    :param key: A secret key; the token is signed with it.
    :param peer_id: The token's C{sub}, and the credential's label.
    :param turn: Talks to the TURN API; its timeout bounds each of the two
        calls.
    :param turn_config: The Metered account to create the credential in.
    :param now: The current time in Unix seconds; C{iat}, and the start of
        C{expires_in}.
    :param expires_in: The token's lifetime in seconds (1 to 86400).
    :param channels: The token's C{channels} claim, if any.
    :param permissions: The token's C{permissions} claim, if any.
    :param metadata: The token's C{metadata} claim, without or with
        C{iceServers}; never modified.
    :param peer_metadata: The token's C{peerMetadata} claim, if any.
    :return: The token and its expiry in Unix seconds (C{expiresAt} of
        C{POST /v1/tokens}).
    :raise MintError: For claims that break a §19.2 rule, a caller-supplied
        C{iceServers} the SDK would drop, or a C{metadata} that the ICE
        server list pushes past its size cap.
    :raise meteredrt.turn.TurnApiError: When the TURN API gives no usable
        answer; no token is minted then.
    """
    channel_list = None if channels is None else list(channels)
    permission_list = None if permissions is None else list(permissions)

    def mint(claimed_metadata: dict | None) -> str:
        return mint_token(
            key,
            peer_id,
            now=now,
            expires_in=expires_in,
            channels=channel_list,
            permissions=permission_list,
            metadata=claimed_metadata,
            peer_metadata=peer_metadata,
        )

    token = mint(metadata)
    expires_at = int(now) + expires_in
    if metadata is not None and "iceServers" in metadata:
        return token, expires_at
    credential = await turn.create_credential(
        turn_config, credential_lifetime(expires_in), peer_id
    )
    ice_servers = await turn.fetch_ice_servers(turn_config, credential["apiKey"])
    return mint({**(metadata or {}), "iceServers": ice_servers}), expires_at
