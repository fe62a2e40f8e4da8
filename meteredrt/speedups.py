"""
Take Autobahn's debug-log argument formatting off the hot path.

Autobahn builds the arguments of its debug log calls before the logger
decides whether to keep the event: C{hltype(self.sendData)} on every frame
sent, C{hltype(self.dataReceived)} on every read, and
C{pformat(<the ~30 protocol options>)} on every new connection (about 1 us,
1 us and 100 us here). The strings only ever end up in log events.

L{install_speedups} swaps those helpers, in the two Autobahn modules that
call them on the server path, for versions whose output is the same when it
is written and that cost next to nothing when it is not:

 - C{hltype} is memoised per function: the same string, computed once per
   call site instead of once per frame;
 - C{pformat} (in L{autobahn.websocket.protocol} only) returns a
   L{DeferredPformat} that runs the real C{pprint.pformat} only if an
   observer renders the event; the module's one other caller,
   C{Timings.__str__}, is wrapped so that it still returns a C{str}.

C{hlval} is left alone: without C{click} installed it is just C{f"{val}"}
(about 70 ns), and a cheaper replacement would change the type or the
colours of what is logged.

The per-frame debug calls that remain, in C{sendData} and the Twisted
adapter's C{dataReceived}, are skipped rather than patched:
L{meteredrt.ws.RealtimeServerProtocol.sendData} does Autobahn's plain write
and its C{dataReceived} hands the bytes on without them when
L{debug_skippable} says the logger would drop them (speedups installed,
Autobahn's logger not at C{debug}).

It also gives small masked frames (every client frame is masked) a cheaper
unmasker: Autobahn's C{create_xor_masker} builds a native (CFFI) masker per
frame, which costs more to set up (~5 us: a module import, two allocations
and a finalizer) than XOR-ing a frame of a few hundred bytes in Python.
L{SmallPayloadMasker} does that XOR on whole integers for frames shorter
than L{SMALL_PAYLOAD}; longer ones keep the native masker.

Nothing else changes: not the frames, not the text of a rendered log event.
That holds only for the Autobahn code the patch was written against, so
L{install_speedups} checks, once per process, what it relies on
(L{autobahn_problems}) and installs nothing, with one warning, when any of
it changed:

 - every replaced name is still Autobahn's helper, imported into the module
   that calls it;
 - the Autobahn functions whose behaviour is copied or wrapped (C{hltype}
   itself, C{WebSocketProtocol.sendData}, C{Timings.__str__}) have the
   code that was read (L{VERIFIED_FINGERPRINTS}: fingerprints that ignore
   formatting, docstrings and annotations);
 - every call of a replaced name in those modules builds an argument of a
   log call, apart from the uses accounted for (L{KNOWN_OTHER_USES}): a
   check of the modules' syntax trees, so releases that only add or move
   log calls keep the speedups.

Autobahn is therefore allowed a range of releases (C{setup.cfg}); one the
check refuses runs stock, and the warning says what to re-read.

Main entry points: L{install_speedups}, L{uninstall_speedups},
L{speedups_installed}.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import pprint
import textwrap
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import txaio.tx
from twisted.logger import Logger

# What txaio binds a disabled log level to; if a txaio release renames it,
# nothing is ever skippable (L{debug_skippable}) and Autobahn logs as usual.
_dropped_level: Any = getattr(txaio.tx, "_no_op", object())

#: The Autobahn functions whose behaviour the patch copies or wraps, by
#: L{code_fingerprint} of their code as read. C{sendData}'s plain path is
#: copied by L{meteredrt.ws.RealtimeServerProtocol.sendData} and
#: C{onMessageEnd} (without the signal to listeners it never has) by its
#: C{onMessageEnd}, the Twisted adapter's C{dataReceived} (without its debug
#: event) by its C{dataReceived}; C{hltype}'s
#: output must depend only on the function it names for memoising to be
#: right; C{Timings.__str__} is wrapped. Read in Autobahn 24.4.2 and
#: 26.10.2 (the same code in both). Add a fingerprint only after reading
#: the new code against those uses.
VERIFIED_FINGERPRINTS: dict[str, frozenset[str]] = {
    "autobahn.util.hltype": frozenset({"30a12302e8da2e3d"}),
    "autobahn.websocket.protocol.WebSocketProtocol.sendData": frozenset({"58eca4f77ba8709a"}),
    "autobahn.websocket.protocol.WebSocketProtocol.onMessageEnd": frozenset({"b2f322ad70766a26"}),
    "autobahn.twisted.websocket.WebSocketAdapterProtocol.dataReceived": frozenset({"05cb61cdb51d62c1"}),
    "autobahn.websocket.protocol.Timings.__str__": frozenset({"9e42a2647514fe13"}),
}

#: Log levels whose calls may take the patched helpers as arguments.
LOG_METHODS = frozenset({"trace", "debug", "info", "warn", "warning", "error", "critical", "failure"})

#: Uses of a patched name outside a log call that the patch accounts for,
#: as (module, name) -> enclosing "Class.function" names.
KNOWN_OTHER_USES: dict[tuple[str, str], frozenset[str]] = {
    ("autobahn.websocket.protocol", "pformat"): frozenset({"Timings.__str__"}),
}

#: Setting this environment variable to C{1} turns the speedups off, for
#: benchmarks that compare against the unpatched server.
DISABLE_VARIABLE = "METEREDRT_NO_SPEEDUPS"

#: The modules patched, and the names in each that are replaced.
TARGETS: dict[str, tuple[str, ...]] = {
    "autobahn.websocket.protocol": ("hltype", "pformat"),
    "autobahn.twisted.websocket": ("hltype",),
}

#: Where Autobahn creates a masker per frame, replaced by L{small_payload_maskers}.
MASKER_TARGET = ("autobahn.websocket.protocol", "create_xor_masker")

#: Frames shorter than this are unmasked by L{SmallPayloadMasker}.
SMALL_PAYLOAD = 1024

_log = Logger()

# (module, name) -> the original object, while installed.
_originals: dict[tuple[str, str], Any] = {}
# The Timings class whose __str__ was wrapped, and its original __str__.
_timings: tuple[type, Callable[[Any], Any]] | None = None


class DeferredPformat:
    """
    C{pprint.pformat(obj)}, computed only when formatted.

    Log events keep their arguments and observers render them with
    C{format()}, C{str()} or C{repr()}; all three give what the real
    C{pformat} string would have given.
    """

    __slots__ = ("_obj",)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self._obj), spec)

    def __str__(self) -> str:
        return pprint.pformat(self._obj)

    def __repr__(self) -> str:
        return repr(pprint.pformat(self._obj))


def deferred_pformat(obj: object, *args: Any, **kwargs: Any) -> Any:
    """
    Stand-in for C{pprint.pformat} in a module that only logs its result.
    """
    if args or kwargs:
        return pprint.pformat(obj, *args, **kwargs)
    return DeferredPformat(obj)


class SmallPayloadMasker:
    """
    Autobahn's XOR masker interface (C{pointer}, C{reset}, C{process}) for
    one frame, as one XOR of two big integers per chunk.

    C{process} may be called with the frame's payload in several chunks;
    the pointer keeps the mask aligned across them, as Autobahn's does.
    """

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes) -> None:
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self) -> int:
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        size = len(data)
        shift = self._ptr & 3
        self._ptr += size
        mask = self._mask[shift:] + self._mask[:shift] if shift else self._mask
        key = (mask * ((size >> 2) + 1))[:size]
        return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def small_payload_maskers(original: Callable[..., Any]) -> Callable[..., Any]:
    """
    Wrap Autobahn's C{create_xor_masker(mask, length=None)}: a frame known
    to be shorter than L{SMALL_PAYLOAD} gets a L{SmallPayloadMasker}, any
    other the original's masker.
    """

    def create_xor_masker(mask: bytes, length: int | None = None) -> Any:
        if length is not None and length < SMALL_PAYLOAD:
            return SmallPayloadMasker(mask)
        return original(mask, length)

    create_xor_masker.__wrapped__ = original  # type: ignore[attr-defined]
    return create_xor_masker


def memoised_hltype(original: Callable[[Any], str]) -> Callable[[Any], str]:
    """
    Wrap Autobahn's C{hltype} so that each function's highlighted name is
    computed once.

    C{hltype} of a function, class or bound method depends only on its
    module and qualified name, which a bound method takes from its
    C{__func__}; anything else is passed to the original every time.
    """
    cache: dict[Any, str] = {}

    def hltype(obj: Any) -> str:
        try:
            return cache[obj.__func__]
        except (AttributeError, KeyError, TypeError):
            pass
        text = original(obj)
        key = getattr(obj, "__func__", obj)
        if callable(key) and getattr(key, "__qualname__", None) is not None:
            try:
                cache[key] = text
            except TypeError:
                pass
        return text

    hltype.__wrapped__ = original  # type: ignore[attr-defined]
    return hltype


def code_fingerprint(function: Callable[..., Any]) -> str:
    """
    The first 16 hex digits of the SHA-256 of what a function does: its
    syntax tree without docstrings, type annotations or empty fields.

    Reformatting, quoting style, comments, docstrings and annotations leave
    it alone (Autobahn releases differ in those), and so does the Python
    version, unlike bytecode; any change to the code itself changes it.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return hashlib.sha256(_canonical(tree).encode()).hexdigest()[:16]


