"""
Tests for L{meteredrt.rest.tokens}: C{POST /v1/tokens} (§19.2).
"""

from __future__ import annotations

import json

import jwt
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import App
from meteredrt.auth import verify_token
from meteredrt.turn import TurnApiClient
from tests.rest_support import APP_A, FULL, NARROW, START, RestWorld, bearer
from tests.test_turn import FakeTurnApi, config, expected_list


class MintTokenTests(SynchronousTestCase):
    """
    Minting tokens, and every §19.2 rule.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def mint(self, body: object, **kw: object):  # type: ignore[no-untyped-def]
        return self.world.post("/v1/tokens", body, **kw)  # type: ignore[arg-type]

    def assertRefused(self, body: object, status: int, code: str, field: str, **kw: object) -> None:
        reply = self.mint(body, **kw)
        self.assertEqual((reply.status, reply.json["error"]), (status, code), reply.json)
        self.assertIn(field, reply.json["message"])

    def test_minimal(self) -> None:
        """
        A peerId alone gives an HS256 JWT with C{kid} = the key id, signed
        with its secret, valid for an hour, that the WebSocket path accepts.
        """
        reply = self.mint({"peerId": "u_1042"})
        self.assertEqual(reply.status, 200)
        token = reply.json["token"]
        self.assertEqual(reply.json["expiresAt"], int(START) + 3600)
        self.assertEqual(jwt.get_unverified_header(token), {"alg": "HS256", "kid": FULL.key_id, "typ": "JWT"})
        grant = verify_token(token, self.world.keys.key, START)
        self.assertEqual((grant.peer_id, grant.actions, grant.claim_patterns), ("u_1042", FULL.actions, None))

    def test_every_field(self) -> None:
        """
        Channels, permissions, lifetime and both metadata objects become
        claims.
        """
        reply = self.mint(
            {
                "peerId": "u_1",
                "channels": ["demo/room-7", "demo/lobby"],
                "permissions": ["subscribe", "presence"],
                "expiresInSec": 60,
                "metadata": {"iceServers": [{"urls": "stun:stun.example.org:3478"}]},
                "peerMetadata": {"name": "Ada"},
            }
        )
        self.assertEqual(reply.status, 200, reply.json)
        self.assertEqual(reply.json["expiresAt"], int(START) + 60)
        grant = verify_token(reply.json["token"], self.world.keys.key, START)
        self.assertEqual(grant.actions, frozenset({"subscribe", "presence"}))
        self.assertEqual(grant.claim_patterns, ("demo/room-7", "demo/lobby"))
        self.assertEqual(grant.peer_metadata, {"name": "Ada"})
        self.assertEqual(grant.metadata, {"iceServers": [{"urls": "stun:stun.example.org:3478"}]})

    def test_peer_id(self) -> None:
        """
        peerId is required, a string, printable ASCII of 1-128 characters.
        """
        for body in ({}, {"peerId": ""}, {"peerId": 7}, {"peerId": "a" * 129}, {"peerId": "caf\u00e9"}, {"peerId": "a\tb"}):
            self.assertRefused(body, 400, "invalid_request", "peerId")
        self.assertEqual(self.mint({"peerId": "a" * 128}).status, 200)

    def test_expires_in(self) -> None:
        """
        expiresInSec is an integer from 1 to 86400.
        """
        for value in (0, -1, 86401, 1.5, "60", True):
            self.assertRefused({"peerId": "u", "expiresInSec": value}, 400, "invalid_request", "expiresInSec")
        reply = self.mint({"peerId": "u", "expiresInSec": 86400})
        self.assertEqual(reply.json["expiresAt"], int(START) + 86400)

    def test_channels(self) -> None:
        """
        channels is an array of at most 100 valid patterns inside the key's
        patterns; outside is 403 channel_not_authorized.
        """
        self.assertRefused({"peerId": "u", "channels": "demo/a"}, 400, "invalid_request", "channels")
        self.assertRefused({"peerId": "u", "channels": [1]}, 400, "invalid_request", "channels")
        self.assertRefused({"peerId": "u", "channels": ["demo/a"] * 101}, 400, "invalid_request", "channels")
        self.assertRefused({"peerId": "u", "channels": [""]}, 400, "invalid_request", "channels")
        self.assertRefused({"peerId": "u", "channels": ["other/x"]}, 403, "channel_not_authorized", "other/x")
        self.assertRefused(
            {"peerId": "u", "channels": ["demo/a/b"]}, 403, "channel_not_authorized", "demo/a/b", key=NARROW
        )
        self.assertEqual(self.mint({"peerId": "u", "channels": ["demo/a"] * 100}).status, 200)
        self.assertEqual(self.mint({"peerId": "u", "channels": ["demo/*", "demo/**"]}).status, 200)
        self.assertRefused({"peerId": "u", "channels": ["**"]}, 403, "channel_not_authorized", "**")

    def test_permissions(self) -> None:
        """
        permissions has at most 16 known actions, all held by the key;
        others are 403 action_not_permitted.
        """
        self.assertRefused({"peerId": "u", "permissions": ["fly"]}, 400, "invalid_request", "fly")
        self.assertRefused({"peerId": "u", "permissions": ["subscribe"] * 17}, 400, "invalid_request", "permissions")
        self.assertRefused({"peerId": "u", "permissions": "publish"}, 400, "invalid_request", "permissions")
        self.assertRefused({"peerId": "u", "permissions": ["publish"]}, 403, "action_not_permitted", "publish", key=NARROW)

    def test_default_permissions(self) -> None:
        """
        Without permissions the token carries the key's whole action list.
        """
        reply = self.mint({"peerId": "u"}, key=NARROW)
        grant = verify_token(reply.json["token"], self.world.keys.key, START)
        self.assertEqual(grant.actions, frozenset({"subscribe"}))

    def test_metadata_caps(self) -> None:
        """
        metadata is an object of at most 8 KB, peerMetadata at most 4 KB.
        """
        self.assertRefused({"peerId": "u", "metadata": []}, 400, "invalid_request", "metadata")
        self.assertRefused({"peerId": "u", "peerMetadata": "Ada"}, 400, "invalid_request", "peerMetadata")
        self.assertRefused({"peerId": "u", "metadata": {"x": "a" * 8192}}, 400, "invalid_request", "metadata")
        self.assertRefused({"peerId": "u", "peerMetadata": {"x": "a" * 4096}}, 400, "invalid_request", "peerMetadata")
        self.assertEqual(self.mint({"peerId": "u", "peerMetadata": {"x": "a" * 4000}}).status, 200)

    def test_nulls_are_absent(self) -> None:
        """
        Optional fields sent as null take their defaults.
        """
        body = {"peerId": "u", "channels": None, "permissions": None, "expiresInSec": None, "metadata": None}
        reply = self.mint(body)
        self.assertEqual((reply.status, reply.json["expiresAt"]), (200, int(START) + 3600))


class MintWithTurnTests(SynchronousTestCase):
    """
    The C{"turn": true} extension: fresh TURN credentials in the token.
    """

    def setUp(self) -> None:
        self.api = FakeTurnApi()
        self.turn_http = StubTreq(self.api)
        self.world = RestWorld(self, turn=TurnApiClient(self.turn_http, Clock()))
        self.world.keys.add_app(App(APP_A, turn=config()))

    def mint(self, body: dict) -> tuple[int, dict]:
        """
        POST the body, letting the TURN API answer in between.
        """
        http = self.world.http
        deferred = http.request(
            "POST",
            "http://127.0.0.1:8080/v1/tokens",
            headers={"Authorization": [bearer(FULL)], "Content-Type": ["application/json"]},
            data=json.dumps(body).encode(),
        )
        for _ in range(3):
            http.flush()
            self.turn_http.flush()
        response = self.successResultOf(deferred)
        return response.code, json.loads(self.successResultOf(http.content(response)))

    def test_turn_credentials_embedded(self) -> None:
        """
        The token's metadata carries the TURN API's list next to the
        caller's own fields; the credential lives as long as the token
        (at least an hour).
        """
        status, body = self.mint({"peerId": "u_1", "turn": True, "metadata": {"room": 7}})
        self.assertEqual(status, 200, body)
        grant = verify_token(body["token"], self.world.keys.key, START)
        self.assertEqual(grant.metadata, {"room": 7, "iceServers": expected_list(1)})
        [create] = [r for r in self.api.requests if r[0] == b"POST"]
        self.assertEqual(create[3]["expiryInSeconds"], 3600)

    def test_turn_api_failure(self) -> None:
        """
        A failing TURN API is 502 C{backend_error}, and no token is minted.
        """
        self.api.create_mode = "server_error"
        status, body = self.mint({"peerId": "u_1", "turn": True})
        self.assertEqual((status, body["error"]), (502, "backend_error"))
        self.assertNotIn("token", body)

    def test_app_without_turn(self) -> None:
        """
        An app with no TURN configuration refuses C{"turn": true} with 400.
        """
        self.world.keys.add_app(App(APP_A))
        status, body = self.mint({"peerId": "u_1", "turn": True})
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        self.assertIn("turn", body["message"])
        self.assertEqual(self.api.requests, [])

    def test_turn_must_be_boolean(self) -> None:
        """
        A non-boolean C{turn} is 400 naming the field.
        """
        status, body = self.mint({"peerId": "u_1", "turn": "yes"})
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        self.assertIn("turn", body["message"])
