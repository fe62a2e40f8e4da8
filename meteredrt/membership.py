"""
The values the presence seam speaks: L{Member} and L{Joining}.

They live apart from every implementation (and from L{meteredrt.interfaces},
which only names them) so that the interface, the hub and each presence
implementation can import them without importing each other.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class Member:
    """
    One peer in one channel, as presence frames and REST show it.
    """

    peer_id: str
    metadata: dict | None


@frozen
class Joining:
    """
    What adding a connection to a channel's membership found, in the same
    atomic step that added it.

    @ivar first: the peer was not a member before (its C{joined} delta was
        announced in that step).
    @ivar members: the channel's members right after the step, the peer
        included, ordered by join time: the subscriber's snapshot. C{None}
        when the caller did not ask for it, so that a join costs the same
        in a channel of ten members as in one of ten thousand.
    @ivar version: the channel membership's version after the step; every
        delta announced with a version at or below it is already reflected
        in C{members}, every later one is not. C{None} when the
        implementation announces deltas in the same turn (one node), where
        no delta can race the snapshot.
    """

    first: bool
    members: tuple[Member, ...] | None
    version: int | None = None
