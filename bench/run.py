"""
Benchmark a real meteredrt server process on loopback.

For each scenario and variant this starts ``twistd -n meteredrt`` on a free
127.0.0.1 port with a throw-away data directory and a configuration that
declares one app with a known secret key, mints the clients' JWTs with
L{meteredrt.auth.mint_token}, runs ``bench/loadgen.mjs`` (Node + ``ws``)
against it, samples the server's CPU and RSS from ``/proc`` around the
measured phase, and prints one JSON line per scenario and variant (medians
of ``--runs``).

Scenarios (``all`` runs the first five):

 - ``fanout``: 1,000 subscribers of one channel, 100-byte payloads, latency
   from publish to receipt; the one logical publisher is spread over
   ``--publishers`` connections taking turns, at most ``--window``
   publishes undelivered at any time.
 - ``pingpong``: 100 pairs, one direct round trip in flight per pair.
 - ``idle``: 10,000 authenticated connections opened with 100 handshakes
   in flight; connect rate, and server RSS growth per connection; with
   ``--idle-presence`` each also subscribes, holding ``presence``, to a
   channel of its own.
 - ``joinstorm``: ``--joiners`` (10,000) connections each connect and
   subscribe to one channel (nobody holds ``presence``), 100 at a time;
   the time from the first upgrade to the last ack.
 - ``wildcard``: fan-out to ``--wildcard-subscribers`` subscribers while
   1,000 wildcard subscriptions that match nothing published are held,
   without ``/`` (``bench.x-N-*``) or with (``bench/x-N/*``), against none
   (meteredrt only; the ratios are against the same server without them).
 - ``roundtrips`` (cluster only, see below).

The app's plan raises the per-connection message rate (``message_rate``,
``message_burst``) to ``--message-rate`` so that the server's 4011 bucket
never sets the pace (the generator keeps each connection at 95% of it); a
``--ref-repo`` checkout from before plans carried a rate gets the same
figures as its factory's defaults instead. Every token carries the channel
claim ``bench/*`` (the wildcard and roundtrips scenarios use other channels
and mint without it). Besides its rate, each run reports the server's CPU
per unit of work (``server_cpu_us_per_publish``, ``…_round_trip``,
``…_connect``, ``…_subscriber``) and the work done per CPU second of the
server side: on shared cores rates move with other processes' load, these
move less.

Variants: ``speedups`` (the server as shipped), ``baseline`` (the same
with ``METEREDRT_NO_SPEEDUPS=1``) and ``asyncio`` (the same under
``twistd --reactor=asyncio``); with ``--ref-repo PATH`` also ``ref``,
the server as shipped from another checkout (e.g. a ``git worktree`` of an
earlier commit); with ``--reference PATH`` also ``floor``, a minimal
Twisted + Autobahn server speaking the hot subset of the protocol (kept
outside this repository), run with its Autobahn log fix; with
``--websockets`` also ``websockets``, the same subset on Python
``websockets`` and asyncio (``bench/websockets_server.py``; the wildcard
scenario runs neither). Ratios are printed against ``ref``, ``floor``,
``websockets`` and ``standalone`` when they run, else against
``baseline``. Runs of the variants are interleaved.

Cluster (issue 9): ``--nodes 1,2,3`` compares ``standalone`` (one server
without ``[cluster]``, the reference) with ``cluster-N``: N servers with
``[cluster]`` on the bench's own ``redis-server`` (free loopback port, no
persistence). The fan-out's subscribers are spread over the nodes and its
publishers sit on the first; each ping-pong pair spans two nodes. CPU is
summed over the nodes; Redis's is reported apart. ``--scenario roundtrips``
counts the Redis round trips per connect, subscribe, publish, send and
close on two nodes, from ``MONITOR`` (commands run inside Lua scripts are
counted apart). ``--ref-repo`` and ``--reference`` add their variants
to the ``--nodes`` ones, as to the others; ``--ref-repo`` also adds
``ref-cluster-N``, the same clusters of the other checkout, and each
``cluster-N`` is compared with it (``…_vs_ref_cluster``): whether a change
kept its gain, or its correctness, once the seams answer through Redis.

``--py-spy PATH`` records a py-spy profile of the server during each
measured phase (raw collapsed stacks, one file per run, in
``--profile-dir``); the sampler shares the two cores, so runs profiled this
way are for finding costs, not for throughput figures.

Usage::

    python bench/run.py --scenario all --runs 3 --baseline
    python bench/run.py --scenario all --runs 3 --ref-repo /tmp/mrt-base
    python bench/run.py --scenario pingpong --runs 3 --reference /path/to/floor_autobahn.py
    python bench/run.py --scenario fanout,pingpong --runs 3 --nodes 1,2,3
    python bench/run.py --scenario roundtrips
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

import hiredis

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
WEBSOCKETS_SERVER = os.path.join(BENCH, "websockets_server.py")
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
#: ``{plan}``: the app's [apps.plan] table (see L{server_config}); it must sit
#: inside the app, before its keys, since [cluster] may follow the keys.
CONFIG = f"""
[server]
# 10,000 upgrades from one address in seconds: far above the 60/min default.
upgrade_rate_limit = 1000000

