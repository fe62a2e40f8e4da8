"""
Tests for L{meteredrt.keystore}.

The store runs against a real SQLite file in the test's temporary directory
through a real C{adbapi} pool (whose thread pool belongs to the reactor), so
these are asynchronous tests; its re-reading timer runs on a L{Clock}.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from meteredrt.apps import ACTIONS, MAX_KEYS_PER_APP, PUBLISHABLE_DEFAULT_ACTIONS, App, Key, KeyType, Plan
from meteredrt.config import AppDeclaration
from meteredrt.interfaces import IKeyStore, StoreUnavailable
from meteredrt.keystore import connect, prepare_database
from meteredrt.logs import json_line
from meteredrt.store.database import Database
from meteredrt.store.dialect import SQLITE, DialectCursor
from meteredrt.store.keys import (
    COMPONENT,
    MIGRATIONS,
    AppExists,
    DeclaredInConfig,
    InvalidKeyField,
    KeyLimitReached,
    NoSuchApp,
    store_app,
    store_key,
    store_revocation,
    store_suspension,
)
from meteredrt.store.keystore import KeyStore
from meteredrt.store.schema import SchemaTooNew
from meteredrt.store.tenancy import AdminChange, StoredState, Tenancy, admin_changes
from tests.postgres_server import fresh_database

if TYPE_CHECKING:
    _MixinBase = TestCase
else:
    _MixinBase = object

CONFIG_SECRET = Key(
    key_id="sk_id_conf",
    app_id="app_conf",
    type=KeyType.SECRET,
    secret="sk_secret_conf",
    channel_patterns=("conf/**",),
    actions=frozenset({"publish"}),
    source="config",
)

DECLARATIONS = (
    AppDeclaration(app=App(app_id="app_conf", plan=Plan(name="CONF")), keys=(CONFIG_SECRET,)),
)


class _FlakyPool:
    """
    An C{adbapi} pool whose next interaction fails on demand.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.fail_next = False

    def runInteraction(self, interaction: Any, *args: Any) -> Deferred[Any]:
        if self.fail_next:
            self.fail_next = False
            return fail(sqlite3.OperationalError("database is locked"))
        return self._pool.runInteraction(interaction, *args)

    def close(self) -> None:
        self._pool.close()


