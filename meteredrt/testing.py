"""
Public in-memory fakes for testing code built on meteredrt.

  - L{RecordingSink}: an L{IConnectionSink} that keeps every frame the hub
    hands it (the objects and their decoded JSON) and every close.
  - L{MemoryKeyStore}: an L{IKeyStore} held in a dict, for WebSocket and
    REST tests that need keys without SQLite and its thread pool.

Both are verified against their interfaces in C{tests/test_testing.py}.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from meteredrt.apps import KEY_ID_PREFIX, SECRET_PREFIX, App, Key, KeyType, Plan
from meteredrt.interfaces import IConnectionSink, IKeyStore
from meteredrt.protocol import OutboundFrame


@implementer(IConnectionSink)
class RecordingSink:
    """
    A connection that records what it is sent instead of sending it.

    @ivar frames: every L{OutboundFrame} received, in order (the very
        objects, so tests can check that receivers share one).
    @ivar closes: every C{(code, reason)} passed to L{close}, in order.
    """

    def __init__(self, conn_id: str = "") -> None:
        self.conn_id = conn_id
        self.frames: list[OutboundFrame] = []
        self.closes: list[tuple[int, str]] = []

    def send_frame(self, frame: OutboundFrame) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    @property
    def decoded(self) -> list[dict[str, Any]]:
        """
        The received frames as JSON objects, in order.
        """
        return [json.loads(frame.payload) for frame in self.frames]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """
        The received frames whose C{type} is C{kind}, decoded, in order.
        """
        return [frame for frame in self.decoded if frame.get("type") == kind]

    def clear(self) -> None:
        """
        Forget the frames received so far (closes are kept).
        """
        self.frames.clear()


@implementer(IKeyStore)
class MemoryKeyStore:
    """
    Apps and keys in memory; every change applies at once and returns an
    already-fired Deferred.
    """

    def __init__(self) -> None:
        self._apps: dict[str, App] = {}
        self._keys: dict[str, Key] = {}

    def add_app(self, app: App) -> App:
        """
        Put an app in place (replacing one with the same id), synchronously.
        """
        self._apps[app.app_id] = app
        return app

    def add_key(self, key: Key) -> Key:
        """
        Put a key in place (replacing one with the same id), synchronously.
        """
        self._keys[key.key_id] = key
        return key

    def key(self, key_id: str) -> Key | None:
        return self._keys.get(key_id)

    def app(self, app_id: str) -> App | None:
        return self._apps.get(app_id)

    def apps(self) -> list[App]:
        return [self._apps[app_id] for app_id in sorted(self._apps)]

    def keys_of(self, app_id: str) -> list[Key]:
        return [key for key_id, key in sorted(self._keys.items()) if key.app_id == app_id]

    def create_app(self, app_id: str, plan: Plan | None = None) -> Deferred[App]:
        if app_id in self._apps:
            return fail(ValueError(f"app exists: {app_id}"))
        return succeed(self.add_app(App(app_id, plan)))

    def create_key(
        self,
        app_id: str,
        type: KeyType,
        channel_patterns: tuple[str, ...],
        actions: frozenset[str],
        allowed_origins: tuple[str, ...] = (),
        auto_inject_turn: bool = True,
    ) -> Deferred[Key]:
        if app_id not in self._apps:
            return fail(ValueError(f"no such app: {app_id}"))
        key = Key(
            key_id=KEY_ID_PREFIX[type] + secrets.token_hex(8),
            app_id=app_id,
            type=type,
            channel_patterns=tuple(channel_patterns),
            actions=frozenset(actions),
            secret=SECRET_PREFIX + secrets.token_hex(16) if type is KeyType.SECRET else None,
            allowed_origins=tuple(allowed_origins),
            auto_inject_turn=auto_inject_turn,
        )
        return succeed(self.add_key(key))

    def revoke_key(self, key_id: str) -> Deferred[bool]:
        key = self._keys.get(key_id)
        if key is None:
            return succeed(False)
        self._keys[key_id] = attrs.evolve(key, revoked=True)
        return succeed(True)

    def set_plan(self, app_id: str, plan: Plan | None) -> Deferred[App]:
        app = self._apps.get(app_id)
        if app is None:
            return fail(ValueError(f"no such app: {app_id}"))
        return succeed(self.add_app(attrs.evolve(app, plan=plan)))
