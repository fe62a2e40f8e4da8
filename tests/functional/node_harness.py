"""
Run the official C{@metered-ca/realtime} SDK under Node for functional tests.

The SDK and the C{ws} package are pinned in C{tests/functional/node/} and
installed with C{npm ci} by L{ensure_node_modules}. L{run_node_script} runs a
script there as a child process of the reactor and collects the JSON event
lines it prints; L{run_sdk_scenario} does so for C{sdk_client.mjs}, whose
header documents the scenario and event formats.

Node and npm are required: when they are missing the tests fail with
L{NodeUnavailable} instead of being skipped, because a green run that never
spoke to the official SDK proves nothing about wire compatibility.

Main names: L{ensure_node_modules}, L{run_node_script}, L{run_sdk_scenario},
L{NodeScriptError}, L{NodeScriptTimeout}, L{NodeUnavailable}.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

NODE_DIR = Path(__file__).resolve().parent / "node"
SDK_CLIENT = "sdk_client.mjs"

# Written into node_modules after a successful `npm ci`; holds the hash of
# the manifest and lock it was installed from.
_MARKER = ".meteredrt-installed"

# Linux caps a single argv string at 128 KiB; larger scenarios go via a file.
_MAX_INLINE_SCENARIO = 64 * 1024

_STDERR_SHOWN = 8 * 1024

_installed_dir: str | None = None


class NodeUnavailable(RuntimeError):
    """
    Node or npm is missing, or C{npm ci} failed: the SDK tests cannot run.
    """


class NodeScriptError(Exception):
    """
    A Node script exited unsuccessfully or printed a line that is not a JSON
    object.

    The attributes keep everything the script produced so a test can still
    look at it.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None,
        signal: int | None,
        stderr: str,
        events: list[dict[str, Any]],
    ) -> None:
        shown = stderr[-_STDERR_SHOWN:]
        last = "\n".join(json.dumps(event) for event in events[-10:])
        super().__init__(
            f"{message}\n--- last events ---\n{last or '(none)'}"
            f"\n--- stderr ---\n{shown or '(empty)'}"
        )
        self.exit_code = exit_code
        self.signal = signal
        self.stderr = stderr
        self.events = events


class NodeScriptTimeout(NodeScriptError):
    """
    A Node script was still running at its deadline and has been killed.
    """


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((NODE_DIR / name).read_bytes())
    return digest.hexdigest()


def _require(command: str) -> str:
    found = shutil.which(command)
    if found is None:
        raise NodeUnavailable(
            f"{command!r} was not found on PATH. The functional tests drive the "
            "official @metered-ca/realtime SDK and need Node.js 20+ with npm; "
            "install them (CI does this in .ci/run) and run the tests again."
        )
    return found


