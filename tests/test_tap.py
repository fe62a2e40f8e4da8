"""
Tests for L{meteredrt.tap}: the twistd plugin, the composition root and
the order in which the server stops.
"""

from __future__ import annotations

import gc
import os
import stat
import sys
from io import StringIO
from typing import Any

from twisted.application.service import IServiceMaker, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from meteredrt.apps import App, Key, KeyType
from meteredrt.broker.memory import MemoryBroker
from meteredrt.broker.redis import RedisBroker
from meteredrt.hub import Hub
from meteredrt.leadership import Leadership
from meteredrt.metering import Meter
from meteredrt.presence.redis import RedisPresence
from meteredrt.redisclient import BACKOFF_CAP, RedisClient
from meteredrt.site import V1Resource, build_root
from meteredrt.store.dialect import POSTGRESQL
from meteredrt.store.webhooks import StoreOutbox
from meteredrt.tap import (
    DEFAULT_BACKLOG,
    FIRST_KEYS_FILE,
    FULL_COLLECTION_THRESHOLDS,
    ConnectionDrain,
    Listener,
    Options,
    OrderedServices,
    StartupError,
    StartupGate,
    bootstrap_text,
    fail_the_process,
    makeService,
    settle_heap,
    show_bootstrap,
    with_default_backlog,
)
from meteredrt.webhooks.dispatcher import DELIVERY_ROLE, WebhookDispatcher
from meteredrt.webhooks.emitter import WebhookEmitter
from meteredrt.webhooks.redismarks import RedisMarks
from tests.test_site import UPGRADE_HEADERS, RawClient, connect_to_site
from tests.test_ws import WebSocketTestCase


class PluginTests(SynchronousTestCase):
    """
    C{twistd meteredrt} finds the plugin.
    """

    def test_plugin_found(self) -> None:
        """
        The dropin exposes a service maker named meteredrt whose options
        are L{meteredrt.tap.Options}.
        """
        [maker] = [m for m in getPlugins(IServiceMaker) if m.tapname == "meteredrt"]
        self.assertIsInstance(maker.options(), Options)


