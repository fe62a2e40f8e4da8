"""
Token buckets, pure: every decision takes C{now} as an argument.

L{TokenBucket} is the per-connection message-rate guard (close 4011, §14);
L{KeyedLimiter} holds one bucket per key (source IP for WebSocket upgrades,
key id and IP for REST) with bounded memory and amortised constant work per
new key, even under a flood of distinct keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class TokenBucket:
    """
    C{capacity} tokens, refilled at C{rate} per second.
    """

    __slots__ = ("capacity", "rate", "_tokens", "_stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self._tokens = float(capacity)
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """
        Take C{cost} tokens if there are enough.
        """
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def take_up_to(self, now: float, most: int) -> int:
        """
        Take as many whole tokens as there are, at most C{most}; for a
        caller that counts what it took down by itself and reads the
        clock only when that runs out.
        """
        self._refill(now)
        taken = min(most, int(self._tokens))
        self._tokens -= taken
        return taken

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """
        Seconds until C{cost} tokens will be there.
        """
        self._refill(now)
        missing = cost - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def full(self, now: float) -> bool:
        """
        Whether the bucket has refilled completely (and so holds no state
        worth keeping).
        """
        self._refill(now)
        return self._tokens >= self.capacity


class KeyedLimiter:
    """
    One L{TokenBucket} per key, with bounded memory and bounded work per key.

    Buckets are kept in least-recently-used order.  Once there are
    C{max_idle_scan} of them, adding a key first drops the full ones (keys
    quiet long enough to refill, whose new bucket would be identical).  That
    scan visits every bucket, so it runs again only once the map has doubled
    since what the last scan kept: a flood of fresh keys, all still within
    their refill period, costs amortised O(1) per key rather than a scan of
    everything each time.

    Beyond C{max_keys} buckets, adding a key evicts the least recently used
    one, even if it is not full, so memory stays bounded whatever the flood.
    Evicting only resets that key's budget to a full bucket: the price is
    that a client able to present C{max_keys} distinct keys between two of
    its own requests gets a fresh budget, which such a client effectively
    has already.

    @param max_idle_scan: how many buckets to hold before dropping full ones.
    @param max_keys: the most buckets ever held; at least C{max_idle_scan}.
        The default keeps one limiter under about 16 MB (measured: 31 MB
        for 100,000 IPv6 keys).
    """

    def __init__(self, capacity: float, rate: float, max_idle_scan: int = 10_000, max_keys: int = 50_000) -> None:
        if max_keys < max_idle_scan:
            raise ValueError("max_keys must be at least max_idle_scan")
        self.capacity = capacity
        self.rate = rate
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._min_scan = max_idle_scan
        self._next_scan = max_idle_scan
        self._max_keys = max_keys

    def take(self, key: Hashable, now: float) -> bool:
        """
        Take one token from C{key}'s bucket, creating a full one for a new key.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._next_scan:
                self._prune(now)
            if len(self._buckets) >= self._max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.capacity, self.rate, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def retry_after(self, key: Hashable, now: float) -> float:
        """
        Seconds until C{key} may take again; zero for a key without a bucket.
        """
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.retry_after(now)

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]
        self._next_scan = max(self._min_scan, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)
