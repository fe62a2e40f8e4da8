"""
The cluster broker: routing between nodes through Redis pub/sub.

L{RedisBroker} implements L{IBroker} for one node of a cluster:

  - Interest: the node subscribes in Redis only to the channels and
    patterns its own connections hold (C{watch_*}), over its one
    subscriber connection; our glob patterns become Redis patterns that
    match at least as much (L{meteredrt.clusterwire.redis_pattern}) and the
    hub filters again with our rules.
  - A publish is delivered to this node's connections at once and sent to
    Redis on the node's one command connection without waiting for the
    reply (it is acked at once: at-most-once, as on one node). Other nodes
    decode it once and hand it to their hub, which serializes each frame
    once for all its receivers.
  - Exactly once per connection: one publish reaches a node as one Redis
    message per matching subscription, adjacent in its stream; the node
    delivers only the first (L{meteredrt.clusterwire.Deduplicator}), and
    the hub delivers one envelope once to every local receiver it concerns.
  - A direct or a kick is one script (L{meteredrt.redisscripts.DIRECT}):
    it reads the peer registry and publishes to the inbox of each other
    node holding the peer, returning how many connections that reaches.
  - Per-sender FIFO: everything a connection causes (publishes, its
    presence deltas, directs) leaves this node on the same command
    connection, in order; Redis executes it in that order and hands it to
    each subscriber connection in that order; this node's own receivers
    get it synchronously, in the same order.

While Redis is unreachable, local delivery carries on; what needs another
node (a direct to a peer not here, a kick) fails with L{BackendUnavailable}.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meteredrt import redisscripts
from meteredrt.clusterwire import (
    ClusterNode,
    Deduplicator,
    MalformedMessage,
    decode,
    encode,
    inbox,
    redis_pattern,
    topic,
)
from meteredrt.envelopes import DirectMessage, Disconnect
from meteredrt.interfaces import BackendUnavailable, IBroker, IDeliveryTarget
from meteredrt.redisclient import RedisClient, RedisSubscriber, RedisUnavailable


@implementer(IBroker)
class RedisBroker:
    """
    An L{IBroker} over one command connection and one subscriber
    connection to Redis.

    The subscriber is built by the caller with L{received} as its
    C{on_message}; call L{start} once both are set up.
    """

    log = Logger()

    def __init__(self, client: RedisClient, node: ClusterNode) -> None:
        self._client = client
        self._node = node
        self._own = node.origin + b"|"
        self._subscriber: RedisSubscriber | None = None
        self._target: IDeliveryTarget | None = None
        self._dedupe = Deduplicator()
        self._patterns: Counter[bytes] = Counter()
        self._publish_failures = 0
        client.register(redisscripts.DIRECT)

    def start(self, subscriber: RedisSubscriber) -> Deferred[None]:
        """
        Use C{subscriber} and listen on this node's inbox.
        """
        self._subscriber = subscriber
        subscriber.on_reconnected(self._reconnected)
        return self._interest(subscriber.subscribe(inbox(self._node.node_id)))

    def _reconnected(self) -> None:
        self._dedupe.reset()
        if self._publish_failures:
            self.log.info("Publishes reach other nodes again ({count} were lost)", count=self._publish_failures)
        self._publish_failures = 0

    def attach(self, target: IDeliveryTarget) -> None:
        self._target = target

    # -- inbound -------------------------------------------------------------

    def received(self, channel: bytes, payload: bytes, pattern: bytes | None) -> None:
        """
        One message from the subscriber connection (its C{on_message}).
        """
        if not self._dedupe.first(payload):
            return
        if payload.startswith(self._own):
            return  # delivered to this node's connections when it was sent
        try:
            _origin, app_id, envelope = decode(payload)
        except MalformedMessage as e:
            self.log.warn("Ignoring a malformed message on Redis channel {channel!r}: {why}", channel=channel, why=e)
            return
        version = getattr(envelope, "version", None)
        if version is not None:
            self._node.observe_version(version)
        assert self._target is not None
        self._target.deliver(app_id, envelope)

    # -- interest ------------------------------------------------------------

    def _interest(self, change: Deferred[None]) -> Deferred[None]:
        # While Redis is down the subscriber keeps the wish and restores it
        # on reconnect; local delivery does not depend on it.
        def down(failure: Failure) -> None:
            failure.trap(RedisUnavailable)

        return change.addErrback(down)

    def watch_channel(self, app_id: str, channel: str) -> Deferred[None]:
        assert self._subscriber is not None
        return self._interest(self._subscriber.subscribe(topic(app_id, channel)))

    def unwatch_channel(self, app_id: str, channel: str) -> Deferred[None]:
        assert self._subscriber is not None
        return self._interest(self._subscriber.unsubscribe(topic(app_id, channel)))

    def watch_pattern(self, app_id: str, pattern: str) -> Deferred[None]:
        # Several of our patterns can map to one Redis pattern (a/* and a/**).
        assert self._subscriber is not None
        mapped = redis_pattern(app_id, pattern)
        self._patterns[mapped] += 1
        # Subscribing again to a pattern already held is harmless, and its
        # confirmation comes after the first one's: the caller then knows
        # the pattern is routed here even if the first is still on its way.
        return self._interest(self._subscriber.psubscribe(mapped))

    def unwatch_pattern(self, app_id: str, pattern: str) -> Deferred[None]:
        assert self._subscriber is not None
        mapped = redis_pattern(app_id, pattern)
        self._patterns[mapped] -= 1
        if self._patterns[mapped] > 0:
            return succeed(None)
        del self._patterns[mapped]
        return self._interest(self._subscriber.punsubscribe(mapped))

    def watch_peer(self, app_id: str, peer_id: str) -> Deferred[None]:
        # Directs reach this node through its inbox and the peer registry
        # (kept by the presence).
        return succeed(None)

    unwatch_peer = watch_peer

    # -- outbound ------------------------------------------------------------

    def publish(self, app_id: str, channel: str, envelope: object) -> Deferred[int | None]:
        assert self._target is not None
        self._target.deliver(app_id, envelope)
        if self._client.connected:
            self._client.execute("PUBLISH", topic(app_id, channel), encode(self._node, app_id, envelope)).addErrback(
                self._publish_failed
            )
        # How many connections other nodes reached is not known here.
        return succeed(None)

    def _publish_failed(self, failure: Failure) -> None:
        # Acked already (at most once): count, and say so once per run of
        # failures rather than once per message.
        self._publish_failures += 1
        if self._publish_failures == 1:
            self.log.warn("Publishes are not reaching other nodes: {why}", why=failure.getErrorMessage())

    def direct(self, app_id: str, peer_id: str, envelope: object) -> Deferred[int]:
        return Deferred.fromCoroutine(self._direct(app_id, peer_id, envelope))

    async def _direct(self, app_id: str, peer_id: str, envelope: object) -> int:
        assert self._target is not None
        local = self._target.deliver(app_id, envelope)
        sender = envelope.sender_conn if isinstance(envelope, DirectMessage) else ""
        try:
            remote = await self._client.run(
                redisscripts.DIRECT,
                (),
                (app_id, peer_id, self._node.node_id, sender, encode(self._node, app_id, envelope)),
            )
        except RedisUnavailable as e:
            if local and not isinstance(envelope, Disconnect):
                return local  # at most once for the nodes we cannot reach
            raise BackendUnavailable(f"cannot reach other nodes through Redis: {e}") from None
        return local + int(remote)
