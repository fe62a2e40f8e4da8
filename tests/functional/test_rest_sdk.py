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

from .node_harness import run_sdk_scenario
from .support import OTHER_SECRET, OTHER_SECRET_KEY_ID, SECRET, SECRET_KEY_ID
from .test_sdk import SDKTestCase, events_of

AUTH = {b"Authorization": [f"Bearer {SECRET_KEY_ID}:{SECRET}".encode()]}
OTHER_AUTH = {b"Authorization": [f"Bearer {OTHER_SECRET_KEY_ID}:{OTHER_SECRET}".encode()]}


async def _json(response: Any) -> Any:
    return json.loads(await response.content())


# One connection per request: a keep-alive connection would outlive the test.
treq = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


class BackendFlowTests(SDKTestCase):
    """
    Mint → connect with the SDK → listed in peers → REST publish → kick.
    """

    async def _peers(self, channel: str, headers: dict = AUTH) -> list[dict]:
        response = await treq.get(f"{self.server.http}/v1/channels/{channel.replace('/', '%2F')}/peers", headers=headers)
        self.assertEqual(response.code, 200)
        return (await _json(response))["peers"]

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
        minted = await treq.post(
            f"{self.server.http}/v1/tokens",
            json={"peerId": "agent-7", "peerMetadata": {"role": "agent"}, "expiresInSec": 600},
            headers=AUTH,
        )
        self.assertEqual(minted.code, 200)
        jwt = (await _json(minted))["token"]

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
        self.assertEqual((published.code, await _json(published)), (200, {"channel": "ops/alerts", "delivered": 1}))

        # The message frame is already on the socket ahead of the close frame.
        kicked = await treq.delete(f"{self.server.http}/v1/peers/agent-7", headers=AUTH)
        self.assertEqual((kicked.code, await _json(kicked)), (200, {"peerId": "agent-7", "closed": 1}))

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
