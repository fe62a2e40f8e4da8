"""
Tests for L{meteredrt.logs} and how the composition root hands its
observer to twistd.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import Application
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase

from meteredrt import logs
from meteredrt.config import LogConfig
from meteredrt.logs import _Stamps, build_observer, json_line, message, rotate_on_sigusr1, text_line, twistd_destination
from meteredrt.tap import Options, OrderedServices, makeService


def emit(observer: ILogObserver, level: LogLevel, text: str = "hello {who}", **fields: object) -> None:
    """
    Log one event through a L{Logger} whose only observer is C{observer}.
    """
    publisher = LogPublisher(observer)
    Logger(namespace="tests.logs", observer=publisher).emit(level, text, **fields)


class JsonLineTests(SynchronousTestCase):
    """
    Tests for L{json_line}.
    """

    def test_fields(self) -> None:
        """
        One line of JSON: time in UTC, level, namespace, the formatted
        message and the event's scalar fields; other values are left out.
        """
        out = io.StringIO()
        emit(build_observer(LogConfig(format="json"), out), LogLevel.info, who="Ada", n=3, ok=True, gone=None,
             thing=object())  # fmt: skip
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertTrue(record.pop("time").endswith("+00:00"))
        self.assertEqual(
            record,
            {"level": "info", "namespace": "tests.logs", "message": "hello Ada", "who": "Ada", "n": 3, "ok": True,
             "gone": None},
        )  # fmt: skip

    def test_reserved_names(self) -> None:
        """
        An event field named like one of the line's own keys does not
        replace it.
        """
        line = json_line({"log_format": "x", "log_level": LogLevel.warn, "level": "fake", "message": "fake",
                          "log_time": 0.0, "log_namespace": "n"})  # fmt: skip
        record = json.loads(line)
        self.assertEqual((record["level"], record["message"], record["time"]), ("warn", "x", "1970-01-01T00:00:00.000+00:00"))

    def test_failure(self) -> None:
        """
        A logged failure's traceback rides in C{traceback}; the line stays
        one line.
        """
        failure = Failure(ZeroDivisionError("division by zero"))
        out = io.StringIO()
        publisher = LogPublisher(build_observer(LogConfig(format="json"), out))
        Logger(namespace="tests.logs", observer=publisher).failure("it broke", failure)
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual((record["level"], record["message"]), ("critical", "it broke"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_text(self) -> None:
        """
        The text format writes twistd's usual lines.
        """
        out = io.StringIO()
        emit(build_observer(LogConfig(), out), LogLevel.info, who="Ada")
        self.assertRegex(out.getvalue(), r"^\S+ \[tests\.logs#info\] hello Ada\n$")


def twisted_text(event: dict) -> str:
    """
    What Twisted's own text observer (twistd's) writes for C{event}.
    """
    out = io.StringIO()
    textFileLogObserver(out)(event)
    return out.getvalue()


def session_end(**changes: object) -> dict:
    """
    A session-end event as the WebSocket adapter logs it, as a L{Logger}
    hands it to observers.
    """
    event: dict = {
        "log_format": "WebSocket session ended: app={app} peer={peer} conn={conn} remote={remote} "
        "duration={duration:.3f}s code={code} by={closed_by} reason={reason!r} "
        "frames_in={frames_in} frames_out={frames_out}",
        "log_level": LogLevel.info,
        "log_namespace": "meteredrt.ws.RealtimeServerProtocol",
        "log_source": None,
        "log_time": 1764561600.75,
        "event": "session_end",
        "app": "app_1",
        "peer": "p{1}",
        "conn": "c1",
        "remote": "127.0.0.1:4000",
        "duration": 1.23456,
        "code": 1000,
        "closed_by": "client",
        "reason": "bye {now}\n",
        "frames_in": 3,
        "frames_out": 4,
    }
    event.update(changes)
    return event


class TextTests(SynchronousTestCase):
    """
    The lines are Twisted's, made more cheaply (L{message}, L{text_line}).
    """

    def assertSameAsTwisted(self, event: dict) -> None:
        self.assertEqual(message(dict(event)), formatEvent(dict(event)))
        self.assertEqual(text_line(dict(event)) or "", twisted_text(dict(event)))
        if event.get("log_time") is not None:  # every Logger sets it; json_line needs it
            self.assertEqual(json.loads(json_line(dict(event)))["message"], formatEvent(dict(event)))

    def test_session_end(self) -> None:
        """
        The session-end line is Twisted's, braces and newlines in its
        values included, and is formatted without Twisted's formatter.
        """
        self.assertSameAsTwisted(session_end())
        self.patch(logs, "formatEvent", lambda event: self.fail("formatted by Twisted"))
        self.assertIn("reason='bye {now}\\n'", message(session_end()))

    def test_awkward_events(self) -> None:
        """
        Calls, positional or missing fields, flattened, byte, empty and
        missing formats, failures, no time and a system of their own all
        come out as Twisted writes them.
        """
        failure = Failure(RuntimeError("boom {x}"))
        flattened = eventFromJSON(eventAsJSON(session_end()))
        for event in [
            session_end(log_format="calls {peer.upper()} and {code}"),
            session_end(log_format="positional {0} and {}"),
            session_end(log_format="missing {nowhere}"),
            session_end(log_format="bad spec {code:Q}"),
            session_end(log_format=b"bytes {code}"),
            session_end(log_format=""),
            session_end(log_format=None),
            session_end(log_format="index {remote[0]} attribute {duration.real}"),
            session_end(log_failure=failure, log_format="failed {code}"),
            session_end(log_time=None),
            session_end(log_system="the system"),
            flattened,
        ]:
            self.assertSameAsTwisted(event)

    @settings(max_examples=300, deadline=None)
    @given(
        st.text(alphabet=st.sampled_from(list("ab{}!:r.[]0 ()s\n\u00e9")), max_size=24),
        st.dictionaries(
            st.sampled_from(["a", "b", "ab", "s"]),
            st.one_of(st.integers(), st.text(max_size=6), st.floats(allow_nan=False), st.none()),
        ),
    )
    def test_any_format(self, text: str, fields: dict) -> None:
        """
        Whatever the format and fields, the message and the line are
        Twisted's.
        """
        self.assertSameAsTwisted(session_end(log_format=text, **fields))

    def test_stamps_per_second(self) -> None:
        """
        The time stamp is Twisted's, made once per second.
        """
        stamps = _Stamps()
        made = []
        self.patch(logs, "formatTime", lambda when, *rest: made.append(when) or twisted_stamp(when))

        def twisted_stamp(when: float) -> str:
            return twisted_text(session_end(log_time=when, log_format="x")).split(" ")[0]

        self.assertEqual(stamps(100.25), twisted_stamp(100.25))
        self.assertEqual(stamps(100.75), twisted_stamp(100.75))
        self.assertEqual(stamps(101.0), twisted_stamp(101.0))
        self.assertEqual(made, [100.25, 101.0])


class LevelTests(SynchronousTestCase):
    """
    C{[log] level} drops events below it.
    """

    def levels_written(self, level: str) -> list[str]:
        out = io.StringIO()
        observer = build_observer(LogConfig(format="json", level=level), out)
        for each in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
            emit(observer, each, who=each.name)
        return [json.loads(line)["level"] for line in out.getvalue().splitlines()]

    def test_levels(self) -> None:
        """
        Each level keeps itself and everything more severe.
        """
        self.assertEqual(self.levels_written("debug"), ["debug", "info", "warn", "error", "critical"])
        self.assertEqual(self.levels_written("info"), ["info", "warn", "error", "critical"])
        self.assertEqual(self.levels_written("warn"), ["warn", "error", "critical"])
        self.assertEqual(self.levels_written("error"), ["error", "critical"])


class DestinationTests(SynchronousTestCase):
    """
    L{twistd_destination} picks what twistd itself would.
    """

    def test_stdout(self) -> None:
        """
        C{-n} without C{--logfile}, or with C{--logfile=-}: standard output.
        """
        self.assertIs(twistd_destination({"nodaemon": True, "logfile": None}), sys.stdout)
        self.assertIs(twistd_destination({"nodaemon": True, "logfile": "-"}), sys.stdout)

    def test_file(self) -> None:
        """
        A C{--logfile}, or C{twistd.log} for a daemon without one: a
        L{LogFile}, which rotates by size as twistd's does.
        """
        path = os.path.abspath(self.mktemp())
        destination = twistd_destination({"nodaemon": True, "logfile": path})
        self.assertIsInstance(destination, LogFile)
        assert isinstance(destination, LogFile)
        self.addCleanup(destination.close)
        self.assertEqual(destination.path, path)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        default = twistd_destination({"nodaemon": False, "logfile": None})
        assert isinstance(default, LogFile)
        self.addCleanup(default.close)
        self.assertEqual(default.path, os.path.join(directory, "twistd.log"))

    def test_left_to_twistd(self) -> None:
        """
        With C{--syslog} or C{--logger}, or a daemon told to log to
        standard output (which twistd refuses), twistd keeps its own.
        """
        self.assertIsNone(twistd_destination({"nodaemon": True, "syslog": True}))
        self.assertIsNone(twistd_destination({"nodaemon": True, "logger": "some.observer"}))
        self.assertIsNone(twistd_destination({"nodaemon": False, "logfile": "-"}))


class CompositionTests(SynchronousTestCase):
    """
    The composition root gives twistd its observer through the
    application.
    """

    def test_application_component(self) -> None:
        """
        Joining an application sets its C{ILogObserver} unless it has one
        already.
        """
        observer = build_observer(LogConfig(), io.StringIO())
        application = Application("meteredrt")
        top = OrderedServices()
        top.log_observer = observer
        top.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)

        theirs = build_observer(LogConfig(), io.StringIO())
        other = Application("meteredrt")
        other.setComponent(ILogObserver, theirs)
        again = OrderedServices()
        again.log_observer = observer
        again.setServiceParent(other)
        self.assertIs(other.getComponent(ILogObserver), theirs)

    def test_under_twistd(self) -> None:
        """
        Under twistd (the plugin's options have twistd's as parent), the
        service carries an observer in the configured format; outside
        twistd, none.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "meteredrt.toml")
        with open(config, "w") as f:
            f.write('[log]\nformat = "json"\nlevel = "warn"\n')
        from twisted.internet.testing import MemoryReactorClock

        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        options = Options()
        options.parseOptions(["--config", config, "--data-dir", os.path.join(directory, "data")])
        self.assertIsNone(makeService(options, MemoryReactorClock()).log_observer)  # type: ignore[attr-defined]
        options.parent = {"nodaemon": True, "logfile": os.path.join(directory, "out.log")}  # type: ignore[assignment]
        service = makeService(options, MemoryReactorClock())
        observer = service.log_observer  # type: ignore[attr-defined]
        emit(observer, LogLevel.info, who="nobody")
        emit(observer, LogLevel.warn, who="Ada")
        observer._observer._outFile.close()
        with open(os.path.join(directory, "out.log")) as f:
            [line] = f.read().splitlines()
        self.assertEqual(json.loads(line)["message"], "hello Ada")
        # twistd's SIGUSR1 rotation of the file it would have opened.
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)


