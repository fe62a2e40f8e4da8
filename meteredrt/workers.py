"""
Several processes serving one port: C{[server] workers = N}.

One Python process uses one core. With C{workers = N} the process started by
C{twistd -n meteredrt} (worker 1) listens as usual and, once it listens,
starts N-1 more copies of itself (workers 2..N) with the same configuration
file, data directory and Redis URL. Every worker binds the same TCP ports
with C{SO_REUSEPORT} (L{ReusePortEndpoint}), so the kernel spreads new
connections over the workers by a hash of the client's address and port.
Each worker is a full cluster node with its own node name (C{<name>-<i>}):
they share channels, presence and directs only through Redis, which is why
workers need C{[cluster]}.

Lifecycle: SIGTERM (or SIGINT) to worker 1 drains every worker — it passes
SIGTERM on to the others, drains its own connections meanwhile, and exits
once all have exited (L{WorkerPool}). A worker that dies on its own is not
restarted: its listening socket closes with it, so new connections go to the
others, and the cluster reaps its presence within three leases like any
crashed node. If worker 1 itself dies, the others see their standard input
close and drain (L{ParentWatch}).

Only C{tcp:} and C{tcp6:} endpoints can be shared this way; TLS is left to a
proxy in front (see C{docs/cluster.md}).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from attrs import evolve, frozen
from twisted.application.service import Service
from twisted.internet import abstract, endpoints
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from meteredrt.config import Config

#: Seconds worker 1 waits for the others to drain before it kills them;
#: above the connection drain's own 10 s bound.
STOP_TIMEOUT = 20.0

#: How twistd is started for workers 2..N (its console script has no
#: C{__main__} module to run with C{-m}).
TWISTD = "from twisted.scripts.twistd import run; run()"


def worker_node_name(base: str | None, index: int) -> str:
    """
    The cluster node name of worker C{index} (from 1): C{<base>-<index>},
    where C{base} is the configured node name or, by default, the host name
    and worker 1's process id (the parent of the others).
    """
    if base is None:
        parent = os.getpid() if index == 1 else os.getppid()
        # Reduced to the characters node names may hold, with room for -<i>.
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{parent}")[:60]
    return f"{base}-{index}"


def for_worker(config: Config, index: int) -> Config:
    """
    The configuration of worker C{index}: the same, with its own node name.
    """
    if config.cluster is None:
        return config
    return evolve(config, cluster=evolve(config.cluster, node_name=worker_node_name(config.cluster.node_name, index)))


class ReusePortEndpoint:
    """
    A TCP server endpoint whose socket has C{SO_REUSEPORT} set, so that
    other processes of the same user can bind the same address and port and
    the kernel balances new connections between them.

    It takes the port, interface and backlog of a C{tcp:}/C{tcp6:} endpoint
    string (parsed by Twisted itself), binds a socket of its own and hands it
    to the reactor with C{adoptStreamPort}.
    """

    def __init__(self, reactor: Any, description: str) -> None:
        endpoint = endpoints.serverFromString(reactor, description)
        if not isinstance(endpoint, endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint):
            raise ValueError(f"only tcp: and tcp6: endpoints can be shared by workers, not {description!r}")
        self._reactor = reactor
        # Twisted's TCP endpoints keep what they parsed in these attributes.
        self._port: int = endpoint._port
        self._backlog: int = endpoint._backlog
        self._family = socket.AF_INET6 if isinstance(endpoint, endpoints.TCP6ServerEndpoint) else socket.AF_INET
        self._interface: str = endpoint._interface or ("::" if self._family == socket.AF_INET6 else "")

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        try:
            return succeed(self._listen(factory))
        except Exception:
            return fail()

    def _listen(self, factory: Any) -> IListeningPort:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            # The reactor keeps its own duplicate of the descriptor.
            port: IListeningPort = self._reactor.adoptStreamPort(sock.fileno(), self._family, factory)
        finally:
            sock.close()
        return port


@frozen
class WorkerCommand:
    """
    What worker 1 needs to start the others: the configuration file and
    data directory it runs with, the Redis and database URLs given on its
    command line (if any), and the worker count.
    """

    workers: int
    config_path: str | None
    data_dir: str
    redis: str | None = None
    database: str | None = None

    def argv(self, index: int, listen: Sequence[str]) -> list[str]:
        """
        The command line of worker C{index}, listening on C{listen} (the
        ports worker 1 actually bound, so C{tcp:0} works).
        """
        args = [sys.executable, "-c", TWISTD, "--pidfile=", "-n", "meteredrt"]
        if self.config_path is not None:
            args += ["--config", os.path.abspath(self.config_path)]
        args += ["--data-dir", os.path.abspath(self.data_dir), "--workers", str(self.workers)]
        if self.redis is not None:
            args += ["--redis", self.redis]
        if self.database is not None:
            args += ["--database", self.database]
        for description in listen:
            args += ["--listen", description]
        args += ["--worker-index", str(index)]
        return args


def bound_description(port: IListeningPort) -> str:
    """
    A C{tcp:}/C{tcp6:} endpoint string for the address a port is bound to,
    with the real port number where the configuration said 0.
    """
    host = port.getHost()
    address, number = host.host, host.port  # type: ignore[attr-defined]
    if ":" in address:
        return "tcp6:%d:interface=%s" % (number, address.replace(":", "\\:"))
    return "tcp:%d:interface=%s" % (number, address)


class _WorkerProcess(ProcessProtocol):
    """
    Worker 1's view of one other worker: fires L{ended} when it exits.
    """

    log = Logger()

    def __init__(self, index: int, on_exit: Callable[[int, Failure], None]) -> None:
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._on_exit = on_exit

    def processEnded(self, reason: Failure) -> None:
        self._on_exit(self.index, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Worker 1's service that runs workers 2..N.

    L{start_workers} starts them once worker 1 listens. Stopping is in two
    steps, so that every worker drains at the same time: the service from
    L{signal_on_stop} (stopped first) sends each SIGTERM, and this one
    (stopped last) fires when all have exited, killing those still running
    after L{STOP_TIMEOUT} seconds.

    Each worker's standard output and error are worker 1's, so one log shows
    all; its standard input is a pipe from worker 1 that only closes when
    worker 1 dies (see L{ParentWatch}).
    """

    log = Logger()

    def __init__(self, command: WorkerCommand, reactor: Any) -> None:
        self._command = command
        self._reactor = reactor
        self._processes: dict[int, Any] = {}
        self._protocols: dict[int, _WorkerProcess] = {}
        self._stopping = False

    @property
    def pids(self) -> dict[int, int]:
        """
        The process id of each running worker (2..N) by index.
        """
        return {i: p.pid for i, p in self._processes.items() if p.pid is not None}

    def start_workers(self, ports: list[IListeningPort]) -> list[IListeningPort]:
        """
        Start workers 2..N on the addresses of worker 1's bound C{ports};
        returns C{ports}, to sit in a callback chain.
        """
        if self._stopping:
            return ports
        listen = [bound_description(port) for port in ports]
        for index in range(2, self._command.workers + 1):
            protocol = _WorkerProcess(index, self._exited)
            argv = self._command.argv(index, listen)
            self._processes[index] = self._reactor.spawnProcess(
                protocol, argv[0], argv, env=dict(os.environ), path=os.getcwd(), childFDs={0: "w", 1: 1, 2: 2}
            )
            self._protocols[index] = protocol
            self.log.info("meteredrt started worker {index} (pid {pid})", index=index, pid=self._processes[index].pid)
        return ports

    def _exited(self, index: int, reason: Failure) -> None:
        self._processes.pop(index, None)
        if not self._stopping:
            self.log.error(
                "meteredrt worker {index} exited on its own ({why}); the others serve its port and the "
                "cluster reaps its connections; restart the server to run it again",
                index=index,
                why=reason.getErrorMessage(),
            )

    def _signal_all(self, signal: str) -> None:
        for process in list(self._processes.values()):
            try:
                process.signalProcess(signal)
            except ProcessExitedAlready:
                pass

    def signal_stop(self) -> None:
        """
        Send SIGTERM to every other worker, once: each drains its
        connections (a second SIGTERM would not stop it any sooner).
        """
        if self._stopping:
            return
        self._stopping = True
        self._signal_all("TERM")

    def signal_on_stop(self) -> Service:
        """
        A service that calls L{signal_stop} when it stops: add it after the
        listeners so it stops first.
        """
        return _StopSignal(self)

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        self.signal_stop()
        pending = [p.ended for p in self._protocols.values() if not p.ended.called]
        if not pending:
            return None
        killer = self._reactor.callLater(STOP_TIMEOUT, self._signal_all, "KILL")

        def done(result: object) -> object:
            if killer.active():
                killer.cancel()
            return result

        return DeferredList(pending).addBoth(done)


class _StopSignal(Service):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def stopService(self) -> None:
        super().stopService()
        self._pool.signal_stop()


class _StandardInput(abstract.FileDescriptor):
    def __init__(self, reactor: Any, on_closed: Callable[[], object], fd: int) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._on_closed = on_closed

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return Failure(e)
        # The pipe never carries data; the end of it is what matters.
        return None if data else CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        # Also reached without doRead: epoll reports a closed pipe as a
        # hang-up, which the reactor hands straight to connectionLost.
        super().connectionLost(reason)
        self._on_closed()


class ParentWatch(Service):
    """
    In workers 2..N: watch standard input, a pipe from worker 1 that never
    carries data, and call C{on_parent_gone} once it closes — worker 1 has
    died without stopping this worker, which must then drain and stop on
    its own.
    """

    def __init__(self, reactor: Any, on_parent_gone: Callable[[], object], fd: int = 0) -> None:
        self._input = _StandardInput(reactor, on_parent_gone, fd)
        self._fd = fd

    def startService(self) -> None:
        super().startService()
        os.set_blocking(self._fd, False)
        self._input.startReading()

    def stopService(self) -> None:
        super().stopService()
        self._input.stopReading()
