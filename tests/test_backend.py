"""
Tests for L{meteredrt.backend}, against the fake Metered TURN API of
L{tests.test_turn} served through L{treq.testing.StubTreq}.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import ACTIONS, Key, KeyType
from meteredrt.auth import MAX_METADATA_BYTES, MintError, verify_token
from meteredrt.backend import mint_token_with_turn
from meteredrt.turn import TurnApiClient, TurnApiError, credential_lifetime

from .test_turn import CREATE_PATH, HOUR, LIST_PATH, SECRET, FakeTurnApi, config, expected_list

NOW = 1_767_222_000

SECRET_KEY = Key(
    "sk_id_backend",
    "app1",
    KeyType.SECRET,
    ("room/*",),
    ACTIONS,
    secret="sk_secret_backend_0123456789abcdef",
)
PUBLISHABLE_KEY = Key("pk_live_backend", "app1", KeyType.PUBLISHABLE, ("room/*",), ACTIONS)

JWT_LIST = [{"urls": "stun:stun.backend.example:3478"}]


class TurnCredentialLifetimeTests(SynchronousTestCase):
    """
    Tests for L{credential_lifetime}.
    """

    def test_follows_token(self) -> None:
        """
        Within the [1 h, 24 h] bounds the credential lives as long as the token.
        """
        self.assertEqual(credential_lifetime(2 * HOUR), 2 * HOUR)

    def test_bounds(self) -> None:
        """
        The credential lives at least an hour and at most a day.
        """
        self.assertEqual(credential_lifetime(60), HOUR)
        self.assertEqual(credential_lifetime(HOUR), HOUR)
        self.assertEqual(credential_lifetime(86400), 86400)
        self.assertEqual(credential_lifetime(10 * 86400), 86400)


class MintTokenWithTurnTests(SynchronousTestCase):
    """
    Tests for L{mint_token_with_turn}.
    """

    def setUp(self) -> None:
        self.api = FakeTurnApi()
        self.clock = Clock()
        self.client = TurnApiClient(StubTreq(self.api), self.clock)

    def mint(
        self, key: Key = SECRET_KEY, peer_id: str = "u_1042", **kwargs: Any
    ) -> Deferred[tuple[str, int]]:
        """
        Mint through the fake TURN API at L{NOW}.
        """
        return Deferred.fromCoroutine(
            mint_token_with_turn(key, peer_id, self.client, config(), now=NOW, **kwargs)
        )

    def claims(self, token: str) -> Any:
        """
        Verify C{token} as the WebSocket handshake would and return what it
        grants.
        """
        return verify_token(token, {SECRET_KEY.key_id: SECRET_KEY}.get, NOW)

    def test_mint(self) -> None:
        """
        The token carries the new credential's ICE servers at
        C{metadata.iceServers} and expires C{expires_in} from now.
        """
        token, expires_at = self.successResultOf(self.mint(expires_in=900))
        self.assertEqual(expires_at, NOW + 900)
        grant = self.claims(token)
        self.assertEqual(grant.peer_id, "u_1042")
        self.assertEqual(grant.expires_at, NOW + 900)
        self.assertEqual(grant.metadata, {"iceServers": expected_list(1)})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_credential_request(self) -> None:
        """
        One credential is created with the remaining lifetime of the token and
        the peerId as its label, and its list is fetched with its apiKey.
        """
        self.successResultOf(self.mint(expires_in=2 * HOUR))
        [(method, path, args, body), listing] = self.api.requests
        self.assertEqual(
            (method, path, args), (b"POST", CREATE_PATH, {b"secretKey": [SECRET.encode()]})
        )
        self.assertEqual(body, {"expiryInSeconds": 2 * HOUR, "label": "u_1042"})
        self.assertEqual(listing[:3], (b"GET", LIST_PATH, {b"apiKey": [b"key1"]}))

    def test_short_token_hour_credential(self) -> None:
        """
        A token shorter than an hour still gets an hour-long credential.
        """
        self.successResultOf(self.mint(expires_in=300))
        self.assertEqual(self.api.requests[0][3]["expiryInSeconds"], HOUR)

    def test_fresh_credential_per_call(self) -> None:
        """
        Every call creates its own credential: a backend mints per peer.
        """
        first, _ = self.successResultOf(self.mint())
        second, _ = self.successResultOf(self.mint(peer_id="u_7"))
        self.assertEqual(self.claims(first).metadata["iceServers"], expected_list(1))
        self.assertEqual(self.claims(second).metadata["iceServers"], expected_list(2))

    def test_caller_metadata_kept(self) -> None:
        """
        The caller's metadata fields stay next to the injected list, and the
        caller's dict is not changed.
        """
        metadata = {"room": "room/7", "role": "host"}
        token, _ = self.successResultOf(self.mint(metadata=metadata))
        self.assertEqual(
            self.claims(token).metadata,
            {"room": "room/7", "role": "host", "iceServers": expected_list(1)},
        )
        self.assertEqual(metadata, {"room": "room/7", "role": "host"})

    def test_other_claims(self) -> None:
        """
        Channels, permissions and peer metadata reach the token unchanged,
        even when given as one-shot iterables.
        """
        token, _ = self.successResultOf(
            self.mint(
                channels=iter(["room/7"]),
                permissions=iter(["subscribe", "send"]),
                peer_metadata={"name": "Ada"},
            )
        )
        grant = self.claims(token)
        self.assertEqual(grant.claim_patterns, ("room/7",))
        self.assertEqual(grant.actions, frozenset({"subscribe", "send"}))
        self.assertEqual(grant.peer_metadata, {"name": "Ada"})

    def test_caller_ice_servers_win(self) -> None:
        """
        Metadata that already carries C{iceServers} is minted as given and
        the TURN API is not called.
        """
        metadata = {"iceServers": JWT_LIST, "room": "room/7"}
        token, expires_at = self.successResultOf(self.mint(metadata=metadata))
        self.assertEqual(self.claims(token).metadata, metadata)
        self.assertEqual(expires_at, NOW + 3600)
        self.assertEqual(self.api.requests, [])

    def test_caller_ice_servers_checked(self) -> None:
        """
        A caller-supplied list the SDK would drop is refused with the
        reason, before any TURN call.
        """
        failure = self.failureResultOf(
            self.mint(metadata={"iceServers": [{"urls": "https://turn.example/"}]}), MintError
        )
        self.assertEqual(failure.value.field, "metadata")
        self.assertIn("iceServers[0]", failure.value.message)
        self.assertIn("stun:", failure.value.message)
        self.assertEqual(self.api.requests, [])

    def test_bad_claims_cost_nothing(self) -> None:
        """
        A request that cannot be minted fails before a credential is
        created.
        """
        cases = [
            (dict(peer_id=""), "peerId"),
            (dict(key=PUBLISHABLE_KEY), "key"),
            (dict(expires_in=0), "expiresInSec"),
            (dict(channels=["elsewhere"]), "channels"),
            (dict(metadata=["not", "an", "object"]), "metadata"),
        ]
        for kwargs, field in cases:
            failure = self.failureResultOf(self.mint(**kwargs), MintError)
            self.assertEqual(failure.value.field, field)
        self.assertEqual(self.api.requests, [])

    def test_metadata_overflow(self) -> None:
        """
        Metadata that fits alone but not with the ICE server list is refused
        as too large.
        """
        metadata = {"notes": "x" * (MAX_METADATA_BYTES - 100)}
        failure = self.failureResultOf(self.mint(metadata=metadata), MintError)
        self.assertEqual(failure.value.field, "metadata")
        self.assertIn(f"larger than {MAX_METADATA_BYTES} bytes", failure.value.message)

    def test_api_errors(self) -> None:
        """
        An unusable TURN API answer, from either call, fails the mint with a
        L{TurnApiError} naming the cause.
        """
        for create_mode, list_mode, fragment in [
            ("unauthorized", "ok", "HTTP 401"),
            ("server_error", "ok", "HTTP 500"),
            ("malformed", "ok", "invalid JSON"),
            ("ok", "bad_request", "HTTP 400"),
            ("ok", "oversized", "at most 16"),
            ("ok", "bad_scheme", "does not start with stun:"),
        ]:
            self.api.create_mode, self.api.list_mode = create_mode, list_mode
            failure = self.failureResultOf(self.mint(), TurnApiError)
            self.assertIn(fragment, str(failure.value))
            self.assertNotIn(SECRET, str(failure.value))

    def test_timeout(self) -> None:
        """
        A TURN API that does not answer fails the mint after the client's
        timeout, leaving no timer behind.
        """
        self.api.create_mode = "hang"
        minted = self.mint()
        self.clock.advance(1.9)
        self.assertNoResult(minted)
        self.clock.advance(0.1)
        failure = self.failureResultOf(minted, TurnApiError)
        self.assertIn("no answer within 2 s", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])