class MakeServiceTests(SynchronousTestCase):
    """
    L{makeService} composes the server without starting anything.
    """

    def test_composition(self) -> None:
        """
        The data directory and the stores come first, then the listeners,
        then the drain, so that stopping in reverse drains first, then
        closes the listeners, and closes the stores last; nothing listens
        and nothing is created on disk before the service starts.
        """
        options = Options()
        data_dir = os.path.join(self.mktemp(), "data")
        options.parseOptions(["--data-dir", data_dir, "--listen", "tcp:0:interface=127.0.0.1"])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        self.assertIsInstance(service, OrderedServices)
        kinds = [type(child).__name__ for child in service]
        self.assertEqual(kinds[:2], ["DataDirectory", "KeyStore"])
        self.assertIsInstance(list(service)[2], Meter)
        self.assertIsInstance(list(service)[-2], StartupGate)
        self.assertIsInstance(list(service)[-1], ConnectionDrain)
        self.assertEqual(reactor.tcpServers, [])
        self.assertFalse(os.path.exists(data_dir))
        hub = next(child for child in service if isinstance(child, Hub))
        self.assertIsInstance(hub._broker, MemoryBroker)
        # The webhook services stop after the hub, so the lefts and
        # offlines of draining connections are still stored and sent.
        self.assertLess(kinds.index("WebhookDispatcher"), kinds.index("Hub"))
        self.assertLess(kinds.index("WebhookEmitter"), kinds.index("Hub"))

    def test_cluster(self) -> None:
        """
        With C{--redis}, the hub routes and keeps presence through Redis,
        and the node's Redis connections and lease come before the hub, so
        they stop after the connections have drained.
        """
        options = Options()
        data_dir = os.path.join(self.mktemp(), "data")
        options.parseOptions(["--data-dir", data_dir, "--redis", "redis://127.0.0.1:1/0"])
        service = makeService(options, MemoryReactorClock())
        kinds = [type(child).__name__ for child in service]
        self.assertLess(kinds.index("RedisClient"), kinds.index("Hub"))
        self.assertLess(kinds.index("RedisSubscriber"), kinds.index("Hub"))
        self.assertLess(kinds.index("NodeLease"), kinds.index("Hub"))
        hub = next(child for child in service if isinstance(child, Hub))
        self.assertIsInstance(hub._broker, RedisBroker)
        self.assertIsInstance(hub._presence, RedisPresence)
        # The dispatcher runs only while this node holds the delivery
        # lease: started by the lease, never by the node's start. The lease
        # stops after the hub and gives itself up before Redis closes.
        self.assertNotIn("WebhookDispatcher", kinds)
        delivery = next(child for child in service if isinstance(child, Leadership))
        self.assertIsInstance(delivery._service, WebhookDispatcher)
        self.assertEqual(delivery.role, DELIVERY_ROLE)
        self.assertLess(kinds.index("RedisClient"), kinds.index("Leadership"))
        self.assertLess(kinds.index("Leadership"), kinds.index("Hub"))
        # Every node emits, over marks shared in Redis, the transitions its
        # presence steps make; its emitter stops after the hub drained and
        # before the Redis connection its marks need.
        emitter = next(child for child in service if isinstance(child, WebhookEmitter))
        self.assertIs(hub._presence._observer, emitter)
        self.assertIsInstance(emitter._marks, RedisMarks)
        self.assertLess(kinds.index("RedisClient"), kinds.index("WebhookEmitter"))
        self.assertLess(kinds.index("WebhookEmitter"), kinds.index("Hub"))
        # When the Redis connection comes back (Redis may have restarted
        # empty), the outbox's marks are handed to the marks again, once
        # every node had time to register its connections again.
        recovered: list[float] = []
        emitter.recover = recovered.append  # type: ignore[assignment, method-assign]
        client = next(child for child in service if isinstance(child, RedisClient))
        for hook in client._hooks:
            hook()
        self.flushLoggedErrors()
        self.assertEqual(recovered, [BACKOFF_CAP + 5.0])

    def test_cluster_on_own_sqlite_warns(self) -> None:
        """
        A cluster node keeping its store in its own SQLite files is told,
        once, that keys made with the CLI and usage do not reach the other
        nodes; with the store in PostgreSQL, and on one node, nothing is said.
        """

        def warnings(*args: str) -> list[str]:
            observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            options = Options()
            options.parseOptions(["--data-dir", self.mktemp(), *args])
            makeService(options, MemoryReactorClock())
            return [formatEvent(e) for e in observed if e["log_level"] == LogLevel.warn]

        [warning] = warnings("--redis", "redis://127.0.0.1:1/0")
        self.assertIn("[storage] database", warning)
        self.assertIn("SQLite", warning)
        shared = ["--redis", "redis://127.0.0.1:1/0", "--database", "postgresql://meteredrt@127.0.0.1:1/meteredrt"]
        self.assertEqual(warnings(*shared), [])
        self.assertEqual(warnings(), [])

    def test_cluster_outbox_in_postgresql(self) -> None:
        """
        With the store in PostgreSQL, every node's webhook outbox is the
        shared database's.
        """
        options = Options()
        options.parseOptions(
            ["--data-dir", self.mktemp(), "--redis", "redis://127.0.0.1:1/0",
             "--database", "postgresql://meteredrt@127.0.0.1:1/meteredrt"]
        )  # fmt: skip
        service = makeService(options, MemoryReactorClock())
        delivery = next(child for child in service if isinstance(child, Leadership))
        outbox = delivery._service._outbox
        self.assertIsInstance(outbox, StoreOutbox)
        self.assertIs(outbox._dialect, POSTGRESQL)

    def test_bad_redis_url(self) -> None:
        """
        A bad C{--redis} ends the process with one line naming the option.
        """
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--redis", "http://x"])
        self.assertIn("--redis", str(error.code))

    def test_database_option(self) -> None:
        """
        C{--database} puts apps, keys and usage in PostgreSQL; a URL that is
        not one ends the process with one line naming the option.
        """
        options = Options()
        url = "postgresql://meteredrt@127.0.0.1:1/meteredrt"
        options.parseOptions(["--database", url])
        self.assertEqual(options["parsed"].database, url)
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--database", "redis://x/0"])
        self.assertIn("meteredrt: ", str(error.code))

    def test_database_without_driver(self) -> None:
        """
        Without psycopg2 installed, a PostgreSQL URL ends the process with
        one line that says what to install.
        """
        hide_module(self, "psycopg2")
        error = self.assertRaises(
            SystemExit, Options().parseOptions, ["--database", "postgresql://u@127.0.0.1:1/db"]
        )
        self.assertIn("meteredrt[postgresql]", str(error.code))


