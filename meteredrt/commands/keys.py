"""
C{meteredrt keys ...}: create, list, revoke.
"""

from __future__ import annotations

import argparse

from meteredrt.apps import ACTIONS, PUBLISHABLE_DEFAULT_ACTIONS, KeyType
from meteredrt.commands.options import split_values
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.render import describe_key, key_json, table
from meteredrt.commands.session import Session
from meteredrt.store.keys import store_key, store_revocation


@command(
    "keys create",
    "Create a key; a secret key's secret is printed this once only.",
    argument("--app", required=True, metavar="APP"),
    argument("--type", required=True, choices=[t.value for t in KeyType]),
    argument(
        "--channels",
        action="append",
        metavar="PATTERNS",
        help="comma-separated channel patterns (default: **)",
    ),
    argument(
        "--actions",
        action="append",
        metavar="ACTIONS",
        help=f"comma-separated, of {', '.join(sorted(ACTIONS))} "
        "(default: all for a secret key, all but send for a publishable key)",
    ),
    argument(
        "--origins",
        action="append",
        metavar="ORIGINS",
        help="comma-separated allowed origins of a publishable key (default: any)",
    ),
    argument(
        "--no-auto-inject-turn",
        dest="auto_inject_turn",
        action="store_false",
        help="do not add TURN credentials to this key's welcome frames",
    ),
)
def _keys_create(session: Session, args: argparse.Namespace) -> Output:
    type = KeyType(args.type)
    actions = split_values(args.actions)
    if actions is None:
        actions = sorted(ACTIONS if type is KeyType.SECRET else PUBLISHABLE_DEFAULT_ACTIONS)
    key = session.write(
        store_key,
        args.app,
        type,
        ("**",) if args.channels is None else tuple(split_values(args.channels) or ()),
        tuple(actions),
        session.now(),
        tuple(split_values(args.origins) or ()),
        args.auto_inject_turn,
    )
    return Output(key_json(key, reveal_secret=True), "Created " + describe_key(key, reveal_secret=True))


@command(
    "keys list",
    "List an app's keys (never their secrets).",
    argument("--app", required=True, metavar="APP"),
)
def _keys_list(session: Session, args: argparse.Namespace) -> Output:
    tenancy = session.tenancy()
    if tenancy.app(args.app) is None:
        raise UsageError(f"no app {args.app!r}")
    keys = tenancy.keys_of(args.app)
    rows = [
        [
            key.key_id,
            key.type.value,
            "active" if key.active else "revoked",
            key.source,
            ",".join(key.channel_patterns),
            ",".join(sorted(key.actions)),
            ",".join(key.allowed_origins) or "-",
            "on" if key.auto_inject_turn else "off",
        ]
        for key in keys
    ]
    text = table(["KEY ID", "TYPE", "STATUS", "SOURCE", "CHANNELS", "ACTIONS", "ORIGINS", "TURN"], rows)
    return Output([key_json(key) for key in keys], text or f"App {args.app} has no keys.")


@command(
    "keys revoke",
    "Revoke a key; a running server refuses it within seconds.",
    argument("key_id", metavar="KEY_ID"),
)
def _keys_revoke(session: Session, args: argparse.Namespace) -> Output:
    if not session.write(store_revocation, args.key_id):
        raise UsageError(f"no stored key {args.key_id!r}")
    return Output({"keyId": args.key_id, "status": "revoked"}, f"Revoked key {args.key_id}.")
