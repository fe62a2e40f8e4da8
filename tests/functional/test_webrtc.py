"""
WebRTC through meteredrt in real browsers (protocol §21), on loopback only.

Two headless Chromium pages (Debian's C{chromium}, driven by
C{playwright-core} from C{tests/functional/node/webrtc_browser.mjs}) open the
static demo in C{examples/webrtc/}, which loads the official SDK's UMD build;
both C{MeteredPeer.join()} one room on a real meteredrt, find each other
through presence, negotiate over C{send}, open a data channel and exchange a
message both ways. Screenshots of both pages are kept as test artifacts.

Only loopback addresses may appear in a test, and Chromium's ICE would
otherwise use the machine's outward interface. So the whole session (the
server, the static site, Node and Chromium) runs in one child process,
L{tests.functional.webrtc_session}, inside fresh network and PID namespaces
(C{unshare}) whose only interface is C{lo}: no packet can use an address but
127.0.0.1 or ::1, and killing the child ends every process in it.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from .node_harness import EventLineProtocol, NodeScriptError, ensure_node_modules

#: Debian's chromium package; the test never uses a downloaded browser.
CHROMIUM = "/usr/bin/chromium"

REPOSITORY = Path(__file__).resolve().parents[2]

#: How long the pages may take, once loaded, to exchange their messages.
EXCHANGE_TIMEOUT = 30.0

#: The child, with everything it starts, is killed after this many seconds.
SESSION_DEADLINE = 90.0

#: Brings lo up in the new network namespace, then becomes the session.
_BRING_UP_LO = '"$1" link set lo up && shift && exec "$@"'

#: Where C{ip} lives even when PATH lacks the sbin directories.
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def _require_tool(name: str, package: str) -> str:
    """
    The path of the command C{name}, or a L{RuntimeError} naming the Debian
    C{package} that provides it.
    """
    found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN}")
    if found is None:
        raise RuntimeError(
            f"{name!r} was not found. The WebRTC test runs in a loopback-only network "
            f"namespace and needs util-linux's unshare and iproute2's ip; install {package} "
            "(.ci/run does this) and run the tests again."
        )
    return found


def session_command(artifacts: Path) -> list[str]:
    """
    The command line that runs L{tests.functional.webrtc_session} in new
    network, PID and mount namespaces with only C{lo}, up.

    C{--kill-child} and the PID namespace make the child's processes
    (Node, Chromium) die with it; C{--mount-proc} gives that namespace a
    matching C{/proc}.
    """
    unshare = _require_tool("unshare", "util-linux")
    ip = _require_tool("ip", "iproute2")
    return [
        unshare,
        "--net",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--",
        "/bin/sh",
        "-c",
        _BRING_UP_LO,
        "sh",
        ip,
        sys.executable,
        "-m",
        "tests.functional.webrtc_session",
        "--artifacts",
        str(artifacts),
        "--chromium",
        CHROMIUM,
        "--exchange-timeout",
        str(EXCHANGE_TIMEOUT),
    ]


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _describe(end: dict[str, Any]) -> str:
    return f"{end['type']}/{end['protocol']} {end['address']}:{end['port']}"


class WebRTCDemoTests(TestCase):
    """
    The WebRTC demo in two headless Chromium pages, in a loopback-only
    network namespace.
    """

    timeout = SESSION_DEADLINE + 30

    @classmethod
    def setUpClass(cls) -> None:
        # Installs the npm packages here, where the network (if any) is; the
        # namespaced child only uses them.
        ensure_node_modules()

    def setUp(self) -> None:
        # A missing browser or namespace is a failure, not a skip: a green run
        # that never opened a data channel, or opened it over eth0, proves
        # nothing about WebRTC on loopback.
        if not os.access(CHROMIUM, os.X_OK):
            self.fail(
                f"{CHROMIUM} is missing. The WebRTC tests drive Debian's chromium package "
                "through playwright-core and never download a browser; install it with "
                "`apt-get install chromium` (.ci/run does this) and run the tests again."
            )

    async def run_session(self, artifacts: Path) -> list[dict[str, Any]]:
        """
        Run the namespaced session and return its events; fail the test
        with the namespace's error if it could not be entered.
        """
        from twisted.internet import reactor

        try:
            command = session_command(artifacts)
        except RuntimeError as e:
            self.fail(str(e))
        protocol = EventLineProtocol(
            reactor, SESSION_DEADLINE, "the WebRTC session in a loopback-only network namespace"
        )
        reactor.spawnProcess(  # type: ignore[attr-defined]
            protocol, command[0], command, env=dict(os.environ), path=str(REPOSITORY)
        )
        try:
            return await protocol.finished
        except NodeScriptError as e:
            if not any(event.get("event") == "interfaces" for event in e.events):
                self.fail(
                    "Could not start the session in a loopback-only network namespace: "
                    "`unshare --net --pid` needs root (or CAP_SYS_ADMIN) and `ip link set lo "
                    f"up` needs iproute2. The browser test never falls back to the host "
                    f"network.\n{e}"
                )
            raise

    async def test_data_channel_both_ways(self) -> None:
        """
        Two pages in one room open a data channel through meteredrt's
        signalling, each receives the other's message, and both ends of the
        candidate pair ICE selected on each page are loopback addresses.
        """
        artifacts = Path(self.mktemp()).resolve()
        artifacts.mkdir(parents=True)
        screenshots = [artifacts / "webrtc-a.png", artifacts / "webrtc-b.png"]
        print(f"\nWebRTC demo screenshots: {' '.join(map(str, screenshots))}")

        events = await self.run_session(artifacts)

        kinds = [event["event"] for event in events]
        (interfaces,) = [event for event in events if event["event"] == "interfaces"]
        self.assertEqual(interfaces["names"], ["lo"])
        self.assertEqual(kinds[-2:], ["done", "session"], events)
        self.assertTrue(events[-1]["ok"], events)
        self.assertEqual([event for event in events if event["event"] == "pageerror"], [])

        reports = {event["page"]: event for event in events if event["event"] == "page"}
        self.assertEqual(
            {name: report["microphone"] for name, report in reports.items()},
            {"a": "granted", "b": "granted"},
        )
        a, b = reports["a"]["demo"], reports["b"]["demo"]
        self.assertEqual((a["remoteId"], b["remoteId"]), (b["peerId"], a["peerId"]))
        self.assertEqual(a["received"], f"hello from {b['peerId']}")
        self.assertEqual(b["received"], f"hello from {a['peerId']}")
        self.assertEqual((a["sent"], b["sent"]), (b["received"], a["received"]))

        for name, demo, other in (("a", a, b), ("b", b, a)):
            pair, other_local = demo["candidatePair"], other["candidatePair"]["local"]
            print(f"page {name} candidate pair: {_describe(pair['local'])} <-> {_describe(pair['remote'])}")
            self.assertTrue(
                _is_loopback(pair["local"]["address"]),
                f"page {name}'s selected local candidate is not on loopback: {pair}",
            )
            # A remote end learnt from a connectivity check (prflx) has its
            # address hidden by Chromium; it is then the other page's local
            # end, which must be the same port on loopback.
            remote = pair["remote"]
            self.assertTrue(
                _is_loopback(remote["address"])
                or (remote["address"] is None and remote["port"] == other_local["port"] and _is_loopback(other_local["address"])),
                f"page {name}'s selected remote candidate is not on loopback: {pair}",
            )

        self.assertEqual(
            [event["path"] for event in events if event["event"] == "screenshot"],
            [str(path) for path in screenshots],
        )
        for path in screenshots:
            self.assertTrue(path.stat().st_size > 0, path)
