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

The one per-frame debug call that remains, in C{sendData}, is skipped
rather than patched: L{meteredrt.ws.RealtimeServerProtocol.sendData} does
Autobahn's plain write without it when L{debug_skippable} says the logger
would drop it (speedups installed, Autobahn's logger not at C{debug}).

It also gives small masked frames (every client frame is masked) a cheaper
unmasker: Autobahn's C{create_xor_masker} builds a native (CFFI) masker per
frame, which costs more to set up (~5 us: a module import, two allocations
and a finalizer) than XOR-ing a frame of a few hundred bytes in Python.
L{SmallPayloadMasker} does that XOR on whole integers for frames shorter
than L{SMALL_PAYLOAD}; longer ones keep the native masker.

Nothing else changes: not the frames, not the text of a rendered log event.
The patch is checked against the Autobahn release it was written for
(L{VERIFIED_AUTOBAHN}); C{tests/test_speedups.py} fails when Autobahn is
upgraded, moves these names, or calls them anywhere but inside a log call,
so the call sites are re-read on every upgrade.

Main entry points: L{install_speedups}, L{uninstall_speedups},
L{speedups_installed}.
"""

from __future__ import annotations

import os
import pprint
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from twisted.logger import Logger
from txaio.tx import _no_op as _dropped_level

#: The Autobahn release whose call sites were read for this patch.
VERIFIED_AUTOBAHN = "26.10.2"

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


class SpeedupError(Exception):
    """
    The installed Autobahn does not look like the one the patch was written
    for: a name moved or is no longer the helper it replaces.
    """


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


def _check(modules: Mapping[str, ModuleType]) -> type:
    """
    Make sure every name to replace is still Autobahn's helper.

    @return: the C{Timings} class of L{autobahn.websocket.protocol}.
    @raise SpeedupError: naming what moved.
    """
    from autobahn import util

    expected = {"hltype": util.hltype, "pformat": pprint.pformat}
    for module_name, names in TARGETS.items():
        module = modules[module_name]
        for name in names:
            current = getattr(module, name, None)
            if current is not expected[name]:
                raise SpeedupError(f"{module_name}.{name} is {current!r}, not {expected[name]!r}")
    module_name, name = MASKER_TARGET
    from autobahn.websocket import xormasker

    current = getattr(modules[module_name], name, None)
    if current is not xormasker.create_xor_masker:
        raise SpeedupError(f"{module_name}.{name} is {current!r}, not {xormasker.create_xor_masker!r}")
    timings = getattr(modules["autobahn.websocket.protocol"], "Timings", None)
    if not isinstance(timings, type) or "__str__" not in vars(timings):
        raise SpeedupError("autobahn.websocket.protocol.Timings.__str__ has moved")
    return timings


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
    @return: whether the patch is in place. When Autobahn no longer has the
        expected names the server still starts, unpatched, with a warning;
        the tests fail in that case.
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
    try:
        timings = _check(modules)
    except SpeedupError as e:
        _log.warn("Autobahn speedups not installed: {problem}", problem=str(e))
        return False
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
