"""
Tests for L{meteredrt.speedups}: the patch goes in only on the Autobahn code
it was checked against and falls back to stock Autobahn with one warning
otherwise, and when in place changes neither the frames nor the text of a
rendered log event.
"""

from __future__ import annotations

import importlib
import pprint
import re
from typing import Any

import autobahn
import txaio
from autobahn import util
from autobahn.twisted import websocket as twisted_websocket
from autobahn.websocket import protocol as ws_protocol
from autobahn.websocket import xormasker
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, eventAsText, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from meteredrt import speedups
from meteredrt.speedups import (
    DISABLE_VARIABLE,
    SMALL_PAYLOAD,
    TARGETS,
    DeferredPformat,
    SmallPayloadMasker,
    autobahn_problems,
    code_fingerprint,
    install_speedups,
    memoised_hltype,
    speedups_installed,
    uninstall_speedups,
    uses_outside_log_calls,
)
from tests.test_ws import WebSocketTestCase


def restore_speedups(case: SynchronousTestCase) -> None:
    """
    Leave the process-wide patch as the test found it (the composition
    root may have installed it for an earlier test).
    """
    was_installed = speedups_installed()
    case.addCleanup(install_speedups, enabled=was_installed)


def install_for_comparison(case: SynchronousTestCase) -> bool:
    """
    Install the speedups for a with/without comparison: they go in exactly
    when the installed Autobahn passes the check. On a release that fails
    it the comparison still runs, stock against stock.
    """
    uninstall_speedups()
    passes = not autobahn_problems()
    installed = install_speedups(enabled=True)
    case.assertEqual(installed, passes)
    return installed


