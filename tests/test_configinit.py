"""
Tests for L{meteredrt.configinit} and C{meteredrt config init}: the file it
writes loads, holds fresh keys, is private, and never replaces anything.
"""

from __future__ import annotations

import io
import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from meteredrt.apps import ACTIONS, PUBLISHABLE_DEFAULT_ACTIONS, KeyType
from meteredrt.cli import main
from meteredrt.config import DEFAULT_DATA_DIR, DEFAULT_LISTEN, load_config
from meteredrt.configinit import fresh_keys, render_config, toml_string, write_new_file

NOW = 1_700_000_000


def _cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    status = main(list(argv), stdout=stdout, stderr=stderr, clock=lambda: NOW)
    return status, stdout.getvalue(), stderr.getvalue()


class RenderConfigTests(SynchronousTestCase):
    """
    L{render_config} writes a file that L{load_config} reads back as given.
    """

    def _load(self, text: str) -> object:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return load_config(path)

    def test_round_trip(self) -> None:
        """
        The app, both keys (ids, secret, patterns, actions), the listen list
        and the data directory come back exactly.
        """
        secret, publishable = fresh_keys("app_chat", NOW)
        config = self._load(
            render_config("app_chat", secret, publishable, listen=["tcp:0", "tcp:1"], data_dir="/var/lib/x")
        )
        self.assertEqual(config.listen, ("tcp:0", "tcp:1"))  # type: ignore[attr-defined]
        self.assertEqual(config.data_dir, "/var/lib/x")  # type: ignore[attr-defined]
        (app,) = config.apps  # type: ignore[attr-defined]
        self.assertEqual(app.app.app_id, "app_chat")
        loaded = {key.key_id: key for key in app.keys}
        self.assertEqual(set(loaded), {secret.key_id, publishable.key_id})
        self.assertEqual(loaded[secret.key_id].type, KeyType.SECRET)
        self.assertEqual(loaded[secret.key_id].secret, secret.secret)
        self.assertEqual(loaded[secret.key_id].actions, ACTIONS)
        self.assertEqual(loaded[publishable.key_id].type, KeyType.PUBLISHABLE)
        self.assertEqual(loaded[publishable.key_id].actions, PUBLISHABLE_DEFAULT_ACTIONS)
        for key in loaded.values():
            self.assertEqual(key.channel_patterns, ("**",))

    def test_awkward_strings_survive(self) -> None:
        """
        Quotes, backslashes, control characters and non-ASCII text in a
        data directory are escaped so that TOML reads them back unchanged.
        """
        awkward = 'C:\\data "quoted"\ttab\x7f\x01 d\u00e9j\u00e0 \U0001f600'
        secret, publishable = fresh_keys("a", NOW)
        config = self._load(render_config("a", secret, publishable, listen=["tcp:0"], data_dir=awkward))
        self.assertEqual(config.data_dir, awkward)  # type: ignore[attr-defined]
        self.assertEqual(toml_string('a"b'), '"a\\"b"')

    def test_fresh_keys_are_fresh(self) -> None:
        """
        Each call makes new ids and a new secret of the usual shape.
        """
        first, second = fresh_keys("a", NOW), fresh_keys("a", NOW)
        self.assertNotEqual(first[0].key_id, second[0].key_id)
        self.assertNotEqual(first[0].secret, second[0].secret)
        self.assertNotEqual(first[1].key_id, second[1].key_id)
        self.assertTrue(first[0].key_id.startswith("sk_id_"))
        self.assertTrue(first[0].secret.startswith("sk_secret_"))  # type: ignore[union-attr]
        self.assertGreaterEqual(len(first[0].secret), 40)  # type: ignore[arg-type]
        self.assertTrue(first[1].key_id.startswith("pk_live_"))