def ensure_node_modules() -> str:
    """
    Install the pinned npm packages once per test run and return the
    directory that holds them.

    Runs C{npm ci --no-audit --no-fund} unless C{node_modules} was already
    installed from the current C{package.json} and C{package-lock.json}.
    This blocks: call it from C{setUpClass} (or before anything is waiting
    on the reactor), not from a callback.

    @raise NodeUnavailable: if node or npm is missing or C{npm ci} fails.
    """
    global _installed_dir
    if _installed_dir is not None:
        return _installed_dir
    _require("node")
    npm = _require("npm")
    # `trial -j` workers share the directory: one installs, the rest wait.
    with open(NODE_DIR / "package-lock.json", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = _lock_digest()
        marker = NODE_DIR / "node_modules" / _MARKER
        if not (marker.is_file() and marker.read_text().strip() == digest):
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if result.returncode != 0:
                raise NodeUnavailable(
                    f"npm ci in {NODE_DIR} failed with exit code {result.returncode}:\n"
                    f"{result.stdout}\n{result.stderr}"
                )
            marker.write_text(digest + "\n")
    _installed_dir = str(NODE_DIR)
    return _installed_dir


class EventLineProtocol(ProcessProtocol):
    """
    Collect a child's stdout as JSON event lines and its stderr as text, and
    fire C{finished} when it ends (killing it at C{deadline} seconds).
    """

    def __init__(self, clock: IReactorTime, deadline: float, description: str) -> None:
        self.finished: Deferred[list[dict[str, Any]]] = Deferred(self._cancel)
        self._clock = clock
        self._deadline = deadline
        self._description = description
        self._pending = b""
        self._stderr: list[bytes] = []
        self._events: list[dict[str, Any]] = []
        self._bad_lines: list[str] = []
        self._timed_out = False
        self._timeout_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timeout_call = self._clock.callLater(self._deadline, self._time_out)

    def outReceived(self, data: bytes) -> None:
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            self._parse(line)

    def errReceived(self, data: bytes) -> None:
        self._stderr.append(data)

    def _parse(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if isinstance(event, dict):
            self._events.append(event)
        else:
            self._bad_lines.append(text)

    def _kill(self) -> None:
        if self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def _time_out(self) -> None:
        self._timeout_call = None
        self._timed_out = True
        self._kill()

    def _cancel(self, _: Deferred[list[dict[str, Any]]]) -> None:
        self._kill()

    def processEnded(self, reason: Failure) -> None:
        if self._timeout_call is not None:
            self._timeout_call.cancel()
            self._timeout_call = None
        self._parse(self._pending)
        self._pending = b""
        if self.finished.called:
            # Cancelled: the Deferred has already failed with CancelledError.
            return
        exit_code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        stderr = b"".join(self._stderr).decode("utf-8", "replace")
        details = dict(
            exit_code=exit_code, signal=signal, stderr=stderr, events=self._events
        )
        if self._timed_out:
            self.finished.errback(
                NodeScriptTimeout(
                    f"{self._description} still running after {self._deadline}s; killed",
                    **details,
                )
            )
        elif exit_code != 0 or signal is not None:
            self.finished.errback(
                NodeScriptError(
                    f"{self._description} failed (exit code {exit_code}, signal {signal})",
                    **details,
                )
            )
        elif self._bad_lines:
            self.finished.errback(
                NodeScriptError(
                    f"{self._description} printed lines that are not JSON objects: "
                    + "; ".join(repr(line) for line in self._bad_lines[:5]),
                    **details,
                )
            )
        else:
            self.finished.callback(self._events)


def run_node_script(
    script: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    *,
    reactor: Any = None,
) -> Deferred[list[dict[str, Any]]]:
    """
    Run C{node <script> <args...>} in the harness directory and collect the
    JSON object it prints on each stdout line.

    @param script: a file name in C{tests/functional/node/}, or an absolute
        path.
    @param env: variables added to (or overriding) this process's
        environment for the child.
    @param timeout: seconds after which the child is killed and the result
        fails with L{NodeScriptTimeout}.
    @param reactor: an L{IReactorProcess} and L{IReactorTime}; the global
        reactor by default.
    @return: a Deferred firing with the events in the order printed, or
        failing with L{NodeScriptError} (stderr and events attached) if the
        script exits non-zero, dies from a signal or prints a non-JSON line.
        Cancelling it kills the child.
    """
    node_dir = ensure_node_modules()
    node = _require("node")
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    assert IReactorProcess.providedBy(reactor) and IReactorTime.providedBy(reactor)
    path = script if os.path.isabs(script) else os.path.join(node_dir, script)
    child_env = dict(os.environ)
    if env is not None:
        child_env.update(env)
    protocol = EventLineProtocol(reactor, timeout, f"node {os.path.basename(path)}")
    reactor.spawnProcess(
        protocol, node, [node, path, *args], env=child_env, path=node_dir
    )
    return protocol.finished


def run_sdk_scenario(
    scenario: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    *,
    reactor: Any = None,
) -> Deferred[list[dict[str, Any]]]:
    """
    Run one C{sdk_client.mjs} scenario and return its events.

    The scenario goes on the command line, or through a temporary file when
    it is too large for one argument. See L{run_node_script} for the result.
    """
    encoded = json.dumps(scenario)
    if len(encoded.encode("utf-8")) <= _MAX_INLINE_SCENARIO:
        return run_node_script(SDK_CLIENT, [encoded], env, timeout, reactor=reactor)
    handle, path = tempfile.mkstemp(prefix="meteredrt-scenario-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as scenario_file:
        scenario_file.write(encoded)

    def remove(result: object) -> object:
        os.unlink(path)
        return result

    return run_node_script(
        SDK_CLIENT, [path], env, timeout, reactor=reactor
    ).addBoth(remove)