class KeyStoreConformanceMixin(_MixinBase):
    """
    What every database must give L{KeyStore}: mixed into one test case
    per database, which provides L{make_database}, L{broken_database} and
    L{driver_error}.
    """

    #: The exception class the database's driver raises.
    driver_error: type[Exception]

    def make_database(self) -> Database:
        """
        A new, empty database.
        """
        raise NotImplementedError()

    def broken_database(self) -> Database:
        """
        A database that cannot be opened.
        """
        raise NotImplementedError()

    def setUp(self) -> None:
        self.db = self.make_database()
        self.clock = Clock()
        self.bootstrapped: list[tuple[App, tuple[Key, ...]]] = []

    def open_pool(self, db: Database | None = None) -> Any:
        """
        A one-connection pool on the test's database: interactions finish
        in the order they started.
        """
        return (db or self.db).open_pool(COMPONENT, MIGRATIONS, reactor)

    def make_store(self, pool: Any, declarations: Sequence[AppDeclaration] = (), **kwargs: Any) -> KeyStore:
        """
        A store (not started) on ``pool``, in the test database's dialect.
        """
        return KeyStore(pool, clock=self.clock, dialect=self.db.dialect, declarations=declarations, **kwargs)

    async def start(self, declarations: Sequence[AppDeclaration] = (), pool: Any = None) -> KeyStore:
        """
        Start a store on the test's database and stop it at clean-up.
        """
        self.pool = self.open_pool() if pool is None else pool
        store = self.make_store(
            self.pool,
            declarations,
            on_bootstrap=lambda app, keys: self.bootstrapped.append((app, keys)),
        )
        self.addCleanup(self.stop, store)
        await store.startService()
        return store

    async def stop(self, store: KeyStore) -> None:
        if store.running:
            await store.stopService()

    async def barrier(self) -> None:
        """
        Wait until every interaction started so far has been delivered: the
        pool has one thread, so they finish in order.
        """
        await self.pool.runInteraction(lambda cursor: None)

    def other_process(self, operation: Any, *args: Any) -> Any:
        """
        Write like the CLI does: synchronously, on a connection of its own.
        """
        connection = self.db.connect(COMPONENT, MIGRATIONS)
        try:
            with connection:
                return operation(DialectCursor(connection.cursor(), self.db.dialect), *args)
        finally:
            connection.close()

    async def test_interface(self) -> None:
        """
        The store provides L{IKeyStore}.
        """
        store = await self.start()
        self.assertTrue(verifyObject(IKeyStore, store))

    async def test_bootstrap(self) -> None:
        """
        An empty database without config apps gets app C{default} with a
        secret key (all actions) and a publishable key (no C{send}), both on
        C{**}, handed over once with the secret.
        """
        store = await self.start()
        [(app, (secret, publishable))] = self.bootstrapped
        self.assertEqual(app, App(app_id="default"))
        self.assertEqual(store.apps(), [app])
        self.assertEqual((secret.type, secret.actions, secret.channel_patterns), (KeyType.SECRET, ACTIONS, ("**",)))
        self.assertTrue(secret.key_id.startswith("sk_id_"))
        self.assertTrue(secret.secret and secret.secret.startswith("sk_secret_"))
        self.assertEqual(
            (publishable.type, publishable.actions, publishable.channel_patterns, publishable.secret),
            (KeyType.PUBLISHABLE, PUBLISHABLE_DEFAULT_ACTIONS, ("**",), None),
        )
        self.assertTrue(publishable.key_id.startswith("pk_live_"))
        self.assertEqual(store.keys_of("default"), sorted([secret, publishable], key=lambda k: k.key_id))
        self.assertEqual(store.key(secret.key_id), secret)

    async def test_bootstrap_once(self) -> None:
        """
        A second start on the same database bootstraps nothing and finds the
        keys of the first.
        """
        first = await self.start()
        keys = first.keys_of("default")
        await first.stopService()
        second = await self.start()
        self.assertEqual(len(self.bootstrapped), 1)
        self.assertEqual(second.keys_of("default"), keys)

    async def test_bootstrap_callback_fails(self) -> None:
        """
        A failure to show the bootstrapped keys is logged; the store starts
        with them anyway.
        """
        self.pool = self.open_pool()
        store = self.make_store(self.pool, on_bootstrap=lambda app, keys: 1 / 0)
        self.addCleanup(self.stop, store)
        await store.startService()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(store.keys_of("default")), 2)

    async def test_no_bootstrap_with_config_apps(self) -> None:
        """
        When the configuration declares apps, nothing is bootstrapped.
        """
        store = await self.start(DECLARATIONS)
        self.assertEqual(self.bootstrapped, [])
        self.assertEqual([app.app_id for app in store.apps()], ["app_conf"])
        self.assertEqual(store.key("sk_id_conf"), CONFIG_SECRET)

    async def test_no_bootstrap_with_stored_app(self) -> None:
        """
        A database holding an app is not empty: nothing is bootstrapped.
        """
        self.other_process(store_app, (), "mine", None, 1.0)
        store = await self.start()
        self.assertEqual(self.bootstrapped, [])
        self.assertEqual(store.apps(), [App(app_id="mine")])

    async def test_config_overrides_stored(self) -> None:
        """
        A declared key replaces a stored key of the same id, and a declared
        plan a stored one; a stored suspension stays.
        """
        def insert(cursor: DialectCursor) -> None:
            cursor.execute("INSERT INTO apps VALUES ('app_conf', ?, 1, 0)", ('{"name": "STORED"}',))
            cursor.execute(
                "INSERT INTO keys VALUES ('sk_id_conf', 'app_conf', 'secret', 'sk_secret_old',"
                " '[\"**\"]', '[\"send\"]', '[]', 1, 1, 0)"
            )

        self.other_process(insert)
        store = await self.start(DECLARATIONS)
        self.assertEqual(store.key("sk_id_conf"), CONFIG_SECRET)
        self.assertEqual(store.app("app_conf"), App(app_id="app_conf", plan=Plan(name="CONF"), suspended=True))

    async def test_stored_plan_for_declared_app_without_plan(self) -> None:
        """
        An app declared without a plan keeps the plan stored for it.
        """
        declarations = (AppDeclaration(app=App(app_id="app_conf")),)
        store = await self.start(declarations)
        app = await store.set_plan("app_conf", Plan(name="SET"))
        self.assertEqual(app, App(app_id="app_conf", plan=Plan(name="SET")))
        self.assertEqual(store.app("app_conf"), app)

    async def test_set_plan_declared(self) -> None:
        """
        A plan the configuration declares cannot be replaced in the database.
        """
        store = await self.start(DECLARATIONS)
        await self.assertFailure(store.set_plan("app_conf", Plan()), DeclaredInConfig)

    async def test_set_plan_unknown_app(self) -> None:
        """
        Setting the plan of an unknown app fails.
        """
        store = await self.start()
        await self.assertFailure(store.set_plan("nope", Plan()), NoSuchApp)

    async def test_create_app(self) -> None:
        """
        A created app is visible at once; creating it again fails with a
        L{ValueError}.
        """
        store = await self.start()
        app = await store.create_app("shop", Plan(name="P"))
        self.assertEqual(app, App(app_id="shop", plan=Plan(name="P")))
        self.assertEqual(store.app("shop"), app)
        error = await self.assertFailure(store.create_app("shop"), AppExists)
        self.assertIsInstance(error, ValueError)

    async def test_create_declared_app(self) -> None:
        """
        An app the configuration declares exists already.
        """
        store = await self.start(DECLARATIONS)
        await self.assertFailure(store.create_app("app_conf"), AppExists)

    async def test_create_app_bad_id(self) -> None:
        """
        App ids are checked.
        """
        store = await self.start()
        await self.assertFailure(store.create_app("a b"), InvalidKeyField)

    async def test_create_key(self) -> None:
        """
        A created key has a fresh prefixed id and secret and is visible at
        once.
        """
        store = await self.start()
        key = await store.create_key("default", KeyType.SECRET, ("a/*",), frozenset({"publish"}))
        self.assertTrue(key.key_id.startswith("sk_id_"))
        self.assertTrue(key.secret and key.secret.startswith("sk_secret_"))
        self.assertEqual(
            (key.app_id, key.channel_patterns, key.actions, key.source, key.created_at),
            ("default", ("a/*",), frozenset({"publish"}), "store", 0.0),
        )
        self.assertEqual(store.key(key.key_id), key)
        self.assertIn(key, store.keys_of("default"))

    async def test_create_key_for_declared_app(self) -> None:
        """
        A declared app can get stored keys.
        """
        store = await self.start(DECLARATIONS)
        key = await store.create_key(
            "app_conf", KeyType.PUBLISHABLE, ("**",), frozenset(), allowed_origins=("https://a.example",)
        )
        self.assertEqual(store.keys_of("app_conf"), sorted([key, CONFIG_SECRET], key=lambda k: k.key_id))

    async def test_create_key_unknown_app(self) -> None:
        """
        Keys belong to existing apps.
        """
        store = await self.start()
        await self.assertFailure(store.create_key("nope", KeyType.SECRET, ("**",), ACTIONS), NoSuchApp)

    async def test_create_key_invalid(self) -> None:
        """
        Key fields are checked like the configuration file's.
        """
        store = await self.start()
        error = await self.assertFailure(
            store.create_key("default", KeyType.SECRET, ("**", ""), ACTIONS), InvalidKeyField
        )
        self.assertEqual(error.field, "channel_patterns[1]")
        error = await self.assertFailure(
            store.create_key("default", KeyType.SECRET, ("**",), frozenset({"fly"})), InvalidKeyField
        )
        self.assertEqual(error.field, "actions[0]")

    async def test_key_limit(self) -> None:
        """
        An app has at most 50 active keys; revoking one makes room.
        """
        store = await self.start()
        for _ in range(MAX_KEYS_PER_APP - 2):
            await store.create_key("default", KeyType.PUBLISHABLE, ("**",), frozenset())
        self.assertEqual(len(store.keys_of("default")), MAX_KEYS_PER_APP)
        await self.assertFailure(
            store.create_key("default", KeyType.PUBLISHABLE, ("**",), frozenset()), KeyLimitReached
        )
        self.assertTrue(await store.revoke_key(store.keys_of("default")[0].key_id))
        await store.create_key("default", KeyType.PUBLISHABLE, ("**",), frozenset())
        self.assertEqual(len(store.keys_of("default")), MAX_KEYS_PER_APP + 1)

    async def test_key_limit_counts_declared(self) -> None:
        """
        Declared keys count toward the limit of their app.
        """
        keys = tuple(
            Key(
                key_id=f"pk_live_{i}",
                app_id="a",
                type=KeyType.PUBLISHABLE,
                channel_patterns=("**",),
                actions=frozenset(),
                source="config",
            )
            for i in range(MAX_KEYS_PER_APP)
        )
        store = await self.start((AppDeclaration(app=App(app_id="a"), keys=keys),))
        await self.assertFailure(store.create_key("a", KeyType.PUBLISHABLE, ("**",), frozenset()), KeyLimitReached)

    async def test_revoke(self) -> None:
        """
        A revoked key is still found, marked revoked; revoking it again or
        an unknown key says whether it existed.
        """
        store = await self.start()
        key = store.keys_of("default")[0]
        self.assertTrue(await store.revoke_key(key.key_id))
        revoked = store.key(key.key_id)
        assert revoked is not None
        self.assertFalse(revoked.active)
        self.assertTrue(await store.revoke_key(key.key_id))
        self.assertFalse(await store.revoke_key("sk_id_nope"))

    async def test_revoke_declared(self) -> None:
        """
        A declared key cannot be revoked in the database.
        """
        store = await self.start(DECLARATIONS)
        await self.assertFailure(store.revoke_key("sk_id_conf"), DeclaredInConfig)

    async def test_revocation_by_other_process(self) -> None:
        """
        A key revoked by another process is seen revoked after the next
        re-read, two seconds later.
        """
        store = await self.start()
        key = store.keys_of("default")[0]
        self.assertTrue(self.other_process(store_revocation, (), key.key_id))
        self.clock.advance(1.9)
        await self.barrier()
        self.assertTrue(store.key(key.key_id).active)  # type: ignore[union-attr]
        self.clock.advance(0.1)
        await self.barrier()
        self.assertFalse(store.key(key.key_id).active)  # type: ignore[union-attr]

    async def test_creation_by_other_process(self) -> None:
        """
        Apps and keys created by another process appear after a re-read.
        """
        store = await self.start()
        self.other_process(store_app, (), "later", None, 5.0)
        key = self.other_process(store_key, (), "later", KeyType.SECRET, ("**",), ACTIONS, 5.0)
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(store.app("later"), App(app_id="later"))
        self.assertEqual(store.key(key.key_id), key)

    async def test_suspension_by_other_process(self) -> None:
        """
        A suspension written by another process is seen after the next
        re-read, and the observers of changed apps hear of it once; so they
        do of the resumption.
        """
        store = await self.start()
        changes: list[frozenset[str]] = []
        store.on_apps_changed(changes.append)
        self.other_process(store_suspension, (), "default", True, 5.0)
        self.clock.advance(1.9)
        await self.barrier()
        self.assertEqual((store.app("default"), changes), (App(app_id="default"), []))
        self.clock.advance(0.1)
        await self.barrier()
        self.assertEqual(store.app("default"), App(app_id="default", suspended=True))
        self.assertEqual(changes, [frozenset({"default"})])
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(changes, [frozenset({"default"})])
        self.other_process(store_suspension, (), "default", False, 9.0)
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(store.app("default"), App(app_id="default"))
        self.assertEqual(changes, [frozenset({"default"})] * 2)

    async def test_suspension_of_declared_app(self) -> None:
        """
        A declared app is suspended by its stored flag; its declared plan
        and keys stay.
        """
        store = await self.start(DECLARATIONS)
        self.other_process(store_suspension, DECLARATIONS, "app_conf", True, 5.0)
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(store.app("app_conf"), App(app_id="app_conf", plan=Plan(name="CONF"), suspended=True))
        self.assertEqual(store.key("sk_id_conf"), CONFIG_SECRET)

    async def test_apps_changed_not_on_start(self) -> None:
        """
        Neither the first load nor a re-read that changes nothing is
        reported.
        """
        store = await self.start()
        changes: list[frozenset[str]] = []
        store.on_apps_changed(changes.append)
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(changes, [])

    async def test_apps_changed_by_writes(self) -> None:
        """
        Writes through the store report the apps they change; key changes
        alone are not app changes.
        """
        store = await self.start()
        changes: list[frozenset[str]] = []
        store.on_apps_changed(changes.append)
        await store.create_app("shop")
        await store.set_plan("default", Plan(name="P"))
        await store.revoke_key(store.keys_of("default")[0].key_id)
        self.assertEqual(changes, [frozenset({"shop"}), frozenset({"default"})])

    async def test_apps_changed_observer_fails(self) -> None:
        """
        An observer that raises is logged; the other observers are still
        called and the store keeps re-reading.
        """
        store = await self.start()
        changes: list[frozenset[str]] = []
        store.on_apps_changed(lambda changed: 1 / 0)
        store.on_apps_changed(changes.append)
        self.other_process(store_suspension, (), "default", True, 5.0)
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(changes, [frozenset({"default"})])
        self.other_process(store_app, (), "later", None, 5.0)
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(changes, [frozenset({"default"}), frozenset({"later"})])

    async def test_reload_failure(self) -> None:
        """
        A failed re-read is logged and the next one happens anyway.
        """
        pool = _FlakyPool(self.open_pool())
        store = await self.start(pool=pool)
        self.pool = pool._pool
        key = store.keys_of("default")[0]
        self.other_process(store_revocation, (), key.key_id)
        pool.fail_next = True
        self.clock.advance(2)
        [error] = self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertTrue(store.key(key.key_id).active)  # type: ignore[union-attr]
        self.clock.advance(2)
        await self.barrier()
        self.assertFalse(store.key(key.key_id).active)  # type: ignore[union-attr]

    async def test_unreachable(self) -> None:
        """
        After a failed re-read, known keys are still served but an unknown
        one raises L{StoreUnavailable} (it may have been created since);
        the next re-read that works ends that.
        """
        pool = _FlakyPool(self.open_pool())
        store = await self.start(pool=pool)
        self.pool = pool._pool
        key = store.keys_of("default")[0]
        self.assertTrue(store.reachable)
        pool.fail_next = True
        self.clock.advance(2)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertFalse(store.reachable)
        self.assertEqual(store.key(key.key_id), key)
        self.assertRaises(StoreUnavailable, store.key, "pk_live_unknown")
        self.clock.advance(2)
        await self.barrier()
        self.assertTrue(store.reachable)
        self.assertIsNone(store.key("pk_live_unknown"))

    async def test_stop(self) -> None:
        """
        Stopping cancels the re-read timer.
        """
        store = await self.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        await store.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.pool.running)

    async def test_stop_twice(self) -> None:
        """
        Stopping a stopped store does nothing (a second shutdown must not
        close the pool again).
        """
        store = await self.start()
        await store.stopService()
        self.assertIsNone(await store.stopService())

    async def test_ready(self) -> None:
        """
        L{KeyStore.ready} fires for every caller, before and after the
        load.
        """
        self.pool = self.open_pool()
        store = self.make_store(self.pool)
        early = store.ready
        self.addCleanup(self.stop, store)
        await store.startService()
        self.assertIsNone(await early)
        self.assertIsNone(await store.ready)

    async def test_load_failure(self) -> None:
        """
        When the database cannot be opened, L{KeyStore.ready} fails
        with the reason, it is logged, and the store still stops cleanly.
        """
        self.pool = self.broken_pool()
        store = self.make_store(self.pool)
        started = store.startService()
        await self.assertFailure(started, self.driver_error)
        await self.assertFailure(store.ready, self.driver_error)
        self.assertEqual(len(self.flushLoggedErrors(self.driver_error)), 1)
        await store.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def broken_pool(self) -> Any:
        """
        A pool on a database that cannot be opened.
        """
        raise NotImplementedError()

    async def test_schema_too_new(self) -> None:
        """
        A database upgraded by a newer release is refused with a clear
        error naming both versions; nothing is loaded.
        """
        self.other_process(
            lambda cursor: cursor.execute("UPDATE schema_versions SET version = 99 WHERE component = 'keys'")
        )
        self.pool = self.open_pool()
        store = self.make_store(self.pool)
        started = store.startService()
        error = await self.assertFailure(started, SchemaTooNew)
        self.assertIn("keys schema version 99", str(error))
        self.assertIn(f"versions up to {MIGRATIONS[-1].version}", str(error))
        self.flushLoggedErrors(SchemaTooNew)
        await store.stopService()
        with self.assertRaises(SchemaTooNew):
            self.db.connect(COMPONENT, MIGRATIONS)

    async def test_schema_version_recorded(self) -> None:
        """
        A new database records the newest version of the key tables.
        """
        await self.start()
        connection = self.db.connect(COMPONENT, MIGRATIONS)
        try:
            cursor = DialectCursor(connection.cursor(), self.db.dialect)
            cursor.execute("SELECT version FROM schema_versions WHERE component = ?", (COMPONENT,))
            self.assertEqual(cursor.fetchone()[0], MIGRATIONS[-1].version)
        finally:
            connection.close()

    async def test_revoked_keys_reported(self) -> None:
        """
        Observers of revoked keys hear the ids of keys that stopped
        authenticating, whether revoked through the store or by another
        process (at the next re-read); not on start, and not for keys that
        were revoked already.
        """
        store = await self.start()
        revoked: list[frozenset[str]] = []
        store.on_keys_revoked(revoked.append)
        first, second = (key.key_id for key in store.keys_of("default"))
        await store.revoke_key(first)
        self.assertEqual(revoked, [frozenset({first})])
        await store.revoke_key(first)
        self.other_process(store_revocation, (), second)
        self.assertEqual(revoked, [frozenset({first})])
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(revoked, [frozenset({first}), frozenset({second})])

    async def test_admin_changes_logged(self) -> None:
        """
        A key created and revoked through the store and a suspension and
        resumption written by another process are each one log line; the
        first load (and its bootstrap) is not a change, and no line holds a
        secret.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def changes() -> list[tuple[str, str, str]]:
            return [
                (event["event"], event["app"], event["key"])
                for event in events
                if event.get("log_namespace") == "meteredrt.store.keystore.KeyStore" and "event" in event
            ]

        store = await self.start()
        self.assertEqual(changes(), [])
        key = await store.create_key("default", KeyType.SECRET, ("**",), ACTIONS)
        await store.revoke_key(key.key_id)
        self.other_process(store_suspension, (), "default", True, 5.0)
        self.clock.advance(2)
        await self.barrier()
        self.other_process(store_suspension, (), "default", False, 6.0)
        self.clock.advance(2)
        await self.barrier()
        self.assertEqual(
            changes(),
            [
                ("key_created", "default", key.key_id),
                ("key_revoked", "default", key.key_id),
                ("app_suspended", "default", "-"),
                ("app_resumed", "default", "-"),
            ],
        )
        [line] = [formatEvent(e) for e in events if e.get("event") == "key_created"]
        self.assertEqual(line, f"Admin change: key_created app=default key={key.key_id}")
        secrets = [k.secret for k in store.keys_of("default") if k.secret]
        self.assertIn(key.secret, secrets)
        self.assertEqual(len(secrets), 2)  # the bootstrapped key's and the new one
        rendered = "".join(formatEvent(e) + repr(e) + json_line(e) for e in events)
        for secret in secrets:
            self.assertNotIn(secret, rendered)


class SQLiteKeyStoreTests(KeyStoreConformanceMixin, TestCase):
    """
    L{KeyStore} on SQLite files in a data directory.
    """

    driver_error = sqlite3.OperationalError

    def make_database(self) -> Database:
        return Database(self.mktemp())

    def broken_pool(self) -> Any:
        from meteredrt.store.database import sqlite_pool

        return sqlite_pool(os.path.join(self.mktemp(), "missing", "db"), COMPONENT, MIGRATIONS, reactor)

    async def test_upgrade_previous_release(self) -> None:
        """
        A data directory made by the release before schema versioning (its
        tables, no C{schema_versions}) is adopted in place: its apps and
        keys are served, and the version is recorded.
        """
        path = self.db.prepare_sqlite(COMPONENT)
        connection = sqlite3.connect(path)
        with connection:
            for statement in PREVIOUS_RELEASE_KEY_SCHEMA:
                connection.execute(statement)
            connection.execute("INSERT INTO apps VALUES ('old', NULL, 0, 1.0)")
            connection.execute(
                "INSERT INTO keys VALUES ('pk_live_old', 'old', 'publishable', NULL,"
                " '[\"**\"]', '[\"subscribe\"]', '[]', 1, 0, 1.0)"
            )
        connection.close()
        store = await self.start()
        self.assertEqual(self.bootstrapped, [])
        self.assertEqual([key.key_id for key in store.keys_of("old")], ["pk_live_old"])
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        self.assertEqual(
            connection.execute("SELECT component, version FROM schema_versions").fetchall(), [("keys", 1)]
        )


class PostgreSQLKeyStoreTests(KeyStoreConformanceMixin, TestCase):
    """
    L{KeyStore} on a PostgreSQL database of its own.
    """

    @property
    def driver_error(self) -> type[Exception]:  # type: ignore[override]
        import psycopg2

        return psycopg2.OperationalError  # type: ignore[no-any-return]

    def make_database(self) -> Database:
        return Database(self.mktemp(), fresh_database())

    def broken_pool(self) -> Any:
        # A port nothing listens on: connecting is refused at once.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return self.open_pool(Database(self.mktemp(), f"postgresql://nobody@127.0.0.1:{port}/none"))


#: The key tables exactly as the release before schema versioning created
#: them.
PREVIOUS_RELEASE_KEY_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS apps (
        app_id TEXT PRIMARY KEY,
        plan_json TEXT,
        suspended INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS keys (
        key_id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL,
        type TEXT NOT NULL,
        secret TEXT,
        channel_patterns_json TEXT NOT NULL,
        actions_json TEXT NOT NULL,
        allowed_origins_json TEXT NOT NULL,
        auto_inject_turn INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS keys_by_app ON keys (app_id)",
)


class DatabaseFileTests(SynchronousTestCase):
    """
    Tests for L{prepare_database} and the table functions used by the CLI.
    """

    def test_private(self) -> None:
        """
        The data directory and database file are private to their owner.
        """
        data_dir = self.mktemp()
        path = prepare_database(data_dir)
        self.assertEqual(stat.S_IMODE(os.stat(data_dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(prepare_database(data_dir), path)

    def test_wal(self) -> None:
        """
        Connections use the WAL journal so the CLI and server can share the
        file.
        """
        connection = connect(prepare_database(self.mktemp()))
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        self.assertEqual(connection.execute("PRAGMA busy_timeout").fetchone(), (5000,))

    def test_rollback(self) -> None:
        """
        A refused write leaves nothing behind.
        """
        connection = connect(prepare_database(self.mktemp()))
        self.addCleanup(connection.close)
        cursor = DialectCursor(connection.cursor(), SQLITE)
        with connection:
            store_app(cursor, (), "a", None, 0.0)
        with self.assertRaises(KeyLimitReached), connection:
            for _ in range(MAX_KEYS_PER_APP + 1):
                store_key(cursor, (), "a", KeyType.PUBLISHABLE, ("**",), frozenset(), 0.0)
        self.assertEqual(connection.execute("SELECT COUNT(*) FROM keys").fetchone(), (0,))


class StoreSuspensionTests(SynchronousTestCase):
    """
    Tests for L{store_suspension}, as the CLI runs it.
    """

    def setUp(self) -> None:
        self.connection = connect(prepare_database(self.mktemp()))
        self.addCleanup(self.connection.close)
        self.cursor = DialectCursor(self.connection.cursor(), SQLITE)

    def write(self, *args: Any) -> App:
        with self.connection:
            return store_suspension(self.cursor, *args)

    def test_round_trip(self) -> None:
        """
        Suspending and resuming set the stored flag; doing either twice is
        not an error.
        """
        with self.connection:
            store_app(self.cursor, (), "a", Plan(name="P"), 0.0)
        self.assertEqual(self.write((), "a", True, 1.0), App(app_id="a", plan=Plan(name="P"), suspended=True))
        self.assertEqual(self.write((), "a", True, 2.0), App(app_id="a", plan=Plan(name="P"), suspended=True))
        self.assertEqual(self.write((), "a", False, 3.0), App(app_id="a", plan=Plan(name="P")))
        self.assertEqual(self.write((), "a", False, 4.0), App(app_id="a", plan=Plan(name="P")))

    def test_declared_app(self) -> None:
        """
        A declared app without a row gets one holding the flag and no plan;
        the declared plan still wins.
        """
        app = self.write(DECLARATIONS, "app_conf", True, 1.0)
        self.assertEqual(app, App(app_id="app_conf", plan=Plan(name="CONF"), suspended=True))
        self.assertEqual(
            self.connection.execute("SELECT app_id, plan_json, suspended FROM apps").fetchall(),
            [("app_conf", None, 1)],
        )

    def test_unknown_app(self) -> None:
        """
        An app that is neither stored nor declared cannot be suspended, and
        nothing is written.
        """
        with self.assertRaises(NoSuchApp):
            self.write(DECLARATIONS, "nope", True, 1.0)
        self.assertEqual(self.connection.execute("SELECT COUNT(*) FROM apps").fetchone(), (0,))


class TenancyTests(SynchronousTestCase):
    """
    Tests for L{Tenancy.overlay}.
    """

    def test_orphans_hidden(self) -> None:
        """
        Stored keys of an app nobody knows are not served.
        """
        key = Key(key_id="pk_live_x", app_id="gone", type=KeyType.PUBLISHABLE, channel_patterns=("**",), actions=frozenset())
        tenancy = Tenancy.overlay(StoredState(apps={}, keys={"pk_live_x": key}), ())
        self.assertIsNone(tenancy.key("pk_live_x"))
        self.assertEqual(tenancy.keys_of("gone"), [])

    def test_declared(self) -> None:
        """
        Declared apps are marked as such and ordered with stored ones.
        """
        tenancy = Tenancy.overlay(StoredState(apps={"z": App(app_id="z")}, keys={}), DECLARATIONS)
        self.assertEqual([app.app_id for app in tenancy.apps()], ["app_conf", "z"])
        self.assertTrue(tenancy.is_declared("app_conf"))
        self.assertFalse(tenancy.is_declared("z"))

    def test_changed_apps(self) -> None:
        """
        Apps added, removed or with another record are changed; keys are not
        compared.
        """
        before = Tenancy.overlay(StoredState(apps={"a": App("a"), "b": App("b"), "c": App("c")}, keys={}), ())
        key = Key(key_id="pk_live_x", app_id="a", type=KeyType.PUBLISHABLE, channel_patterns=("**",), actions=frozenset())
        after = Tenancy.overlay(
            StoredState(apps={"a": App("a"), "b": App("b", suspended=True), "d": App("d")}, keys={"pk_live_x": key}),
            (),
        )
        self.assertEqual(after.changed_apps(before), frozenset({"b", "c", "d"}))
        self.assertEqual(before.changed_apps(after), frozenset({"b", "c", "d"}))
        self.assertEqual(after.changed_apps(after), frozenset())


def _tenancy(apps: Sequence[App], keys: Sequence[Key]) -> Tenancy:
    return Tenancy.overlay(StoredState(apps={a.app_id: a for a in apps}, keys={k.key_id: k for k in keys}), ())


class AdminChangesTests(SynchronousTestCase):
    """
    Tests for L{admin_changes}.
    """

    def test_changes(self) -> None:
        """
        Apps created, suspended, resumed or given another plan, and keys
        created or revoked, are each one change, apps first.
        """
        key = Key("pk_live_a", "a", KeyType.PUBLISHABLE, ("**",), frozenset())
        before = _tenancy([App("a"), App("b", suspended=True)], [key])
        after = _tenancy(
            [App("a", plan=Plan(name="P"), suspended=True), App("b"), App("c")],
            [
                attrs.evolve(key, revoked=True),
                Key("sk_id_new", "c", KeyType.SECRET, ("**",), ACTIONS, secret="sk_secret_never_logged"),
            ],
        )
        self.assertEqual(
            admin_changes(before, after),
            [
                AdminChange("app_suspended", "a"),
                AdminChange("plan_changed", "a"),
                AdminChange("app_resumed", "b"),
                AdminChange("app_created", "c"),
                AdminChange("key_revoked", "a", "pk_live_a"),
                AdminChange("key_created", "c", "sk_id_new"),
            ],
        )
        self.assertEqual(admin_changes(after, after), [])