def changed_send_data(self: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
    """
    A C{sendData} as a later Autobahn might have it: it counts differently.
    """
    self.transport.write(data)
    self.trafficStats.outgoingOctetsWireLevel += len(data) + 1


SAMPLE_MODULE = """
from autobahn.util import hltype

class Protocol:
    def onOpen(self):
        self.log.debug("{func} opened", func=hltype(self.onOpen))

    def describe(self):
        return hltype(self.describe)

def handlers():
    return [hltype]
"""


class CallSiteAnalysisTests(SynchronousTestCase):
    """
    L{uses_outside_log_calls} and L{code_fingerprint}, the two checks of
    Autobahn's code.
    """

    def test_uses_outside_log_calls(self) -> None:
        """
        A call inside a log call's arguments is allowed; a call elsewhere,
        or the helper passed around, is reported with where it is.
        """
        self.assertEqual(
            uses_outside_log_calls(SAMPLE_MODULE, ("hltype",)),
            {("hltype", "Protocol.describe"), ("hltype", "handlers (not called)")},
        )

    def test_fingerprint_ignores_form(self) -> None:
        """
        Formatting, quotes, comments, docstrings and annotations leave the
        fingerprint alone.
        """

        def plain() -> Any:
            def function(a, b=1):  # noqa: ANN001, ANN202
                return a + [b, 'x']

            return function

        def dressed() -> Any:
            def function(a: list[Any], b: int = 1) -> list[Any]:
                """
                Documented.
                """
                # A comment.
                return a + [
                    b,
                    "x",
                ]

            return function

        self.assertEqual(code_fingerprint(plain()), code_fingerprint(dressed()))

    def test_fingerprint_sees_code(self) -> None:
        """
        A changed operation changes the fingerprint.
        """

        def plain() -> Any:
            def function(a, b=1):  # noqa: ANN001, ANN202
                return a + [b, "x"]

            return function

        def changed() -> Any:
            def function(a, b=1):  # noqa: ANN001, ANN202
                return a + [b + 1, "x"]

            return function

        self.assertNotEqual(code_fingerprint(plain()), code_fingerprint(changed()))


class VerifiedAutobahnTests(SynchronousTestCase):
    """
    The check of the installed Autobahn, and what happens on either side of
    it.
    """

    def setUp(self) -> None:
        restore_speedups(self)
        uninstall_speedups()
        self.observed = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def warnings(self) -> list[str]:
        return [eventAsText(e, includeTimestamp=False) for e in self.observed if e["log_level"] == LogLevel.warn]

    def assert_fell_back(self, *fragments: str) -> None:
        """
        Installing left every Autobahn helper as it was, said so in one
        warning naming the release and each of C{fragments}, and
        C{sendData} is Autobahn's.
        """
        timings_str = vars(ws_protocol.Timings).get("__str__")
        self.assertFalse(install_speedups(enabled=True))
        self.assertFalse(speedups_installed())
        self.assertIs(ws_protocol.hltype, util.hltype)
        self.assertIs(ws_protocol.pformat, pprint.pformat)
        self.assertIs(twisted_websocket.hltype, util.hltype)
        self.assertIs(vars(ws_protocol.Timings).get("__str__"), timings_str)
        self.assertFalse(speedups.debug_skippable(txaio.make_logger()))
        [warning] = self.warnings()
        self.assertIn(f"Autobahn {autobahn.__version__} differs", warning)
        for fragment in fragments:
            self.assertIn(fragment, warning)

    def test_installed_release(self) -> None:
        """
        The speedups go in exactly when the installed Autobahn passes the
        check, with no warning; otherwise one warning lists every problem.
        Autobahn 26.10.2 and 24.4.2 pass.
        """
        problems = autobahn_problems()
        if autobahn.__version__ in ("26.10.2", "24.4.2"):
            self.assertEqual(problems, [])
        if problems:
            self.assert_fell_back(*problems)
        else:
            self.assertTrue(install_speedups(enabled=True))
            self.assertEqual(self.warnings(), [])

    def test_foreign_masker(self) -> None:
        """
        When Autobahn's protocol no longer uses its own masker factory,
        nothing is patched, the masker factory included.
        """
        foreign = lambda mask, length=None: None  # noqa: E731
        self.patch(ws_protocol, "create_xor_masker", foreign)
        self.assert_fell_back("create_xor_masker is")
        self.assertIs(ws_protocol.create_xor_masker, foreign)

    def test_changed_copied_function(self) -> None:
        """
        When C{sendData}, whose plain path meteredrt copies, is not the code
        that was read, nothing is patched.
        """
        self.patch(ws_protocol.WebSocketProtocol, "sendData", changed_send_data)
        self.assert_fell_back("WebSocketProtocol.sendData changed")

    def test_changed_message_end(self) -> None:
        """
        When C{onMessageEnd}, which meteredrt copies without the listeners'
        signal, is not the code that was read, nothing is patched.
        """

        def changed_message_end(self: Any) -> None:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)

        self.patch(ws_protocol.WebSocketProtocol, "onMessageEnd", changed_message_end)
        self.assert_fell_back("WebSocketProtocol.onMessageEnd changed")

    def test_changed_adapter_data_received(self) -> None:
        """
        When the Twisted adapter's C{dataReceived}, which meteredrt copies
        without its debug event, is not the code that was read, nothing is
        patched.
        """

        def changed_data_received(self: Any, data: bytes) -> None:
            self._dataReceived(data[1:])

        self.patch(twisted_websocket.WebSocketAdapterProtocol, "dataReceived", changed_data_received)
        self.assert_fell_back("WebSocketAdapterProtocol.dataReceived changed")

    def test_moved_function(self) -> None:
        """
        When C{Timings.__str__} is no longer defined where it was, nothing
        is patched.
        """
        self.patch(ws_protocol, "Timings", type("Timings", (), {}))
        self.assert_fell_back("Timings.__str__ has moved")

    def test_foreign_helper(self) -> None:
        """
        When a target name is no longer Autobahn's helper, nothing is
        patched.
        """
        self.patch(ws_protocol, "hltype", lambda obj: "elsewhere")
        self.assertFalse(install_speedups(enabled=True))
        self.assertFalse(speedups_installed())
        [warning] = self.warnings()
        self.assertIn("autobahn.websocket.protocol.hltype is", warning)

    def test_call_outside_log_call(self) -> None:
        """
        When a module calls a replaced helper outside a log call, nothing is
        patched and the warning says where.
        """
        real_source = speedups.module_source

        def source(module: Any) -> str:
            text = real_source(module)
            if module.__name__ == "autobahn.twisted.websocket":
                text += "\n\ndef banner(protocol):\n    return hltype(protocol.onOpen)\n"
            return text

        self.patch(speedups, "module_source", source)
        self.assert_fell_back("autobahn.twisted.websocket uses hltype outside a log call in banner")


