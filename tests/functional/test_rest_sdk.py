"""
The REST control plane over real loopback HTTP, with the official SDK on the
other side: what a backend does to the peers it serves.
"""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from tests.rest_support import Reply, check_response

from .node_harness import run_sdk_scenario
from .support import OTHER_SECRET, OTHER_SECRET_KEY_ID, SECRET, SECRET_KEY_ID
from .test_sdk import SDKTestCase, events_of

AUTH = {b"Authorization": [f"Bearer {SECRET_KEY_ID}:{SECRET}".encode()]}
OTHER_AUTH = {b"Authorization": [f"Bearer {OTHER_SECRET_KEY_ID}:{OTHER_SECRET}".encode()]}


async def _json(response: Any) -> Any:
    return json.loads(await response.content())


class _Contract:
    """
    Reads every live response once and checks it against the
    C{openapi.json} the same server serves.
    """

    def __init__(self, case: Any, document: dict) -> None:
        self._case = case
        self._document = document

    async def __call__(self, method: str, path: str, response: Any) -> Any:
        raw = await response.content()
        problems = check_response(self._document, method, path, Reply(response.code, response.headers, raw))
        if problems:
            self._case.fail(f"{method} {path} -> {response.code}: " + "; ".join(problems))
        return json.loads(raw)


# One connection per request: a keep-alive connection would outlive the test.
treq = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


class BackendFlowTests(SDKTestCase):
    """
    Mint → connect with the SDK → listed in peers → REST publish → kick.
    """

    async def _contract(self) -> _Contract:
        response = await treq.get(f"{self.server.http}/v1/openapi.json")
        self.assertEqual(response.code, 200)
        return _Contract(self, await _json(response))

    async def _peers(self, channel: str, headers: dict = AUTH) -> list[dict]:
        path = f"/v1/channels/{channel.replace('/', '%2F')}/peers"
        response = await treq.get(self.server.http + path, headers=headers)
        self.assertEqual(response.code, 200)
        return (await self.contract("GET", path, response))["peers"]

    async def _until_listed(self, channel: str, peer_id: str) -> None:
        """
        Wait (at most 20 s) for the SDK client, running in another process,
        to show up in the channel.
        """
        for _ in range(400):
            if any(p["peerId"] == peer_id for p in await self._peers(channel)):
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"{peer_id} never appeared in {channel}")

    async def test_mint_connect_publish_kick(self) -> None:
        """
        A token minted over REST connects the SDK; the peer is listed with its
        metadata; a REST publish reaches it; a kick closes it with 4020 and
        reports one closed connection.
        """
        self.contract = await self._contract()
        minted = await treq.post(
            f"{self.server.http}/v1/tokens",
            json={"peerId": "agent-7", "peerMetadata": {"role": "agent"}, "expiresInSec": 600},
            headers=AUTH,
        )
        self.assertEqual(minted.code, 200)
        jwt = (await self.contract("POST", "/v1/tokens", minted))["token"]

        scenario = {
            "url": self.server.url,
            "token": jwt,
            "steps": [
                {"op": "connect"},
                {"op": "subscribe", "channel": "ops/alerts", "includeSenderMetadata": True},
                {"op": "wait", "event": "message", "timeoutMs": 20000},
                {"op": "wait", "event": "disconnected", "timeoutMs": 20000},
            ],
        }
        sdk: Deferred[list[dict]] = run_sdk_scenario(scenario, timeout=60)

        await self._until_listed("ops/alerts", "agent-7")
        self.assertEqual(await self._peers("ops/alerts"), [{"peerId": "agent-7", "metadata": {"role": "agent"}}])
        # Another app's key sees nobody there: apps are isolated.
        self.assertEqual(await self._peers("ops/alerts", OTHER_AUTH), [])

        published = await treq.post(
            f"{self.server.http}/v1/channels/ops/alerts/publish",
            json={"data": {"notice": "maintenance at 18:00"}, "from": "system", "peerMetadata": {"kind": "bot"}},
            headers=AUTH,
        )
        published_body = await self.contract("POST", "/v1/channels/ops/alerts/publish", published)
        self.assertEqual((published.code, published_body), (200, {"channel": "ops/alerts", "delivered": 1}))

        # The message frame is already on the socket ahead of the close frame.
        kicked = await treq.delete(f"{self.server.http}/v1/peers/agent-7", headers=AUTH)
        kicked_body = await self.contract("DELETE", "/v1/peers/agent-7", kicked)
        self.assertEqual((kicked.code, kicked_body), (200, {"peerId": "agent-7", "closed": 1}))

        events = await sdk
        [message] = events_of(events, "message")
        self.assertEqual(
            (message["channel"], message["from"], message["data"], message["fromMetadata"]),
            ("ops/alerts", "system", {"notice": "maintenance at 18:00"}, {"kind": "bot"}),
        )
        [disconnected] = events_of(events, "disconnected")
        self.assertEqual(disconnected["code"], 4020)
        self.assertFalse(disconnected["willReconnect"])
        self.assertEqual(await self._peers("ops/alerts"), [])


class LiveContractTests(SDKTestCase):
    """
    Live responses over real HTTP match the served C{openapi.json}, errors
    included.
    """

    async def test_live_responses_match_document(self) -> None:
        """
        Each endpoint's success and typical failures, as a backend meets them,
        are documented statuses with bodies matching their schemas.
        """
        response = await treq.get(f"{self.server.http}/v1/openapi.json")
        contract = _Contract(self, await _json(response))
        bad = {b"Authorization": [b"Bearer sk_id_nobody:sk_secret_nothing"]}
        calls = [
            ("GET", "/v1/usage", AUTH, None, 200),
            ("GET", "/v1/usage", bad, None, 401),
            ("POST", "/v1/tokens", AUTH, {"peerId": "u_1"}, 200),
            ("POST", "/v1/tokens", AUTH, {"peerId": ""}, 400),
            ("POST", "/v1/tokens", AUTH, {"peerId": "u_1", "permissions": ["fly"]}, 400),
            ("POST", "/v1/tokens", AUTH, {"peerId": "u_1", "padding": "x" * (1024 * 1024)}, 413),
            ("GET", "/v1/channels/demo%2Froom/peers", AUTH, None, 200),
            ("GET", "/v1/channels/_system%2Fx/peers", AUTH, None, 400),
            ("POST", "/v1/channels/demo/room/publish", AUTH, {"data": None}, 200),
            ("POST", "/v1/channels/demo/room/publish", AUTH, {"from": "x"}, 400),
            ("DELETE", "/v1/peers/nobody", AUTH, None, 200),
            ("GET", "/v1/nothing-here", AUTH, None, 404),
            ("GET", "/healthz", {}, None, 200),
            ("GET", "/readyz", {}, None, 200),
        ]
        for method, path, headers, body, status in calls:
            response = await treq.request(
                method, self.server.http + path, headers=headers, **({"json": body} if body is not None else {})
            )
            self.assertEqual(response.code, status, f"{method} {path}")
            await contract(method, path, response)
