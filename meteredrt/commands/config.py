"""
C{meteredrt config init}: a commented configuration file with fresh keys.
"""

from __future__ import annotations

import argparse

from meteredrt import configinit
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.session import Session
from meteredrt.config import DEFAULT_LISTEN, app_id_problem
from meteredrt.store.keys import DEFAULT_APP_ID


@command(
    "config init",
    "Write a commented configuration file declaring one app with a fresh secret key and "
    "publishable key (mode 0600: it holds the secret). Never overwrites an existing file.",
    argument("path", nargs="?", default="meteredrt.toml", metavar="PATH", help="default: meteredrt.toml"),
    argument("--app", default=DEFAULT_APP_ID, metavar="APP", help=f"the app's id (default: {DEFAULT_APP_ID})"),
    argument(
        "--listen",
        action="append",
        metavar="STRPORT",
        help=f"repeatable endpoint for the file's listen list (default: {DEFAULT_LISTEN[0]})",
    ),
)
def _config_init(session: Session, args: argparse.Namespace) -> Output:
    problem = app_id_problem(args.app)
    if problem is not None:
        raise UsageError(f"--app: {problem}")
    listen = args.listen or list(DEFAULT_LISTEN)
    if not all(endpoint.strip() for endpoint in listen):
        raise UsageError("--listen must not be empty")
    secret_key, publishable_key = configinit.fresh_keys(args.app, session.now())
    text = configinit.render_config(
        args.app, secret_key, publishable_key, listen=listen, data_dir=session.data_dir
    )
    try:
        configinit.write_new_file(args.path, text)
    except FileExistsError:
        raise UsageError(f"{args.path} already exists; not overwriting it") from None
    data = {
        "path": args.path,
        "appId": args.app,
        "secretKeyId": secret_key.key_id,
        "publishableKey": publishable_key.key_id,
    }
    summary = (
        f"Wrote {args.path} (mode 0600) declaring app {args.app} with\n"
        f"  secret key:      {secret_key.key_id} (its secret is in the file)\n"
        f"  publishable key: {publishable_key.key_id}\n"
        f"Start the server with: twistd -n meteredrt --config {args.path}"
    )
    return Output(data, summary)
