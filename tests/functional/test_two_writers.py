"""
Two real server processes counting into one store at the same time — one
SQLite data directory, or one PostgreSQL database — add up: usage rows are
increments, never last-writer-wins. After SIGTERM of both the store holds
every acked message; after SIGKILL of one, at most that one's last flush
interval is missing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from meteredrt.cli import main
from tests.postgres_server import fresh_database

from .support import APP_ID, CONFIG, TwistdProcess, start_twistd
from .test_metering_e2e import connect_client


class TwoWritersMixin:
    """
    Two processes on one store; the test case provides L{store_args}.
    """

    timeout = 120

    def store_args(self) -> list[str]:
        """
        The options that name the shared store, for twistd and the CLI.
        """
        raise NotImplementedError()

    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()  # type: ignore[attr-defined]
        base.mkdir(parents=True)
        self.config = base / "meteredrt.toml"
        self.config.write_text(CONFIG)
        self.data_dir = str(base / "data")

    async def start(self) -> tuple[Any, TwistdProcess, int]:
        return await start_twistd(self, "--config", str(self.config), *self.store_args())  # type: ignore[arg-type]

    async def publish(self, port: int, count: int) -> None:
        client = await connect_client(self, port)  # type: ignore[arg-type]
        answers = await gatherResults([client.publish("two/room", n) for n in range(count)])
        self.assertEqual([frame["type"] for frame in answers], ["ack"] * count)  # type: ignore[attr-defined]

    def stored(self) -> int:
        """
        The messages the store holds for the app this period, as the CLI
        reports them.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = ["usage", "--app", APP_ID, "--config", str(self.config), "--json", *self.store_args()]
        self.assertEqual(main(argv, stdout=stdout, stderr=stderr), 0, stderr.getvalue())  # type: ignore[attr-defined]
        return int(json.loads(stdout.getvalue())["messagesUsed"])

    async def test_sigterm_both(self) -> None:
        """
        Both processes count while both run; after SIGTERM of both the
        store holds the sum.
        """
        (first, first_child, first_port), (second, second_child, second_port) = (
            await self.start(),
            await self.start(),
        )
        await gatherResults([ensureDeferred(self.publish(first_port, 40)), ensureDeferred(self.publish(second_port, 25))])
        await self.publish(first_port, 5)
        for process, child in ((first, first_child), (second, second_child)):
            process.signalProcess("TERM")
            self.assertIn(await child.ended, [(0, None), (None, 15)], child.text)  # type: ignore[attr-defined]
        self.assertEqual(self.stored(), 70)  # type: ignore[attr-defined]

    async def test_sigkill_one(self) -> None:
        """
        SIGKILL of one process loses at most what it counted since its last
        flush; the other's counts are all there after its SIGTERM.
        """
        (first, first_child, first_port), (second, second_child, second_port) = (
            await self.start(),
            await self.start(),
        )
        await gatherResults([ensureDeferred(self.publish(first_port, 30)), ensureDeferred(self.publish(second_port, 20))])
        await _pause(2.5)  # both have flushed
        await self.publish(first_port, 10)
        first.signalProcess("KILL")
        self.assertEqual((await first_child.ended)[1], 9)  # type: ignore[attr-defined]
        await self.publish(second_port, 5)
        second.signalProcess("TERM")
        await second_child.ended
        stored = self.stored()
        self.assertGreaterEqual(stored, 55)  # type: ignore[attr-defined]
        self.assertLessEqual(stored, 65)  # type: ignore[attr-defined]


class SQLiteTwoWritersTests(TwoWritersMixin, TestCase):
    """
    Two processes on one SQLite data directory.
    """

    def store_args(self) -> list[str]:
        return ["--data-dir", self.data_dir]


class PostgreSQLTwoWritersTests(TwoWritersMixin, TestCase):
    """
    Two processes on one PostgreSQL database.
    """

    def setUp(self) -> None:
        super().setUp()
        self.database = fresh_database()

    def store_args(self) -> list[str]:
        return ["--data-dir", self.data_dir, "--database", self.database]


def _pause(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
