"""
Who a connection is and what it may do.

L{authenticate} turns the credential of a WebSocket upgrade (a JWT or a
publishable key) into an immutable L{Grant}, or raises L{Refusal} with the
close code of §4.3/§5.3. L{mint_token} makes the JWT that the CLI and
C{POST /v1/tokens} hand out. Both are pure: the key look-up and the clock
reading are passed in.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeGuard

import jwt
import orjson
from attrs import frozen

from meteredrt.apps import ACTIONS, App, Key, KeyType
from meteredrt.globs import covers, matches_any, pattern_error
from meteredrt.icelist import ice_servers_error
from meteredrt.protocol import (
    MAX_JSON_DEPTH,
    CloseCode,
    has_long_digit_run,
    is_finite_json_number,
    is_valid_peer_id,
    json_size,
    json_too_deep,
)

ALGORITHM = "HS256"
MAX_PEER_METADATA_BYTES = 4096
MAX_METADATA_BYTES = 8192
MAX_CHANNEL_CLAIMS = 100
MAX_PERMISSION_CLAIMS = 16
#: C{nbf} is honoured with this much clock skew (no leeway on C{exp}).
NBF_LEEWAY_SECONDS = 60
DEFAULT_TOKEN_LIFETIME = 3600
MAX_TOKEN_LIFETIME = 86400
#: The latest C{exp} accepted: 9999-12-31T23:59:59Z. A signed token may
#: carry any integer, and a larger one (C{10**400}) cannot even become a
#: float for the expiry timer; this one is exact as a float, as a
#: JavaScript number in milliseconds, and as a C{datetime}.
MAX_EXP = 253_402_300_799


class Refusal(Exception):
    """
    A connection is refused after the upgrade with a close code.

    @ivar code: the WebSocket close code (4001, 4002, 4010, 4012, 1011).
    @ivar reason: a short ASCII reason without secrets, for the close frame.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class MintError(ValueError):
    """
    A token could not be minted from the given claims.

    @ivar field: the offending request field, for REST's error message.
    @ivar code: the REST error code (C{invalid_request},
        C{channel_not_authorized} or C{action_not_permitted}).
    """

    def __init__(self, field: str, message: str, code: str = "invalid_request") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


@frozen
class Grant:
    """
    The effective identity and authorization of one connection (§4.4).

    @ivar claim_patterns: the JWT's C{channels} claim, or C{None} when the
        key's patterns apply unchanged.
    """

    app_id: str
    key_id: str
    peer_id: str
    actions: frozenset[str]
    key_patterns: tuple[str, ...]
    claim_patterns: tuple[str, ...] | None
    peer_metadata: dict | None
    metadata: dict | None
    expires_at: int | None
    auto_inject_turn: bool

    def may(self, action: str) -> bool:
        """
        Whether the connection holds C{action}.
        """
        return action in self.actions

    def allows_channel(self, channel: str) -> bool:
        """
        Whether a concrete channel is inside the key's patterns and the
        token's channel claims.
        """
        return matches_any(self.key_patterns, channel) and (
            self.claim_patterns is None or matches_any(self.claim_patterns, channel)
        )

    def allows_pattern(self, pattern: str) -> bool:
        """
        Whether every channel a wildcard subscription can match is allowed
        (provable language inclusion, in both pattern sets).
        """
        return covers(pattern, self.key_patterns) and (
            self.claim_patterns is None or covers(pattern, self.claim_patterns)
        )


KeyLookup = Callable[[str], "Key | None"]
AppLookup = Callable[[str], "App | None"]


