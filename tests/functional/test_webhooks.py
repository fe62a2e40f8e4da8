"""
Presence webhooks end to end: official SDK clients on a real server, a
real receiver on a loopback port, and a real server process killed with
SIGKILL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from .node_harness import ensure_node_modules, run_sdk_scenario
from .support import APP_ID, CONFIG, TwistdProcess, kill_twistd, start_server, start_twistd
from .test_metering_e2e import connect_client
from .test_sdk import steps, token
from .webhook_receiver import WebhookReceiver, start_receiver

WEBHOOK_SECRET = "whsec_functional_0123456789abcdef0123"


def config_with_webhooks(url: str, grace: float = 1.0) -> str:
    """
    The functional-test configuration with webhooks for C{app_test}.
    """
    declaration = f'id = "{APP_ID}"\n'
    assert declaration in CONFIG
    table = (
        f"\n[apps.webhooks]\nurl = \"{url}\"\nsecret = \"{WEBHOOK_SECRET}\"\n"
        f"offline_grace_seconds = {grace}\n"
    )
    return CONFIG.replace(declaration, declaration + table, 1)


def per_peer(events: list[dict[str, Any]], peer_id: str) -> list[str]:
    """
    The types of one peer's peer.* events, in arrival order.
    """
    return [e["type"] for e in events if e["peerId"] == peer_id and e["type"].startswith("peer.")]


class SDKWebhookTests(TestCase):
    """
    What a backend hears of SDK clients.
    """

    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    async def start(self, grace: float = 1.0) -> tuple[WebhookReceiver, str]:
        receiver, url = await start_receiver(self, WEBHOOK_SECRET)
        server = await start_server(self, config_with_webhooks(url, grace))
        return receiver, server.url

    async def test_close_sends_one_offline(self) -> None:
        """
        A peer that subscribes and closes produces online, occupied,
        joined (with its metadata), left, then exactly one offline and one
        vacated once the grace has passed; every request is signed.
        """
        receiver, url = await self.start()
        scenario = {
            "url": url,
            "token": token("alice", peer_metadata={"name": "Ada"}),
            "steps": [
                {"op": "connect"},
                {"op": "subscribe", "channel": "room/1"},
                {"op": "close"},
            ],
        }
        events = await run_sdk_scenario(scenario, timeout=60)
        self.assertTrue(all(s["ok"] for s in steps(events)), steps(events))
        await receiver.wait_for(lambda: len(receiver.of_type("channel.vacated")) == 1)
        await receiver.wait_for(lambda: len(receiver.of_type("peer.offline")) == 1)
        types = [e["type"] for e in receiver.accepted]
        self.assertEqual(types[:4], ["peer.online", "channel.occupied", "presence.joined", "presence.left"])
        # Both wait out the same grace; which goes first is not promised.
        self.assertEqual(sorted(types[4:]), ["channel.vacated", "peer.offline"])
        [joined] = receiver.of_type("presence.joined")
        self.assertEqual((joined["peerId"], joined["channel"], joined["metadata"]), ("alice", "room/1", {"name": "Ada"}))
        self.assertEqual(len({e["id"] for e in receiver.accepted}), len(receiver.accepted))
        self.assertEqual({e["app"] for e in receiver.accepted}, {APP_ID})
        self.assertEqual(receiver.bad_signatures, 0)

    async def test_reload_inside_grace_sends_nothing(self) -> None:
        """
        A reload (close, then connect again with the same peerId inside the
        grace) sends no offline and no second online.
        """
        receiver, url = await self.start(grace=2.0)
        alice = token("alice")
        scenario = {
            "clients": {"before": {"url": url, "token": alice}, "after": {"url": url, "token": alice}},
            "steps": [
                {"op": "connect", "client": "before"},
                {"op": "close", "client": "before"},
                {"op": "sleepMs", "ms": 300},
                {"op": "connect", "client": "after"},
                {"op": "sleepMs", "ms": 3000},
            ],
        }
        events = await run_sdk_scenario(scenario, timeout=60)
        self.assertTrue(all(s["ok"] for s in steps(events)), steps(events))
        await receiver.wait_for(lambda: len(receiver.of_type("peer.online")) >= 1)
        self.assertEqual(per_peer(receiver.accepted, "alice"), ["peer.online"])
        # The SDK closed "after" at the end of the scenario: now it goes.
        await receiver.wait_for(lambda: len(receiver.of_type("peer.offline")) == 1)
        self.assertEqual(per_peer(receiver.accepted, "alice"), ["peer.online", "peer.offline"])

    async def test_receiver_down_then_up(self) -> None:
        """
        A receiver answering 500 for a while gets every event exactly once
        per id, in order per peer, once it answers 200.
        """
        receiver, url = await self.start()
        receiver.statuses = [500, 500, 503]
        scenario = {
            "clients": {
                "a": {"url": url, "token": token("alice")},
                "b": {"url": url, "token": token("bob")},
            },
            "steps": [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "b"},
                {"op": "close", "client": "a"},
                {"op": "sleepMs", "ms": 1500},
                {"op": "close", "client": "b"},
            ],
        }
        events = await run_sdk_scenario(scenario, timeout=60)
        self.assertTrue(all(s["ok"] for s in steps(events)), steps(events))
        await receiver.wait_for(lambda: len(receiver.of_type("peer.offline")) == 2, timeout=40)
        self.assertGreaterEqual(receiver.requests, 4)
        ids = [e["id"] for e in receiver.accepted]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(per_peer(receiver.accepted, "alice"), ["peer.online", "peer.offline"])
        self.assertEqual(per_peer(receiver.accepted, "bob"), ["peer.online", "peer.offline"])


class CrashWebhookTests(TestCase):
    """
    Events stored before a SIGKILL are delivered after the restart, and
    peers the dead process held are announced offline exactly once.
    """

    timeout = 120

    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        self.base = base
        self.data_dir = str(base / "data")

    async def start(self, config: str) -> tuple[Any, TwistdProcess, int]:
        path = self.base / "meteredrt.toml"
        path.write_text(config)
        return await start_twistd(self, "--config", str(path), "--data-dir", self.data_dir)

    async def test_kill_9_then_restart(self) -> None:
        """
        With the receiver refusing, a peer connects (online is stored) and
        the server is killed; after a restart, with the receiver up, the
        stored online arrives, then one offline for the peer the crash
        took, after the grace.
        """
        receiver, url = await start_receiver(self, WEBHOOK_SECRET)
        receiver.statuses = [503] * 1000
        config = config_with_webhooks(url)
        process, child, port = await self.start(config)
        client = await connect_client(self, port)
        peer_id = (await client.welcomed)["peerId"]
        await receiver.wait_for(lambda: receiver.requests >= 1)
        await kill_twistd(process, child)
        self.assertEqual(receiver.accepted, [])

        receiver.statuses = []
        await self.start(config)
        await receiver.wait_for(lambda: len(receiver.of_type("peer.offline")) == 1)
        self.assertEqual(per_peer(receiver.accepted, peer_id), ["peer.online", "peer.offline"])
