"""
The package says what it is: the licence file matches C{setup.cfg}, and the
Python versions it declares are the ones tox can test.
"""

from __future__ import annotations

import configparser
import re

from twisted.trial.unittest import SynchronousTestCase

from .readme import ROOT


def _ini(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / name, encoding="utf-8")
    return parser


class PackagingTests(SynchronousTestCase):
    """
    C{setup.cfg}, C{LICENSE} and C{tox.ini} agree.
    """

    def test_license_file_matches_metadata(self) -> None:
        """
        C{setup.cfg} says MIT and ships C{LICENSE}, which is the MIT licence.
        """
        metadata = _ini("setup.cfg")["metadata"]
        self.assertEqual(metadata["license"], "MIT")
        self.assertEqual(metadata["license_files"].split(), ["LICENSE"])
        text = (ROOT / "LICENSE").read_text(encoding="utf-8")
        self.assertTrue(text.startswith("MIT License\n"), text[:40])
        self.assertIn("Permission is hereby granted, free of charge", text)

    def test_declared_versions_have_tox_environments(self) -> None:
        """
        Every C{Programming Language :: Python :: 3.N} classifier has a
        C{py3N} environment in tox's C{versions} label, and the lowest is
        C{python_requires}'s floor; tox never skips a missing interpreter.
        """
        setup = _ini("setup.cfg")
        declared = sorted(
            (int(minor) for minor in re.findall(r"Python :: 3\.(\d+)$", setup["metadata"]["classifiers"], re.M)),
        )
        self.assertTrue(declared)
        self.assertEqual(setup["options"]["python_requires"].strip(), f">=3.{declared[0]}")
        tox = _ini("tox.ini")["tox"]
        labels = dict(
            (name.strip(), [env.strip() for env in envs.split(",")])
            for name, envs in (line.split("=", 1) for line in tox["labels"].strip().splitlines())
        )
        self.assertEqual(labels["versions"], [f"py3{minor}" for minor in declared])
        self.assertEqual(tox["skip_missing_interpreters"].strip(), "false")