def authenticate(
    params: Mapping[str, list[str]],
    origin: str | None,
    keys: KeyLookup,
    apps: AppLookup,
    now: float,
    new_peer_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> Grant:
    """
    Authenticate a WebSocket upgrade from its query parameters.

    @param params: decoded query parameters, each a list of values.
    @param origin: the C{Origin} header, if any.
    @raise Refusal: with the §5.3 close code.
    """
    tokens = params.get("token", [])
    publishable = params.get("key", [])
    if len(tokens) + len(publishable) != 1:
        raise Refusal(CloseCode.INVALID_TOKEN, "exactly one of token or key is required")
    if tokens:
        grant = verify_token(tokens[0], keys, now)
    else:
        grant = verify_publishable(publishable[0], origin, keys, new_peer_id)
    app = apps(grant.app_id)
    if app is None:
        raise Refusal(CloseCode.INVALID_TOKEN, "key not found")
    if app.suspended:
        raise Refusal(CloseCode.ACCOUNT_SUSPENDED, "account_suspended")
    return grant


def verify_publishable(
    key_id: str, origin: str | None, keys: KeyLookup, new_peer_id: Callable[[], str]
) -> Grant:
    """
    Authenticate C{?key=pk_live_…}; the peer gets a fresh UUID (§3.2).
    """
    key = keys(key_id)
    if key is None or key.type is not KeyType.PUBLISHABLE or not key.active:
        raise Refusal(CloseCode.INVALID_TOKEN, "key not found")
    if key.allowed_origins and origin is not None and origin not in key.allowed_origins:
        raise Refusal(CloseCode.INVALID_TOKEN, "origin_not_allowed")
    return Grant(
        app_id=key.app_id,
        key_id=key.key_id,
        peer_id=new_peer_id(),
        actions=key.actions,
        key_patterns=key.channel_patterns,
        claim_patterns=None,
        peer_metadata=None,
        metadata=None,
        expires_at=None,
        auto_inject_turn=key.auto_inject_turn,
    )


def _invalid(reason: str) -> Refusal:
    return Refusal(CloseCode.INVALID_TOKEN, reason)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


#: The base64url alphabet, without padding (RFC 7515 §2).
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


def _segment(data: bytes) -> bytes:
    """
    Decode one base64url segment of a compact JWS as strictly as PyJWT does: at most two
    trailing C{=} and only on a whole quantum, nothing outside the alphabet, and only the
    canonical spelling of the bytes (no stray bits in the last character).

    @raise Refusal: 4001 C{invalid_token}.
    """
    stripped = data.rstrip(b"=")
    padding = len(data) - len(stripped)
    if padding > 2 or (padding and len(data) % 4) or len(stripped) % 4 == 1 or not _BASE64URL.fullmatch(stripped):
        raise _invalid("invalid_token")
    decoded = base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped:
        raise _invalid("invalid_token")
    return decoded


def _parse_json(data: bytes) -> Any:
    """
    C{json.loads(data)}, PyJWT's parser, with orjson (~5 times faster) for
    the documents on which both agree.

    orjson refuses some documents the stdlib decoder accepts (NaN and
    infinities, a BOM, lone surrogates, other encodings than UTF-8): those go
    to the stdlib decoder, whose verdict stands. What orjson accepts, it
    reads as the stdlib does, but for an integer outside 64 bits (made a
    float): a document with a digit run that long never reaches it.
    """
    if not has_long_digit_run(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def _json_object(data: bytes) -> dict:
    """
    A JSON object from a decoded segment.

    @raise Refusal: 4001 C{invalid_token} for anything else.
    """
    try:
        value = _parse_json(data)
    except (ValueError, RecursionError):
        raise _invalid("invalid_token") from None
    if not isinstance(value, dict):
        raise _invalid("invalid_token")
    return value


class _MacCache:
    """
    The HMAC-SHA256 state keyed with each secret key's secret, per key id, so that verifying a
    token copies a ready state instead of keying a new one.

    The key store stays the authority: L{verify_token} looks the key up for every token and
    refuses a missing, revoked or non-secret key before asking here, and an entry is used only
    while it was made from the very secret the key store returns now. A refused key's entry is
    dropped, so no secret outlives its key's revocation here. At most L{limit} entries.
    """

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._macs: dict[str, tuple[str, Any]] = {}

    def mac(self, key_id: str, secret: str) -> Any:
        """
        A fresh HMAC-SHA256 keyed with C{secret}, ready for C{update}.
        """
        cached = self._macs.get(key_id)
        if cached is None or cached[0] != secret:
            if len(self._macs) >= self.limit:
                self._macs.clear()
            cached = self._macs[key_id] = (secret, hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha256))
        return cached[1].copy()

    def forget(self, key_id: object) -> None:
        """
        Drop what is cached for C{key_id}, if anything.
        """
        if isinstance(key_id, str):
            self._macs.pop(key_id, None)

    def __len__(self) -> int:
        return len(self._macs)


_macs = _MacCache()


def verify_token(token: str, keys: KeyLookup, now: float) -> Grant:
    """
    Verify a JWT in the order of §4.3; the first failure decides the code.

    The compact JWS is parsed once: its header names the algorithm (only HS256 is accepted,
    whatever the token says) and the key, whose secret then checks the signature in constant
    time. PyJWT would parse the token twice here (once for the C{kid}, once to verify) with a
    per-character check of every segment, which was a quarter of a connection's CPU; the checks
    below are the ones it made.
    """
    if not token.isascii() or token.count(".") != 2:
        raise _invalid("invalid_token")
    raw = token.encode("ascii")
    signing_input, _, signature_segment = raw.rpartition(b".")
    header_segment, _, payload_segment = signing_input.partition(b".")
    header = _json_object(_segment(header_segment))
    payload = _segment(payload_segment)
    signature = _segment(signature_segment)
    # RFC 7515 §4.1.11: an extension we do not implement must not be ignored; RFC 7797's
    # unencoded payload ("b64": false) is one.
    if header.get("alg") != ALGORITHM or "crit" in header or header.get("b64", True) is False:
        raise _invalid("invalid_token")
    kid = header.get("kid")
    key = keys(kid) if isinstance(kid, str) else None
    if key is None or key.type is not KeyType.SECRET or not key.active or not key.secret:
        _macs.forget(kid)
        raise _invalid("key not found")
    mac = _macs.mac(key.key_id, key.secret)
    mac.update(signing_input)
    if not hmac.compare_digest(mac.digest(), signature):
        raise _invalid("invalid_token")
    claims = _json_object(payload)

    sub = claims.get("sub")
    # The isinstance only narrows for mypy; is_valid_peer_id checks it too.
    if not isinstance(sub, str) or not is_valid_peer_id(sub):
        raise _invalid("invalid sub")
    exp = claims.get("exp")
    if not _is_int(exp):
        raise _invalid("exp required")
    if exp <= now:
        raise Refusal(CloseCode.TOKEN_EXPIRED, "token_expired")
    if exp > MAX_EXP:
        raise _invalid("exp out of range")
    nbf = claims.get("nbf")
    if nbf is not None and (not is_finite_json_number(nbf) or nbf > now + NBF_LEEWAY_SECONDS):
        raise _invalid("token not yet valid")

    channels = _string_list(claims, "channels", MAX_CHANNEL_CLAIMS)
    if channels is not None and not all(map(_valid_claim_pattern, channels)):
        raise _invalid("invalid channels claim")
    permissions = _string_list(claims, "permissions", MAX_PERMISSION_CLAIMS)
    peer_metadata = _bounded_object(claims, "peerMetadata", MAX_PEER_METADATA_BYTES)
    metadata = _bounded_object(claims, "metadata", MAX_METADATA_BYTES)

    # Unknown permission strings are ignored on the WebSocket (REST refuses them).
    actions = key.actions if permissions is None else key.actions & frozenset(permissions)
    return Grant(
        app_id=key.app_id,
        key_id=key.key_id,
        peer_id=sub,
        actions=actions,
        key_patterns=key.channel_patterns,
        claim_patterns=None if channels is None else tuple(channels),
        peer_metadata=peer_metadata or None,
        metadata=metadata or None,
        expires_at=exp,
        auto_inject_turn=key.auto_inject_turn,
    )


#: How many channel claims L{_valid_claim_pattern} remembers its verdict on.
CLAIM_PATTERN_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=CLAIM_PATTERN_CACHE_SIZE)
def _valid_claim_pattern(pattern: str) -> bool:
    """
    Whether a channel claim is a non-empty, valid pattern, remembered per string.

    Tokens repeat the same few channel claims (the backend mints them from its own rules), and
    tokenizing each claim on every connect was a fifth of the token's verification. The verdict
    depends on the string alone, and only signed claims (the signature is checked first) reach
    here, so a hostile client cannot churn the cache; it is bounded all the same.
    """
    return bool(pattern) and pattern_error(pattern) is None


