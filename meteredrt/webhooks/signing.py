"""
Signing webhook requests, and checking their signatures.

A request carries C{Metered-Signature: t=<unix seconds>,v1=<hex>}, where
the hex is HMAC-SHA256, keyed with the app's webhook secret, over
C{"<t>." + body}. Signing the timestamp with the body lets a backend refuse
replays of an old request: it checks that C{t} is within a window of its
own clock (L{DEFAULT_TOLERANCE_SECONDS}).

Pure functions; the time is an argument.

Main names: L{signature_header}, L{verify_signature}, L{SignatureError}.
"""

from __future__ import annotations

import hashlib
import hmac

#: The request header that carries the signature.
SIGNATURE_HEADER = "Metered-Signature"

#: A signature older or newer than this many seconds is refused.
DEFAULT_TOLERANCE_SECONDS = 300


class SignatureError(ValueError):
    """
    A webhook request whose signature does not check out; the message says
    why (missing, malformed, too old, wrong).
    """


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """
    The C{Metered-Signature} value for a request sent at C{timestamp}.
    """
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> int:
    """
    Check a request's C{Metered-Signature} header against its raw body.

    @param now: the receiver's current Unix time.
    @return: the signed timestamp.
    @raise SignatureError: when the header is missing or malformed, its
        timestamp is outside C{tolerance} of C{now}, or no C{v1} signature
        in it matches.
    """
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header")
    if abs(now - timestamp) > tolerance:
        raise SignatureError("signature timestamp outside the replay window")
    expected = _digest(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise SignatureError("signature does not match")
    return timestamp
