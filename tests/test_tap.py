"""
Tests for L{meteredrt.tap}: the twistd plugin, the composition root and
the order in which the server stops.
"""

from __future__ import annotations

import os

from twisted.application.service import IServiceMaker, Service
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.broker.memory import MemoryBroker
from meteredrt.broker.redis import RedisBroker
from meteredrt.hub import Hub
from meteredrt.metering import Meter
from meteredrt.presence.redis import RedisPresence
from meteredrt.tap import ConnectionDrain, Options, OrderedServices, StartupGate, makeService


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
        The stores come first and the listeners last, so that stopping in
        reverse closes the listeners first and the stores last; nothing
        listens before the service starts.
        """
        options = Options()
        data_dir = os.path.join(self.mktemp(), "data")
        options.parseOptions(["--data-dir", data_dir, "--listen", "tcp:0:interface=127.0.0.1"])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        self.assertIsInstance(service, OrderedServices)
        kinds = [type(child).__name__ for child in service]
        self.assertEqual(kinds[0], "SQLiteKeyStore")
        self.assertIsInstance(list(service)[1], Meter)
        self.assertIsInstance(list(service)[-2], ConnectionDrain)
        self.assertIsInstance(list(service)[-1], StartupGate)
        self.assertEqual(reactor.tcpServers, [])
        self.assertTrue(os.path.isdir(data_dir))
        hub = next(child for child in service if isinstance(child, Hub))
        self.assertIsInstance(hub._broker, MemoryBroker)

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

    def test_bad_redis_url(self) -> None:
        """
        A bad C{--redis} is a usage error naming the option.
        """
        error = self.assertRaises(UsageError, Options().parseOptions, ["--redis", "http://x"])
        self.assertIn("--redis", str(error))


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