def _string_list(claims: dict, name: str, cap: int) -> list[str] | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > cap or not all(isinstance(v, str) for v in value):
        raise _invalid(f"invalid {name} claim")
    return value


def _bounded_object(claims: dict, name: str, cap: int) -> dict | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, dict) or json_too_deep(value) or not _strict_json(value) or json_size(value) > cap:
        raise _invalid(f"invalid {name} claim")
    return value


def _strict_json(value: object) -> bool:
    """
    Whether C{value} holds no NaN or infinity: PyJWT's parser accepts them,
    but they are not JSON and no server frame could carry them.
    """
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


def mint_token(
    key: Key,
    peer_id: str,
    *,
    now: int,
    expires_in: int = DEFAULT_TOKEN_LIFETIME,
    channels: Iterable[str] | None = None,
    permissions: Iterable[str] | None = None,
    metadata: dict | None = None,
    peer_metadata: dict | None = None,
) -> str:
    """
    Mint the connect JWT of §19.2 for a secret key: HS256, C{kid} = key id,
    signed with the key's secret, exactly what a backend would sign itself.

    @raise MintError: naming the field that breaks a §19.2 rule.
    """
    if key.type is not KeyType.SECRET or not key.secret:
        raise MintError("key", "tokens are minted with a secret key")
    if not is_valid_peer_id(peer_id):
        raise MintError("peerId", "must be printable ASCII, 1-128 characters")
    if not _is_int(expires_in) or not 0 < expires_in <= MAX_TOKEN_LIFETIME:
        raise MintError("expiresInSec", f"must be an integer from 1 to {MAX_TOKEN_LIFETIME}")
    claims: dict[str, Any] = {"sub": peer_id, "iat": int(now), "exp": int(now) + expires_in}

    if channels is not None:
        channel_list = list(channels)
        if len(channel_list) > MAX_CHANNEL_CLAIMS:
            raise MintError("channels", f"at most {MAX_CHANNEL_CLAIMS} entries")
        for channel in channel_list:
            if not isinstance(channel, str) or not channel or pattern_error(channel):
                raise MintError("channels", f"invalid channel pattern: {channel!r}")
            if not covers(channel, key.channel_patterns):
                raise MintError(
                    "channels", f"outside the key's channel patterns: {channel}", "channel_not_authorized"
                )
        claims["channels"] = channel_list
    if permissions is not None:
        permission_list = list(permissions)
        if len(permission_list) > MAX_PERMISSION_CLAIMS:
            raise MintError("permissions", f"at most {MAX_PERMISSION_CLAIMS} entries")
        for permission in permission_list:
            if permission not in ACTIONS:
                raise MintError("permissions", f"unknown permission: {permission!r}")
            if permission not in key.actions:
                raise MintError(
                    "permissions", f"not granted to the key: {permission}", "action_not_permitted"
                )
        claims["permissions"] = permission_list
    for field, value, cap in (
        ("metadata", metadata, MAX_METADATA_BYTES),
        ("peerMetadata", peer_metadata, MAX_PEER_METADATA_BYTES),
    ):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise MintError(field, "must be a JSON object")
        if json_too_deep(value):
            raise MintError(field, f"nests deeper than {MAX_JSON_DEPTH} levels")
        if json_size(value) > cap:
            raise MintError(field, f"larger than {cap} bytes serialized")
        claims[field] = value
    if metadata is not None and "iceServers" in metadata:
        # The SDK silently drops a whole list that breaks one of its rules.
        problem = ice_servers_error(metadata["iceServers"])
        if problem is not None:
            raise MintError("metadata", f"iceServers: {problem}")
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.key_id})

