"""
What one node has told its subscribers about one channel's members.

In a cluster a node hears of membership changes on two streams (the
replies to its own scripts, and the other nodes' deltas through its
subscriber connection) and, after an outage, may have missed some, or hear
the same member join again when a node registers again. L{ChannelView}
keeps, per peer, whether this node's subscribers were told it is present
and the membership version of what they were told, so that:

  - a delta older than what was told for that peer is stale and dropped
    (it arrived late on the other stream);
  - a C{joined} of a peer already present, or a C{left} of one not present,
    is dropped (a re-registration after an outage or a fence);
  - a snapshot, or a fresh read after an outage, is turned into the
    C{joined}/C{left} that bring the subscribers up to date
    (L{ChannelView.catch_up}).

Pure: plain values in, plain values out.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import evolve

from meteredrt.envelopes import PresenceChange
from meteredrt.membership import Member
from meteredrt.protocol import presence_entry


class ChannelView:
    """
    The members a node's subscribers of one channel were told of.
    """

    def __init__(self) -> None:
        # peer -> (present, version of the last change told, metadata)
        self._peers: dict[str, tuple[bool, int, dict | None]] = {}

    def present(self) -> list[str]:
        """
        The peers the subscribers were told are members.
        """
        return [peer for peer, (here, _, _) in self._peers.items() if here]

    def accept(self, change: PresenceChange) -> PresenceChange | None:
        """
        Record a versioned delta; return what of it the subscribers still
        need to hear (C{None}: nothing). Unversioned deltas pass unchanged.
        """
        version = change.version
        if version is None:
            return change
        joined = [entry for entry in change.joined if self._told(entry, True, version)]
        left = [entry for entry in change.left if self._told(entry, False, version)]
        if not joined and not left:
            return None
        if len(joined) == len(change.joined) and len(left) == len(change.left):
            return change
        return evolve(change, joined=tuple(joined), left=tuple(left))

    def _told(self, entry: dict, present: bool, version: int) -> bool:
        peer = entry["peerId"]
        known = self._peers.get(peer)
        if known is not None and known[1] >= version:
            return False  # stale: something newer was told
        self._peers[peer] = (present, version, entry.get("metadata"))
        was_present = known is not None and known[0]
        return was_present != present

    def catch_up(self, members: Iterable[Member], version: int) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
        """
        Bring the view up to the membership C{members} read at C{version}.

        @return: the C{(joined, left)} entries the subscribers were not told
            yet; deltas up to C{version} that arrive later are then stale.
        """
        joined = []
        seen = set()
        for member in members:
            seen.add(member.peer_id)
            entry = presence_entry(member.peer_id, member.metadata)
            if self._told(entry, True, version):
                joined.append(entry)
        left = []
        for peer, (here, told, metadata) in list(self._peers.items()):
            if here and peer not in seen and told < version:
                self._peers[peer] = (False, version, metadata)
                left.append(presence_entry(peer, metadata))
        return tuple(joined), tuple(left)
