"""
Tests for L{meteredrt.config}.
"""

from __future__ import annotations

from ipaddress import ip_network

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import ACTIONS, App, Key, KeyType, Plan, TurnConfig
from meteredrt.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_LISTEN,
    AppDeclaration,
    ClusterConfig,
    Config,
    ConfigError,
    LogConfig,
    MetricsConfig,
    app_id_problem,
    apply_options,
    default_config,
    key_field_problems,
    load_config,
)

#: The example of issue 2, verbatim.
ISSUE_EXAMPLE = """\
[server]
listen = ["tcp:8080:interface=127.0.0.1"]
data_dir = "./meteredrt-data"

[[apps]]
id = "app_demo"
[apps.plan]            # used by the quota issue; parse and keep it now
name = "FREE"
max_concurrent_connections = 100
max_messages_per_period = 100000
overages_allowed = false

[[apps.keys]]
type = "secret"
key_id = "sk_id_demo"
secret = "sk_secret_demo_0123456789"
channel_patterns = ["**"]
actions = ["publish", "subscribe", "presence", "send"]

[[apps.keys]]
type = "publishable"
key_id = "pk_live_demo"
channel_patterns = ["public/**"]
actions = ["subscribe", "publish", "presence"]
allowed_origins = []
"""

SECRET_KEY = """
[[apps.keys]]
type = "secret"
key_id = "sk_id_a"
secret = "sk_secret_a"
channel_patterns = ["**"]
actions = ["publish"]
"""


class ConfigTestsMixin:
    """
    Write configuration text to a file and read it back.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()  # type: ignore[attr-defined]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def assertConfigError(self, text: str, where: str, fragment: str) -> ConfigError:
        """
        Loading C{text} fails naming the file, key path C{where} and a
        problem containing C{fragment}.
        """
        path = self.write(text)
        error = self.assertRaises(ConfigError, load_config, path)  # type: ignore[attr-defined]
        self.assertEqual((error.source, error.where), (path, where))  # type: ignore[attr-defined]
        self.assertIn(fragment, error.problem)  # type: ignore[attr-defined]
        self.assertTrue(str(error).startswith(f"{path}: {where}: " if where else f"{path}: "))  # type: ignore[attr-defined]
        return error


class LoadConfigTests(ConfigTestsMixin, SynchronousTestCase):
    """
    Tests for L{load_config} with valid files.
    """

    def test_issue_example(self) -> None:
        """
        The example of issue 2 reads into the apps, plan and keys it spells out.
        """
        path = self.write(ISSUE_EXAMPLE)
        self.assertEqual(
            load_config(path),
            Config(
                listen=("tcp:8080:interface=127.0.0.1",),
                data_dir="./meteredrt-data",
                apps=(
                    AppDeclaration(
                        app=App(
                            app_id="app_demo",
                            plan=Plan(
                                name="FREE",
                                max_concurrent_connections=100,
                                max_messages_per_period=100000,
                                overages_allowed=False,
                            ),
                        ),
                        keys=(
                            Key(
                                key_id="sk_id_demo",
                                app_id="app_demo",
                                type=KeyType.SECRET,
                                secret="sk_secret_demo_0123456789",
                                channel_patterns=("**",),
                                actions=ACTIONS,
                                source="config",
                            ),
                            Key(
                                key_id="pk_live_demo",
                                app_id="app_demo",
                                type=KeyType.PUBLISHABLE,
                                channel_patterns=("public/**",),
                                actions=frozenset({"subscribe", "publish", "presence"}),
                                source="config",
                            ),
                        ),
                    ),
                ),
                source=path,
            ),
        )

    def test_empty_file(self) -> None:
        """
        An empty file means the defaults.
        """
        path = self.write("")
        self.assertEqual(load_config(path), Config(source=path))

    def test_full_plan_turn_and_server(self) -> None:
        """
        Every plan, TURN and server field is read, integers accepted where
        amounts are floats.
        """
        path = self.write(
            """
[server]
listen = ["tcp:80", "ssl:443:privateKey=k.pem"]
data_dir = "/var/lib/meteredrt"
upgrade_rate_limit = 10
trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1", "192.0.2.77/24"]
request_timeout_seconds = 2.5
max_connections_per_ip = 7
drain_grace_seconds = 2

