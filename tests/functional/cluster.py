"""
Several real C{twistd -n meteredrt} nodes on one real Redis, for the cluster
tests.

L{start_cluster} starts a L{RedisServer} and N nodes, each a child process
with the functional-test apps and keys of L{support.CONFIG}, a C{[cluster]}
table naming the Redis (C{node_name = "node-<i>"}, a short lease), and a
data directory of its own. A node can be pointed at Redis through a
L{LoopbackProxy} (C{proxied}), to cut it off. With a C{database} URL
(a throwaway PostgreSQL, L{tests.postgres_server}) every node keeps its
store there (C{--database}), as a cluster sharing PostgreSQL does. Nodes
are killed on cleanup.

Clients: L{connect_peer} (a L{Peer} that keeps every frame it receives) and
L{rest}/L{peers_of} for the backend's view.

Main names: L{start_cluster}, L{Cluster}, L{Node}, L{Peer}, L{connect_peer},
L{rest}, L{peers_of}, L{wait_until}, L{child_pids}, L{serving_pid}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from autobahn.twisted.websocket import WebSocketClientFactory
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from meteredrt.apps import ACTIONS, Key, KeyType
from meteredrt.auth import mint_token
from tests.servers import LoopbackProxy, RedisServer

from .support import APP_ID, CONFIG, SECRET, SECRET_KEY_ID, TwistdProcess
from .test_metering_e2e import RealtimeClient

ROOT = Path(__file__).resolve().parents[2]

#: The twistd console script, run with this interpreter.
TWISTD = "from twisted.scripts.twistd import run; run()"

#: Lease of the test clusters: a dead node is reaped within 3 s.
LEASE_SECONDS = 1


def twistd_env() -> dict[str, str]:
    """
    The environment of a server child: this tree on the import path.
    """
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/")}


def cluster_config(
    redis_url: str | None, node_name: str | None, lease_seconds: float, extra: str = "", base: str = CONFIG
) -> str:
    """
    C{base} (L{support.CONFIG}, or it with a plan) with a C{[cluster]} table
    (none without C{redis_url}) and C{extra} TOML keys added to its
    C{[server]} table (e.g. C{"workers = 3"}).
    """
    config = base.replace("[server]\n", f"[server]\n{extra}\n", 1)
    if redis_url is None:
        return config
    lines = ["[cluster]", f'redis = "{redis_url}"', f"lease_seconds = {lease_seconds}"]
    if node_name is not None:
        lines.append(f'node_name = "{node_name}"')
    return f"{config}\n" + "\n".join(lines) + "\n"


class Node:
    """
    One running C{twistd -n meteredrt} child.

    @ivar proxy: the proxy between it and Redis, if it was started with one.
    """

    def __init__(self, name: str, process: Any, child: TwistdProcess, port: int, data_dir: str) -> None:
        self.name = name
        self.process = process
        self.child = child
        self.port = port
        self.data_dir = data_dir
        self.proxy: LoopbackProxy | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        pid: int = self.process.pid
        return pid

    @property
    def running(self) -> bool:
        return not self.child.ended.called

    def signal(self, which: str | int) -> None:
        """
        Send a signal (a name twisted knows, or a number) unless it has ended.
        """
        try:
            self.process.signalProcess(which)
        except ProcessExitedAlready:
            pass

    async def kill(self) -> tuple[int | None, int | None]:
        """
        SIGKILL (thawing nothing: a frozen process dies too); fires with how
        it ended.
        """
        self.signal("KILL")
        return await self.child.ended

    async def terminate(self) -> tuple[int | None, int | None]:
        """
        SIGTERM: drain and stop; fires with how it ended.
        """
        self.signal(signal.SIGCONT)
        self.signal("TERM")
        return await self.child.ended

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)


async def start_node(
    case: TestCase,
    base: Path,
    name: str,
    config: str,
    args: Sequence[str] = (),
) -> Node:
    """
    Start one node with C{config} in C{base/name}; fires once it listens.
    """
    directory = base / name
    directory.mkdir(parents=True)
    config_path = directory / "meteredrt.toml"
    config_path.write_text(config)
    data_dir = str(directory / "data")
    child = TwistdProcess()
    process = reactor.spawnProcess(
        child,
        sys.executable,
        [
            sys.executable, "-c", TWISTD, "--pidfile=", "-n", "meteredrt",
            "--config", str(config_path),
            "--data-dir", data_dir,
            "--listen", "tcp:0:interface=127.0.0.1",
            *args,
        ],  # fmt: skip
        env=twistd_env(),
        path=str(ROOT),
    )
    node = Node(name, process, child, 0, data_dir)

    def kill() -> Deferred[Any]:
        node.signal(signal.SIGCONT)
        node.signal("KILL")
        return child.ended

    case.addCleanup(kill)
    node.port = await child.listening
    return node


class Cluster:
    """
    A Redis and the nodes started on it.
    """

    def __init__(
        self,
        case: TestCase,
        base: Path,
        redis: RedisServer,
        lease_seconds: float,
        clustered: bool = True,
        config: str = CONFIG,
        database: str | None = None,
    ) -> None:
        self.case = case
        self.config = config
        self.database = database
        self.clustered = clustered
        self.base = base
        self.redis = redis
        self.lease_seconds = lease_seconds
        self.nodes: list[Node] = []

    async def add_node(self, name: str | None = None, proxied: bool = False, extra: str = "") -> Node:
        """
        Start one more node on this cluster's Redis; through a new
        L{LoopbackProxy} if C{proxied}.
        """
        node = await self.launch(name or f"node-{len(self.nodes) + 1}", proxied, extra)
        self.nodes.append(node)
        return node

    async def launch(self, name: str, proxied: bool = False, extra: str = "") -> Node:
        """
        Start a node without adding it to L{nodes}.
        """
        proxy = None
        args: list[str] = []
        if proxied:
            proxy = await LoopbackProxy.start(self.case, self.redis.port)
            # --redis overrides the file (the fixed interface of issue 9).
            args = ["--redis", f"redis://127.0.0.1:{proxy.port}/0"]
        if self.database is not None:
            args += ["--database", self.database]
        config = cluster_config(
            self.redis.url if self.clustered else None, name, self.lease_seconds, extra, self.config
        )
        node = await start_node(self.case, self.base, name, config, args)
        node.proxy = proxy
        return node

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]


async def start_cluster(
    case: TestCase,
    nodes: int = 3,
    lease_seconds: float = LEASE_SECONDS,
    proxied: Sequence[int] = (),
    clustered: bool = True,
    config: str = CONFIG,
    database: str | None = None,
) -> Cluster:
    """
    Start a Redis and C{nodes} nodes on it (in parallel); the nodes whose
    index is in C{proxied} reach Redis through a L{LoopbackProxy}. With
    C{clustered=False} the nodes have no C{[cluster]} table: each is a
    standalone server, the in-memory baseline. C{config} is the nodes'
    configuration before the C{[cluster]} table is added. With
    C{database} (a PostgreSQL URL) every node keeps its store there.
    """
    base = Path(case.mktemp()).resolve()
    base.mkdir(parents=True)
    redis = await RedisServer.start(case)
    cluster = Cluster(case, base, redis, lease_seconds, clustered, config, database)
    names = [f"node-{i + 1}" for i in range(nodes)]
    started = await gatherResults(
        [Deferred.fromCoroutine(cluster.launch(name, i in proxied)) for i, name in enumerate(names)],
        consumeErrors=True,
    )
    cluster.nodes = list(started)
    return cluster


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """
    Poll C{check} until it is true; fail with C{what} after C{timeout}
    seconds. Fires with the seconds it took.
    """
    start = reactor.seconds()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return float(reactor.seconds() - start)
        if reactor.seconds() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await deferLater(reactor, interval, lambda: None)


def child_pids(parent: int) -> list[int]:
    """
    The processes whose parent is C{parent}, from C{/proc}.
    """
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return sorted(children)


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def serving_pid(pids: Sequence[int], server_port: int, client_port: int) -> int | None:
    """
    Which of C{pids} holds the server end of the loopback TCP connection
    from C{client_port} to C{server_port} (from C{/proc/net/tcp}).
    """
    wanted = None
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                wanted = inode
                break
    if wanted is None:
        return None
    for pid in pids:
        if wanted in _socket_inodes(pid):
            return pid
    return None


class Peer(RealtimeClient):
    """
    A protocol client that keeps every frame it receives, to check presence
    and ordering invariants from the outside.
    """

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[dict[str, Any]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.append(json.loads(payload))
        super().onMessage(payload, isBinary)

    def subscribe(self, channel: str) -> Deferred[dict[str, Any]]:
        return self.request({"type": "subscribe", "channel": channel})

    def send(self, to: str, data: Any) -> Deferred[dict[str, Any]]:
        return self.request({"type": "send", "to": to, "data": data})

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["type"] == kind]

    def presence_events(self, channel: str, skip_snapshots: bool = True) -> list[tuple[str, str]]:
        """
        C{("joined"|"left", peerId)} in the order received for C{channel}.
        The first presence frame after each subscribe ack is the snapshot:
        it is left out unless C{skip_snapshots} is false.
        """
        events = []
        frames = [f for f in self.frames if f["type"] == "presence" and f["channel"] == channel]
        for index, frame in enumerate(frames):
            if skip_snapshots and index == 0:
                continue
            events += [("joined", p["peerId"]) for p in frame["joined"]]
            events += [("left", p["peerId"]) for p in frame["left"]]
        return events

    def lefts(self, channel: str, peer_id: str) -> int:
        return self.presence_events(channel).count(("left", peer_id))

    def joins(self, channel: str, peer_id: str) -> int:
        return self.presence_events(channel).count(("joined", peer_id))


def peer_token(peer_id: str, **claims: Any) -> str:
    """
    A JWT of the functional-test app for C{peer_id}, valid ten minutes.
    """
    key = Key(SECRET_KEY_ID, APP_ID, KeyType.SECRET, ("**",), ACTIONS, secret=SECRET)
    return mint_token(key, peer_id, now=int(time.time()), expires_in=600, **claims)


async def connect_peer(case: TestCase, node: Node, peer_id: str) -> Peer:
    """
    Connect C{peer_id} to C{node} with a JWT; fires once welcomed. Dropped
    on cleanup.
    """
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{node.port}/v1?token={peer_token(peer_id)}")
    factory.protocol = Peer
    client: Peer = await TCP4ClientEndpoint(reactor, "127.0.0.1", node.port).connect(factory)
    case.addCleanup(client.abort)
    await client.welcomed
    return client


#: REST credential of the functional-test app.
AUTH = {"Authorization": f"Bearer {SECRET_KEY_ID}:{SECRET}"}

# One connection per request: a keep-alive connection would outlive the test.
_http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False), connectTimeout=5))


async def rest(method: str, node: Node, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """
    One REST call to C{node} as the app's backend: C{(status, JSON body)}.
    """
    kwargs: dict[str, Any] = {"headers": AUTH}
    if body is not None:
        kwargs["json"] = body
    response = await _http.request(method, node.http + path, **kwargs).addTimeout(timeout, reactor)
    text = await response.content()
    return response.code, json.loads(text) if text else None


async def peers_of(node: Node, channel: str) -> set[str]:
    """
    The peer ids C{GET /v1/channels/{channel}/peers} lists on C{node}.
    """
    code, body = await rest("GET", node, f"/v1/channels/{quote(channel, safe='')}/peers")
    assert code == 200, (code, body)
    return {p["peerId"] for p in body["peers"]}
