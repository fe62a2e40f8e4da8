"""
Real servers for tests that claim Redis, and a loopback proxy to cut them off.

L{RedisServer} runs a real C{redis-server} on a free loopback port (never
6379: the machine may run its own) in a temporary directory, with no
persistence (another port if someone binds the one it found free first). It
waits, without blocking the reactor, until the server answers C{PING}, and
fails the test loudly if it cannot: a test that claims Redis and
silently skips proves nothing. The test case's cleanup kills it.

L{LoopbackProxy} forwards a loopback port to another and can be cut (existing
connections dropped or frozen, new ones refused or swallowed) and restored,
to put one node on the wrong side of a partition.

Main names: L{RedisServer}, L{RedisUnavailable}, L{LoopbackProxy},
L{redis_command}, L{free_port}.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from typing import Any

import hiredis
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

#: Where Debian and others put the binary when it is not on PATH.
_REDIS_PLACES = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")

#: The port a shared Redis on this machine may use; tests never touch it.
_RESERVED_PORTS = frozenset({6379})

#: Seconds a started server has to answer PING.
START_TIMEOUT = 10.0

#: Seconds one command of L{redis_command} may take.
COMMAND_TIMEOUT = 5.0

#: Free ports L{RedisServer.start} tries: another process may bind the one
#: it found free before C{redis-server} does.
START_ATTEMPTS = 3


class RedisUnavailable(RuntimeError):
    """
    C{redis-server} is missing, or did not answer PING in time.
    """


class _PortTaken(RedisUnavailable):
    """
    C{redis-server} could not bind its port: someone else has it.
    """


class RedisCommandError(Exception):
    """
    Redis answered a command with an error reply.
    """


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago (never 6379).
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _RESERVED_PORTS:
            return port


def redis_binary() -> str:
    """
    The path of C{redis-server}, from PATH or the usual places.

    @raise RedisUnavailable: when there is none.
    """
    found = shutil.which("redis-server")
    if found is not None:
        return found
    for place in _REDIS_PLACES:
        if os.access(place, os.X_OK):
            return place
    raise RedisUnavailable(
        "redis-server was not found on PATH nor in /usr/bin, /usr/sbin, /usr/local/bin. "
        "The cluster tests need a real Redis; install it (Debian: apt-get install redis-server; "
        "CI does this in .ci/run) and run the tests again."
    )


class _OneReply(Protocol):
    """
    Send one packed command, fire with the first complete reply.
    """

    def __init__(self, packed: bytes, result: Deferred[Any]) -> None:
        self._packed = packed
        self._result = result
        self._reader = hiredis.Reader(replyError=RedisCommandError)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._packed)

    def dataReceived(self, data: bytes) -> None:
        self._reader.feed(data)
        reply = self._reader.gets()
        if reply is False or self._result.called:
            return
        assert self.transport is not None
        self.transport.loseConnection()
        if isinstance(reply, RedisCommandError):
            self._result.errback(reply)
        else:
            self._result.callback(reply)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:  # noqa: B008
        if not self._result.called:
            self._result.errback(reason)


class _OneReplyFactory(ClientFactory):
    def __init__(self, packed: bytes, result: Deferred[Any]) -> None:
        self._packed = packed
        self._result = result

    def buildProtocol(self, addr: Any) -> Protocol:
        return _OneReply(self._packed, self._result)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self._result.called:
            self._result.errback(reason)


async def redis_command(port: int, *args: str | bytes | int, timeout: float = COMMAND_TIMEOUT, reactor: Any = None) -> Any:
    """
    Run one command on a fresh connection to the Redis on C{port} and return
    its decoded reply (bytes, int, list...). For tests that look at Redis
    itself (C{INFO commandstats}, C{KEYS}, C{DEBUG SLEEP}), not for the code
    under test, which has its own client.

    @raise RedisCommandError: for an error reply.
    @raise twisted.internet.defer.TimeoutError: after C{timeout} seconds.
    """
    reactor = reactor or global_reactor
    result: Deferred[Any] = Deferred()
    connector = reactor.connectTCP(
        "127.0.0.1", port, _OneReplyFactory(hiredis.pack_command(tuple(args)), result), timeout=timeout
    )
    result.addTimeout(timeout, reactor)

    def disconnect(outcome: object) -> object:
        connector.disconnect()
        return outcome

    result.addBoth(disconnect)
    return await result


class _ServerProcess(ProcessProtocol):
    """
    Keeps a child's output and fires L{ended} when it exits.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        # Bounded: only the tail matters for a failure message.
        self.output = (self.output + data)[-64 * 1024 :]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class RedisServer:
    """
    One real C{redis-server} for one test, on a free loopback port, without
    persistence (C{--save '' --appendonly no}).

    Start it with C{await RedisServer.start(case)}; it is killed on the
    case's cleanup. L{restart} brings it back on the same port, empty, as a
    crashed and restarted Redis without persistence would be.

    @ivar port: its TCP port on 127.0.0.1.
    """

    def __init__(self, case: TestCase, directory: str, port: int, reactor: Any = None) -> None:
        self.port = port
        self._case = case
        self._directory = directory
        self._reactor = reactor or global_reactor
        self._process: Any = None
        self._protocol: _ServerProcess | None = None

    @classmethod
    async def start(cls, case: TestCase, reactor: Any = None) -> RedisServer:
        """
        Start a server for C{case} and wait until it answers PING.

        @raise RedisUnavailable: if C{redis-server} is missing or does not
            answer within L{START_TIMEOUT} seconds.
        """
        directory = os.path.abspath(case.mktemp())
        os.makedirs(directory)
        server = cls(case, directory, free_port(), reactor)
        case.addCleanup(server._cleanup)
        for _ in range(START_ATTEMPTS - 1):
            try:
                await server._launch()
                return server
            except _PortTaken:
                server.port = free_port()
        await server._launch()
        return server

    @property
    def url(self) -> str:
        """
        The C{[cluster] redis} URL of this server, database 0.
        """
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """
        The process id while it runs.
        """
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._protocol is not None and not self._protocol.ended.called

    @property
    def output(self) -> str:
        """
        What the server printed (the last 64 KiB).
        """
        return "" if self._protocol is None else self._protocol.output.decode(errors="replace")

    async def _launch(self) -> None:
        binary = redis_binary()
        self._protocol = _ServerProcess()
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._directory,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self._process = self._reactor.spawnProcess(
            self._protocol, binary, args, env={"PATH": os.environ.get("PATH", "")}, path=self._directory
        )
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        deadline = self._reactor.seconds() + START_TIMEOUT
        assert self._protocol is not None
        last: Exception | None = None
        while self._reactor.seconds() < deadline:
            if self._protocol.ended.called:
                exited = _PortTaken if "Address already in use" in self.output else RedisUnavailable
                raise exited(f"redis-server on port {self.port} exited at start:\n{self.output}")
            try:
                if await redis_command(self.port, "PING", timeout=1.0, reactor=self._reactor) == b"PONG":
                    return
            except Exception as e:
                last = e
            await deferLater(self._reactor, 0.05, lambda: None)
        raise RedisUnavailable(
            f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT}s "
            f"(last error: {last!r}):\n{self.output}"
        )

    def _signal(self, name: str | int) -> None:
        if self._process is None:
            return
        try:
            self._process.signalProcess(name)
        except ProcessExitedAlready:
            pass

    async def _ended(self) -> None:
        if self._protocol is not None:
            await self._protocol.ended

    async def stop(self) -> None:
        """
        Shut it down with SIGTERM (a clean stop) and wait until it has exited.
        """
        self._signal(signal.SIGCONT)
        self._signal("TERM")
        await self._ended()

    async def kill(self) -> None:
        """
        SIGKILL it (a crash) and wait until it has exited.
        """
        self._signal("KILL")
        await self._ended()

    async def restart(self) -> None:
        """
        Kill it if it runs, then start a new, empty server on the same port
        and wait until it answers PING.
        """
        await self.kill()
        await self._launch()

    def freeze(self) -> None:
        """
        SIGSTOP it: connections stay open and nothing is answered.
        """
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """
        SIGCONT a frozen server.
        """
        self._signal(signal.SIGCONT)

    async def command(self, *args: str | bytes | int, timeout: float = COMMAND_TIMEOUT) -> Any:
        """
        Run one command on this server (see L{redis_command}).
        """
        return await redis_command(self.port, *args, timeout=timeout, reactor=self._reactor)

    async def commandstats(self) -> dict[str, int]:
        """
        Calls per command so far (C{INFO commandstats}), by lower-case name
        (C{"publish"}, C{"evalsha"}, ...).
        """
        return parse_commandstats(await self.command("INFO", "commandstats"))

    def _cleanup(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.kill())


