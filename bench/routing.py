"""
The server's own work per publish, in process, with and without wildcard
subscriptions that match nothing published.

Issue 13 asks that a publish cost the same however many non-matching
wildcard subscriptions an app holds (at most +10% with 1,000 of them,
with or without ``/``). ``bench/run.py --scenario wildcard`` measures that
end to end, but on two shared cores its rounds move by ±20%, twice the
margin. This measures the part the noise could come from, without the
sockets: a real L{Hub} over the in-memory broker and presence, with a real
L{Meter}, handles parsed C{publish} frames from one connection to a
channel with ``--subscribers`` concrete subscribers, while other
connections hold 1,000 wildcard subscriptions shaped like the end-to-end
scenario's (``bench.x-N-*``, ``bench/x-N/*``). Each receiver's sink frames
the message as the WebSocket adapter would (once per frame object).

In one process the three hubs are built first and then timed in turns,
best of ``--repeat``: CPU time per publish (``time.process_time``), and
the ratio of each noisy hub's to the quiet one's. That ratio is steady
within a process but moves by ±10% from one process to the next (string
hashes are salted per process and the heap is laid out anew, so the same
work meets the caches differently), so the script runs ``--processes``
fresh interpreters and reports the median of their figures and ratios,
with each process's ratio.

Usage::

    python bench/routing.py [--processes 9] [--publishes 4000] [--repeat 25] [--subscribers 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run import WILDCARD_CHANNEL, WILDCARD_SHAPES  # noqa: E402  (the bench/run.py beside this script)
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import MemoryReactorClock  # noqa: E402

from meteredrt.apps import ACTIONS, App  # noqa: E402
from meteredrt.auth import Grant  # noqa: E402
from meteredrt.broker.memory import MemoryBroker  # noqa: E402
from meteredrt.hub import Hub, Session  # noqa: E402
from meteredrt.metering import Meter  # noqa: E402
from meteredrt.presence.memory import MemoryPresence  # noqa: E402
from meteredrt.protocol import OutboundFrame, parse_frame  # noqa: E402
from meteredrt.usagestore import UsageStore  # noqa: E402
from meteredrt.ws import text_frame  # noqa: E402

#: Patterns per noise connection, as the load generator spreads them.
PER_CONNECTION = 90


class FramingSink:
    """
    A connection's end of the hub that frames what it is sent, once per
    frame object, as L{meteredrt.ws.RealtimeServerProtocol} does.
    """

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self.sent = 0

    def send_frame(self, frame: OutboundFrame) -> None:
        if frame.wire is None:
            frame.wire = text_frame(frame.payload)
        self.sent += 1

    def close(self, code: int, reason: str) -> None:
        raise AssertionError(f"closed {code} {reason}")


def grant(peer_id: str) -> Grant:
    return Grant(
        app_id="app_bench",
        key_id="sk_bench",
        peer_id=peer_id,
        actions=ACTIONS,
        key_patterns=("**",),
        claim_patterns=None,
        peer_metadata=None,
        metadata=None,
        expires_at=None,
        auto_inject_turn=False,
    )


def answered(deferred: Any) -> Any:
    """
    The result of a Deferred the in-memory seams have already fired.
    """
    results: list[Any] = []
    deferred.addBoth(results.append)
    if not results:
        raise RuntimeError("an in-memory seam did not answer at once")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def build(patterns: list[str], subscribers: int, data_dir: str) -> tuple[Hub, Session]:
    """
    A hub with C{subscribers} on L{WILDCARD_CHANNEL} and C{patterns} held by other
    connections; return it with the publishing session.
    """
    apps = {"app_bench": App("app_bench")}
    meter = Meter(Clock(), UsageStore(tempfile.mkdtemp(dir=data_dir), MemoryReactorClock()))
    hub = Hub(MemoryBroker(), MemoryPresence(), meter, apps.get, node_id="bench")

    def connect(peer_id: str) -> Session:
        return answered(hub.connect(FramingSink, grant(peer_id)))

    def subscribe(session: Session, channel: str) -> None:
        answered(hub.handle(session, parse_frame(json.dumps({"type": "subscribe", "channel": channel}))))

    for n in range(subscribers):
        subscribe(connect(f"sub-{n}"), WILDCARD_CHANNEL)
    for start in range(0, len(patterns), PER_CONNECTION):
        holder = connect(f"noise-{start}")
        for pattern in patterns[start : start + PER_CONNECTION]:
            subscribe(holder, pattern)
    return hub, connect("publisher")


def cpu_per_publish(hub: Hub, publisher: Session, publishes: int) -> float:
    """
    CPU seconds per publish of C{publishes} publishes of a 100-byte
    string, parsing included.
    """
    text = json.dumps({"type": "publish", "channel": WILDCARD_CHANNEL, "data": "x" * 100})
    start = time.process_time()
    for _ in range(publishes):
        hub.handle(publisher, parse_frame(text))
    return (time.process_time() - start) / publishes


def measure_here(args: argparse.Namespace) -> dict[str, float]:
    """
    Best CPU seconds per publish of each shape, in this process.
    """
    with tempfile.TemporaryDirectory(prefix="meteredrt-routing-") as data_dir:
        hubs = {shape: build(patterns, args.subscribers, data_dir) for shape, patterns in WILDCARD_SHAPES.items()}
        best = {shape: float("inf") for shape in hubs}
        for _ in range(args.repeat):
            for shape, (hub, publisher) in hubs.items():
                best[shape] = min(best[shape], cpu_per_publish(hub, publisher, args.publishes))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=9)
    parser.add_argument("--publishes", type=int, default=4_000)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(measure_here(args)))
        return
    passed = [f"--{name}={getattr(args, name)}" for name in ("publishes", "repeat", "subscribers")]
    runs = [
        json.loads(subprocess.run(
            [sys.executable, __file__, "--in-process", *passed], check=True, capture_output=True, text=True, timeout=600,
        ).stdout)
        for _ in range(args.processes)
    ]  # fmt: skip
    for shape in WILDCARD_SHAPES:
        record: dict[str, Any] = {
            "shape": shape,
            "cpu_us_per_publish": round(statistics.median(run[shape] for run in runs) * 1e6, 2),
        }
        if shape != "none":
            ratios = [round(run[shape] / run["none"], 3) for run in runs]
            record["vs_none"] = statistics.median(ratios)
            record["vs_none_per_process"] = ratios
        print(json.dumps(record))


if __name__ == "__main__":
    main()
