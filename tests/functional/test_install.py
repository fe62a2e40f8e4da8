"""
The operator's first five minutes, for real: install the package into a
fresh virtualenv, run C{twistd -n meteredrt} from an empty directory, connect
with the publishable key it prints, and stop it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from .support import TwistdProcess

ROOT = Path(__file__).resolve().parents[2]
PUBLISHABLE = re.compile(rb"publishable key:\s+(pk_live_\S+)")


class _Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.frames: list[dict] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.frames.append(frame)
        if frame["type"] == "welcome":
            self.factory.welcomed.callback(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.welcomed.called:
            self.factory.welcomed.errback(RuntimeError(f"closed before welcome: {code} {reason}"))
        self.factory.closed.callback((code, self.frames))


async def _run(*command: str, cwd: str | None = None) -> str:
    out, err, code = await getProcessOutputAndValue(command[0], command[1:], env=dict(os.environ), path=cwd)
    if code != 0:
        raise AssertionError(f"{' '.join(command)} exited {code}:\n{out.decode()}\n{err.decode()}")
    return out.decode()


class FreshInstallTests(TestCase):
    """
    C{pip install .} then C{twistd -n meteredrt} with no options.
    """

    timeout = 600

    async def test_install_run_connect_and_drain(self) -> None:
        """
        A fresh install starts on the embedded default, prints a publishable
        key a client can connect with, and on SIGTERM sends going_away and
        closes with 1001.
        """
        base = Path(self.mktemp()).resolve()
        venv, workdir = base / "venv", base / "empty"
        workdir.mkdir(parents=True)
        await _run(sys.executable, "-m", "venv", str(venv))
        await _run(str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT))

        twistd = TwistdProcess()
        # The embedded default (tcp:8080) may be taken on a shared machine, so
        # this is the one option given: an ephemeral loopback port.
        process = reactor.spawnProcess(
            twistd,
            str(venv / "bin" / "twistd"),
            ["twistd", "--pidfile=", "-n", "meteredrt", "--listen", "tcp:0:interface=127.0.0.1"],
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(base)},
            path=str(workdir),
        )
        self.addCleanup(lambda: twistd.ended if process.pid is None else _kill(process, twistd))
        port = await twistd.listening
        key = PUBLISHABLE.search(twistd.output)
        self.assertIsNotNone(key, twistd.output.decode(errors="replace"))
        self.assertTrue((workdir / "meteredrt-data").is_dir())

        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/v1?key={key.group(1).decode()}")  # type: ignore[union-attr]
        factory.protocol = _Client
        factory.welcomed = Deferred()
        factory.closed = Deferred()
        connectWS(factory)
        welcome = await factory.welcomed
        self.assertIsNone(welcome["expiresAt"])

        process.signalProcess("TERM")
        code, frames = await factory.closed
        self.assertEqual(code, 1001)
        self.assertEqual([f["type"] for f in frames], ["welcome", "going_away"])
        self.assertGreaterEqual(frames[1]["retryAfterMs"], 1000)
        # twistd shuts down cleanly, then re-raises the signal that stopped
        # it so that its exit status says why it ended.
        self.assertEqual(await twistd.ended, (None, signal.SIGTERM))
        self.assertIn(b"Server Shut Down.", twistd.output)

        listed = await _run(
            str(venv / "bin" / "meteredrt"), "keys", "list", "--app", "default", "--json", cwd=str(workdir)
        )
        self.assertIn(key.group(1).decode(), listed)  # type: ignore[union-attr]
        self.assertNotIn("sk_secret_", listed)


def _kill(process: object, twistd: TwistdProcess) -> Deferred[tuple[int | None, int | None]]:
    if not twistd.ended.called:
        process.signalProcess("KILL")  # type: ignore[attr-defined]
    return twistd.ended
