"""
The single-node broker: routing is a direct call into the local hub.

Delivering synchronously, in the caller's turn, is what gives per-sender
FIFO on one node for free; the cluster broker (L{meteredrt.broker.redis})
keeps it with one ordered stream per node.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from meteredrt.interfaces import IBroker, IDeliveryTarget


@implementer(IBroker)
class MemoryBroker:
    """
    An L{IBroker} for one process. Interest registration is a no-op: the
    only node is always interested.
    """

    def __init__(self) -> None:
        self._target: IDeliveryTarget | None = None

    def attach(self, target: IDeliveryTarget) -> None:
        self._target = target

    def _route(self, app_id: str, envelope: object) -> Deferred[int | None]:
        assert self._target is not None, "attach() a delivery target first"
        return succeed(self._target.deliver(app_id, envelope))

    def publish(self, app_id: str, channel: str, envelope: object) -> Deferred[int | None]:
        return self._route(app_id, envelope)

    def direct(self, app_id: str, peer_id: str, envelope: object) -> Deferred[int]:
        assert self._target is not None, "attach() a delivery target first"
        return succeed(self._target.deliver(app_id, envelope))

    def _interest(self, app_id: str, name: str) -> Deferred[None]:
        return succeed(None)

    watch_channel = unwatch_channel = watch_pattern = unwatch_pattern = _interest
    watch_peer = unwatch_peer = _interest
