"""
C{meteredrt webhooks status} and C{meteredrt webhooks replay}: the presence
webhook outbox the servers write in the store (C{webhooks.sqlite3} in the
data directory, or the PostgreSQL database a cluster shares), read and
changed with the same statements the server runs, while it runs.
"""

from __future__ import annotations

import argparse
import time

from meteredrt.apps import App
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.session import Session
from meteredrt.store import webhooks as webhook_tables
from meteredrt.webhooks.outbox import OutboxStatus


def _webhooks_of(session: Session, app_id: str) -> App:
    app = session.tenancy().app(app_id)
    if app is None:
        raise UsageError(f"no app {app_id!r}")
    return app


def _when(at: float | None) -> str:
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


@command(
    "webhooks status",
    "Show an app's presence webhooks: target, events, and the outbox (pending, failed, delivered, "
    "last attempt and error), as the server last wrote it.",
    argument("--app", required=True, metavar="APP"),
)
def _webhooks_status(session: Session, args: argparse.Namespace) -> Output:
    app = _webhooks_of(session, args.app)
    status = OutboxStatus()
    # Asking must not create an empty SQLite outbox.
    if session.database.exists(webhook_tables.COMPONENT):
        with session.transaction(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS) as cursor:
            status = webhook_tables.read_status(cursor, app.app_id)
    config = app.webhooks
    data = {
        "appId": app.app_id,
        "url": config.url if config else None,
        "events": sorted(config.events) if config else [],
        "offlineGraceSeconds": config.offline_grace_seconds if config else None,
        "pending": status.pending,
        "failed": status.failed,
        "delivered": status.delivered,
        "lastAttemptAt": status.last_attempt_at,
        "lastSuccessAt": status.last_success_at,
        "lastError": status.last_error,
    }
    lines = [f"Webhooks of app {app.app_id}"]
    if config is None:
        lines.append("  not configured (add [apps.webhooks] to the configuration file)")
    else:
        lines += [
            f"  url:            {config.url}",
            f"  events:         {', '.join(sorted(config.events))}",
            f"  offline grace:  {config.offline_grace_seconds:g} s",
        ]
    lines += [
        f"  pending:        {status.pending}",
        f"  failed:         {status.failed}" + (" (meteredrt webhooks replay sends them again)" if status.failed else ""),
        f"  delivered:      {status.delivered}",
        f"  last attempt:   {_when(status.last_attempt_at)}",
        f"  last success:   {_when(status.last_success_at)}",
        f"  last error:     {status.last_error or '-'}",
    ]
    return Output(data, "\n".join(lines))


@command(
    "webhooks replay",
    "Send an app's failed webhook events again, in their original order; a running server picks "
    "them up within about 5 s.",
    argument("--app", required=True, metavar="APP"),
)
def _webhooks_replay(session: Session, args: argparse.Namespace) -> Output:
    app = _webhooks_of(session, args.app)
    count = 0
    if session.database.exists(webhook_tables.COMPONENT):
        with session.transaction(webhook_tables.COMPONENT, webhook_tables.MIGRATIONS) as cursor:
            count = webhook_tables.replay_failed(cursor, app.app_id)
    return Output({"appId": app.app_id, "replayed": count}, f"{count} failed events of {app.app_id} are pending again.")
