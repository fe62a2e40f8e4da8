"""
Tests for L{meteredrt.speedups}: the patch is in place, changes neither the
frames nor the text of a rendered log event, and is re-checked whenever
Autobahn changes.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pprint
import re
from typing import Any

import autobahn
import txaio
from autobahn import util
from autobahn.websocket import protocol as ws_protocol
from autobahn.websocket import xormasker
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import eventAsText, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from meteredrt import speedups
from meteredrt.speedups import (
    DISABLE_VARIABLE,
    SMALL_PAYLOAD,
    TARGETS,
    VERIFIED_AUTOBAHN,
    DeferredPformat,
    SmallPayloadMasker,
    install_speedups,
    memoised_hltype,
    speedups_installed,
    uninstall_speedups,
)
from tests.test_ws import WebSocketTestCase

#: Log levels whose calls may take the patched helpers as arguments.
LOG_METHODS = frozenset({"trace", "debug", "info", "warn", "warning", "error", "critical", "failure"})

#: Uses of a patched name outside a log call that the patch accounts for.
KNOWN_OTHER_USES = {("autobahn.websocket.protocol", "pformat"): {"Timings.__str__"}}


def restore_speedups(case: SynchronousTestCase) -> None:
    """
    Leave the process-wide patch as the test found it (the composition
    root may have installed it for an earlier test).
    """
    was_installed = speedups_installed()
    case.addCleanup(install_speedups, enabled=was_installed)


def uses_outside_log_calls(module_name: str, names: tuple[str, ...]) -> set[tuple[str, str]]:
    """
    Every call of one of C{names} in a module's source that is not part
    of the arguments of a C{<something>.log.<level>(...)} call, as
    C{(name, enclosing "Class.function")} pairs.
    """
    source = inspect.getsource(importlib.import_module(module_name))
    tree = ast.parse(source)
    inside_log: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOG_METHODS
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "log"
        ):
            for argument in [*node.args, *(k.value for k in node.keywords)]:
                inside_log.update(id(n) for n in ast.walk(argument))

    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST, where: tuple[str, ...]) -> None:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            where = (*where, node.name)
        if isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load):
            if id(node) not in called:
                # Passed around rather than called: it could escape a log call.
                found.add((node.id, ".".join(where) + " (not called)"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in names
            and id(node) not in inside_log
        ):
            found.add((node.func.id, ".".join(where)))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(tree, ())
    return found


class AutobahnCallSiteTests(SynchronousTestCase):
    """
    The patch fits the installed Autobahn; these fail on an upgrade so that
    the call sites are read again.
    """

    def test_verified_release(self) -> None:
        """
        The installed Autobahn is the release whose call sites were read.
        """
        self.assertEqual(
            autobahn.__version__,
            VERIFIED_AUTOBAHN,
            "Autobahn changed: re-read the hltype/pformat call sites in "
            f"{sorted(TARGETS)}, then update VERIFIED_AUTOBAHN",
        )

    def test_names_in_place(self) -> None:
        """
        Every replaced name is still Autobahn's helper, imported into the
        module that calls it.
        """
        restore_speedups(self)
        uninstall_speedups()
        expected = {"hltype": util.hltype, "pformat": pprint.pformat}
        for module_name, names in TARGETS.items():
            module = importlib.import_module(module_name)
            for name in names:
                self.assertIs(getattr(module, name, None), expected[name], f"{module_name}.{name}")

    def test_only_log_arguments(self) -> None:
        """
        The replaced helpers are only called to build log-call arguments,
        apart from the uses the patch accounts for.
        """
        for module_name, names in TARGETS.items():
            outside = uses_outside_log_calls(module_name, names)
            allowed = {
                (name, where) for name in names for where in KNOWN_OTHER_USES.get((module_name, name), ())
            }
            self.assertEqual(outside - allowed, set(), module_name)


class InstallTests(SynchronousTestCase):
    """
    L{install_speedups} and L{uninstall_speedups}.
    """

    def setUp(self) -> None:
        restore_speedups(self)
        uninstall_speedups()

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

    def test_refuses_foreign_masker(self) -> None:
        """
        When Autobahn's protocol no longer uses its own masker factory,
        nothing is patched.
        """
        self.patch(ws_protocol, "create_xor_masker", lambda mask, length=None: None)
        self.assertFalse(install_speedups(enabled=True))
        self.assertFalse(speedups_installed())

    def test_refuses_foreign_names(self) -> None:
        """
        When a target is no longer Autobahn's helper, nothing is patched.
        """
        self.patch(ws_protocol, "hltype", lambda obj: "elsewhere")
        self.assertFalse(install_speedups(enabled=True))
        self.assertFalse(speedups_installed())


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
            _ADDRESS.sub("0x*", _VOLATILE.sub(r"\1*", eventAsText(e, includeTimestamp=False))) for e in events
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
        self.assertTrue(install_speedups(enabled=True))
        fast_frames, fast_log = self.run_session()

        self.assertEqual([f["type"] for f in fast_frames], ["welcome", "pong"])
        self.assertEqual(fast_frames, plain_frames)
        self.assertEqual(fast_log, plain_log)
        # The patched helpers did contribute to what was compared.
        self.assertTrue(any("WebSocketProtocol.sendData> sent" in t for t in fast_log))
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

        self.patch(ws_protocol.WebSocketProtocol, "sendData", spy)
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
        self.assertTrue(install_speedups(enabled=True))
        fast_frames, fast_bytes, fast_counters, fast_calls = self.run_session()

        self.assertEqual([f["type"] for f in fast_frames], ["welcome", "ack", "presence", "pong", "message"])
        self.assertEqual(fast_frames, plain_frames)
        self.assertEqual(fast_bytes, plain_bytes)
        self.assertEqual(fast_counters, plain_counters)
        self.assertTrue(plain_calls)
        self.assertEqual(fast_calls, [])

    def test_debug_logging_uses_autobahn(self) -> None:
        """
        When Autobahn's logger keeps debug events, or the speedups are off,
        C{sendData} is Autobahn's, so its debug event is logged.
        """
        restore_speedups(self)
        install_speedups(enabled=True)
        _, protocol, _ = self.open_token("alice")
        self.assertTrue(speedups.debug_skippable(protocol.log))
        level = txaio.get_global_log_level()
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, level)
        self.assertFalse(speedups.debug_skippable(protocol.log))
        txaio.set_global_log_level("info")
        uninstall_speedups()
        self.assertFalse(speedups.debug_skippable(protocol.log))