class WriteNewFileTests(SynchronousTestCase):
    """
    L{write_new_file} creates, never replaces, and keeps the file private.
    """

    def test_mode_is_0600_whatever_the_umask(self) -> None:
        """
        Even under an empty umask the file is readable by its owner only.
        """
        path = self.mktemp()
        old = os.umask(0)
        try:
            write_new_file(path, "x = 1\n")
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "x = 1\n")

    def test_existing_file_untouched(self) -> None:
        """
        An existing file raises L{FileExistsError} and keeps its content.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("mine")
        self.assertRaises(FileExistsError, write_new_file, path, "theirs")
        with open(path) as f:
            self.assertEqual(f.read(), "mine")

    def test_dangling_symlink_refused(self) -> None:
        """
        A symbolic link is never followed, even to a file that does not
        exist yet.
        """
        path, target = self.mktemp(), self.mktemp()
        os.symlink(target, path)
        self.assertRaises(FileExistsError, write_new_file, path, "x")
        self.assertFalse(os.path.exists(target))


class ConfigInitCommandTests(SynchronousTestCase):
    """
    C{meteredrt config init} on the command line.
    """

    def test_writes_a_loadable_private_file(self) -> None:
        """
        The command writes the file (0600), prints the key ids but not the
        secret, and the file loads with the defaults and the printed keys.
        """
        path = self.mktemp()
        status, out, err = _cli("config", "init", path)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        config = load_config(path)
        self.assertEqual(config.listen, DEFAULT_LISTEN)
        self.assertEqual(config.data_dir, DEFAULT_DATA_DIR)
        (app,) = config.apps
        self.assertEqual(app.app.app_id, "default")
        secret = next(key for key in app.keys if key.type is KeyType.SECRET)
        publishable = next(key for key in app.keys if key.type is KeyType.PUBLISHABLE)
        self.assertIn(secret.key_id, out)
        self.assertIn(publishable.key_id, out)
        self.assertNotIn(secret.secret, out)  # type: ignore[arg-type]
        self.assertIn("twistd -n meteredrt --config", out)

    def test_options_and_json(self) -> None:
        """
        C{--app}, C{--listen} and C{--data-dir} go into the file; C{--json}
        names the keys.
        """
        path = self.mktemp()
        status, out, _ = _cli(
            "config", "init", path, "--app", "app_chat", "--listen", "tcp:9000",
            "--listen", "tcp:9001", "--data-dir", "/srv/mrt", "--json",
        )
        self.assertEqual(status, 0)
        printed = json.loads(out)
        config = load_config(path)
        self.assertEqual(config.listen, ("tcp:9000", "tcp:9001"))
        self.assertEqual(config.data_dir, "/srv/mrt")
        (app,) = config.apps
        self.assertEqual(printed["appId"], "app_chat")
        self.assertEqual(
            {printed["secretKeyId"], printed["publishableKey"]}, {key.key_id for key in app.keys}
        )

    def test_never_overwrites(self) -> None:
        """
        A second run on the same path fails with one line, exit status 2,
        and leaves the first file (and its keys) as they were.
        """
        path = self.mktemp()
        self.assertEqual(_cli("config", "init", path)[0], 0)
        with open(path, encoding="utf-8") as f:
            before = f.read()
        status, out, err = _cli("config", "init", path)
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(err, f"meteredrt: error: {path} already exists; not overwriting it\n")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), before)

    def test_bad_app_id_writes_nothing(self) -> None:
        """
        An app id the configuration would refuse is refused before any file
        is created.
        """
        path = self.mktemp()
        status, _, err = _cli("config", "init", path, "--app", "bad app!")
        self.assertEqual(status, 2)
        self.assertIn("--app:", err)
        self.assertFalse(os.path.exists(path))

    def test_empty_listen_writes_nothing(self) -> None:
        """
        An empty C{--listen} is refused before any file is created.
        """
        path = self.mktemp()
        status, _, err = _cli("config", "init", path, "--listen", " ")
        self.assertEqual(status, 2)
        self.assertIn("--listen", err)
        self.assertFalse(os.path.exists(path))
