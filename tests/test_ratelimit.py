"""
Tests for L{meteredrt.ratelimit}: the per-connection token bucket (close
4011, protocol §14) and the keyed limiter behind the per-IP upgrade limit
(HTTP 429, §5.2) and REST rate limits (§14).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.ratelimit import KeyedLimiter, TokenBucket


class TokenBucketTests(SynchronousTestCase):
    """
    Tests for L{TokenBucket}.
    """

    def test_starts_full(self) -> None:
        """
        A new bucket allows exactly C{capacity} takes at one instant, then refuses.
        """
        bucket = TokenBucket(200, 100, now=1000.0)
        self.assertEqual([bucket.take(1000.0) for _ in range(201)], [True] * 200 + [False])

    def test_refill_rate(self) -> None:
        """
        An empty bucket refills at C{rate} tokens per second.
        """
        bucket = TokenBucket(10, 2, now=0.0)
        for _ in range(10):
            bucket.take(0.0)
        self.assertFalse(bucket.take(0.4))
        self.assertTrue(bucket.take(0.5))
        self.assertFalse(bucket.take(0.5))
        self.assertTrue(bucket.take(1.5))
        self.assertTrue(bucket.take(1.5))
        self.assertFalse(bucket.take(1.5))

    def test_refill_capped(self) -> None:
        """
        A long idle period refills the bucket to its capacity and no further.
        """
        bucket = TokenBucket(5, 1, now=0.0)
        bucket.take(0.0)
        self.assertEqual([bucket.take(10_000.0) for _ in range(6)], [True] * 5 + [False])

    def test_sustained_rate(self) -> None:
        """
        Taking at exactly the refill rate after the burst is spent never runs dry.
        """
        bucket = TokenBucket(16, 8, now=0.0)
        for _ in range(16):
            self.assertTrue(bucket.take(0.0))
        for tick in range(1, 801):
            self.assertTrue(bucket.take(tick / 8))
        self.assertFalse(bucket.take(100.0))

    def test_refused_take_costs_nothing(self) -> None:
        """
        A refused take leaves the bucket's tokens untouched.
        """
        bucket = TokenBucket(3, 1, now=0.0)
        self.assertFalse(bucket.take(0.0, cost=4))
        self.assertEqual([bucket.take(0.0) for _ in range(4)], [True, True, True, False])

    def test_cost(self) -> None:
        """
        A take of C{cost} removes that many tokens.
        """
        bucket = TokenBucket(10, 1, now=0.0)
        self.assertTrue(bucket.take(0.0, cost=7))
        self.assertTrue(bucket.take(0.0, cost=3))
        self.assertFalse(bucket.take(0.0, cost=0.5))

    def test_clock_going_backwards(self) -> None:
        """
        An earlier C{now} than the last one refills nothing and does not corrupt the bucket.
        """
        bucket = TokenBucket(2, 1, now=100.0)
        bucket.take(100.0)
        bucket.take(100.0)
        self.assertFalse(bucket.take(50.0))
        self.assertFalse(bucket.take(100.5))
        self.assertTrue(bucket.take(101.0))

    def test_take_up_to(self) -> None:
        """
        C{take_up_to} takes as many whole tokens as there are, at most the
        number asked for, and none from an empty bucket.
        """
        bucket = TokenBucket(10, 2, 0.0)
        self.assertEqual(bucket.take_up_to(0.0, 4), 4)
        self.assertEqual(bucket.take_up_to(0.0, 100), 6)
        self.assertEqual(bucket.take_up_to(0.0, 100), 0)
        # 1.5 tokens after 0.75 s: one whole one, and half of the next.
        self.assertEqual(bucket.take_up_to(0.75, 100), 1)
        self.assertEqual(bucket.take_up_to(0.75, 100), 0)
        self.assertEqual(bucket.take_up_to(1.0, 100), 1)
        self.assertEqual(bucket.take_up_to(100.0, 100), 10)

    def test_retry_after(self) -> None:
        """
        retry_after is zero with tokens left, and otherwise the time until one token is back.
        """
        bucket = TokenBucket(2, 4, now=0.0)
        self.assertEqual(bucket.retry_after(0.0), 0.0)
        bucket.take(0.0)
        bucket.take(0.0)
        self.assertEqual(bucket.retry_after(0.0), 0.25)
        self.assertAlmostEqual(bucket.retry_after(0.1), 0.15)
        self.assertEqual(bucket.retry_after(0.25), 0.0)
        self.assertTrue(bucket.take(0.25))

    def test_retry_after_cost(self) -> None:
        """
        retry_after for a larger cost waits for that many tokens.
        """
        bucket = TokenBucket(10, 2, now=0.0)
        bucket.take(0.0, cost=10)
        self.assertEqual(bucket.retry_after(0.0, cost=5), 2.5)

    def test_full(self) -> None:
        """
        full is true for a fresh bucket, false after a take, and true again once refilled.
        """
        bucket = TokenBucket(4, 2, now=0.0)
        self.assertTrue(bucket.full(0.0))
        bucket.take(0.0)
        self.assertFalse(bucket.full(0.0))
        self.assertFalse(bucket.full(0.4))
        self.assertTrue(bucket.full(0.5))


class KeyedLimiterTests(SynchronousTestCase):
    """
    Tests for L{KeyedLimiter}.
    """

    def test_per_key(self) -> None:
        """
        Each key has its own bucket: exhausting one leaves the others untouched.
        """
        limiter = KeyedLimiter(60, 1)
        self.assertEqual([limiter.take("10.0.0.1", 0.0) for _ in range(61)], [True] * 60 + [False])
        self.assertTrue(limiter.take("10.0.0.2", 0.0))
        self.assertFalse(limiter.take("10.0.0.1", 0.5))
        self.assertTrue(limiter.take("10.0.0.1", 1.0))

    def test_tuple_keys(self) -> None:
        """
        Keys may be any hashable value, such as a (key id, IP) pair.
        """
        limiter = KeyedLimiter(1, 1)
        self.assertTrue(limiter.take(("sk_id_a", "10.0.0.1"), 0.0))
        self.assertTrue(limiter.take(("sk_id_b", "10.0.0.1"), 0.0))
        self.assertFalse(limiter.take(("sk_id_a", "10.0.0.1"), 0.0))

    def test_retry_after(self) -> None:
        """
        retry_after is zero for an unknown key and the refill time for an exhausted one.
        """
        limiter = KeyedLimiter(2, 0.5)
        self.assertEqual(limiter.retry_after("ip", 0.0), 0.0)
        limiter.take("ip", 0.0)
        self.assertEqual(limiter.retry_after("ip", 0.0), 0.0)
        limiter.take("ip", 0.0)
        self.assertEqual(limiter.retry_after("ip", 0.0), 2.0)
        self.assertEqual(limiter.retry_after("ip", 1.0), 1.0)
        self.assertEqual(len(limiter), 1)

    def test_memory_bounded(self) -> None:
        """
        1000 distinct keys arriving one per second keep only a handful of
        buckets, because refilled buckets are pruned.
        """
        limiter = KeyedLimiter(5, 1, max_idle_scan=10)
        sizes = []
        for i in range(1000):
            self.assertTrue(limiter.take(f"10.0.{i // 256}.{i % 256}", float(i)))
            sizes.append(len(limiter))
        self.assertLessEqual(max(sizes), 10)

    def test_busy_keys_kept(self) -> None:
        """
        Pruning never drops a key whose bucket is not full, so a limit cannot
        be escaped by flooding with other keys.
        """
        limiter = KeyedLimiter(3, 1, max_idle_scan=10)
        for _ in range(3):
            self.assertTrue(limiter.take("attacker", 0.0))
        for i in range(50):
            limiter.take(f"other-{i}", 0.0)
        self.assertFalse(limiter.take("attacker", 0.0))
        self.assertEqual(len(limiter), 51)

    def test_pruned_key_starts_fresh(self) -> None:
        """
        A key that was pruned after going quiet gets a full bucket again.
        """
        limiter = KeyedLimiter(2, 1, max_idle_scan=2)
        limiter.take("a", 0.0)
        limiter.take("a", 0.0)
        limiter.take("b", 0.0)
        limiter.take("c", 10.0)
        self.assertEqual(len(limiter), 1)
        self.assertEqual([limiter.take("a", 10.0) for _ in range(3)], [True, True, False])

    def _count_scans(self) -> list[int]:
        """
        Count every bucket a pruning scan looks at, for the rest of the test.

        @return: a one-element list holding the running count.
        """
        scans = [0]
        full = TokenBucket.full

        def counting(bucket: TokenBucket, now: float) -> bool:
            scans[0] += 1
            return full(bucket, now)

        self.patch(TokenBucket, "full", counting)
        return scans

    def test_flood_scans_amortised(self) -> None:
        """
        A flood of distinct keys, none of them refilled, costs a bounded number of bucket scans
        per key instead of a scan of every bucket per key.
        """
        scans = self._count_scans()
        limiter = KeyedLimiter(60, 1, max_idle_scan=100, max_keys=100_000)
        for i in range(20_000):
            self.assertTrue(limiter.take(f"2001:db8:{i:x}::/64", 0.5))
        self.assertEqual(len(limiter), 20_000)
        self.assertLessEqual(scans[0], 2 * 20_000)

    def test_scans_amortised_when_some_refill(self) -> None:
        """
        A steady stream of new keys, each bucket refilling only after the next thousand keys have
        arrived, costs amortised O(1) bucket scans per key, and the scans keep memory near the
        number of keys active within one refill period.
        """
        scans = self._count_scans()
        limiter = KeyedLimiter(1, 1, max_idle_scan=50, max_keys=100_000)
        sizes = []
        for i in range(10_000):
            self.assertTrue(limiter.take(f"k{i}", i / 1000))
            sizes.append(len(limiter))
        self.assertLessEqual(scans[0], 3 * 10_000)
        self.assertLessEqual(max(sizes), 2 * 1001)

    def test_flood_memory_bounded(self) -> None:
        """
        However many distinct keys arrive within their refill period, at most C{max_keys}
        buckets are held.
        """
        limiter = KeyedLimiter(5, 1, max_idle_scan=10, max_keys=50)
        sizes = []
        for i in range(1000):
            self.assertTrue(limiter.take(f"flood-{i}", 0.0))
            sizes.append(len(limiter))
        self.assertEqual(max(sizes), 50)

    def test_evicts_least_recently_used(self) -> None:
        """
        At the bound, the bucket evicted is the one used least recently, so a key in active use
        keeps its (spent) budget while the flood's oldest keys are forgotten.
        """
        limiter = KeyedLimiter(1, 1, max_idle_scan=3, max_keys=3)
        limiter.take("busy", 0.0)
        limiter.take("old", 0.0)
        limiter.take("older", 0.0)
        self.assertFalse(limiter.take("busy", 0.0))
        limiter.take("new", 0.0)
        self.assertEqual(len(limiter), 3)
        self.assertEqual(limiter.retry_after("busy", 0.0), 1.0)
        self.assertEqual(limiter.retry_after("old", 0.0), 0.0)
        self.assertEqual(limiter.retry_after("older", 0.0), 1.0)

    def test_evicted_key_starts_fresh(self) -> None:
        """
        A key evicted at the bound gets a full bucket again: eviction only resets its budget.
        """
        limiter = KeyedLimiter(2, 1, max_idle_scan=2, max_keys=2)
        limiter.take("a", 0.0)
        limiter.take("a", 0.0)
        self.assertFalse(limiter.take("a", 0.0))
        limiter.take("b", 0.0)
        limiter.take("c", 0.0)
        self.assertEqual([limiter.take("a", 0.0) for _ in range(3)], [True, True, False])

    def test_max_keys_at_least_scan(self) -> None:
        """
        A hard bound below the scan threshold is refused.
        """
        self.assertRaises(ValueError, KeyedLimiter, 1, 1, max_idle_scan=10, max_keys=9)
