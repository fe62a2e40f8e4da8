"""
The composition root: C{twistd meteredrt} options and L{makeService}.

This is the only module that picks implementations (the key store and the
meter's usage store on SQLite or PostgreSQL; in-memory broker and presence
or, with C{[cluster]}/C{--redis}, the Redis ones with the node lease; the
webhook outbox; treq clients for TURN and webhooks) and the only one that
may import the global reactor.
"""

from __future__ import annotations

import atexit
import gc
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, NoReturn, TextIO

from treq.client import HTTPClient
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from meteredrt.apps import App, Key, KeyType, WebhookConfig
from meteredrt.broker.memory import MemoryBroker
from meteredrt.broker.redis import RedisBroker
from meteredrt.clustercount import ClusterConnectionCount
from meteredrt.clusterquota import ClusterQuota
from meteredrt.clusterusage import ClusterUsage, UsageShares
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
from meteredrt.guard import ConnectionCap, GuardedSite
from meteredrt.hub import Hub
from meteredrt.leadership import Leadership
from meteredrt.lease import NodeLease
from meteredrt.logs import build_observer, rotate_on_sigusr1, twistd_destination
from meteredrt.metering import Meter
from meteredrt.metrics import Metrics
from meteredrt.presence.memory import MemoryPresence
from meteredrt.presence.redis import RedisPresence
from meteredrt.prometheus import MetricsResource, build_registry, metrics_root
from meteredrt.redisclient import BACKOFF_CAP, RedisClient, RedisSubscriber, parse_redis_url
from meteredrt.rest import install_rest
from meteredrt.site import BoundedRequest, V1Resource, access_log_line, build_root
from meteredrt.speedups import install_speedups
from meteredrt.store import keys as key_tables
from meteredrt.store import usage as usage_tables
from meteredrt.store import webhooks as webhook_tables
from meteredrt.store.database import Database, DriverMissing, driver_errors, first_line, require_driver
from meteredrt.store.keystore import KeyStore
from meteredrt.store.schema import SchemaTooNew
from meteredrt.store.usage import UsageStore
from meteredrt.store.webhooks import StoreOutbox
from meteredrt.turn import TurnApiClient, TurnCredentialCache
from meteredrt.webhooks.dispatcher import DELIVERY_ROLE, WebhookDispatcher
from meteredrt.webhooks.emitter import WebhookEmitter
from meteredrt.webhooks.redismarks import SWEEP_SECONDS, RedisMarks
from meteredrt.workers import ParentWatch, ReusePortEndpoint, WorkerCommand, WorkerPool, for_worker
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
        [
            "database",
            None,
            None,
            "PostgreSQL URL for apps, keys and usage (postgresql://user@host:5432/db); "
            "overrides [storage] database. Default: SQLite in the data directory.",
        ],
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
        """
        Read the configuration and check every endpoint string.

        A problem ends the process with one line on standard error and exit
        status 1 (C{SystemExit}), rather than as a C{UsageError}, after
        which twistd would print its whole usage text first: the command
        line was well formed, the configuration it names is not.
        """
        try:
            config = load_config(self["config"]) if self["config"] else default_config()
            parsed = apply_options(
                config,
                listen=self["listen"],
                data_dir=self["data-dir"],
                database=self["database"],
                redis=self["redis"],
            )
            # After --redis and --listen: it checks what they made of the file.
            parsed = apply_workers(parsed, self["workers"])
            check_endpoints(parsed, from_command_line=bool(self["listen"]))
            require_driver(Database(parsed.data_dir, parsed.database))
        except (ConfigError, DriverMissing) as e:
            raise SystemExit(f"meteredrt: {e}") from None
        self["parsed"] = parsed


