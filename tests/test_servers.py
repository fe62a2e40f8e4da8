"""
The test servers of C{tests/servers.py} do what the cluster tests rely on.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from . import servers
from .servers import LoopbackProxy, RedisCommandError, RedisServer, free_port, parse_commandstats, redis_command


class RedisServerTests(TestCase):
    """
    A real redis-server on a free port, killed, restarted empty, frozen.
    """

    timeout = 60

    async def test_start_restart_empty(self) -> None:
        """
        The server answers on its own port (never 6379), keeps data until
        it is restarted, and comes back empty on the same port.
        """
        server = await RedisServer.start(self)
        self.assertNotEqual(server.port, 6379)
        self.assertEqual(server.url, f"redis://127.0.0.1:{server.port}/0")
        self.assertEqual(await server.command("SET", "k", "v"), b"OK")
        self.assertEqual(await server.command("GET", "k"), b"v")
        self.assertEqual(await server.command("CONFIG", "GET", "save"), [b"save", b""])
        port = server.port
        await server.restart()
        self.assertEqual(server.port, port)
        self.assertIsNone(await server.command("GET", "k"))

    async def test_port_taken_before_the_bind(self) -> None:
        """
        A port found free but taken by another process before redis-server
        binds it costs another port, not the test.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        self.patch(servers, "free_port", lambda: next(ports, None) or free_port())
        server = await RedisServer.start(self)
        self.assertNotEqual(server.port, taken.getsockname()[1])
        self.assertEqual(await server.command("PING"), b"PONG")

    async def test_kill_and_stop(self) -> None:
        """
        After kill() or stop() nothing listens on the port any more.
        """
        server = await RedisServer.start(self)
        await server.kill()
        self.assertFalse(server.running)
        with self.assertRaises(ConnectionRefusedError):
            await server.command("PING")
        await server.restart()
        self.assertTrue(server.running)
        await server.stop()
        self.assertFalse(server.running)

    async def test_freeze_thaw(self) -> None:
        """
        A frozen server answers nothing until it is thawed.
        """
        server = await RedisServer.start(self)
        server.freeze()
        with self.assertRaises(TimeoutError):
            await server.command("PING", timeout=0.3)
        server.thaw()
        self.assertEqual(await server.command("PING"), b"PONG")

    async def test_error_reply_and_commandstats(self) -> None:
        """
        Error replies raise; commandstats counts calls per command.
        """
        server = await RedisServer.start(self)
        with self.assertRaises(RedisCommandError):
            await server.command("NOSUCHCOMMAND")
        before = await server.commandstats()
        await server.command("PUBLISH", "c", "x")
        await server.command("PUBLISH", "c", "y")
        after = await server.commandstats()
        self.assertEqual(after["publish"] - before.get("publish", 0), 2)

    def test_parse_commandstats(self) -> None:
        info = b"# Commandstats\r\ncmdstat_get:calls=5,usec=3,usec_per_call=0.6\r\ncmdstat_evalsha:calls=2,usec=1\r\n"
        self.assertEqual(parse_commandstats(info), {"get": 5, "evalsha": 2})


class LoopbackProxyTests(TestCase):
    """
    The proxy forwards, and cut() partitions in both of its modes.
    """

    timeout = 60

    async def test_forward_cut_restore(self) -> None:
        """
        Commands pass through; after cut() new connections are refused;
        after restore() they pass again on the same port.
        """
        server = await RedisServer.start(self)
        proxy = await LoopbackProxy.start(self, server.port)
        self.assertEqual(await redis_command(proxy.port, "PING"), b"PONG")
        port = proxy.port
        await proxy.cut()
        with self.assertRaises(ConnectionRefusedError):
            await redis_command(proxy.port, "PING", timeout=1)
        await proxy.restore()
        self.assertEqual(proxy.port, port)
        self.assertEqual(await redis_command(proxy.port, "PING"), b"PONG")
        self.assertEqual(proxy.accepted, 2)

    async def test_blackhole(self) -> None:
        """
        A blackholed proxy accepts and never answers.
        """
        server = await RedisServer.start(self)
        proxy = await LoopbackProxy.start(self, server.port)
        await proxy.cut(blackhole=True)
        with self.assertRaises(TimeoutError):
            await redis_command(proxy.port, "PING", timeout=0.3)
        await proxy.restore()
        self.assertEqual(await redis_command(proxy.port, "PING"), b"PONG")

    async def test_cut_resets_existing(self) -> None:
        """
        An open connection through the proxy is reset by cut().
        """
        server = await RedisServer.start(self)
        proxy = await LoopbackProxy.start(self, server.port)
        lost = []

        class Watch(Protocol):
            def connectionLost(self, reason: object = None) -> None:
                lost.append(reason)

        watcher = Watch()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), watcher)
        self.assertEqual(lost, [])
        await proxy.cut()
        for _ in range(40):
            if lost:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(lost), 1)

    def test_free_port_is_not_6379(self) -> None:
        self.assertNotEqual(free_port(), 6379)
