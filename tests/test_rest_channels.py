"""
Tests for L{meteredrt.rest.channels}: channel peers (§19.3) and backend
publish (§19.4).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import Plan
from tests.rest_support import APP_A, APP_B, NARROW, OTHER_APP, RestWorld, secret_key

PUBLISH_ONLY = secret_key("sk_id_publish_only", APP_A, ("demo/**",), {"publish"})


class ChannelPathTests(SynchronousTestCase):
    """
    Channel names arrive percent-encoded or raw.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)
        session, _ = self.world.connect("u_1042", peer_metadata={"name": "Ada"})
        self.world.subscribe(session, "demo/room-7")

    def test_encoded(self) -> None:
        """
        C{demo%2Froom-7} names C{demo/room-7}.
        """
        reply = self.world.get("/v1/channels/demo%2Froom-7/peers")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json["channel"], "demo/room-7")
        self.assertEqual([p["peerId"] for p in reply.json["peers"]], ["u_1042"])

    def test_raw(self) -> None:
        """
        C{demo/room-7} unencoded in the path names the same channel.
        """
        reply = self.world.get("/v1/channels/demo/room-7/peers")
        self.assertEqual((reply.status, reply.json["channel"]), (200, "demo/room-7"))

    def test_mixed_and_deep(self) -> None:
        """
        Everything up to the final segment is the name, whatever is encoded.
        """
        session, _ = self.world.connect("u_2")
        self.world.subscribe(session, "demo/a/b/peers")
        reply = self.world.get("/v1/channels/demo/a%2Fb/peers/peers")
        self.assertEqual(reply.json, {"channel": "demo/a/b/peers", "peers": [{"peerId": "u_2"}]})

    def test_encoded_percent_and_unicode(self) -> None:
        """
        C{%25} stays a percent sign; UTF-8 escapes decode to Unicode names.
        """
        self.assertEqual(self.world.get("/v1/channels/demo%2F50%25/peers").json["channel"], "demo/50%")
        self.assertEqual(self.world.get("/v1/channels/demo%2Fcaf%C3%A9/peers").json["channel"], "demo/caf\u00e9")

    def test_not_utf8(self) -> None:
        """
        A name that does not decode as UTF-8 is a 400.
        """
        reply = self.world.get("/v1/channels/demo%2F%FF/peers")
        self.assertEqual((reply.status, reply.json["error"]), (400, "invalid_request"))


