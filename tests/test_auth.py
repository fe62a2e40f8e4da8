"""
Tests for L{meteredrt.auth}: the JWT verification matrix of protocol §4.3,
publishable keys (§3.2, §5.3), effective authorization (§4.4) and
token minting (§19.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meteredrt import auth
from meteredrt.apps import ACTIONS, App, Key, KeyType
from meteredrt.auth import (
    MAX_EXP,
    Grant,
    MintError,
    Refusal,
    _parse_json,
    authenticate,
    mint_token,
    verify_publishable,
    verify_token,
)
from meteredrt.protocol import MAX_JSON_DEPTH

NOW = 1_767_222_000
# Long enough that PyJWT does not warn about short HMAC keys, even for HS512.
SECRET = "sk_secret_" + "s3cr3t-0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"
OTHER_SECRET = "sk_secret_" + "other-0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJK"
ALL = frozenset(ACTIONS)

KEYS = {
    key.key_id: key
    for key in [
        Key("sk_id_main", "app_a", KeyType.SECRET, ("**",), ALL, secret=SECRET),
        Key(
            "sk_id_narrow",
            "app_a",
            KeyType.SECRET,
            ("app/**",),
            frozenset({"subscribe", "publish", "presence"}),
            secret=OTHER_SECRET,
            auto_inject_turn=False,
        ),
        Key("sk_id_revoked", "app_a", KeyType.SECRET, ("**",), ALL, secret=SECRET, revoked=True),
        Key("sk_id_suspended", "app_suspended", KeyType.SECRET, ("**",), ALL, secret=SECRET),
        Key("sk_id_orphan", "app_gone", KeyType.SECRET, ("**",), ALL, secret=SECRET),
        Key(
            "pk_live_open",
            "app_a",
            KeyType.PUBLISHABLE,
            ("public/**",),
            frozenset({"subscribe", "publish", "presence"}),
        ),
        Key(
            "pk_live_origins",
            "app_a",
            KeyType.PUBLISHABLE,
            ("**",),
            frozenset({"subscribe"}),
            allowed_origins=("https://example.org", "http://localhost:3000"),
        ),
        Key("pk_live_revoked", "app_a", KeyType.PUBLISHABLE, ("**",), ALL, revoked=True),
        Key("pk_live_suspended", "app_suspended", KeyType.PUBLISHABLE, ("**",), ALL),
    ]
}
# A publishable key whose id is used as a JWT kid, signed with some secret.
KEYS["pk_live_signed"] = Key("pk_live_signed", "app_a", KeyType.PUBLISHABLE, ("**",), ALL, secret=SECRET)

APPS = {app.app_id: app for app in [App("app_a"), App("app_suspended", suspended=True)]}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _json_segment(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def _claims(**overrides: Any) -> dict:
    """
    Valid claims with C{overrides} applied; an override of C{...} removes the claim.
    """
    claims: dict[str, Any] = {"sub": "u_1042", "exp": NOW + 3600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not ...}


def _token(claims: dict | None = None, kid: Any = "sk_id_main", secret: str = SECRET, **header: Any) -> str:
    """
    An HS256 token signed with PyJWT, as a customer backend would make it.
    """
    headers = dict(header)
    if kid is not ...:
        headers["kid"] = kid
    return jwt.encode(_claims() if claims is None else claims, secret, algorithm="HS256", headers=headers)


def _hand_token(header: Any, payload: Any, secret: bytes | None = SECRET.encode()) -> str:
    """
    A token assembled by hand, so headers and payloads PyJWT would not emit
    can be tested; the HMAC-SHA256 signature is empty without C{secret}.
    """
    head = header if isinstance(header, str) else _json_segment(header)
    body = payload if isinstance(payload, str) else _json_segment(payload)
    signing_input = f"{head}.{body}".encode("ascii")
    signature = "" if secret is None else _b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{head}.{body}.{signature}"


def _metadata_of_size(size: int, char: str = "x") -> dict:
    """
    A JSON object whose compact UTF-8 serialization is exactly C{size} bytes.
    """
    width = len(char.encode("utf-8"))
    overhead = len('{"a":""}')
    count, rest = divmod(size - overhead, width)
    value = {"a": char * count + "y" * rest}
    assert len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")) == size
    return value


class _AuthAssertions(SynchronousTestCase):
    """
    Helpers shared by the authentication tests.
    """

    def verify(self, token: str, now: float = NOW) -> Grant:
        return verify_token(token, KEYS.get, now)

    def assertRefused(self, token: str, code: int = 4001, now: float = NOW) -> Refusal:
        """
        Verifying C{token} is refused with exactly close code C{code}.
        """
        refusal = self.assertRaises(Refusal, verify_token, token, KEYS.get, now)
        self.assertEqual(refusal.code, code)
        self.assertTrue(refusal.reason.isascii())
        self.assertNotIn(SECRET, refusal.reason)
        return refusal


class VerifyTokenTests(_AuthAssertions):
    """
    Tests for L{verify_token}: the §4.3 matrix and the claims of §4.2.
    """

    def test_valid(self) -> None:
        """
        A valid token yields a grant with the key's app, actions and patterns and the token's sub and exp.
        """
        grant = self.verify(_token(_claims(peerMetadata={"name": "Ada"}, metadata={"iceServers": []})))
        self.assertEqual(
            grant,
            Grant(
                app_id="app_a",
                key_id="sk_id_main",
                peer_id="u_1042",
                actions=ALL,
                key_patterns=("**",),
                claim_patterns=None,
                peer_metadata={"name": "Ada"},
                metadata={"iceServers": []},
                expires_at=NOW + 3600,
                auto_inject_turn=True,
            ),
        )

    def test_minimal_claims(self) -> None:
        """
        With only sub and exp, metadata bags are None and the key's actions apply.
        """
        grant = self.verify(_token(kid="sk_id_narrow", secret=OTHER_SECRET))
        self.assertEqual(
            (
                grant.key_id,
                grant.actions,
                grant.key_patterns,
                grant.claim_patterns,
                grant.peer_metadata,
                grant.metadata,
            ),
            ("sk_id_narrow", KEYS["sk_id_narrow"].actions, ("app/**",), None, None, None),
        )
        self.assertFalse(grant.auto_inject_turn)

    def test_empty_metadata_objects(self) -> None:
        """
        Empty C{peerMetadata}/C{metadata} objects are treated as absent.
        """
        grant = self.verify(_token(_claims(peerMetadata={}, metadata={})))
        self.assertEqual((grant.peer_metadata, grant.metadata), (None, None))

    def test_null_optional_claims(self) -> None:
        """
        Optional claims set to null are treated as absent.
        """
        grant = self.verify(_token(_claims(channels=None, permissions=None, peerMetadata=None, metadata=None)))
        self.assertEqual((grant.actions, grant.claim_patterns, grant.peer_metadata), (ALL, None, None))

    def test_ignored_claims(self) -> None:
        """
        C{iat}, C{iss}, C{aud} and C{jti} of any shape are ignored, as is C{typ}.
        """
        token = _hand_token(
            {"alg": "HS256", "typ": "weird", "kid": "sk_id_main"},
            _claims(iat=NOW + 10_000, iss=5, aud=["someone"], jti={"x": 1}),
        )
        self.assertEqual(self.verify(token).peer_id, "u_1042")

    def test_hand_signed_with_typ(self) -> None:
        """
        A token signed by hand with the secret's UTF-8 bytes verifies (§4.1).
        """
        token = _hand_token({"alg": "HS256", "typ": "JWT", "kid": "sk_id_main"}, _claims())
        self.assertEqual(self.verify(token).peer_id, "u_1042")

    def test_expired(self) -> None:
        """
        A token whose exp has passed closes with 4002.
        """
        self.assertRefused(_token(_claims(exp=NOW - 1)), 4002)

    def test_exp_equals_now(self) -> None:
        """
        A token whose exp is exactly now closes with 4002.
        """
        self.assertRefused(_token(_claims(exp=NOW)), 4002)

    def test_exp_between_seconds(self) -> None:
        """
        exp is compared with the fractional clock: valid just before it, expired just after.
        """
        token = _token(_claims(exp=NOW + 1))
        self.assertEqual(self.verify(token, now=NOW + 0.999).expires_at, NOW + 1)
        self.assertRefused(token, 4002, now=NOW + 1.001)

    def test_exp_missing(self) -> None:
        """
        A token without exp closes with 4001.
        """
        self.assertRefused(_token(_claims(exp=...)), 4001)

    def test_exp_not_integer(self) -> None:
        """
        An exp that is a string, float, boolean, null or array closes with 4001.
        """
        for exp in [str(NOW + 3600), NOW + 3600.5, float(NOW + 3600), True, None, [NOW + 3600]]:
            self.assertRefused(_token(_claims(exp=exp)), 4001)

    def test_exp_absurd(self) -> None:
        """
        A correctly signed exp too large for a float, or past the year 9999,
        closes with 4001 before any arithmetic on it can fail; the largest
        accepted exp verifies.
        """
        for exp in [10**400, 2**64, MAX_EXP + 1]:
            refusal = self.assertRefused(_token(_claims(exp=exp)), 4001)
            self.assertEqual(refusal.reason, "exp out of range")
        self.assertEqual(self.verify(_token(_claims(exp=MAX_EXP))).expires_at, MAX_EXP)

    def test_exp_absurdly_negative(self) -> None:
        """
        A hugely negative exp is simply expired: 4002.
        """
        for exp in [-(10**400), -1, 0]:
            self.assertRefused(_token(_claims(exp=exp)), 4002)

    def test_exp_too_many_digits(self) -> None:
        """
        An exp with more digits than Python converts is an unparsable token:
        4001, not a ValueError.
        """
        payload = '{"sub":"u_1042","exp":' + "9" * 5000 + "}"
        self.assertRefused(_hand_token({"alg": "HS256", "kid": "sk_id_main"}, _b64(payload.encode())), 4001)

    def test_nbf_absurd(self) -> None:
        """
        An nbf too large for a float is in the future: 4001; a hugely
        negative one is in the past and accepted; infinity is refused.
        """
        self.assertRefused(_token(_claims(nbf=10**400)), 4001)
        self.assertEqual(self.verify(_token(_claims(nbf=-(10**400)))).peer_id, "u_1042")
        payload = json.dumps(_claims(), separators=(",", ":"))[:-1] + ',"nbf":1e400}'
        self.assertRefused(_hand_token({"alg": "HS256", "kid": "sk_id_main"}, _b64(payload.encode())), 4001)

    def test_iat_absurd_ignored(self) -> None:
        """
        C{iat} is ignored whatever its value: huge, negative, boolean,
        fractional or infinite.
        """
        for iat in [10**400, -(10**400), -1, True, NOW + 0.5, "soon"]:
            self.assertEqual(self.verify(_token(_claims(iat=iat))).expires_at, NOW + 3600)
        payload = json.dumps(_claims(), separators=(",", ":"))[:-1] + ',"iat":1e400}'
        token = _hand_token({"alg": "HS256", "kid": "sk_id_main"}, _b64(payload.encode()))
        self.assertEqual(self.verify(token).peer_id, "u_1042")

    def test_sub_checked_before_exp(self) -> None:
        """
        A bad sub on an expired token is 4001: sub comes before exp in §4.3.
        """
        self.assertRefused(_token(_claims(sub="", exp=NOW - 10)), 4001)

    def test_exp_checked_before_claim_shapes(self) -> None:
        """
        An expired token with an oversized claim is 4002: exp comes before claim shapes.
        """
        self.assertRefused(_token(_claims(exp=NOW - 10, channels=["a"] * 101)), 4002)

    def test_nbf_within_leeway(self) -> None:
        """
        An nbf up to 60 s in the future is accepted, and one in the past too.
        """
        for nbf in [NOW + 59, NOW + 60, NOW - 1000, NOW + 59.5]:
            self.assertEqual(self.verify(_token(_claims(nbf=nbf))).peer_id, "u_1042")

    def test_nbf_beyond_leeway(self) -> None:
        """
        An nbf 61 s in the future closes with 4001.
        """
        self.assertRefused(_token(_claims(nbf=NOW + 61)), 4001)

    def test_nbf_not_a_number(self) -> None:
        """
        An nbf that is a string, boolean, array or NaN closes with 4001.
        """
        for nbf in [str(NOW), False, [NOW]]:
            self.assertRefused(_token(_claims(nbf=nbf)), 4001)
        payload = json.dumps(_claims(), separators=(",", ":"))[:-1] + ',"nbf":NaN}'
        self.assertRefused(_hand_token({"alg": "HS256", "kid": "sk_id_main"}, _b64(payload.encode())), 4001)

    def test_alg_none(self) -> None:
        """
        An unsigned C{alg: none} token closes with 4001.
        """
        for alg in ["none", "None", "NONE"]:
            self.assertRefused(_hand_token({"alg": alg, "kid": "sk_id_main"}, _claims(), secret=None), 4001)

    def test_alg_none_with_valid_signature(self) -> None:
        """
        C{alg: none} closes with 4001 even when an HS256 signature is attached.
        """
        self.assertRefused(_hand_token({"alg": "none", "kid": "sk_id_main"}, _claims()), 4001)

    def test_alg_missing(self) -> None:
        """
        A header without alg closes with 4001.
        """
        self.assertRefused(_hand_token({"kid": "sk_id_main"}, _claims()), 4001)

    def test_hs512(self) -> None:
        """
        An HS512 token signed with the right secret closes with 4001.
        """
        token = jwt.encode(_claims(), SECRET, algorithm="HS512", headers={"kid": "sk_id_main"})
        self.assertRefused(token, 4001)

    def test_hs384(self) -> None:
        """
        An HS384 token signed with the right secret closes with 4001.
        """
        token = jwt.encode(_claims(), SECRET, algorithm="HS384", headers={"kid": "sk_id_main"})
        self.assertRefused(token, 4001)

    def _rsa_key(self) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def test_rs256(self) -> None:
        """
        An RS256 token signed with a real RSA key, naming a known secret key's kid, closes with 4001.
        """
        private = self._rsa_key()
        token = jwt.encode(_claims(), private, algorithm="RS256", headers={"kid": "sk_id_main"})
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "RS256")
        self.assertRefused(token, 4001)

    def test_rs256_hs256_confusion(self) -> None:
        """
        An HS256 token whose HMAC key is an RSA public key in PEM form closes with 4001.
        """
        public_pem = (
            self._rsa_key()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        token = _hand_token({"alg": "HS256", "typ": "JWT", "kid": "sk_id_main"}, _claims(), secret=public_pem)
        self.assertRefused(token, 4001)

    def test_unknown_kid(self) -> None:
        """
        A kid that names no key closes with 4001.
        """
        self.assertRefused(_token(kid="sk_id_nobody"), 4001)

    def test_revoked_kid(self) -> None:
        """
        A token signed by a revoked key closes with 4001.
        """
        self.assertRefused(_token(kid="sk_id_revoked"), 4001)

    def test_publishable_kid(self) -> None:
        """
        A kid naming a publishable key closes with 4001, even if that key carries a secret.
        """
        self.assertRefused(_token(kid="pk_live_open"), 4001)
        self.assertRefused(_token(kid="pk_live_signed"), 4001)

    def test_missing_kid(self) -> None:
        """
        A token without kid closes with 4001.
        """
        self.assertRefused(_token(kid=...), 4001)

    def test_non_string_kid(self) -> None:
        """
        A kid that is a number, null, array or object closes with 4001.
        """
        for kid in [5, None, ["sk_id_main"], {"id": "sk_id_main"}, True]:
            self.assertRefused(_hand_token({"alg": "HS256", "kid": kid}, _claims()), 4001)

    def test_bad_signature(self) -> None:
        """
        A token signed with another key's secret closes with 4001.
        """
        self.assertRefused(_token(secret=OTHER_SECRET), 4001)

    def test_tampered_payload(self) -> None:
        """
        Changing the payload of a signed token closes with 4001.
        """
        head, _, signature = _token().split(".")
        forged = f"{head}.{_json_segment(_claims(sub='admin'))}.{signature}"
        self.assertRefused(forged, 4001)

    def test_truncated_signature(self) -> None:
        """
        A token without its signature closes with 4001.
        """
        head, body, _ = _token().split(".")
        self.assertRefused(f"{head}.{body}.", 4001)

    def test_sub_invalid(self) -> None:
        """
        A sub that is missing, empty, 129 characters, non-ASCII, holds a
        control character or is not a string closes with 4001.
        """
        for sub in [..., "", "u" * 129, "caf\u00e9", "u\x00", "u\x1f", "u\x7f", "u\n", None, 42, ["u"]]:
            self.assertRefused(_token(_claims(sub=sub)), 4001)

    def test_sub_limits(self) -> None:
        """
        A sub of 128 printable ASCII characters, spaces included, is the peerId.
        """
        for sub in ["u" * 128, " ", "a b~!"]:
            self.assertEqual(self.verify(_token(_claims(sub=sub))).peer_id, sub)

    def test_peer_metadata_size(self) -> None:
        """
        peerMetadata of exactly 4096 bytes serialized is accepted; 4097 closes with 4001.
        """
        fits = _metadata_of_size(4096)
        self.assertEqual(self.verify(_token(_claims(peerMetadata=fits))).peer_metadata, fits)
        self.assertRefused(_token(_claims(peerMetadata=_metadata_of_size(4097))), 4001)

    def test_peer_metadata_counts_utf8_bytes(self) -> None:
        """
        peerMetadata size counts UTF-8 bytes, not characters.
        """
        fits = _metadata_of_size(4096, "\u00e9")
        self.assertEqual(self.verify(_token(_claims(peerMetadata=fits))).peer_metadata, fits)
        self.assertRefused(_token(_claims(peerMetadata=_metadata_of_size(4097, "\u4e2d"))), 4001)

    def test_metadata_size(self) -> None:
        """
        metadata of exactly 8192 bytes serialized is accepted; 8193 closes with 4001.
        """
        fits = _metadata_of_size(8192)
        self.assertEqual(self.verify(_token(_claims(metadata=fits))).metadata, fits)
        self.assertRefused(_token(_claims(metadata=_metadata_of_size(8193))), 4001)

    def test_metadata_not_object(self) -> None:
        """
        peerMetadata or metadata that is an array, string, number or boolean closes with 4001.
        """
        for value in [[{"name": "Ada"}], "Ada", 1, True]:
            self.assertRefused(_token(_claims(peerMetadata=value)), 4001)
            self.assertRefused(_token(_claims(metadata=value)), 4001)

    def test_metadata_not_json(self) -> None:
        """
        metadata holding NaN or an overflowing number, which PyJWT's parser
        lets through, closes with 4001 rather than breaking the welcome.
        """
        claims = json.dumps(_claims(), separators=(",", ":"))[:-1]
        for bag in ['"metadata":{"x":NaN}', '"peerMetadata":{"x":[1e400]}', '"metadata":{"x":-Infinity}']:
            payload = _b64(f"{claims},{bag}}}".encode())
            self.assertRefused(_hand_token({"alg": "HS256", "kid": "sk_id_main"}, payload), 4001)

    def test_channels_cap(self) -> None:
        """
        100 channel claims are accepted; 101 close with 4001.
        """
        channels = [f"room-{i}" for i in range(100)]
        self.assertEqual(self.verify(_token(_claims(channels=channels))).claim_patterns, tuple(channels))
        self.assertRefused(_token(_claims(channels=channels + ["room-100"])), 4001)

    def test_channels_shape(self) -> None:
        """
        A channels claim that is not an array of non-empty, valid patterns closes with 4001.
        """
        for channels in ["room-1", ["room-1", 5], [None], [["a"]], [""], {"a": 1}, ["a\\x"], ["a/*\\"]]:
            self.assertRefused(_token(_claims(channels=channels)), 4001)

    def test_channels_verdict_remembered(self) -> None:
        """
        A channel claim's verdict is remembered per string, and a remembered verdict is the one
        first given: a bad claim seen before still closes with 4001, a good one still passes.
        """
        auth._valid_claim_pattern.cache_clear()
        bad, good = _token(_claims(channels=["a/*\\"])), _token(_claims(channels=["room-*", "lobby"]))
        for _ in range(2):
            self.assertRefused(bad, 4001)
            self.assertEqual(self.verify(good).claim_patterns, ("room-*", "lobby"))
        info = auth._valid_claim_pattern.cache_info()
        self.assertEqual((info.misses, info.hits, info.currsize), (3, 3, 3))
        auth._valid_claim_pattern.cache_clear()
        # Misses only: the verdicts are the same without the cache.
        self.assertRefused(bad, 4001)
        self.assertEqual(self.verify(good).claim_patterns, ("room-*", "lobby"))

    def test_channels_verdicts_bounded(self) -> None:
        """
        However many distinct channel claims arrive, at most CLAIM_PATTERN_CACHE_SIZE verdicts
        are kept.
        """
        auth._valid_claim_pattern.cache_clear()
        for i in range(auth.CLAIM_PATTERN_CACHE_SIZE // 100 + 2):
            self.verify(_token(_claims(channels=[f"r{i}-{j}" for j in range(100)])))
        self.assertEqual(auth._valid_claim_pattern.cache_info().currsize, auth.CLAIM_PATTERN_CACHE_SIZE)

    def test_empty_channels_claim(self) -> None:
        """
        An empty channels claim is kept and allows no channel at all.
        """
        grant = self.verify(_token(_claims(channels=[])))
        self.assertEqual(grant.claim_patterns, ())
        self.assertFalse(grant.allows_channel("room-1"))

    def test_permissions_cap(self) -> None:
        """
        16 permission claims are accepted; 17 close with 4001.
        """
        permissions = ["publish", "subscribe", "presence", "send"] * 4
        self.assertEqual(self.verify(_token(_claims(permissions=permissions))).actions, ALL)
        self.assertRefused(_token(_claims(permissions=permissions + ["send"])), 4001)

    def test_permissions_shape(self) -> None:
        """
        A permissions claim that is not an array of strings closes with 4001.
        """
        for permissions in ["publish", ["publish", 1], [None], {"publish": True}]:
            self.assertRefused(_token(_claims(permissions=permissions)), 4001)

    def test_unknown_permissions_ignored(self) -> None:
        """
        Unknown permission strings are ignored on the WebSocket.
        """
        grant = self.verify(_token(_claims(permissions=["subscribe", "fly", "admin", "PUBLISH"])))
        self.assertEqual(grant.actions, frozenset({"subscribe"}))

    def test_effective_actions(self) -> None:
        """
        Effective actions are the key's actions intersected with the permissions claim (§4.4).
        """
        token = _token(_claims(permissions=["publish", "send", "presence"]), kid="sk_id_narrow", secret=OTHER_SECRET)
        grant = self.verify(token)
        self.assertEqual(grant.actions, frozenset({"publish", "presence"}))
        self.assertTrue(grant.may("publish"))
        self.assertFalse(grant.may("send"))
        self.assertFalse(grant.may("subscribe"))

    def test_empty_permissions(self) -> None:
        """
        An empty permissions claim grants no action.
        """
        self.assertEqual(self.verify(_token(_claims(permissions=[]))).actions, frozenset())

    def test_channels_outside_key_accepted(self) -> None:
        """
        Channel claims outside the key's patterns do not refuse the connection
        but authorize nothing outside the key.
        """
        token = _token(_claims(channels=["zeta/**", "app/room-*"]), kid="sk_id_narrow", secret=OTHER_SECRET)
        grant = self.verify(token)
        self.assertEqual(grant.claim_patterns, ("zeta/**", "app/room-*"))
        self.assertFalse(grant.allows_channel("zeta/x"))
        self.assertTrue(grant.allows_channel("app/room-1"))

    def test_malformed_structure(self) -> None:
        """
        Tokens that are not three base64url segments of JSON objects close with 4001.
        """
        valid = _token()
        head, body, signature = valid.split(".")
        for token in [
            "",
            "abc",
            f"{head}.{body}",
            f"{valid}.{signature}",
            "!!!.@@@.###",
            f"{head}!.{body}.{signature}",
            f"{head}.{body}*.{signature}",
            f"{_b64(b'not json')}.{body}.{signature}",
            f"{_b64(b'[1,2]')}.{body}.{signature}",
            f"{_b64(bytes([0xFF, 0xFE]))}.{body}.{signature}",
        ]:
            self.assertRefused(token, 4001)

    def test_non_ascii_and_extensions(self) -> None:
        """
        Non-ASCII tokens, and tokens asking for an extension we do not implement (C{crit}, an
        unencoded payload), close with 4001 even when correctly signed.
        """
        head, body, signature = _token().split(".")
        self.assertRefused(f"{head}\u00e9.{body}.{signature}", 4001)
        self.assertRefused(f"{head}.{body}.{signature}\ud800", 4001)
        for extra in [{"crit": ["exp"]}, {"crit": ["b64"], "b64": False}, {"b64": False}]:
            self.assertRefused(_hand_token({"alg": "HS256", "kid": "sk_id_main", **extra}, _claims()), 4001)

    def test_padded_segments(self) -> None:
        """
        Trailing C{=} padding on a whole quantum is accepted, as PyJWT accepts it; padding that
        does not fill a quantum, too much of it, and non-canonical spellings close with 4001.
        """
        head, body, signature = _token().split(".")
        # The header and payload are signed as they are spelled: only the signature can be padded.
        self.assertEqual(self.verify(f"{head}.{body}.{signature}=").peer_id, "u_1042")
        self.assertRefused(f"{head}.{body}.{signature}===", 4001)
        self.assertRefused(f"{head}=.{body}.{signature}", 4001)
        # The last character of a 43-character signature carries 2 spare bits.
        last = signature[-1]
        odd = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        twin = odd[odd.index(last) ^ 1]
        self.assertRefused(f"{head}.{body}.{signature[:-1]}{twin}", 4001)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 400), st.sampled_from([*"AQgw-_=.!+/ \u00e9", "", "=="])), max_size=3))
    def test_agrees_with_pyjwt(self, edits: list[tuple[int, str]]) -> None:
        """
        A valid token with a few characters replaced, inserted or removed anywhere is accepted
        exactly when PyJWT's C{get_unverified_header} and C{decode} with the key's secret accept it.
        """
        token = _token()
        for position, text in edits:
            at = position % (len(token) + 1)
            token = token[:at] + text + token[at + (1 if position % 2 else 0) :]
        try:
            header = jwt.get_unverified_header(token)
            expected = header.get("alg") == "HS256" and header.get("kid") == "sk_id_main"
            if expected:
                jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})
        except (jwt.PyJWTError, UnicodeError):
            expected = False
        try:
            verify_token(token, KEYS.get, NOW)
            accepted = True
        except Refusal:
            accepted = False
        self.assertEqual(accepted, expected, token)

    def test_claims_parsed_as_pyjwt_parses_them(self) -> None:
        """
        Claims are read as PyJWT's parser (the stdlib's) reads them, where orjson alone would
        not: an integer beyond 64 bits stays an integer (an C{exp} out of range, not a missing
        one), and a lone surrogate, which orjson refuses, is judged by the claim's own check.
        """
        header = {"alg": "HS256", "kid": "sk_id_main"}
        claims = json.dumps(_claims(exp=...), separators=(",", ":"))[:-1]
        long_exp = _b64(f'{claims},"exp":123456789012345678901234}}'.encode())
        self.assertEqual(self.assertRefused(_hand_token(header, long_exp)).reason, "exp out of range")
        lone_surrogate = _b64(f'{{"sub":"u_\\ud800","exp":{NOW + 60}}}'.encode())
        self.assertEqual(self.assertRefused(_hand_token(header, lone_surrogate)).reason, "invalid sub")

    def test_payload_not_object(self) -> None:
        """
        A correctly signed token whose payload is not a JSON object closes with 4001.
        """
        header = {"alg": "HS256", "kid": "sk_id_main"}
        for payload in [_b64(b"not json"), _json_segment(["u_1042"]), _json_segment("u_1042"), _json_segment(None)]:
            self.assertRefused(_hand_token(header, payload), 4001)

    def test_minted_token_verifies(self) -> None:
        """
        A token from L{mint_token} verifies to the grant it describes.
        """
        token = mint_token(
            KEYS["sk_id_narrow"],
            "u_7",
            now=NOW,
            expires_in=600,
            channels=["app/room-*"],
            permissions=["subscribe"],
            peer_metadata={"name": "Lin"},
            metadata={"k": [1]},
        )
        self.assertEqual(
            self.verify(token),
            Grant(
                app_id="app_a",
                key_id="sk_id_narrow",
                peer_id="u_7",
                actions=frozenset({"subscribe"}),
                key_patterns=("app/**",),
                claim_patterns=("app/room-*",),
                peer_metadata={"name": "Lin"},
                metadata={"k": [1]},
                expires_at=NOW + 600,
                auto_inject_turn=False,
            ),
        )


_JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=10,
)


class ParseJsonTests(SynchronousTestCase):
    """
    Tests for C{auth._parse_json}: orjson where it reads a document as the stdlib does.
    """

    def assertSameAsStdlib(self, data: bytes) -> None:
        try:
            expected: Any = ("value", json.dumps(json.loads(data)))
        except (ValueError, RecursionError):
            expected = "refused"
        try:
            parsed: Any = ("value", json.dumps(_parse_json(data)))
        except (ValueError, RecursionError):
            parsed = "refused"
        self.assertEqual(parsed, expected, data)

    @settings(max_examples=300, deadline=None)
    @given(_JSON_TEXT, st.booleans(), st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]))
    def test_agrees_with_stdlib(self, value: Any, ascii_only: bool, encoding: str) -> None:
        """
        Any document (NaN, infinities, big integers, lone surrogates, other encodings included)
        parses to the stdlib's value, or is refused when the stdlib refuses it.
        """
        self.assertSameAsStdlib(json.dumps(value, ensure_ascii=ascii_only).encode(encoding, "surrogatepass"))

    def test_edge_documents(self) -> None:
        """
        Documents on which orjson and the stdlib disagree, or which both refuse.
        """
        for data in [
            b"123456789012345678901234",
            b"18446744073709551616",
            b'{"a":1,"a":2}',
            b"NaN",
            b"[-Infinity]",
            b"1e400",
            b'"\\ud800"',
            b"\xef\xbb\xbf{}",
            b"\xff",
            b"[" * 100_000,
            b"",
            b"{} x",
        ]:
            self.assertSameAsStdlib(data)


class KeyCacheTests(SynchronousTestCase):
    """
    The per-kid HMAC state of L{verify_token} never outlives what the key store says.
    """

    def setUp(self) -> None:
        self.keys = {"sk_id_main": KEYS["sk_id_main"]}
        auth._macs.forget("sk_id_main")

    def verify(self, token: str) -> Grant:
        return verify_token(token, self.keys.get, NOW)

    def refused(self, token: str) -> Refusal:
        refusal = self.assertRaises(Refusal, verify_token, token, self.keys.get, NOW)
        self.assertEqual(refusal.code, 4001)
        return refusal

    def test_rotated_secret(self) -> None:
        """
        Once the key store holds a new secret for a kid, tokens signed with the old one are
        refused and tokens signed with the new one accepted, though the old one was cached.
        """
        self.verify(_token())
        self.keys["sk_id_main"] = attrs.evolve(KEYS["sk_id_main"], secret=OTHER_SECRET)
        self.refused(_token())
        self.verify(_token(secret=OTHER_SECRET))
        self.keys["sk_id_main"] = KEYS["sk_id_main"]
        self.refused(_token(secret=OTHER_SECRET))
        self.verify(_token())

    def test_revoked(self) -> None:
        """
        A revoked or deleted key refuses tokens it signed, though it was cached, and its secret
        leaves the cache.
        """
        for gone in (attrs.evolve(KEYS["sk_id_main"], revoked=True), None):
            self.keys["sk_id_main"] = KEYS["sk_id_main"]
            self.verify(_token())
            self.assertIn("sk_id_main", auth._macs._macs)
            if gone is None:
                del self.keys["sk_id_main"]
            else:
                self.keys["sk_id_main"] = gone
            self.assertEqual(self.refused(_token()).reason, "key not found")
            self.assertNotIn("sk_id_main", auth._macs._macs)

    def test_bounded(self) -> None:
        """
        The cache holds at most its limit of kids, whatever the number of keys.
        """
        cache = auth._MacCache(limit=3)
        for n in range(10):
            mac = cache.mac(f"sk_id_{n}", SECRET)
            mac.update(b"x")
            self.assertEqual(mac.digest(), hmac.new(SECRET.encode(), b"x", hashlib.sha256).digest())
            self.assertLessEqual(len(cache), 3)


class GrantTests(SynchronousTestCase):
    """
    Tests for L{Grant}'s channel authorization (§4.4, §9.4).
    """

    def _grant(self, claim_patterns: tuple[str, ...] | None) -> Grant:
        return Grant(
            app_id="app_a",
            key_id="sk_id_narrow",
            peer_id="u",
            actions=ALL,
            key_patterns=("app/**",),
            claim_patterns=claim_patterns,
            peer_metadata=None,
            metadata=None,
            expires_at=None,
            auto_inject_turn=True,
        )

    def test_allows_channel_key_only(self) -> None:
        """
        Without channel claims, the key's patterns decide.
        """
        grant = self._grant(None)
        self.assertTrue(grant.allows_channel("app/room-1"))
        self.assertTrue(grant.allows_channel("app/a/b"))
        self.assertFalse(grant.allows_channel("zeta/x"))
        self.assertFalse(grant.allows_channel("App/room-1"))

    def test_allows_channel_narrowed(self) -> None:
        """
        Channel claims narrow the key's patterns: a channel must match both.
        """
        grant = self._grant(("app/room-*", "zeta/**"))
        self.assertTrue(grant.allows_channel("app/room-1"))
        self.assertTrue(grant.allows_channel("app/room-"))
        self.assertFalse(grant.allows_channel("app/room-1/x"))
        self.assertFalse(grant.allows_channel("app/lobby"))
        self.assertFalse(grant.allows_channel("zeta/x"))

    def test_allows_pattern_key_only(self) -> None:
        """
        Without channel claims, a pattern is allowed only if the key's patterns include it.
        """
        grant = self._grant(None)
        self.assertTrue(grant.allows_pattern("app/**"))
        self.assertTrue(grant.allows_pattern("app/*"))
        self.assertTrue(grant.allows_pattern("app/*/events"))
        self.assertFalse(grant.allows_pattern("**"))
        self.assertFalse(grant.allows_pattern("*/x"))

    def test_allows_pattern_narrowed(self) -> None:
        """
        With channel claims, a pattern must be included in both the key's and the claim's patterns.
        """
        grant = self._grant(("app/room-*",))
        self.assertTrue(grant.allows_pattern("app/room-*"))
        self.assertTrue(grant.allows_pattern("app/room-1*"))
        self.assertTrue(grant.allows_pattern("app/room-1"))
        self.assertFalse(grant.allows_pattern("app/*"))
        self.assertFalse(grant.allows_pattern("app/**"))
        self.assertFalse(grant.allows_pattern("app/room-**"))
        self.assertFalse(grant.allows_pattern("app/room-*/x"))


class AuthenticateTests(_AuthAssertions):
    """
    Tests for L{authenticate}: credential choice, app checks and publishable keys.
    """

    def authenticate(self, params: dict, origin: str | None = None, **kwargs: Any) -> Grant:
        return authenticate(params, origin, KEYS.get, APPS.get, NOW, **kwargs)

    def assertAuthRefused(self, params: dict, code: int, origin: str | None = None) -> Refusal:
        """
        Authenticating C{params} is refused with exactly close code C{code}.
        """
        refusal = self.assertRaises(Refusal, authenticate, params, origin, KEYS.get, APPS.get, NOW)
        self.assertEqual(refusal.code, code)
        return refusal

    def test_token(self) -> None:
        """
        A valid token authenticates to its grant.
        """
        grant = self.authenticate({"token": [_token()]})
        self.assertEqual((grant.app_id, grant.peer_id, grant.expires_at), ("app_a", "u_1042", NOW + 3600))

    def test_both_credentials(self) -> None:
        """
        Giving both token and key closes with 4001.
        """
        self.assertAuthRefused({"token": [_token()], "key": ["pk_live_open"]}, 4001)

    def test_no_credential(self) -> None:
        """
        Giving neither token nor key closes with 4001.
        """
        self.assertAuthRefused({}, 4001)
        self.assertAuthRefused({"other": ["x"]}, 4001)
        self.assertAuthRefused({"token": [], "key": []}, 4001)

    def test_repeated_credential(self) -> None:
        """
        Two tokens or two keys close with 4001.
        """
        self.assertAuthRefused({"token": [_token(), _token()]}, 4001)
        self.assertAuthRefused({"key": ["pk_live_open", "pk_live_open"]}, 4001)

    def test_token_refusal_passes_through(self) -> None:
        """
        A token refusal keeps its close code through L{authenticate}.
        """
        self.assertAuthRefused({"token": [_token(_claims(exp=NOW))]}, 4002)
        self.assertAuthRefused({"token": ["garbage"]}, 4001)

    def test_suspended_app_token(self) -> None:
        """
        A valid token of a suspended app closes with 4012.
        """
        refusal = self.assertAuthRefused({"token": [_token(kid="sk_id_suspended")]}, 4012)
        self.assertEqual(refusal.reason, "account_suspended")

    def test_suspended_app_expired_token(self) -> None:
        """
        An expired token of a suspended app closes with 4002: expiry is checked first (§4.3).
        """
        self.assertAuthRefused({"token": [_token(_claims(exp=NOW - 1), kid="sk_id_suspended")]}, 4002)

    def test_suspended_app_publishable(self) -> None:
        """
        A publishable key of a suspended app closes with 4012.
        """
        self.assertAuthRefused({"key": ["pk_live_suspended"]}, 4012)

    def test_unknown_app(self) -> None:
        """
        A key whose app no longer exists closes with 4001.
        """
        self.assertAuthRefused({"token": [_token(kid="sk_id_orphan")]}, 4001)

    def test_publishable(self) -> None:
        """
        A publishable key yields a never-expiring grant with a UUID peerId and the key's actions and patterns.
        """
        grant = self.authenticate({"key": ["pk_live_open"]})
        self.assertEqual(uuid.UUID(grant.peer_id).version, 4)
        self.assertEqual(str(uuid.UUID(grant.peer_id)), grant.peer_id)
        self.assertEqual(
            grant,
            Grant(
                app_id="app_a",
                key_id="pk_live_open",
                peer_id=grant.peer_id,
                actions=frozenset({"subscribe", "publish", "presence"}),
                key_patterns=("public/**",),
                claim_patterns=None,
                peer_metadata=None,
                metadata=None,
                expires_at=None,
                auto_inject_turn=True,
            ),
        )

    def test_publishable_fresh_peer_id(self) -> None:
        """
        Every publishable-key connection gets a different peerId.
        """
        ids = {self.authenticate({"key": ["pk_live_open"]}).peer_id for _ in range(20)}
        self.assertEqual(len(ids), 20)

    def test_publishable_peer_id_source(self) -> None:
        """
        The peerId comes from the injected generator.
        """
        grant = self.authenticate({"key": ["pk_live_open"]}, new_peer_id=lambda: "fixed-id")
        self.assertEqual(grant.peer_id, "fixed-id")

    def test_publishable_unknown(self) -> None:
        """
        An unknown publishable key closes with 4001.
        """
        self.assertAuthRefused({"key": ["pk_live_nobody"]}, 4001)
        self.assertAuthRefused({"key": [""]}, 4001)

    def test_publishable_revoked(self) -> None:
        """
        A revoked publishable key closes with 4001.
        """
        self.assertAuthRefused({"key": ["pk_live_revoked"]}, 4001)

    def test_publishable_secret_key_id(self) -> None:
        """
        A secret key id given as a publishable key closes with 4001.
        """
        self.assertAuthRefused({"key": ["sk_id_main"]}, 4001)

    def test_publishable_token_as_key(self) -> None:
        """
        A JWT given as C{key} closes with 4001.
        """
        self.assertAuthRefused({"key": [_token()]}, 4001)

    def test_origin_listed(self) -> None:
        """
        A listed Origin is accepted.
        """
        for origin in ["https://example.org", "http://localhost:3000"]:
            self.assertEqual(self.authenticate({"key": ["pk_live_origins"]}, origin).key_id, "pk_live_origins")

    def test_origin_not_listed(self) -> None:
        """
        An unlisted Origin closes with 4001 and reason C{origin_not_allowed}
        (exact match on scheme, host and port).
        """
        for origin in [
            "https://evil.example",
            "http://example.org",
            "https://example.org:8443",
            "https://EXAMPLE.org.evil",
            "null",
            "",
        ]:
            refusal = self.assertAuthRefused({"key": ["pk_live_origins"]}, 4001, origin)
            self.assertEqual(refusal.reason, "origin_not_allowed")

    def test_no_origin(self) -> None:
        """
        A client without an Origin header (not a browser) is allowed.
        """
        self.assertEqual(self.authenticate({"key": ["pk_live_origins"]}, None).key_id, "pk_live_origins")

    def test_empty_origin_list(self) -> None:
        """
        An empty allowedOrigins list accepts any Origin.
        """
        grant = self.authenticate({"key": ["pk_live_open"]}, "https://anything.example")
        self.assertEqual(grant.key_id, "pk_live_open")

    def test_verify_publishable_direct(self) -> None:
        """
        L{verify_publishable} refuses secret-key ids with 4001 and grants publishable ones.
        """
        refusal = self.assertRaises(Refusal, verify_publishable, "sk_id_main", None, KEYS.get, lambda: "p")
        self.assertEqual(refusal.code, 4001)
        self.assertEqual(verify_publishable("pk_live_open", None, KEYS.get, lambda: "p").peer_id, "p")


#: PyJWT options to read a minted token's claims without consulting the real clock.
UNCHECKED_TIMES: Any = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}


class MintTokenTests(SynchronousTestCase):
    """
    Tests for L{mint_token} (§19.2).
    """

    key = KEYS["sk_id_narrow"]

    def assertMintError(self, field: str, code: str, peer_id: str = "u_1", **kwargs: Any) -> MintError:
        """
        Minting with C{kwargs} fails naming C{field} with REST code C{code}.
        """
        kwargs.setdefault("now", NOW)
        error = self.assertRaises(MintError, mint_token, kwargs.pop("key", self.key), peer_id, **kwargs)
        self.assertEqual((error.field, error.code), (field, code))
        self.assertTrue(error.message)
        return error

    def test_header(self) -> None:
        """
        A minted token's header is HS256 with the key id as kid.
        """
        header = jwt.get_unverified_header(mint_token(self.key, "u_1", now=NOW))
        self.assertEqual((header["alg"], header["kid"]), ("HS256", "sk_id_narrow"))

    def test_default_claims(self) -> None:
        """
        Without options the token carries sub, iat and exp one hour later, and nothing else.
        """
        token = mint_token(self.key, "u_1", now=NOW)
        claims = jwt.decode(token, OTHER_SECRET, algorithms=["HS256"], options=UNCHECKED_TIMES)
        self.assertEqual(claims, {"sub": "u_1", "iat": NOW, "exp": NOW + 3600})

    def test_ice_servers_checked(self) -> None:
        """
        A C{metadata.iceServers} the SDK would drop is refused at mint time;
        a valid one is carried unchanged.
        """
        error = self.assertMintError(
            "metadata", "invalid_request", metadata={"iceServers": [{"urls": "http://not-ice.example"}]}
        )
        self.assertIn("iceServers", error.message)
        self.assertMintError("metadata", "invalid_request", metadata={"iceServers": "stun:x"})
        servers = [{"urls": ["turn:turn.example.org:443?transport=tcp"], "username": "u", "credential": "c"}]
        token = mint_token(self.key, "u_1", now=NOW, metadata={"iceServers": servers, "room": 7})
        claims = jwt.decode(token, OTHER_SECRET, algorithms=["HS256"], options=UNCHECKED_TIMES)
        self.assertEqual(claims["metadata"], {"iceServers": servers, "room": 7})

    def test_round_trip(self) -> None:
        """
        A minted token verifies until its exp and is expired (4002) at it.
        """
        token = mint_token(self.key, "u_1", now=NOW, expires_in=86400)
        grant = verify_token(token, KEYS.get, NOW + 86399)
        self.assertEqual((grant.peer_id, grant.expires_at, grant.actions), ("u_1", NOW + 86400, self.key.actions))
        refusal = self.assertRaises(Refusal, verify_token, token, KEYS.get, NOW + 86400)
        self.assertEqual(refusal.code, 4002)

    def test_all_claims(self) -> None:
        """
        Channels, permissions and both metadata bags are written as claims.
        """
        token = mint_token(
            self.key,
            "u_1",
            now=NOW,
            channels=("app/room-*", "app/x"),
            permissions=iter(["publish"]),
            metadata={"iceServers": []},
            peer_metadata={"name": "Ada"},
        )
        claims = jwt.decode(token, OTHER_SECRET, algorithms=["HS256"], options=UNCHECKED_TIMES)
        self.assertEqual(
            claims,
            {
                "sub": "u_1",
                "iat": NOW,
                "exp": NOW + 3600,
                "channels": ["app/room-*", "app/x"],
                "permissions": ["publish"],
                "metadata": {"iceServers": []},
                "peerMetadata": {"name": "Ada"},
            },
        )

    def test_publishable_key(self) -> None:
        """
        A publishable key cannot mint tokens.
        """
        self.assertMintError("key", "invalid_request", key=KEYS["pk_live_signed"])

    def test_peer_id_invalid(self) -> None:
        """
        An empty, 129-character, non-ASCII or control-character peerId is refused.
        """
        for peer_id in ["", "u" * 129, "caf\u00e9", "u\x00", "u\x7f"]:
            self.assertMintError("peerId", "invalid_request", peer_id=peer_id)

    def test_expires_in_invalid(self) -> None:
        """
        expiresInSec of 0, -1, 86401, a boolean, a float or a string is refused.
        """
        for expires_in in [0, -1, 86401, True, 3600.0, "3600"]:
            self.assertMintError("expiresInSec", "invalid_request", expires_in=expires_in)

    def test_expires_in_bounds(self) -> None:
        """
        expiresInSec of 1 and 86400 are accepted.
        """
        for expires_in in [1, 86400]:
            token = mint_token(self.key, "u_1", now=NOW, expires_in=expires_in)
            self.assertEqual(verify_token(token, KEYS.get, NOW).expires_at, NOW + expires_in)

    def test_channels_outside_key(self) -> None:
        """
        Channels not covered by the key's patterns are C{channel_not_authorized}.
        """
        for channels in [["zeta/x"], ["app/x", "**"], ["app*"], ["zeta/**"]]:
            self.assertMintError("channels", "channel_not_authorized", channels=channels)

    def test_channels_shape(self) -> None:
        """
        Over 100 channels, an empty, non-string or invalid pattern entry is C{invalid_request}.
        """
        self.assertMintError("channels", "invalid_request", channels=[f"app/{i}" for i in range(101)])
        self.assertMintError("channels", "invalid_request", channels=[""])
        self.assertMintError("channels", "invalid_request", channels=["app/x", 5])
        self.assertMintError("channels", "invalid_request", channels=["app/\\x"])

    def test_channels_cap(self) -> None:
        """
        Exactly 100 channels inside the key are accepted.
        """
        channels = [f"app/{i}" for i in range(100)]
        token = mint_token(self.key, "u_1", now=NOW, channels=channels)
        self.assertEqual(verify_token(token, KEYS.get, NOW).claim_patterns, tuple(channels))

    def test_permissions_outside_key(self) -> None:
        """
        A known permission the key lacks is C{action_not_permitted}.
        """
        self.assertMintError("permissions", "action_not_permitted", permissions=["subscribe", "send"])

    def test_permissions_unknown(self) -> None:
        """
        An unknown permission is C{invalid_request} on the REST side.
        """
        for permissions in [["fly"], ["Publish"], [5]]:
            self.assertMintError("permissions", "invalid_request", permissions=permissions)

    def test_permissions_cap(self) -> None:
        """
        17 permissions are C{invalid_request}.
        """
        self.assertMintError("permissions", "invalid_request", permissions=["publish"] * 17)

    def test_metadata_too_big(self) -> None:
        """
        metadata over 8192 bytes and peerMetadata over 4096 bytes serialized are refused; the caps themselves fit.
        """
        self.assertMintError("metadata", "invalid_request", metadata=_metadata_of_size(8193))
        self.assertMintError("peerMetadata", "invalid_request", peer_metadata=_metadata_of_size(4097))
        token = mint_token(
            self.key, "u_1", now=NOW, metadata=_metadata_of_size(8192), peer_metadata=_metadata_of_size(4096)
        )
        grant = verify_token(token, KEYS.get, NOW)
        self.assertEqual((grant.metadata, grant.peer_metadata), (_metadata_of_size(8192), _metadata_of_size(4096)))

    def test_metadata_not_object(self) -> None:
        """
        metadata or peerMetadata that is not a JSON object is refused.
        """
        for value in [[1], "x", 3]:
            self.assertMintError("metadata", "invalid_request", metadata=value)
            self.assertMintError("peerMetadata", "invalid_request", peer_metadata=value)


class NestingTests(SynchronousTestCase):
    """
    Deeply nested JSON in a token is refused, never a crash.
    """

    def test_deep_peer_metadata(self) -> None:
        """
        A peerMetadata nesting past the limit (but small) closes 4001.
        """
        value: object = {}
        for _ in range(MAX_JSON_DEPTH + 5):
            value = {"k": value}
        token = jwt.encode(
            {"sub": "u_1", "exp": NOW + 60, "peerMetadata": value},
            SECRET,
            algorithm="HS256",
            headers={"kid": "sk_id_main"},
        )
        refusal = self.assertRaises(Refusal, verify_token, token, KEYS.get, NOW)
        self.assertEqual(refusal.code, 4001)

    def test_deep_header(self) -> None:
        """
        A header nested past what the JSON parser can take, from someone
        without any secret, is 4001 rather than an internal error (PyJWT
        turns the parser's RecursionError into a DecodeError).
        """
        header = base64.urlsafe_b64encode(b'{"alg":' + b"[" * 100000 + b"]" * 100000 + b"}").rstrip(b"=")
        token = header.decode() + ".e30.c2ln"
        refusal = self.assertRaises(Refusal, verify_token, token, KEYS.get, NOW)
        self.assertEqual(refusal.code, 4001)

    def test_deep_metadata_mint(self) -> None:
        """
        Minting refuses metadata nesting past the limit, naming the field.
        """
        value: object = {}
        for _ in range(MAX_JSON_DEPTH + 5):
            value = {"k": value}
        error = self.assertRaises(MintError, mint_token, KEYS["sk_id_main"], "u_1", now=NOW, metadata=value)
        self.assertEqual(error.field, "metadata")
