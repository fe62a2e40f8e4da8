"""
The server's log observer: twistd's destination, the operator's format and
level (the C{[log]} table).

L{build_observer} makes one C{twisted.logger} observer: C{"text"} writes
twistd's usual lines (L{text_line}), C{"json"} one JSON object per line for
log shippers (L{json_line}); both drop events below the configured level.
Both format a message the way Twisted does, but cheaper (L{message}): a
server writes one line per session end, as often as clients come and go.
L{twistd_destination} picks the file twistd itself would have written to
(C{--logfile}, C{-n}), so that the composition root can hand the observer
to twistd as the application's C{ILogObserver} without changing where logs
go; L{rotate_on_sigusr1} keeps twistd's C{SIGUSR1} rotation of that file.
twistd's own C{--logger} and C{--syslog} still take precedence.

Log events in meteredrt carry their facts as fields (C{app}, C{peer},
C{conn}, ...); the JSON line keeps every field whose value is a string,
number, boolean or null, so shippers can index them without parsing the
message. No event here ever carries a token or a secret.
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.logfile import LogFile

from meteredrt.config import LogConfig

#: The keys of a JSON line; event fields of the same names are left out,
#: as are those that Twisted's bridge to its legacy log adds to every event.
_RESERVED = frozenset({"time", "level", "namespace", "message", "traceback", "format", "isError"})


def message(event: LogEvent) -> str:
    """
    The event's message, exactly as L{formatEvent} writes it.

    Twisted formats with a pure-Python C{string.Formatter} so that a field
    may be called (C{"{name()}"}); a format without C{"()"} means the same
    to C{str.format_map}, which does the work in C (a third of the cost of
    a session-end line). Anything else (a call, a flattened or non-text
    format, a format that fails) is left to L{formatEvent}, which also
    describes an event it cannot format.
    """
    text = event.get("log_format")
    if type(text) is str and "()" not in text and "log_flattened" not in event:
        try:
            return text.format_map(event)
        except Exception:
            pass  # formatEvent says what is wrong with it
    return formatEvent(event)


class _Stamps:
    """
    Twistd's time stamp (RFC 3339, local time, to the second), made once
    per second: making it takes two time zone look-ups and a C{strftime}.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(when, timeFormatRFC3339)
        return self._text


def text_line(event: LogEvent, stamps: _Stamps | None = None) -> str | None:
    """
    One log event as twistd's text observer writes it: time stamp, system,
    message (L{message}), the traceback of a failure, continuation lines
    indented.
    """
    text = message(event)
    # Twisted writes the rest of the line; handing it the message as a
    # format without fields keeps its own formatting out of the way.
    made = dict(event, log_format=text.replace("{", "{{").replace("}", "}}"))
    made.pop("log_flattened", None)
    return formatEventAsClassicLogText(made, formatTime=stamps or _Stamps())


def json_line(event: LogEvent) -> str:
    """
    One log event as one line of JSON: C{time} (ISO 8601, UTC), C{level},
    C{namespace}, C{message} (the formatted text), C{traceback} when a
    failure is attached, and the event's own scalar fields.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": message(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for name, value in event.items():
        if name.startswith("log_") or name in _RESERVED:
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            record[name] = value
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def build_observer(config: LogConfig, out: IO[str]) -> ILogObserver:
    """
    An observer writing events at or above C{config.level} to C{out}, in
    C{config.format}.
    """
    writer: ILogObserver
    if config.format == "json":
        writer = FileLogObserver(out, json_line)
    else:
        stamps = _Stamps()
        writer = FileLogObserver(out, lambda event: text_line(event, stamps))
    level = LogLevel.levelWithName(config.level)
    return FilteringLogObserver(writer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def twistd_destination(twistd_options: Any) -> IO[str] | None:
    """
    Where twistd would write its log for these (C{twistd}'s own) options:
    standard output for C{--logfile=-} or C{-n} without C{--logfile}, else
    the C{--logfile} (C{twistd.log} by default), rotated by size as twistd
    rotates it.

    @return: C{None} when twistd should keep its own observer: with
        C{--syslog} or C{--logger}, or a daemon asked to log to standard
        output (twistd refuses that itself).
    """
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    path = twistd_options.get("logfile")
    nodaemon = twistd_options.get("nodaemon")
    if path == "-" or (nodaemon and not path):
        return sys.stdout if nodaemon else None
    return LogFile.fromFullPath(path or "twistd.log")


def rotate_on_sigusr1(log_file: LogFile, reactor: IReactorThreads) -> bool:
    """
    Rotate C{log_file} when the process gets C{SIGUSR1}, as twistd does for
    the log file it opens itself, unless something else already handles
    that signal.

    @return: whether the handler was installed.
    """
    if signal.getsignal(signal.SIGUSR1) not in (None, signal.SIG_DFL):
        return False

    def rotate(signum: int, frame: object) -> None:
        reactor.callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)
    return True

