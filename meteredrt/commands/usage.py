"""
C{meteredrt usage}: an app's stored usage for one billing period.
"""

from __future__ import annotations

import argparse

from meteredrt.commands.options import month_option
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.render import describe_usage, usage_report
from meteredrt.commands.session import Session
from meteredrt.metering import MONTH, period_bounds


@command(
    "usage",
    "Print an app's usage for the current billing period (or --period YYYY-MM) as flushed to "
    "usage.sqlite3 by the server, at most about a second behind it.",
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
    return Output(report, describe_usage(report, app.plan))
