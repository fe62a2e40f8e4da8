"""
A throwaway PostgreSQL server for the tests: real, never a mock.

L{server} starts one per test run, lazily, the first time a test asks for
it: C{initdb} into a temporary directory, C{postgres} on a free loopback
port with its unix socket in that directory, stopped when the interpreter
exits. L{fresh_database} gives each test its own empty database on it.

It never touches the machine's shared instance (port 5432) and never
skips: if PostgreSQL cannot be started the test fails with the reason.
``initdb`` refuses to run as root, so as root the server runs as the
unprivileged user ``nobody`` (through ``setpriv``).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psycopg2

#: Where Debian and Ubuntu install the server binaries.
_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    """
    The test PostgreSQL could not be started; the message says why.
    """


def _bin_dir() -> str:
    override = os.environ.get("METEREDRT_PG_BIN")
    candidates = [override] if override else []
    candidates += sorted(glob.glob(_BIN_GLOB), key=lambda path: int(path.split("/")[-2]), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, "initdb")) and os.path.exists(
            os.path.join(candidate, "postgres")
        ):
            return candidate
    raise PostgresUnavailable(f"no initdb/postgres found in {_BIN_GLOB} or on PATH; install postgresql")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """
    One running test server.

    :ivar port: its loopback TCP port.
    :ivar directory: the temporary directory holding data and socket.
    """

    def __init__(self) -> None:
        self.bin_dir = _bin_dir()
        self.directory = tempfile.mkdtemp(prefix="meteredrt-pg-")
        self.data_dir = os.path.join(self.directory, "data")
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            self._prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        self._run(
            "initdb", "-D", self.data_dir, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8",
            "--locale=C",
        )
        self.start()

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [*self._prefix, os.path.join(self.bin_dir, program), *args],
            capture_output=True,
            cwd=self.directory,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{program} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )

    def start(self) -> None:
        """
        Start (or restart) the server and wait until it accepts connections.
        """
        log = open(os.path.join(self.directory, "postgres.log"), "ab")
        self._process = subprocess.Popen(
            [
                *self._prefix,
                os.path.join(self.bin_dir, "postgres"),
                "-D", self.data_dir,
                "-h", "127.0.0.1",
                "-p", str(self.port),
                "-k", self.directory,
                "-c", "fsync=off",
                "-c", "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None:
                raise PostgresUnavailable(f"postgres exited with {self._process.returncode}: {self.log_tail()}")
            try:
                psycopg2.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"postgres did not accept connections: {self.log_tail()}") from None
                time.sleep(0.05)

    def stop_immediately(self) -> None:
        """
        Stop the server the way ``pg_ctl stop -m immediate`` does (SIGQUIT):
        no checkpoint, every connection cut.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGQUIT)
            process.wait(30)

    def stop(self) -> None:
        """
        Stop the server and remove its directory.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self) -> str:
        """
        The end of the server's log, for error messages.
        """
        try:
            with open(os.path.join(self.directory, "postgres.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def url(self, database: str) -> str:
        """
        The connection URL of one database, over loopback TCP.
        """
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """
        Create a new empty database and return its URL.
        """
        name = f"test_{os.getpid()}_{next(self._names)}"
        connection = psycopg2.connect(self.url("postgres"), connect_timeout=5)
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)


_server: PostgresServer | None = None


def server() -> PostgresServer:
    """
    The test run's PostgreSQL server, started on first use and stopped at
    exit.

    :raises PostgresUnavailable: if it cannot be started.
    """
    global _server
    if _server is None:
        _server = PostgresServer()
        atexit.register(_server.stop)
    return _server


def fresh_database() -> str:
    """
    The URL of a new, empty database on the test run's server.
    """
    return server().create_database()
