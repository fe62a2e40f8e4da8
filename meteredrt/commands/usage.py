"""
C{meteredrt usage}: an app's stored usage for one billing period and, in a
cluster, its live connections (L{meteredrt.commands.liveusage}).
"""

from __future__ import annotations

import argparse
from typing import Any

from meteredrt.commands.liveusage import LiveUsageUnavailable, read_live_usage
from meteredrt.commands.options import month_option
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.render import describe_usage, usage_report
from meteredrt.commands.session import Session
from meteredrt.metering import MONTH, period_bounds
from meteredrt.redisaddress import RedisAddress, parse_redis_url


@command(
    "usage",
    "Print an app's usage for the current billing period (or --period YYYY-MM) as flushed to "
    "usage.sqlite3 by the server, at most about a second behind it; with [cluster], also the "
    "connections open on every node now.",
    argument("--app", required=True, metavar="APP"),
    argument("--period", type=month_option, metavar="YYYY-MM", help="a past calendar month (UTC)"),
)
def _usage(session: Session, args: argparse.Namespace) -> Output:
    app = session.tenancy().app(args.app)
    if app is None:
        raise UsageError(f"no app {args.app!r}")
    if args.period is None:
        bounds = period_bounds(session.now(), app.plan.period if app.plan else MONTH)
    else:
        bounds = period_bounds(args.period, MONTH)
    row, entries, net = session.usage(app.app_id, bounds[0])
    report = usage_report(app, row, bounds, entries, net)
    cluster = session.config.cluster
    if cluster is not None and bounds == period_bounds(session.now(), MONTH):
        add_live_usage(report, parse_redis_url(cluster.redis))
    return Output(report, describe_usage(report, app.plan))


def add_live_usage(report: dict[str, Any], redis: RedisAddress) -> None:
    """
    In a cluster, add to the current period's stored C{report} what only
    Redis knows: C{concurrentNow} across the nodes, and the sampled
    cluster-wide peak when the nodes have not flushed it yet. When Redis
    cannot tell, C{concurrentNow} is C{None} and C{liveUnavailable} says
    why: the stored figures are still worth printing.
    """
    try:
        live, peak = read_live_usage(redis, report["appId"], report["periodStartUnix"])
    except LiveUsageUnavailable as e:
        report["concurrentNow"] = None
        report["liveUnavailable"] = str(e)
        return
    report["concurrentNow"] = live
    report["peakConcurrent"] = max(report["peakConcurrent"], peak, live)
