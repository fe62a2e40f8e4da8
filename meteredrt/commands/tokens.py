"""
C{meteredrt token mint}.
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import jwt
import treq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from meteredrt import auth
from meteredrt.apps import Key, KeyType, TurnConfig
from meteredrt.backend import mint_token_with_turn
from meteredrt.commands.options import json_object, split_values
from meteredrt.commands.registry import Output, UsageError, argument, command
from meteredrt.commands.session import Session
from meteredrt.turn import TurnApiClient, TurnApiError


@command(
    "token mint",
    "Print a JWT (protocol §4) signed with a secret key.",
    argument("--app", required=True, metavar="APP"),
    argument("--key", required=True, metavar="KEY_ID", help="the sk_id_… of the signing key"),
    argument("--peer-id", required=True, metavar="PEER_ID", help="the token's sub, the peer's id"),
    argument(
        "--channels", action="append", metavar="CHANNELS", help="comma-separated channel names or patterns"
    ),
    argument("--permissions", action="append", metavar="ACTIONS", help="comma-separated actions"),
    argument("--expires-in", type=int, default=3600, metavar="SECONDS", help="lifetime (default: 3600)"),
    argument("--metadata", metavar="JSON", help="private metadata object echoed in the welcome"),
    argument("--peer-metadata", metavar="JSON", help="public metadata object shown to other peers"),
    argument(
        "--turn",
        action="store_true",
        help="embed fresh Metered TURN credentials of the app ([apps.turn]) in metadata.iceServers",
    ),
)
def _token_mint(session: Session, args: argparse.Namespace) -> Output:
    metadata = json_object("--metadata", args.metadata)
    peer_metadata = json_object("--peer-metadata", args.peer_metadata)
    tenancy = session.tenancy()
    app = tenancy.app(args.app)
    if app is None:
        raise UsageError(f"no app {args.app!r}")
    key = tenancy.key(args.key)
    if key is None or key.app_id != args.app:
        raise UsageError(f"app {args.app!r} has no key {args.key!r}")
    if key.type is not KeyType.SECRET:
        raise UsageError(f"{args.key} is a publishable key; only secret keys sign tokens")
    if not key.active:
        raise UsageError(f"key {args.key!r} is revoked")
    claims: dict[str, Any] = dict(
        now=int(session.now()),
        expires_in=args.expires_in,
        channels=split_values(args.channels),
        permissions=split_values(args.permissions),
        metadata=metadata,
        peer_metadata=peer_metadata,
    )
    if not args.turn:
        token = auth.mint_token(key, args.peer_id, **claims)
    elif app.turn is None:
        raise UsageError(f"app {args.app!r} has no [apps.turn] configuration")
    else:
        token = _mint_with_turn(key, args.peer_id, app.turn, claims)
    claims = jwt.decode(token, options={"verify_signature": False})
    data = {"token": token, "keyId": key.key_id, "peerId": args.peer_id, "expiresAt": claims["exp"]}
    return Output(data, token)


def _mint_with_turn(key: Key, peer_id: str, turn: TurnConfig, claims: dict[str, Any]) -> str:
    """
    Run the reactor just long enough for the two TURN API calls of
    L{mint_token_with_turn}. The CLI is an entry point of its own, like the
    twistd plugin, so it may drive the global reactor.
    """
    from twisted.internet import reactor
    from twisted.internet.base import ReactorBase

    outcome: list[Any] = []

    async def work() -> str:
        client = TurnApiClient(treq, reactor, timeout=10.0)
        token, _ = await mint_token_with_turn(key, peer_id, client, turn, **claims)
        return token

    def finish(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(work()).addBoth(finish))
    # IReactorCore.run declares no parameters, but every reactor Twisted
    # ships runs ReactorBase.run, which takes installSignalHandlers.
    cast(ReactorBase, reactor).run(installSignalHandlers=False)
    [result] = outcome
    if isinstance(result, Failure):
        if result.check(TurnApiError):
            raise UsageError(f"the TURN API failed: {result.value}")
        result.raiseException()
    return result
