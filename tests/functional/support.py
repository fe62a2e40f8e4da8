"""
Start the real composed server in-process for functional tests.

L{start_server} runs L{meteredrt.tap.makeService} exactly as C{twistd}
would, on the global reactor, listening on an ephemeral loopback port, with
a configuration file that declares one app with known keys. Clients then
connect over real sockets. L{start_in} does the same outside a test case
(C{tests/functional/webrtc_session.py} runs it in a child process).

Main names: L{start_server}, L{start_in}, L{RunningServer}, L{CONFIG}, and
L{TwistdProcess}, L{start_twistd} and L{kill_twistd} for tests that run a
real C{twistd} child.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import frozen
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from meteredrt.tap import Options, makeService

APP_ID = "app_test"
SECRET_KEY_ID = "sk_id_functional"
SECRET = "sk_secret_functional_0123456789abcdef"
PUBLISHABLE_KEY = "pk_live_functional"
PUBLISHABLE_NO_SEND = "pk_live_functional_nosend"
OTHER_APP_ID = "app_other"
OTHER_SECRET_KEY_ID = "sk_id_other"
OTHER_SECRET = "sk_secret_other_0123456789abcdef"

CONFIG = f"""
[server]
# Tests stop servers often; none of them has a load balancer to wait for.
drain_grace_seconds = 0

[[apps]]
id = "{APP_ID}"

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
key_id = "{PUBLISHABLE_NO_SEND}"
channel_patterns = ["public/**"]
actions = ["subscribe", "publish", "presence"]

[[apps]]
id = "{OTHER_APP_ID}"

[[apps.keys]]
type = "secret"
key_id = "{OTHER_SECRET_KEY_ID}"
secret = "{OTHER_SECRET}"
channel_patterns = ["**"]
actions = ["publish", "subscribe", "presence", "send"]
"""


@frozen
class RunningServer:
    """
    A server started by L{start_server}.

    @ivar url: the origin to give the SDK (it appends C{/v1} itself).
    """

    service: Any
    port: int
    data_dir: str

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_in(
    directory: str,
    cleanup: Callable[[Callable[[], object]], object],
    config: str = CONFIG,
    extra_args: tuple[str, ...] = (),
) -> RunningServer:
    """
    Start meteredrt with its configuration file and data in C{directory}
    (which must exist).

    @param cleanup: called once with the service's C{stopService}, as soon
        as the service has started, so the caller can stop (and drain) it
        even if listening fails.
    """
    config_path = os.path.join(directory, "meteredrt.toml")
    with open(config_path, "w") as f:
        f.write(config)
    data_dir = os.path.join(directory, "data")
    options = Options()
    options.parseOptions(
        ["--config", config_path, "--data-dir", data_dir, "--listen", "tcp:0:interface=127.0.0.1", *extra_args]
    )
    service = makeService(options, reactor)
    service.startService()
    cleanup(service.stopService)
    ports = await service.getServiceNamed("listeners").listening
    return RunningServer(service, ports[0].getHost().port, data_dir)


async def start_server(case: TestCase, config: str = CONFIG, extra_args: tuple[str, ...] = ()) -> RunningServer:
    """
    Start meteredrt for one test; it is stopped (and drained) on cleanup.
    """
    base = case.mktemp()
    os.makedirs(base)
    return await start_in(base, case.addCleanup, config, extra_args)


#: The line a started server logs once it listens, with its port.
LISTENING = re.compile(rb"meteredrt listening on .*port=(\d+)")


class TwistdProcess(ProcessProtocol):
    """
    A C{twistd -n meteredrt} child: fires L{listening} with its port once it
    logs it, L{ended} with its exit code or signal when it exits.
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = LISTENING.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"twistd exited early:\n{self.text}"))
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    @property
    def text(self) -> str:
        """
        Everything the process printed so far.
        """
        return self.output.decode(errors="replace")


#: The checkout the children run from (and import meteredrt from).
ROOT = Path(__file__).resolve().parents[2]

#: The twistd console script, run with this interpreter; the module has no
#: C{__main__} guard, so C{-m twisted.scripts.twistd} would do nothing.
TWISTD = "from twisted.scripts.twistd import run; run()"


async def start_twistd(case: TestCase, *args: str) -> tuple[Any, TwistdProcess, int]:
    """
    Start C{twistd -n meteredrt *args} on an ephemeral loopback port, from
    this checkout; fires with the process, its protocol and its port once
    it listens. It is killed on cleanup if still running.
    """
    child = TwistdProcess()
    process = reactor.spawnProcess(
        child,
        sys.executable,
        [
            sys.executable, "-c", TWISTD, "--pidfile=", "-n", "meteredrt",
            *args,
            "--listen", "tcp:0:interface=127.0.0.1",
        ],  # fmt: skip
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/")},
        path=str(ROOT),
    )
    case.addCleanup(kill_twistd, process, child)
    port = await child.listening
    return process, child, port


def kill_twistd(process: Any, child: TwistdProcess) -> Deferred[tuple[int | None, int | None]]:
    """
    SIGKILL a child unless it has ended; fires when it has.
    """
    if not child.ended.called:
        try:
            process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
    return child.ended


Frame = dict[str, Any]


class FramePeer(WebSocketClientProtocol):
    """
    A client that records the frames it receives and lets a test wait for
    one that matches, and for the end of the connection.
    """

    factory: FramePeerFactory

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self._waiting: list[tuple[Callable[[Frame], bool], Deferred[Frame]]] = []

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.deliver(json.loads(payload))

    def deliver(self, frame: Frame) -> None:
        """
        Keep C{frame} and fire whoever waits for one like it.
        """
        self.frames.append(frame)
        still = []
        for match, d in self._waiting:
            if match(frame):
                d.callback(frame)
            else:
                still.append((match, d))
        self._waiting = still

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed.callback(code)

    def frame(self, match: Callable[[Frame], bool]) -> Deferred[Frame]:
        """
        Fire with the first frame, already received or yet to come, for
        which C{match} is true.
        """
        for frame in self.frames:
            if match(frame):
                return succeed(frame)
        d: Deferred[Frame] = Deferred()
        self._waiting.append((match, d))
        return d

    def send_json(self, frame: Frame) -> None:
        """
        Send C{frame} as one text frame.
        """
        self.sendMessage(json.dumps(frame).encode("utf-8"))

    def messages(self) -> list[Frame]:
        """
        The channel messages received so far.
        """
        return [f for f in self.frames if f["type"] == "message"]


class FramePeerFactory(WebSocketClientFactory):
    """
    Makes one L{FramePeer} (or C{protocol}) and fires when it opens and when it closes.
    """

    protocol = FramePeer

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # Autobahn's client drops the link 1 s after its close (1006) if the
        # server has not answered; a loaded CI machine may take longer.
        self.setProtocolOptions(closeHandshakeTimeout=5)
        self.opened: Deferred[FramePeer] = Deferred()
        self.closed: Deferred[int | None] = Deferred()


def frame_is(kind: str, **fields: Any) -> Callable[[Frame], bool]:
    """
    Matches a server frame of type C{kind} whose C{fields} have these values.
    """
    return lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items())