def parse_commandstats(info: bytes) -> dict[str, int]:
    """
    C{cmdstat_publish:calls=3,usec=...} lines to C{{"publish": 3}}.
    """
    calls: dict[str, int] = {}
    for line in info.decode().splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, fields = line[len("cmdstat_") :].partition(":")
        for field in fields.split(","):
            key, _, value = field.partition("=")
            if key == "calls":
                calls[name] = int(value)
    return calls


class _Pipe(Protocol):
    """
    One side of a proxied connection; writes what it receives to its peer.
    """

    peer: _Pipe | None = None
    frozen = False

    def __init__(self, proxy: LoopbackProxy) -> None:
        self._proxy = proxy
        self._buffer: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.frozen:
            return
        if self.peer is None or self.peer.transport is None:
            self._buffer.append(data)
        else:
            self.peer.transport.write(data)

    def attach(self, peer: _Pipe) -> None:
        self.peer = peer
        assert peer.transport is not None
        for chunk in self._buffer:
            peer.transport.write(chunk)
        self._buffer.clear()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:  # noqa: B008
        self._proxy._pipes.discard(self)
        if self.peer is not None and not self.frozen:
            self.peer.abort()


class _Downstream(_Pipe):
    """
    The proxy's connection to the target.
    """

    def __init__(self, proxy: LoopbackProxy, upstream: _Upstream) -> None:
        super().__init__(proxy)
        self.peer = upstream

    def connectionMade(self) -> None:
        self._proxy._pipes.add(self)
        assert self.peer is not None
        self.peer.attach(self)


