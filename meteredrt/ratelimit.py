"""
Token buckets, pure: every decision takes C{now} as an argument.

L{TokenBucket} is the per-connection message-rate guard (close 4011, §14);
L{KeyedLimiter} holds one bucket per key (source IP for WebSocket upgrades,
key id and IP for REST) with bounded memory.
"""

from __future__ import annotations

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
    One L{TokenBucket} per key.

    Memory stays bounded by the keys active in the last refill period:
    once there are more than C{max_idle_scan} buckets, full ones (keys that
    have been quiet long enough to refill) are dropped, since a new bucket
    for them would be identical.
    """

    def __init__(self, capacity: float, rate: float, max_idle_scan: int = 10_000) -> None:
        self.capacity = capacity
        self.rate = rate
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._max = max_idle_scan

    def take(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._prune(now)
            bucket = self._buckets[key] = TokenBucket(self.capacity, self.rate, now)
        return bucket.take(now)

    def retry_after(self, key: Hashable, now: float) -> float:
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.retry_after(now)

    def _prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.full(now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
