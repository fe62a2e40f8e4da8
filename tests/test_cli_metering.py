"""
Tests for C{meteredrt apps set-plan} and C{meteredrt usage}, end to end: the
CLI writes a plan, a real L{Meter} counts under it into a real usage file,
and the CLI reads the figures back.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.apps import App, Plan
from meteredrt.keystore import (
    SQLiteKeyStore,
    Tenancy,
    connect,
    database_path,
    open_pool,
    prepare_database,
    read_state,
)
from meteredrt.metering import Meter
from meteredrt.usagestore import UsageStore, usage_database_path
from tests.test_cli import NOW, CommandLineMixin
from tests.test_usagestore import SynchronousPool

# NOW (2023-11-14T22:13:20Z) lies in November 2023.
NOVEMBER = 1_698_796_800  # 2023-11-01T00:00:00Z
DECEMBER = 1_701_388_800  # 2023-12-01T00:00:00Z
OCTOBER = 1_696_118_400  # 2023-10-01T00:00:00Z


class MeteringCommandMixin(CommandLineMixin):
    """
    Read the stored app back and count with a real meter on its data
    directory.
    """

    def stored_app(self, app_id: str) -> App:
        """
        The effective app as the server would load it.
        """
        connection = connect(database_path(self.data_dir))
        try:
            app = Tenancy.overlay(read_state(connection.cursor()), ()).app(app_id)
        finally:
            connection.close()
        assert app is not None
        return app

    def start_meter(self, now: float) -> tuple[Meter, Clock]:
        """
        A started meter writing synchronously to the data directory's usage
        file, on a clock set to ``now``.
        """
        clock = Clock()
        clock.advance(now)
        pool = SynchronousPool(usage_database_path(self.data_dir))
        self.addCleanup(pool.close)  # type: ignore[attr-defined]
        meter = Meter(clock, UsageStore.with_pool(pool))
        meter.startService()
        return meter, clock

    def stop(self, meter: Meter) -> None:
        """
        Stop the meter; its final flush has happened when this returns.
        """
        self.successResultOf(meter.stopService())  # type: ignore[attr-defined]


class SetPlanTests(MeteringCommandMixin, SynchronousTestCase):
    """
    Tests for C{meteredrt apps set-plan}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.cli("apps", "create", "shop")

    def test_sets_every_field(self) -> None:
        """
        Every plan field has an option, and the stored plan has the values
        given.
        """
        result = self.json(
            "apps", "set-plan", "shop",
            "--name", "SIGNALLING_BASIC",
            "--max-connections", "100",
            "--max-messages", "5000",
            "--overages-allowed",
            "--no-overages-enabled",
            "--overage-rate-per-1000", "0.5",
            "--overage-rate-per-connection", "0.02",
            "--balance", "-1.5",
            "--auto-recharge-amount", "10",
            "--auto-recharge-threshold", "2",
            "--message-rate", "250",
            "--message-burst", "500",
        )
        expected = Plan(
            name="SIGNALLING_BASIC",
            max_concurrent_connections=100,
            max_messages_per_period=5000,
            overages_allowed=True,
            overages_enabled=False,
            overage_rate_per_1000_messages=0.5,
            overage_rate_per_connection=0.02,
            balance=-1.5,
            auto_recharge_amount=10.0,
            auto_recharge_threshold=2.0,
            message_rate=250.0,
            message_burst=500.0,
        )
        self.assertEqual(self.stored_app("shop").plan, expected)
        self.assertEqual(result["plan"]["maxMessagesPerPeriod"], 5000)
        self.assertEqual(result["plan"]["overagesEnabled"], False)

    def test_options_change_only_their_fields(self) -> None:
        """
        A second C{set-plan} changes the fields it names and keeps the rest.
        """
        self.cli("apps", "set-plan", "shop", "--name", "BASIC", "--max-messages", "10", "--overages-allowed")
        self.cli("apps", "set-plan", "shop", "--balance", "3", "--max-connections", "4")
        self.assertEqual(
            self.stored_app("shop").plan,
            Plan(
                name="BASIC",
                max_messages_per_period=10,
                max_concurrent_connections=4,
                overages_allowed=True,
                balance=3.0,
            ),
        )

    def test_unlimited_cap(self) -> None:
        """
        C{unlimited} removes a cap.
        """
        self.cli("apps", "set-plan", "shop", "--max-messages", "10")
        self.cli("apps", "set-plan", "shop", "--max-messages", "unlimited")
        self.assertEqual(self.stored_app("shop").plan, Plan())

    def test_unmetered(self) -> None:
        """
        C{--unmetered} removes the plan.
        """
        self.cli("apps", "set-plan", "shop", "--max-messages", "10")
        out, _ = self.cli("apps", "set-plan", "shop", "--unmetered")
        self.assertIn("unmetered", out)
        self.assertIsNone(self.stored_app("shop").plan)

    def test_text(self) -> None:
        """
        The text output shows the plan and says when a server applies it.
        """
        out, _ = self.cli("apps", "set-plan", "shop", "--name", "BASIC", "--max-messages", "10")
        self.assertIn("BASIC", out)
        self.assertIn("max messages/period:    10", out)
        self.assertIn("within about 2 s", out)

    def test_bad_values(self) -> None:
        """
        Malformed or out-of-range values fail with exit status 2, a message
        naming the option, and no change.
        """
        for option, value, fragment in [
            ("--max-messages", "-1", "must be at least 0"),
            ("--max-messages", "1.5", "expected a whole number or 'unlimited'"),
            ("--max-connections", "lots", "expected a whole number"),
            ("--overage-rate-per-1000", "-0.1", "must be at least 0"),
            ("--overage-rate-per-connection", "free", "expected a number"),
            ("--balance", "nan", "expected a finite number"),
            ("--auto-recharge-amount", "inf", "expected a finite number"),
            ("--auto-recharge-threshold", "-2", "must be at least 0"),
            ("--message-rate", "-1", "must be at least 0"),
            ("--message-burst", "many", "expected a number"),
        ]:
            _, err = self.cli("apps", "set-plan", "shop", option, value, status=2)
            self.assertIn(f"argument {option}: {fragment}", err)
        self.assertIsNone(self.stored_app("shop").plan)

    def test_message_rate_out_of_range(self) -> None:
        """
        A rate of 0 or a burst below 1 is refused with the option's name,
        and nothing changes; the defaults are shown in the text output.
        """
        self.fail_with("--message-rate: must be more than 0", "apps", "set-plan", "shop", "--message-rate", "0")
        self.fail_with("--message-burst: must be from 1 to", "apps", "set-plan", "shop", "--message-burst", "0.5")
        self.assertIsNone(self.stored_app("shop").plan)
        out, _ = self.cli("apps", "set-plan", "shop", "--name", "BASIC")
        self.assertIn("per connection:         100 messages/s, bursts of 200", out)

    def test_nothing_to_set(self) -> None:
        """
        Without any option there is nothing to do, which is an error.
        """
        self.fail_with("meteredrt: error: give at least one plan option, or --unmetered", "apps", "set-plan", "shop")

    def test_unmetered_with_fields(self) -> None:
        """
        C{--unmetered} cannot be combined with plan fields.
        """
        self.fail_with(
            "cannot be combined with --name, --max-messages",
            "apps", "set-plan", "shop", "--unmetered", "--name", "X", "--max-messages", "3",
        )

    def test_unknown_app(self) -> None:
        """
        Setting the plan of an unknown app fails.
        """
        self.fail_with("meteredrt: error: no app 'nope'", "apps", "set-plan", "nope", "--max-messages", "1")

    def test_plan_declared_in_config(self) -> None:
        """
        An app whose plan the configuration file declares must be changed
        there.
        """
        config = self.write_config()
        self.fail_with(
            "has a plan in the configuration file",
            "apps", "set-plan", "app_demo", "--max-messages", "1", "--config", config,
        )


