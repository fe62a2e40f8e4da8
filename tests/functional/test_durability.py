"""
Usage counts survive real process deaths: a C{twistd -n meteredrt} child
stopped with SIGTERM loses nothing; one killed with SIGKILL loses at most
what it counted since its last flush (one second, see C{docs/metering.md}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from .support import CONFIG, TwistdProcess, start_twistd
from .test_metering_e2e import connect_client, get_usage, stored_usage

#: How long to wait for a flush to show up in the file: the flush interval
#: is one second, so five leave room for a slow machine.
FLUSH_WAIT = 5.0
POLL_INTERVAL = 0.05


class DurabilityTests(TestCase):
    """
    Counts across SIGTERM and SIGKILL of a real server process.
    """

    timeout = 120

    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        self.config = base / "meteredrt.toml"
        self.config.write_text(CONFIG)
        self.data_dir = str(base / "data")

    async def start(self) -> tuple[Any, TwistdProcess, int]:
        """
        Start a server process on the test's data directory; fires once it
        listens. It is killed on cleanup if still running.
        """
        return await start_twistd(self, "--config", str(self.config), "--data-dir", self.data_dir)

    async def terminate(self, process: Any, child: TwistdProcess) -> None:
        """
        Stop the process with SIGTERM and check that it shut down cleanly.

        twistd re-raises the signal it stopped on once the shutdown is
        complete, so a clean stop ends with signal 15, not exit status 0.
        """
        process.signalProcess("TERM")
        self.assertIn(await child.ended, [(0, None), (None, 15)], child.text)
        self.assertIn("Server Shut Down.", child.text)
        for sign_of_trouble in ("#error]", "#critical]", "Unhandled Error"):
            self.assertNotIn(sign_of_trouble, child.text)

    async def publish(self, port: int, count: int) -> None:
        """
        Publish ``count`` messages over one connection and wait for every
        ack; the connection stays open.
        """
        client = await connect_client(self, port)
        answers = await gatherResults(
            [client.publish("durable/room", n) for n in range(count)], consumeErrors=True
        )
        self.assertEqual([frame["type"] for frame in answers], ["ack"] * count)

    def messages_stored(self) -> int:
        """
        The messages the usage file holds for C{app_test} this period.
        """
        row, _ = stored_usage(self.data_dir)
        return 0 if row is None else int(row.messages_used)

    async def wait_stored(self, expected: int) -> None:
        """
        Poll the usage file (bounded by L{FLUSH_WAIT}) until it holds
        ``expected`` messages.
        """
        deadline = reactor.seconds() + FLUSH_WAIT
        while self.messages_stored() != expected:
            if reactor.seconds() > deadline:
                self.fail(f"usage file holds {self.messages_stored()} messages, not {expected}")
            await deferLater(reactor, POLL_INTERVAL, lambda: None)

    async def test_sigterm_then_sigkill(self) -> None:
        """
        After SIGTERM the file holds exactly what was acked and a restarted
        server counts on from it; after SIGKILL it holds at least what was
        flushed before the kill and at most what was acked.
        """
        n, m, k = 30, 20, 15

        process, child, port = await self.start()
        await self.publish(port, n)
        await self.terminate(process, child)
        self.assertEqual(self.messages_stored(), n)

        process, child, port = await self.start()
        await self.publish(port, m)
        # Absolute counters reach N + M only if the restarted server read N.
        await self.wait_stored(n + m)
        # Asked only after a flush: a server that has just started may
        # answer before it has loaded the file ("Right after a start" in
        # docs/metering.md).
        usage = await get_usage(self, port)
        self.assertEqual(usage["messagesUsed"], n + m)

        # K more within far less than one flush interval, then no chance to
        # flush them: at most these K may be lost.
        await self.publish(port, k)
        process.signalProcess("KILL")
        _, signal = await child.ended
        self.assertEqual(signal, 9, child.text)
        survived = self.messages_stored()
        self.assertGreaterEqual(survived, n + m)
        self.assertLessEqual(survived, n + m + k)

        process, child, port = await self.start()
        await self.publish(port, 1)
        # The server writes only after it has loaded the file, so from here
        # on its figures include what the killed one flushed.
        await self.wait_stored(survived + 1)
        self.assertEqual((await get_usage(self, port))["messagesUsed"], survived + 1)
        await self.terminate(process, child)
        self.assertEqual(self.messages_stored(), survived + 1)