class _ThreadCalls:
    """
    Records what is handed to C{callFromThread}.
    """

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        self.calls.append(lambda: f(*args, **kwargs))


class RotationTests(SynchronousTestCase):
    """
    Tests for L{rotate_on_sigusr1}.
    """

    def setUp(self) -> None:
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.path = os.path.abspath(self.mktemp())
        self.log_file = LogFile.fromFullPath(self.path)
        self.addCleanup(self.log_file.close)

    def test_rotates(self) -> None:
        """
        C{SIGUSR1} rotates the file, through the reactor thread.
        """
        reactor = _ThreadCalls()
        self.assertTrue(rotate_on_sigusr1(self.log_file, reactor))  # type: ignore[arg-type]
        self.log_file.write("before\n")
        os.kill(os.getpid(), signal.SIGUSR1)
        [rotate] = reactor.calls
        rotate()
        self.log_file.write("after\n")
        self.log_file.flush()
        with open(self.path + ".1") as f:
            self.assertEqual(f.read(), "before\n")
        with open(self.path) as f:
            self.assertEqual(f.read(), "after\n")

    def test_taken(self) -> None:
        """
        A signal someone else handles is left to them.
        """

        def theirs(signum: int, frame: object) -> None:
            pass

        signal.signal(signal.SIGUSR1, theirs)
        self.assertFalse(rotate_on_sigusr1(self.log_file, _ThreadCalls()))  # type: ignore[arg-type]
        self.assertIs(signal.getsignal(signal.SIGUSR1), theirs)
