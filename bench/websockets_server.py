"""
A minimal server on Python ``websockets`` (asyncio) speaking the hot subset
of the protocol that the load generator uses: JWT connect (HS256, header
``kid``), welcome, subscribe/ack, publish fan-out, direct send, ping/pong.
No presence, metering, persistence or backpressure.

It is the ``websockets`` variant of ``bench/run.py``: what a lean server on
the other mainstream Python WebSocket stack costs for the same work, so
that meteredrt's figures can be given as a ratio to it measured in the same
batch. asyncio writes to the socket at once when its buffer is empty, where
Twisted arms the writer for the next pass of the loop; the ping-pong ratio
shows what that, and the rest of the stack, are worth.

Needs ``websockets`` (14 or newer), ``pyjwt`` and ``orjson``::

    python bench/websockets_server.py --port 8766 --jwt-kid KID --jwt-secret SECRET
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

MAX_MESSAGE_SIZE = 64 * 1024
PONG = orjson.dumps({"type": "pong"}).decode()


class Hub:
    """
    The peers by id and the subscribers by channel, and what each frame
    type does with them.
    """

    def __init__(self, key_id: str, secret: str) -> None:
        self.keys = {key_id: secret.encode()}
        self.peers: dict[str, ServerConnection] = {}
        self.channels: dict[str, dict[ServerConnection, None]] = {}

    def verify(self, connection: ServerConnection, request: Request) -> Response | None:
        """
        The upgrade's check (``process_request``): a refusal, or C{None}
        with the token's claims kept on the connection.
        """
        url = urlsplit(request.path)
        if url.path != "/v1":
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown path\n")
        token = (parse_qs(url.query).get("token") or [""])[0]
        try:
            key = self.keys.get(jwt.get_unverified_header(token).get("kid"))
            if key is None:
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unknown kid\n")
            claims = jwt.decode(token, key, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as e:
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"invalid token: {e}\n")
        connection.claims = claims  # type: ignore[attr-defined]
        return None

    async def serve_peer(self, connection: ServerConnection) -> None:
        claims: dict[str, Any] = connection.claims  # type: ignore[attr-defined]
        peer_id = str(claims["sub"])
        expires = int(claims["exp"])
        patterns = tuple(claims.get("channels") or ())
        permissions = set(claims.get("permissions") or ())
        subscriptions: set[str] = set()
        loop = asyncio.get_running_loop()
        previous = self.peers.get(peer_id)
        if previous is not None:
            # As the reference server does: start the close, do not wait for it.
            loop.create_task(previous.close(4409, "replaced by a newer connection"))
        self.peers[peer_id] = connection
        expiry = loop.call_later(
            max(0.0, expires - time.time()), lambda: loop.create_task(connection.close(4401, "token expired"))
        )
        welcome = {
            "type": "welcome",
            "peerId": peer_id,
            "expiresAt": expires * 1000,
            "serverTime": int(time.time() * 1000),
            "maxMessageSize": MAX_MESSAGE_SIZE,
        }
        try:
            await connection.send(orjson.dumps(welcome).decode())
            async for payload in connection:
                reply = self.handle(connection, peer_id, patterns, permissions, subscriptions, payload)
                if reply is not None:
                    await connection.send(reply)
        except ConnectionClosed:
            pass
        finally:
            expiry.cancel()
            if self.peers.get(peer_id) is connection:
                del self.peers[peer_id]
            for channel in subscriptions:
                members = self.channels.get(channel)
                if members is not None:
                    members.pop(connection, None)
                    if not members:
                        del self.channels[channel]

    def handle(
        self,
        connection: ServerConnection,
        peer_id: str,
        patterns: tuple[str, ...],
        permissions: set[str],
        subscriptions: set[str],
        payload: str | bytes,
    ) -> str | None:
        """
        One client frame: the reply to its sender, if any. Fan-out and
        directs go out through L{broadcast}, which writes without waiting.
        """
        try:
            frame = orjson.loads(payload)
            kind = frame["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error("bad_request")
        request_id = frame.get("requestId")
        if kind == "send":
            target = self.peers.get(frame.get("to"))
            if "send" not in permissions:
                return error("forbidden", request_id)
            if target is None:
                return error("peer_not_found", request_id)
            direct = {"type": "direct", "from": peer_id, "data": frame.get("data")}
            broadcast([target], orjson.dumps(direct).decode())
            return None
        if kind == "ping":
            return PONG
        channel = frame.get("channel")
        if kind == "publish":
            if "publish" not in permissions or not allowed(patterns, channel):
                return error("forbidden", request_id)
            members = self.channels.get(channel)
            if members:
                message = {"type": "message", "channel": channel, "from": peer_id, "data": frame.get("data")}
                broadcast([m for m in members if m is not connection], orjson.dumps(message).decode())
            return None if request_id is None else ack(request_id)
        if kind == "subscribe":
            if "subscribe" not in permissions or not allowed(patterns, channel):
                return error("forbidden", request_id)
            self.channels.setdefault(channel, {})[connection] = None
            subscriptions.add(channel)
            return ack(request_id)
        return error("unknown_type", request_id)


def allowed(patterns: tuple[str, ...], channel: Any) -> bool:
    """
    Whether the token's channel claim (names, C{prefix*}) covers C{channel}.
    """
    if not isinstance(channel, str) or not channel:
        return False
    return any(p == channel or (p.endswith("*") and channel.startswith(p[:-1])) for p in patterns)


def ack(request_id: Any) -> str:
    return orjson.dumps({"type": "ack", "requestId": request_id}).decode()


def error(code: str, request_id: Any = None) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code}
    if request_id is not None:
        frame["requestId"] = request_id
    return orjson.dumps(frame).decode()


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jwt-kid", required=True)
    parser.add_argument("--jwt-secret", required=True)
    args = parser.parse_args(argv)
    hub = Hub(args.jwt_kid, args.jwt_secret)
    async with serve(
        hub.serve_peer,
        "127.0.0.1",
        args.port,
        process_request=hub.verify,
        max_size=MAX_MESSAGE_SIZE,
        ping_interval=None,
        compression=None,
        backlog=1024,
    ) as server:
        print(f"websockets server listening on ws://127.0.0.1:{args.port}/v1", file=sys.stderr, flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
