"""
One run of the WebRTC demo in headless Chromium, as a program of its own.

L{tests.functional.test_webrtc} starts this module as
C{python -m tests.functional.webrtc_session} inside a fresh network
namespace whose only interface is C{lo}, so that the server, the static
site, the signalling WebSockets and every ICE candidate can only use
127.0.0.1 and ::1. It starts the real meteredrt service
(L{tests.functional.support.start_in}) and a static site serving
C{examples/webrtc/} with the pinned SDK's C{dist/} at C{sdk/}, both on
127.0.0.1, then runs C{tests/functional/node/webrtc_browser.mjs} under Node.

Usage::

    python -m tests.functional.webrtc_session --artifacts DIR [--chromium PATH]
        [--exchange-timeout SECONDS]

Standard output carries one JSON object per line: this program's own
C{interfaces} event (the network interfaces it sees), C{serving} (the
server and page addresses), then every event the browser script printed, and
finally C{session} with C{ok} true or false (and C{error}). The exit status
is 0 only when the browser script finished with C{done}. Twisted's log and
the browser script's stderr go to standard error.

Main names: L{main}, L{demo_site}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from .node_harness import NODE_DIR, NodeScriptError, run_node_script
from .support import PUBLISHABLE_KEY, start_in

DEMO_DIR = Path(__file__).resolve().parents[2] / "examples" / "webrtc"
SDK_DIST = NODE_DIR / "node_modules" / "@metered-ca" / "realtime" / "dist"

#: The room both pages join.
ROOM = "webrtc/room-1"


def emit_line(event: dict[str, Any]) -> None:
    """
    Print one JSON event line on standard output, at once.
    """
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def emit(event: str, **fields: Any) -> None:
    """
    Print this program's own event C{event} with C{fields}.
    """
    emit_line({**fields, "event": event})


def demo_site() -> Resource:
    """
    The demo directory, with the SDK's C{dist/} at C{sdk/} so the page's
    C{sdk/index.umd.js} is the pinned package's UMD build.
    """
    root = File(str(DEMO_DIR))
    root.putChild(b"sdk", File(str(SDK_DIST)))
    return root


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """
    The command line described in the module docstring.
    """
    parser = argparse.ArgumentParser(prog="python -m tests.functional.webrtc_session")
    parser.add_argument("--artifacts", required=True, help="existing directory for the screenshots")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument(
        "--exchange-timeout",
        type=float,
        default=30.0,
        help="seconds the loaded pages get to exchange their messages",
    )
    return parser.parse_args(argv)


async def run_session(reactor: Any, arguments: argparse.Namespace) -> bool:
    """
    Start the server and the static site, run the browser script, print
    the events; stop everything again. Returns whether the pages finished.
    """
    # A namespace with more than lo would make "loopback only" a matter of
    # luck: refuse to run there.
    interfaces = sorted(name for _, name in socket.if_nameindex())
    emit("interfaces", names=interfaces)
    if interfaces != ["lo"]:
        emit("session", ok=False, error=f"not a loopback-only network namespace: {interfaces}")
        return False

    with tempfile.TemporaryDirectory(prefix="meteredrt-webrtc-") as directory:
        stops: list[Any] = []
        try:
            server = await start_in(directory, stops.append)
            site = Site(demo_site())
            site.noisy = False
            static: IListeningPort = reactor.listenTCP(0, site, interface="127.0.0.1")
            stops.append(static.stopListening)
            page = f"http://127.0.0.1:{static.getHost().port}/index.html"
            emit("serving", server=server.url, page=page)
            artifacts = Path(arguments.artifacts)
            options = {
                "chromium": arguments.chromium,
                "page": page,
                "url": server.url,
                "key": PUBLISHABLE_KEY,
                "room": ROOM,
                "timeoutMs": int(arguments.exchange_timeout * 1000),
                "screenshots": [str(artifacts / "webrtc-a.png"), str(artifacts / "webrtc-b.png")],
            }
            try:
                events = await run_node_script(
                    "webrtc_browser.mjs",
                    [json.dumps(options)],
                    timeout=arguments.exchange_timeout + 30,
                    reactor=reactor,
                )
            except NodeScriptError as e:
                for event in e.events:
                    emit_line(event)
                sys.stderr.write(e.stderr)
                emit("session", ok=False, error=str(e).splitlines()[0])
                return False
            for event in events:
                emit_line(event)
            ok = bool(events) and events[-1].get("event") == "done"
            emit("session", ok=ok)
            return ok
        finally:
            for stop in reversed(stops):
                await stop()


def main(reactor: Any, *argv: str) -> Deferred[None]:
    """
    L{react} entry point: run one session; a failed one exits with status 1.
    """
    arguments = parse_arguments(list(argv))
    # Autobahn logs every frame at debug level; info and above is enough to
    # explain a failure.
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    async def session() -> None:
        if not await run_session(reactor, arguments):
            raise SystemExit(1)

    return Deferred.fromCoroutine(session())


if __name__ == "__main__":
    react(main, sys.argv[1:])
