"""
The composition root: C{twistd meteredrt} options and L{makeService}.

This is the only module that picks implementations (SQLite key store,
in-memory broker and presence or, with C{[cluster]}/C{--redis}, the Redis
ones with the node lease, SQLite-backed meter, treq TURN client) and the
only one that may import the global reactor.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, TextIO

from treq.client import HTTPClient
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from meteredrt.apps import App, Key, KeyType
from meteredrt.broker.memory import MemoryBroker
from meteredrt.broker.redis import RedisBroker
from meteredrt.clusterwire import ClusterNode, default_node_name
from meteredrt.config import (
    ClusterConfig,
    Config,
    ConfigError,
    apply_options,
    apply_workers,
    default_config,
    load_config,
)
from meteredrt.hub import Hub
from meteredrt.keystore import SQLiteKeyStore, open_pool, prepare_database
from meteredrt.lease import NodeLease
from meteredrt.metering import Meter
from meteredrt.presence.memory import MemoryPresence
from meteredrt.presence.redis import RedisPresence
from meteredrt.redisclient import RedisClient, RedisSubscriber, parse_redis_url
from meteredrt.rest import install_rest
from meteredrt.site import BoundedRequest, V1Resource, access_log_line, build_root
from meteredrt.speedups import install_speedups
from meteredrt.turn import TurnApiClient, TurnCredentialCache
from meteredrt.usagestore import UsageStore, usage_database_path
from meteredrt.workers import ParentWatch, ReusePortEndpoint, WorkerCommand, WorkerPool, for_worker, worker_data_dir
from meteredrt.ws import RealtimeServerFactory


class Options(usage.Options):
    """
    C{twistd meteredrt} options. With none, the server listens on
    C{tcp:8080:interface=127.0.0.1} and keeps its state in
    C{./meteredrt-data}.
    """

    optParameters = [
        ["config", "c", None, "TOML configuration file (apps, keys, plans, listen, data_dir)."],
        ["data-dir", "d", None, "Directory for persistent state (SQLite). Default ./meteredrt-data."],
        ["redis", None, None, "Redis URL (redis:// or rediss://) of the cluster; overrides [cluster] redis."],
        ["workers", None, None, "Processes serving the same ports; needs [cluster]. Overrides [server] workers.", int],
        ["worker-index", None, None, "Internal: set by worker 1 on the workers it starts.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on a Twisted endpoint (repeatable), e.g.
        tcp:8080:interface=127.0.0.1 or ssl:8443:privateKey=key.pem:certKey=cert.pem
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"]) if self["config"] else default_config()
            self["parsed"] = apply_options(
                config, listen=self["listen"], data_dir=self["data-dir"], redis=self["redis"]
            )
            # Last: it checks what --redis and --listen made of the file.
            self["parsed"] = apply_workers(self["parsed"], self["workers"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def print_bootstrap(app: App, keys: tuple[Key, ...], out: TextIO | None = None) -> None:
    """
    Show the keys of a freshly bootstrapped app once: the only time the
    secret is shown. Written to the terminal, never to the log.
    """
    out = out or sys.__stdout__
    assert out is not None, "no stdout to show the new keys on"
    lines = [f"meteredrt: created app {app.app_id!r} with these keys (the secret is shown only now):"]
    for key in keys:
        if key.type is KeyType.SECRET:
            lines.append(f"  secret key id:     {key.key_id}")
            lines.append(f"  secret key secret: {key.secret}")
        else:
            lines.append(f"  publishable key:   {key.key_id}")
    out.write("\n".join(lines) + "\n")
    out.flush()


class OrderedServices(MultiService):
    """
    A C{MultiService} that stops its children one at a time, the last added
    first, each once the previous one has finished stopping.

    C{MultiService} stops them all at once, which here would let the
    meter's final flush run while connections are still draining (and still
    counting messages), and close the stores under them.
    """

    log = Logger()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                self.log.failure("Stopping {service} failed", service=service)


class ConnectionDrain(Service):
    """
    On shutdown, after the listeners have stopped, tell every connection to
    go away and wait for them to close (§17.1).
    """

    def __init__(self, factory: RealtimeServerFactory) -> None:
        self._factory = factory

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._factory.drain()


class Listener(Service):
    """
    Listens on one Twisted endpoint string while running; with
    C{shared=True} on a C{SO_REUSEPORT} socket that other workers bind too.
    """

    def __init__(self, description: str, factory: Any, reactor: Any, shared: bool = False) -> None:
        self.description = description
        self._endpoint: Any = (
            ReusePortEndpoint(reactor, description) if shared else endpoints.serverFromString(reactor, description)
        )
        self._factory = factory
        self._port: IListeningPort | None = None

    async def listen(self) -> IListeningPort:
        """
        Start listening; fires with the bound port.
        """
        self.running = True
        self._port = await self._endpoint.listen(self._factory)
        return self._port

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self._port = self._port, None
        return None if port is None else port.stopListening()


class StartupGate(MultiService):
    """
    Holds back the listeners until the key store and the meter have
    loaded, so the first client never meets an empty store or a quota that
    forgot earlier runs; stops the process if it cannot listen.

    @ivar listening: fires with the bound L{IListeningPort}s once every
        listener is up.
    """

    log = Logger()

    def __init__(self, keys: SQLiteKeyStore, meter: Meter, reactor: Any) -> None:
        super().__init__()
        self._keys = keys
        self._meter = meter
        self._reactor = reactor
        self.listening: Deferred[list[IListeningPort]] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        ensureDeferred(self._open()).addCallbacks(self.listening.callback, self._failed)

    async def _open(self) -> list[IListeningPort]:
        await self._keys.ready
        # Quotas must see the counts of earlier runs before anyone connects.
        await self._meter.loaded
        ports = []
        for listener in self:
            port = await listener.listen()
            self.log.info("meteredrt listening on {where}", where=port.getHost())
            ports.append(port)
        return ports

    def _failed(self, failure: Any) -> None:
        self.log.failure("meteredrt could not start", failure)
        self.listening.errback(failure)
        self._reactor.stop()


def stop_reactor(reactor: Any) -> None:
    """
    Stop the reactor unless it is already stopping.
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _cluster_hub(cluster: ClusterConfig, meter: Meter, keys: SQLiteKeyStore, reactor: Any, top: MultiService) -> Hub:
    """
    A hub routing and keeping presence through Redis, with the node's
    Redis connections and lease as services of C{top}: added before the
    hub, they stop after the connections have drained, so every closing
    connection still leaves presence.
    """
    address = parse_redis_url(cluster.redis)
    node = ClusterNode(cluster.node_name or default_node_name())
    client = RedisClient(reactor, address)
    broker = RedisBroker(client, node)
    subscriber = RedisSubscriber(reactor, address, broker.received)
    broker.start(subscriber)
    presence = RedisPresence(client, node)
    client.setServiceParent(top)
    subscriber.setServiceParent(top)
    # The meter counts per node for now: a reaped node's connections have
    # nothing to release here.
    lease = NodeLease(reactor, client, presence, node, cluster.lease_seconds)
    lease.setServiceParent(top)
    Logger().info("Cluster node {node} on Redis at {address}", node=node.node_id, address=str(address))
    hub = Hub(broker, presence, meter, keys.app, node_id=node.node_id)
    lease.reconcile_after_outage(subscriber, hub.reconcile_presence)
    return hub