[[apps]]
id = "{APP_ID}"
{{plan}}
[[apps.keys]]
type = "secret"
key_id = "{KEY_ID}"
secret = "{SECRET}"
channel_patterns = ["**"]
actions = ["publish", "subscribe", "presence", "send"]
"""
#: The load generator holds up to 10,000 connections from 127.0.0.1, far
#: above the per-address default of 256. Written only for a server whose
#: configuration knows the key (a --ref-repo checkout may predate it).
CONNECTION_CAP = "max_connections_per_ip = 1000000\n"
PLAN = """
[apps.plan]
message_rate = {rate}
message_burst = {rate}
"""
KEY = Key(KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET, auto_inject_turn=False)

#: The share of the server's per-connection message bucket the generator
#: allows itself.
CLIENT_SHARE = 0.95

VARIANTS = ("baseline", "speedups", "asyncio", "ref", "floor", "websockets")
CLUSTER_VARIANTS = ("standalone", *(f"{tree}cluster-{n}" for tree in ("", "ref-") for n in (1, 2, 3)))
#: The scenarios of ``--scenario all`` (roundtrips is run on its own).
SCENARIOS = ("fanout", "pingpong", "idle", "joinstorm", "wildcard")
PRIMARY = {
    "fanout": "deliveries_per_s",
    "pingpong": "round_trips_per_s",
    "idle": "connects_per_s",
    "joinstorm": "subscribers_per_s",
    "wildcard": "deliveries_per_s",
}
#: What the generator counts as done work, per scenario (for work per CPU second).
WORK_DONE = {
    "fanout": "deliveries",
    "pingpong": "round_trips",
    "idle": "connections",
    "joinstorm": "subscribers",
    "wildcard": "deliveries",
}
#: Noise for the wildcard scenario: 1,000 patterns that match nothing published.
WILDCARD_SHAPES = {
    "none": [],
    "flat": [f"bench.x-{n}-*" for n in range(1000)],
    "slashed": [f"bench/x-{n}/*" for n in range(1000)],
}
WILDCARD_CHANNEL = "bench.y-1"

#: Lease of the bench's cluster nodes (the default of [cluster]).
LEASE_SECONDS = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

LAUNCHER = "from twisted.scripts.twistd import run; run()"
# A checkout from before plans carried a message rate: the same rate as the
# factory's defaults (the only way to set it there).
LEGACY_LAUNCHER = (
    "import sys, meteredrt.ws as ws; f = ws.RealtimeServerFactory.__init__; d = list(f.__defaults__); "
    "d[1] = d[2] = float(sys.argv.pop(1)); f.__defaults__ = tuple(d); "
    "from twisted.scripts.twistd import run; run()"
)


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


def raise_fd_limit() -> int:
    """
    Raise the soft descriptor limit to the hard one; children inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def supports_plan_rates(repo: str) -> bool:
    """
    Whether a checkout's plans carry the per-connection message rate.
    """
    with open(os.path.join(repo, "meteredrt", "apps.py")) as f:
        return "message_rate" in f.read()


def server_config(repo: str, message_rate: float) -> str:
    """
    The benchmark configuration for the server in checkout C{repo}: the
    connection cap and the plan's message rate where that checkout knows
    them (a --ref-repo checkout may predate either).
    """
    with open(os.path.join(repo, "meteredrt", "config.py")) as f:
        knows_cap = "max_connections_per_ip" in f.read()
    plan = PLAN.format(rate=message_rate) if supports_plan_rates(repo) else ""
    config = CONFIG.format(plan=plan)
    return config.replace("[server]\n", "[server]\n" + CONNECTION_CAP, 1) if knows_cap else config


