"""
Closing connections when their tokens expire, with one timer per expiry
instant instead of one per connection.

A JWT's C{exp} is a whole second, so the connections of a node expire in a
few distinct instants however many they are. L{ExpiryTimers} groups them by
that instant and schedules one reactor call per group: a connection joining
a group costs a dictionary entry instead of a delayed call (about 450 bytes
with its bound method, and a place in the reactor's heap of timers, which
every other timer then pays to get past).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Expiring(Protocol):
    """
    What L{ExpiryTimers} closes.
    """

    def token_expired(self) -> None:
        """
        The connection's token is about to expire: close it.
        """


class ExpiryTimers:
    """
    Calls L{Expiring.token_expired} on each connection C{lead} seconds
    before the expiry instant it was added with.
    """

    def __init__(self, clock: IReactorTime, lead: float) -> None:
        self._clock = clock
        self._lead = lead
        # expiry instant -> (its reactor call, the connections expiring then)
        self._groups: dict[float, tuple[IDelayedCall, dict[Expiring, None]]] = {}

    def add(self, expires_at: float, connection: Expiring) -> None:
        """
        Close C{connection} C{lead} seconds before C{expires_at} (at once if
        that is past), unless it is L{discard}ed first.
        """
        group = self._groups.get(expires_at)
        if group is None:
            delay = max(0.0, expires_at - self._clock.seconds() - self._lead)
            group = self._groups[expires_at] = (self._clock.callLater(delay, self._fire, expires_at), {})
        group[1][connection] = None

    def discard(self, expires_at: float, connection: Expiring) -> None:
        """
        Forget C{connection} (it has closed); the group's timer goes with
        its last connection.
        """
        group = self._groups.get(expires_at)
        if group is None:
            return
        call, members = group
        members.pop(connection, None)
        if not members:
            del self._groups[expires_at]
            call.cancel()

    def _fire(self, expires_at: float) -> None:
        _, members = self._groups.pop(expires_at)
        for connection in list(members):
            connection.token_expired()
