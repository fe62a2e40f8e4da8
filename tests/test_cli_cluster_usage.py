"""
Tests for C{meteredrt usage} on a cluster node's configuration: the stored
figures plus what only the cluster's Redis knows (the connections open on
every node now and the sampled peak), read from a real C{redis-server}.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from meteredrt.cli import main
from meteredrt.redisclient import RedisClient, parse_redis_url
from tests.servers import RedisServer, free_port
from tests.test_cli import NOW

# NOW (2023-11-14T22:13:20Z) lies in November 2023.
NOVEMBER = 1_698_796_800


class ClusterUsageCommandTests(TestCase):
    """
    C{meteredrt usage --app APP} with a C{[cluster]} table.
    """

    async def start_redis(self, db: int = 0, password: str | None = None) -> tuple[RedisServer, RedisClient]:
        """
        A Redis holding two live nodes' shares of app C{shop} (2 and 3
        connections), a dead node's (5), and a sampled peak of 9, in C{db}.
        """
        server = await RedisServer.start(self)
        client = RedisClient(reactor, parse_redis_url(f"redis://127.0.0.1:{server.port}/{db}"), timeout=2.0)
        client.startService()
        self.addCleanup(client.stopService)
        await client.ready
        for node in ("one.a", "two.b"):
            await client.execute("SET", f"mrt:lease:{node}", "1", "PX", 60_000)
        await client.execute("HSET", "mrt:shop:live", "one.a", 2, "two.b", 3, "dead.c", 5)
        await client.execute("SET", f"mrt:shop:pk:{NOVEMBER}", 9)
        if password is not None:
            await client.execute("CONFIG", "SET", "requirepass", password)
        return server, client

    def usage(self, redis_url: str, *argv: str) -> tuple[str, str]:
        """
        Run C{meteredrt usage --app shop} on a configuration naming
        C{redis_url}; its output and error output.
        """
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f'[cluster]\nredis = "{redis_url}"\n\n[[apps]]\nid = "shop"\n')
        stdout, stderr = io.StringIO(), io.StringIO()
        args = ["usage", "--app", "shop", "--config", config, "--data-dir", self.mktemp(), *argv]
        self.assertEqual(main(args, stdout=stdout, stderr=stderr, clock=lambda: NOW), 0, stderr.getvalue())
        return stdout.getvalue(), stderr.getvalue()

    def report(self, redis_url: str, *argv: str) -> Any:
        return json.loads(self.usage(redis_url, "--json", *argv)[0])

    async def test_live_figures(self) -> None:
        """
        C{concurrentNow} sums the live nodes' shares (a node without a
        lease does not count); the peak is Redis's sampled one when the
        store has not got it yet.
        """
        server, _ = await self.start_redis()
        report = self.report(server.url)
        self.assertEqual((report["concurrentNow"], report["peakConcurrent"]), (5, 9))
        text, _ = self.usage(server.url)
        self.assertIn("connected now:        5\n", text)
        self.assertIn("peak concurrent:      9\n", text)

    async def test_password_and_database(self) -> None:
        """
        The Redis URL's password and database number are used.
        """
        server, _ = await self.start_redis(db=3, password="s3cret")
        report = self.report(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        self.assertEqual(report["concurrentNow"], 5)

    async def test_wrong_password(self) -> None:
        """
        A login Redis refuses leaves the live figures unknown, and says so.
        """
        server, _ = await self.start_redis(password="s3cret")
        report = self.report(f"redis://:wrong@127.0.0.1:{server.port}/0")
        self.assertIsNone(report["concurrentNow"])
        self.assertIn("refused", report["liveUnavailable"])

    def test_redis_unreachable(self) -> None:
        """
        Without Redis the stored figures are still printed, with the live
        ones unknown and why.
        """
        url = f"redis://127.0.0.1:{free_port()}/0"
        report = self.report(url)
        self.assertEqual((report["concurrentNow"], report["messagesUsed"]), (None, 0))
        self.assertIn("did not answer", report["liveUnavailable"])
        text, _ = self.usage(url)
        self.assertIn("connected now:        unknown: Redis at", text)

    def test_silent_server(self) -> None:
        """
        A server that accepts and never answers is given up after the
        timeout, not waited on forever.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        report = self.report(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        self.assertIsNone(report["concurrentNow"])
        self.assertIn("timed out", report["liveUnavailable"])

    async def test_tls(self) -> None:
        """
        A C{rediss://} URL talks TLS: a Redis without TLS cannot answer it.
        """
        server, _ = await self.start_redis()
        report = self.report(f"rediss://127.0.0.1:{server.port}/0")
        self.assertIsNone(report["concurrentNow"])
        self.assertIn("did not answer", report["liveUnavailable"])

    def test_oversized_answer(self) -> None:
        """
        A server that sends more than any answer holds is given up at once.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)

        def flood() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b"$1000000\r\n" + b"x" * 200_000)

        sender = threading.Thread(target=flood)
        sender.start()
        self.addCleanup(sender.join, 5)
        report = self.report(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        self.assertIsNone(report["concurrentNow"])
        self.assertIn("more than any answer holds", report["liveUnavailable"])

    async def test_current_period_given(self) -> None:
        """
        The current month given with C{--period} has its live figures too.
        """
        server, _ = await self.start_redis()
        self.assertEqual(self.report(server.url, "--period", "2023-11")["concurrentNow"], 5)

    async def test_past_period(self) -> None:
        """
        A past period has no live figures: nothing is asked of Redis.
        """
        server, _ = await self.start_redis()
        report = self.report(server.url, "--period", "2023-10")
        self.assertNotIn("concurrentNow", report)
        self.assertEqual(report["peakConcurrent"], 0)

    def test_single_node(self) -> None:
        """
        Without C{[cluster]} the report is the stored one alone.
        """
        config = self.mktemp()
        with open(config, "w") as f:
            f.write('[[apps]]\nid = "shop"\n')
        stdout, stderr = io.StringIO(), io.StringIO()
        args = ["usage", "--app", "shop", "--config", config, "--data-dir", self.mktemp(), "--json"]
        self.assertEqual(main(args, stdout=stdout, stderr=stderr, clock=lambda: NOW), 0, stderr.getvalue())
        self.assertNotIn("concurrentNow", json.loads(stdout.getvalue()))
