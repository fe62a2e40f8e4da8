"""
How apps, keys, plans and usage are shown: JSON objects with the
protocol's camelCase names, and a few lines of text for humans.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs

from meteredrt.apps import App, Key, KeyType, Plan
from meteredrt.metering import CONNECTION_OVERAGE, MESSAGE_OVERAGE, plan_report
from meteredrt.store.tenancy import Tenancy
from meteredrt.store.usage import CHARGE, RECHARGE, LedgerEntry, UsageRow


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def plan_json(plan: Plan | None) -> dict[str, Any] | None:
    """
    A plan as a JSON object with the protocol's camelCase names.
    """
    if plan is None:
        return None
    return {_camel(name): value for name, value in attrs.asdict(plan).items()}


def key_json(key: Key, *, reveal_secret: bool = False) -> dict[str, Any]:
    """
    A key as a JSON object with the protocol's camelCase names (§3.3); the
    secret only if asked to.
    """
    data: dict[str, Any] = {
        "keyId": key.key_id,
        "appId": key.app_id,
        "type": key.type.value,
        "channelPatterns": list(key.channel_patterns),
        "actions": sorted(key.actions),
        "allowedOrigins": list(key.allowed_origins),
        "autoInjectTurn": key.auto_inject_turn,
        "status": "active" if key.active else "revoked",
        "source": key.source,
    }
    if reveal_secret and key.secret is not None:
        data["secret"] = key.secret
    return data


def describe_key(key: Key, *, reveal_secret: bool = False) -> str:
    """
    A key as a few lines for humans; the secret only if asked to, with a
    reminder that it is not shown again.
    """
    lines = [
        f"{key.type.value} key {key.key_id} (app {key.app_id})",
        f"  channels:         {', '.join(key.channel_patterns)}",
        f"  actions:          {', '.join(sorted(key.actions)) or '(none)'}",
    ]
    if key.type is KeyType.PUBLISHABLE:
        lines.append(f"  allowed origins:  {', '.join(key.allowed_origins) or '(any)'}")
    lines.append(f"  auto-inject TURN: {'on' if key.auto_inject_turn else 'off'}")
    if reveal_secret and key.secret is not None:
        lines.append(f"  secret:           {key.secret}")
        lines.append("  The secret is shown only now: store it safely.")
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def app_json(app: App, tenancy: Tenancy) -> dict[str, Any]:
    return {
        "appId": app.app_id,
        "source": "config" if tenancy.is_declared(app.app_id) else "store",
        "suspended": app.suspended,
        "plan": plan_json(app.plan),
        "activeKeys": sum(1 for key in tenancy.keys_of(app.app_id) if key.active),
    }


def describe_plan(plan: Plan | None) -> str:
    """
    A plan as a few indented lines for humans.
    """
    if plan is None:
        return "  unmetered (no plan): always admitted, still counted"

    def cap(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    overages = "not allowed"
    if plan.overages_allowed:
        overages = "on" if plan.overages_enabled else "allowed, switched off"
    recharge = "off"
    if plan.auto_recharge_amount > 0:
        recharge = f"{plan.auto_recharge_amount:g} when below {plan.auto_recharge_threshold:g}"
    return "\n".join(
        [
            f"  name:                   {plan.name or '-'}",
            f"  max connections:        {cap(plan.max_concurrent_connections)}",
            f"  max messages/period:    {cap(plan.max_messages_per_period)} (per {plan.period}, UTC)",
            f"  overages:               {overages}",
            f"  overage rates:          {plan.overage_rate_per_1000_messages:g} per 1000 messages, "
            f"{plan.overage_rate_per_connection:g} per connection",
            f"  opening balance:        {plan.balance:g}",
            f"  auto-recharge:          {recharge}",
            f"  per connection:         {plan.message_rate:g} messages/s, bursts of {plan.message_burst:g}",
        ]
    )


def usage_report(
    app: App,
    row: UsageRow | None,
    bounds: tuple[int, int],
    entries: Sequence[LedgerEntry],
    net: float,
) -> dict[str, Any]:
    """
    The figures of §19.6 as stored for one period (without the live
    C{concurrentNow}), with the period's ledger totals and the balance now.
    """
    plan = app.plan
    charges = [entry for entry in entries if entry.kind == CHARGE]
    recharges = [entry for entry in entries if entry.kind == RECHARGE]
    return {
        "appId": app.app_id,
        "periodStartUnix": bounds[0],
        "periodEndUnix": bounds[1],
        "peakConcurrent": row.peak_concurrent if row else 0,
        "messagesUsed": row.messages_used if row else 0,
        "overageMessages": row.overage_messages if row else 0,
        "overageConnections": row.overage_connections if row else 0,
        "plan": plan_report(plan),
        "ledger": {
            "entries": len(entries),
            "chargedMessages": sum(e.units for e in charges if e.reason == MESSAGE_OVERAGE),
            "chargedConnections": sum(e.units for e in charges if e.reason == CONNECTION_OVERAGE),
            "charged": sum((e.amount for e in charges), 0.0),
            "recharges": len(recharges),
            "recharged": sum((e.amount for e in recharges), 0.0),
        },
        "balance": (plan.balance if plan else 0.0) + net,
    }


def plan_summary(plan: Plan | None) -> str:
    """
    A plan in one line: its name and caps.
    """
    if plan is None:
        return "unmetered"

    def cap(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    return (
        f"{plan.name or '(unnamed)'}: {cap(plan.max_concurrent_connections)} connections, "
        f"{cap(plan.max_messages_per_period)} messages per {plan.period}"
    )


def describe_usage(report: dict[str, Any], plan: Plan | None) -> str:
    """
    A usage report (L{usage_report}) as a few lines for humans.
    """
    start = time.gmtime(report["periodStartUnix"])
    ledger = report["ledger"]
    live = []
    if "concurrentNow" in report:
        # In a cluster: the connections open on every node (or why not).
        now = report["concurrentNow"]
        live = [f"  connected now:        {now if now is not None else 'unknown: ' + report['liveUnavailable']}"]
    return "\n".join(
        [
            f"Usage of app {report['appId']} in {time.strftime('%Y-%m', start)} "
            f"[{report['periodStartUnix']}, {report['periodEndUnix']}) UTC",
            f"  plan (current):       {plan_summary(plan)}",
            *live,
            f"  peak concurrent:      {report['peakConcurrent']}",
            f"  messages used:        {report['messagesUsed']}",
            f"  overage messages:     {report['overageMessages']}",
            f"  overage connections:  {report['overageConnections']}",
            f"  ledger entries:       {ledger['entries']}",
            f"  charged:              {ledger['charged']:g} for {ledger['chargedMessages']} messages "
            f"and {ledger['chargedConnections']} connections",
            f"  recharged:            {ledger['recharged']:g} in {ledger['recharges']} recharges",
            f"  balance now:          {report['balance']:g}",
        ]
    )