def check_endpoints(config: Config, *, from_command_line: bool) -> None:
    """
    Parse every endpoint string without listening, so that a typo stops the
    server before anything is created.

    Twisted's parsers only build endpoint objects (the C{ssl:} one also
    reads its certificate and key files), so no reactor is needed.

    :raises ConfigError: naming the option or file key of the first
        endpoint that does not parse.
    """
    for index, description in enumerate(config.listen):
        try:
            endpoints.serverFromString(None, description)
        except Exception as e:
            # Parsers raise ValueError, TypeError, KeyError, OSError or
            # OpenSSL errors; each says what is wrong in its message.
            if from_command_line:
                source, where = "<command line>", f"--listen[{index}]"
            else:
                source, where = config.source or "<defaults>", f"server.listen[{index}]"
            reason = str(e) or type(e).__name__
            raise ConfigError(source, where, f"not a usable endpoint {description!r}: {reason}") from None
    if config.metrics.listen is not None:
        try:
            endpoints.serverFromString(None, config.metrics.listen)
        except Exception as e:
            reason = str(e) or type(e).__name__
            raise ConfigError(
                config.source or "<defaults>",
                "metrics.listen",
                f"not a usable endpoint {config.metrics.listen!r}: {reason}",
            ) from None


class StartupError(Exception):
    """
    The server cannot start. C{str()} is the one line shown to the operator.

    Raised while twistd starts the services, before the reactor runs: twistd
    then removes its pid file, reports the error (in daemon mode, through
    the parent process) and exits with status 1.
    """


_startup_log = Logger(namespace="meteredrt.tap")


def refuse_to_start(problem: str) -> NoReturn:
    """
    Log why the server cannot start (a daemon's log file is where its
    operator looks) and raise it as a L{StartupError}.
    """
    _startup_log.critical("meteredrt cannot start: {problem}", problem=problem)
    raise StartupError(problem)


def show_startup_errors_in_one_line() -> None:
    """
    Make an uncaught L{StartupError} print as C{meteredrt: <problem>}
    instead of a traceback through twistd.

    twistd lets an exception from starting the services propagate to the
    interpreter, whose hook prints the traceback; only ours are shortened,
    anything else still gets its traceback.
    """
    previous = sys.excepthook
    if getattr(previous, "shows_startup_errors", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        # twistd -n sends sys.stderr into its log; the terminal's own
        # stderr is where the operator looks for why the start failed.
        err = sys.__stderr__ or sys.stderr
        if isinstance(value, StartupError):
            err.write(f"meteredrt: {value}\n")
            err.flush()
        else:
            previous(kind, value, tb)

    hook.shows_startup_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


#: The file in the data directory that receives the keys made on the first
#: start, for a daemon whose standard output goes nowhere.
FIRST_KEYS_FILE = "first-start-keys.txt"


def bootstrap_text(app: App, keys: tuple[Key, ...]) -> str:
    """
    The keys of a freshly bootstrapped app as the operator reads them.
    """
    lines = [f"meteredrt: created app {app.app_id!r} with these keys (the secret is shown only now):"]
    for key in keys:
        if key.type is KeyType.SECRET:
            lines.append(f"  secret key id:     {key.key_id}")
            lines.append(f"  secret key secret: {key.secret}")
        else:
            lines.append(f"  publishable key:   {key.key_id}")
    return "\n".join(lines) + "\n"


def write_private_file(path: str, text: str) -> None:
    """
    Write C{text} to a file only its owner can read or write, replacing any
    file of that name (but never following a symbolic link there).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        # A file that was already there keeps its old mode otherwise.
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def show_bootstrap(data_dir: str, app: App, keys: tuple[Key, ...], out: TextIO | None = None) -> None:
    """
    Show the keys of a freshly bootstrapped app once: on the terminal
    (C{twistd -n}) and in L{FIRST_KEYS_FILE} in the data directory, mode
    0600, because a daemon's standard output is discarded. The log gets the
    file's path, never the secret.

    The file holds nothing the key database beside it does not (it stores
    the secret to verify signatures with), under the same permissions; it
    is written once, at the first start, before any connection is
    accepted, so this small synchronous write does not hold up clients.
    """
    text = bootstrap_text(app, keys)
    path = os.path.abspath(os.path.join(data_dir, FIRST_KEYS_FILE))
    try:
        write_private_file(path, text)
    except OSError as e:
        _startup_log.error("Could not write the new keys to {path}: {problem}", path=path, problem=e.strerror)
    else:
        _startup_log.info(
            "The keys of the new app {app_id}, secret included, are in {path} (readable by this user only)",
            app_id=app.app_id,
            path=path,
        )
        text += f"  (also saved in {path}: copy the secret somewhere safe, then delete the file)\n"
    out = out or sys.__stdout__
    if out is not None:
        out.write(text)
        out.flush()


class OrderedServices(MultiService):
    """
    A C{MultiService} that stops its children one at a time, the last added
    first, each once the previous one has finished stopping.

    C{MultiService} stops them all at once, which here would let the
    meter's final flush run while connections are still draining (and still
    counting messages), and close the stores under them.

    @ivar log_observer: handed to twistd as the application's
        C{ILogObserver} when this service joins the application, so that
        the C{[log]} format and level apply to everything twistd logs; see
        L{meteredrt.logs}.
    """

    log = Logger()
    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # twistd builds its log observer after makeService, from the
        # application's ILogObserver component when it has one (the
        # mechanism a .tac file uses); its --logger option still wins.
        if (
            self.log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)

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
    The first step of shutdown, before the listeners close (§17.1).

     1. At once: the node stops being ready. C{/readyz} answers 503 and
        WebSocket upgrades are refused with 503 and C{Retry-After}, while
        the listeners stay open and REST calls and live connections carry
        on, for C{grace} seconds, so that a load balancer's health check
        sees the 503 and takes the node out of rotation before its port
        closes.
     2. Then every connection gets C{going_away} and is closed with 1001
        (L{RealtimeServerFactory.drain}, at most 10 s).

    The listeners close after this service has stopped (L{makeService}).
    """

    def __init__(self, factory: RealtimeServerFactory, clock: IReactorTime, grace: float) -> None:
        self._factory = factory
        self._clock = clock
        self._grace = grace
        self._waiting: Deferred[None] | None = None

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        self._factory.draining = True
        if self._grace > 0:
            self._waiting = deferLater(self._clock, self._grace)
            try:
                await self._waiting
            finally:
                self._waiting = None
        await self._factory.drain()