class UsageCommandTests(MeteringCommandMixin, SynchronousTestCase):
    """
    Tests for C{meteredrt usage}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.cli("apps", "create", "shop")

    def test_round_trip(self) -> None:
        """
        What a meter counted under a plan set with C{set-plan} is what
        C{usage} prints: the §19.6 figures as the meter reports them, the
        period's ledger totals and the balance.
        """
        self.cli(
            "apps", "set-plan", "shop",
            "--name", "BASIC",
            "--max-connections", "1",
            "--max-messages", "3",
            "--overages-allowed",
            "--overage-rate-per-1000", "1000",
            "--overage-rate-per-connection", "2",
            "--balance", "1",
            "--auto-recharge-amount", "5",
        )
        app = self.stored_app("shop")
        meter, _ = self.start_meter(NOW)
        # The second connection is overage (2): the balance of 1 is short, so
        # one recharge of 5 pays for it; then 3 messages within plan and 2
        # overage ones at 1 each.
        self.assertEqual([self.successResultOf(meter.admit_connection(app)) for _ in range(2)], [True, True])
        self.assertEqual([self.successResultOf(meter.count_message(app)) for _ in range(5)], [True] * 5)
        live: dict[str, Any] = dict(self.successResultOf(meter.usage(app)))
        self.stop(meter)

        report = self.json("usage", "--app", "shop")
        del live["concurrentNow"]
        self.assertEqual({name: report[name] for name in live}, live)
        self.assertEqual(
            (report["periodStartUnix"], report["periodEndUnix"], report["messagesUsed"], report["peakConcurrent"]),
            (NOVEMBER, DECEMBER, 5, 2),
        )
        self.assertEqual((report["overageMessages"], report["overageConnections"]), (2, 1))
        self.assertEqual(
            report["ledger"],
            {
                "entries": 3,
                "chargedMessages": 2,
                "chargedConnections": 1,
                "charged": 4.0,
                "recharges": 1,
                "recharged": 5.0,
            },
        )
        self.assertEqual(report["balance"], 2.0)
        self.assertEqual(report["plan"]["name"], "BASIC")

    def test_text(self) -> None:
        """
        Without C{--json} the same figures are printed for humans.
        """
        self.cli("apps", "set-plan", "shop", "--name", "BASIC", "--max-messages", "100")
        meter, _ = self.start_meter(NOW)
        app = self.stored_app("shop")
        for _ in range(7):
            meter.count_message(app)
        self.stop(meter)
        out, _ = self.cli("usage", "--app", "shop")
        lines = out.splitlines()
        self.assertEqual(lines[0], f"Usage of app shop in 2023-11 [{NOVEMBER}, {DECEMBER}) UTC")
        self.assertIn("  plan (current):       BASIC: unlimited connections, 100 messages per month", lines)
        self.assertIn("  messages used:        7", lines)
        self.assertIn("  peak concurrent:      0", lines)

    def test_past_period(self) -> None:
        """
        C{--period YYYY-MM} reads that month; without it the current month
        is read.
        """
        app = self.stored_app("shop")
        meter, clock = self.start_meter(DECEMBER - 1)
        self.successResultOf(meter.admit_connection(app))
        for _ in range(4):
            meter.count_message(app)
        clock.advance(1)
        meter.count_message(app)
        self.stop(meter)
        # The meter lives in November 2023 on the clock, the CLI in
        # November too (NOW): December is a "future" month to it, but
        # --period reads any month.
        november = self.json("usage", "--app", "shop", "--period", "2023-11")
        self.assertEqual(
            (november["periodStartUnix"], november["messagesUsed"], november["peakConcurrent"]),
            (NOVEMBER, 4, 1),
        )
        self.assertEqual(self.json("usage", "--app", "shop"), november)
        december = self.json("usage", "--app", "shop", "--period", "2023-12")
        self.assertEqual(
            (december["periodStartUnix"], december["messagesUsed"], december["peakConcurrent"]),
            (DECEMBER, 1, 1),
        )
        october = self.json("usage", "--app", "shop", "--period", "2023-10")
        self.assertEqual((october["periodStartUnix"], october["periodEndUnix"]), (OCTOBER, NOVEMBER))
        self.assertEqual((october["messagesUsed"], october["peakConcurrent"], october["ledger"]["entries"]), (0, 0, 0))

    def test_unmetered_app(self) -> None:
        """
        An app without a plan is still counted, and reported with a null
        plan.
        """
        meter, _ = self.start_meter(NOW)
        app = self.stored_app("shop")
        for _ in range(3):
            meter.count_message(app)
        self.stop(meter)
        report = self.json("usage", "--app", "shop")
        self.assertEqual(report["messagesUsed"], 3)
        self.assertEqual(report["plan"]["name"], None)
        self.assertEqual(report["balance"], 0.0)

    def test_no_usage_file(self) -> None:
        """
        Before a server has flushed anything the figures are zero, and
        reading creates no usage file.
        """
        report = self.json("usage", "--app", "shop")
        self.assertEqual((report["messagesUsed"], report["peakConcurrent"]), (0, 0))
        self.assertFalse(os.path.exists(usage_database_path(self.data_dir)))

    def test_bad_period(self) -> None:
        """
        A period that is not YYYY-MM fails with exit status 2.
        """
        for value, fragment in [("2023-13", "no month 13"), ("23-1", "expected YYYY-MM"), ("2023-1", "expected YYYY-MM")]:
            _, err = self.cli("usage", "--app", "shop", "--period", value, status=2)
            self.assertIn(f"argument --period: {fragment}", err)

    def test_unknown_app(self) -> None:
        """
        Usage of an unknown app is an error.
        """
        self.fail_with("meteredrt: error: no app 'nope'", "usage", "--app", "nope")

    def test_app_required(self) -> None:
        """
        C{--app} is required.
        """
        self.fail_with("the following arguments are required: --app", "usage")


class PlanReloadTests(CommandLineMixin, TestCase):
    """
    A plan set with the CLI reaches a running server without a restart.
    """

    async def test_plan_within_seconds(self) -> None:
        """
        A running key store serves a plan set with the CLI after its next
        re-read, two seconds later.
        """
        self.cli("apps", "create", "shop")
        clock = Clock()
        pool = open_pool(prepare_database(self.data_dir), reactor)
        store = SQLiteKeyStore(pool, clock=clock)
        await store.startService()
        self.addCleanup(store.stopService)
        self.cli("apps", "set-plan", "shop", "--max-messages", "2")
        self.assertIsNone(store.app("shop").plan)  # type: ignore[union-attr]
        clock.advance(2)
        await pool.runInteraction(lambda cursor: None)
        self.assertEqual(store.app("shop").plan, Plan(max_messages_per_period=2))  # type: ignore[union-attr]

