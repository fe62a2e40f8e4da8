"""
C{twistd meteredrt} as a daemon (no C{-n}): its standard output is
discarded, so the keys of the first start must reach the operator another
way, a private file in the data directory, without the secret ever being
logged.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
from pathlib import Path

import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from meteredrt.tap import FIRST_KEYS_FILE

from .support import LISTENING

ROOT = Path(__file__).resolve().parents[2]

#: The twistd console script, run with this interpreter.
TWISTD = "from twisted.scripts.twistd import run; run()"

SECRET_KEY_ID = re.compile(r"secret key id:\s+(sk_id_\S+)")
SECRET = re.compile(r"secret key secret:\s+(sk_secret_\S+)")

#: How long a daemon may take to listen, or to exit after SIGTERM.
WAIT = 20.0
POLL_INTERVAL = 0.1


class DaemonFirstStartTests(TestCase):
    """
    The first start of a daemon leaves its keys in a private file.
    """

    timeout = 90

    async def wait_for(self, condition: object, what: str) -> None:
        """
        Poll C{condition()} until it is true, for at most L{WAIT} seconds.
        """
        assert callable(condition)
        for _ in range(int(WAIT / POLL_INTERVAL)):
            if condition():
                return
            await deferLater(reactor, POLL_INTERVAL)
        self.fail(f"timed out waiting for {what}")

    def stop(self, pidfile: Path) -> None:
        """
        SIGTERM the daemon if it still runs (cleanup after a failure).
        """
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass

    async def test_keys_in_private_file(self) -> None:
        """
        The daemon writes the new app's keys to a mode 0600 file in the data
        directory, logs the file's path but not the secret, and the secret
        in the file authenticates REST calls.
        """
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        pidfile, logfile, data_dir = base / "twistd.pid", base / "twistd.log", base / "data"
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-c", TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "meteredrt",
                "--data-dir", str(data_dir), "--listen", "tcp:0:interface=127.0.0.1",
            ],  # fmt: skip
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(base)},
            path=str(base),
        )
        self.assertEqual((code, out, err), (0, b"", b""))
        self.addCleanup(self.stop, pidfile)
        await self.wait_for(lambda: logfile.exists() and LISTENING.search(logfile.read_bytes()), "listening")
        log = logfile.read_text()
        port = int(LISTENING.search(log.encode()).group(1))  # type: ignore[union-attr]

        keys_file = data_dir / FIRST_KEYS_FILE
        self.assertEqual(stat.S_IMODE(keys_file.stat().st_mode), 0o600)
        keys = keys_file.read_text()
        key_id = SECRET_KEY_ID.search(keys).group(1)  # type: ignore[union-attr]
        secret = SECRET.search(keys).group(1)  # type: ignore[union-attr]
        self.assertIn(str(keys_file), log)
        self.assertNotIn(secret, log)

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(
            f"http://127.0.0.1:{port}/v1/usage", headers={"Authorization": f"Bearer {key_id}:{secret}"}, pool=pool
        )
        self.assertEqual(response.code, 200, await response.text())

        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        await self.wait_for(lambda: not pidfile.exists(), "the daemon to exit")
        self.assertIn("Server Shut Down.", logfile.read_text())
        self.assertNotIn(secret, logfile.read_text())
