"""
Tests for L{meteredrt.webhooks.signing} and L{meteredrt.backend.verify_webhook}.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.backend import SignatureError, verify_webhook
from meteredrt.webhooks.events import PEER_ONLINE, batch_body, new_event
from meteredrt.webhooks.signing import signature_header, verify_signature

SECRET = "whsec_" + "k" * 40
NOW = 1_780_000_000


class SignatureTests(SynchronousTestCase):
    """
    Signatures over a timestamp and the body.
    """

    body = b'{"app":"a","events":[]}'

    def test_round_trip(self) -> None:
        """
        A header made by L{signature_header} verifies and yields its time.
        """
        header = signature_header(SECRET, NOW, self.body)
        self.assertEqual(verify_signature(SECRET, header, self.body, NOW + 10), NOW)

    def test_changed_body(self) -> None:
        """
        One changed byte of the body fails the check.
        """
        header = signature_header(SECRET, NOW, self.body)
        with self.assertRaisesRegex(SignatureError, "does not match"):
            verify_signature(SECRET, header, self.body.replace(b"a", b"b"), NOW)

    def test_other_secret(self) -> None:
        """
        A signature made with another secret fails the check.
        """
        header = signature_header("x" * 40, NOW, self.body)
        with self.assertRaisesRegex(SignatureError, "does not match"):
            verify_signature(SECRET, header, self.body, NOW)

    def test_changed_timestamp(self) -> None:
        """
        The timestamp is signed: moving it into the window fails the check.
        """
        header = signature_header(SECRET, NOW - 1000, self.body).replace(f"t={NOW - 1000}", f"t={NOW}")
        with self.assertRaisesRegex(SignatureError, "does not match"):
            verify_signature(SECRET, header, self.body, NOW)

    def test_replay_window(self) -> None:
        """
        A request signed outside the tolerance, before or after, is refused.
        """
        header = signature_header(SECRET, NOW, self.body)
        for now in (NOW + 301, NOW - 301):
            with self.assertRaisesRegex(SignatureError, "replay window"):
                verify_signature(SECRET, header, self.body, now)
        self.assertEqual(verify_signature(SECRET, header, self.body, NOW + 1000, tolerance=2000), NOW)

    def test_malformed(self) -> None:
        """
        Missing, empty and malformed headers are refused with a reason.
        """
        for header, reason in [
            (None, "missing"),
            ("", "missing"),
            ("v1=abc", "malformed"),
            (f"t={NOW}", "malformed"),
            (f"t=-{NOW},v1=ab", "malformed"),
            ("t=" + "9" * 400 + ",v1=ab", "malformed"),
            ("garbage", "malformed"),
        ]:
            with self.assertRaisesRegex(SignatureError, reason):
                verify_signature(SECRET, header, self.body, NOW)

    def test_any_of_several(self) -> None:
        """
        A header may carry several C{v1} values (a secret being rotated);
        one matching is enough.
        """
        good = signature_header(SECRET, NOW, self.body).split(",")[1]
        header = f"t={NOW},v1={'0' * 64},{good}"
        self.assertEqual(verify_signature(SECRET, header, self.body, NOW), NOW)


class VerifyWebhookTests(SynchronousTestCase):
    """
    The backend's helper checks the signature, then reads the events.
    """

    def test_events(self) -> None:
        """
        A signed batch gives back its events, oldest first, with their ids.
        """
        events = [new_event(PEER_ONLINE, "a", NOW, peer_id="alice"), new_event(PEER_ONLINE, "a", NOW, peer_id="bob")]
        body = batch_body("a", events)
        read = verify_webhook(SECRET, signature_header(SECRET, NOW, body), body, now=NOW)
        self.assertEqual([e["id"] for e in read], [e.event_id for e in events])
        self.assertEqual(read[0]["type"], "peer.online")
        self.assertEqual(read[0]["peerId"], "alice")
        self.assertEqual(read[0]["timestamp"], NOW * 1000)

    def test_unsigned(self) -> None:
        """
        A body without a valid signature is refused before it is parsed.
        """
        with self.assertRaises(SignatureError):
            verify_webhook(SECRET, None, b"not json", now=NOW)

    def test_signed_but_not_a_batch(self) -> None:
        """
        A correctly signed body that is not a batch is refused, not crashed on.
        """
        for body in [b"not json", b"[]", json.dumps({"events": 3}).encode()]:
            with self.assertRaisesRegex(SignatureError, "not a webhook batch"):
                verify_webhook(SECRET, signature_header(SECRET, NOW, body), body, now=NOW)
