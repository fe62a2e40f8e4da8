"""
The operator's first five minutes, for real: run the README's install
command as written in a copy of the source tree (it makes a fresh
virtualenv), start C{twistd -n meteredrt} the way the command does, connect
with the publishable key it prints, and stop it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.readme import ROOT, setup_commands

from .support import TwistdProcess

#: Never copied with the source tree: local state, caches, build output.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".tox", "node_modules", "_trial_temp*", "meteredrt-data",
    "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".mypy_cache",
    ".ruff_cache", "results", "twistd.pid", "twistd.log",
)
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
    The README's install-and-run command, from a copy of the source tree.
    """

    timeout = 600

    async def test_install_run_connect_and_drain(self) -> None:
        """
        The README's command installs into a fresh C{.venv} and starts on the
        embedded default, prints a publishable key a client can connect
        with, and on SIGTERM sends going_away and closes with 1001.
        """
        server_command, _ = setup_commands()
        *install, run = [step.strip() for step in server_command.split("&&")]
        self.assertEqual(shlex.split(run)[:3], [".venv/bin/twistd", "-n", "meteredrt"])
        base = Path(self.mktemp()).resolve()
        clone = base / "meteredrt"
        shutil.copytree(ROOT, clone, ignore=_NOT_SOURCE)
        # Everything before the server start, through a shell, as written;
        # `python3` is whichever one PATH names, as for a user.
        await _run("/bin/sh", "-c", " && ".join(install), cwd=str(clone))
        venv = clone / ".venv"

        twistd = TwistdProcess()
        # The embedded default (tcp:8080) may be taken on a shared machine, so
        # this is the one option added: an ephemeral loopback port.
        process = reactor.spawnProcess(
            twistd,
            str(clone / shlex.split(run)[0]),
            [*shlex.split(run), "--listen", "tcp:0:interface=127.0.0.1"],
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(base)},
            path=str(clone),
        )
        self.addCleanup(lambda: twistd.ended if process.pid is None else _kill(process, twistd))
        port = await twistd.listening
        key = PUBLISHABLE.search(twistd.output)
        self.assertIsNotNone(key, twistd.output.decode(errors="replace"))
        self.assertTrue((clone / "meteredrt-data").is_dir())

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
            str(venv / "bin" / "meteredrt"), "keys", "list", "--app", "default", "--json", cwd=str(clone)
        )
        self.assertIn(key.group(1).decode(), listed)  # type: ignore[union-attr]
        self.assertNotIn("sk_secret_", listed)


def _kill(process: object, twistd: TwistdProcess) -> Deferred[tuple[int | None, int | None]]:
    if not twistd.ended.called:
        process.signalProcess("KILL")  # type: ignore[attr-defined]
    return twistd.ended