class DataDirectory(Service):
    """
    Creates the SQLite store (the data directory and its databases, schemas
    brought up to date) when the server starts, not when it is composed: by
    then every listener is bound, so a server that cannot listen leaves no
    empty data directory behind, and the files belong to the user twistd
    switched to (C{-u}/C{-g}), not to root.

    Opening each database once here, synchronously and before the reactor
    runs, turns an unusable file (no permission, not a database, a schema
    newer than this release) into a L{StartupError} instead of a failure
    after the reactor has started. A PostgreSQL store is opened by its pools
    once the reactor runs (a database that cannot be reached then stops the
    start, see L{StartupGate}); its data directory is still made here, for
    what each node keeps to itself.
    """

    def __init__(self, database: Database) -> None:
        self.database = database

    def startService(self) -> None:
        super().startService()
        if self.database.url is not None:
            self._reach_postgresql()
            try:
                os.makedirs(self.database.data_dir, mode=0o700, exist_ok=True)
            except OSError as e:
                refuse_to_start(f"cannot use data directory {self.database.data_dir!r}: {e.strerror or e}")
            return
        for tables in (key_tables, usage_tables, webhook_tables):
            try:
                self.database.connect(tables.COMPONENT, tables.MIGRATIONS).close()
            except OSError as e:
                refuse_to_start(f"cannot use data directory {self.database.data_dir!r}: {e.strerror or e}")
            except (sqlite3.Error, SchemaTooNew) as e:
                refuse_to_start(f"cannot use {self.database.sqlite_path(tables.COMPONENT)!r}: {e}")

    def _reach_postgresql(self) -> None:
        """
        Connect to PostgreSQL once per component, bringing its schema up to
        date, before the reactor runs (the start waits at most the
        connection timeout for it): a database that cannot be reached, or
        whose schema is newer than this release, is then a L{StartupError}
        with exit status 1, which a supervisor restarts, rather than a
        failure after the reactor has started.
        """
        unusable: tuple[type[Exception], ...] = (*driver_errors(), SchemaTooNew)
        for tables in (key_tables, usage_tables, webhook_tables):
            try:
                self.database.connect(tables.COMPONENT, tables.MIGRATIONS).close()
            except unusable as e:
                refuse_to_start(f"cannot use {self.database.describe()}: {first_line(e)}")