[[apps]]
id = "a"
[apps.plan]
name = "BASIC"
max_concurrent_connections = 5
max_messages_per_period = 7
overages_allowed = true
overages_enabled = false
overage_rate_per_1000_messages = 0.5
overage_rate_per_connection = 2
balance = -1.5
auto_recharge_amount = 10
auto_recharge_threshold = 1.25
period = "month"
message_rate = 500
message_burst = 1000.5
[apps.turn]
app_name = "acme"
secret_key = "turn-secret"
region = "europe"
ttl = 7200
api_base = "http://127.0.0.1:9999"
"""
        )
        config = load_config(path)
        self.assertEqual(config.listen, ("tcp:80", "ssl:443:privateKey=k.pem"))
        self.assertEqual(config.data_dir, "/var/lib/meteredrt")
        self.assertEqual(config.upgrade_rate_limit, 10)
        self.assertEqual((config.request_timeout_seconds, config.max_connections_per_ip), (2.5, 7))
        self.assertEqual(config.drain_grace_seconds, 2.0)
        self.assertEqual(
            config.trusted_proxies,
            (ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"), ip_network("::1/128"), ip_network("192.0.2.0/24")),
        )
        self.assertEqual(
            config.apps[0].app,
            App(
                app_id="a",
                plan=Plan(
                    name="BASIC",
                    max_concurrent_connections=5,
                    max_messages_per_period=7,
                    overages_allowed=True,
                    overages_enabled=False,
                    overage_rate_per_1000_messages=0.5,
                    overage_rate_per_connection=2.0,
                    balance=-1.5,
                    auto_recharge_amount=10.0,
                    auto_recharge_threshold=1.25,
                    period="month",
                    message_rate=500.0,
                    message_burst=1000.5,
                ),
                turn=TurnConfig(
                    app_name="acme",
                    secret_key="turn-secret",
                    region="europe",
                    ttl=7200,
                    api_base="http://127.0.0.1:9999",
                ),
            ),
        )
        self.assertIsInstance(config.apps[0].app.plan.overage_rate_per_connection, float)  # type: ignore[union-attr]

    def test_key_options(self) -> None:
        """
        Allowed origins and the TURN toggle of a publishable key are read.
        """
        path = self.write(
            """
