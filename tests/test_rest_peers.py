"""
Tests for L{meteredrt.rest.peers}: C{DELETE /v1/peers/{peerId}} (§19.5).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.interfaces import BackendUnavailable
from meteredrt.protocol import CloseCode
from tests.rest_support import APP_B, NARROW, RestWorld


class KickTests(SynchronousTestCase):
    """
    Kicking closes every connection of the peer in the caller's app.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def test_closes_every_connection(self) -> None:
        """
        Both connections of the peer close with 4020 and C{closed} is 2;
        another peer and the same id in another app are untouched.
        """
        _, first = self.world.connect("u_1042")
        _, second = self.world.connect("u_1042")
        _, bystander = self.world.connect("u_7")
        _, elsewhere = self.world.connect("u_1042", app_id=APP_B)
        reply = self.world.delete("/v1/peers/u_1042")
        self.assertEqual(reply.json, {"peerId": "u_1042", "closed": 2})
        self.assertEqual([c for c, _ in first.closes + second.closes], [CloseCode.ADMIN_DISCONNECT] * 2)
        self.assertEqual(CloseCode.ADMIN_DISCONNECT, 4020)
        self.assertEqual((bystander.closes, elsewhere.closes), ([], []))

    def test_nobody(self) -> None:
        """
        Kicking an absent peer is a success with closed 0.
        """
        self.assertEqual(self.world.delete("/v1/peers/ghost").json, {"peerId": "ghost", "closed": 0})

    def test_any_secret_key(self) -> None:
        """
        No special action is needed: a narrow key of the app may kick.
        """
        _, sink = self.world.connect("u_1")
        self.assertEqual(self.world.delete("/v1/peers/u_1", key=NARROW).json["closed"], 1)

    def test_encoded_id(self) -> None:
        """
        Percent-encoded ids decode, C{/} included.
        """
        _, sink = self.world.connect("team/u 1")
        reply = self.world.delete("/v1/peers/team%2Fu%201")
        self.assertEqual(reply.json, {"peerId": "team/u 1", "closed": 1})

    def test_invalid_ids(self) -> None:
        """
        Empty, over-long and non-ASCII ids are 400 invalid_request.
        """
        for path in ("/v1/peers/", "/v1/peers/" + "a" * 129, "/v1/peers/caf%C3%A9", "/v1/peers/a%09b", "/v1/peers/%FF"):
            reply = self.world.delete(path)
            self.assertEqual((reply.status, reply.json["error"]), (400, "invalid_request"), path)

    def test_needs_key(self) -> None:
        """
        Without a credential nothing is closed.
        """
        _, sink = self.world.connect("u_1")
        self.assertEqual(self.world.delete("/v1/peers/u_1", key=None).status, 401)
        self.assertEqual(sink.closes, [])

    def test_backend_unavailable(self) -> None:
        """
        When the shared state a kick needs cannot be reached, the answer is
        503 C{internal_error} (§19.1's only 503) saying why.
        """

        def unreachable(app_id: str, peer_id: str, envelope: object) -> Deferred[int]:
            return fail(BackendUnavailable("cannot reach other nodes through Redis"))

        self.world.hub._broker.direct = unreachable  # type: ignore[method-assign]
        reply = self.world.delete("/v1/peers/u_1")
        self.assertEqual((reply.status, reply.json["error"]), (503, "internal_error"))
        self.assertIn("cannot reach other nodes through Redis", reply.json["message"])