class InstallTests(SynchronousTestCase):
    """
    L{install_speedups} and L{uninstall_speedups} on the installed
    Autobahn.
    """

    def setUp(self) -> None:
        restore_speedups(self)
        uninstall_speedups()
        # The subject here is installing; the check of Autobahn's code has
        # its own tests (VerifiedAutobahnTests), which pass on any release.
        self.patch(speedups, "autobahn_problems", lambda modules=None: [])

    def test_installed(self) -> None:
        """
        Installing replaces every target name; uninstalling puts Autobahn's
        own helpers back.
        """
        self.assertTrue(install_speedups(enabled=True))
        self.assertTrue(speedups_installed())
        for module_name, names in TARGETS.items():
            module = importlib.import_module(module_name)
            for name in names:
                self.assertIsNot(getattr(module, name), {"hltype": util.hltype, "pformat": pprint.pformat}[name])
        uninstall_speedups()
        self.assertFalse(speedups_installed())
        self.assertIs(ws_protocol.hltype, util.hltype)
        self.assertIs(ws_protocol.pformat, pprint.pformat)

    def test_idempotent(self) -> None:
        """
        Installing twice wraps the helpers once.
        """
        install_speedups(enabled=True)
        first = ws_protocol.hltype
        install_speedups(enabled=True)
        self.assertIs(ws_protocol.hltype, first)
        self.assertIs(ws_protocol.hltype.__wrapped__, util.hltype)  # type: ignore[attr-defined]

    def test_environment_switch(self) -> None:
        """
        C{METEREDRT_NO_SPEEDUPS=1} keeps (or takes) the patch out; without
        it the patch goes in.
        """
        self.assertTrue(install_speedups(environ={}))
        self.assertFalse(install_speedups(environ={DISABLE_VARIABLE: "1"}))
        self.assertFalse(speedups_installed())
        self.assertIs(ws_protocol.hltype, util.hltype)

    def test_masker_installed(self) -> None:
        """
        Installing gives Autobahn's protocol module the small-payload masker
        factory; uninstalling puts Autobahn's own back.
        """
        install_speedups(enabled=True)
        self.assertIs(ws_protocol.create_xor_masker.__wrapped__, xormasker.create_xor_masker)  # type: ignore[attr-defined]
        self.assertIsInstance(ws_protocol.create_xor_masker(b"abcd", 100), SmallPayloadMasker)
        self.assertNotIsInstance(ws_protocol.create_xor_masker(b"abcd", SMALL_PAYLOAD), SmallPayloadMasker)
        self.assertNotIsInstance(ws_protocol.create_xor_masker(b"abcd"), SmallPayloadMasker)
        uninstall_speedups()
        self.assertIs(ws_protocol.create_xor_masker, xormasker.create_xor_masker)


class MaskerTests(SynchronousTestCase):
    """
    L{SmallPayloadMasker} unmasks as Autobahn's maskers do.
    """

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=4, max_size=4), st.binary(max_size=SMALL_PAYLOAD), st.lists(st.integers(0, 64), max_size=6))
    def test_same_output(self, mask: bytes, payload: bytes, cuts: list[int]) -> None:
        """
        Fed the same payload in the same chunks, it returns what Autobahn's
        masker returns, chunk by chunk, with the same pointer; after
        C{reset} it starts over.
        """
        ours, theirs = SmallPayloadMasker(mask), xormasker.create_xor_masker(mask, len(payload))
        for _ in range(2):
            rest = payload
            for cut in [*cuts, len(payload)]:
                chunk, rest = rest[:cut], rest[cut:]
                self.assertEqual(ours.process(chunk), theirs.process(chunk))
                self.assertEqual(ours.pointer(), theirs.pointer())
            ours.reset()
            theirs.reset()
            self.assertEqual(ours.pointer(), 0)


