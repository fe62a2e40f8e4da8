"""
C{meteredrt apps ...}: list, create, suspend, resume, set-plan.
"""

from __future__ import annotations

import argparse

from meteredrt.apps import DEFAULT_MESSAGE_BURST, DEFAULT_MESSAGE_RATE
from meteredrt.commands.options import amount_option, balance_option, cap_option
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.render import app_json, describe_plan, table
from meteredrt.commands.session import Session
from meteredrt.store.keys import store_app, store_plan_changes, store_suspension


@command("apps list", "List every app, stored or declared in the configuration file.")
def _apps_list(session: Session, args: argparse.Namespace) -> Output:
    tenancy = session.tenancy()
    apps = [app_json(app, tenancy) for app in tenancy.apps()]
    rows = [
        [
            app["appId"],
            app["source"],
            (app["plan"] or {}).get("name") or "-",
            str(app["activeKeys"]),
            "suspended" if app["suspended"] else "active",
        ]
        for app in apps
    ]
    return Output(apps, table(["APP", "SOURCE", "PLAN", "KEYS", "STATUS"], rows) or "No apps.")


@command("apps create", "Create an app (without keys or plan).", argument("app_id", metavar="APP_ID"))
def _apps_create(session: Session, args: argparse.Namespace) -> Output:
    app = session.write(store_app, args.app_id, None, session.now())
    return Output(app_json(app, session.tenancy()), f"Created app {app.app_id}.")


@command(
    "apps suspend",
    "Suspend an app: connections are refused with 4012, and a running server closes the live ones "
    "with 4012 within about 2 s. Works on config-declared apps too: suspension is always stored.",
    argument("app_id", metavar="APP_ID"),
)
def _apps_suspend(session: Session, args: argparse.Namespace) -> Output:
    app = session.write(store_suspension, args.app_id, True, session.now())
    text = (
        f"Suspended app {app.app_id}.\n"
        "A running server closes its connections (4012) within about 2 s;"
        " its secret keys still authenticate REST calls."
    )
    return Output(app_json(app, session.tenancy()), text)


@command(
    "apps resume",
    "Resume a suspended app: a running server admits its connections again within about 2 s.",
    argument("app_id", metavar="APP_ID"),
)
def _apps_resume(session: Session, args: argparse.Namespace) -> Output:
    app = session.write(store_suspension, args.app_id, False, session.now())
    text = f"Resumed app {app.app_id}.\nA running server admits its connections again within about 2 s."
    return Output(app_json(app, session.tenancy()), text)


#: C{apps set-plan} options and the L{Plan} fields they set.
_PLAN_OPTIONS = {
    "name": "--name",
    "max_concurrent_connections": "--max-connections",
    "max_messages_per_period": "--max-messages",
    "overages_allowed": "--overages-allowed",
    "overages_enabled": "--overages-enabled",
    "overage_rate_per_1000_messages": "--overage-rate-per-1000",
    "overage_rate_per_connection": "--overage-rate-per-connection",
    "balance": "--balance",
    "auto_recharge_amount": "--auto-recharge-amount",
    "auto_recharge_threshold": "--auto-recharge-threshold",
    "message_rate": "--message-rate",
    "message_burst": "--message-burst",
}


@command(
    "apps set-plan",
    "Change an app's plan: the options given replace those fields of its current plan (or of a "
    "fresh one); --unmetered removes the plan. A running server applies it within about 2 s.",
    argument("app_id", metavar="APP_ID"),
    argument("--name", default=argparse.SUPPRESS, metavar="NAME", help="plan name, such as SIGNALLING_BASIC"),
    argument(
        "--max-connections",
        default=argparse.SUPPRESS,
        dest="max_concurrent_connections",
        type=cap_option,
        metavar="N",
        help="cap on concurrent connections, or 'unlimited'",
    ),
    argument(
        "--max-messages",
        default=argparse.SUPPRESS,
        dest="max_messages_per_period",
        type=cap_option,
        metavar="N",
        help="cap on messages per billing period, or 'unlimited'",
    ),
    argument(
        "--overages-allowed",
        default=argparse.SUPPRESS,
        action=argparse.BooleanOptionalAction,
        help="whether the plan permits overage at all",
    ),
    argument(
        "--overages-enabled",
        default=argparse.SUPPRESS,
        action=argparse.BooleanOptionalAction,
        help="the customer's overage switch",
    ),
    argument(
        "--overage-rate-per-1000",
        default=argparse.SUPPRESS,
        dest="overage_rate_per_1000_messages",
        type=amount_option,
        metavar="AMOUNT",
        help="price of 1000 overage messages",
    ),
    argument(
        "--overage-rate-per-connection",
        default=argparse.SUPPRESS,
        type=amount_option,
        metavar="AMOUNT",
        help="price of one connection admitted over the cap",
    ),
    argument(
        "--balance",
        default=argparse.SUPPRESS,
        type=balance_option,
        metavar="AMOUNT",
        help="opening prepaid balance (may be negative)",
    ),
    argument(
        "--auto-recharge-amount",
        default=argparse.SUPPRESS,
        type=amount_option,
        metavar="AMOUNT",
        help="amount of one automatic recharge (0: off)",
    ),
    argument(
        "--auto-recharge-threshold",
        default=argparse.SUPPRESS,
        type=amount_option,
        metavar="AMOUNT",
        help="recharge when a charge would leave the balance below this",
    ),
    argument(
        "--message-rate",
        default=argparse.SUPPRESS,
        type=amount_option,
        metavar="PER_SECOND",
        help=f"messages per second each connection may send (default {DEFAULT_MESSAGE_RATE:g}; over it: close 4011)",
    ),
    argument(
        "--message-burst",
        default=argparse.SUPPRESS,
        type=amount_option,
        metavar="N",
        help=f"messages a connection may send at once above its rate (default {DEFAULT_MESSAGE_BURST:g})",
    ),
    argument("--unmetered", action="store_true", help="remove the plan: the app is counted, never limited"),
)
def _apps_set_plan(session: Session, args: argparse.Namespace) -> Output:
    # Plan options default to absent, so that "unlimited" (None) is a value.
    given = {field: option for field, option in _PLAN_OPTIONS.items() if hasattr(args, field)}
    if args.unmetered and given:
        raise UsageError(
            f"--unmetered removes the plan; it cannot be combined with {', '.join(given.values())}"
        )
    if not args.unmetered and not given:
        raise UsageError("give at least one plan option, or --unmetered")
    changes = {field: getattr(args, field) for field in given}
    app = session.write(store_plan_changes, args.app_id, changes, args.unmetered, session.now())
    text = (
        f"Plan of app {app.app_id}:\n{describe_plan(app.plan)}\n"
        "A running server applies it within about 2 s."
    )
    return Output(app_json(app, session.tenancy()), text)
