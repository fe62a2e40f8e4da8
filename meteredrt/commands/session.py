"""
The store and configuration one command works on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from meteredrt.config import AppDeclaration, Config
from meteredrt.store import keys as key_tables
from meteredrt.store import usage as usage_tables
from meteredrt.store.database import Database, require_driver
from meteredrt.store.dialect import DialectCursor
from meteredrt.store.keys import read_state
from meteredrt.store.schema import Migration
from meteredrt.store.tenancy import StoredState, Tenancy
from meteredrt.store.usage import LedgerEntry, UsageRow, read_report

_T = TypeVar("_T")


class UsageError(Exception):
    """
    The command line asks for something that cannot be done; the message
    says what.
    """


class Session:
    """
    The store and configuration one command works on.

    Reads see the stored apps and keys overlaid by the configuration file,
    as the server sees them; writes run in one transaction each, through
    the same table functions the server uses (L{meteredrt.store.keys}).

    :ivar data_dir: the data directory (``--data-dir``, else the
        configuration's ``data_dir``, else C{DEFAULT_DATA_DIR}).
    :ivar config: the configuration (defaults without ``--config``).
    :ivar database: where apps, keys and usage are: ``--database``, else
        the configuration's ``[storage] database``, else SQLite in the data
        directory.
    """

    def __init__(
        self, data_dir: str, config: Config, clock: Callable[[], float], database_url: str | None = None
    ) -> None:
        self.data_dir = data_dir
        self.config = config
        self.database = Database(data_dir, database_url if database_url is not None else config.database)
        self._clock = clock

    @property
    def declarations(self) -> tuple[AppDeclaration, ...]:
        """
        The apps and keys the configuration file declares.
        """
        return self.config.apps

    def now(self) -> float:
        """
        The current time, in seconds since the epoch.
        """
        return self._clock()

    @contextlib.contextmanager
    def transaction(self, component: str, migrations: Sequence[Migration]) -> Iterator[DialectCursor]:
        """
        A cursor on one component of the store (created and upgraded if
        need be), in one transaction: committed if the block succeeds,
        rolled back if it raises.
        """
        require_driver(self.database)
        connection = self.database.connect(component, migrations)
        try:
            with connection:
                yield DialectCursor(connection.cursor(), self.database.dialect)
        finally:
            connection.close()

    def tenancy(self) -> Tenancy:
        """
        The effective apps and keys. Does not create a missing SQLite file.

        :raises UsageError: naming the path looked at, if there is neither
            a database nor a declared app: a mistyped C{--data-dir}, or a
            command run from another directory, must not look like a server
            without apps.
        """
        if not self.database.exists(key_tables.COMPONENT):
            if not self.declarations:
                raise UsageError(self._no_data_here(self.database.sqlite_path(key_tables.COMPONENT)))
            return Tenancy.overlay(StoredState(apps={}, keys={}), self.declarations)
        with self.transaction(key_tables.COMPONENT, key_tables.MIGRATIONS) as cursor:
            state = read_state(cursor)
        return Tenancy.overlay(state, self.declarations)

    def _no_data_here(self, path: str) -> str:
        directory = os.path.abspath(self.data_dir)
        missing = f"no {os.path.basename(path)} in {directory}" if os.path.isdir(directory) else f"{directory} does not exist"
        return (
            f"no meteredrt data: {missing} (give the server's data directory with --data-dir, "
            "or its configuration with --config)"
        )

    def write(self, operation: Callable[..., _T], *args: Any) -> _T:
        """
        Run one of the key store's write functions (C{store_*}) in its own
        transaction.
        """
        with self.transaction(key_tables.COMPONENT, key_tables.MIGRATIONS) as cursor:
            return operation(cursor, self.declarations, *args)

    def usage(self, app_id: str, period_start: int) -> tuple[UsageRow | None, list[LedgerEntry], float]:
        """
        One app's stored counters and ledger entries for one period and its
        net ledger total (L{meteredrt.store.usage.read_report}). Nothing if
        no server has written usage yet; does not create a missing file.
        """
        if not self.database.exists(usage_tables.COMPONENT):
            return None, [], 0.0
        with self.transaction(usage_tables.COMPONENT, usage_tables.MIGRATIONS) as cursor:
            return read_report(cursor, app_id, period_start)
