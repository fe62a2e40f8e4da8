"""
The SQLite usage store under the names earlier releases gave it.

Usage counters and the ledger now live in L{meteredrt.store.usage}, for
SQLite and PostgreSQL alike. These names stay for code and scripts that
open a data directory's usage file directly.
"""

from __future__ import annotations

from meteredrt.store.database import Database
from meteredrt.store.usage import (
    CHARGE,
    COMPONENT,
    RECHARGE,
    FlushBatch,
    LedgerEntry,
    UsageRow,
    UsageStore,
    prepare_connection,
    read_balance_changes,
    read_ledger,
    read_usage,
)

__all__ = [
    "CHARGE",
    "RECHARGE",
    "FlushBatch",
    "LedgerEntry",
    "UsageRow",
    "UsageStore",
    "prepare_connection",
    "read_balance_changes",
    "read_ledger",
    "read_usage",
    "usage_database_path",
]


def usage_database_path(data_dir: str) -> str:
    """
    Where the usage database of a data directory lives.
    """
    return Database(data_dir).sqlite_path(COMPONENT)