class RedisServer:
    """
    The bench's own ``redis-server`` on a free loopback port (never 6379),
    without persistence.
    """

    def __init__(self, workdir: str) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        while self.port == 6379:
            self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=open(os.path.join(workdir, "redis.out"), "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING") == b"PONG":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self, *args: str) -> Any:
        """
        One command on a fresh connection (the bench script may block).
        """
        reader = hiredis.Reader()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(hiredis.pack_command(args))
            while True:
                data = conn.recv(65536)
                if not data:
                    raise OSError("redis closed the connection")
                reader.feed(data)
                reply = reader.gets()
                if reply is not False:
                    return reply

    def used_memory(self) -> int:
        """
        Bytes Redis has allocated (C{INFO memory} C{used_memory}).
        """
        for line in self.command("INFO", "memory").decode().splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError("INFO memory has no used_memory")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class Monitor:
    """
    A C{MONITOR} connection: tells the commands clients sent (the round
    trips) from those Lua scripts ran inside Redis (shown as C{[0 lua]}).
    """

    def __init__(self, port: int) -> None:
        self._conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._conn.sendall(hiredis.pack_command(("MONITOR",)))
        self._reader = hiredis.Reader()
        assert self._read_reply(5.0) == b"OK"

    def _read_reply(self, timeout: float) -> Any:
        self._conn.settimeout(timeout)
        while True:
            reply = self._reader.gets()
            if reply is not False:
                return reply
            data = self._conn.recv(65536)
            if not data:
                raise OSError("redis closed the MONITOR connection")
            self._reader.feed(data)

    def drain(self, quiet: float = 0.5) -> tuple[dict[str, int], dict[str, int]]:
        """
        Read until Redis has been quiet for C{quiet} seconds; return the
        commands sent by clients and those run by scripts, by name.
        """
        clients: dict[str, int] = {}
        scripts: dict[str, int] = {}
        while True:
            try:
                line = self._read_reply(quiet).decode(errors="replace")
            except TimeoutError:
                return clients, scripts
            # 1700000000.123456 [0 127.0.0.1:5555] "evalsha" "…" …
            where, _, command = line.partition("] ")
            name = command.split('"', 2)[1].lower() if command.startswith('"') else command
            counts = scripts if where.endswith(" lua") else clients
            counts[name] = counts.get(name, 0) + 1

    def close(self) -> None:
        self._conn.close()