def hide_module(case: SynchronousTestCase, name: str) -> None:
    """
    Make C{import name} fail with L{ImportError} until the test ends, as
    when the package is not installed.
    """
    saved = sys.modules.get(name)
    sys.modules[name] = None  # type: ignore[assignment]

    def restore() -> None:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved

    case.addCleanup(restore)


class _Recorder(Service):
    """
    A child whose stop is a Deferred the test fires by hand.
    """

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self._log = log
        self.stopping: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._log.append(f"stop {self.name}")
        return self.stopping


class OrderedServicesTests(SynchronousTestCase):
    """
    L{OrderedServices} stops its children one at a time, last first.
    """

    def test_one_after_the_other(self) -> None:
        """
        A child starts stopping only when the one added after it has
        finished; the whole stop fires after the first child's.
        """
        log: list[str] = []
        top = OrderedServices()
        first, second, third = (_Recorder(name, log) for name in ("stores", "meter", "listeners"))
        for child in (first, second, third):
            child.setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        self.assertEqual(log, ["stop listeners"])
        third.stopping.callback(None)
        self.assertEqual(log, ["stop listeners", "stop meter"])
        second.stopping.callback(None)
        self.assertEqual(log, ["stop listeners", "stop meter", "stop stores"])
        self.assertNoResult(stopped)
        first.stopping.callback(None)
        self.successResultOf(stopped)

    def test_failure_does_not_stop_the_rest(self) -> None:
        """
        A child whose stop fails is logged and the next one still stops.
        """
        log: list[str] = []
        top = OrderedServices()
        first, second = _Recorder("stores", log), _Recorder("meter", log)
        first.setServiceParent(top)
        second.setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        second.stopping.errback(RuntimeError("flush failed"))
        first.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(log, ["stop meter", "stop stores"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class OptionsTests(SynchronousTestCase):
    """
    L{Options} refuses a bad configuration with one line, before anything
    is created.
    """

    def parse_failure(self, *argv: str) -> str:
        """
        Parse C{argv}, expecting the process to be told to exit; return the
        message it would print.
        """
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(list(argv))
        return str(caught.exception.code)

    def test_bad_endpoint_on_command_line(self) -> None:
        """
        An endpoint string that does not parse names the option.
        """
        message = self.parse_failure("--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0:backlog=x")
        self.assertTrue(message.startswith("meteredrt: <command line>: --listen[1]: not a usable endpoint"), message)

    def test_bad_endpoint_in_file(self) -> None:
        """
        An endpoint string in the file names the file and the key.
        """
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write('[server]\nlisten = ["nope:1"]\n')
        message = self.parse_failure("--config", path)
        self.assertEqual(
            message, f"meteredrt: {path}: server.listen[0]: not a usable endpoint 'nope:1': Unknown endpoint type: 'nope'"
        )

    def test_missing_certificate(self) -> None:
        """
        A TLS endpoint whose key file is missing is refused while parsing.
        """
        message = self.parse_failure("--listen", "ssl:0:privateKey=/nonexistent/key.pem")
        self.assertIn("--listen[0]: not a usable endpoint", message)

    def test_good_options(self) -> None:
        """
        Valid options give the parsed configuration.
        """
        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--listen", "unix:/tmp/x.sock"])
        self.assertEqual(options["parsed"].listen, ("tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock"))


class ListenerTests(SynchronousTestCase):
    """
    L{Listener} binds at start and accepts only when told to.
    """

    def test_refused_at_once(self) -> None:
        """
        An endpoint that refuses while binding raises a L{StartupError}
        naming the endpoint and the reason, and logs it.
        """
        reactor = MemoryReactorClock()

        def refuse(*args: object, **kwargs: object) -> None:
            raise CannotListenError("127.0.0.1", 80, PermissionError(13, "Permission denied"))

        reactor.listenTCP = refuse  # type: ignore[method-assign]
        listener = Listener("tcp:80:interface=127.0.0.1", Factory(), reactor)
        observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        with self.assertRaises(StartupError) as caught:
            listener.privilegedStartService()
        self.assertEqual(str(caught.exception), "cannot listen on tcp:80:interface=127.0.0.1: Permission denied")
        self.assertEqual([e["log_level"] for e in observed], [LogLevel.critical])

    def test_binds_once(self) -> None:
        """
        Binding in C{privilegedStartService} is not repeated by
        C{startService}; accepting fires with the port.
        """
        reactor = MemoryReactorClock()
        listener = Listener("tcp:0:interface=127.0.0.1", Factory(), reactor)
        listener.privilegedStartService()
        listener.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        port = self.successResultOf(Deferred.fromCoroutine(listener.accept()))
        self.assertEqual(port.getHost().port, 0)
        self.successResultOf(maybeDeferred(listener.stopService))


    def test_default_backlog(self) -> None:
        """
        A TCP listener whose endpoint string sets no backlog queues
        L{DEFAULT_BACKLOG} connections (Twisted's own default, 50, drops the
        SYNs of a connect burst); one that sets a backlog keeps it.
        """
        reactor = MemoryReactorClock()
        for description, backlog in [
            ("tcp:0:interface=127.0.0.1", DEFAULT_BACKLOG),
            ("tcp:0:interface=127.0.0.1:backlog=7", 7),
        ]:
            Listener(description, Factory(), reactor).privilegedStartService()
            self.assertEqual(reactor.tcpServers[-1][2], backlog, description)
        self.assertEqual(DEFAULT_BACKLOG, 1024)

    def test_with_default_backlog(self) -> None:
        """
        The default goes to TCP, TLS and UNIX endpoint strings without a
        backlog, and nowhere else.
        """
        for description, expected in [
            ("tcp:8080", "tcp:8080:backlog=1024"),
            ("TCP6:8080:interface=\\:\\:1", "TCP6:8080:interface=\\:\\:1:backlog=1024"),
            ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem:backlog=1024"),
            ("unix:/run/m.sock", "unix:/run/m.sock:backlog=1024"),
            ("tcp:8080:backlog=10", "tcp:8080:backlog=10"),
            ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ]:
            self.assertEqual(with_default_backlog(description), expected)


class _Loading:
    """
    A key store or meter that has not loaded yet: C{ready} and C{loaded}
    fire when the test says.
    """

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.loaded: Deferred[None] = Deferred()


class StartupGateTests(SynchronousTestCase):
    """
    L{StartupGate} tells once that start-up has settled: after the stores
    have loaded, before anyone is accepted.
    """

    def test_settled_before_accepting(self) -> None:
        """
        C{settled} runs once both stores have loaded and before the
        listeners accept.
        """
        reactor = MemoryReactorClock()
        keys, meter = _Loading(), _Loading()
        seen: list[str] = []
        listener = Listener("tcp:0:interface=127.0.0.1", Factory(), reactor)
        accept = listener.accept

        async def accepting() -> Any:
            seen.append("accept")
            return await accept()

        listener.accept = accepting  # type: ignore[method-assign]
        gate = StartupGate(keys, meter, reactor, lambda: seen.append("settled"))  # type: ignore[arg-type]
        listener.setServiceParent(gate)
        gate.startService()
        self.assertEqual(seen, [])
        keys.ready.callback(None)
        self.assertEqual(seen, [])
        meter.loaded.callback(None)
        self.assertEqual(seen, ["settled", "accept"])
        self.assertEqual(len(self.successResultOf(gate.listening)), 1)
        self.successResultOf(maybeDeferred(gate.stopService))

    def test_cluster_waits_for_redis(self) -> None:
        """
        A cluster node accepts nobody before its Redis connection is up:
        until then every capped admission, subscribe and send would fail
        (1011), while a closed port sends clients (and load balancers) to
        the other nodes. Without a cluster nothing is awaited but the stores.
        """
        reactor = MemoryReactorClock()
        keys, meter = _Loading(), _Loading()
        redis_up: Deferred[None] = Deferred()
        listener = Listener("tcp:0:interface=127.0.0.1", Factory(), reactor)
        gate = StartupGate(keys, meter, reactor, also=[redis_up])  # type: ignore[arg-type]
        listener.setServiceParent(gate)
        gate.startService()
        keys.ready.callback(None)
        meter.loaded.callback(None)
        self.assertNoResult(gate.listening)
        redis_up.callback(None)
        self.assertEqual(len(self.successResultOf(gate.listening)), 1)
        self.successResultOf(maybeDeferred(gate.stopService))

    def test_cluster_composition_waits_for_redis(self) -> None:
        """
        L{makeService} gives a cluster node's gate the Redis client's first
        connection to wait for, and a single node's nothing.
        """
        options = Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--redis", "redis://127.0.0.1:1/0"])
        service = makeService(options, MemoryReactorClock())
        gate = service.getServiceNamed("listeners")
        [waiting] = gate._also
        self.assertNoResult(waiting)
        client = next(child for child in service if isinstance(child, RedisClient))
        client.ready.callback(None)
        self.successResultOf(waiting)
        options = Options()
        options.parseOptions(["--data-dir", self.mktemp()])
        self.assertEqual(makeService(options, MemoryReactorClock()).getServiceNamed("listeners")._also, [])

    def test_process_owned_under_twistd(self) -> None:
        """
        L{makeService} run by twistd (options with a parent) settles the
        heap when the gate settles, and a failed start ends the process
        with status 1 (L{fail_the_process}); run in process it does
        neither: the heap and the interpreter's exit are not its own.
        """
        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.mktemp()])
        gate = makeService(options).getServiceNamed("listeners")
        self.assertIsNot(gate._settled, settle_heap)
        self.assertIsNot(gate._report_failure, fail_the_process)
        options.parent = {}  # type: ignore[attr-defined]
        gate = makeService(options).getServiceNamed("listeners")
        self.assertIs(gate._settled, settle_heap)
        self.assertIs(gate._report_failure, fail_the_process)

    def test_failure_reported_in_one_line(self) -> None:
        """
        A store that cannot load stops the reactor and is reported once, in
        one line, whatever the driver's message spans; a L{StartupError}
        is reported as it is.
        """
        for error, problem in [
            (RuntimeError("connection refused\n\tIs the server running?"), "could not start: connection refused"),
            (StartupError("cannot listen on tcp:1"), "cannot listen on tcp:1"),
        ]:
            reactor = MemoryReactorClock()
            reactor.running = True
            keys, meter = _Loading(), _Loading()
            reported: list[str] = []
            gate = StartupGate(keys, meter, reactor, failed=reported.append)  # type: ignore[arg-type]
            Listener("tcp:0:interface=127.0.0.1", Factory(), reactor).setServiceParent(gate)
            gate.startService()
            keys.ready.errback(error)
            self.assertEqual(reported, [problem])
            self.assertTrue(reactor.hasStopped)
            self.flushLoggedErrors(RuntimeError)

    def test_no_report_when_stopped_while_starting(self) -> None:
        """
        A stop (SIGTERM) while the stores load is no failure: nothing is
        reported and the exit status stays 0.
        """
        reactor = MemoryReactorClock()
        keys, meter = _Loading(), _Loading()
        reported: list[str] = []
        gate = StartupGate(keys, meter, reactor, failed=reported.append)  # type: ignore[arg-type]
        Listener("tcp:0:interface=127.0.0.1", Factory(), reactor).setServiceParent(gate)
        gate.startService()
        self.successResultOf(maybeDeferred(gate.stopService))
        keys.ready.callback(None)
        meter.loaded.callback(None)
        self.assertEqual(reported, [])
        self.assertFalse(reactor.hasStopped)

    def test_settle_heap(self) -> None:
        """
        L{settle_heap} freezes the heap as it is and makes full collections
        ten times rarer, leaving young collections as they were.
        """
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)
        frozen = gc.get_freeze_count()
        settle_heap()
        self.assertGreater(gc.get_freeze_count(), frozen)
        self.assertEqual(gc.get_threshold(), FULL_COLLECTION_THRESHOLDS)


