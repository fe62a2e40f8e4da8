"""
Public in-memory fakes for testing code built on meteredrt.

  - L{RecordingSink}: an L{IConnectionSink} that keeps every frame the hub
    hands it (the objects and their decoded JSON) and every close.
  - L{MemoryKeyStore}: an L{IKeyStore} held in a dict, for WebSocket and
    REST tests that need keys without SQLite and its thread pool.
  - L{HeldAnswers} with L{HeldBroker}, L{HeldPresence} and L{HeldMeter}:
    wrappers that hold back the answers of an L{IBroker}, L{IPresence} and
    L{IMeter} until the test releases them, to play out what a networked
    implementation (Redis) makes possible between a call and its answer.

All are verified against their interfaces in C{tests/test_testing.py}.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from meteredrt.apps import KEY_ID_PREFIX, SECRET_PREFIX, App, Key, KeyType, Plan
from meteredrt.interfaces import (
    IBroker,
    IConnectionSink,
    IDeliveryTarget,
    IKeyStore,
    IMeter,
    IPresence,
    StoreUnavailable,
)
from meteredrt.membership import Joining, Member
from meteredrt.protocol import OutboundFrame

_T = TypeVar("_T")


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
        #: Set to C{False} to act like a store whose database is down:
        #: unknown keys then raise L{StoreUnavailable}.
        self.reachable = True

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
        key = self._keys.get(key_id)
        if key is None and not self.reachable:
            raise StoreUnavailable("the key store cannot reach its database")
        return key

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


class HeldAnswers:
    """
    The answers of wrapped calls, held back in call order until released.

    Each call reaches the wrapped implementation at once, so its effect
    happens in call order, as commands pipelined on one Redis connection
    do; only its answer waits. While L{holding} is false answers pass
    straight through, so a test can set up synchronously first.

    @ivar holding: whether answers are held back now.
    """

    def __init__(self) -> None:
        self.holding = False
        self._held: list[tuple[str, Deferred[Any], Deferred[Any]]] = []

    @property
    def pending(self) -> list[str]:
        """
        The method names of the calls whose answers are held, oldest first.
        """
        return [name for name, _, _ in self._held]

    def hold(self, name: str, answer: Deferred[_T]) -> Deferred[_T]:
        """
        The Deferred the caller of C{name} gets for C{answer}: C{answer}
        itself when not L{holding}, else one that fires with it on release.
        """
        if not self.holding:
            return answer
        held: Deferred[_T] = Deferred()
        self._held.append((name, answer, held))
        return held

    def release(self, name: str) -> None:
        """
        Let the answer of the oldest held call of C{name} through.

        @raise KeyError: if no call of C{name} is held.
        """
        for index, (held_name, answer, held) in enumerate(self._held):
            if held_name == name:
                del self._held[index]
                answer.chainDeferred(held)
                return
        raise KeyError(name)

    def fail(self, name: str, reason: BaseException) -> None:
        """
        Fail the oldest held call of C{name} with C{reason}, as a backend
        that lost its connection would, whatever the wrapped call answered.

        @raise KeyError: if no call of C{name} is held.
        """
        for index, (held_name, answer, held) in enumerate(self._held):
            if held_name == name:
                del self._held[index]
                answer.addErrback(lambda _: None)
                held.errback(reason)
                return
        raise KeyError(name)

    def release_all(self) -> None:
        """
        Let every held answer through, oldest first, including those of calls
        made while releasing.
        """
        while self._held:
            _, answer, held = self._held.pop(0)
            answer.chainDeferred(held)


@implementer(IBroker)
class HeldBroker:
    """
    An L{IBroker} whose answers L{HeldAnswers} holds back; routing is done
    by the wrapped broker at call time.

    @ivar watched: the interest registered and not withdrawn, as
        C{(method suffix, app id, name)}: C{("channel", "app_1", "room")}.
    """

    def __init__(self, broker: IBroker, answers: HeldAnswers) -> None:
        self._broker = broker
        self._answers = answers
        self.watched: set[tuple[str, str, str]] = set()

    def attach(self, target: IDeliveryTarget) -> None:
        self._broker.attach(target)

    def _watch(self, kind: str, app_id: str, name: str, answer: Deferred[None]) -> Deferred[None]:
        self.watched.add((kind, app_id, name))
        return self._answers.hold(f"watch_{kind}", answer)

    def _unwatch(self, kind: str, app_id: str, name: str, answer: Deferred[None]) -> Deferred[None]:
        self.watched.discard((kind, app_id, name))
        return self._answers.hold(f"unwatch_{kind}", answer)

    def watch_channel(self, app_id: str, channel: str) -> Deferred[None]:
        return self._watch("channel", app_id, channel, self._broker.watch_channel(app_id, channel))

    def unwatch_channel(self, app_id: str, channel: str) -> Deferred[None]:
        return self._unwatch("channel", app_id, channel, self._broker.unwatch_channel(app_id, channel))

    def watch_pattern(self, app_id: str, pattern: str) -> Deferred[None]:
        return self._watch("pattern", app_id, pattern, self._broker.watch_pattern(app_id, pattern))

    def unwatch_pattern(self, app_id: str, pattern: str) -> Deferred[None]:
        return self._unwatch("pattern", app_id, pattern, self._broker.unwatch_pattern(app_id, pattern))

    def watch_peer(self, app_id: str, peer_id: str) -> Deferred[None]:
        return self._watch("peer", app_id, peer_id, self._broker.watch_peer(app_id, peer_id))

    def unwatch_peer(self, app_id: str, peer_id: str) -> Deferred[None]:
        return self._unwatch("peer", app_id, peer_id, self._broker.unwatch_peer(app_id, peer_id))

    def publish(self, app_id: str, channel: str, envelope: object) -> Deferred[int | None]:
        return self._answers.hold("publish", self._broker.publish(app_id, channel, envelope))

    def direct(self, app_id: str, peer_id: str, envelope: object) -> Deferred[int]:
        return self._answers.hold("direct", self._broker.direct(app_id, peer_id, envelope))


@implementer(IPresence)
class HeldPresence:
    """
    An L{IPresence} whose answers L{HeldAnswers} holds back; the wrapped
    presence changes at call time.
    """

    def __init__(self, presence: IPresence, answers: HeldAnswers) -> None:
        self._presence = presence
        self._answers = answers

    def attach(self, target: IDeliveryTarget) -> None:
        self._presence.attach(target)

    def add_member(
        self,
        app_id: str,
        channel: str,
        peer_id: str,
        conn_id: str,
        metadata: dict[str, Any] | None,
        *,
        snapshot: bool,
    ) -> Deferred[Joining]:
        answer = self._presence.add_member(app_id, channel, peer_id, conn_id, metadata, snapshot=snapshot)
        return self._answers.hold("add_member", answer)

    def remove_member(self, app_id: str, channel: str, peer_id: str, conn_id: str) -> Deferred[Member | None]:
        return self._answers.hold("remove_member", self._presence.remove_member(app_id, channel, peer_id, conn_id))

    def members(self, app_id: str, channel: str) -> Deferred[list[Member]]:
        return self._answers.hold("members", self._presence.members(app_id, channel))

    def snapshot(self, app_id: str, channel: str) -> Deferred[Joining]:
        return self._answers.hold("snapshot", self._presence.snapshot(app_id, channel))

    def add_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        return self._answers.hold("add_connection", self._presence.add_connection(app_id, peer_id, conn_id))

    def remove_connection(self, app_id: str, peer_id: str, conn_id: str) -> Deferred[None]:
        return self._answers.hold("remove_connection", self._presence.remove_connection(app_id, peer_id, conn_id))

    def connections_of(self, app_id: str, peer_id: str) -> Deferred[frozenset[str]]:
        return self._answers.hold("connections_of", self._presence.connections_of(app_id, peer_id))


@implementer(IMeter)
class HeldMeter:
    """
    An L{IMeter} whose answers L{HeldAnswers} holds back; the wrapped meter
    decides and counts at call time.
    """

    def __init__(self, meter: IMeter, answers: HeldAnswers) -> None:
        self._meter = meter
        self._answers = answers

    def admit_connection(self, app: App) -> Deferred[bool]:
        return self._answers.hold("admit_connection", self._meter.admit_connection(app))

    def release_connection(self, app_id: str) -> None:
        self._meter.release_connection(app_id)

    def count_message(self, app: App) -> Deferred[bool]:
        return self._answers.hold("count_message", self._meter.count_message(app))

    def usage(self, app: App) -> Deferred[dict[str, object]]:
        return self._answers.hold("usage", self._meter.usage(app))
