"""
Tests for L{meteredrt.cli}, end to end against a temporary data directory.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jwt
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.cli import main
from meteredrt.keystore import SQLiteKeyStore, open_pool, prepare_database

NOW = 1_700_000_000

CONFIG = """
[server]
data_dir = "{data_dir}"

[[apps]]
id = "app_demo"
[apps.plan]
name = "FREE"

[[apps.keys]]
type = "secret"
key_id = "sk_id_demo"
secret = "sk_secret_demo_0123456789"
channel_patterns = ["demo/**"]
actions = ["publish", "subscribe"]
"""


class CommandLineMixin:
    """
    Run L{main} in-process against a fresh data directory.
    """

    def setUp(self) -> None:
        self.data_dir: str = self.mktemp()  # type: ignore[attr-defined]

    def cli(self, *argv: str, status: int = 0, data_dir: bool = True) -> tuple[str, str]:
        """
        Run one command; check its exit status; return its output and
        error output.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        args = [*argv, "--data-dir", self.data_dir] if data_dir else list(argv)
        self.assertEqual(  # type: ignore[attr-defined]
            main(args, stdout=stdout, stderr=stderr, clock=lambda: NOW + 0.5), status, stderr.getvalue()
        )
        if status:
            self.assertEqual(stdout.getvalue(), "")  # type: ignore[attr-defined]
            self.assertNotIn("Traceback", stderr.getvalue())  # type: ignore[attr-defined]
        return stdout.getvalue(), stderr.getvalue()

    def json(self, *argv: str) -> Any:
        """
        Run one command with C{--json} and decode its output.
        """
        out, _ = self.cli(*argv, "--json")
        return json.loads(out)

    def fail_with(self, fragment: str, *argv: str) -> None:
        """
        The command fails with status 2 and a one-line message containing
        C{fragment}.
        """
        _, err = self.cli(*argv, status=2)
        self.assertIn(fragment, err)  # type: ignore[attr-defined]

    def create_key(self, *argv: str) -> dict[str, Any]:
        result: dict[str, Any] = self.json("keys", "create", *argv)
        return result

    def write_config(self) -> str:
        path: str = self.mktemp()  # type: ignore[attr-defined]
        with open(path, "w") as f:
            f.write(CONFIG.format(data_dir=self.data_dir))
        return path


