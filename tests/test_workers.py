"""
Tests for L{meteredrt.workers} and the C{workers} configuration.

The processes themselves are exercised in
C{tests/functional/test_workers.py}; here: the configuration rules, the
command line of the other workers, the shared socket and the parent watch.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any

from attrs import evolve
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.config import MAX_WORKERS, ConfigError, apply_workers, load_config
from meteredrt.tap import Options
from meteredrt.workers import (
    TWISTD,
    ParentWatch,
    ReusePortEndpoint,
    WorkerCommand,
    bound_description,
    for_worker,
    worker_node_name,
)

CLUSTER = """
[cluster]
redis = "redis://127.0.0.1:6390/0"
"""


def config_file(case: SynchronousTestCase, text: str) -> str:
    path = case.mktemp()
    with open(path, "w") as f:
        f.write(text)
    return path


class WorkersConfigTests(SynchronousTestCase):
    """
    C{[server] workers} and C{--workers}: more than one needs a cluster and
    shareable listeners.
    """

    def test_default_is_one(self) -> None:
        self.assertEqual(load_config(config_file(self, "")).workers, 1)
        self.assertEqual(apply_workers(load_config(config_file(self, "")), None).workers, 1)

    def test_file_with_cluster(self) -> None:
        config = load_config(config_file(self, "[server]\nworkers = 4\n" + CLUSTER))
        self.assertEqual(apply_workers(config, None).workers, 4)

    def test_option_overrides_file(self) -> None:
        config = load_config(config_file(self, "[server]\nworkers = 4\n" + CLUSTER))
        self.assertEqual(apply_workers(config, 2).workers, 2)
        self.assertEqual(apply_workers(config, 1).workers, 1)

    def test_needs_cluster(self) -> None:
        """
        Without [cluster] more than one worker is refused, naming the key.
        """
        path = config_file(self, "[server]\nworkers = 2\n")
        with self.assertRaises(ConfigError) as caught:
            apply_workers(load_config(path), None)
        self.assertEqual(caught.exception.where, "server.workers")
        self.assertIn("[cluster]", str(caught.exception))
        self.assertIn(path, str(caught.exception))
        with self.assertRaises(ConfigError):
            apply_workers(load_config(config_file(self, "")), 3)

    def test_only_tcp_is_shared(self) -> None:
        """
        A TLS or UNIX listener cannot be shared by workers.
        """
        for endpoint in ("ssl:8443:privateKey=k.pem", "unix:/tmp/x.sock"):
            text = f'[server]\nworkers = 2\nlisten = ["tcp:8080", "{endpoint}"]\n' + CLUSTER
            with self.assertRaises(ConfigError) as caught:
                apply_workers(load_config(config_file(self, text)), None)
            self.assertEqual(caught.exception.where, "server.listen[1]")
        text = '[server]\nworkers = 2\nlisten = ["tcp:8080", "tcp6:8080:interface=\\\\:\\\\:1"]\n' + CLUSTER
        self.assertEqual(apply_workers(load_config(config_file(self, text)), None).workers, 2)

    def test_bounds(self) -> None:
        for bad in ("0", "-1", str(MAX_WORKERS + 1), '"2"', "true"):
            with self.assertRaises(ConfigError):
                load_config(config_file(self, f"[server]\nworkers = {bad}\n" + CLUSTER))
        config = load_config(config_file(self, CLUSTER))
        for bad_option in (0, MAX_WORKERS + 1):
            with self.assertRaises(ConfigError):
                apply_workers(config, bad_option)

    def test_for_worker(self) -> None:
        """
        Each worker's configuration differs only in its node name.
        """
        config = load_config(config_file(self, '[server]\nworkers = 2\n[cluster]\nredis = "redis://127.0.0.1:1/0"\nnode_name = "ws"\n'))
        second = for_worker(config, 2)
        assert second.cluster is not None and config.cluster is not None
        self.assertEqual(second.cluster.node_name, "ws-2")
        self.assertEqual(evolve(second, cluster=config.cluster), config)
        single = load_config(config_file(self, ""))
        self.assertIs(for_worker(single, 1), single)

    def test_command_line(self) -> None:
        """
        --workers reaches the parsed configuration; a bad combination ends
        the process with one line (no traceback).
        """
        options = Options()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--workers", "2"])
        self.assertIn("[cluster]", str(caught.exception.code))
        options = Options()
        options.parseOptions(["--config", config_file(self, CLUSTER), "--workers", "3"])
        self.assertEqual(options["parsed"].workers, 3)
        self.assertIsNone(options["worker-index"])


class CommandTests(SynchronousTestCase):
    """
    What worker 1 starts the others with.
    """

    def test_argv(self) -> None:
        command = WorkerCommand(3, "conf.toml", "data", "redis://127.0.0.1:1/0")
        argv = command.argv(2, ["tcp:4321:interface=127.0.0.1"])
        self.assertEqual(argv[:6], [sys.executable, "-c", TWISTD, "--pidfile=", "-n", "meteredrt"])
        self.assertEqual(
            argv[6:],
            [
                "--config", os.path.abspath("conf.toml"),
                "--data-dir", os.path.abspath("data"),
                "--workers", "3",
                "--redis", "redis://127.0.0.1:1/0",
                "--listen", "tcp:4321:interface=127.0.0.1",
                "--worker-index", "2",
            ],
        )  # fmt: skip

    def test_argv_database(self) -> None:
        """
        A --database given to worker 1 reaches every worker, so they all
        share one store.
        """
        argv = WorkerCommand(2, None, "/d", "redis://127.0.0.1:1/0", "postgresql://u@127.0.0.1:1/db").argv(2, ["tcp:1"])
        self.assertEqual(argv[argv.index("--database") + 1], "postgresql://u@127.0.0.1:1/db")

    def test_argv_without_file_or_redis(self) -> None:
        argv = WorkerCommand(2, None, "/d").argv(2, ["tcp:1"])
        self.assertNotIn("--config", argv)
        self.assertNotIn("--redis", argv)
        self.assertNotIn("--database", argv)

    def test_names(self) -> None:
        """
        Worker i is <name>-i; without a name, host and worker 1's pid (the
        parent of the others) make the base.
        """
        self.assertEqual(worker_node_name("ws-a", 3), "ws-a-3")
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())
        self.assertEqual(worker_node_name(None, 1), f"{host}-{os.getpid()}-1")
        self.assertEqual(worker_node_name(None, 2), f"{host}-{os.getppid()}-2")


class SharedSocketTests(TestCase):
    """
    L{ReusePortEndpoint} lets two listeners in one or more processes bind
    the same port; a plain one could not.
    """

    async def test_two_bind_one_port(self) -> None:
        first = await ReusePortEndpoint(reactor, "tcp:0:interface=127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(first.stopListening)
        description = bound_description(first)
        port = first.getHost().port  # type: ignore[attr-defined]
        self.assertEqual(description, f"tcp:{port}:interface=127.0.0.1")
        second = await ReusePortEndpoint(reactor, description).listen(Factory.forProtocol(Protocol))
        self.addCleanup(second.stopListening)
        self.assertEqual(second.getHost().port, port)  # type: ignore[attr-defined]
        with socket.socket() as plain, self.assertRaises(OSError):
            plain.bind(("127.0.0.1", port))

    async def test_ipv6_description(self) -> None:
        try:
            listening = await ReusePortEndpoint(reactor, "tcp6:0:interface=\\:\\:1").listen(Factory.forProtocol(Protocol))
        except OSError:
            raise self.failureException("this test needs IPv6 loopback") from None
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port  # type: ignore[attr-defined]
        self.assertEqual(bound_description(listening), f"tcp6:{port}:interface=\\:\\:1")

    async def test_bind_failure_fails_the_deferred(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            with self.assertRaises(OSError):
                await ReusePortEndpoint(reactor, f"tcp:{port}:interface=127.0.0.1").listen(Factory())

    def test_refuses_other_endpoints(self) -> None:
        with self.assertRaises(ValueError):
            ReusePortEndpoint(reactor, "unix:/tmp/meteredrt-test.sock")


class ParentWatchTests(TestCase):
    """
    A worker notices its parent is gone when its standard input closes.
    """

    async def test_pipe_closed(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        gone: Deferred[None] = Deferred()
        watch = ParentWatch(reactor, lambda: gone.callback(None), fd=read_end)
        watch.startService()
        self.addCleanup(watch.stopService)
        self.assertFalse(gone.called)
        os.close(write_end)
        await gone.addTimeout(5, reactor)


class SharedPortsTests(SynchronousTestCase):
    """
    Worker 1 hands the others its main listeners' ports only.
    """

    def test_metrics_port_kept(self) -> None:
        """
        With a separate metrics listener (opened last by the gate), the
        other workers get the main listeners' ports, not worker 1's metrics
        port, and the callback chain still sees every port.
        """
        from meteredrt.tap import _start_workers

        started: list[list[str]] = []

        class Pool:
            def start_workers(self, ports: list[str]) -> list[str]:
                started.append(ports)
                return ports

        ports: Any = ["main-1", "main-2", "metrics"]
        self.assertEqual(_start_workers(ports, Pool(), 2), ports)  # type: ignore[arg-type]
        self.assertEqual(started, [["main-1", "main-2"]])