def _canonical(node: Any) -> str:
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    body = getattr(node, "body", None)
    fields = []
    for name, value in ast.iter_fields(node):
        if name in ("annotation", "returns", "type_comment", "type_params") or value is None or value == []:
            continue
        if name == "body" and _has_docstring(body):
            value = value[1:]
        fields.append(f"{name}={_canonical(value)}")
    return f"{type(node).__name__}({','.join(fields)})"


def _has_docstring(body: Any) -> bool:
    return (
        isinstance(body, list)
        and bool(body)
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )


def uses_outside_log_calls(source: str, names: tuple[str, ...]) -> set[tuple[str, str]]:
    """
    Every use of one of C{names} in a module's C{source} that is not part of
    the arguments of a C{<something>.log.<level>(...)} call, as
    C{(name, enclosing "Class.function")} pairs; a name passed around
    rather than called is reported with C{" (not called)"}.
    """
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


def module_source(module: ModuleType) -> str:
    """
    The source of a module, read from its file.
    """
    return inspect.getsource(module)


# (module name, source) -> the problems found in it: parsing Autobahn's
# protocol module takes a fifth of a second, and every makeService asks.
_call_site_verdicts: dict[tuple[str, str], list[str]] = {}


def _call_site_problems(module_name: str, source: str) -> list[str]:
    key = (module_name, source)
    if key not in _call_site_verdicts:
        names = TARGETS[module_name]
        allowed = {(name, where) for name in names for where in KNOWN_OTHER_USES.get((module_name, name), ())}
        _call_site_verdicts[key] = [
            f"{module_name} uses {name} outside a log call in {where}"
            for name, where in sorted(uses_outside_log_calls(source, names) - allowed)
        ]
    return _call_site_verdicts[key]


