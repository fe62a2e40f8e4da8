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
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from meteredrt.apps import ACTIONS, MAX_KEYS_PER_APP, PUBLISHABLE_DEFAULT_ACTIONS, App, Key, KeyType, Plan
from meteredrt.config import AppDeclaration
from meteredrt.interfaces import IKeyStore
from meteredrt.keystore import (
    AdminChange,
    AppExists,
    DeclaredInConfig,
    InvalidKeyField,
    KeyLimitReached,
    NoSuchApp,
    SQLiteKeyStore,
    StoredState,
    Tenancy,
    admin_changes,
    connect,
    create_schema,
    open_pool,
    prepare_database,
    store_app,
    store_key,
    store_revocation,
    store_suspension,
)
from meteredrt.logs import json_line

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


class SQLiteKeyStoreTests(TestCase):
    """
    Tests for L{SQLiteKeyStore}.
    """

    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        self.path = prepare_database(self.data_dir)
        self.clock = Clock()
        self.bootstrapped: list[tuple[App, tuple[Key, ...]]] = []

    async def start(self, declarations: Sequence[AppDeclaration] = (), pool: Any = None) -> SQLiteKeyStore:
        """
        Start a store on the test's database and stop it at clean-up.
        """
        self.pool = open_pool(self.path, reactor) if pool is None else pool
        store = SQLiteKeyStore(
            self.pool,
            clock=self.clock,
            declarations=declarations,
            on_bootstrap=lambda app, keys: self.bootstrapped.append((app, keys)),
        )
        self.addCleanup(self.stop, store)
        await store.startService()
        return store

    async def stop(self, store: SQLiteKeyStore) -> None:
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
        connection = connect(self.path)
        try:
            with connection:
                create_schema(connection.cursor())
                return operation(connection.cursor(), *args)
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
        self.pool = open_pool(self.path, reactor)
        store = SQLiteKeyStore(self.pool, clock=self.clock, on_bootstrap=lambda app, keys: 1 / 0)
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
        connection = connect(self.path)
        with connection:
            cursor = connection.cursor()
            create_schema(cursor)
            cursor.execute(
                "INSERT INTO apps VALUES ('app_conf', ?, 1, 0)", ('{"name": "STORED"}',)
            )
            cursor.execute(
                "INSERT INTO keys VALUES ('sk_id_conf', 'app_conf', 'secret', 'sk_secret_old',"
                " '[\"**\"]', '[\"send\"]', '[]', 1, 1, 0)"
            )
        connection.close()
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
                if event.get("log_namespace") == "meteredrt.keystore.SQLiteKeyStore" and "event" in event
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
        pool = _FlakyPool(open_pool(self.path, reactor))
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
        L{SQLiteKeyStore.ready} fires for every caller, before and after the
        load.
        """
        self.pool = open_pool(self.path, reactor)
        store = SQLiteKeyStore(self.pool, clock=self.clock)
        early = store.ready
        self.addCleanup(self.stop, store)
        await store.startService()
        self.assertIsNone(await early)
        self.assertIsNone(await store.ready)

    async def test_load_failure(self) -> None:
        """
        When the database cannot be opened, L{SQLiteKeyStore.ready} fails
        with the reason, it is logged, and the store still stops cleanly.
        """
        self.pool = open_pool(os.path.join(self.mktemp(), "missing", "db"), reactor)
        store = SQLiteKeyStore(self.pool, clock=self.clock)
        started = store.startService()
        await self.assertFailure(started, sqlite3.OperationalError)
        await self.assertFailure(store.ready, sqlite3.OperationalError)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        await store.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


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
        cursor = connection.cursor()
        create_schema(cursor)
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
        self.cursor = self.connection.cursor()
        create_schema(self.cursor)

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