def makeService(options: Options | dict, reactor: Any = None) -> IService:
    """
    Build the whole server as one service.

    Children stop one after the other, in the reverse of the order they are
    added (L{OrderedServices}): listeners stop accepting first, then
    connections drain, then the meter writes its last counts, then the
    stores close.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["parsed"]
    worker = options.get("worker-index") or 1
    if config.workers > 1:
        config = for_worker(config, worker)
    install_speedups()

    top = OrderedServices()
    pool = None
    if config.workers > 1 and worker == 1:
        # Added first so that it stops last: worker 1 exits after the others.
        command = WorkerCommand(config.workers, options.get("config"), config.data_dir, options.get("redis"))
        pool = WorkerPool(command, reactor)
        pool.setServiceParent(top)
    elif worker > 1:
        # Worker 1 died without stopping this one: drain and stop.
        ParentWatch(reactor, partial(stop_reactor, reactor)).setServiceParent(top)
    keys = SQLiteKeyStore(
        open_pool(prepare_database(config.data_dir), reactor),
        clock=reactor,
        declarations=config.apps,
        on_bootstrap=print_bootstrap,
    )
    keys.setServiceParent(top)
    meter = Meter(reactor, UsageStore(usage_database_path(worker_data_dir(config.data_dir, worker)), reactor))
    meter.setServiceParent(top)

    if config.cluster is None:
        hub = Hub(MemoryBroker(), MemoryPresence(), meter, keys.app)
    else:
        hub = _cluster_hub(config.cluster, meter, keys, reactor, top)
    hub.setServiceParent(top)
    # A suspension made while running closes the app's live connections
    # with 4012 at the key store's next re-read.
    keys.on_apps_changed(hub.close_suspended)
    # An API call may outlive the 2 s a welcome waits: a late answer still
    # fills the cache for the next connection.
    # TURN calls are rare (credentials are cached), so no connection is kept.
    turn_http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    turn_api = TurnApiClient(turn_http, reactor, timeout=10.0)
    turn = TurnCredentialCache(turn_api, reactor)
    turn.setServiceParent(top)
    factory = RealtimeServerFactory(hub, keys, reactor, turn=turn)
    ConnectionDrain(factory).setServiceParent(top)

    trusted = config.trusted_proxies
    v1 = V1Resource(factory, reactor, upgrades_per_minute=config.upgrade_rate_limit, trusted_proxies=trusted)
    install_rest(v1, keys=keys, hub=hub, meter=meter, clock=reactor, turn=turn_api, trusted_proxies=trusted)
    root = build_root(v1, ready=lambda: bool(keys.running) and not factory.draining)
    log_line = partial(access_log_line, trusted_proxies=trusted)
    site = Site(root, requestFactory=BoundedRequest, logFormatter=log_line)
    site.displayTracebacks = False
    gate = StartupGate(keys, meter, reactor)
    gate.setName("listeners")
    for description in config.listen:
        Listener(description, site, reactor, shared=config.workers > 1).setServiceParent(gate)
    gate.setServiceParent(top)
    if pool is not None:
        gate.listening.addCallback(pool.start_workers)
        # Stopped first: every worker drains at the same time as this one.
        pool.signal_on_stop().setServiceParent(top)
    return top