class AppsCommandTests(CommandLineMixin, SynchronousTestCase):
    """
    Tests for C{meteredrt apps}.
    """

    def test_list_empty(self) -> None:
        """
        A data directory whose database holds no apps lists none.
        """
        prepare_database(self.data_dir)
        self.assertEqual(self.cli("apps", "list"), ("No apps.\n", ""))
        self.assertEqual(self.json("apps", "list"), [])

    def test_create_and_list(self) -> None:
        """
        A created app is listed, in text and JSON.
        """
        self.assertEqual(self.cli("apps", "create", "shop"), ("Created app shop.\n", ""))
        out, _ = self.cli("apps", "list")
        self.assertEqual(out.splitlines(), ["APP   SOURCE  PLAN  KEYS  STATUS", "shop  store   -     0     active"])
        self.assertEqual(
            self.json("apps", "list"),
            [{"appId": "shop", "source": "store", "suspended": False, "plan": None, "activeKeys": 0}],
        )

    def test_create_json(self) -> None:
        """
        C{apps create --json} prints the app.
        """
        self.assertEqual(self.json("apps", "create", "shop")["appId"], "shop")

    def test_create_twice(self) -> None:
        """
        Creating an existing app fails.
        """
        self.cli("apps", "create", "shop")
        self.fail_with("meteredrt: error: app 'shop' exists already", "apps", "create", "shop")

    def test_create_bad_id(self) -> None:
        """
        A malformed app id is refused.
        """
        self.fail_with("APP_ID: must be", "apps", "create", "a/b")

    def test_options_before_command(self) -> None:
        """
        The common options may also come before the command words.
        """
        self.cli("apps", "create", "shop")
        out, _ = self.cli("--json", "--data-dir", self.data_dir, "apps", "list", data_dir=False)
        self.assertEqual(json.loads(out)[0]["appId"], "shop")

    def test_config_apps(self) -> None:
        """
        Apps declared in the configuration file are listed, and its
        C{data_dir} is used when C{--data-dir} is not given.
        """
        config = self.write_config()
        self.cli("apps", "create", "shop")
        out, _ = self.cli("apps", "list", "--json", "--config", config, data_dir=False)
        self.assertEqual(
            [(app["appId"], app["source"], app["activeKeys"]) for app in json.loads(out)],
            [("app_demo", "config", 1), ("shop", "store", 0)],
        )
        self.assertEqual(json.loads(out)[0]["plan"]["name"], "FREE")
        self.assertEqual(json.loads(out)[0]["plan"]["maxConcurrentConnections"], None)

    def test_bad_config(self) -> None:
        """
        A broken configuration file is reported in one line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[server]\nbogus = 1\n")
        self.fail_with(f"{path}: server.bogus: unknown key 'bogus'", "apps", "list", "--config", path)

    def test_unusable_data_dir(self) -> None:
        """
        A data directory that cannot be created is reported without a
        traceback.
        """
        blocker = self.mktemp()
        open(blocker, "w").close()
        self.data_dir = os.path.join(blocker, "sub")
        self.fail_with("meteredrt: error:", "apps", "create", "shop")


class KeysCommandTests(CommandLineMixin, SynchronousTestCase):
    """
    Tests for C{meteredrt keys}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.cli("apps", "create", "shop")

    def test_create_secret(self) -> None:
        """
        A secret key gets all four actions on C{**} by default, and its
        secret is printed once.
        """
        out, _ = self.cli("keys", "create", "--app", "shop", "--type", "secret")
        [key] = self.json("keys", "list", "--app", "shop")
        self.assertEqual(
            key,
            {
                "keyId": key["keyId"],
                "appId": "shop",
                "type": "secret",
                "channelPatterns": ["**"],
                "actions": ["presence", "publish", "send", "subscribe"],
                "allowedOrigins": [],
                "autoInjectTurn": True,
                "status": "active",
                "source": "store",
            },
        )
        self.assertIn(key["keyId"], out)
        self.assertIn("secret:           sk_secret_", out)
        self.assertIn("shown only now", out)

    def test_create_publishable(self) -> None:
        """
        A publishable key gets subscribe, publish and presence by default,
        and no secret.
        """
        key = self.create_key("--app", "shop", "--type", "publishable")
        self.assertTrue(key["keyId"].startswith("pk_live_"))
        self.assertEqual(key["actions"], ["presence", "publish", "subscribe"])
        self.assertNotIn("secret", key)

    def test_create_options(self) -> None:
        """
        Channels, actions and origins are comma-separated and repeatable;
        TURN injection can be turned off.
        """
        key = self.create_key(
            "--app", "shop", "--type", "publishable",
            "--channels", "a/*, b/**", "--channels", "c",
            "--actions", "subscribe",
            "--origins", "https://a.example,http://localhost:3000",
            "--no-auto-inject-turn",
        )  # fmt: skip
        self.assertEqual(key["channelPatterns"], ["a/*", "b/**", "c"])
        self.assertEqual(key["actions"], ["subscribe"])
        self.assertEqual(key["allowedOrigins"], ["https://a.example", "http://localhost:3000"])
        self.assertFalse(key["autoInjectTurn"])

    def test_create_secret_json(self) -> None:
        """
        With C{--json} the secret is part of the created key, once.
        """
        key = self.create_key("--app", "shop", "--type", "secret")
        self.assertTrue(key["secret"].startswith("sk_secret_"))

    def test_list_never_shows_secrets(self) -> None:
        """
        Neither form of C{keys list} contains a secret.
        """
        secret = self.create_key("--app", "shop", "--type", "secret")["secret"]
        out, _ = self.cli("keys", "list", "--app", "shop")
        json_out, _ = self.cli("keys", "list", "--app", "shop", "--json")
        self.assertNotIn(secret, out + json_out)
        self.assertNotIn("sk_secret_", out + json_out)

    def test_list_text(self) -> None:
        """
        The text listing has one row per key.
        """
        key = self.create_key("--app", "shop", "--type", "publishable", "--no-auto-inject-turn")
        out, _ = self.cli("keys", "list", "--app", "shop")
        header, row = out.splitlines()
        self.assertEqual(header.split(), ["KEY", "ID", "TYPE", "STATUS", "SOURCE", "CHANNELS", "ACTIONS", "ORIGINS", "TURN"])
        self.assertEqual(
            row.split(), [key["keyId"], "publishable", "active", "store", "**", "presence,publish,subscribe", "-", "off"]
        )

    def test_list_no_keys(self) -> None:
        """
        An app without keys says so.
        """
        self.assertEqual(self.cli("keys", "list", "--app", "shop")[0], "App shop has no keys.\n")

    def test_list_unknown_app(self) -> None:
        """
        Listing the keys of an unknown app fails.
        """
        self.fail_with("no app 'nope'", "keys", "list", "--app", "nope")

    def test_create_unknown_app(self) -> None:
        """
        Creating a key for an unknown app fails.
        """
        self.fail_with("no app 'nope'", "keys", "create", "--app", "nope", "--type", "secret")

    def test_create_invalid_pattern(self) -> None:
        """
        An invalid channel pattern is named by its option.
        """
        self.fail_with("--channels[1]: invalid pattern", "keys", "create", "--app", "shop", "--type", "secret",
                       "--channels", "a,b\\")  # fmt: skip

    def test_create_no_channels(self) -> None:
        """
        A key needs at least one channel pattern.
        """
        self.fail_with("--channels: must list at least one pattern", "keys", "create", "--app", "shop",
                       "--type", "secret", "--channels", "")  # fmt: skip

    def test_create_unknown_action(self) -> None:
        """
        Unknown actions are refused.
        """
        self.fail_with("--actions[1]: unknown action 'fly'", "keys", "create", "--app", "shop",
                       "--type", "secret", "--actions", "subscribe,fly")  # fmt: skip

    def test_create_origins_on_secret(self) -> None:
        """
        Allowed origins are for publishable keys.
        """
        self.fail_with("--origins: applies to publishable keys only", "keys", "create", "--app", "shop",
                       "--type", "secret", "--origins", "https://a.example")  # fmt: skip

    def test_create_bad_type(self) -> None:
        """
        The key type is checked by the parser.
        """
        self.fail_with("invalid choice: 'private'", "keys", "create", "--app", "shop", "--type", "private")

    def test_limit(self) -> None:
        """
        The 51st active key of an app is refused.
        """
        for _ in range(50):
            self.cli("keys", "create", "--app", "shop", "--type", "publishable")
        self.fail_with("already has 50 active keys", "keys", "create", "--app", "shop", "--type", "publishable")

    def test_revoke(self) -> None:
        """
        A revoked key is listed as revoked.
        """
        key = self.create_key("--app", "shop", "--type", "secret")
        self.assertEqual(self.cli("keys", "revoke", key["keyId"]), (f"Revoked key {key['keyId']}.\n", ""))
        [listed] = self.json("keys", "list", "--app", "shop")
        self.assertEqual(listed["status"], "revoked")

    def test_revoke_unknown(self) -> None:
        """
        Revoking an unknown key fails.
        """
        self.fail_with("no stored key 'sk_id_nope'", "keys", "revoke", "sk_id_nope")

    def test_config_keys(self) -> None:
        """
        Keys declared in the configuration are listed (without their
        secret) and cannot be revoked with the CLI.
        """
        config = self.write_config()
        [key] = self.json("keys", "list", "--app", "app_demo", "--config", config)
        self.assertEqual((key["keyId"], key["source"]), ("sk_id_demo", "config"))
        self.assertNotIn("secret", key)
        self.fail_with("declared in the configuration file", "keys", "revoke", "sk_id_demo", "--config", config)

    def test_create_for_config_app(self) -> None:
        """
        A declared app can get stored keys.
        """
        config = self.write_config()
        self.create_key("--app", "app_demo", "--type", "publishable", "--config", config)
        keys = self.json("keys", "list", "--app", "app_demo", "--config", config)
        self.assertEqual(sorted(key["source"] for key in keys), ["config", "store"])


