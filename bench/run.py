"""
Benchmark a real meteredrt server process on loopback.

For each scenario and variant this starts ``twistd -n meteredrt`` on a free
127.0.0.1 port with a throw-away data directory and a configuration that
declares one app with a known secret key, mints the clients' JWTs with
L{meteredrt.auth.mint_token}, runs ``bench/loadgen.mjs`` (Node + ``ws``)
against it, samples the server's CPU and RSS from ``/proc`` around the
measured phase, and prints one JSON line per scenario and variant (medians
of ``--runs``).

Scenarios:

 - ``fanout``: 1,000 subscribers of one channel, 100-byte payloads, latency
   from publish to receipt; the one logical publisher is spread over
   ``--publishers`` connections taking turns, at most ``--window``
   publishes undelivered at any time.
 - ``pingpong``: 100 pairs, one direct round trip in flight per pair.
 - ``idle``: 10,000 authenticated connections opened with 100 handshakes
   in flight; connect rate, and server RSS growth per connection; with
   ``--idle-presence`` each also subscribes, holding ``presence``, to a
   channel of its own.
 - ``joinstorm``: 10,000 connections each connect and subscribe to one
   channel (nobody holds ``presence``), 100 at a time; the time from the
   first upgrade to the last ack.
 - ``wildcard``: fan-out to ``--wildcard-subscribers`` subscribers while
   1,000 wildcard subscriptions that match nothing published are held,
   without ``/`` (``bench.x-N-*``) or with (``bench/x-N/*``), against none
   (meteredrt only; the ratios are against the same server without them).

The app's plan raises the per-connection message rate (``message_rate``,
``message_burst``) to ``--message-rate`` so that the server's 4011 bucket
never sets the pace; a ``--ref-repo`` checkout from before plans carried a
rate gets the same figures as its factory's defaults instead.

Variants: ``speedups`` (the server as shipped) and ``baseline`` (the same
with ``METEREDRT_NO_SPEEDUPS=1``); with ``--ref-repo PATH`` also ``ref``,
the server as shipped from another checkout (e.g. a ``git worktree`` of an
earlier commit); with ``--reference PATH`` also ``floor``, a minimal
Twisted + Autobahn server speaking the hot subset of the protocol (kept
outside this repository), run with its Autobahn log fix. Ratios are printed
against ``ref`` and ``floor`` when they run, else against ``baseline``.
Runs of the variants are interleaved.

Usage::

    python bench/run.py --scenario all --runs 3 --baseline
    python bench/run.py --scenario all --runs 3 --ref-repo /tmp/mrt-base
    python bench/run.py --scenario pingpong --runs 3 --reference /path/to/floor_autobahn.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)

from meteredrt.apps import ACTIONS, Key, KeyType  # noqa: E402
from meteredrt.auth import mint_token  # noqa: E402

APP_ID = "app_bench"
KEY_ID = "sk_id_bench"
SECRET = "sk_secret_bench_0123456789abcdef0123456789"
CHANNEL = "bench/fanout"
JOIN_CHANNEL = "bench/room"
#: The channel claim every token carries, so that the reference server (which
#: needs one) and meteredrt authorize the same channels.
CHANNEL_CLAIMS = ["bench/*"]
CONFIG = """
[server]
# 10,000 upgrades from one address in seconds: far above the 60/min default.
upgrade_rate_limit = 1000000

