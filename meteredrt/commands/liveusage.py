"""
The live part of C{meteredrt usage} in a cluster: the connections open on
every node now, and the sampled cluster-wide peak, read from the
cluster's Redis.

The command line has no reactor, so this is one short blocking exchange
(L{read_live_usage}) with a timeout on every socket operation; it runs the
same script the nodes' reports run (L{meteredrt.redisscripts.USAGE_READ}).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import hiredis

from meteredrt import redisscripts
from meteredrt.redisaddress import RedisAddress
from meteredrt.redisclient import RedisError

#: Seconds the command waits for Redis at each step before giving up.
TIMEOUT = 2.0

#: The most a reply may hold before the exchange is abandoned (a reply
#: here is a few bytes; anything large is not Redis answering us).
_MAX_REPLY = 1 << 16

# A node id no node has: the script then counts every node's share.
_NO_NODE = ""


class LiveUsageUnavailable(Exception):
    """
    Redis could not tell the live figures; the message says why.
    """


def read_live_usage(address: RedisAddress, app_id: str, period_start: int, timeout: float = TIMEOUT) -> tuple[int, int]:
    """
    The app's connections open on the cluster's live nodes (as each last
    shared them, at most about a second ago) and the period's sampled
    cluster-wide peak.

    @raise LiveUsageUnavailable: Redis did not answer in time, refused the
        login, or answered with an error.
    """
    commands: list[tuple[Any, ...]] = []
    if address.password is not None:
        commands.append(
            ("AUTH", address.username, address.password) if address.username else ("AUTH", address.password)
        )
    if address.db:
        commands.append(("SELECT", address.db))
    commands.append(("EVAL", redisscripts.USAGE_READ.source, 0, app_id, _NO_NODE, period_start))
    try:
        replies = _exchange(address, commands, timeout)
    except (OSError, hiredis.ProtocolError) as e:
        raise LiveUsageUnavailable(f"Redis at {address} did not answer: {e}") from e
    for reply in replies:
        if isinstance(reply, Exception):
            raise LiveUsageUnavailable(f"Redis at {address} refused: {reply}")
    live, peak = replies[-1]
    return int(live), int(peak)


def _exchange(address: RedisAddress, commands: list[tuple[Any, ...]], timeout: float) -> list[Any]:
    """
    Send C{commands} pipelined on a new connection; their replies, in order.
    """
    raw = socket.create_connection((address.host, address.port), timeout=timeout)
    connection = raw
    try:
        if address.tls:
            connection = ssl.create_default_context().wrap_socket(raw, server_hostname=address.host)
        connection.settimeout(timeout)
        connection.sendall(b"".join(hiredis.pack_command(command) for command in commands))
        reader = hiredis.Reader(replyError=RedisError)
        replies: list[Any] = []
        received = 0
        while len(replies) < len(commands):
            data = connection.recv(4096)
            if not data:
                raise ConnectionError("Redis closed the connection")
            received += len(data)
            if received > _MAX_REPLY:
                raise ConnectionError("Redis sent more than any answer holds")
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        return replies
    finally:
        connection.close()
        raw.close()
