"""
C{meteredrt webhooks status} and C{meteredrt webhooks replay}: the presence
webhook outbox a server writes in its data directory, read and changed with
plain C{sqlite3} (WAL lets a running server and this command share it).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time

from meteredrt.apps import App
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.session import Session
from meteredrt.store.database import BUSY_TIMEOUT_MS
from meteredrt.webhooks.outbox import OutboxStatus, read_status, replay_failed, webhooks_database_path


def _webhooks_of(session: Session, app_id: str) -> App:
    app = session.tenancy().app(app_id)
    if app is None:
        raise UsageError(f"no app {app_id!r}")
    return app


def _open_outbox(session: Session) -> sqlite3.Connection | None:
    """
    The outbox file of the data directory for plain C{sqlite3} access, or
    C{None} when the server never wrote one.
    """
    path = webhooks_database_path(session.data_dir)
    if not os.path.exists(path):
        return None
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    cursor = connection.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'webhook_events'")
    if cursor.fetchone()[0] == 0:
        connection.close()
        return None
    return connection


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
    connection = _open_outbox(session)
    if connection is None:
        status = OutboxStatus()
    else:
        try:
            status = read_status(connection.cursor(), app.app_id)
        finally:
            connection.close()
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
    connection = _open_outbox(session)
    if connection is None:
        count = 0
    else:
        try:
            with connection:
                count = replay_failed(connection.cursor(), app.app_id)
        finally:
            connection.close()
    return Output({"appId": app.app_id, "replayed": count}, f"{count} failed events of {app.app_id} are pending again.")
