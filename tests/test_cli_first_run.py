"""
Tests for what C{meteredrt} says before any data exists: C{--version}, and
read-only commands pointed at a data directory that holds nothing.
"""

from __future__ import annotations

import os
from importlib import metadata

from twisted.trial.unittest import SynchronousTestCase

from meteredrt import version
from meteredrt.keystore import prepare_database

from .test_cli import CommandLineMixin

#: Every command that only reads, with the arguments it needs.
READ_ONLY_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("apps", "list"),
    ("keys", "list", "--app", "default"),
    ("token", "mint", "--app", "default", "--key", "sk_id_x", "--peer-id", "alice"),
    ("usage", "--app", "default"),
)


class VersionTests(CommandLineMixin, SynchronousTestCase):
    """
    C{meteredrt --version}.
    """

    def test_prints_version(self) -> None:
        """
        C{--version} prints the package version and exits 0.
        """
        out, err = self.cli("--version", data_dir=False)
        self.assertEqual((out, err), (f"meteredrt {version.package_version()}\n", ""))

    def test_installed_metadata(self) -> None:
        """
        An installed package's version comes from its metadata.
        """
        self.patch(version.metadata, "version", lambda name: {"meteredrt": "9.8.7"}[name])
        self.assertEqual(version.package_version(), "9.8.7")

    def test_source_tree(self) -> None:
        """
        Without metadata, the version is read from the source tree's
        C{setup.cfg} and says so.
        """

        def not_installed(name: str) -> str:
            raise metadata.PackageNotFoundError(name)

        self.patch(version.metadata, "version", not_installed)
        tree = os.path.dirname(os.path.dirname(os.path.abspath(version.__file__)))
        with open(os.path.join(tree, "setup.cfg")) as f:
            declared = next(line.split("=")[1].strip() for line in f if line.startswith("version"))
        self.assertEqual(version.package_version(), f"{declared} (source tree at {tree})")

    def test_nothing_to_go_by(self) -> None:
        """
        With neither metadata nor a C{setup.cfg}, the version is "unknown".
        """

        def not_installed(name: str) -> str:
            raise metadata.PackageNotFoundError(name)

        self.patch(version.metadata, "version", not_installed)
        fake_package = os.path.join(self.mktemp(), "meteredrt", "version.py")
        self.patch(version, "__file__", fake_package)
        self.assertEqual(version.package_version(), "unknown")


class MissingDataTests(CommandLineMixin, SynchronousTestCase):
    """
    Read-only commands refuse a data directory without a database, say where
    they looked, and create nothing.
    """

    def test_no_directory(self) -> None:
        """
        A data directory that does not exist is named, with status 2, and is
        not created.
        """
        where = os.path.abspath(self.data_dir)
        for argv in READ_ONLY_COMMANDS:
            _, err = self.cli(*argv, status=2)
            self.assertEqual(
                err,
                f"meteredrt: error: no meteredrt data: {where} does not exist (give the server's data "
                "directory with --data-dir, or its configuration with --config)\n",
                argv,
            )
            self.assertFalse(os.path.exists(self.data_dir), argv)

    def test_directory_without_database(self) -> None:
        """
        A directory without the key database is named, with status 2, and
        stays empty.
        """
        os.makedirs(self.data_dir)
        where = os.path.abspath(self.data_dir)
        for argv in READ_ONLY_COMMANDS:
            self.fail_with(f"no meteredrt data: no meteredrt.sqlite3 in {where} (", *argv)
            self.assertEqual(os.listdir(self.data_dir), [], argv)

    def test_declared_apps_suffice(self) -> None:
        """
        Apps declared in the configuration are data: they are listed even
        before the server has created its database, which is still not
        created.
        """
        out, _ = self.cli("apps", "list", "--config", self.write_config())
        self.assertIn("app_demo", out)
        self.assertFalse(os.path.exists(self.data_dir))

    def test_empty_database(self) -> None:
        """
        A database without apps is not an error: there are no apps.
        """
        prepare_database(self.data_dir)
        self.assertEqual(self.cli("apps", "list"), ("No apps.\n", ""))
