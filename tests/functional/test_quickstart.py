"""
The README's SDK quick start, run as a user would: the C{js} block of the
README's "Connect with the official SDK" section is saved as
C{quickstart.mjs} next to the pinned SDK and run under Node against a real
server started on the embedded default, with the publishable key that
first start created. README, C{examples/quickstart/} and this test cannot
drift apart: the test reads the snippet from the README and checks the
example file is the same text.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from meteredrt.cli import main
from tests.readme import ROOT, code_blocks

from .node_harness import NODE_DIR, ensure_node_modules
from .support import start_server

EXAMPLE = ROOT / "examples" / "quickstart"
RECEIVED = re.compile(
    r'alice received \{"text":"hello"\} on demo/room-7 from [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\n'
)


def _snippet() -> str:
    (snippet,) = code_blocks("Connect with the official SDK", "js")
    return snippet


class QuickStartTextTests(SynchronousTestCase):
    """
    The README snippet and C{examples/quickstart/} are one example.
    """

    def test_example_file_is_the_readme_snippet(self) -> None:
        """
        C{examples/quickstart/quickstart.mjs} is exactly the README's block.
        """
        self.assertEqual((EXAMPLE / "quickstart.mjs").read_text(encoding="utf-8"), _snippet())

    def test_example_pins_the_tested_packages(self) -> None:
        """
        The example's C{package.json} asks for the SDK and C{ws} versions
        the functional tests run it with, as an ES module package.
        """
        example = json.loads((EXAMPLE / "package.json").read_text(encoding="utf-8"))
        harness = json.loads((NODE_DIR / "package.json").read_text(encoding="utf-8"))
        self.assertEqual(example["type"], "module")
        self.assertEqual(
            example["dependencies"],
            {name: harness["dependencies"][name] for name in ("@metered-ca/realtime", "ws")},
        )


class QuickStartRunTests(TestCase):
    """
    C{node quickstart.mjs} as the README tells a new user to run it.
    """

    timeout = 120

    @classmethod
    def setUpClass(cls) -> None:
        ensure_node_modules()

    def _directory(self) -> str:
        # "An empty directory" where the user ran npm install: the pinned
        # packages, linked in, and the README's snippet.
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.symlink(NODE_DIR / "node_modules", os.path.join(directory, "node_modules"))
        with open(os.path.join(directory, "quickstart.mjs"), "w", encoding="utf-8") as f:
            f.write(_snippet())
        return directory

    def _node(self, *args: str) -> subprocess.CompletedProcess[str]:
        directory = self._directory()
        return subprocess.run(
            ["node", "quickstart.mjs", *args],
            cwd=directory, capture_output=True, text=True, timeout=60, check=False,
            stdin=subprocess.DEVNULL,
        )

    async def test_two_peers_exchange_a_message(self) -> None:
        """
        With the publishable key a first start created, the example prints
        the one message alice received from bob and exits with 0.
        """
        server = await start_server(self, config="")
        out, err = io.StringIO(), io.StringIO()
        status = main(["keys", "list", "--app", "default", "--json", "--data-dir", server.data_dir], stdout=out, stderr=err)
        self.assertEqual(status, 0, err.getvalue())
        (key,) = [k["keyId"] for k in json.loads(out.getvalue()) if k["keyId"].startswith("pk_live_")]
        result = await deferToThread(self._node, key, server.url)
        self.assertEqual((result.returncode, result.stderr), (0, ""), result.stdout)
        self.assertRegex(result.stdout, RECEIVED)
        self.assertEqual(len(result.stdout.splitlines()), 1)

    def test_without_a_key_prints_usage(self) -> None:
        """
        Run without its argument, the example says how to run it and exits
        with 2, instead of failing somewhere inside the SDK.
        """
        result = self._node()
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        self.assertIn("usage: node quickstart.mjs pk_live_", result.stderr)

    def test_no_server_is_one_line(self) -> None:
        """
        Nothing listening: one line naming the URL, exit status 1.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result = self._node("pk_live_nobody", f"ws://127.0.0.1:{port}")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(f"is meteredrt running at ws://127.0.0.1:{port}", result.stderr)