class TokenCommandTests(CommandLineMixin, SynchronousTestCase):
    """
    Tests for C{meteredrt token mint}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.cli("apps", "create", "shop")
        self.key = self.create_key("--app", "shop", "--type", "secret")

    def mint(self, *argv: str, key: str | None = None, app: str = "shop") -> str:
        out, _ = self.cli("token", "mint", "--app", app, "--key", key or self.key["keyId"], *argv)
        return out

    def test_minimal(self) -> None:
        """
        The printed token is an HS256 JWT with the key id as C{kid}, signed
        with the key's secret, expiring in an hour.
        """
        token = self.mint("--peer-id", "u_1").strip()
        self.assertEqual(jwt.get_unverified_header(token), {"alg": "HS256", "typ": "JWT", "kid": self.key["keyId"]})
        claims = jwt.decode(
            token, self.key["secret"], algorithms=["HS256"], options={"verify_exp": False}
        )
        self.assertEqual(claims, {"sub": "u_1", "iat": NOW, "exp": NOW + 3600})

    def test_all_claims(self) -> None:
        """
        Channels, permissions, lifetime and both metadata objects become
        claims.
        """
        out = self.mint(
            "--peer-id", "u_2", "--channels", "a/b,c/*", "--permissions", "publish,subscribe",
            "--expires-in", "60", "--metadata", '{"iceServers": []}', "--peer-metadata", '{"name": "Ada"}',
        )  # fmt: skip
        claims = jwt.decode(out.strip(), self.key["secret"], algorithms=["HS256"], options={"verify_exp": False})
        self.assertEqual(
            claims,
            {
                "sub": "u_2",
                "iat": NOW,
                "exp": NOW + 60,
                "channels": ["a/b", "c/*"],
                "permissions": ["publish", "subscribe"],
                "metadata": {"iceServers": []},
                "peerMetadata": {"name": "Ada"},
            },
        )

    def test_json(self) -> None:
        """
        With C{--json} the token comes with its expiry.
        """
        result = self.json("token", "mint", "--app", "shop", "--key", self.key["keyId"], "--peer-id", "u")
        self.assertEqual(result["expiresAt"], NOW + 3600)
        self.assertEqual(jwt.decode(result["token"], self.key["secret"], algorithms=["HS256"],
                                    options={"verify_exp": False})["sub"], "u")  # fmt: skip

    def test_config_key(self) -> None:
        """
        Keys declared in the configuration file can mint.
        """
        config = self.write_config()
        out = self.mint("--peer-id", "p", "--config", config, key="sk_id_demo", app="app_demo")
        claims = jwt.decode(out.strip(), "sk_secret_demo_0123456789", algorithms=["HS256"], options={"verify_exp": False})
        self.assertEqual(claims["sub"], "p")

    def test_publishable_key(self) -> None:
        """
        Publishable keys cannot sign.
        """
        key = self.create_key("--app", "shop", "--type", "publishable")
        self.fail_with("only secret keys sign tokens", "token", "mint", "--app", "shop", "--key", key["keyId"],
                       "--peer-id", "p")  # fmt: skip

    def test_revoked_key(self) -> None:
        """
        Revoked keys cannot sign.
        """
        self.cli("keys", "revoke", self.key["keyId"])
        self.fail_with("is revoked", "token", "mint", "--app", "shop", "--key", self.key["keyId"], "--peer-id", "p")

    def test_other_app(self) -> None:
        """
        The key must belong to the named app.
        """
        self.cli("apps", "create", "other")
        self.fail_with("app 'other' has no key", "token", "mint", "--app", "other", "--key", self.key["keyId"],
                       "--peer-id", "p")  # fmt: skip

    def test_unknown_app(self) -> None:
        """
        The app must exist.
        """
        self.fail_with("no app 'nope'", "token", "mint", "--app", "nope", "--key", self.key["keyId"], "--peer-id", "p")

    def test_bad_metadata(self) -> None:
        """
        Metadata must be a JSON object.
        """
        self.fail_with("--metadata: not valid JSON", "token", "mint", "--app", "shop", "--key", self.key["keyId"],
                       "--peer-id", "p", "--metadata", "{")  # fmt: skip
        self.fail_with("--peer-metadata: must be a JSON object", "token", "mint", "--app", "shop", "--key",
                       self.key["keyId"], "--peer-id", "p", "--peer-metadata", "[]")  # fmt: skip

    def test_mint_refused(self) -> None:
        """
        What L{meteredrt.auth.mint_token} refuses is reported with its field.
        """
        self.fail_with("cannot mint token: peerId:", "token", "mint", "--app", "shop", "--key", self.key["keyId"],
                       "--peer-id", "\x01")  # fmt: skip

    def test_missing_option(self) -> None:
        """
        Missing required options are usage errors.
        """
        self.fail_with("--peer-id", "token", "mint", "--app", "shop", "--key", self.key["keyId"])


class ParserTests(CommandLineMixin, SynchronousTestCase):
    """
    Tests for the command line as a whole.
    """

    def test_no_command(self) -> None:
        """
        Without a command the usage is printed and the status is 2.
        """
        _, err = self.cli(status=2, data_dir=False)
        self.assertIn("usage: meteredrt", err)

    def test_help(self) -> None:
        """
        C{--help} lists the command groups and succeeds.
        """
        stdout = io.StringIO()
        self.assertEqual(main(["--help"], stdout=stdout, stderr=io.StringIO()), 0)
        for group in ("apps", "keys", "token"):
            self.assertIn(group, stdout.getvalue())


class RevocationTests(CommandLineMixin, TestCase):
    """
    A key revoked with the CLI stops authenticating on a running server.
    """

    async def test_revoked_within_seconds(self) -> None:
        """
        A running key store sees a CLI revocation after its next re-read,
        within 5 seconds.
        """
        clock = Clock()
        pool = open_pool(prepare_database(self.data_dir), reactor)
        store = SQLiteKeyStore(pool, clock=clock)
        await store.startService()
        self.addCleanup(store.stopService)
        [key] = [key for key in store.keys_of("default") if key.secret]
        self.cli("keys", "revoke", key.key_id)
        self.assertTrue(store.key(key.key_id).active)  # type: ignore[union-attr]
        clock.advance(2)
        await pool.runInteraction(lambda cursor: None)
        self.assertFalse(store.key(key.key_id).active)  # type: ignore[union-attr]
