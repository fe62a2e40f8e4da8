"""
TURN credentials in the welcome, end to end (protocol §20.1, §20.3).

Each test runs a fake Metered TURN API on one loopback port
(L{tests.functional.fake_turn}) and the real composed meteredrt on another,
with an app whose C{[apps.turn]} points at the fake; the official SDK under
Node connects and reports the C{iceServers} it took from its welcome.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jwt
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from meteredrt.apps import ACTIONS, Key, KeyType
from meteredrt.auth import mint_token

from .fake_turn import SECRET_KEY as TURN_SECRET_KEY
from .fake_turn import RunningTurnApi, ice_servers_for, start_fake_turn
from .node_harness import ensure_node_modules, run_sdk_scenario
from .support import RunningServer, start_server

ROOT = Path(__file__).resolve().parents[2]
APP_ID = "app_turn"
SECRET_KEY_ID = "sk_id_turn"
SECRET = "sk_secret_turn_0123456789abcdef0123"
PUBLISHABLE_KEY = "pk_live_turn"
PUBLISHABLE_NO_TURN = "pk_live_turn_off"

SIGNING_KEY = Key(SECRET_KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET)

#: How many SDK clients connect at once in the burst test.
BURST = 50


def config(api_base: str) -> str:
    """
    One app with TURN pointed at C{api_base} and keys with and without
    auto-injection.
    """
    return f"""
[server]
drain_grace_seconds = 0

[[apps]]
id = "{APP_ID}"

[apps.turn]
app_name = "functional"
secret_key = "{TURN_SECRET_KEY}"
api_base = "{api_base}"

[[apps.keys]]
type = "secret"
key_id = "{SECRET_KEY_ID}"
secret = "{SECRET}"
channel_patterns = ["**"]
actions = ["publish", "subscribe", "presence", "send"]

[[apps.keys]]
type = "publishable"
key_id = "{PUBLISHABLE_KEY}"
channel_patterns = ["**"]
actions = ["subscribe", "publish", "presence", "send"]

[[apps.keys]]
type = "publishable"
key_id = "{PUBLISHABLE_NO_TURN}"
channel_patterns = ["**"]
actions = ["subscribe", "publish", "presence", "send"]
auto_inject_turn = false
"""


def connected_events(events: list[dict]) -> list[dict]:
    return [event for event in events if event["event"] == "connected"]


class TurnInjectionTests(TestCase):
    """
    What a connecting SDK gets in C{iceServers} from a server with TURN
    configured.
    """

    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.turn: RunningTurnApi = start_fake_turn(self)
        self.server: RunningServer = await start_server(self, config(self.turn.api_base))

    def connect(self, **credential: str) -> Deferred[list[dict]]:
        """
        Connect one SDK client with C{apiKey=…} or C{token=…} and close it.
        """
        scenario = {"url": self.server.url, **credential, "steps": [{"op": "connect"}]}
        return run_sdk_scenario(scenario, timeout=60)

    async def test_publishable_key_gets_credentials(self) -> None:
        """
        A publishable-key client's welcome carries the ICE servers of a
        credential the server created through the TURN API.
        """
        [connected] = connected_events(await self.connect(apiKey=PUBLISHABLE_KEY))
        self.assertEqual(connected["iceServers"], ice_servers_for(1))
        self.assertEqual((self.turn.api.created, self.turn.api.listed), (1, 1))

    async def test_jwt_ice_servers_win(self) -> None:
        """
        A JWT that carries its own C{metadata.iceServers} gets exactly those,
        and the TURN API is not called.
        """
        own = [{"urls": "stun:stun.jwt.example:3478"}]
        token = mint_token(
            SIGNING_KEY,
            "u_jwt",
            now=int(time.time()),
            expires_in=600,
            metadata={"iceServers": own, "room": "r1"},
        )
        [connected] = connected_events(await self.connect(token=token))
        self.assertEqual(connected["iceServers"], own)
        self.assertEqual(self.turn.api.created, 0)

    async def test_jwt_metadata_merged(self) -> None:
        """
        A JWT with C{metadata} but no C{iceServers} gets the injected list.
        """
        token = mint_token(
            SIGNING_KEY, "u_merge", now=int(time.time()), expires_in=600, metadata={"room": "r1"}
        )
        [connected] = connected_events(await self.connect(token=token))
        self.assertEqual(connected["iceServers"], ice_servers_for(1))

    async def test_key_without_injection(self) -> None:
        """
        A key with C{auto_inject_turn = false} gets no C{iceServers}.
        """
        [connected] = connected_events(await self.connect(apiKey=PUBLISHABLE_NO_TURN))
        self.assertNotIn("iceServers", connected)
        self.assertEqual(self.turn.api.created, 0)

    async def test_burst_is_cached(self) -> None:
        """
        Fifty clients connecting at once all get credentials, from at most
        two credential creations.
        """
        names = [f"c{index}" for index in range(BURST)]
        scenario = {
            "clients": {
                name: {"url": self.server.url, "apiKey": PUBLISHABLE_KEY} for name in names
            },
            "steps": [{"op": "connect", "client": name, "noWait": True} for name in names],
        }
        connected = connected_events(await run_sdk_scenario(scenario, timeout=90))
        self.assertEqual(len(connected), BURST)
        served = self.turn.api.served
        for event in connected:
            self.assertIn(event["iceServers"], served)
        self.assertLessEqual(self.turn.api.created, 2)

    async def test_api_failure(self) -> None:
        """
        When the TURN API answers 500 the welcome still arrives, without
        C{iceServers}.
        """
        self.turn.api.fail_with = 500
        events = await self.connect(apiKey=PUBLISHABLE_KEY)
        [connected] = connected_events(events)
        self.assertNotIn("iceServers", connected)
        self.assertEqual(self.turn.api.created, 1)
        [step] = [event for event in events if event["event"] == "step"]
        self.assertTrue(step["ok"])


class MintWithTurnCommandTests(TestCase):
    """
    C{meteredrt token mint --turn}, run as a real process against the
    loopback TURN API.
    """

    async def mint(self, config_text: str, *extra: str) -> tuple[int, str, str]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config_path = os.path.join(base, "meteredrt.toml")
        with open(config_path, "w") as f:
            f.write(config_text)
        argv = ["token", "mint", "--config", config_path, "--data-dir", os.path.join(base, "data")]
        argv += ["--app", APP_ID, "--key", SECRET_KEY_ID, "--peer-id", "agent-1", "--turn", "--json", *extra]
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", "import sys; from meteredrt.cli import main; sys.exit(main())", *argv],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            path=base,
        )
        return code, out.decode(), err.decode()

    async def test_credentials_in_token(self) -> None:
        """
        The printed token carries the TURN API's list in metadata.iceServers,
        next to the caller's own metadata.
        """
        turn = start_fake_turn(self)
        code, out, err = await self.mint(config(turn.api_base), "--metadata", '{"room": 7}')
        self.assertEqual(code, 0, err)
        claims = jwt.decode(json.loads(out)["token"], SECRET, algorithms=["HS256"])
        self.assertEqual(claims["metadata"], {"room": 7, "iceServers": ice_servers_for(1)})
        self.assertEqual((turn.api.created, turn.api.listed), (1, 1))

    async def test_turn_api_failure(self) -> None:
        """
        A TURN API that answers 500 is one line on stderr and exit status 2,
        and no token is printed.
        """
        turn = start_fake_turn(self)
        turn.api.fail_with = 500
        code, out, err = await self.mint(config(turn.api_base))
        self.assertEqual((code, out), (2, ""))
        self.assertIn("TURN API", err)
        self.assertNotIn("Traceback", err)