class _Upstream(_Pipe):
    """
    A client's connection to the proxy.
    """

    def connectionMade(self) -> None:
        proxy = self._proxy
        proxy._pipes.add(self)
        proxy.accepted += 1
        if proxy.state == "blackhole":
            self.frozen = True
            return
        upstream = self

        class Connect(ClientFactory):
            def buildProtocol(self, addr: Any) -> Protocol:
                return _Downstream(proxy, upstream)

            def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
                upstream.abort()

        proxy._reactor.connectTCP("127.0.0.1", proxy.target_port, Connect(), timeout=5)


class LoopbackProxy:
    """
    A TCP proxy from a free 127.0.0.1 port to C{target_port} on 127.0.0.1,
    which a test can cut and restore.

    Start it with C{await LoopbackProxy.start(case, target_port)}; it stops
    on the case's cleanup. Point the code under test at L{port}.

    @ivar state: C{"open"}, C{"refused"} or C{"blackhole"}.
    @ivar accepted: connections accepted so far (to see reconnect attempts).
    """

    def __init__(self, target_port: int, reactor: Any = None) -> None:
        self.target_port = target_port
        self.port = 0
        self.state = "open"
        self.accepted = 0
        self._reactor = reactor or global_reactor
        self._listening: IListeningPort | None = None
        self._pipes: set[_Pipe] = set()

    @classmethod
    async def start(cls, case: TestCase, target_port: int, reactor: Any = None) -> LoopbackProxy:
        proxy = cls(target_port, reactor)
        await proxy._listen()
        case.addCleanup(proxy.close)
        return proxy

    async def _listen(self) -> None:
        factory = Factory.forProtocol(lambda: _Upstream(self))
        self._listening = self._reactor.listenTCP(self.port, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port

    def cut(self, blackhole: bool = False) -> Deferred[None]:
        """
        Partition: no byte passes any more.

        By default existing connections are reset and new ones refused
        (the listening port is closed): the client notices at once. With
        C{blackhole=True} existing connections stay open but everything
        sent on them is dropped, and new connections are accepted and never
        answered: the client notices only through its own timeouts.
        """
        if blackhole:
            self.state = "blackhole"
            for pipe in list(self._pipes):
                pipe.frozen = True
            return Deferred.fromCoroutine(_done())
        self.state = "refused"
        for pipe in list(self._pipes):
            pipe.abort()
        listening, self._listening = self._listening, None
        return Deferred.fromCoroutine(_stop(listening))

    def restore(self) -> Deferred[None]:
        """
        End the partition: new connections reach the target again. The
        connections that were blackholed are reset (bytes were lost on them,
        so their stream cannot be trusted).
        """
        self.state = "open"
        for pipe in list(self._pipes):
            if pipe.frozen:
                pipe.abort()
        if self._listening is not None:
            return Deferred.fromCoroutine(_done())
        return Deferred.fromCoroutine(self._listen())

    def close(self) -> Deferred[None]:
        """
        Stop listening and reset every connection.
        """
        self.state = "refused"
        for pipe in list(self._pipes):
            pipe.frozen = False
            pipe.abort()
        listening, self._listening = self._listening, None
        return Deferred.fromCoroutine(_stop(listening))


async def _done() -> None:
    return None


async def _stop(listening: IListeningPort | None) -> None:
    if listening is not None:
        await listening.stopListening()