class Server:
    """
    One ``twistd -n meteredrt`` process on a free loopback port; a cluster
    node when given a Redis URL.
    """

    def __init__(
        self,
        workdir: str,
        variant: str,
        repo: str = REPO,
        message_rate: float = 100_000.0,
        redis: str | None = None,
        node_name: str = "bench-1",
    ) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.log_path = os.path.join(workdir, "twistd.log")
        config = os.path.join(workdir, "meteredrt.toml")
        with open(config, "w") as f:
            f.write(server_config(repo, message_rate))
            if redis is not None:
                f.write(f'\n[cluster]\nredis = "{redis}"\nnode_name = "{node_name}"\nlease_seconds = {LEASE_SECONDS}\n')
        # twistd finds the plugin, and the plugin the code, on PYTHONPATH.
        env = dict(os.environ, PYTHONPATH=repo)
        env.pop("METEREDRT_NO_SPEEDUPS", None)
        if variant == "baseline":
            env["METEREDRT_NO_SPEEDUPS"] = "1"
        launcher = [LAUNCHER] if supports_plan_rates(repo) else [LEGACY_LAUNCHER, str(message_rate)]
        # The asyncio variant: the same server on Twisted's asyncio reactor.
        reactor = ["--reactor=asyncio"] if variant == "asyncio" else []
        self.process = subprocess.Popen(
            [sys.executable, "-c", *launcher, "-n", *reactor, "--pidfile=", "--logfile", self.log_path,
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


class ScriptServer(Server):
    """
    A server script of the bench's own choosing on a free loopback port,
    given the port, the key id and the secret, and ready once it accepts.
    """

    def __init__(self, workdir: str, script: str, log_name: str, *options: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.port = free_port()
        self.log_path = os.path.join(workdir, log_name)
        self.process = subprocess.Popen(
            [sys.executable, script, "--port", str(self.port), *options,
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


def floor_server(workdir: str, script: str) -> ScriptServer:
    """
    The reference server (``--reference``), with Autobahn's debug-argument
    formatting neutralised (its ``--quiet-autobahn``) as meteredrt's
    speedups do.
    """
    return ScriptServer(workdir, script, "floor.log", "--quiet-autobahn")


def websockets_server(workdir: str) -> ScriptServer:
    """
    The same subset on Python ``websockets`` (``--websockets``):
    C{bench/websockets_server.py}.
    """
    return ScriptServer(workdir, WEBSOCKETS_SERVER, "websockets.log")


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


def tokens(
    prefix: str, count: int, permissions: list[str], channels: list[str] | None = CHANNEL_CLAIMS
) -> Iterator[str]:
    now = int(time.time())
    for i in range(count):
        yield mint_token(KEY, f"{prefix}{i}", now=now, expires_in=3600, permissions=permissions, channels=channels)


def scenario_settings(scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    """
    What the load generator needs for one scenario. Nobody holds the
    ``presence`` action (but ``--idle-presence``'s connections, each alone
    in its channel), so subscribing 1,000 connections to one channel does
    not turn into 500,000 presence frames.
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
            "subscribesInFlight": args.subscribes_in_flight,
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
        return {
            **common,
            "scenario": "fanout",  # the generator's fan-out, with noise subscriptions
            "subscribers": args.wildcard_subscribers,
            "publishers": args.publishers,
            "channel": WILDCARD_CHANNEL,
            "payloadBytes": 100,
            "window": args.window,
            "subscribesInFlight": args.subscribes_in_flight,
            "probeEvery": 1,
            "maxPublishes": args.max_publishes,
            "tokens": [
                *tokens("sub", args.wildcard_subscribers, ["subscribe"], None),
                *tokens("pub", args.publishers, ["publish"], None),
                *tokens("noise", args.wildcard_noise_connections, ["subscribe"], None),
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


def variant_repo(variant: str, args: argparse.Namespace) -> str:
    """
    The code a variant runs: the --ref-repo checkout, the --reference
    script, the websockets server, or this checkout.
    """
    if variant.startswith("ref-cluster-"):
        return args.ref_repo
    return {"ref": args.ref_repo, "floor": args.reference, "websockets": WEBSOCKETS_SERVER}.get(variant) or REPO


def start_server(workdir: str, variant: str, args: argparse.Namespace, attempts: int = 3, **cluster: str) -> Server:
    """
    Start a server, on a fresh port if the first one was taken between
    L{free_port} and the server's C{listen} (seen after the idle scenario's
    10,000 client sockets). C{cluster}: C{redis} and C{node_name}.
    """
    for attempt in range(attempts):
        try:
            if variant == "floor":
                return floor_server(workdir, args.reference)
            if variant == "websockets":
                return websockets_server(workdir)
            return Server(workdir, variant, variant_repo(variant, args), args.message_rate, **cluster)
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


def start_topology(workdir: str, variant: str, args: argparse.Namespace) -> tuple[list[Server], RedisServer | None]:
    """
    The servers of a variant: one, or N cluster nodes on a fresh Redis for
    C{cluster-N} (this checkout) and C{ref-cluster-N} (the C{--ref-repo}
    one). On failure everything started is stopped.
    """
    tree, cluster, size = variant.rpartition("cluster-")
    if not cluster:
        return [start_server(workdir, "speedups" if variant == "standalone" else variant, args)], None
    redis = RedisServer(workdir)
    servers: list[Server] = []
    try:
        for i in range(int(size)):
            node = os.path.join(workdir, f"node-{i + 1}")
            node_variant = "ref" if tree == "ref-" else "speedups"
            servers.append(start_server(node, node_variant, args, redis=redis.url, node_name=f"bench-{i + 1}"))
    except BaseException:
        for server in servers:
            server.stop()
        redis.stop()
        raise
    return servers, redis


def run_once(
    scenario: str, variant: str, settings_path: str, args: argparse.Namespace, label: str | None = None
) -> dict[str, Any]:
    """
    One server (or cluster), one load generator, one measurement; C{label}
    names the variant in the record (the wildcard scenario runs one per
    noise shape).
    """
    workdir = tempfile.mkdtemp(prefix=f"meteredrt-bench-{scenario}-")
    servers: list[Server] = []
    redis: RedisServer | None = None
    loadgen = None
    try:
        repo = variant_repo(variant, args)
        servers, redis = start_topology(workdir, variant, args)
        server = servers[0]
        settings = json.load(open(settings_path))
        settings["url"] = server.url
        settings["urls"] = [s.url for s in servers]
        run_settings = os.path.join(workdir, "settings.json")
        with open(run_settings, "w") as f:
            json.dump(settings, f)
        loadgen = LoadGen(run_settings, settings["hardTimeoutS"])
        ready = loadgen.expect("ready")
        time.sleep(0.5)
        rss_before = rss_kib(server.pid)
        log_before = sum(s.log_bytes() for s in servers)
        redis_cpu0 = cpu_seconds(redis.pid) if redis is not None else 0.0
        server_cpu0 = sum(cpu_seconds(s.pid) for s in servers)
        loadgen_cpu0, t0 = cpu_seconds(loadgen.process.pid), time.monotonic()
        loadgen.send("go")
        profiler = start_profiler(server.pid, scenario, variant, args)
        result = loadgen.expect("result")
        if profiler is not None:
            profiler.wait(timeout=args.duration + 60)
        duration = time.monotonic() - t0
        server_cpu = sum(cpu_seconds(s.pid) for s in servers) - server_cpu0
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
            "server_log_bytes": sum(s.log_bytes() for s in servers) - log_before,
            "server_repo": repo,
            "nodes": len(servers),
        }
        if redis is not None:
            record["redis_cpu_s"] = round(cpu_seconds(redis.pid) - redis_cpu0, 2)
        # Work per CPU second of the server side (nodes and Redis): on a
        # shared machine the scheduler gives N processes more of the cores
        # than one, so throughput alone flatters the cluster.
        done = WORK_DONE[scenario]
        spent = server_cpu + record.get("redis_cpu_s", 0.0)
        record[f"{done}_per_server_cpu_s"] = round(result[done] / spent) if spent > 0 else None
        # What one unit of work costs the nodes, whatever paced the generator.
        for unit, count in (
            ("publish", result.get("publishes")),
            ("round_trip", result.get("round_trips")),
            ("connect", result.get("connections")),
            ("subscriber", result.get("subscribers")),
        ):
            if count:
                record[f"server_cpu_us_per_{unit}"] = round(server_cpu / count * 1e6, 1)
        if scenario == "joinstorm":
            record["setup_s"] = result["setup_s"]
        if scenario == "idle":
            time.sleep(2.0)  # let the last welcomes' buffers go
            record["server_rss_kib_per_conn"] = round((rss_kib(server.pid) - rss_before) / max(1, result["connections"]), 2)
            record["server_rss_kib"] = rss_kib(server.pid)
            loadgen.send("close")
        record["detail"] = {k: v for k, v in result.items() if k not in ("event", PRIMARY[scenario], "p50_ms", "p99_ms")}
        record["detail"]["connections_before_go"] = ready["connections"]
        if "subscribe_ms" in ready:
            record["detail"]["subscribe_setup_ms"] = ready["subscribe_ms"]
            record["detail"]["subscribe_retries"] = ready["subscribe_retries"]
        if ready.get("noise_patterns"):
            record["detail"]["noise_patterns"] = ready["noise_patterns"]
        loadgen.expect("finished")
        return record
    finally:
        if loadgen is not None:
            loadgen.stop()
        for running in servers:
            running.stop()
        if redis is not None:
            redis.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


ROUNDTRIP_PHASES = ("connect", "subscribe", "publish", "send", "close")


def run_roundtrips(args: argparse.Namespace) -> None:
    """
    Redis round trips per operation on a two-node cluster: the commands
    the nodes sent during each phase of the generator's C{roundtrips}
    scenario (seen through C{MONITOR}, apart from the commands their Lua
    scripts ran inside Redis), less the background (lease renewals)
    measured while idle, divided by the number of operations. Prints one
    JSON line per phase.
    """
    count = args.roundtrip_connections
    workdir = tempfile.mkdtemp(prefix="meteredrt-bench-roundtrips-")
    servers: list[Server] = []
    redis: RedisServer | None = None
    loadgen = None
    settle = 1.0
    try:
        servers, redis = start_topology(workdir, "cluster-2", args)
        settings = {
            "scenario": "roundtrips",
            "connections": count,
            "urls": [s.url for s in servers],
            "url": servers[0].url,
            "hardTimeoutS": 300,
            "tokens": list(tokens("rt", count, ["subscribe", "publish", "send", "presence"], None)),
        }
        settings_path = os.path.join(workdir, "settings.json")
        with open(settings_path, "w") as f:
            json.dump(settings, f)
        loadgen = LoadGen(settings_path, 300)
        loadgen.expect("ready")
        monitor = Monitor(redis.port)
        monitor.drain()
        time.sleep(5.0)
        idle_clients, idle_scripts = monitor.drain()
        # Lease renewals go on during every phase: their rate, to subtract.
        background = {k: v / (5.0 + 0.5) for k, v in idle_clients.items()}
        background_scripts = {k: v / (5.0 + 0.5) for k, v in idle_scripts.items()}
        print(json.dumps({"scenario": "roundtrips", "background_round_trips_per_s": background}), flush=True)

        def per_op(counts: dict[str, int], rates: dict[str, float], elapsed: float) -> dict[str, float]:
            out = {}
            for name, calls in counts.items():
                if name == "info":  # the bench's own memory readings
                    continue
                value = round((calls - rates.get(name, 0.0) * elapsed) / count, 2)
                if value > 0:
                    out[name] = value
            return out

        for phase in ROUNDTRIP_PHASES:
            memory_before = redis.used_memory()
            t0 = time.monotonic()
            loadgen.send(phase)
            done = loadgen.expect("phase")
            time.sleep(settle)
            sent, scripted = monitor.drain()
            elapsed = time.monotonic() - t0
            round_trips = per_op(sent, background, elapsed)
            record = {
                "scenario": "roundtrips",
                "op": phase,
                "operations": count,
                "round_trips_per_op": round_trips,
                "total_round_trips_per_op": round(sum(round_trips.values()), 2),
                "script_commands_per_op": per_op(scripted, background_scripts, elapsed),
                "redis_memory_bytes_per_op": round((redis.used_memory() - memory_before) / count),
                "phase_ms": round(done["ms"], 1),
                "errors": {k: done[k] for k in ("closes", "errorFrames", "firstError")},
                "git_commit": git_commit(),
            }
            print(json.dumps(record), flush=True)
        monitor.close()
        loadgen.expect("finished")
    finally:
        if loadgen is not None:
            loadgen.stop()
        for running in servers:
            running.stop()
        if redis is not None:
            redis.stop()
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


def ratios(scenario: str, medians: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> None:
    """
    Add to each median record its ratios to the references that ran (the
    primary figure, the work per server CPU second, the server CPU per unit
    of work and, for idle, RSS per connection): C{ref}, C{floor},
    C{websockets} and C{standalone} when present, else C{baseline}.

    The wildcard scenario's cells are compared with the same variant
    holding no noise instead, twice: the ratio of the medians, and the
    median of the ratios of the runs made in the same round
    (C{…_vs_none_paired}, with each round's ratio in
    C{…_vs_none_rounds}). A round runs every cell within a minute or two,
    so pairing by round cancels the machine's slower drifts, which on
    shared cores move either median by more than the noise costs.
    """
    key = PRIMARY[scenario]
    if scenario == "wildcard":
        for label, record in medians.items():
            variant, _, shape = label.partition(":")
            base = medians.get(f"{variant}:none")
            if base is None or shape == "none":
                continue
            for name in (key, "server_cpu_us_per_publish"):
                if record.get(name) and base.get(name):
                    record[f"{name}_vs_none"] = round(record[name] / base[name], 3)
                rounds = [
                    round(mine[name] / theirs[name], 3)
                    for mine, theirs in zip(runs[label], runs[f"{variant}:none"], strict=True)
                    if mine.get(name) and theirs.get(name)
                ]
                if rounds:
                    record[f"{name}_vs_none_paired"] = statistics.median(rounds)
                    record[f"{name}_vs_none_rounds"] = rounds
        return
    references = [r for r in ("ref", "floor", "websockets", "standalone") if r in medians] or [r for r in ("baseline",) if r in medians]
    for label, record in medians.items():
        # A cluster of this checkout is compared with the same cluster of the
        # --ref-repo checkout too (as ..._vs_ref_cluster).
        same_size = f"ref-{label}" if label.startswith("cluster-") and f"ref-{label}" in medians else None
        # The figures themselves, not the ratios added to the record below.
        compared = [key, *(k for k in record if k.endswith("_per_server_cpu_s") or k.startswith("server_cpu_us_per_"))]
        for reference in [*references, *([same_size] if same_size else [])]:
            if label == reference:
                continue
            base = medians[reference]
            suffix = "ref_cluster" if reference == same_size else reference
            for name in compared:
                if record.get(name) and base.get(name):
                    record[f"{name}_vs_{suffix}"] = round(record[name] / base[name], 3)
            if scenario == "idle" and base.get("server_rss_kib_per_conn"):
                rss = record["server_rss_kib_per_conn"] / base["server_rss_kib_per_conn"]
                record[f"rss_per_conn_vs_{suffix}"] = round(rss, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"{', '.join(SCENARIOS)}, roundtrips, all (= the first five), or a comma list",
    )
    parser.add_argument(
        "--nodes", default=None, help="cluster sizes to compare with the standalone server, e.g. 1,2,3 (runs redis-server)"
    )
    parser.add_argument("--roundtrip-connections", type=int, default=200, help="operations per roundtrips phase")
    parser.add_argument("--runs", type=int, default=1, help="runs per variant; medians are reported")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per run (fanout, pingpong, wildcard)")
    parser.add_argument("--baseline", action="store_true", help="also run with METEREDRT_NO_SPEEDUPS=1")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {','.join(VARIANTS + CLUSTER_VARIANTS)}")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=8, help="connections the fan-out publisher is spread over")
    parser.add_argument("--window", type=int, default=16, help="fan-out publishes undelivered at most")
    parser.add_argument("--subscribes-in-flight", type=int, default=20, help="fan-out set-up: subscribes sent at once")
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
    parser.add_argument("--websockets", action="store_true", help="also run bench/websockets_server.py (variant websockets)")
    parser.add_argument("--py-spy", default=None, help="py-spy executable: profile the server during each measured phase")
    parser.add_argument("--profile-dir", default="bench/profiles", help="where --py-spy writes its raw profiles")
    args = parser.parse_args()

    scenarios = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown_scenarios = set(scenarios) - {*SCENARIOS, "roundtrips"}
    if unknown_scenarios:
        parser.error(f"unknown scenarios {sorted(unknown_scenarios)}")
    if args.variants:
        if args.nodes:
            parser.error("--variants and --nodes both choose the variants: give one")
        variants = args.variants.split(",")
        unknown = set(variants) - set(VARIANTS) - set(CLUSTER_VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}")
    else:
        if args.nodes:
            sizes = args.nodes.split(",")
            variants = ["standalone", *(f"cluster-{n}" for n in sizes)]
            if args.ref_repo:
                variants += [f"ref-cluster-{n}" for n in sizes]
            unknown = set(variants) - set(CLUSTER_VARIANTS)
            if unknown:
                parser.error(f"--nodes takes sizes from 1 to 3, not {sorted(unknown)}")
        else:
            variants = ["baseline", "speedups"] if args.baseline else ["speedups"]
        if args.ref_repo:
            variants.insert(0, "ref")
        if args.reference:
            variants.append("floor")
        if args.websockets:
            variants.append("websockets")
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
    limit = raise_fd_limit()
    for scenario, count in (("idle", args.idle), ("joinstorm", args.joiners)):
        if scenario in scenarios and limit < count + 1000:
            parser.error(f"descriptor limit {limit} is too low for {count} connections")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=BENCH, check=True, timeout=300)

    commit = git_commit()
    print(json.dumps({"machine": {"load_average": os.getloadavg(), "cpus": os.cpu_count()}}), file=sys.stderr, flush=True)
    if "roundtrips" in scenarios:
        scenarios.remove("roundtrips")
        run_roundtrips(args)
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
                    if noise is None or variant not in ("floor", "websockets"):
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
            ratios(scenario, medians, runs)
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