class SameTextTests(SynchronousTestCase):
    """
    The replacements produce what the originals produce.
    """

    def test_hltype(self) -> None:
        """
        The memoised C{hltype} returns the original's text, for bound
        methods (twice), functions, classes and other objects.
        """
        hltype = memoised_hltype(util.hltype)
        protocol = ws_protocol.WebSocketServerProtocol()
        for obj in [
            protocol.sendData,
            protocol.sendData,
            protocol._connectionMade,
            util.hltype,
            ws_protocol.WebSocketServerProtocol,
            object(),
            None,
            [1, 2],
        ]:
            self.assertEqual(hltype(obj), util.hltype(obj))

    def test_deferred_pformat(self) -> None:
        """
        C{format()}, C{str()} and C{repr()} of a L{DeferredPformat} are those
        of the C{pformat} string.
        """
        value = [("option%d" % i, i, "Factory") for i in range(30)]
        expected = pprint.pformat(value)
        deferred = speedups.deferred_pformat(value)
        self.assertIsInstance(deferred, DeferredPformat)
        self.assertEqual(format(deferred), expected)
        self.assertEqual(f"\n{deferred}", "\n" + expected)
        self.assertEqual(str(deferred), expected)
        self.assertEqual(repr(deferred), repr(expected))
        self.assertEqual(speedups.deferred_pformat(value, width=20), pprint.pformat(value, width=20))

    def test_timings_str(self) -> None:
        """
        C{str()} of Autobahn's C{Timings} is still a C{str}, the same with
        and without the patch.
        """
        restore_speedups(self)
        uninstall_speedups()
        timings = ws_protocol.Timings()
        timings.track("onMessage")
        expected = str(timings)
        install_speedups(enabled=True)
        self.assertEqual(str(timings), expected)


# Per-connection randomness in Autobahn's own debug text.
_VOLATILE = re.compile(r"(?i)(sec-websocket-(?:key|accept)['\":\s]+)[A-Za-z0-9+/=]+")
_ADDRESS = re.compile(r"0x[0-9a-f]+")
# Connection ids count up from one session to the next.
_CONNECTION_ID = re.compile(r"conn=\S+")


class RoundTripTests(WebSocketTestCase):
    """
    A connection behaves the same with and without the patch.
    """

    def run_session(self) -> tuple[list[dict[str, Any]], list[str]]:
        """
        Connect, ping, close with Autobahn's debug logging on; return the
        frames the client got and the rendered text of every log event.
        """
        events: list[dict] = []
        level = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, level)
        globalLogPublisher.addObserver(events.append)
        try:
            client, server, pump = self.open_token("alice")
            pump.flush()
            client.send_json({"type": "ping"})
            pump.flush()
            client.sendClose(1000)
            pump.flush()
        finally:
            globalLogPublisher.removeObserver(events.append)
        texts = [
            _CONNECTION_ID.sub(
                "conn=*", _ADDRESS.sub("0x*", _VOLATILE.sub(r"\1*", eventAsText(e, includeTimestamp=False)))
            )
            for e in events
        ]
        return client.received, texts

    def test_same_frames_and_log_text(self) -> None:
        """
        The frames a client receives and the rendered log events are
        identical with the patch in place.
        """
        restore_speedups(self)
        uninstall_speedups()
        plain_frames, plain_log = self.run_session()
        install_for_comparison(self)
        fast_frames, fast_log = self.run_session()

        self.assertEqual([f["type"] for f in fast_frames], ["welcome", "pong"])
        self.assertEqual(fast_frames, plain_frames)
        self.assertEqual(fast_log, plain_log)
        # The patched helpers did contribute to what was compared.
        self.assertTrue(any("WebSocketProtocol.sendData> sent" in t for t in fast_log))
        self.assertTrue(any("WebSocketAdapterProtocol.dataReceived> received" in t for t in fast_log))
        self.assertTrue(any("('logOctets', False," in t for t in fast_log))