def autobahn_problems(modules: Mapping[str, ModuleType] | None = None) -> list[str]:
    """
    What differs, in the installed Autobahn, from the code the patch was
    written against (see the module docstring); empty if nothing does.
    """
    from autobahn import util

    modules = _import_targets() if modules is None else modules
    problems = []
    expected = {"hltype": util.hltype, "pformat": pprint.pformat}
    for module_name, names in TARGETS.items():
        module = modules[module_name]
        for name in names:
            current = getattr(module, name, None)
            if current is not expected[name]:
                problems.append(f"{module_name}.{name} is {current!r}, not {expected[name]!r}")
    module_name, name = MASKER_TARGET
    from autobahn.websocket import xormasker

    current = getattr(modules[module_name], name, None)
    if current is not xormasker.create_xor_masker:
        problems.append(f"{module_name}.{name} is {current!r}, not {xormasker.create_xor_masker!r}")
    protocol = modules["autobahn.websocket.protocol"]
    functions = {
        "autobahn.util.hltype": util.hltype,
        "autobahn.websocket.protocol.WebSocketProtocol.sendData": vars(
            getattr(protocol, "WebSocketProtocol", object)
        ).get("sendData"),
        "autobahn.websocket.protocol.WebSocketProtocol.onMessageEnd": vars(
            getattr(protocol, "WebSocketProtocol", object)
        ).get("onMessageEnd"),
        "autobahn.websocket.protocol.Timings.__str__": vars(getattr(protocol, "Timings", object)).get("__str__"),
        "autobahn.twisted.websocket.WebSocketAdapterProtocol.dataReceived": vars(
            getattr(modules["autobahn.twisted.websocket"], "WebSocketAdapterProtocol", object)
        ).get("dataReceived"),
    }
    for qualified, function in functions.items():
        if function is None:
            problems.append(f"{qualified} has moved")
            continue
        try:
            digest = code_fingerprint(function)
        except (OSError, TypeError):
            problems.append(f"{qualified} has no readable source")
            continue
        if digest not in VERIFIED_FINGERPRINTS[qualified]:
            problems.append(f"{qualified} changed (fingerprint {digest})")
    for module_name, module in modules.items():
        try:
            source = module_source(module)
        except (OSError, TypeError):
            problems.append(f"{module_name} has no readable source")
            continue
        problems.extend(_call_site_problems(module_name, source))
    return problems