class ShowBootstrapTests(SynchronousTestCase):
    """
    L{show_bootstrap} shows the first keys on the terminal and in a private
    file, and logs only the file's path.
    """

    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.app = App(app_id="default")
        self.keys = (
            Key(key_id="sk_id_x", app_id="default", type=KeyType.SECRET, secret="sk_secret_shh", channel_patterns=("**",), actions=frozenset()),
            Key(key_id="pk_live_x", app_id="default", type=KeyType.PUBLISHABLE, channel_patterns=("**",), actions=frozenset()),
        )
        self.observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def logged_text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.observed)

    def test_file_and_terminal(self) -> None:
        """
        The file is mode 0600 even if one with a wider mode was there; the
        terminal gets the keys and the path; the log never the secret.
        """
        path = os.path.join(self.data_dir, FIRST_KEYS_FILE)
        with open(path, "w") as f:
            f.write("old")
        os.chmod(path, 0o644)
        out = StringIO()
        show_bootstrap(self.data_dir, self.app, self.keys, out)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read(), bootstrap_text(self.app, self.keys))
        self.assertIn("sk_secret_shh", out.getvalue())
        self.assertIn(os.path.abspath(path), out.getvalue())
        self.assertIn(os.path.abspath(path), self.logged_text())
        self.assertNotIn("sk_secret_shh", self.logged_text())

    def test_symlink_not_followed(self) -> None:
        """
        A symbolic link in the file's place is not written through; the
        keys still reach the terminal and the failure is logged.
        """
        target = os.path.join(self.data_dir, "elsewhere")
        os.symlink(target, os.path.join(self.data_dir, FIRST_KEYS_FILE))
        out = StringIO()
        show_bootstrap(self.data_dir, self.app, self.keys, out)
        self.assertFalse(os.path.exists(target))
        self.assertIn("sk_secret_shh", out.getvalue())
        self.assertEqual([e["log_level"] for e in self.observed], [LogLevel.error])
        self.assertNotIn("sk_secret_shh", self.logged_text())


