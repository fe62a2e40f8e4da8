"""
Tests for L{meteredrt.rest.usage}: C{GET /v1/usage} (§19.6).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import Plan
from meteredrt.metering import period_bounds
from tests.rest_support import APP_A, OTHER_APP, START, RestWorld


class UsageTests(SynchronousTestCase):
    """
    The report is the meter's, for the caller's app only.
    """

    def setUp(self) -> None:
        self.world = RestWorld(self)

    def test_live_counts(self) -> None:
        """
        Connections and messages of the app show up; no plan is all nulls.
        """
        session, _ = self.world.connect("u_1")
        self.world.connect("u_2")
        self.world.post("/v1/channels/demo%2Fa/publish", {"data": 1})
        reply = self.world.get("/v1/usage")
        start, end = period_bounds(START)
        self.assertEqual(
            reply.json,
            {
                "appId": APP_A,
                "periodStartUnix": start,
                "periodEndUnix": end,
                "concurrentNow": 2,
                "peakConcurrent": 2,
                "messagesUsed": 1,
                "overageMessages": 0,
                "overageConnections": 0,
                "plan": {
                    "name": None,
                    "maxConcurrentConnections": None,
                    "maxMessagesPerPeriod": None,
                    "overagesAllowed": None,
                    "overagesEnabled": None,
                },
            },
        )

    def test_plan(self) -> None:
        """
        The app's plan is reported.
        """
        self.world.keys.set_plan(APP_A, Plan(name="SIGNALLING_BASIC", max_concurrent_connections=1000))
        plan = self.world.get("/v1/usage").json["plan"]
        self.assertEqual((plan["name"], plan["maxConcurrentConnections"]), ("SIGNALLING_BASIC", 1000))

    def test_scoped_to_app(self) -> None:
        """
        Another app's key sees its own, empty, usage.
        """
        self.world.connect("u_1")
        reply = self.world.get("/v1/usage", key=OTHER_APP)
        self.assertEqual((reply.json["appId"], reply.json["concurrentNow"]), ("app_b", 0))
