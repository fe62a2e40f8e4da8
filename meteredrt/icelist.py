"""
Shape rules for the ``iceServers`` list carried in ``welcome.metadata``.

The official SDK validates ``welcome.metadata.iceServers`` before using it
and, if any entry breaks a rule, discards the B{whole} list without a word
(protocol §14, §20.1): the peer then silently loses TURN. So every list the
server sends, whether fetched from the TURN API or supplied in a JWT, is
checked here first, and a bad one is rejected with a reason a human can act
on.

The main entry point is L{ice_servers_error}. This module is pure: stdlib
only, no I/O.
"""

from __future__ import annotations

import re

#: At most this many entries in one list.
MAX_ENTRIES = 16

#: At most this many characters in one URL.
MAX_URL_LENGTH = 512

#: At most this many characters in ``username`` and in ``credential``.
MAX_SECRET_LENGTH = 1024

#: The SDK's allow-list: the four ICE URL schemes, case-insensitively.
_SCHEME = re.compile(r"(?:stuns?|turns?):", re.IGNORECASE)

#: How much of an offending URL a reason quotes.
_QUOTE_LENGTH = 40


def ice_servers_error(value: object) -> str | None:
    """
    Say why the SDK would reject an ``iceServers`` value.

    The rules are the SDK's (``extractIceServersFromMetadata``): a list of
    at most L{MAX_ENTRIES} objects; each has ``urls``, a string or a
    non-empty list of strings; every URL is 1 to L{MAX_URL_LENGTH}
    characters and starts with ``stun:``, ``stuns:``, ``turn:`` or
    ``turns:`` in any letter case; ``username`` and ``credential``, when
    present, are at most L{MAX_SECRET_LENGTH} characters.

    One rule is stricter than the SDK's: a ``username`` or ``credential``
    that is present but not a string is rejected here. The SDK would keep
    the entry and drop the field, leaving a TURN server the browser cannot
    authenticate to.

    Lengths are counted as JavaScript counts them (UTF-16 code units),
    because that is what the SDK compares. Reasons never quote a
    ``username`` or ``credential``.

    :param value: The decoded JSON value meant for ``metadata.iceServers``.
    :return: ``None`` if the SDK accepts C{value}, else a one-line reason
        naming the first offending entry by its index.
    """
    if not isinstance(value, list):
        return f"iceServers must be an array, not {_json_type(value)}"
    if len(value) > MAX_ENTRIES:
        return f"iceServers has {len(value)} entries; at most {MAX_ENTRIES} are allowed"
    for index, entry in enumerate(value):
        reason = _entry_error(entry)
        if reason is not None:
            return f"iceServers[{index}]: {reason}"
    return None


def _entry_error(entry: object) -> str | None:
    """
    Say why one ``RTCIceServer`` entry breaks the SDK's rules, or ``None``.
    """
    if not isinstance(entry, dict):
        return f"must be an object, not {_json_type(entry)}"
    if "urls" not in entry:
        return "has no urls"
    urls = entry["urls"]
    if isinstance(urls, str):
        reason = _url_error(urls)
        if reason is not None:
            return f"urls {reason}"
    elif isinstance(urls, list):
        if not urls:
            return "urls must not be an empty array"
        for position, url in enumerate(urls):
            if not isinstance(url, str):
                return f"urls[{position}] must be a string, not {_json_type(url)}"
            reason = _url_error(url)
            if reason is not None:
                return f"urls[{position}] {reason}"
    else:
        return f"urls must be a string or an array of strings, not {_json_type(urls)}"
    for name in ("username", "credential"):
        if name not in entry:
            continue
        field = entry[name]
        if not isinstance(field, str):
            return f"{name} must be a string, not {_json_type(field)}"
        if _js_length(field) > MAX_SECRET_LENGTH:
            return f"{name} is {_js_length(field)} characters long; at most {MAX_SECRET_LENGTH} are allowed"
    return None


def _url_error(url: str) -> str | None:
    """
    Say why one ICE URL breaks the SDK's rules, or ``None``.
    """
    length = _js_length(url)
    if length == 0:
        return "is empty"
    if length > MAX_URL_LENGTH:
        return f"is {length} characters long; at most {MAX_URL_LENGTH} are allowed"
    if _SCHEME.match(url) is None:
        quoted = url if len(url) <= _QUOTE_LENGTH else url[:_QUOTE_LENGTH] + "..."
        return f"{quoted!r} does not start with stun:, stuns:, turn: or turns:"
    return None


def _js_length(text: str) -> int:
    """
    The length JavaScript reports for C{text}: its UTF-16 code units.
    """
    return len(text.encode("utf-16-le")) // 2


def _json_type(value: object) -> str:
    """
    Name the JSON type of a decoded value, for reasons read by humans.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