class DirectSendTests(WebSocketTestCase):
    """
    L{meteredrt.ws.RealtimeServerProtocol.sendData} leaves out only the
    debug event a dropping logger would discard.
    """

    def run_session(self) -> tuple[list[dict[str, Any]], bytes, tuple[int, int], list[tuple[str, Any]]]:
        """
        Connect, ping, publish to a subscriber; return the frames the
        client got, the bytes the server wrote, the server's outgoing
        traffic counters, and which C{sendData} calls went to Autobahn's.
        """
        autobahn_calls: list[tuple[str, Any]] = []
        original = ws_protocol.WebSocketProtocol.sendData

        def spy(protocol: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
            autobahn_calls.append((type(protocol).__name__, data))
            original(protocol, data, sync, chopsize)

        # Put back before returning: the speedups check sendData's code.
        ws_protocol.WebSocketProtocol.sendData = spy  # type: ignore[method-assign]
        try:
            client, server, pump = self.open_token("alice")
            written: list[bytes] = []
            write = server.transport.write
            server.transport.write = lambda data: (written.append(data), write(data))[1]  # type: ignore[method-assign]
            pump.flush()
            client.send_json({"type": "subscribe", "channel": "room", "requestId": "s1"})
            client.send_json({"type": "ping"})
            pump.flush()
            other, _, other_pump = self.open_token("bob")
            other_pump.flush()
            other.send_json({"type": "publish", "channel": "room", "data": {"n": 1}, "requestId": "p1"})
            other_pump.flush()
            pump.flush()
            stats = server.trafficStats
            counters = (stats.outgoingOctetsWireLevel, stats.preopenOutgoingOctetsWireLevel)
            server_calls = [c for c in autobahn_calls if c[0] == "RealtimeServerProtocol"]
        finally:
            ws_protocol.WebSocketProtocol.sendData = original  # type: ignore[method-assign]
        return client.received, b"".join(written), counters, server_calls

    def test_same_bytes_and_counters(self) -> None:
        """
        With the speedups installed the server writes the same bytes and
        counts the same octets as with Autobahn's C{sendData}, without
        calling it for plain writes.
        """
        restore_speedups(self)
        uninstall_speedups()
        plain_frames, plain_bytes, plain_counters, plain_calls = self.run_session()
        installed = install_for_comparison(self)
        fast_frames, fast_bytes, fast_counters, fast_calls = self.run_session()

        self.assertEqual([f["type"] for f in fast_frames], ["welcome", "ack", "presence", "pong", "message"])
        self.assertEqual(fast_frames, plain_frames)
        self.assertEqual(fast_bytes, plain_bytes)
        self.assertEqual(fast_counters, plain_counters)
        self.assertTrue(plain_calls)
        if installed:
            self.assertEqual(fast_calls, [])
        else:
            # Stock Autobahn (a release that fails the check) keeps its
            # sendData for every write (the count differs: the first
            # session's subscriber also gets the second one's message).
            self.assertGreater(len(fast_calls), len(plain_calls))

    def test_debug_logging_uses_autobahn(self) -> None:
        """
        When Autobahn's logger keeps debug events, or the speedups are off,
        C{sendData} is Autobahn's, so its debug event is logged.
        """
        restore_speedups(self)
        installed = install_for_comparison(self)
        _, protocol, _ = self.open_token("alice")
        self.assertEqual(speedups.debug_skippable(protocol.log), installed)
        level = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, level)
        self.assertFalse(speedups.debug_skippable(protocol.log))
        txaio.set_global_log_level("info")
        uninstall_speedups()
        self.assertFalse(speedups.debug_skippable(protocol.log))


