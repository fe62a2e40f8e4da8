"""
Start-up failures of a real C{twistd meteredrt} child: each ends with one
line on standard error naming the problem, exit status 1, and nothing left
behind (no data directory, no pid file).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from meteredrt.tap import Listener

ROOT = Path(__file__).resolve().parents[2]

#: The twistd console script, run with this interpreter.
TWISTD = "from twisted.scripts.twistd import run; run()"

BAD_ACTION_CONFIG = """
[[apps]]
id = "app_demo"

[[apps.keys]]
type = "publishable"
key_id = "pk_live_demo"
channel_patterns = ["**"]
actions = ["subscribe", "fly"]
"""


class StartupFailureTests(TestCase):
    """
    Every way a start can fail gives one clear line and a non-zero status.
    """

    timeout = 60

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).resolve()
        self.base.mkdir(parents=True)
        self.data_dir = self.base / "data"
        self.pidfile = self.base / "twistd.pid"

    async def twistd(self, *args: str) -> tuple[str, str, int]:
        """
        Run C{twistd -n meteredrt ARGS} to its end; fires with its standard
        output, standard error and exit status.
        """
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-c", TWISTD, f"--pidfile={self.pidfile}", "-n", "meteredrt",
                "--data-dir", str(self.data_dir), *args,
            ],  # fmt: skip
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(self.base)},
            path=str(self.base),
        )
        return out.decode(), err.decode(), code

    def assert_refused(self, out: str, err: str, code: int, expected: str) -> None:
        """
        The process exited 1 with exactly one line on standard error, which
        is C{expected}, and created neither its data directory nor a pid
        file; no traceback anywhere.
        """
        self.assertEqual(code, 1, f"stdout:\n{out}\nstderr:\n{err}")
        self.assertEqual(err.splitlines(), [expected], f"stdout:\n{out}")
        self.assertNotIn("Traceback", out)
        self.assertNotIn("Usage:", out)
        self.assertFalse(self.data_dir.exists(), "the data directory was created")
        self.assertFalse(self.pidfile.exists(), "the pid file was left behind")

    async def test_port_in_use(self) -> None:
        """
        A port another process holds is refused with the endpoint and the
        reason, before the data directory is created.
        """
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        endpoint = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        out, err, code = await self.twistd("--listen", endpoint)
        self.assert_refused(out, err, code, f"meteredrt: cannot listen on {endpoint}: Address already in use")

    async def test_second_listener_in_use(self) -> None:
        """
        When the second of two listeners cannot bind, the first is given up
        too and nothing is created.
        """
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        endpoint = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        out, err, code = await self.twistd("--listen", "tcp:0:interface=127.0.0.1", "--listen", endpoint)
        self.assert_refused(out, err, code, f"meteredrt: cannot listen on {endpoint}: Address already in use")

    async def test_bad_listen_value(self) -> None:
        """
        An endpoint string that does not parse is refused at option parsing,
        naming the option.
        """
        out, err, code = await self.twistd("--listen", "tcp:eighty")
        self.assert_refused(
            out,
            err,
            code,
            "meteredrt: <command line>: --listen[0]: not a usable endpoint 'tcp:eighty': "
            "invalid literal for int() with base 10: 'eighty'",
        )
        self.assertEqual(out, "")

    async def test_unknown_endpoint_type(self) -> None:
        """
        An unknown endpoint type in the file's listen list names the file and
        the key.
        """
        config = self.base / "meteredrt.toml"
        config.write_text('[server]\nlisten = ["tcp:0:interface=127.0.0.1", "tpc:8080"]\n')
        out, err, code = await self.twistd("--config", str(config))
        self.assert_refused(
            out,
            err,
            code,
            f"meteredrt: {config}: server.listen[1]: not a usable endpoint 'tpc:8080': Unknown endpoint type: 'tpc'",
        )

    async def test_config_error(self) -> None:
        """
        A configuration error is the documented one line, without twistd's
        usage text before it.
        """
        config = self.base / "meteredrt.toml"
        config.write_text(BAD_ACTION_CONFIG)
        out, err, code = await self.twistd("--config", str(config), "--listen", "tcp:0:interface=127.0.0.1")
        self.assert_refused(
            out,
            err,
            code,
            f"meteredrt: {config}: apps[0].keys[0].actions[1]: unknown action 'fly' "
            "(expected one of presence, publish, send, subscribe)",
        )
        self.assertEqual(out, "")

    async def test_unusable_database(self) -> None:
        """
        A key database that is not SQLite stops the start with its path, and
        nothing else is created beside it.
        """
        self.data_dir.mkdir()
        (self.data_dir / "meteredrt.sqlite3").write_bytes(b"not a database, not at all" * 10)
        out, err, code = await self.twistd("--listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual(code, 1, f"stdout:\n{out}\nstderr:\n{err}")
        self.assertEqual(
            err.splitlines(), [f"meteredrt: cannot use '{self.data_dir}/meteredrt.sqlite3': file is not a database"]
        )
        self.assertNotIn("Traceback", out)
        self.assertEqual(sorted(os.listdir(self.data_dir)), ["meteredrt.sqlite3"])
        self.assertFalse(self.pidfile.exists(), "the pid file was left behind")

    async def test_database_unreachable(self) -> None:
        """
        A PostgreSQL store that cannot be reached stops the start with the
        database (never its password) and the driver's reason, in one
        line, before the data directory is created: a supervisor sees a
        failure and starts the server again.
        """
        port = _closed_port()
        url = f"postgresql://meteredrt:secret@127.0.0.1:{port}/meteredrt"
        out, err, code = await self.twistd("--database", url, "--listen", "tcp:0:interface=127.0.0.1")
        self.assert_refused(
            out,
            err,
            code,
            f'meteredrt: cannot use PostgreSQL 127.0.0.1:{port}/meteredrt: connection to server at "127.0.0.1", '
            f"port {port} failed: Connection refused",
        )
        self.assertNotIn("secret", out + err)

    async def test_failure_after_reactor_started(self) -> None:
        """
        A start that fails once the reactor runs (L{fail_the_process}) ends
        the process with status 1 and one line, not twistd's 0.
        """
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", "from meteredrt.tap import fail_the_process; fail_the_process('the store went away')"],
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
            path=str(self.base),
        )
        self.assertEqual((out, err.decode().splitlines(), code), (b"", ["meteredrt: the store went away"], 1))


def _closed_port() -> int:
    """
    A loopback port nobody listens on (bound for a moment, then closed).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class _RecordingFactory(Factory):
    """
    Records the address of every connection it builds a protocol for.
    """

    def __init__(self) -> None:
        self.built: list[IAddress] = []

    def buildProtocol(self, addr: IAddress) -> Protocol:
        self.built.append(addr)
        return Protocol()


class PausedListenerTests(TestCase):
    """
    A bound L{Listener} leaves connections waiting until it accepts: the
    server binds before creating its stores and accepts after loading them.
    """

    async def test_accepts_only_when_told(self) -> None:
        """
        A client can connect to a bound listener (the kernel queues it), but
        no protocol is built before L{Listener.accept}; then it is.
        """
        factory = _RecordingFactory()
        listener = Listener("tcp:0:interface=127.0.0.1", factory, reactor)
        listener.bind()
        self.addCleanup(listener.stopService)
        address = listener.address
        assert address is not None
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(  # type: ignore[attr-defined]
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(client.transport.loseConnection)
        await deferLater(reactor, 0.3)
        self.assertEqual(factory.built, [])

        await listener.accept()
        for _ in range(100):
            if factory.built:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(len(factory.built), 1)
