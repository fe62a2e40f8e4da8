"""
Channel patterns: the glob syntax of protocol §9.3 and the routing of wildcard subscriptions.

Patterns appear in three places (§9.4): a key's C{channelPatterns}, a JWT's C{channels} claim, and
wildcard C{subscribe} frames.  This module answers the three questions those uses ask:

  - does a pattern match a concrete channel (L{matches}, L{matches_any}, L{compile_glob});
  - is every channel a pattern could match authorized by a set of patterns (L{covers},
    L{uncovered}), which decides whether a wildcard subscription is allowed (§9.4);
  - which wildcard subscribers does a publish to a concrete channel reach, without testing every
    pattern on the server (L{WildcardIndex}).

Syntax, anchored at both ends::

    *     any run of characters without "/", possibly empty
    **    any run of characters, "/" included
    \\*    a literal "*"
    \\\\    a literal "\\"
    other itself, case-sensitively

A backslash followed by anything else, or a trailing lone backslash, makes the pattern invalid
(L{pattern_error} says why): rejecting it leaves room to add escapes later without silently changing
what existing patterns match.  A run of two or more unescaped stars means C{**}: C{***} could also
be read as C{**} followed by C{*}, but that matches exactly the same strings, so the simplest rule
is also the exact one.

A valid pattern holds at most C{MAX_WILDCARDS} (8) wildcards, counting each run of stars once:
realistic patterns need one or two (C{devices/*/events}, C{fleet/sensor-*/telemetry}, C{a/**}), while
every wildcard multiplies the work of matching and of deciding inclusion.  Inclusion checks are
bounded anyway, by a work budget counted in automaton steps (C{_MAX_COVER_WORK}, a few milliseconds
of CPU); a check that would exceed it answers "not provably included".  This bound holds for
patterns that never went through L{pattern_error} too, such as keys stored before the limit existed.

Concrete channel names (in C{publish}, C{send}, REST) are never parsed as patterns: they are taken
literally, so a channel named C{a\\b} is fine even though C{a\\b} is not a valid pattern.

This is a pure module: it imports only the standard library.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Final, Generic, TypeVar

__all__ = [
    "is_wildcard",
    "pattern_error",
    "compile_glob",
    "matches",
    "matches_any",
    "covers",
    "uncovered",
    "GlobTooComplex",
    "MAX_WILDCARDS",
    "WildcardIndex",
]

# A token is a literal character (a 1-character str) or one of these two markers.
_STAR: Final = 1
_DSTAR: Final = 2
_Token = str | int

# The input symbol standing for every character that no pattern under consideration names
# literally (and that is not "/"): all such characters are indistinguishable to every automaton
# involved, so one symbol is enough to explore all of them.
_OTHER: Final = None
_Symbol = str | None

# A state of the inclusion search: the pattern's state set, and each allowed pattern's.
_CoverState = tuple[frozenset[int], tuple[frozenset[int], ...]]

# How many wildcards a pattern may hold and still be matched with the backtracking regex.
# Python's re backtracks: a pattern with k wildcards can cost O(n**k) steps on a channel of length
# n (measured: 4 wildcards against 250 characters took seconds).  Subscribers choose their own
# patterns, so beyond this limit matching uses the linear-time automaton instead.
_REGEX_MAX_WILDCARDS: Final = 2

# Bound on the transition cache of one pattern's lazily built automaton.
_MAX_CACHED_STEPS: Final = 4096

#: How many wildcards (runs of unescaped stars) a valid pattern may hold: see L{pattern_error}.
MAX_WILDCARDS: Final = 8

# Bound on the work of one L{uncovered} search, in automaton steps weighted by the size of the
# state set each step starts from (what an uncached step costs).  Realistic checks need a few
# hundred to a few thousand; measured at roughly 0.1-0.2 us a unit, the bound keeps an adversarial
# check to a few milliseconds.  Counting work rather than states matters: one state of the search
# costs a step per symbol of the alphabet in every automaton involved, and both grow with the
# patterns.  The count does not depend on what the step caches hold, so the answer for a given
# check is always the same.
_MAX_COVER_WORK: Final = 20_000

# How many L{covers} answers to remember.  The same wildcard subscribe is checked again on every
# reconnect; an entry holds a pattern and the tuple of allowed patterns (at most 100 of 256 bytes
# for a token's claim), so the worst case stays in the tens of megabytes.
_COVERS_CACHE_SIZE: Final = 1024


class GlobTooComplex(ValueError):
    """
    Deciding inclusion between these patterns would take more work than this server allows.

    Raised by L{uncovered}; L{covers} treats it as "not provably included", which the server
    rejects.
    """


def _tokenize(pattern: str) -> tuple[_Token, ...]:
    """
    Split a pattern into literal characters and wildcard markers.

    @raise ValueError: if the pattern is invalid; the message is the reason L{pattern_error}
        reports.
    """
    tokens: list[_Token] = []
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            if i + 1 == n:
                raise ValueError("trailing backslash")
            escaped = pattern[i + 1]
            if escaped != "*" and escaped != "\\":
                raise ValueError(f"'\\{escaped}' is not an escape; use \\\\ or \\*")
            tokens.append(escaped)
            i += 2
        elif ch == "*":
            j = i
            while j < n and pattern[j] == "*":
                j += 1
            tokens.append(_STAR if j - i == 1 else _DSTAR)
            i = j
        else:
            tokens.append(ch)
            i += 1
    return tuple(tokens)


def _to_regex(tokens: tuple[_Token, ...]) -> re.Pattern[str]:
    """
    Translate tokens into the regular expression of §9.3, for use with C{fullmatch}.
    """
    parts = []
    for token in tokens:
        if isinstance(token, str):
            parts.append(re.escape(token))
        elif token == _DSTAR:
            parts.append(".*")
        else:
            parts.append("[^/]*")
    return re.compile("".join(parts), re.DOTALL)


class _Glob:
    """
    One compiled pattern: its regex and a nondeterministic automaton, determinized lazily.

    The automaton's states are token positions: state C{i} means "the first C{i} tokens have
    matched the input so far"; state C{len(tokens)} accepts.  A wildcard token loops on its own
    state, and may be skipped without input because it can match the empty run.  Sets of states
    are frozensets so that they can key the transition cache, which turns repeated matching into a
    walk over a (partial) deterministic automaton: linear in the channel's length whatever the
    pattern, unlike a backtracking regex.
    """

    __slots__ = (
        "tokens",
        "regex",
        "alphabet",
        "start",
        "final",
        "universal",
        "prefix",
        "suffix",
        "_closures",
        "_steps",
        "_use_regex",
    )

    def __init__(self, pattern: str) -> None:
        tokens = _tokenize(pattern)
        self.tokens = tokens
        self.regex = _to_regex(tokens)
        self.final = len(tokens)
        # Characters this automaton tells apart; any other behaves like _OTHER.
        self.alphabet = frozenset(t for t in tokens if isinstance(t, str)) | {"/"}

        closures = []
        for i in range(len(tokens) + 1):
            j = i
            while j < len(tokens) and not isinstance(tokens[j], str):
                j += 1
            closures.append(frozenset(range(i, j + 1)))
        self._closures = closures
        self.start = closures[0]

        # States from which every remaining input is accepted: only wildcards left, one of them
        # "**".  Reaching one lets inclusion checks stop exploring early.
        universal = set()
        has_dstar = False
        for i in range(len(tokens) - 1, -1, -1):
            token = tokens[i]
            if isinstance(token, str):
                break
            has_dstar = has_dstar or token == _DSTAR
            if has_dstar:
                universal.add(i)
        self.universal = frozenset(universal)

        # The literal characters every matched channel starts and ends with.
        wildcard_at = [i for i, t in enumerate(tokens) if not isinstance(t, str)]
        first = wildcard_at[0] if wildcard_at else len(tokens)
        last = wildcard_at[-1] + 1 if wildcard_at else 0
        self.prefix = "".join(t for t in tokens[:first] if isinstance(t, str))
        self.suffix = "".join(t for t in tokens[last:] if isinstance(t, str))

        self._steps: dict[tuple[frozenset[int], _Symbol], frozenset[int]] = {}
        wildcards = sum(1 for t in tokens if not isinstance(t, str))
        self._use_regex = wildcards <= _REGEX_MAX_WILDCARDS

    def classify(self, ch: _Symbol) -> _Symbol:
        """
        Map a character to the symbol this automaton sees: itself if it is named, else C{_OTHER}.
        """
        return ch if ch in self.alphabet else _OTHER

    def step(self, states: frozenset[int], symbol: _Symbol) -> frozenset[int]:
        """
        The set of states reached from C{states} on one classified input symbol.
        """
        key = (states, symbol)
        cached = self._steps.get(key)
        if cached is not None:
            return cached
        reached: set[int] = set()
        tokens = self.tokens
        for i in states:
            if i == self.final:
                continue
            token = tokens[i]
            if isinstance(token, str):
                if token == symbol:
                    reached |= self._closures[i + 1]
            elif token == _DSTAR or symbol != "/":
                reached |= self._closures[i]
        result = frozenset(reached)
        if len(self._steps) >= _MAX_CACHED_STEPS:
            self._steps.clear()
        self._steps[key] = result
        return result

    def match(self, channel: str) -> bool:
        """
        Whether the whole of C{channel} matches this pattern.
        """
        if self._use_regex:
            return self.regex.fullmatch(channel) is not None
        states = self.start
        alphabet = self.alphabet
        steps = self._steps
        for ch in channel:
            symbol = ch if ch in alphabet else _OTHER
            reached = steps.get((states, symbol))
            if reached is None:
                reached = self.step(states, symbol)
            if not reached:
                return False
            states = reached
        return self.final in states

    def literal(self) -> str | None:
        """
        The one string this pattern matches if it has no wildcard, else C{None}.
        """
        if all(isinstance(t, str) for t in self.tokens):
            return "".join(t for t in self.tokens if isinstance(t, str))
        return None


@lru_cache(maxsize=4096)
def _glob(pattern: str) -> _Glob:
    """
    Compile a pattern once; the same few patterns are checked on every publish and subscribe.

    @raise ValueError: if the pattern is invalid.
    """
    return _Glob(pattern)


def is_wildcard(name: str) -> bool:
    """
    Whether C{name} contains an unescaped C{*}, i.e. is a pattern rather than a concrete name.

    Decides whether a C{subscribe} is a wildcard subscription (§9.4) and rejects C{*} where a
    concrete name is required (C{invalid_channel}).  It does not validate escapes: C{a\\x*} is a wildcard
    (and an invalid pattern).
    """
    if "*" not in name:
        return False
    i = 0
    n = len(name)
    while i < n:
        ch = name[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "*":
            return True
        i += 1
    return False


def pattern_error(pattern: str) -> str | None:
    """
    Explain why a pattern is invalid, so that configuration, JWT and subscribe errors can say so.

    Besides the syntax, a valid pattern holds at most L{MAX_WILDCARDS} wildcards: each one
    multiplies the work of matching the pattern on every publish and of checking it against a key's
    or a token's patterns on every subscribe.  The other functions of this module accept longer
    patterns (stored keys may predate the limit) and stay bounded without it.

    @return: C{None} if the pattern is valid, else a short human-readable reason.
    """
    try:
        tokens = _tokenize(pattern)
    except ValueError as e:
        return str(e)
    if sum(1 for t in tokens if not isinstance(t, str)) > MAX_WILDCARDS:
        return f"at most {MAX_WILDCARDS} wildcards (runs of *) are allowed"
    return None


def compile_glob(pattern: str) -> re.Pattern[str]:
    """
    Compile a pattern to the regular expression of §9.3; use it with C{fullmatch}.

    Compiled patterns are cached.  A backtracking regex can take time polynomial in the channel's
    length with degree the number of wildcards, so prefer L{matches}, which switches to a
    linear-time automaton for patterns with many wildcards.

    @raise ValueError: if the pattern is invalid.
    """
    return _glob(pattern).regex


def matches(pattern: str, channel: str) -> bool:
    """
    Whether a pattern matches a whole concrete channel name.

    @raise ValueError: if the pattern is invalid.
    """
    return _glob(pattern).match(channel)


def matches_any(patterns: Iterable[str], channel: str) -> bool:
    """
    Whether at least one of C{patterns} matches C{channel}: the authorization check for a concrete
    channel against a key's or a token's patterns.

    @raise ValueError: if a pattern tried before a match is found is invalid.
    """
    return any(_glob(pattern).match(channel) for pattern in patterns)


def _fresh_character(alphabet: Iterable[_Symbol]) -> str:
    """
    A printable character outside C{alphabet} and other than C{/}, to spell C{_OTHER} in examples.
    """
    taken = set(alphabet)
    cp = ord("0")
    while True:
        ch = chr(cp)
        if ch not in taken and ch != "/" and ch.isprintable():
            return ch
        cp += 1


def _compatible(target: _Glob, other: _Glob) -> bool:
    """
    Whether C{other} might match some channel C{target} matches, judging by literal ends only.

    Every channel a pattern matches starts with its literal prefix and ends with its literal
    suffix, so two patterns whose prefixes (or suffixes) disagree match no channel in common: such
    an allowed pattern cannot help to cover C{target}, and leaving it out of the search is exact.
    """
    return (target.prefix.startswith(other.prefix) or other.prefix.startswith(target.prefix)) and (
        target.suffix.endswith(other.suffix) or other.suffix.endswith(target.suffix)
    )


def uncovered(pattern: str, allowed: Sequence[str], *, budget: int = _MAX_COVER_WORK) -> str | None:
    """
    Find a channel name that C{pattern} matches but none of C{allowed} does.

    This decides inclusion of regular languages exactly (not by comparing pattern text): it
    explores, breadth first, the product of C{pattern}'s automaton with the union of the
    automata of C{allowed}, over an alphabet reduced to the characters named by any of the patterns,
    C{/}, and one symbol for every other character.  The first reachable state where C{pattern}
    accepts and no allowed pattern does spells a shortest counterexample.  A pattern with no
    wildcard is checked directly against its one string, and allowed patterns whose literal prefix
    or suffix rules out any common channel are left out of the search.

    The search is bounded by C{budget} units of work: expanding one state costs, for each symbol,
    one step of every automaton in the product, each weighted by one plus the size of the state set
    it starts from.  A state is expanded only if its whole cost fits in what is left, so the work
    done never exceeds C{budget}.

    To authorize against the intersection of two pattern sets (key and token), require
    inclusion in each.

    @param budget: the most work the search may do; the default is what this server allows.
    @return: a shortest counterexample, or C{None} if every channel C{pattern} matches is matched
        by some pattern in C{allowed}.
    @raise GlobTooComplex: if the search would need more than C{budget} units of work.
    @raise ValueError: if any pattern is invalid.
    """
    target = _glob(pattern)
    others = [_glob(p) for p in dict.fromkeys(allowed)]

    literal = target.literal()
    if literal is not None:
        return None if any(g.match(literal) for g in others) else literal

    others = [g for g in others if _compatible(target, g)]
    alphabet: set[str] = set(target.alphabet)
    for g in others:
        alphabet |= g.alphabet
    symbols: list[_Symbol] = [*sorted(alphabet), _OTHER]

    initial: _CoverState = (target.start, tuple(g.start for g in others))
    parents: dict[_CoverState, tuple[_CoverState, _Symbol] | None] = {initial: None}
    queue: deque[_CoverState] = deque([initial])
    spent = 0
    while queue:
        state = queue.popleft()
        mine, theirs = state
        if any(not g.universal.isdisjoint(s) for g, s in zip(others, theirs, strict=True)):
            # Some allowed pattern accepts every continuation from here.
            continue
        if target.final in mine and not any(g.final in s for g, s in zip(others, theirs, strict=True)):
            return _spell(state, parents, _fresh_character(alphabet))
        spent += len(symbols) * (len(mine) + 1 + sum(len(s) + 1 for s in theirs))
        if spent > budget:
            raise GlobTooComplex(f"checking {pattern!r} against {len(others)} patterns")
        for symbol in symbols:
            mine_next = target.step(mine, target.classify(symbol))
            if not mine_next:
                continue
            next_state: _CoverState = (
                mine_next,
                tuple(g.step(s, g.classify(symbol)) if s else s for g, s in zip(others, theirs, strict=True)),
            )
            if next_state in parents:
                continue
            parents[next_state] = (state, symbol)
            queue.append(next_state)
    return None


def _spell(
    state: _CoverState,
    parents: dict[_CoverState, tuple[_CoverState, _Symbol] | None],
    other: str,
) -> str:
    """
    Rebuild the input that led the breadth-first search of L{uncovered} to C{state}.
    """
    chars: list[str] = []
    link = parents[state]
    while link is not None:
        state, symbol = link
        chars.append(other if symbol is _OTHER else symbol)
        link = parents[state]
    return "".join(reversed(chars))


def covers(pattern: str, allowed: Sequence[str]) -> bool:
    """
    Whether every channel C{pattern} matches is matched by at least one of C{allowed}.

    This authorizes a wildcard subscription (§9.4).  It is exact language inclusion, so it sees
    that C{x/**} is covered by C{[x/*, x/*/**]} together although by neither alone.  If the check
    is too expensive (L{GlobTooComplex}) the answer is C{False}: what is not provably included is
    refused.

    Answers are cached, the expensive ones included, since a client repeats the same subscribes
    on every reconnect.

    @raise ValueError: if any pattern is invalid.
    """
    return _covers(pattern, tuple(allowed))


@lru_cache(maxsize=_COVERS_CACHE_SIZE)
def _covers(pattern: str, allowed: tuple[str, ...]) -> bool:
    """
    L{covers}, on a hashable tuple of allowed patterns so that answers can be cached.
    """
    try:
        return uncovered(pattern, allowed) is None
    except GlobTooComplex:
        return False


#: Whatever a L{WildcardIndex} routes to (the hub's sessions).
_S = TypeVar("_S", bound=Hashable)


class _Entry(Generic[_S]):
    """
    One distinct pattern in a L{WildcardIndex} node, with everyone subscribed to it.
    """

    __slots__ = ("match", "subscribers")

    def __init__(self, match: Callable[[str], bool]) -> None:
        self.match = match
        self.subscribers: set[_S] = set()


class _Node(Generic[_S]):
    """
    A L{WildcardIndex} trie node: the patterns whose literal C{/}-separated prefix ends here, by
    the literal start of their next segment, and deeper nodes.

    @ivar leads: the literal characters a pattern's first wildcard segment starts with (C{""} for
        C{*}, C{x-} for C{x-*}, C{""} for a pattern without wildcards) -> pattern -> entry.
    @ivar lead_lengths: the distinct lengths of the keys of C{leads}, each with how many keys have
        it: a channel segment is looked up once per distinct length, not once per pattern.
    """

    __slots__ = ("children", "leads", "lead_lengths")

    def __init__(self) -> None:
        self.children: dict[str, _Node[_S]] = {}
        self.leads: dict[str, dict[str, _Entry[_S]]] = {}
        self.lead_lengths: dict[int, int] = {}


def _placement(glob: _Glob) -> tuple[list[str], str]:
    """
    Where a pattern lives in a L{WildcardIndex}: the literal C{/}-separated segments it starts
    with, unescaped, and the literal start of the segment after them (its lead).

    Every channel the pattern matches starts with those segments, and its next segment starts
    with the lead (escapes and leads never span a C{/}): what lets L{WildcardIndex} skip patterns
    whose prefix or lead a channel does not share.  A pattern without wildcards keeps all its
    segments and an empty lead.
    """
    literal = glob.literal()
    if literal is not None:
        return literal.split("/"), ""
    *segments, lead = glob.prefix.split("/")
    return segments, lead


class WildcardIndex(Generic[_S]):
    """
    The wildcard subscriptions of a hub, indexed so that a publish does not test every pattern.

    Patterns live in a trie keyed by the C{/}-separated segments of their literal prefix (the
    segments before the first one holding an unescaped C{*}): C{fleet/sensor-*/telemetry} lives
    under C{fleet}, C{**} and C{bench.x-*} at the root.  Within a node they are bucketed by their
    lead, the literal characters their first wildcard segment starts with (C{sensor-},
    C{bench.x-}, C{""} for C{**}).  Routing a channel walks its segments down the trie; at each
    node it looks up the buckets whose lead begins the channel's next segment, one dictionary
    look-up per distinct lead length held there, and tests only the patterns in those buckets,
    once per distinct pattern however many subscribers share it.

    Complexity, for a channel of C{d} segments: L{match} costs C{O(d)} trie look-ups, plus per
    node one look-up per distinct lead length, plus one test (linear in the channel's length) per
    distinct pattern whose literal prefix and lead the channel shares.  Patterns a channel does not
    share a prefix and lead with cost nothing, whatever their number or shape; only patterns with
    an empty lead at a node on the path (C{*}, C{**}, C{a/*}) are tested on every publish that
    reaches it.  L{add} and L{remove} cost C{O(d)} for a pattern with C{d} prefix segments.
    Memory is one node per distinct prefix and one bucket per distinct lead; L{remove} prunes what
    it leaves empty, so it is bounded by what is currently subscribed.

    Patterns without wildcards are accepted too and match their one channel.
    """

    def __init__(self) -> None:
        self._root: _Node[_S] = _Node()
        self._size = 0

    def __len__(self) -> int:
        """
        The number of distinct (pattern, subscriber) pairs held.
        """
        return self._size

    def add(self, pattern: str, subscriber: _S) -> None:
        """
        Route channels matching C{pattern} to C{subscriber}; adding a pair twice keeps one.

        @raise ValueError: if the pattern is invalid, before anything is changed.
        """
        glob = _glob(pattern)
        segments, lead = _placement(glob)
        node = self._root
        for segment in segments:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Node()
            node = child
        bucket = node.leads.get(lead)
        if bucket is None:
            bucket = node.leads[lead] = {}
            node.lead_lengths[len(lead)] = node.lead_lengths.get(len(lead), 0) + 1
        entry = bucket.get(pattern)
        if entry is None:
            entry = bucket[pattern] = _Entry(glob.match)
        if subscriber not in entry.subscribers:
            entry.subscribers.add(subscriber)
            self._size += 1

    def _find(self, pattern: str) -> tuple[list[_Node[_S]], list[str], str] | None:
        """
        The trie path to C{pattern}'s node, its segments and its lead; C{None} if no node is there
        (an invalid pattern has none: L{add} refused it).
        """
        try:
            glob = _glob(pattern)
        except ValueError:
            return None
        segments, lead = _placement(glob)
        path = [self._root]
        for segment in segments:
            child = path[-1].children.get(segment)
            if child is None:
                return None
            path.append(child)
        return path, segments, lead

    def remove(self, pattern: str, subscriber: _S) -> None:
        """
        Stop routing C{pattern} to C{subscriber}; removing a pair that is not held does nothing.
        """
        found = self._find(pattern)
        if found is None:
            return
        path, segments, lead = found
        node = path[-1]
        bucket = node.leads.get(lead)
        entry = None if bucket is None else bucket.get(pattern)
        if bucket is None or entry is None or subscriber not in entry.subscribers:
            return
        entry.subscribers.remove(subscriber)
        self._size -= 1
        if entry.subscribers:
            return
        del bucket[pattern]
        if not bucket:
            del node.leads[lead]
            remaining = node.lead_lengths[len(lead)] - 1
            if remaining:
                node.lead_lengths[len(lead)] = remaining
            else:
                del node.lead_lengths[len(lead)]
        for depth in range(len(segments), 0, -1):
            child = path[depth]
            if child.leads or child.children:
                break
            del path[depth - 1].children[segments[depth - 1]]

    def subscriber_count(self, pattern: str) -> int:
        """
        How many subscribers hold exactly C{pattern}, so that a hub can watch a pattern on its
        broker when the first subscriber arrives and stop when the last one leaves.
        """
        found = self._find(pattern)
        if found is None:
            return 0
        path, _, lead = found
        entry = path[-1].leads.get(lead, {}).get(pattern)
        return 0 if entry is None else len(entry.subscribers)

    def _matching(self, channel: str) -> Iterator[tuple[str, _Entry[_S]]]:
        """
        Every distinct pattern held that matches C{channel}, with its entry.
        """
        segments = channel.split("/")
        node: _Node[_S] | None = self._root
        depth = 0
        while node is not None:
            # The channel's segment a lead at this node must begin; past the last segment only
            # patterns without wildcards (empty lead) can still match.
            segment = segments[depth] if depth < len(segments) else ""
            size = len(segment)
            leads = node.leads
            for length in node.lead_lengths:
                if length <= size:
                    bucket = leads.get(segment if length == size else segment[:length])
                    if bucket is not None:
                        for pattern, entry in bucket.items():
                            if entry.match(channel):
                                yield pattern, entry
            if depth == len(segments):
                break
            node = node.children.get(segments[depth])
            depth += 1

    def match(self, channel: str) -> set[_S]:
        """
        Everyone with at least one pattern matching C{channel}, each once: a publish is delivered
        at most once per connection (§9.4).
        """
        found: set[_S] = set()
        for _, entry in self._matching(channel):
            found |= entry.subscribers
        return found

    def subscribers_matching(self, channel: str) -> dict[_S, list[str]]:
        """
        Everyone with a pattern matching C{channel}, mapped to all of their matching patterns, so
        that per-subscription options (such as C{includeSenderMetadata}) can be combined.
        """
        found: dict[_S, list[str]] = {}
        for pattern, entry in self._matching(channel):
            for subscriber in entry.subscribers:
                found.setdefault(subscriber, []).append(pattern)
        return found