[[apps]]
id = "{APP_ID}"
{plan}
[[apps.keys]]
type = "secret"
key_id = "{KEY_ID}"
secret = "{SECRET}"
channel_patterns = ["**"]
actions = ["publish", "subscribe", "presence", "send"]
"""
PLAN = """
[apps.plan]
message_rate = {rate}
message_burst = {rate}
"""
KEY = Key(KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET, auto_inject_turn=False)

#: The share of the server's per-connection message bucket the generator
#: allows itself.
CLIENT_SHARE = 0.95

VARIANTS = ("baseline", "speedups", "ref", "floor")
SCENARIOS = ("fanout", "pingpong", "idle", "joinstorm", "wildcard")
PRIMARY = {
    "fanout": "deliveries_per_s",
    "pingpong": "round_trips_per_s",
    "idle": "connects_per_s",
    "joinstorm": "subscribers_per_s",
    "wildcard": "deliveries_per_s",
}
#: Noise for the wildcard scenario: 1,000 patterns that match nothing published.
WILDCARD_SHAPES = {
    "none": [],
    "flat": [f"bench.x-{n}-*" for n in range(1000)],
    "slashed": [f"bench/x-{n}/*" for n in range(1000)],
}
WILDCARD_CHANNEL = "bench.y-1"

# A checkout from before plans carried a message rate: the same rate as the
# factory's defaults (the only way to set it there).
LEGACY_LAUNCHER = (
    "import sys, meteredrt.ws as ws; f = ws.RealtimeServerFactory.__init__; d = list(f.__defaults__); "
    "d[1] = d[2] = float(sys.argv.pop(1)); f.__defaults__ = tuple(d); "
    "from twisted.scripts.twistd import run; run()"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

LAUNCHER = "from twisted.scripts.twistd import run; run()"


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU time of a process so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """
    Resident set size of a process.
    """
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def supports_plan_rates(repo: str) -> bool:
    """
    Whether a checkout's plans carry the per-connection message rate.
    """
    with open(os.path.join(repo, "meteredrt", "apps.py")) as f:
        return "message_rate" in f.read()


def raise_fd_limit() -> int:
    """
    Raise the soft descriptor limit to the hard one; children inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Server:
    """
    One ``twistd -n meteredrt`` process on a free loopback port.
    """

    def __init__(self, workdir: str, variant: str, repo: str = REPO, message_rate: float = 1e6) -> None:
        self.port = free_port()
        self.log_path = os.path.join(workdir, "twistd.log")
        config = os.path.join(workdir, "meteredrt.toml")
        legacy = not supports_plan_rates(repo)
        with open(config, "w") as f:
            f.write(CONFIG.format(APP_ID=APP_ID, KEY_ID=KEY_ID, SECRET=SECRET, plan="" if legacy else PLAN.format(rate=message_rate)))
        # twistd finds the plugin, and the plugin the code, on PYTHONPATH.
        env = dict(os.environ, PYTHONPATH=repo)
        env.pop("METEREDRT_NO_SPEEDUPS", None)
        if variant == "baseline":
            env["METEREDRT_NO_SPEEDUPS"] = "1"
        launcher = [LEGACY_LAUNCHER, str(message_rate)] if legacy else [LAUNCHER]
        self.process = subprocess.Popen(
            [sys.executable, "-c", *launcher, "-n", "--pidfile=", "--logfile", self.log_path,
             "meteredrt", "--config", config, "--data-dir", os.path.join(workdir, "data"),
             "--listen", f"tcp:{self.port}:interface=127.0.0.1"],
            env=env, cwd=workdir, stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(workdir, "twistd.out"), "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"ws://127.0.0.1:{self.port}"
        try:
            self._wait_ready(time.monotonic() + 30)
        except RuntimeError:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            if self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError("server not ready within 30 s")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_bytes(self) -> int:
        """
        Bytes in the twistd log so far, rotated files included.
        """
        directory, name = os.path.split(self.log_path)
        total = 0
        for entry in os.scandir(directory):
            if entry.name.startswith(name):
                total += entry.stat().st_size
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class FloorServer(Server):
    """
    The reference server (``--reference``), on a free loopback port, with
    Autobahn's debug-argument formatting neutralised (its ``--quiet-autobahn``)
    as meteredrt's speedups do.
    """

    def __init__(self, workdir: str, script: str) -> None:
        self.port = free_port()
        self.log_path = os.path.join(workdir, "floor.log")
        self.process = subprocess.Popen(
            [sys.executable, script, "--port", str(self.port), "--quiet-autobahn",
             "--jwt-kid", KEY_ID, "--jwt-secret", SECRET],
            cwd=workdir, stdin=subprocess.DEVNULL,
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"ws://127.0.0.1:{self.port}"
        try:
            self._wait_ready(time.monotonic() + 30)
        except RuntimeError:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True


class LoadGen:
    """
    The Node load generator, spoken to in lines of JSON.
    """

    def __init__(self, settings_path: str, hard_timeout: float) -> None:
        self.process = subprocess.Popen(
            ["node", os.path.join(BENCH, "loadgen.mjs"), settings_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=BENCH,
        )  # fmt: skip
        self.deadline = time.monotonic() + hard_timeout

    def expect(self, event: str) -> dict[str, Any]:
        """
        Read lines until C{event}; fail on an error event, EOF or the deadline.
        """
        assert self.process.stdout is not None
        while time.monotonic() < self.deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator exited ({self.process.wait(timeout=10)}) before {event}")
            message = json.loads(line)
            if message.get("event") == "error":
                raise RuntimeError(f"load generator: {message['message']}")
            if message.get("event") == event:
                return message
        raise RuntimeError(f"no {event} from the load generator in time")

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def tokens(prefix: str, count: int, permissions: list[str], channels: list[str] | None = CHANNEL_CLAIMS) -> Iterator[str]:
    now = int(time.time())
    for i in range(count):
        yield mint_token(KEY, f"{prefix}{i}", now=now, expires_in=3600, permissions=permissions, channels=channels)


def scenario_settings(scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    """
    What the load generator needs for one scenario. Nobody holds the
    ``presence`` action, so subscribing 1,000 connections does not turn
    into 500,000 presence frames.
    """
    common = {
        "scenario": scenario,
        "durationS": args.duration,
        "ratePerConnection": args.message_rate * CLIENT_SHARE,
        "burstPerConnection": args.message_rate * CLIENT_SHARE,
        "hardTimeoutS": args.duration + 240,
    }
    if scenario == "fanout":
        return {
            **common,
            "subscribers": args.subscribers,
            "publishers": args.publishers,
            "channel": CHANNEL,
            "payloadBytes": 100,
            "window": args.window,
            "probeEvery": 20,
            "maxPublishes": args.max_publishes,
            "tokens": [*tokens("sub", args.subscribers, ["subscribe"]), *tokens("pub", args.publishers, ["publish"])],
        }
    if scenario == "pingpong":
        return {
            **common,
            "pairs": args.pairs,
            "maxRoundTrips": args.max_round_trips,
            "tokens": [*tokens("pa", args.pairs, ["send"]), *tokens("pb", args.pairs, ["send"])],
        }
    if scenario == "wildcard":
        noise = args.wildcard_noise_connections
        return {
            **common,
            "scenario": "fanout",  # the generator's fan-out, with noise subscriptions
            "subscribers": args.wildcard_subscribers,
            "publishers": args.publishers,
            "channel": WILDCARD_CHANNEL,
            "payloadBytes": 100,
            "window": args.window,
            "probeEvery": 1,
            "maxPublishes": args.max_publishes,
            "tokens": [
                *tokens("sub", args.wildcard_subscribers, ["subscribe"], None),
                *tokens("pub", args.publishers, ["publish"], None),
                *tokens("noise", noise, ["subscribe"], None),
            ],
        }
    if scenario == "joinstorm":
        return {
            **common,
            "connections": args.joiners,
            "inFlight": 100,
            "channel": JOIN_CHANNEL,
            "hardTimeoutS": 600,
            "tokens": list(tokens("join", args.joiners, ["subscribe"])),
        }
    return {
        **common,
        "connections": args.idle,
        "inFlight": 100,
        # --idle-presence: each connection also holds one presence
        # subscription, to a channel of its own.
        "subscribeEach": "bench/idle-" if args.idle_presence else None,
        "tokens": list(tokens("idle", args.idle, ["subscribe", "presence"] if args.idle_presence else ["subscribe"])),
    }


def start_server(workdir: str, variant: str, args: argparse.Namespace, attempts: int = 3) -> Server:
    """
    Start a server, on a fresh port if the first one was taken between
    L{free_port} and the server's C{listen} (seen after the idle scenario's
    10,000 client sockets).
    """
    for attempt in range(attempts):
        try:
            if variant == "floor":
                return FloorServer(workdir, args.reference)
            return Server(workdir, variant, args.ref_repo if variant == "ref" else REPO, args.message_rate)
        except RuntimeError as e:
            print(json.dumps({"server_start_failed": str(e), "attempt": attempt + 1}), file=sys.stderr, flush=True)
            time.sleep(1.0)
    raise RuntimeError(f"server did not start in {attempts} attempts")


def start_profiler(pid: int, scenario: str, variant: str, args: argparse.Namespace) -> subprocess.Popen | None:
    """
    With C{--py-spy}, sample the server for the measured phase into a raw
    (collapsed stacks) file in C{--profile-dir}.
    """
    if not args.py_spy:
        return None
    os.makedirs(args.profile_dir, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    output = os.path.join(args.profile_dir, f"{scenario}-{variant}-{stamp}.txt")
    return subprocess.Popen(
        [args.py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", output,
         "--duration", str(max(1, int(args.duration) - 1)), "--rate", "100"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def run_once(
    scenario: str, variant: str, settings_path: str, args: argparse.Namespace, label: str | None = None
) -> dict[str, Any]:
    """
    One server, one load generator, one measurement; C{label} names the
    variant in the record (the wildcard scenario runs one per noise shape).
    """
    workdir = tempfile.mkdtemp(prefix=f"meteredrt-bench-{scenario}-")
    server = loadgen = None
    try:
        repo = {"ref": args.ref_repo, "floor": args.reference}.get(variant, REPO)
        server = start_server(workdir, variant, args)
        settings = json.load(open(settings_path))
        settings["url"] = server.url
        run_settings = os.path.join(workdir, "settings.json")
        with open(run_settings, "w") as f:
            json.dump(settings, f)
        loadgen = LoadGen(run_settings, settings["hardTimeoutS"])
        ready = loadgen.expect("ready")
        time.sleep(0.5)
        rss_before = rss_kib(server.pid)
        log_before = server.log_bytes()
        server_cpu0, loadgen_cpu0, t0 = cpu_seconds(server.pid), cpu_seconds(loadgen.process.pid), time.monotonic()
        loadgen.send("go")
        profiler = start_profiler(server.pid, scenario, variant, args)
        result = loadgen.expect("result")
        if profiler is not None:
            profiler.wait(timeout=args.duration + 60)
        duration = time.monotonic() - t0
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        loadgen_cpu = cpu_seconds(loadgen.process.pid) - loadgen_cpu0
        record: dict[str, Any] = {
            "scenario": scenario,
            "variant": label or variant,
            PRIMARY[scenario]: result[PRIMARY[scenario]],
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
            "server_cpu_s": round(server_cpu, 2),
            "loadgen_cpu_s": round(loadgen_cpu, 2),
            "duration_s": round(duration, 2),
            "server_log_bytes": server.log_bytes() - log_before,
            "server_repo": repo,
        }
        if scenario == "joinstorm":
            record["setup_s"] = result["setup_s"]
        # What one unit of work costs the server, whatever paced the
        # generator: on shared cores the rates above move with the load
        # of other processes, this moves less.
        for unit, count in (
            ("publish", result.get("publishes")),
            ("round_trip", result.get("round_trips")),
            ("connect", result.get("connections")),
            ("subscriber", result.get("subscribers")),
        ):
            if count:
                record[f"server_cpu_us_per_{unit}"] = round(server_cpu / count * 1e6, 1)
        if scenario == "idle":
            time.sleep(2.0)  # let the last welcomes' buffers go
            record["server_rss_kib_per_conn"] = round((rss_kib(server.pid) - rss_before) / max(1, result["connections"]), 2)
            record["server_rss_kib"] = rss_kib(server.pid)
            loadgen.send("close")
        record["detail"] = {k: v for k, v in result.items() if k not in ("event", PRIMARY[scenario], "p50_ms", "p99_ms")}
        record["detail"]["connections_before_go"] = ready["connections"]
        if "noise_patterns" in ready:
            record["detail"]["noise_patterns"] = ready["noise_patterns"]
        loadgen.expect("finished")
        return record
    finally:
        if loadgen is not None:
            loadgen.stop()
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def median_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Medians of the numeric fields over several runs, with the runs' primary
    figures kept for the spread.
    """
    first = records[0]
    out: dict[str, Any] = {"scenario": first["scenario"], "variant": first["variant"]}
    for key, value in first.items():
        if key in out or key == "detail":
            continue
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = statistics.median(values) if values and isinstance(value, (int, float)) else value
    out["runs"] = len(records)
    out["samples"] = [r[PRIMARY[first["scenario"]]] for r in records]
    out["detail"] = records[len(records) // 2]["detail"]
    return out


def ratios(scenario: str, medians: dict[str, dict[str, Any]]) -> None:
    """
    Add to each median record its ratios to the references that ran: the
    primary figure (higher is better) and, for idle, RSS per connection.
    """
    key = PRIMARY[scenario]
    if scenario == "wildcard":
        for label, record in medians.items():
            variant, _, shape = label.partition(":")
            base = medians.get(f"{variant}:none")
            if base is not None and shape != "none":
                record[f"{key}_vs_none"] = round(record[key] / base[key], 3)
                cost = "server_cpu_us_per_publish"
                record[f"{cost}_vs_none"] = round(record[cost] / base[cost], 3)
        return
    references = [r for r in ("ref", "floor") if r in medians] or [r for r in ("baseline",) if r in medians]
    for label, record in medians.items():
        for reference in references:
            if label == reference:
                continue
            record[f"{key}_vs_{reference}"] = round(record[key] / medians[reference][key], 3)
            for cost in [k for k in record if k.startswith("server_cpu_us_per_")]:
                if medians[reference].get(cost):
                    record[f"{cost}_vs_{reference}"] = round(record[cost] / medians[reference][cost], 3)
            if scenario == "idle":
                rss = medians[reference].get("server_rss_kib_per_conn")
                if rss:
                    record[f"rss_per_conn_vs_{reference}"] = round(record["server_rss_kib_per_conn"] / rss, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--runs", type=int, default=1, help="runs per variant; medians are reported")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per run (fanout, pingpong)")
    parser.add_argument("--baseline", action="store_true", help="also run with METEREDRT_NO_SPEEDUPS=1")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=8, help="connections the fan-out publisher is spread over")
    parser.add_argument("--window", type=int, default=16, help="fan-out publishes undelivered at most")
    parser.add_argument("--max-publishes", type=int, default=50_000)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--max-round-trips", type=int, default=2_000_000)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--idle-presence", action="store_true", help="idle: each connection holds a presence subscription")
    parser.add_argument("--joiners", type=int, default=10_000, help="subscribers in the join storm")
    parser.add_argument("--wildcard-subscribers", type=int, default=10)
    parser.add_argument("--wildcard-noise-connections", type=int, default=12, help="connections holding the noise")
    parser.add_argument("--message-rate", type=float, default=100_000.0, help="the plan's message_rate and message_burst")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (logs) in /tmp")
    parser.add_argument("--raw", default=None, help="also append every run's JSON line to this file")
    parser.add_argument("--ref-repo", default=None, help="also run the server as shipped from this checkout (variant ref)")
    parser.add_argument("--reference", default=None, help="also run the reference server script at this path (variant floor)")
    parser.add_argument("--py-spy", default=None, help="py-spy executable: profile the server during each measured phase")
    parser.add_argument("--profile-dir", default="bench/profiles", help="where --py-spy writes its raw profiles")
    args = parser.parse_args()

    if args.variants:
        variants = args.variants.split(",")
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}")
    else:
        variants = ["baseline", "speedups"] if args.baseline else ["speedups"]
        if args.ref_repo:
            variants.insert(0, "ref")
        if args.reference:
            variants.append("floor")
    if "ref" in variants:
        if not args.ref_repo:
            parser.error("the ref variant needs --ref-repo")
        args.ref_repo = os.path.abspath(args.ref_repo)
        if not os.path.isdir(os.path.join(args.ref_repo, "meteredrt")):
            parser.error(f"{args.ref_repo} is not a meteredrt checkout")
    if "floor" in variants:
        if not args.reference or not os.path.isfile(args.reference):
            parser.error("the floor variant needs --reference PATH to the reference server script")
        args.reference = os.path.abspath(args.reference)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    limit = raise_fd_limit()
    for scenario, count in (("idle", args.idle), ("joinstorm", args.joiners)):
        if scenario in scenarios and limit < count + 1000:
            parser.error(f"descriptor limit {limit} is too low for {count} connections")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=BENCH, check=True, timeout=300)

    commit = git_commit()
    print(json.dumps({"machine": {"load_average": os.getloadavg(), "cpus": os.cpu_count()}}), file=sys.stderr, flush=True)
    for scenario in scenarios:
        settings_dir = tempfile.mkdtemp(prefix="meteredrt-bench-settings-")
        try:
            base = scenario_settings(scenario, args)
            # (label, variant, settings file): one cell per variant, or per
            # variant and noise shape for the wildcard scenario (which the
            # reference server cannot run: it has no wildcards).
            cells = []
            shapes = WILDCARD_SHAPES if scenario == "wildcard" else {"": None}
            for shape, noise in shapes.items():
                path = os.path.join(settings_dir, f"settings-{shape or 'all'}.json")
                with open(path, "w") as f:
                    json.dump(base if noise is None else {**base, "noisePatterns": noise}, f)
                for variant in variants:
                    if noise is None or variant != "floor":
                        cells.append((f"{variant}:{shape}" if shape else variant, variant, path))
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in cells}
            for _ in range(args.runs):
                for label, variant, path in cells:  # interleaved, so drift hits every variant alike
                    record = run_once(scenario, variant, path, args, label)
                    record["git_commit"] = commit
                    runs[label].append(record)
                    print(json.dumps({"run": record}), file=sys.stderr, flush=True)
                    if args.raw:
                        with open(args.raw, "a") as f:
                            f.write(json.dumps(record) + "\n")
            medians = {label: median_record(rs) for label, rs in runs.items()}
            ratios(scenario, medians)
            for label, record in medians.items():
                record["git_commit"] = commit
                if label == "ref":
                    record["repo"] = args.ref_repo
                print(json.dumps(record), flush=True)
        finally:
            shutil.rmtree(settings_dir, ignore_errors=True)
    print(json.dumps({"machine_after": {"load_average": os.getloadavg()}}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