class PeersTests(SynchronousTestCase):
    """
    C{GET /v1/channels/{channel}/peers}.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def test_members(self) -> None:
        """
        One entry per peerId in join order; metadata only when the peer has
        some.
        """
        first, _ = self.world.connect("u_1042", peer_metadata={"name": "Ada"})
        second, _ = self.world.connect("u_3110")
        again, _ = self.world.connect("u_1042", peer_metadata={"name": "Ada"})
        for session in (first, second, again):
            self.world.subscribe(session, "demo/room-7")
        reply = self.world.get("/v1/channels/demo%2Froom-7/peers")
        self.assertEqual(
            reply.json,
            {"channel": "demo/room-7", "peers": [{"peerId": "u_1042", "metadata": {"name": "Ada"}}, {"peerId": "u_3110"}]},
        )

    def test_empty(self) -> None:
        """
        Nobody there is an empty list.
        """
        self.assertEqual(self.world.get("/v1/channels/demo%2Fnobody/peers").json["peers"], [])

    def test_other_app(self) -> None:
        """
        A key of another app never sees this app's peers.
        """
        session, _ = self.world.connect("u_1")
        self.world.subscribe(session, "demo/room-7")
        reply = self.world.get("/v1/channels/demo%2Froom-7/peers", key=OTHER_APP)
        self.assertEqual(reply.json, {"channel": "demo/room-7", "peers": []})

    def test_invalid_channel(self) -> None:
        """
        Empty, control-character, over-long and wildcard names are 400
        invalid_request.
        """
        for path in ("/v1/channels//peers", "/v1/channels/demo%2F%01/peers", "/v1/channels/" + "a" * 257 + "/peers",
                     "/v1/channels/demo%2F*/peers"):
            reply = self.world.get(path)
            self.assertEqual((reply.status, reply.json["error"]), (400, "invalid_request"), path)

    def test_reserved(self) -> None:
        """
        Reserved prefixes, in any case, are 400 channel_reserved.
        """
        reply = self.world.get("/v1/channels/_Metered%2Fx/peers")
        self.assertEqual((reply.status, reply.json["error"]), (400, "channel_reserved"))

    def test_needs_presence(self) -> None:
        """
        A key without the presence action is 403 action_not_permitted.
        """
        reply = self.world.get("/v1/channels/demo%2Fa/peers", key=NARROW)
        self.assertEqual((reply.status, reply.json["error"]), (403, "action_not_permitted"))

    def test_outside_patterns(self) -> None:
        """
        A channel outside the key's patterns is 403 channel_not_authorized.
        """
        reply = self.world.get("/v1/channels/other%2Fx/peers")
        self.assertEqual((reply.status, reply.json["error"]), (403, "channel_not_authorized"))
        self.assertIn("other/x", reply.json["message"])


class PublishTests(SynchronousTestCase):
    """
    C{POST /v1/channels/{channel}/publish}.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)
        self.world.keys.add_key(PUBLISH_ONLY)

    def test_delivered(self) -> None:
        """
        Subscribers, wildcard ones included, get an ordinary message frame
        from "system"; the answer counts them.
        """
        plain, plain_sink = self.world.connect("u_1")
        self.world.subscribe(plain, "demo/room-7")
        wild, wild_sink = self.world.connect("u_2")
        self.world.subscribe(wild, "demo/*")
        reply = self.world.post("/v1/channels/demo%2Froom-7/publish", {"data": {"notice": "maintenance at 18:00"}})
        self.assertEqual(reply.json, {"channel": "demo/room-7", "delivered": 2})
        expected = {"type": "message", "channel": "demo/room-7", "from": "system", "data": {"notice": "maintenance at 18:00"}}
        self.assertEqual(plain_sink.decoded[-1], expected)
        self.assertEqual(wild_sink.decoded[-1], expected)

    def test_from_and_metadata(self) -> None:
        """
        C{from} and C{peerMetadata} reach subscribers, the metadata only
        those that opted in.
        """
        opted, opted_sink = self.world.connect("u_1")
        self.world.subscribe(opted, "demo/a", include_sender_metadata=True)
        other, other_sink = self.world.connect("u_2")
        self.world.subscribe(other, "demo/a")
        body = {"data": None, "from": "ops-bot", "peerMetadata": {"kind": "bot"}}
        reply = self.world.post("/v1/channels/demo/a/publish", body)
        self.assertEqual(reply.json["delivered"], 2)
        self.assertEqual(
            opted_sink.decoded[-1],
            {"type": "message", "channel": "demo/a", "from": "ops-bot", "data": None, "fromMetadata": {"kind": "bot"}},
        )
        self.assertNotIn("fromMetadata", other_sink.decoded[-1])

    def test_fifo(self) -> None:
        """
        Successive REST publishes arrive in order.
        """
        session, sink = self.world.connect("u_1")
        self.world.subscribe(session, "demo/a")
        for n in range(5):
            self.world.post("/v1/channels/demo%2Fa/publish", {"data": n})
        self.assertEqual([f["data"] for f in sink.decoded if f["type"] == "message"], [0, 1, 2, 3, 4])

    def test_nobody(self) -> None:
        """
        A publish nobody hears is a success with delivered 0, still counted.
        """
        reply = self.world.post("/v1/channels/demo%2Fempty/publish", {"data": 1})
        self.assertEqual(reply.json, {"channel": "demo/empty", "delivered": 0})
        usage = self.world.get("/v1/usage").json
        self.assertEqual(usage["messagesUsed"], 1)

    def test_other_app_isolated(self) -> None:
        """
        A publish reaches only the caller's app.
        """
        session, sink = self.world.connect("u_1", app_id=APP_B)
        self.world.subscribe(session, "demo/a")
        self.assertEqual(self.world.post("/v1/channels/demo%2Fa/publish", {"data": 1}).json["delivered"], 0)
        self.assertEqual([f for f in sink.decoded if f["type"] == "message"], [])

    def test_body_fields(self) -> None:
        """
        data is required; from must be a valid peerId; peerMetadata an
        object of at most 4 KB.
        """
        for body, field in (
            ({}, "data"),
            ({"data": 1, "from": ""}, "from"),
            ({"data": 1, "from": 5}, "from"),
            ({"data": 1, "from": "x" * 129}, "from"),
            ({"data": 1, "peerMetadata": [1]}, "peerMetadata"),
            ({"data": 1, "peerMetadata": {"x": "a" * 4096}}, "peerMetadata"),
        ):
            reply = self.world.post("/v1/channels/demo%2Fa/publish", body)
            self.assertEqual((reply.status, reply.json["error"]), (400, "invalid_request"), body)
            self.assertIn(field, reply.json["message"])

    def test_scope(self) -> None:
        """
        Reserved names are 400; a key without publish or outside its
        patterns is 403.
        """
        reply = self.world.post("/v1/channels/_system%2Fx/publish", {"data": 1})
        self.assertEqual((reply.status, reply.json["error"]), (400, "channel_reserved"))
        reply = self.world.post("/v1/channels/demo%2Fa/publish", {"data": 1}, key=NARROW)
        self.assertEqual((reply.status, reply.json["error"]), (403, "action_not_permitted"))
        reply = self.world.post("/v1/channels/other%2Fa/publish", {"data": 1}, key=PUBLISH_ONLY)
        self.assertEqual((reply.status, reply.json["error"]), (403, "channel_not_authorized"))
        reply = self.world.post("/v1/channels/demo%2F*/publish", {"data": 1})
        self.assertEqual((reply.status, reply.json["error"]), (400, "invalid_request"))

    def test_over_quota(self) -> None:
        """
        With the message quota exhausted and no overage, 403
        over_message_quota and nothing is delivered.
        """
        self.world.keys.set_plan(APP_A, Plan(max_messages_per_period=1))
        session, sink = self.world.connect("u_1")
        self.world.subscribe(session, "demo/a")
        self.assertEqual(self.world.post("/v1/channels/demo%2Fa/publish", {"data": 1}).status, 200)
        reply = self.world.post("/v1/channels/demo%2Fa/publish", {"data": 2})
        self.assertEqual((reply.status, reply.json["error"]), (403, "over_message_quota"))
        self.assertEqual([f["data"] for f in sink.decoded if f["type"] == "message"], [1])
