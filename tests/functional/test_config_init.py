"""
A server started from the file C{meteredrt config init} writes: the secret
key it generated mints a token over REST, and the official SDK connects with
that token and with the publishable key, and exchanges a message.
"""

from __future__ import annotations

import io
import json

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from meteredrt.apps import KeyType
from meteredrt.cli import main
from meteredrt.config import load_config

from .node_harness import run_sdk_scenario
from .support import start_server
from .test_sdk import SDKTestCase, events_of, steps

# One connection per request: a keep-alive connection would outlive the test.
treq = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


class ConfigInitServerTests(SDKTestCase):
    """
    The generated file is a working configuration.
    """

    async def _start(self) -> None:
        path = self.mktemp()
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(main(["config", "init", path, "--app", "app_init"], stdout=out, stderr=err), 0, err.getvalue())
        (app,) = load_config(path).apps
        self.secret = next(key for key in app.keys if key.type is KeyType.SECRET)
        self.publishable = next(key for key in app.keys if key.type is KeyType.PUBLISHABLE)
        with open(path, encoding="utf-8") as f:
            self.server = await start_server(self, config=f.read())

    async def test_generated_keys_work(self) -> None:
        """
        A token minted with the generated secret key and a connection with
        the generated publishable key both get in; one publishes, the other
        receives.
        """
        minted = await treq.post(
            f"{self.server.http}/v1/tokens",
            json={"peerId": "alice", "expiresInSec": 600},
            headers={b"Authorization": [f"Bearer {self.secret.key_id}:{self.secret.secret}".encode()]},
        )
        body = json.loads(await minted.content())
        self.assertEqual(minted.code, 200, body)
        scenario = {
            "clients": {
                "alice": {"url": self.server.url, "token": body["token"]},
                "bob": {"url": self.server.url, "apiKey": self.publishable.key_id},
            },
            "steps": [
                {"op": "connect", "client": "alice"},
                {"op": "connect", "client": "bob"},
                {"op": "subscribe", "client": "alice", "channel": "demo/room"},
                {"op": "publish", "client": "bob", "channel": "demo/room", "data": {"n": 1}},
                {"op": "wait", "client": "alice", "event": "message", "timeoutMs": 10000},
            ],
        }
        events = await run_sdk_scenario(scenario, timeout=60)
        self.assertTrue(all(step["ok"] for step in steps(events)), steps(events))
        (message,) = events_of(events, "message", "alice")
        self.assertEqual((message["channel"], message["data"]), ("demo/room", {"n": 1}))