[[apps]]
id = "a"
[[apps.keys]]
type = "publishable"
key_id = "pk_live_x"
channel_patterns = ["a/*", "b/**"]
actions = []
allowed_origins = ["https://app.example.com", "http://localhost:3000"]
auto_inject_turn = false
"""
        )
        [key] = load_config(path).apps[0].keys
        self.assertEqual(key.channel_patterns, ("a/*", "b/**"))
        self.assertEqual(key.actions, frozenset())
        self.assertEqual(key.allowed_origins, ("https://app.example.com", "http://localhost:3000"))
        self.assertFalse(key.auto_inject_turn)

    def test_fifty_keys(self) -> None:
        """
        An app may declare exactly 50 keys.
        """
        keys = "".join(SECRET_KEY.replace("sk_id_a", f"sk_id_{i}") for i in range(50))
        path = self.write('[[apps]]\nid = "a"\n' + keys)
        self.assertEqual(len(load_config(path).apps[0].keys), 50)


class ConfigErrorTests(ConfigTestsMixin, SynchronousTestCase):
    """
    Each problem in a file is reported with the file, the key path and what
    is wrong.
    """

    def test_missing_file(self) -> None:
        """
        A file that cannot be read is named with the reason.
        """
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")

    def test_toml_syntax(self) -> None:
        """
        A TOML syntax error is reported with its line and column.
        """
        error = self.assertConfigError('[server]\nlisten = ["a"]\nlisten = 1\n', "", "invalid TOML")
        self.assertIn("line 3", error.problem)

    def test_not_utf8(self) -> None:
        """
        A file that is not UTF-8 is refused.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b'x = "\xff"\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertIn(path, str(error))

    def test_unknown_top_level(self) -> None:
        """
        An unknown top-level key is refused.
        """
        self.assertConfigError('listen = ["tcp:80"]\n', "listen", "unknown key 'listen'")

    def test_unknown_server_key(self) -> None:
        """
        An unknown server option is refused, with the nearest known one.
        """
        self.assertConfigError("[server]\ndatadir = 'x'\n", "server.datadir", "did you mean 'data_dir'")

    def test_server_listen_type(self) -> None:
        """
        C{listen} must be an array of strings.
        """
        self.assertConfigError("[server]\nlisten = 'tcp:80'\n", "server.listen", "must be an array of strings")
        self.assertConfigError("[server]\nlisten = [80]\n", "server.listen[0]", "must be a string, not an integer")

    def test_server_listen_empty(self) -> None:
        """
        C{listen} must name an endpoint.
        """
        self.assertConfigError("[server]\nlisten = []\n", "server.listen", "at least one")

    def test_upgrade_rate_limit_bool(self) -> None:
        """
        A boolean is not an integer.
        """
        self.assertConfigError(
            "[server]\nupgrade_rate_limit = true\n",
            "server.upgrade_rate_limit",
            "must be an integer, not a boolean",
        )

    def test_upgrade_rate_limit_zero(self) -> None:
        """
        The upgrade rate limit is positive.
        """
        self.assertConfigError("[server]\nupgrade_rate_limit = 0\n", "server.upgrade_rate_limit", "at least 1")

    def test_request_timeout_range(self) -> None:
        """
        C{request_timeout_seconds} is a number of seconds above 0 and at most
        an hour; an integer is accepted.
        """
        for bad in ("0", "-1", "3601"):
            self.assertConfigError(
                f"[server]\nrequest_timeout_seconds = {bad}\n",
                "server.request_timeout_seconds",
                "must be more than 0 and at most 3600 seconds",
            )
        for bad in ("inf", "nan"):
            self.assertConfigError(
                f"[server]\nrequest_timeout_seconds = {bad}\n", "server.request_timeout_seconds", "finite"
            )
        self.assertConfigError(
            "[server]\nrequest_timeout_seconds = '10'\n", "server.request_timeout_seconds", "must be a number"
        )
        self.assertEqual(load_config(self.write("[server]\nrequest_timeout_seconds = 30\n")).request_timeout_seconds, 30.0)

    def test_max_connections_per_ip(self) -> None:
        """
        C{max_connections_per_ip} is a positive integer.
        """
        self.assertConfigError("[server]\nmax_connections_per_ip = 0\n", "server.max_connections_per_ip", "at least 1")
        self.assertConfigError(
            "[server]\nmax_connections_per_ip = 1.5\n", "server.max_connections_per_ip", "must be an integer"
        )

    def test_drain_grace_negative(self) -> None:
        """
        The drain grace is not negative.
        """
        self.assertConfigError("[server]\ndrain_grace_seconds = -1\n", "server.drain_grace_seconds", "at least 0")

    def test_drain_grace_type(self) -> None:
        """
        The drain grace is a number of seconds.
        """
        self.assertConfigError(
            '[server]\ndrain_grace_seconds = "5s"\n', "server.drain_grace_seconds", "must be a number, not a string"
        )

    def test_trusted_proxies_type(self) -> None:
        """
        C{trusted_proxies} must be an array of strings.
        """
        self.assertConfigError(
            "[server]\ntrusted_proxies = '10.0.0.0/8'\n", "server.trusted_proxies", "must be an array of strings"
        )
        self.assertConfigError(
            "[server]\ntrusted_proxies = [10]\n", "server.trusted_proxies[0]", "must be a string, not an integer"
        )

    def test_trusted_proxies_not_network(self) -> None:
        """
        Each trusted proxy is an IP address or network; the error names the
        entry.
        """
        for bad in ("proxy.internal", "10.0.0.0/33", "", "10.0.0.1-10.0.0.9", "::1/129"):
            self.assertConfigError(
                f'[server]\ntrusted_proxies = ["127.0.0.1", "{bad}"]\n',
                "server.trusted_proxies[1]",
                "not an IP address or network",
            )

    def test_trusted_proxies_everyone(self) -> None:
        """
        A network that holds every address would let any client choose its
        own address, so it is refused.
        """
        for everyone in ("0.0.0.0/0", "::/0", "1.2.3.4/0"):
            self.assertConfigError(
                f'[server]\ntrusted_proxies = ["{everyone}"]\n', "server.trusted_proxies[0]", "every address"
            )

    def test_server_not_table(self) -> None:
        """
        C{server} must be a table.
        """
        self.assertConfigError("server = 1\n", "server", "must be a table")

    def test_apps_not_array(self) -> None:
        """
        C{apps} must be an array of tables.
        """
        self.assertConfigError("[apps]\nid = 'a'\n", "apps", "must be an array of tables")

    def test_app_id_missing(self) -> None:
        """
        An app needs an id.
        """
        self.assertConfigError("[[apps]]\n", "apps[0].id", "is required")

    def test_app_id_invalid(self) -> None:
        """
        App ids use a conservative alphabet.
        """
        self.assertConfigError('[[apps]]\nid = "a b"\n', "apps[0].id", "letters, digits")

    def test_unknown_app_key(self) -> None:
        """
        An unknown key in an app is refused.
        """
        self.assertConfigError('[[apps]]\nid = "a"\nname = "x"\n', "apps[0].name", "unknown key 'name'")

    def test_duplicate_app_id(self) -> None:
        """
        Two apps cannot share an id.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[[apps]]\nid = "b"\n[[apps]]\nid = "a"\n',
            "apps[2].id",
            "duplicate app id 'a' (also apps[0])",
        )

    def test_duplicate_key_id(self) -> None:
        """
        Key ids are unique across apps.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n' + SECRET_KEY + '[[apps]]\nid = "b"\n' + SECRET_KEY,
            "apps[1].keys[0].key_id",
            "duplicate key id 'sk_id_a' (also apps[0].keys[0])",
        )

    def test_plan_unknown_key(self) -> None:
        """
        An unknown plan field is refused.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.plan]\nmax_connections = 3\n',
            "apps[0].plan.max_connections",
            "did you mean 'max_concurrent_connections'",
        )

    def test_plan_bool_as_int(self) -> None:
        """
        A boolean plan cap is refused.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.plan]\nmax_messages_per_period = false\n',
            "apps[0].plan.max_messages_per_period",
            "must be an integer, not a boolean",
        )

    def test_plan_negative_cap(self) -> None:
        """
        Plan caps are not negative.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.plan]\nmax_concurrent_connections = -1\n',
            "apps[0].plan.max_concurrent_connections",
            "at least 0",
        )

    def test_plan_message_rate_defaults(self) -> None:
        """
        A plan that does not set the per-connection rate and burst gets
        100 messages/s and bursts of 200.
        """
        path = self.write('[[apps]]\nid = "a"\n[apps.plan]\nname = "BASIC"\n')
        plan = load_config(path).apps[0].app.plan
        assert plan is not None
        self.assertEqual((plan.message_rate, plan.message_burst), (100.0, 200.0))

    def test_plan_message_rate_refused(self) -> None:
        """
        A rate of 0 or less, a burst below 1, absurd figures and non-numbers
        are refused, naming the key.
        """
        for line, key, problem in (
            ("message_rate = 0", "message_rate", "must be more than 0 and at most 1e+06, not 0"),
            ("message_rate = -5", "message_rate", "at least 0"),
            ("message_rate = 1e9", "message_rate", "at most 1e+06"),
            ("message_rate = true", "message_rate", "must be a number"),
            ("message_burst = 0.5", "message_burst", "must be from 1 to 1e+06, not 0.5"),
            ('message_burst = "many"', "message_burst", "must be a number"),
        ):
            self.assertConfigError(f'[[apps]]\nid = "a"\n[apps.plan]\n{line}\n', f"apps[0].plan.{key}", problem)

    def test_plan_int_as_bool(self) -> None:
        """
        An integer is not a boolean.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.plan]\noverages_allowed = 1\n',
            "apps[0].plan.overages_allowed",
            "must be a boolean (true or false), not an integer",
        )

    def test_plan_rate_string(self) -> None:
        """
        Money amounts are numbers.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.plan]\nbalance = "10"\n',
            "apps[0].plan.balance",
            "must be a number, not a string",
        )

    def test_plan_period(self) -> None:
        """
        Only monthly periods are known.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.plan]\nperiod = "week"\n', "apps[0].plan.period", "unknown period 'week'"
        )

    def test_turn_required(self) -> None:
        """
        TURN settings need the Metered app name and secret.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.turn]\napp_name = "x"\n', "apps[0].turn.secret_key", "is required"
        )

    def test_turn_region(self) -> None:
        """
        A TURN region must be one the API knows.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.turn]\napp_name = "x"\nsecret_key = "y"\nregion = "mars"\n',
            "apps[0].turn.region",
            "unknown region 'mars'",
        )

    def test_turn_api_base(self) -> None:
        """
        The TURN API base is an HTTP(S) URL.
        """
        self.assertConfigError(
            '[[apps]]\nid = "a"\n[apps.turn]\napp_name = "x"\nsecret_key = "y"\napi_base = "ftp://x"\n',
            "apps[0].turn.api_base",
            "http",
        )

    def key(self, **fields: str) -> str:
        """
        A file declaring one app with one secret key, C{fields} replacing or
        (with value C{""}) removing its lines.
        """
        lines = {
            "type": '"secret"',
            "key_id": '"sk_id_a"',
            "secret": '"sk_secret_a"',
            "channel_patterns": '["**"]',
            "actions": '["publish"]',
        }
        lines.update(fields)
        body = "".join(f"{name} = {value}\n" for name, value in lines.items() if value)
        return '[[apps]]\nid = "a"\n' + SECRET_KEY.replace("sk_id_a", "sk_id_b") + "[[apps.keys]]\n" + body

    def test_unknown_key_field(self) -> None:
        """
        An unknown field of a key is refused, naming its index.
        """
        self.assertConfigError(
            self.key(channels='["**"]'), "apps[0].keys[1].channels", "did you mean 'channel_patterns'"
        )

    def test_key_type_unknown(self) -> None:
        """
        Keys are secret or publishable.
        """
        self.assertConfigError(self.key(type='"private"'), "apps[0].keys[1].type", "unknown key type 'private'")

    def test_key_id_prefix_secret(self) -> None:
        """
        A secret key id starts with C{sk_id_}.
        """
        self.assertConfigError(self.key(key_id='"pk_live_a"'), "apps[0].keys[1].key_id", "'sk_id_'")

    def test_key_id_prefix_publishable(self) -> None:
        """
        A publishable key id starts with C{pk_live_}.
        """
        self.assertConfigError(
            self.key(type='"publishable"', key_id='"sk_id_x"', secret=""), "apps[0].keys[1].key_id", "'pk_live_'"
        )

    def test_key_id_prefix_only(self) -> None:
        """
        A key id is more than its prefix.
        """
        self.assertConfigError(self.key(key_id='"sk_id_"'), "apps[0].keys[1].key_id", "followed by a token")

    def test_key_id_characters(self) -> None:
        """
        Key ids are URL-safe and colon-free.
        """
        self.assertConfigError(self.key(key_id='"sk_id_a:b"'), "apps[0].keys[1].key_id", "letters, digits")

    def test_secret_missing(self) -> None:
        """
        A secret key needs its secret.
        """
        self.assertConfigError(self.key(secret=""), "apps[0].keys[1].secret", "required for a secret key")

    def test_secret_on_publishable(self) -> None:
        """
        A publishable key has no secret.
        """
        self.assertConfigError(
            self.key(type='"publishable"', key_id='"pk_live_a"'), "apps[0].keys[1].secret", "has no secret"
        )

    def test_secret_prefix(self) -> None:
        """
        A secret starts with C{sk_secret_}.
        """
        self.assertConfigError(self.key(secret='"hunter2"'), "apps[0].keys[1].secret", "'sk_secret_'")

    def test_channel_patterns_missing(self) -> None:
        """
        A key must list its channel patterns.
        """
        self.assertConfigError(self.key(channel_patterns=""), "apps[0].keys[1].channel_patterns", "is required")

    def test_channel_patterns_empty(self) -> None:
        """
        A key's channel patterns are not empty.
        """
        self.assertConfigError(
            self.key(channel_patterns="[]"), "apps[0].keys[1].channel_patterns", "at least one pattern"
        )

    def test_channel_pattern_invalid(self) -> None:
        """
        An invalid glob is refused with the reason from L{meteredrt.globs}.
        """
        self.assertConfigError(
            self.key(channel_patterns='["ok/**", "a\\\\x"]'),
            "apps[0].keys[1].channel_patterns[1]",
            "invalid pattern 'a\\\\x': '\\x' is not an escape",
        )

    def test_channel_pattern_empty(self) -> None:
        """
        An empty pattern, which could match no valid channel, is refused.
        """
        self.assertConfigError(
            self.key(channel_patterns='["ok/**", ""]'),
            "apps[0].keys[1].channel_patterns[1]",
            "invalid pattern '': must not be empty",
        )

    def test_channel_pattern_type(self) -> None:
        """
        Channel patterns are strings.
        """
        self.assertConfigError(
            self.key(channel_patterns='["a", 1]'), "apps[0].keys[1].channel_patterns[1]", "must be a string"
        )

    def test_unknown_action(self) -> None:
        """
        Actions are the four of the protocol.
        """
        self.assertConfigError(
            self.key(actions='["publish", "admin"]'), "apps[0].keys[1].actions[1]", "unknown action 'admin'"
        )

    def test_origins_on_secret_key(self) -> None:
        """
        Allowed origins apply to publishable keys only.
        """
        self.assertConfigError(
            self.key(allowed_origins='["https://x.example"]'),
            "apps[0].keys[1].allowed_origins",
            "publishable keys only",
        )

    def test_origin_shape(self) -> None:
        """
        An origin with a path or trailing slash would never match, so it is
        refused.
        """
        self.assertConfigError(
            self.key(type='"publishable"', key_id='"pk_live_a"', secret="", allowed_origins='["https://x.example/"]'),
            "apps[0].keys[1].allowed_origins[0]",
            "is not an origin",
        )

    def test_auto_inject_turn_type(self) -> None:
        """
        The TURN toggle is a boolean.
        """
        self.assertConfigError(
            self.key(auto_inject_turn='"yes"'), "apps[0].keys[1].auto_inject_turn", "must be a boolean"
        )

    def test_too_many_keys(self) -> None:
        """
        An app declares at most 50 keys.
        """
        keys = "".join(SECRET_KEY.replace("sk_id_a", f"sk_id_{i}") for i in range(51))
        self.assertConfigError('[[apps]]\nid = "a"\n' + keys, "apps[0].keys", "at most 50")