class DrainGraceTests(WebSocketTestCase):
    """
    L{ConnectionDrain}: not ready at once, drain after the grace.
    """

    def setUp(self) -> None:
        super().setUp()
        self.site = Site(
            build_root(V1Resource(self.factory, self.clock), lambda: not self.factory.draining), reactor=Clock()
        )
        self.drain = ConnectionDrain(self.factory, self.clock, grace=5.0)
        self.drain.startService()

    def http(self, path: bytes, headers: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """
        Send one GET to the site and return the response.
        """
        client = RawClient(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
        connect_to_site(self.site, client, self.clock)
        return client.response()

    def test_not_ready_during_grace(self) -> None:
        """
        From the moment the drain starts, /readyz answers 503 and upgrades
        are refused with 503, while /healthz and live connections carry on
        until the grace is over; then connections get C{going_away} and
        close 1001, and the stop fires.
        """
        self.assertEqual(self.http(b"/readyz")[0], 200)
        client, _, pump = self.open_token("alice")
        pump.flush()
        stopped = self.drain.stopService()

        self.assertEqual(self.http(b"/readyz")[0], 503)
        self.assertEqual(self.http(b"/healthz")[0], 200)
        status, headers, _ = self.http(b"/v1?key=pk_live_test", UPGRADE_HEADERS)
        self.assertEqual((status, headers.get("retry-after")), (503, "1"))
        client.send_json({"type": "ping"})
        self.advance(4.9, pump, step=0.1)
        self.assertEqual([f["type"] for f in client.received], ["welcome", "pong"])
        self.assertNoResult(stopped)

        self.advance(0.2, pump, step=0.1)
        self.assertEqual(client.received[-1]["type"], "going_away")
        self.advance(0.5, pump, step=0.1)
        self.assertClosed(client, 1001)
        self.successResultOf(stopped)
        self.assertEqual(self.http(b"/readyz")[0], 503)
        self.assertNoTimers()

    def test_no_grace(self) -> None:
        """
        With a grace of 0 the drain starts at once.
        """
        drain = ConnectionDrain(self.factory, self.clock, grace=0)
        drain.startService()
        self.successResultOf(drain.stopService())
        self.assertTrue(self.factory.draining)
        self.assertNoTimers()
