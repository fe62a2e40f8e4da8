"""
A starting configuration file with fresh keys: ``meteredrt config init``.

An operator who manages the server from a file wants one that already
declares an app with working keys and says, in comments, what each setting
does. L{render_config} writes that text (pure; the keys come in as
arguments) and L{write_new_file} puts it on disk without ever replacing an
existing file and readable by its owner only, since it holds a secret.

Keys are made by L{meteredrt.store.keys.new_key}, so they have exactly the
shape and randomness of keys the CLI creates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from meteredrt.apps import ACTIONS, PUBLISHABLE_DEFAULT_ACTIONS, Key, KeyType
from meteredrt.store.keys import new_key

#: File mode of a generated configuration: it holds a secret.
CONFIG_FILE_MODE = 0o600


def fresh_keys(app_id: str, now: float) -> tuple[Key, Key]:
    """
    A new secret key (every action) and a new publishable key (every action
    but C{send}), both for every channel (C{**}).
    """
    secret = new_key(app_id, KeyType.SECRET, ("**",), sorted(ACTIONS), now=now)
    publishable = new_key(app_id, KeyType.PUBLISHABLE, ("**",), sorted(PUBLISHABLE_DEFAULT_ACTIONS), now=now)
    return secret, publishable


def toml_string(text: str) -> str:
    """
    C{text} as a TOML basic string: quotes, backslashes and control
    characters escaped, everything else as it is.
    """
    escaped = []
    for character in text:
        if character in '"\\':
            escaped.append("\\" + character)
        elif ord(character) < 0x20 or ord(character) == 0x7F:
            escaped.append(f"\\u{ord(character):04x}")
        else:
            escaped.append(character)
    return '"' + "".join(escaped) + '"'


def _strings(values: Sequence[str]) -> str:
    return "[" + ", ".join(toml_string(value) for value in values) + "]"


def render_config(
    app_id: str,
    secret_key: Key,
    publishable_key: Key,
    *,
    listen: Sequence[str],
    data_dir: str,
) -> str:
    """
    The text of a commented configuration file declaring one app with the
    two given keys.
    """
    assert secret_key.secret is not None
    return f"""\
# meteredrt configuration, written by `meteredrt config init`.
# Start the server with it:   twistd -n meteredrt --config <this file>
# Every setting is described in docs/operator-guide.md. This file holds a
# secret: keep it readable by the server's user only (it was created 0600).

[server]
# Twisted endpoint strings, one listener each. Loopback only by default;
# "tcp:8080:interface=0.0.0.0" listens on every interface, and
# "ssl:8443:privateKey=key.pem:certKey=cert.pem" serves wss:// itself.
listen = {_strings(listen)}
# Apps and keys created with the CLI, and the usage counters, live here.
# A relative path is relative to the server's working directory.
data_dir = {toml_string(data_dir)}
# WebSocket upgrades accepted per client IP address per 60 s (then HTTP 429).
upgrade_rate_limit = 60
# Reverse proxies whose X-Forwarded-For names the client, e.g. ["127.0.0.1"].
# Empty: nobody is trusted and the TCP peer is the client.
trusted_proxies = []
# Seconds a client has to send a whole HTTP request (then 408 and close).
request_timeout_seconds = 15
# Open connections one client address may hold (IPv6: per /64).
max_connections_per_ip = 256
# On SIGTERM, /readyz answers 503 this long before connections are drained,
# so a load balancer takes the node out of rotation first.
drain_grace_seconds = 5

[[apps]]
id = {toml_string(app_id)}

# Optional: limits and billing for this app (docs/metering.md). Without a
# plan the app is counted but never limited.
# [apps.plan]
# name = "FREE"
# max_concurrent_connections = 100
# max_messages_per_period = 100000
# overages_allowed = false

# Optional: TURN credentials added to welcome frames (docs/webrtc.md).
# [apps.turn]
# app_name = "myapp"
# secret_key = "..."

# Optional: tell your backend who is online (docs/webhooks.md).
# [apps.webhooks]
# url = "https://backend.example/metered-hooks"
# secret = "..."                  # at least 32 characters: openssl rand -hex 32
# offline_grace_seconds = 3

# The secret key pair: your backend signs JWTs with the secret (or mints
# them with POST /v1/tokens or `meteredrt token mint`) and authenticates
# REST calls with "Authorization: Bearer <key_id>:<secret>".
[[apps.keys]]
type = "secret"
key_id = {toml_string(secret_key.key_id)}
secret = {toml_string(secret_key.secret)}
channel_patterns = {_strings(secret_key.channel_patterns)}
actions = {_strings(sorted(secret_key.actions))}

# The publishable key: safe to ship in a browser or device, which connects
# with ?key=<key_id> and gets a random peerId. Narrow it before going live:
# channel_patterns such as ["public/**"], and allowed_origins such as
# ["https://app.example.com"] (empty: any origin).
[[apps.keys]]
type = "publishable"
key_id = {toml_string(publishable_key.key_id)}
channel_patterns = {_strings(publishable_key.channel_patterns)}
actions = {_strings(sorted(publishable_key.actions))}
allowed_origins = []
"""


def write_new_file(path: str, text: str) -> None:
    """
    Create C{path} with C{text}, mode L{CONFIG_FILE_MODE}.

    :raises FileExistsError: if anything exists at C{path} (a dangling
        symbolic link included); nothing is written then.
    :raises OSError: if the file cannot be created or written; a partly
        written file is removed.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, CONFIG_FILE_MODE)
    try:
        # The umask may have taken bits away, never added any; make it exact.
        os.fchmod(descriptor, CONFIG_FILE_MODE)
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            descriptor = -1
            f.write(text)
    except BaseException:
        if descriptor >= 0:
            os.close(descriptor)
        os.unlink(path)
        raise