class DefaultsTests(SynchronousTestCase):
    """
    Tests for L{default_config} and L{apply_options}.
    """

    def test_defaults(self) -> None:
        """
        Without a file the server listens on loopback 8080 and keeps state in
        C{./meteredrt-data}.
        """
        config = default_config()
        self.assertEqual(config.listen, DEFAULT_LISTEN)
        self.assertEqual(config.listen, ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(config.data_dir, DEFAULT_DATA_DIR)
        self.assertEqual(config.apps, ())
        self.assertEqual(config.upgrade_rate_limit, 60)
        self.assertEqual(config.trusted_proxies, ())
        self.assertEqual(config.request_timeout_seconds, 15.0)
        self.assertEqual(config.max_connections_per_ip, 256)
        self.assertEqual(config.drain_grace_seconds, 5.0)

    def test_options_replace(self) -> None:
        """
        Command-line endpoints replace the file's list; the data directory
        replaces the file's.
        """
        config = Config(listen=("tcp:1", "tcp:2"), data_dir="a")
        self.assertEqual(apply_options(config, listen=["tcp:3"], data_dir="b"), Config(listen=("tcp:3",), data_dir="b"))

    def test_no_options(self) -> None:
        """
        Without options the configuration is unchanged.
        """
        config = Config(listen=("tcp:1",), data_dir="a")
        self.assertEqual(apply_options(config), config)

    def test_empty_option(self) -> None:
        """
        An empty endpoint is refused.
        """
        error = self.assertRaises(ConfigError, apply_options, Config(), listen=[" "])
        self.assertEqual(error.where, "--listen[0]")


class KeyRulesTests(SynchronousTestCase):
    """
    Tests for the key rules shared with the key store and the CLI.
    """

    def test_valid(self) -> None:
        """
        A valid key has no problems.
        """
        self.assertEqual(key_field_problems(KeyType.PUBLISHABLE, ["**"], ["publish"], ["https://a.example"]), [])

    def test_several_problems(self) -> None:
        """
        Every problem is reported, field by field.
        """
        self.assertEqual(
            [field for field, _ in key_field_problems(KeyType.SECRET, [], ["x"], ["https://a.example"])],
            ["channel_patterns", "actions[0]", "allowed_origins"],
        )

    def test_app_id(self) -> None:
        """
        App ids are short and plain.
        """
        self.assertIsNone(app_id_problem("app_demo-1.x"))
        self.assertIsNotNone(app_id_problem(""))
        self.assertIsNotNone(app_id_problem("-a"))
        self.assertIsNotNone(app_id_problem("a" * 65))


class StorageConfigTests(ConfigTestsMixin, SynchronousTestCase):
    """
    Tests for C{[storage]} and C{--database}.
    """

    def test_default_sqlite(self) -> None:
        """
        Without C{[storage] database} the store is SQLite in C{data_dir}.
        """
        self.assertIsNone(load_config(self.write("")).database)
        self.assertIsNone(load_config(self.write("[storage]\n")).database)

    def test_postgresql_url(self) -> None:
        """
        A PostgreSQL URL is taken as given; C{--database} replaces it.
        """
        url = "postgresql://meteredrt@db.internal:5432/meteredrt"
        config = load_config(self.write(f'[storage]\ndatabase = "{url}"\n'))
        self.assertEqual(config.database, url)
        other = "postgres://other@127.0.0.1/x"
        self.assertEqual(apply_options(config, database=other).database, other)
        self.assertEqual(apply_options(config).database, url)

    def test_not_postgresql(self) -> None:
        """
        Anything but a PostgreSQL URL naming a database is refused, in the
        file and on the command line.
        """
        self.assertConfigError('[storage]\ndatabase = "mysql://x/y"\n', "storage.database", "postgresql://")
        self.assertConfigError('[storage]\ndatabase = "postgresql://host"\n', "storage.database", "name a database")
        self.assertConfigError("[storage]\ndatabase = 5\n", "storage.database", "must be a string")
        self.assertConfigError('[storage]\ndb = "x"\n', "storage.db", "unknown key")
        error = self.assertRaises(ConfigError, apply_options, Config(), database="sqlite:///x")
        self.assertEqual(error.where, "--database")
class MetricsSectionTests(ConfigTestsMixin, SynchronousTestCase):
    """
    The C{[metrics]} table.
    """

    def test_off_by_default(self) -> None:
        """
        Without the table, C{/metrics} is served nowhere.
        """
        config = load_config(self.write(""))
        self.assertEqual(config.metrics, MetricsConfig())
        self.assertFalse(config.metrics.enabled)

    def test_token_and_listen(self) -> None:
        """
        A token and a listener are read as given.
        """
        config = load_config(
            self.write('[metrics]\ntoken = "abcdefghijklmnop"\nlisten = "tcp:9100:interface=127.0.0.1"\n')
        )
        self.assertEqual(config.metrics, MetricsConfig("abcdefghijklmnop", "tcp:9100:interface=127.0.0.1"))
        self.assertTrue(config.metrics.enabled)

    def test_short_token(self) -> None:
        """
        A token shorter than 16 characters is refused, with a way to make
        a good one.
        """
        self.assertConfigError('[metrics]\ntoken = "short"\n', "metrics.token", "at least 16 characters")

    def test_token_characters(self) -> None:
        """
        A token must fit in an HTTP header: visible ASCII without spaces.
        """
        self.assertConfigError(
            '[metrics]\ntoken = "abcdefgh ijklmnopq"\n', "metrics.token", "only visible ASCII characters"
        )
        self.assertConfigError('[metrics]\ntoken = "abcdefghijklmnopé"\n', "metrics.token", "visible ASCII")

    def test_types_and_unknown_keys(self) -> None:
        """
        Wrong types, empty values and unknown keys name their key.
        """
        self.assertConfigError("[metrics]\ntoken = 5\n", "metrics.token", "must be a string")
        self.assertConfigError('[metrics]\nlisten = " "\n', "metrics.listen", "must not be empty")
        self.assertConfigError('[metrics]\nlisten = ""\n', "metrics.listen", "must not be empty")
        self.assertConfigError('[metrics]\nport = "9100"\n', "metrics.port", "unknown key 'port'")


class LogSectionTests(ConfigTestsMixin, SynchronousTestCase):
    """
    The C{[log]} table.
    """

    def test_defaults(self) -> None:
        """
        Text at info, with or without the table.
        """
        self.assertEqual(load_config(self.write("")).log, LogConfig("text", "info"))
        self.assertEqual(load_config(self.write("[log]\n")).log, LogConfig("text", "info"))

    def test_values(self) -> None:
        """
        Every format and level is accepted.
        """
        for log_format in ("text", "json"):
            for level in ("debug", "info", "warn", "error"):
                text = f'[log]\nformat = "{log_format}"\nlevel = "{level}"\n'
                self.assertEqual(load_config(self.write(text)).log, LogConfig(log_format, level))

    def test_unknown_values(self) -> None:
        """
        An unknown format or level names the key and the choices.
        """
        self.assertConfigError('[log]\nformat = "xml"\n', "log.format", "expected one of text, json")
        self.assertConfigError('[log]\nlevel = "warning"\n', "log.level", "expected one of debug, info, warn, error")
        self.assertConfigError('[log]\nlevels = "info"\n', "log.levels", "did you mean 'level'")
class ClusterConfigTests(ConfigTestsMixin, SynchronousTestCase):
    """
    The C{[cluster]} table and C{--redis}.
    """

    def test_absent(self) -> None:
        """
        Without C{[cluster]} the node is alone.
        """
        self.assertIsNone(load_config(self.write("[server]\n")).cluster)
        self.assertIsNone(default_config().cluster)

    def test_full(self) -> None:
        """
        The issue's example reads into a L{ClusterConfig}.
        """
        text = '[cluster]\nredis = "redis://127.0.0.1:7000/0"\nnode_name = "ws-1"\nlease_seconds = 5\n'
        self.assertEqual(load_config(self.write(text)).cluster, ClusterConfig("redis://127.0.0.1:7000/0", "ws-1", 5.0))

    def test_defaults(self) -> None:
        """
        Only C{redis} is required.
        """
        cluster = load_config(self.write('[cluster]\nredis = "rediss://:pw@h/1"\n')).cluster
        self.assertEqual(cluster, ClusterConfig("rediss://:pw@h/1", None, DEFAULT_LEASE_SECONDS))

    def test_errors(self) -> None:
        """
        A missing or bad URL, a bad node name, an absurd lease and unknown
        keys are refused naming the key.
        """
        self.assertConfigError("[cluster]\n", "cluster.redis", "required")
        self.assertConfigError('[cluster]\nredis = "http://h"\n', "cluster.redis", "redis://")
        self.assertConfigError('[cluster]\nredis = "redis://h"\nnode_name = "a b"\n', "cluster.node_name", "node name")
        self.assertConfigError(
            '[cluster]\nredis = "redis://h"\nlease_seconds = 0\n', "cluster.lease_seconds", "at least"
        )
        self.assertConfigError(
            '[cluster]\nredis = "redis://h"\nlease_seconds = 99999\n', "cluster.lease_seconds", "at most"
        )
        self.assertConfigError('[cluster]\nredis = "redis://h"\nlease = 3\n', "cluster.lease", "lease_seconds")

    def test_option(self) -> None:
        """
        C{--redis} makes a node a cluster member, or overrides the file's
        URL and keeps its other keys; a bad URL is refused.
        """
        self.assertEqual(apply_options(default_config(), redis="redis://h:1/2").cluster, ClusterConfig("redis://h:1/2"))
        text = '[cluster]\nredis = "redis://a"\nnode_name = "n"\n'
        config = apply_options(load_config(self.write(text)), redis="redis://b")
        self.assertEqual(config.cluster, ClusterConfig("redis://b", "n"))
        error = self.assertRaises(ConfigError, apply_options, default_config(), redis="nope")
        self.assertEqual(error.where, "--redis")


class WebhooksInClusterTests(ConfigTestsMixin, SynchronousTestCase):
    """
    Presence webhooks on a cluster node need the store in PostgreSQL (one
    outbox all nodes share); whether they have it is known once every
    command-line option is applied.
    """

    HOOKED = (
        '[[apps]]\nid = "a"\n\n[apps.webhooks]\nurl = "https://backend.example/hooks"\n'
        'secret = "whsec_0123456789abcdef0123456789abcdef"\n'
    )
    CLUSTER = '[cluster]\nredis = "redis://127.0.0.1:7000/0"\n\n'
    STORAGE = '[storage]\ndatabase = "postgresql://meteredrt@127.0.0.1:5433/meteredrt"\n\n'

    def test_cluster_on_sqlite(self) -> None:
        """
        C{[cluster]} and an app's C{[apps.webhooks]} without C{[storage]
        database} are refused, naming the app's webhooks and the fix.
        """
        path = self.write(self.CLUSTER + self.HOOKED)
        error = self.assertRaises(ConfigError, apply_options, load_config(path))
        self.assertEqual((error.source, error.where), (path, "apps[0].webhooks"))
        self.assertIn("[storage] database or --database", error.problem)

    def test_redis_option_on_sqlite(self) -> None:
        """
        C{--redis} over a file whose apps have webhooks is refused too.
        """
        config = load_config(self.write(self.HOOKED))
        error = self.assertRaises(ConfigError, apply_options, config, redis="redis://127.0.0.1:7000/0")
        self.assertEqual(error.where, "apps[0].webhooks")

    def test_cluster_on_postgresql(self) -> None:
        """
        With the store in PostgreSQL, from the file or from C{--database},
        webhooks work on a cluster node.
        """
        config = apply_options(load_config(self.write(self.STORAGE + self.CLUSTER + self.HOOKED)))
        self.assertIsNotNone(config.apps[0].app.webhooks)
        config = apply_options(
            load_config(self.write(self.CLUSTER + self.HOOKED)), database="postgresql://u@127.0.0.1/db"
        )
        self.assertIsNotNone(config.cluster)
        config = apply_options(
            load_config(self.write(self.STORAGE + self.HOOKED)), redis="redis://127.0.0.1:7000/0"
        )
        self.assertIsNotNone(config.cluster)

    def test_single_node_on_sqlite(self) -> None:
        """
        A single node keeps its outbox in SQLite, as before.
        """
        config = apply_options(load_config(self.write(self.HOOKED)))
        self.assertIsNone(config.cluster)
        self.assertIsNone(config.database)


class NonFiniteNumberTests(ConfigTestsMixin, SynchronousTestCase):
    """
    TOML's nan and inf are refused wherever a number is read.
    """

    def test_nan_and_inf(self) -> None:
        """
        A drain grace of inf (a shutdown that never ends) or a lease of nan
        is a configuration error naming the key.
        """
        self.assertConfigError("[server]\ndrain_grace_seconds = inf\n", "server.drain_grace_seconds", "finite")
        self.assertConfigError(
            '[cluster]\nredis = "redis://127.0.0.1:7000/0"\nlease_seconds = nan\n', "cluster.lease_seconds", "finite"
        )
