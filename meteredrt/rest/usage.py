"""
C{GET /v1/usage}: the caller's app's usage and plan (§19.6).

L{UsageResource} returns what the L{IUsageReport} reports (the node's
L{meteredrt.metering.Meter}, or in a cluster
L{meteredrt.clusterusage.ClusterUsage}); when that fails the
base resource answers 503 C{internal_error}, and live messaging is not
affected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meteredrt.interfaces import IUsageReport
from meteredrt.rest.base import Call, JsonResource, RequestGuard, Route

ROUTES = (
    Route(
        "GET",
        "/v1/usage",
        "getUsage",
        "Usage counters and plan of the authenticating key's app for the current period",
        handler="usage",
        response_schema="Usage",
        errors=(401, 429, 503),
    ),
)


class UsageResource(JsonResource):
    """
    C{/v1/usage}.
    """

    routes = ROUTES

    def __init__(self, guard: RequestGuard, report: IUsageReport) -> None:
        super().__init__(guard)
        self._report = report

    def locate(self, postpath: list[bytes]) -> tuple[str, dict[str, bytes]] | None:
        return ("/v1/usage", {}) if not postpath else None

    async def usage(self, call: Call) -> Mapping[str, Any]:
        """
        The §19.6 report for the caller's app.
        """
        report: Mapping[str, Any] = await self._report.usage(call.app)
        return report
