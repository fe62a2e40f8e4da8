"""
Suspending an app with the CLI while the official SDK is connected to a real
server: the live connections close with 4012, which the SDK treats as
terminal, new ones are refused with 4012, other apps carry on, and resuming
lets the app connect again.
"""

from __future__ import annotations

import io
import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from meteredrt.cli import main
from meteredrt.keystore import RELOAD_INTERVAL

from .support import APP_ID
from .test_rest_sdk import AUTH, OTHER_AUTH, _json, treq
from .test_sdk import OTHER_KEY, SDKTestCase, events_of, steps, token


class SuspensionTests(SDKTestCase):
    """
    C{meteredrt apps suspend} and C{apps resume} against a running server.
    """

    def operator(self, *argv: str) -> None:
        """
        Run one C{meteredrt} command on the running server's data directory
        and configuration file, as an operator would.
        """
        config = os.path.join(os.path.dirname(self.server.data_dir), "meteredrt.toml")
        stdout, stderr = io.StringIO(), io.StringIO()
        status = main([*argv, "--data-dir", self.server.data_dir, "--config", config], stdout=stdout, stderr=stderr)
        self.assertEqual(status, 0, stderr.getvalue())

    async def peers(self, headers: dict) -> list[str]:
        """
        The peerIds in channel C{room}, as one app's backend sees them.
        """
        response = await treq.get(f"{self.server.http}/v1/channels/room/peers", headers=headers)
        self.assertEqual(response.code, 200)
        return sorted(peer["peerId"] for peer in (await _json(response))["peers"])

    async def until_peers(self, headers: dict, expected: list[str]) -> None:
        """
        Wait (at most 20 s) for the SDK clients, in another process, to be
        in the channel.
        """
        for _ in range(400):
            if await self.peers(headers) == expected:
                return
            await _pause(0.05)
        self.fail(f"room never held {expected}")

    async def test_suspend_and_resume(self) -> None:
        """
        Within one re-read of a suspension, every SDK client of the app is
        disconnected with 4012 and does not reconnect although it may; a new
        connect is refused with 4012; another app's client in a channel of
        the same name stays connected and sees nobody leave. After a
        resumption the app connects again.
        """
        scenario = {
            "clients": {
                "a": {"token": token("alice"), "reconnect": True},
                "b": {"token": token("bob"), "reconnect": True},
                "other": {"token": token("alice", key=OTHER_KEY)},
                "late": {"token": token("late")},
            },
            "steps": [
                {"op": "connect", "client": "a"},
                {"op": "connect", "client": "b"},
                {"op": "connect", "client": "other"},
                {"op": "subscribe", "client": "a", "channel": "room"},
                {"op": "subscribe", "client": "b", "channel": "room"},
                {"op": "subscribe", "client": "other", "channel": "room"},
                {"op": "wait", "client": "a", "event": "disconnected", "timeoutMs": 30000},
                {"op": "wait", "client": "b", "event": "disconnected", "timeoutMs": 10000},
                {"op": "connect", "client": "late"},
                {"op": "publish", "client": "other", "channel": "room", "data": "still here"},
                {"op": "state", "client": "other"},
                {"op": "state", "client": "a"},
                {"op": "state", "client": "b"},
            ],
        }
        sdk = self.run_scenario(scenario)
        await self.until_peers(OTHER_AUTH, ["alice"])
        await self.until_peers(AUTH, ["alice", "bob"])

        suspended_at = time.time()
        self.operator("apps", "suspend", APP_ID)
        events = await sdk

        for client in ("a", "b"):
            [disconnected] = events_of(events, "disconnected", client)
            self.assertEqual((disconnected["code"], disconnected["willReconnect"]), (4012, False))
            self.assertLess(disconnected["at"] / 1000 - suspended_at, RELOAD_INTERVAL + 3)
            self.assertEqual(len(events_of(events, "connected", client)), 1)
        outcomes = {(s["op"], s["client"]): s for s in steps(events)}
        late = outcomes[("connect", "late")]
        self.assertFalse(late["ok"])
        self.assertEqual((late["error"]["name"], late["error"]["closeCode"]), ("SignallingConnectError", 4012))
        self.assertEqual(events_of(events, "connected", "late"), [])
        self.assertTrue(outcomes[("publish", "other")]["ok"])
        states = {s["client"]: s["state"] for s in steps(events) if s["op"] == "state"}
        self.assertEqual(states, {"other": "connected", "a": "closed", "b": "closed"})
        # Only the driver's own close at the end of the scenario.
        self.assertEqual([e["code"] for e in events_of(events, "disconnected", "other")], [1000])
        self.assertEqual([(p["joined"], p["left"]) for p in events_of(events, "presence", "other")], [([], [])])
        # Secret keys of a suspended app still authenticate REST calls.
        self.assertEqual(await self.peers(AUTH), [])

        self.operator("apps", "resume", APP_ID)
        for _ in range(40):
            events = await self.run_scenario({"token": token("back"), "steps": [{"op": "connect"}]})
            [step] = steps(events)
            if step["ok"]:
                break
            self.assertEqual(step["error"]["closeCode"], 4012)
            await _pause(0.2)
        else:
            self.fail("the resumed app never connected")


def _pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)
