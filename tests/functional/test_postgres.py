"""
A real server on a real PostgreSQL, managed with the CLI on the same
database, driven by the official SDK: a key created with the CLI connects
within one re-read, and revoking keys closes their live sessions
(publishable-key and JWT alike) with 4001.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from meteredrt.apps import Key, KeyType
from meteredrt.auth import mint_token
from meteredrt.cli import main
from meteredrt.store.keystore import RELOAD_INTERVAL
from tests.postgres_server import fresh_database

from .support import APP_ID, start_server
from .test_rest_sdk import AUTH, _json, treq
from .test_sdk import SDKTestCase, events_of, steps


class PostgreSQLServerTests(SDKTestCase):
    """
    C{twistd meteredrt --database postgresql://…} and the C{meteredrt} CLI
    on the same database.
    """

    async def _start(self) -> None:
        self.database = fresh_database()
        self.server = await start_server(self, extra_args=("--database", self.database))

    def operator(self, *argv: str) -> Any:
        """
        Run one C{meteredrt} command on the server's configuration file and
        database, as an operator would; return its JSON output.
        """
        config = os.path.join(os.path.dirname(self.server.data_dir), "meteredrt.toml")
        stdout, stderr = io.StringIO(), io.StringIO()
        status = main([*argv, "--config", config, "--database", self.database, "--json"], stdout=stdout, stderr=stderr)
        self.assertEqual(status, 0, stderr.getvalue())
        return json.loads(stdout.getvalue())

    async def room(self) -> list[str]:
        """
        The peerIds in channel C{room}.
        """
        response = await treq.get(f"{self.server.http}/v1/channels/room/peers", headers=AUTH)
        self.assertEqual(response.code, 200)
        return sorted(peer["peerId"] for peer in (await _json(response))["peers"])

    async def test_created_key_connects_and_revoked_sessions_close(self) -> None:
        """
        Keys created with the CLI on the server's database authenticate
        within one re-read (plus the SDK's start-up); once both are revoked,
        the publishable-key session and the session of a JWT signed by the
        secret key are closed with 4001, which the SDK treats as terminal.
        """
        created_at = time.monotonic()
        publishable = self.operator("keys", "create", "--app", APP_ID, "--type", "publishable")
        secret = self.operator("keys", "create", "--app", APP_ID, "--type", "secret")
        for _ in range(40):
            events = await self.run_scenario({"apiKey": publishable["keyId"], "steps": [{"op": "connect"}]})
            [step] = steps(events)
            if step["ok"]:
                break
            self.assertEqual(step["error"]["closeCode"], 4001)
            await _pause(0.1)
        else:
            self.fail("the new key never connected")
        # The SDK starts in a Node process of its own, which takes a while.
        self.assertLess(time.monotonic() - created_at, RELOAD_INTERVAL + 4)

        signing_key = Key(
            key_id=secret["keyId"],
            app_id=APP_ID,
            type=KeyType.SECRET,
            secret=secret["secret"],
            channel_patterns=("**",),
            actions=frozenset(secret["actions"]),
        )
        token = mint_token(signing_key, "jwt-peer", now=int(time.time()), expires_in=600)
        sdk = self.run_scenario(
            {
                "clients": {
                    "pk": {"apiKey": publishable["keyId"], "reconnect": True},
                    "jwt": {"token": token, "reconnect": True},
                },
                "steps": [
                    {"op": "connect", "client": "pk"},
                    {"op": "connect", "client": "jwt"},
                    {"op": "subscribe", "client": "pk", "channel": "room"},
                    {"op": "subscribe", "client": "jwt", "channel": "room"},
                    {"op": "wait", "client": "pk", "event": "disconnected", "timeoutMs": 30000},
                    {"op": "wait", "client": "jwt", "event": "disconnected", "timeoutMs": 10000},
                ],
            }
        )
        for _ in range(400):
            if len(await self.room()) == 2:
                break
            await _pause(0.05)
        else:
            self.fail("the SDK clients never joined the room")
        revoked_at = time.time()
        self.operator("keys", "revoke", publishable["keyId"])
        self.operator("keys", "revoke", secret["keyId"])
        events = await sdk
        for client in ("pk", "jwt"):
            [disconnected] = events_of(events, "disconnected", client)
            self.assertEqual((disconnected["code"], disconnected["willReconnect"]), (4001, False))
            self.assertLess(disconnected["at"] / 1000 - revoked_at, RELOAD_INTERVAL + 3)
            self.assertEqual(len(events_of(events, "connected", client)), 1)
        self.assertEqual(await self.room(), [])


def _pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)
