"""
C{contrib/meteredrt.service} is a unit systemd accepts, and stays hardened.

C{systemd-analyze verify} checks the unit as systemd would load it: keys in
the right sections, valid values, an executable C{ExecStart}. The unit names
the install location C{/opt/meteredrt/.venv/bin/twistd}; the test points it
at the C{twistd} beside the Python running the tests (a real one), and
changes nothing else. C{systemd-analyze} is required: without it the test
fails, since a skipped check would pass a broken unit (C{.ci/run} installs
Debian's C{systemd} package when it is missing).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from .readme import ROOT

UNIT = ROOT / "contrib" / "meteredrt.service"
INSTALLED_TWISTD = "/opt/meteredrt/.venv/bin/twistd"

#: The highest exposure `systemd-analyze security` may rate the unit
#: (0 = locked down, 10 = unprotected); the unit scores about 1.5.
EXPOSURE_THRESHOLD = 2.5


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        raise AssertionError(
            "systemd-analyze is not on PATH; install Debian's systemd package "
            "(.ci/run does) to check contrib/meteredrt.service"
        )
    return found


class SystemdUnitTests(TestCase):
    """
    The unit file under C{systemd-analyze}.
    """

    def _testable_unit(self) -> Path:
        text = UNIT.read_text(encoding="utf-8")
        self.assertEqual(text.count(INSTALLED_TWISTD), 1)
        twistd = Path(sys.executable).parent / "twistd"
        self.assertTrue(twistd.is_file(), f"no twistd beside {sys.executable}")
        directory = Path(self.mktemp())
        directory.mkdir()
        unit = directory / "meteredrt.service"
        unit.write_text(text.replace(INSTALLED_TWISTD, str(twistd)), encoding="utf-8")
        return unit

    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} accepts the unit and says nothing about it.
        """
        unit = self._testable_unit()
        result = subprocess.run(
            [_systemd_analyze(), "verify", str(unit)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        complaints = [line for line in output.splitlines() if "meteredrt.service" in line]
        self.assertEqual(complaints, [])

    def test_hardened(self) -> None:
        """
        C{systemd-analyze security} rates the unit's exposure at most
        L{EXPOSURE_THRESHOLD}.
        """
        unit = self._testable_unit()
        result = subprocess.run(
            [_systemd_analyze(), "security", "--offline=yes", f"--threshold={EXPOSURE_THRESHOLD * 10:.0f}", str(unit)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_runs_twistd_in_the_foreground_on_the_state_directory(self) -> None:
        """
        The unit runs C{twistd --nodaemon} (systemd supervises it; a
        daemonizing twistd would look like an exit) with the data in the
        directory systemd creates for the dedicated user.
        """
        lines = UNIT.read_text(encoding="utf-8").splitlines()
        settings = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
        values: dict[str, list[str]] = {}
        for key, value in settings:
            values.setdefault(key, []).append(value)
        (exec_start,) = values["ExecStart"]
        self.assertIn("--nodaemon", exec_start.split())
        self.assertIn("--data-dir /var/lib/meteredrt", exec_start)
        self.assertEqual(values["StateDirectory"], ["meteredrt"])
        self.assertEqual(values["User"], ["meteredrt"])
        self.assertEqual(values["NoNewPrivileges"], ["yes"])
        self.assertEqual(values["ProtectSystem"], ["strict"])
        self.assertEqual(values["Restart"], ["on-failure"])
