"""
The README's set-up commands are the ones CI runs, and the ones that work
on a distribution Python (PEP 668: no system-wide pip install).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from .readme import ROOT, setup_commands


class SetupCommandTests(SynchronousTestCase):
    """
    The two commands of the README's "Set up" section.
    """

    def test_ci_runs_the_readme_test_command(self) -> None:
        """
        The last command C{.ci/run} executes is, character for character,
        the README's test command.
        """
        _, test_command = setup_commands()
        script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
        commands = [
            line.strip()
            for line in script.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and line.strip() not in {"fi", "else", "}"}
        ]
        self.assertEqual(commands[-1], test_command)

    def test_ci_does_not_break_system_packages(self) -> None:
        """
        C{.ci/run} never sets C{PIP_BREAK_SYSTEM_PACKAGES}: the README's
        command must work without it.
        """
        script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
        self.assertNotIn("export PIP_BREAK_SYSTEM_PACKAGES", script)
        self.assertNotIn("--break-system-packages", script)

    def test_commands_use_their_own_virtual_environment(self) -> None:
        """
        Both commands create C{.venv} first and run pip and the tools from
        it, never a bare C{pip}, C{twistd} or C{tox} from PATH.
        """
        for command in setup_commands():
            steps = [step.strip() for step in command.split("&&")]
            self.assertEqual(steps[0], "python3 -m venv .venv", command)
            for step in steps[1:]:
                self.assertTrue(step.startswith(".venv/bin/"), step)
