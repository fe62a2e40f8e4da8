"""
The server's L{IKeyStore}: apps and keys from the database (SQLite or
PostgreSQL), overlaid by the configuration file, served from memory.

L{KeyStore} answers look-ups from memory, writes through an C{adbapi}
connection pool (so the database never blocks the reactor) and re-reads
the database every L{RELOAD_INTERVAL} seconds, so a key created, revoked or
an app suspended with the CLI (another process, perhaps on another
machine) reaches the running server within a few seconds. Observers hear
what a load changed: which apps (L{KeyStore.on_apps_changed}; the server
closes a newly suspended app's connections) and which keys stopped
authenticating (L{KeyStore.on_keys_revoked}; the server closes their
sessions with 4001).

While the database is unreachable (a re-read failed, and none succeeded
since) the last state read keeps serving: connections and keys known before
the outage go on working. Only a key it does not know cannot be answered
(it may have been created since): L{KeyStore.key} raises
L{StoreUnavailable}, which the WebSocket answers with close 1011 and REST
with 503, both retried by clients. The first re-read that succeeds catches
up with every change made meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application import service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from meteredrt.apps import App, Key, KeyType, Plan
from meteredrt.config import AppDeclaration
from meteredrt.interfaces import IKeyStore, StoreUnavailable
from meteredrt.store.dialect import SQLITE, Dialect, DialectCursor, in_dialect
from meteredrt.store.keys import (
    bootstrap_default_app,
    read_state,
    store_app,
    store_key,
    store_plan,
    store_revocation,
)
from meteredrt.store.tenancy import StoredState, Tenancy, admin_changes

#: Seconds between re-reads of the database by the running server.
RELOAD_INTERVAL = 2.0

_T = TypeVar("_T")


def _write_then_read(
    cursor: DialectCursor, write: Callable[..., _T], declarations: Sequence[AppDeclaration], *args: Any
) -> tuple[_T, StoredState]:
    result = write(cursor, declarations, *args)
    return result, read_state(cursor)


def _bootstrap_then_read(
    cursor: DialectCursor, now: float
) -> tuple[tuple[App, tuple[Key, ...]] | None, StoredState]:
    result = bootstrap_default_app(cursor, now)
    return result, read_state(cursor)


#: Called once with the app and keys bootstrapped into an empty database.
BootstrapCallback = Callable[[App, tuple[Key, ...]], None]

#: Called with the ids of the apps a load changed (L{Tenancy.changed_apps}).
AppsChangedObserver = Callable[[frozenset[str]], object]

#: Called with the ids of the keys a load revoked (L{Tenancy.revoked_keys}).
KeysRevokedObserver = Callable[[frozenset[str]], object]

@implementer(IKeyStore)
class KeyStore(service.Service):
    """
    The server's key store: the database below, the configuration file on
    top, look-ups from memory.

    Start it and wait for L{ready} before serving: the first load runs then.
    If the database is empty and the configuration declares no apps, the
    first load bootstraps the ``default`` app and hands it, secrets included,
    to C{on_bootstrap} once; that is the only time a secret leaves the store
    other than through L{key}.

    While running it re-reads the database every L{RELOAD_INTERVAL}
    seconds, so changes made with the CLI (another process) reach the
    running server within a few seconds; L{on_apps_changed} lets other
    services act on them.
    """

    _log = Logger()

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        *,
        clock: IReactorTime,
        dialect: Dialect = SQLITE,
        declarations: Sequence[AppDeclaration] = (),
        on_bootstrap: BootstrapCallback | None = None,
        reload_interval: float = RELOAD_INTERVAL,
    ) -> None:
        """
        :param pool: a pool from L{meteredrt.store.database.Database.open_pool}
            (the schema is up to date on its connections); the store closes
            it on stop.
        :param dialect: the pool's database.
        :param declarations: the configuration file's apps and keys.
        """
        self._pool = pool
        self._dialect = dialect
        self._clock = clock
        self._declarations = tuple(declarations)
        self._on_bootstrap = on_bootstrap
        self._reload_interval = reload_interval
        self._tenancy = Tenancy.overlay(StoredState(apps={}, keys={}), self._declarations)
        self._reloading: LoopingCall | None = None
        self._loaded = False
        self._observers: list[AppsChangedObserver] = []
        self._revocation_observers: list[KeysRevokedObserver] = []
        #: Whether the last round trip to the database worked.
        self._reachable = True
        # Every database round trip gets a ticket when it starts; state read
        # by an older one never replaces state read by a newer one.
        self._tickets = 0
        self._applied = 0
        self._started: Deferred[None] | None = None
        self._outcome: Failure | None = None
        self._settled = False
        self._waiting: list[Deferred[None]] = []

    @property
    def ready(self) -> Deferred[None]:
        """
        A new Deferred that fires once the first load has finished (with
        ``None``), or fails with the reason it could not.
        """
        waiter: Deferred[None] = Deferred()
        if self._settled:
            self._notify(waiter)
        else:
            self._waiting.append(waiter)
        return waiter

    def _notify(self, waiter: Deferred[None]) -> None:
        if self._outcome is None:
            waiter.callback(None)
        else:
            waiter.errback(self._outcome)

    def _settle(self, result: object) -> None:
        if isinstance(result, Failure):
            self._log.failure("Could not load apps and keys", result)
            self._outcome = result
        self._settled = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            self._notify(waiter)

    def startService(self) -> Deferred[None]:
        """
        Load (and perhaps bootstrap) the database, then start re-reading it.

        :return: the same as L{ready}.
        """
        super().startService()
        self._started = Deferred.fromCoroutine(self._start())
        self._started.addBoth(self._settle)
        return self.ready

    async def _start(self) -> None:
        ticket = self._ticket()
        if self._declarations:
            state = await self._run(read_state)
        else:
            bootstrapped, state = await self._run(_bootstrap_then_read, self._clock.seconds())
            if bootstrapped is not None:
                app, keys = bootstrapped
                self._log.info(
                    "Created app {app_id} with keys {key_ids}",
                    app_id=app.app_id,
                    key_ids=", ".join(key.key_id for key in keys),
                )
                if self._on_bootstrap is not None:
                    # The keys are stored either way; a failure to show them
                    # must not keep the server from starting (more keys can
                    # be created with the CLI).
                    try:
                        self._on_bootstrap(app, keys)
                    except Exception:
                        self._log.failure("Could not show the bootstrapped keys")
        self._apply(ticket, state)
        if self.running:
            self._reloading = LoopingCall(self._reload)
            self._reloading.clock = self._clock
            self._reloading.start(self._reload_interval, now=False).addErrback(
                lambda failure: self._log.failure("Key store reloading stopped", failure)
            )

    def stopService(self) -> Deferred[None]:
        """
        Stop re-reading and close the pool, once a running load has settled.
        Stopping a store that is not running does nothing.
        """
        if not self.running:
            return succeed(None)
        super().stopService()
        if self._reloading is not None and self._reloading.running:
            self._reloading.stop()
        self._reloading = None
        settled = succeed(None) if self._started is None else self.ready

        def close(_: object) -> None:
            self._pool.close()

        return settled.addBoth(close)

    def _ticket(self) -> int:
        self._tickets += 1
        return self._tickets

    def on_apps_changed(self, observer: AppsChangedObserver) -> None:
        """
        Call C{observer} after every load that changes apps, with the ids of
        the apps it changed (L{Tenancy.changed_apps}); look-ups answer with
        the new state by then.

        Loads are the re-reads and the writes made through this store. The
        first load is not reported: nothing is served before L{ready}. An
        observer that raises is logged; the others are called anyway.
        """
        self._observers.append(observer)

    def on_keys_revoked(self, observer: KeysRevokedObserver) -> None:
        """
        Call C{observer} after every load in which keys that authenticated
        before stopped doing so (revoked, or gone with their app's
        declaration), with their ids; look-ups answer with the new state by
        then. Reported like L{on_apps_changed}.
        """
        self._revocation_observers.append(observer)

    @property
    def reachable(self) -> bool:
        """
        Whether the last round trip to the database worked (after a failed
        one, until one works again, unknown keys raise L{StoreUnavailable}).
        """
        return self._reachable

    def _apply(self, ticket: int, state: StoredState) -> None:
        if not self._reachable:
            self._log.info("The database is reachable again: apps and keys are up to date")
        self._reachable = True
        if ticket <= self._applied:
            return
        self._applied = ticket
        previous, self._tenancy = self._tenancy, Tenancy.overlay(state, self._declarations)
        if not self._loaded:
            self._loaded = True
            return
        for change in admin_changes(previous, self._tenancy):
            self._log.info(
                "Admin change: {event} app={app} key={key}",
                event=change.event,
                app=change.app_id,
                key=change.key_id or "-",
            )
        self._report(self._observers, self._tenancy.changed_apps(previous), "changed apps")
        self._report(self._revocation_observers, self._tenancy.revoked_keys(previous), "revoked keys")

    def _report(
        self, observers: list[Callable[[frozenset[str]], object]], ids: frozenset[str], what: str
    ) -> None:
        if not ids:
            return
        for observer in list(observers):
            try:
                observer(ids)
            except Exception:
                self._log.failure("An observer of {what} failed", what=what)

    def _run(self, interaction: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return self._pool.runInteraction(in_dialect(self._dialect, interaction), *args)

    def _reload(self) -> Deferred[None]:
        # A failed re-read (say, a lock held for longer than the busy
        # timeout) is logged and the next tick tries again.
        return Deferred.fromCoroutine(self._read()).addErrback(self._unreachable)

    def _unreachable(self, failure: Failure) -> None:
        if self._reachable:
            self._log.failure(
                "Could not re-read apps and keys; serving the last state read, "
                "and refusing unknown keys with a transient error until the database is back",
                failure,
            )
        else:
            self._log.debug("Database still unreachable: {error}", error=failure.getErrorMessage())
        self._reachable = False

    async def _read(self) -> None:
        ticket = self._ticket()
        state = await self._run(read_state)
        self._apply(ticket, state)

    async def _write(self, write: Callable[..., _T], *args: Any) -> _T:
        ticket = self._ticket()
        result, state = await self._run(_write_then_read, write, self._declarations, *args)
        self._apply(ticket, state)
        return result

    def key(self, key_id: str) -> Key | None:
        """
        The key with this id, revoked or not, or ``None``.

        :raises StoreUnavailable: for a key not in memory while the database
            is unreachable.
        """
        key = self._tenancy.key(key_id)
        if key is None and not self._reachable:
            raise StoreUnavailable("the key store cannot reach its database")
        return key

    def app(self, app_id: str) -> App | None:
        """
        The app with this id, or ``None``.
        """
        return self._tenancy.app(app_id)

    def apps(self) -> list[App]:
        """
        Every app, ordered by id.
        """
        return self._tenancy.apps()

    def keys_of(self, app_id: str) -> list[Key]:
        """
        Every key of one app, revoked ones included, ordered by id.
        """
        return self._tenancy.keys_of(app_id)

    def create_app(self, app_id: str, plan: Plan | None = None) -> Deferred[App]:
        """
        Store a new app. Fails with L{AppExists} (a L{ValueError}) if it
        exists, L{InvalidKeyField} for a malformed id.
        """
        return Deferred.fromCoroutine(self._write(store_app, app_id, plan, self._clock.seconds()))

    def create_key(
        self,
        app_id: str,
        type: KeyType,
        channel_patterns: tuple[str, ...],
        actions: frozenset[str],
        allowed_origins: tuple[str, ...] = (),
        auto_inject_turn: bool = True,
    ) -> Deferred[Key]:
        """
        Store a key with a fresh id (and secret). Fails with L{NoSuchApp},
        L{KeyLimitReached} or L{InvalidKeyField}, all L{ValueError}s.
        """
        return Deferred.fromCoroutine(
            self._write(
                store_key,
                app_id,
                type,
                channel_patterns,
                actions,
                self._clock.seconds(),
                allowed_origins,
                auto_inject_turn,
            )
        )

    def revoke_key(self, key_id: str) -> Deferred[bool]:
        """
        Revoke a stored key. Fires with whether it existed; fails with
        L{DeclaredInConfig} for a key the configuration declares.
        """
        return Deferred.fromCoroutine(self._write(store_revocation, key_id))

    def set_plan(self, app_id: str, plan: Plan | None) -> Deferred[App]:
        """
        Replace an app's stored plan. Fires with the new L{App}; fails with
        L{NoSuchApp} or L{DeclaredInConfig}.
        """
        return Deferred.fromCoroutine(self._write(store_plan, app_id, plan, self._clock.seconds()))