def _import_targets() -> dict[str, ModuleType]:
    import autobahn.twisted.websocket
    import autobahn.websocket.protocol

    return {
        "autobahn.websocket.protocol": autobahn.websocket.protocol,
        "autobahn.twisted.websocket": autobahn.twisted.websocket,
    }


def install_speedups(enabled: bool | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """
    Patch Autobahn's debug-log helpers (see the module docstring). Safe to
    call more than once.

    @param enabled: C{False} removes the patch; C{None} means "on unless
        C{METEREDRT_NO_SPEEDUPS=1} is set in C{environ}".
    @param environ: defaults to C{os.environ}.
    @return: whether the patch is in place. When the installed Autobahn
        differs from the code the patch was checked against
        (L{autobahn_problems}), nothing is patched and one warning says
        why.
    """
    global _timings
    if enabled is None:
        env = os.environ if environ is None else environ
        enabled = env.get(DISABLE_VARIABLE, "") != "1"
    if not enabled:
        uninstall_speedups()
        return False
    if _originals:
        return True
    modules = _import_targets()
    problems = autobahn_problems(modules)
    if problems:
        import autobahn

        _log.warn(
            "Autobahn {version} differs from the code meteredrt's speedups were checked against, "
            "so stock Autobahn runs (correct, a little slower): {problems}",
            version=autobahn.__version__,
            problems="; ".join(problems),
        )
        return False
    timings: type = modules["autobahn.websocket.protocol"].Timings
    for module_name, names in TARGETS.items():
        module = modules[module_name]
        for name in names:
            original = getattr(module, name)
            _originals[(module_name, name)] = original
            setattr(module, name, memoised_hltype(original) if name == "hltype" else deferred_pformat)
    module_name, name = MASKER_TARGET
    original = getattr(modules[module_name], name)
    _originals[MASKER_TARGET] = original
    setattr(modules[module_name], name, small_payload_maskers(original))
    original_str = vars(timings)["__str__"]

    def timings_str(self: Any) -> str:
        # The original returns the module's pformat(...), now deferred.
        return str(original_str(self))

    # mypy reads this as rebinding the __str__ of the class object itself
    # (type's, taking no argument); it is the one Timings instances use.
    timings.__str__ = timings_str  # type: ignore[assignment]
    _timings = (timings, original_str)
    return True


def uninstall_speedups() -> None:
    """
    Put Autobahn's own helpers back.
    """
    global _timings
    modules = _import_targets() if _originals else {}
    for (module_name, name), original in _originals.items():
        setattr(modules[module_name], name, original)
    _originals.clear()
    if _timings is not None:
        timings, original_str = _timings
        timings.__str__ = original_str  # type: ignore[assignment]  # as in install_speedups
        _timings = None


def debug_skippable(log: Any) -> bool:
    """
    Whether a debug call on C{log}, Autobahn's txaio logger, may be left
    out: the speedups are installed and the logger drops debug events
    (txaio binds a disabled level to its no-op function; a logger switched
    to C{debug} at run time gets a real method and is answered C{False}).
    """
    return bool(_originals) and log.debug is _dropped_level


def speedups_installed() -> bool:
    """
    Whether L{install_speedups} has patched Autobahn.
    """
    return bool(_originals)