class MessageEndTests(WebSocketTestCase):
    """
    L{meteredrt.ws.RealtimeServerProtocol.onMessageEnd} leaves out
    Autobahn's C{message} signal only when nobody listens to it.
    """

    def open_counting_fires(self) -> tuple[Any, Any, Any, list[str]]:
        """
        Open a connection whose server side records the events it fires.
        """
        client, server, pump = self.open_token("alice")
        pump.flush()
        fired: list[str] = []
        fire = server.fire

        def counting(event: str, *args: Any, **kwargs: Any) -> Any:
            fired.append(event)
            return fire(event, *args, **kwargs)

        server.fire = counting
        return client, server, pump, fired

    def test_no_listener(self) -> None:
        """
        With the speedups installed and no listener, messages are handled
        without firing the signal.
        """
        restore_speedups(self)
        installed = install_for_comparison(self)
        client, server, pump, fired = self.open_counting_fires()
        client.send_json({"type": "subscribe", "channel": "room", "requestId": "s1"})
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual([f["type"] for f in client.received], ["welcome", "ack", "presence", "pong"])
        self.assertIsNone(server.message_data)
        self.assertEqual(fired, [] if installed else ["message", "message"])

    def test_listener(self) -> None:
        """
        A listener of the signal still gets every message.
        """
        restore_speedups(self)
        install_for_comparison(self)
        client, server, pump, fired = self.open_counting_fires()
        heard: list[bytes] = []
        server.on("message", lambda payload, is_binary: heard.append(payload))
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual(heard, [b'{"type": "ping"}'])
        self.assertEqual(fired, ["message"])
        self.assertEqual(client.received[-1]["type"], "pong")

    def test_without_speedups(self) -> None:
        """
        Without the speedups Autobahn's own C{onMessageEnd} runs and fires.
        """
        restore_speedups(self)
        uninstall_speedups()
        client, server, pump, fired = self.open_counting_fires()
        client.send_json({"type": "ping"})
        pump.flush()
        self.assertEqual(fired, ["message"])
        self.assertEqual(client.received[-1]["type"], "pong")


class DataReceivedTests(WebSocketTestCase):
    """
    L{meteredrt.ws.RealtimeServerProtocol.dataReceived} leaves out only the
    debug event a dropping logger would discard.
    """

    def server_reads(self) -> tuple[list[dict[str, Any]], int]:
        """
        Connect and ping; return the frames the client got and how many
        reads of the server went through Autobahn's adapter C{dataReceived}.
        """
        adapter = twisted_websocket.WebSocketAdapterProtocol
        original = adapter.dataReceived
        calls: list[str] = []

        def spy(protocol: Any, data: bytes) -> None:
            calls.append(type(protocol).__name__)
            original(protocol, data)

        self.patch(adapter, "dataReceived", spy)
        client, _, pump = self.open_token("alice")
        pump.flush()
        client.send_json({"type": "ping"})
        pump.flush()
        return client.received, calls.count("RealtimeServerProtocol")

    def test_skipped(self) -> None:
        """
        With the speedups installed and Autobahn's logger dropping debug
        events, the server's reads skip Autobahn's adapter method and are
        handled alike.
        """
        restore_speedups(self)
        installed = install_for_comparison(self)
        frames, reads = self.server_reads()
        self.assertEqual([f["type"] for f in frames], ["welcome", "pong"])
        if installed:
            self.assertEqual(reads, 0)
        else:
            self.assertGreater(reads, 0)

    def test_debug_logging(self) -> None:
        """
        With Autobahn's logger keeping debug events every read goes through
        Autobahn's method.
        """
        restore_speedups(self)
        install_for_comparison(self)
        level = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, level)
        frames, reads = self.server_reads()
        self.assertEqual([f["type"] for f in frames], ["welcome", "pong"])
        self.assertGreater(reads, 0)
