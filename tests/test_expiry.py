"""
Tests for L{meteredrt.expiry}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from meteredrt.expiry import ExpiryTimers

START = 1_000_000.0


class Connection:
    """
    Records when its token expired.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.expired: list[float] = []

    def token_expired(self) -> None:
        self.expired.append(self.clock.seconds())


class ExpiryTimersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.timers = ExpiryTimers(self.clock, 0.25)

    def test_one_timer_per_instant(self) -> None:
        """
        Connections expiring at the same instant share one reactor call,
        which closes each of them C{lead} seconds before it, whenever they
        were added.
        """
        first, second, later = (Connection(self.clock) for _ in range(3))
        self.timers.add(START + 100, first)
        self.clock.advance(10)
        self.timers.add(START + 100, second)
        self.timers.add(START + 101, later)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.clock.advance(89.74)
        self.assertEqual(first.expired + second.expired, [])
        self.clock.advance(0.01)
        self.assertEqual(first.expired, [START + 99.75])
        self.assertEqual(second.expired, [START + 99.75])
        self.assertEqual(later.expired, [])
        self.clock.advance(1)
        self.assertEqual(later.expired, [START + 100.75])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_past(self) -> None:
        """
        An instant already within C{lead} (or past) expires at the next
        turn of the clock.
        """
        connection = Connection(self.clock)
        self.timers.add(START + 0.1, connection)
        self.clock.advance(0)
        self.assertEqual(connection.expired, [START])

    def test_discard(self) -> None:
        """
        A discarded connection does not expire; the instant's reactor call
        is cancelled with its last connection, and discarding what is not
        there does nothing.
        """
        staying, leaving = Connection(self.clock), Connection(self.clock)
        self.timers.add(START + 100, staying)
        self.timers.add(START + 100, leaving)
        self.timers.discard(START + 100, leaving)
        self.timers.discard(START + 100, leaving)
        self.timers.discard(START + 5, leaving)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.timers.discard(START + 100, staying)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(200)
        self.assertEqual(staying.expired + leaving.expired, [])

    def test_added_again_after_firing(self) -> None:
        """
        Once an instant has fired, a connection added with it again gets a
        timer of its own.
        """
        early, late = Connection(self.clock), Connection(self.clock)
        self.timers.add(START + 1, early)
        self.clock.advance(0.75)
        self.clock.advance(0.25)
        self.timers.add(START + 1, late)
        self.clock.advance(0)
        self.assertEqual(early.expired, [START + 0.75])
        self.assertEqual(late.expired, [START + 1])
