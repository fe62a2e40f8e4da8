"""
Parsers of option values (argparse types and list options).
"""

from __future__ import annotations

import argparse
import calendar
import json
from typing import Any

from meteredrt.commands.registry import UsageError


def split_values(values: list[str] | None) -> list[str] | None:
    """
    Comma-separated, repeatable list options: ``None`` when not given.
    """
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def json_object(option: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{option}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option}: must be a JSON object")
    return value


#: Words that clear a cap (the axis becomes unlimited).
UNLIMITED = ("none", "unlimited")


def cap_option(text: str) -> int | None:
    """
    An argparse type: a cap is a whole number of at least 0, or
    ``unlimited``/``none`` for no cap.
    """
    if text.strip().lower() in UNLIMITED:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'unlimited', not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def number_option(text: str, *, signed: bool = False) -> float:
    """
    A finite number, at least 0 unless ``signed``, for the argparse types
    below.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    if not signed and value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
    return value


def amount_option(text: str) -> float:
    """
    An argparse type: a non-negative amount of money or a rate.
    """
    return number_option(text)


def balance_option(text: str) -> float:
    """
    An argparse type: an opening balance, which may be negative (overage
    billed after the fact can leave a debt).
    """
    return number_option(text, signed=True)


def month_option(text: str) -> int:
    """
    An argparse type: ``YYYY-MM``, a calendar month (UTC), as the Unix time
    it starts at.
    """
    year, dash, month = text.partition("-")
    if not (dash and len(year) == 4 and len(month) == 2 and year.isdigit() and month.isdigit()):
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, not {text!r}")
    if not 1 <= int(month) <= 12:
        raise argparse.ArgumentTypeError(f"no month {month} in {text!r}")
    return calendar.timegm((int(year), int(month), 1, 0, 0, 0, 0, 0, 0))