#: The accept queue of a listener whose endpoint string sets no backlog.
#: Twisted's default, 50, overflows in a burst of connects (a reconnect
#: storm after a restart or a drain): the kernel drops the SYNs beyond it
#: and the clients retry a second later. The kernel caps it at
#: C{net.core.somaxconn}.
DEFAULT_BACKLOG = 1024

#: The endpoint types whose strings take a C{backlog}.
_BACKLOG_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl", "unix"})


def with_default_backlog(description: str) -> str:
    """
    C{description} with C{backlog=DEFAULT_BACKLOG} added when it is a TCP,
    TLS or UNIX endpoint string that sets no backlog of its own.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_ENDPOINTS or "backlog=" in description:
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


class Listener(Service):
    """
    Listens on one Twisted endpoint string while running (with a backlog of
    L{DEFAULT_BACKLOG} unless the string sets one); with C{shared=True} on
    a C{SO_REUSEPORT} socket that other workers bind too.

    The socket is bound as soon as the service starts (in
    C{privilegedStartService} under twistd, so ports below 1024 work with
    C{-u}/C{-g}), but connections wait in the kernel's backlog until
    L{accept} is called: the server binds first, then opens its stores, then
    accepts.
    """

    def __init__(self, description: str, factory: Any, reactor: Any, shared: bool = False) -> None:
        self.description = description
        queued = with_default_backlog(description)
        self._endpoint: Any = (
            ReusePortEndpoint(reactor, queued) if shared else endpoints.serverFromString(reactor, queued)
        )
        self._factory = factory
        self._binding: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None

    @property
    def address(self) -> IAddress | None:
        """
        The address the socket is bound to, once it is.
        """
        return None if self._port is None else self._port.getHost()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        super().startService()
        self.bind()

    def bind(self) -> None:
        """
        Bind the socket, without accepting yet; does nothing if bound.

        :raises StartupError: if the endpoint refuses at once, as TCP, TLS,
            UNIX and systemd endpoints do.
        """
        if self._binding is not None:
            return
        binding = self._endpoint.listen(self._factory)
        binding.addCallback(self._bound)
        self._binding = binding
        if binding.called:
            refused: list[Failure] = []
            binding.addErrback(refused.append)
            if refused:
                self._binding = None
                refuse_to_start(self._describe(refused[0].value or Exception()))

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self._port = port
        if isinstance(port, FileDescriptor):
            port.stopReading()
        return port

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
            reason = error.socketError.strerror or str(error.socketError)
        else:
            reason = str(error) or type(error).__name__
        return f"cannot listen on {self.description}: {reason}"

    async def accept(self) -> IListeningPort:
        """
        Start accepting connections; fires with the port.

        :raises StartupError: if an endpoint that binds later failed.
        """
        self.bind()
        assert self._binding is not None
        try:
            port = await self._binding
        except Exception as e:
            raise StartupError(self._describe(e)) from None
        if isinstance(port, FileDescriptor):
            port.startReading()
        self.running = True
        return port

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        binding, self._binding = self._binding, None
        port, self._port = self._port, None
        if port is not None:
            return port.stopListening()
        if binding is not None:
            binding.cancel()
        return None


#: A young collection once 5,000 more container objects live than at the
#: last one instead of CPython's 700; a full collection only after 100 of the
#: middle generation's instead of 10 (and, as always, only once the objects
#: promoted since the last one are a quarter of the old generation).
FULL_COLLECTION_THRESHOLDS = (5000, 10, 100)


def settle_heap() -> None:
    """
    Tune the garbage collector for a server whose start-up is done.

    What exists once the stores have loaded (modules, configuration, the
    stores' caches) lives as long as the process, and C{gc.freeze()} takes
    it out of every later full collection: those come each time the heap
    grows by a quarter, so while connections arrive they walked the whole
    start-up heap again and again (a fifth of the full collections' time
    over 10,000 connects).

    Live connections make up most of the heap after that, and they are
    freed by reference counting when they close, leaving no cycles (the
    handshake's request and Autobahn's C{is_closed} were the two), so full
    collections find little to reclaim: they come ten times less often
    (L{FULL_COLLECTION_THRESHOLDS}; 10,000 connects: ~9% less server CPU per
    connect, the same memory per idle connection). Young collections come
    seven times less often too: requests and replies leave few objects
    alive for long, and each young collection walked the connections'
    recently made, still-live objects (Deferreds, held frames) for little:
    ping-pong ~10% less server CPU per round trip.
    """
    gc.freeze()
    gc.set_threshold(*FULL_COLLECTION_THRESHOLDS)


class StartupGate(MultiService):
    """
    Holds back the listeners until the key store and the meter have
    loaded, so the first client never meets an empty store or a quota that
    forgot earlier runs; stops the process if that fails.

    @ivar listening: fires with the bound L{IListeningPort}s once every
        listener accepts.
    @param settled: called once, when the stores have loaded and just
        before the listeners accept (see L{makeService}).
    @param also: what else must be up before anyone is accepted: a cluster
        node's first Redis connection, without which every capped
        admission, subscribe and send would fail.
    @param failed: called with the one-line problem when the start fails
        (under twistd, L{fail_the_process}).
    """

    log = Logger()

    def __init__(
        self,
        keys: KeyStore,
        meter: Meter,
        reactor: Any,
        settled: Callable[[], None] = lambda: None,
        also: Sequence[Deferred[None]] = (),
        failed: Callable[[str], None] = lambda problem: None,
    ) -> None:
        super().__init__()
        self._keys = keys
        self._meter = meter
        self._reactor = reactor
        self._settled = settled
        self._report_failure = failed
        self._also = list(also)
        self.listening: Deferred[list[IListeningPort]] = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        for listener in self:
            listener.bind()
        ensureDeferred(self._open()).addCallbacks(self.listening.callback, self._failed)

    async def _open(self) -> list[IListeningPort]:
        await self._keys.ready
        # Quotas must see the counts of earlier runs before anyone connects.
        await self._meter.loaded
        for waiting in self._also:
            await waiting
        self._settled()
        ports = []
        for listener in self:
            if not self.running:
                # Stopped (SIGTERM) while the stores were loading: accept nothing.
                raise StartupError("stopped before listening")
            port = await listener.accept()
            self.log.info("meteredrt listening on {where}", where=port.getHost())
            ports.append(port)
        return ports

    def _failed(self, failure: Any) -> None:
        if not self.running:
            # A stop while starting: nothing failed, and the reactor is
            # already on its way down.
            self.listening.errback(failure)
            self.listening.addErrback(lambda _: None)
            return
        if failure.check(StartupError):
            problem = str(failure.value)
            self.log.critical("meteredrt: {problem}", problem=problem)
        else:
            problem = f"could not start: {first_line(failure.value)}"
            self.log.failure("meteredrt could not start", failure)
        self._report_failure(problem)
        self.listening.errback(failure)
        # Whoever waits on listening has seen it; nobody else must log it.
        self.listening.addErrback(lambda _: None)
        stop_reactor(self._reactor)


class _Closing(Service):
    """
    Calls C{close} when stopped: something (a store, a connection pool)
    that must close after everything added after it has stopped.
    """

    def __init__(self, close: Callable[[], object]) -> None:
        self._close = close

    def stopService(self) -> Deferred[object]:
        super().stopService()
        return maybeDeferred(self._close)


def _webhooks_of(keys: KeyStore, app_id: str) -> WebhookConfig | None:
    app = keys.app(app_id)
    return None if app is None else app.webhooks


def _start_workers(ports: list[IListeningPort], pool: WorkerPool, main_listeners: int) -> list[IListeningPort]:
    """
    Start the other workers on the main listeners' ports (the first ones
    the gate opened), not on worker 1's own metrics port.
    """
    pool.start_workers(ports[:main_listeners])
    return ports


def fail_the_process(problem: str) -> None:
    """
    Report a start that failed after the reactor began running, the way
    one that failed before it is reported: C{meteredrt: <problem>} on the
    terminal's standard error, and exit status 1 once twistd has shut down.

    twistd exits 0 whenever its reactor stops, so without this a database
    or Redis failure during start-up would look like a clean stop and a
    supervisor (systemd's C{Restart=on-failure}) would not start the server
    again. The status is set at interpreter exit, after twistd has removed
    its pid file and closed its log.
    """
    err = sys.__stderr__ or sys.stderr
    err.write(f"meteredrt: {problem}\n")
    err.flush()

    def exit_1() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os._exit(1)

    atexit.register(exit_1)


def stop_reactor(reactor: Any) -> None:
    """
    Stop the reactor unless it is already stopping.
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _cluster_hub(
    cluster: ClusterConfig,
    count: ClusterConnectionCount,
    quota: ClusterQuota,
    meter: Meter,
    keys: KeyStore,
    reactor: Any,
    top: MultiService,
    metrics: Metrics,
    emitter: WebhookEmitter,
) -> Hub:
    """
    A hub routing and keeping presence through Redis, with the node's
    Redis connections and lease as services of C{top}: added before the
    hub, they stop after the connections have drained, so every closing
    connection still leaves presence and releases its count.

    The presence tells C{emitter} of the cluster-wide transitions this
    node's steps make (and those of the nodes it reaps); the emitter is
    added after the lease, so that it stops after the hub and before the
    Redis connection its marks need.
    """
    node, client = count.node, count.client
    client.metrics = metrics
    address = client.address
    broker = RedisBroker(client, node)
    subscriber = RedisSubscriber(reactor, address, broker.received)
    broker.start(subscriber)
    presence = RedisPresence(client, node, observer=emitter)
    client.setServiceParent(top)
    subscriber.setServiceParent(top)
    # The reaper script releases a dead node's connection counts; this
    # node writes its own again whenever it registers its connections again.
    lease = NodeLease(reactor, client, presence, node, cluster.lease_seconds, recount=count.recount)
    lease.setServiceParent(top)
    # Stops after the connections drained and before the Redis client: the
    # unused message slices and prepaid overage go back to the cluster.
    quota.setServiceParent(top)
    emitter.setServiceParent(top)
    Logger().info("Cluster node {node} on Redis at {address}", node=node.node_id, address=str(address))
    hub = Hub(broker, presence, meter, keys.app, node_id=node.node_id, metrics=metrics)
    lease.reconcile_after_outage(subscriber, hub.reconcile_presence)
    return hub


def makeService(options: Options | dict, reactor: Any = None) -> IService:
    """
    Build the whole server as one service.

    Starting binds every listener first (C{privilegedStartService}), then
    creates the data directory and opens the stores, then accepts
    connections once the stores have loaded (L{StartupGate}); a failure at
    any of these steps before the reactor runs is a L{StartupError}.

    Children stop one after the other, in the reverse of the order they are
    added (L{OrderedServices}): the node stops being ready and, after the
    drain grace, drains its connections (L{ConnectionDrain}); then the
    listeners close, then the meter writes its last counts, then the stores
    close.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["parsed"]
    worker = options.get("worker-index") or 1
    if config.workers > 1:
        config = for_worker(config, worker)
    install_speedups()

    show_startup_errors_in_one_line()

    top = OrderedServices()
    pool = None
    if config.workers > 1 and worker == 1:
        # Added first so that it stops last: worker 1 exits after the others.
        command = WorkerCommand(
            config.workers, options.get("config"), config.data_dir, options.get("redis"), options.get("database")
        )
        pool = WorkerPool(command, reactor)
        pool.setServiceParent(top)
    elif worker > 1:
        # Worker 1 died without stopping this one: drain and stop.
        ParentWatch(reactor, partial(stop_reactor, reactor)).setServiceParent(top)
    twistd_options = getattr(options, "parent", None)
    if twistd_options is not None:
        destination = twistd_destination(twistd_options)
        if destination is not None:
            top.log_observer = build_observer(config.log, destination)
        if isinstance(destination, LogFile):
            rotate_on_sigusr1(destination, reactor)
    database = Database(config.data_dir, config.database)
    Logger().info("Keeping apps, keys and usage in {where}", where=database.describe())
    if config.cluster is not None and database.url is None:
        Logger().warn(
            "This cluster node keeps apps, keys and usage in its own SQLite files: keys made with the "
            "CLI reach only this node and usage does not add up across nodes. Give every node one "
            "PostgreSQL database ([storage] database or --database)."
        )
    DataDirectory(database).setServiceParent(top)
    keys = KeyStore(
        database.open_pool(key_tables.COMPONENT, key_tables.MIGRATIONS, reactor, create=False),
        clock=reactor,
        dialect=database.dialect,
        declarations=config.apps,
        on_bootstrap=partial(show_bootstrap, config.data_dir),
    )
    keys.setServiceParent(top)
    usage_pool = database.open_pool(usage_tables.COMPONENT, usage_tables.MIGRATIONS, reactor, create=False)
    # In a cluster, capped apps' connections are admitted against the
    # whole cluster's count; the node's Redis client starts with the hub's.
    # Their messages are admitted from slices of the cluster-wide quota, and
    # overage is paid from the balance kept in Redis.
    usage_store = UsageStore.with_pool(usage_pool, database.dialect)
    cluster_count = quota = None
    before_listening: list[Deferred[None]] = []
    if config.cluster is not None:
        node = ClusterNode(config.cluster.node_name or default_node_name())
        cluster_client = RedisClient(reactor, parse_redis_url(config.cluster.redis))
        # The listeners open once Redis is reached (a fresh Deferred: others
        # chain work on the client's own).
        redis_up: Deferred[None] = Deferred()
        cluster_client.ready.addCallback(redis_up.callback)
        before_listening.append(redis_up)
        cluster_count = ClusterConnectionCount(cluster_client, node)
        quota = ClusterQuota(reactor, cluster_client, usage_store)
    meter = Meter(reactor, usage_store, cluster=cluster_count, quota=quota)
    meter.setServiceParent(top)
    # Counted whether or not [metrics] serves them: counting is cheaper
    # than asking whether to.
    metrics = Metrics()
    metrics.watch(meter=meter)

    # Presence webhooks: the outbox is in the store (a cluster's nodes share
    # it in PostgreSQL). It is opened before the hub can take note of
    # anything and closes after every connection has drained.
    outbox = StoreOutbox(
        database.open_pool(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS, reactor, create=False),
        database.dialect,
    )
    top.addService(_Closing(outbox.close))
    # Batches go out back to back while a backlog drains: keep connections.
    webhook_pool = HTTPConnectionPool(reactor, persistent=True)
    top.addService(_Closing(webhook_pool.closeCachedConnections))
    webhook_http = HTTPClient(Agent(reactor, pool=webhook_pool))
    webhook_configs = partial(_webhooks_of, keys)
    dispatcher = WebhookDispatcher(webhook_configs, outbox, webhook_http, reactor)
    metrics.watch_webhooks(dispatcher)
    usage_report: ClusterUsage | None = None
    if config.cluster is None or cluster_count is None or quota is None:
        dispatcher.setServiceParent(top)
        emitter = WebhookEmitter(webhook_configs, outbox, reactor, on_stored=dispatcher.wake)
        emitter.setServiceParent(top)
        hub = Hub(MemoryBroker(), MemoryPresence(observer=emitter), meter, keys.app, metrics=metrics)
    else:
        # Each event is emitted by one node: the presence scripts say which
        # node made each transition, and the debounce is shared in Redis.
        emitter = WebhookEmitter(
            webhook_configs, outbox, reactor, on_stored=dispatcher.wake,
            marks=RedisMarks(cluster_count.client), sweep_seconds=SWEEP_SECONDS,
        )  # fmt: skip
        # A Redis that restarted empty forgot the marks: the outbox's come
        # back once every node had time to register its connections again.
        after_outage = BACKOFF_CAP + config.cluster.lease_seconds
        cluster_count.client.on_reconnected(lambda: emitter.recover(after_outage))
        hub = _cluster_hub(config.cluster, cluster_count, quota, meter, keys, reactor, top, metrics, emitter)
        # GET /v1/usage answers for the whole cluster: every node shares
        # its live counts in Redis, and the store adds up their flushes.
        usage_report = ClusterUsage(meter, usage_store, cluster_count.client, cluster_count.node)
        UsageShares(reactor, meter, usage_report).setServiceParent(top)
        # One node of the cluster delivers the shared outbox: the holder of
        # the delivery lease. Added after the Redis client and before the
        # hub, it stops after the hub and gives the lease up before the
        # client closes.
        delivery = Leadership(
            reactor, cluster_count.client, DELIVERY_ROLE, cluster_count.node.node_id,
            config.cluster.lease_seconds, dispatcher,
        )  # fmt: skip
        delivery.setServiceParent(top)
    hub.setServiceParent(top)
    # A suspension made while running closes the app's live connections
    # with 4012 at the key store's next re-read.
    keys.on_apps_changed(hub.close_suspended)
    # A key revoked while running closes its sessions with 4001 at the key
    # store's next re-read.
    keys.on_keys_revoked(hub.close_revoked)
    # An API call may outlive the 2 s a welcome waits: a late answer still
    # fills the cache for the next connection.
    # TURN calls are rare (credentials are cached), so no connection is kept.
    turn_http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    turn_api = TurnApiClient(turn_http, reactor, timeout=10.0, metrics=metrics)
    turn = TurnCredentialCache(turn_api, reactor)
    turn.setServiceParent(top)
    trusted = config.trusted_proxies
    factory = RealtimeServerFactory(hub, keys, reactor, turn=turn, metrics=metrics, trusted_proxies=trusted)

    v1 = V1Resource(factory, reactor, upgrades_per_minute=config.upgrade_rate_limit, trusted_proxies=trusted)
    install_rest(
        v1,
        keys=keys,
        hub=hub,
        meter=meter,
        clock=reactor,
        turn=turn_api,
        trusted_proxies=trusted,
        metrics=metrics,
        usage=usage_report,
    )
    root = build_root(v1, ready=lambda: bool(keys.running) and not factory.draining)
    registry = build_registry(metrics, reactor)
    if config.metrics.token is not None:
        root.putChild(b"metrics", MetricsResource(registry, config.metrics.token))
    log_line = partial(access_log_line, trusted_proxies=trusted)
    site = GuardedSite(
        root,
        request_timeout=config.request_timeout_seconds,
        # A plain upgrade of /v1 skips twisted.web; everything else is parsed by it.
        direct_upgrade=v1.upgrade_directly,
        requestFactory=BoundedRequest,
        logFormatter=log_line,
        reactor=reactor,
    )
    site.displayTracebacks = False
    # Every listener counts connections per client address in one table.
    capped = ConnectionCap(site, config.max_connections_per_ip, trusted, metrics=metrics)
    # Under twistd the process is the server's alone: the collector is tuned
    # for it once the stores have loaded (settle_heap), and a failed start
    # sets its exit status.
    if twistd_options is not None:
        gate = StartupGate(keys, meter, reactor, settle_heap, also=before_listening, failed=fail_the_process)
    else:
        gate = StartupGate(keys, meter, reactor, also=before_listening)
    gate.setName("listeners")
    for description in config.listen:
        Listener(description, capped, reactor, shared=config.workers > 1).setServiceParent(gate)
    if config.metrics.listen is not None and worker == 1:
        # Worker 1 alone serves the separate metrics endpoint (of its own
        # process: each worker is a node with its own counts).
        metrics_site = Site(metrics_root(MetricsResource(registry)), requestFactory=BoundedRequest)
        metrics_site.displayTracebacks = False
        metrics_site.noisy = False
        Listener(config.metrics.listen, metrics_site, reactor).setServiceParent(gate)
    gate.setServiceParent(top)
    # Added after the listeners, so it stops before them: not ready, grace,
    # drain; then the listeners close.
    ConnectionDrain(factory, reactor, config.drain_grace_seconds).setServiceParent(top)
    if pool is not None:
        gate.listening.addCallback(_start_workers, pool, len(config.listen))
        # Stopped first: every worker drains at the same time as this one.
        pool.signal_on_stop().setServiceParent(top)
    return top
