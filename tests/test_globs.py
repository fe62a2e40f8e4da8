"""
Tests for L{meteredrt.globs}.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from meteredrt import globs
from meteredrt.globs import (
    MAX_WILDCARDS,
    GlobTooComplex,
    WildcardIndex,
    compile_glob,
    covers,
    is_wildcard,
    matches,
    matches_any,
    pattern_error,
    uncovered,
)

# Pattern pieces over a small alphabet, so that random patterns and channels collide often.
_PIECES = ["a", "b", "/", "*", "**", "\\*", "\\\\"]
patterns = st.lists(st.sampled_from(_PIECES), max_size=6).map("".join)
short_patterns = st.lists(st.sampled_from(_PIECES), max_size=4).map("".join)
# "c" stands for a character no pattern names.
channels = st.text(alphabet="ab/*\\c", max_size=8)
# Patterns whose wildcard segments start with literal runs of several lengths ("x-*", "x-a*",
# "a/x*"), and channels that share or miss those leads.
_LEAD_PIECES = ["x", "-", "a", "/", "*", "**", "\\*", "x-", "x-a"]
lead_patterns = st.lists(st.sampled_from(_LEAD_PIECES), max_size=6).map("".join)
lead_channels = st.lists(st.sampled_from(["x", "-", "a", "/", "c", "x-", "x-a", "*"]), max_size=6).map("".join)
# Patterns with exactly MAX_WILDCARDS wildcards: literal runs (possibly empty only at the ends, so
# that stars never merge into fewer wildcards) between single and double stars.
_literal_runs = st.text(alphabet="ab/", min_size=1, max_size=3)
capped_patterns = st.tuples(
    st.text(alphabet="ab/", max_size=3),
    st.lists(st.tuples(st.sampled_from(["*", "**"]), _literal_runs), min_size=MAX_WILDCARDS, max_size=MAX_WILDCARDS),
).map(lambda parts: parts[0] + "".join(star + run for star, run in parts[1]))

# The pattern from the security review that took seconds to check against ["room-*"].
_REVIEW_PATTERN = (
    "room-**FOf***T*wkw*qM**G**R*w*Jg6QRmy*5znox**EVw*OBPk**-H*K*p*uEQh*WKu**jb0*P:*E*_**G4*d*LL*:*T*EA*c2YI*:*t"
)


@contextmanager
def _counting_work() -> Iterator[list[int]]:
    """
    Count, while the block runs, the work of every automaton step as L{uncovered} charges it: one
    plus the size of the state set the step starts from.

    @return: a one-element list holding the running total.
    """
    total = [0]
    step = globs._Glob.step

    def counting(self: globs._Glob, states: frozenset[int], symbol: str | None) -> frozenset[int]:
        total[0] += len(states) + 1
        return step(self, states, symbol)

    globs._Glob.step = counting  # type: ignore[method-assign]
    try:
        yield total
    finally:
        globs._Glob.step = step  # type: ignore[method-assign]


def _brute_force(pairs: set[tuple[str, Hashable]], channel: str) -> set[Hashable]:
    """
    The subscribers an index holding C{pairs} should route C{channel} to, by testing every pair.
    """
    return {subscriber for pattern, subscriber in pairs if matches(pattern, channel)}


class SyntaxTests(SynchronousTestCase):
    """
    Tests for L{pattern_error} and L{is_wildcard}.
    """

    def test_valid(self) -> None:
        """
        Patterns using only the documented tokens are valid.
        """
        for pattern in ["", "a", "app_1/*", "**", "a\\*b", "a\\\\b", "***", "\\\\*"]:
            self.assertIsNone(pattern_error(pattern), pattern)

    def test_trailing_backslash(self) -> None:
        """
        A lone backslash at the end makes the pattern invalid.
        """
        self.assertEqual(pattern_error("a\\"), "trailing backslash")
        self.assertEqual(pattern_error("a\\\\\\"), "trailing backslash")

    def test_unknown_escape(self) -> None:
        """
        A backslash before anything but C{*} or C{\\} makes the pattern invalid, naming the escape.
        """
        self.assertEqual(pattern_error("a\\xb"), "'\\x' is not an escape; use \\\\ or \\*")
        self.assertEqual(pattern_error("a/\\/"), "'\\/' is not an escape; use \\\\ or \\*")

    def test_invalid_raises(self) -> None:
        """
        Compiling or matching an invalid pattern raises L{ValueError}.
        """
        self.assertRaises(ValueError, compile_glob, "a\\")
        self.assertRaises(ValueError, matches, "a\\b", "a\\b")
        self.assertRaises(ValueError, covers, "a*", ["a\\"])
        self.assertRaises(ValueError, WildcardIndex().add, "\\q*", 1)

    def test_wildcard_limit(self) -> None:
        """
        A pattern may hold at most MAX_WILDCARDS wildcards, a run of stars counting once and an
        escaped star not at all.
        """
        self.assertEqual(MAX_WILDCARDS, 8)
        for pattern in ["devices/*/events", "fleet/sensor-*/telemetry", "a/**", "tasks/**", "*/*/*/**"]:
            self.assertIsNone(pattern_error(pattern), pattern)
        self.assertIsNone(pattern_error("a*" * 8))
        self.assertIsNone(pattern_error("a***" * 8))
        self.assertIsNone(pattern_error("\\*" * 30 + "*"))
        self.assertEqual(pattern_error("a*" * 9), "at most 8 wildcards (runs of *) are allowed")
        self.assertEqual(pattern_error("*a" * 5 + "**b" * 4), "at most 8 wildcards (runs of *) are allowed")

    def test_review_pattern_refused(self) -> None:
        """
        The pattern that made an inclusion check take seconds is refused as invalid.
        """
        self.assertEqual(pattern_error(_REVIEW_PATTERN), "at most 8 wildcards (runs of *) are allowed")

    def test_is_wildcard(self) -> None:
        """
        A name is a wildcard exactly when it holds a C{*} that is not escaped.
        """
        self.assertTrue(is_wildcard("a/*"))
        self.assertTrue(is_wildcard("**"))
        self.assertTrue(is_wildcard("a\\\\*"))
        self.assertTrue(is_wildcard("\\**"))
        self.assertFalse(is_wildcard("a/b"))
        self.assertFalse(is_wildcard("a\\*"))
        self.assertFalse(is_wildcard("\\\\\\*"))
        self.assertFalse(is_wildcard(""))


class MatchesTests(SynchronousTestCase):
    """
    Tests for L{matches}, L{matches_any} and L{compile_glob}.
    """

    def test_spec_examples(self) -> None:
        """
        The example table of protocol §9.3 holds.
        """
        table = {
            "app_1/*": (True, False, False),
            "app_1/**": (True, True, False),
            "**": (True, True, True),
            "app_1/room-*": (True, False, False),
        }
        for pattern, expected in table.items():
            actual = tuple(matches(pattern, c) for c in ["app_1/room-9", "app_1/a/b", "zeta/x"])
            self.assertEqual(actual, expected, pattern)
        self.assertTrue(matches("room-*", "room-42"))
        self.assertFalse(matches("room-*", "admin-1"))

    def test_star_matches_empty_run(self) -> None:
        """
        C{*} and C{**} match the empty run.
        """
        self.assertTrue(matches("room-*", "room-"))
        self.assertTrue(matches("a/*/b", "a//b"))
        self.assertTrue(matches("a/**", "a/"))
        self.assertFalse(matches("a/**", "a"))

    def test_anchored(self) -> None:
        """
        Patterns must match the whole channel, not a part of it.
        """
        self.assertFalse(matches("room", "room-1"))
        self.assertFalse(matches("room", "my-room"))
        self.assertFalse(matches("a/*", "a/b/c"))

    def test_escapes(self) -> None:
        """
        C{\\*} matches only a literal star, and C{\\\\} only a literal backslash.
        """
        self.assertTrue(matches("a\\*", "a*"))
        self.assertFalse(matches("a\\*", "ab"))
        self.assertTrue(matches("a\\\\b", "a\\b"))
        self.assertFalse(matches("a\\\\b", "a\\\\b"))
        self.assertTrue(matches("a\\\\*", "a\\xyz"))

    def test_triple_star(self) -> None:
        """
        A run of three or more stars means C{**}.
        """
        self.assertTrue(matches("a/***", "a/b/c"))
        self.assertTrue(matches("****", ""))
        self.assertEqual(compile_glob("a/***").pattern, compile_glob("a/**").pattern)

    def test_regex_chars_are_literal(self) -> None:
        """
        Characters special to regular expressions match only themselves.
        """
        self.assertTrue(matches("a.b+[c]", "a.b+[c]"))
        self.assertFalse(matches("a.b", "axb"))
        self.assertTrue(matches("(x|y)/*", "(x|y)/z"))

    def test_case_sensitive(self) -> None:
        """
        Literal characters match case-sensitively.
        """
        self.assertFalse(matches("Room-*", "room-1"))
        self.assertTrue(matches("Room-*", "Room-1"))

    def test_non_ascii(self) -> None:
        """
        Non-ASCII channel names and patterns match character by character.
        """
        self.assertTrue(matches("salle/é*", "salle/été"))
        self.assertTrue(matches("频道/*", "频道/一"))
        self.assertFalse(matches("频道/*", "频道/一/二"))
        self.assertTrue(matches("**", "🎉/x"))

    def test_newline(self) -> None:
        """
        Wildcards match any character, even a line break.
        """
        self.assertTrue(matches("a*", "a\nb"))
        self.assertTrue(matches("**", "\n/\n"))

    def test_compile_glob_cached(self) -> None:
        """
        Compiling the same pattern twice returns the same object.
        """
        self.assertIs(compile_glob("x/*/y"), compile_glob("x/*/y"))
        self.assertTrue(compile_glob("x/*/y").fullmatch("x/1/y"))

    def test_many_wildcards_linear(self) -> None:
        """
        A pattern with many wildcards is matched without catastrophic backtracking.
        """
        pattern = "**a" * 20 + "**b"
        self.assertFalse(matches(pattern, "a" * 256))
        self.assertTrue(matches(pattern, "a" * 255 + "b"))
        self.assertTrue(matches("*a*a*a/**", "aaa/x"))
        self.assertFalse(matches("*a*a*a/**", "aa/a/x"))

    def test_matches_any(self) -> None:
        """
        L{matches_any} is true when at least one pattern matches.
        """
        self.assertTrue(matches_any(["x/*", "app_1/**"], "app_1/a/b"))
        self.assertFalse(matches_any(["x/*", "app_1/*"], "app_1/a/b"))
        self.assertFalse(matches_any([], "a"))

    @settings(max_examples=200, deadline=None)
    @given(patterns, channels)
    def test_automaton_agrees_with_regex(self, pattern: str, channel: str) -> None:
        """
        L{matches} agrees with the compiled regular expression.
        """
        expected = compile_glob(pattern).fullmatch(channel) is not None
        self.assertEqual(matches(pattern, channel), expected)


class CoversTests(SynchronousTestCase):
    """
    Tests for L{covers} and L{uncovered}.
    """

    def test_star_in_double_star(self) -> None:
        """
        C{a/*} is included in C{a/**}, not the other way round.
        """
        self.assertTrue(covers("a/*", ["a/**"]))
        self.assertFalse(covers("a/**", ["a/*"]))
        self.assertEqual(uncovered("a/**", ["a/*"]), "a//")

    def test_prefix_not_enough(self) -> None:
        """
        C{a/x*} and C{a/} together do not include C{a/*}.
        """
        self.assertFalse(covers("a/*", ["a/x*", "a/"]))
        witness = uncovered("a/*", ["a/x*", "a/"])
        assert witness is not None
        self.assertTrue(matches("a/*", witness))
        self.assertFalse(matches_any(["a/x*", "a/"], witness))

    def test_union_needed(self) -> None:
        """
        A pattern can be included in a union of patterns while in none of them alone.
        """
        self.assertTrue(covers("x/**", ["x/*", "x/*/**"]))
        self.assertFalse(covers("x/**", ["x/*"]))
        self.assertFalse(covers("x/**", ["x/*/**"]))
        self.assertTrue(covers("**", ["*", "*/**"]))
        self.assertTrue(covers("a**", ["a*", "a*/**"]))
        self.assertFalse(covers("a**", ["a*", "a*/*"]))

    def test_universal(self) -> None:
        """
        C{**} is included only in C{**}; everything is included in C{**}.
        """
        self.assertTrue(covers("**", ["**"]))
        self.assertTrue(covers("*", ["**"]))
        self.assertFalse(covers("**", ["*"]))
        self.assertTrue(covers("a/*/b\\*", ["**"]))

    def test_empty_allowed(self) -> None:
        """
        Nothing is included in an empty set of patterns.
        """
        self.assertFalse(covers("a/*", []))
        self.assertEqual(uncovered("a/*", []), "a/")

    def test_concrete(self) -> None:
        """
        A pattern without wildcards is included when its unescaped value is matched.
        """
        self.assertTrue(covers("a/b", ["a/*"]))
        self.assertFalse(covers("a/b", ["a/c"]))
        self.assertTrue(covers("a\\*", ["a\\*"]))
        self.assertFalse(covers("a\\*", ["a\\\\*"]))
        self.assertTrue(covers("a\\\\b", ["a\\\\*"]))

    def test_escaped_star_is_not_wildcard(self) -> None:
        """
        An escaped star in an allowed pattern only allows a literal star.
        """
        self.assertFalse(covers("a/*", ["a/\\*"]))
        self.assertTrue(covers("a/\\*", ["a/*"]))

    def test_segments(self) -> None:
        """
        C{*} never covers a C{/}, however the patterns are arranged.
        """
        self.assertTrue(covers("devices/*/events", ["devices/**"]))
        self.assertTrue(covers("devices/*/events", ["*/*/*"]))
        self.assertFalse(covers("devices/**/events", ["*/*/*"]))
        self.assertFalse(covers("fleet/sensor-*/telemetry", ["fleet/sensor-1*/**"]))

    def test_patterns_at_limit(self) -> None:
        """
        Patterns with as many wildcards as a valid pattern may hold are decided exactly.
        """
        self.assertTrue(covers("*a*b" * 4, ["*a*b" * 2, "**b"]))
        self.assertTrue(covers("**a**b" * 4, ["**a**b**"]))
        self.assertFalse(covers("*a*b" * 4, ["*a*b" * 5]))
        self.assertEqual(uncovered("*a*b" * 4, ["a/*/b/**", "a/**/c", "*/*/*", "**x**"]), "abababab")

    def test_work_budget_review_pattern(self) -> None:
        """
        Checking the review's pattern stops within the work budget and answers not included.
        """
        with _counting_work() as work:
            self.assertRaises(GlobTooComplex, uncovered, _REVIEW_PATTERN, ["room-*"])
        self.assertGreater(work[0], 0)
        self.assertLessEqual(work[0], globs._MAX_COVER_WORK)
        self.assertFalse(covers(_REVIEW_PATTERN, ["room-*"]))

    def test_work_budget_many_wildcards(self) -> None:
        """
        Long patterns far beyond the wildcard limit are cut off by the budget, not decided.
        """
        with _counting_work() as work:
            self.assertRaises(GlobTooComplex, uncovered, "*a*b" * 64, ["*a*b" * 30, "**b"])
        self.assertLessEqual(work[0], globs._MAX_COVER_WORK)
        self.assertFalse(covers("*a*b" * 64, ["a/*/b/**", "a/**/c", "*/*/*", "**x**"]))

    @settings(max_examples=200, deadline=None)
    @given(capped_patterns, st.lists(patterns, max_size=3), st.integers(0, 3000))
    def test_work_budget_respected(self, pattern: str, allowed: list[str], budget: int) -> None:
        """
        A search never does more work than its budget, and when it finishes within it the answer is
        the same as with an unlimited budget.
        """
        with _counting_work() as work:
            try:
                answer = uncovered(pattern, allowed, budget=budget)
            except GlobTooComplex:
                self.assertLessEqual(work[0], budget)
                return
        self.assertLessEqual(work[0], budget)
        self.assertEqual(answer, uncovered(pattern, allowed, budget=10**9))

    def test_budget_independent_of_caches(self) -> None:
        """
        The work charged for a check is the same whether the automata's step caches are cold or warm.
        """
        pattern, allowed = "r**F*f**T*w**q*G**R*A", ["r*", "r*/**F*"]
        globs._glob.cache_clear()
        with _counting_work() as cold:
            first = uncovered(pattern, allowed)
        with _counting_work() as warm:
            second = uncovered(pattern, allowed)
        self.assertEqual((first, cold[0]), (second, warm[0]))

    def test_unrelated_allowed_patterns_skipped(self) -> None:
        """
        Allowed patterns whose literal prefix or suffix rules out a common channel cost nothing.
        """
        allowed = [f"app_{i}/room-*/**" for i in range(2, 100)] + ["app_1/*/news", "app_1/room-*/**"]
        with _counting_work() as alone:
            self.assertIsNone(uncovered("app_1/room-*/chat/*x", ["app_1/room-*/**"]))
        with _counting_work() as many:
            self.assertIsNone(uncovered("app_1/room-*/chat/*x", allowed))
        self.assertEqual(many[0], alone[0])

    def test_covers_cached(self) -> None:
        """
        Checking the same pattern against the same allowed patterns again does no search.
        """
        self.assertFalse(covers(_REVIEW_PATTERN, ("room-*",)))
        with _counting_work() as work:
            self.assertFalse(covers(_REVIEW_PATTERN, ["room-*"]))
            self.assertFalse(covers(_REVIEW_PATTERN, ("room-*",)))
        self.assertEqual(work[0], 0)

    @settings(max_examples=200, deadline=None)
    @given(short_patterns, st.lists(short_patterns, max_size=3), st.lists(channels, max_size=20))
    def test_consistent_with_brute_force(
        self, pattern: str, allowed: list[str], samples: list[str]
    ) -> None:
        """
        L{covers} is true exactly when no channel matched by the pattern escapes the allowed ones.
        """
        if covers(pattern, allowed):
            for channel in samples:
                if matches(pattern, channel):
                    self.assertTrue(matches_any(allowed, channel), channel)
            for length in range(5):
                for chars in itertools.product("ab/*\\c", repeat=length):
                    channel = "".join(chars)
                    if matches(pattern, channel):
                        self.assertTrue(matches_any(allowed, channel), channel)
        else:
            witness = uncovered(pattern, allowed)
            assert witness is not None
            self.assertTrue(matches(pattern, witness))
            self.assertFalse(matches_any(allowed, witness))


class WildcardIndexTests(SynchronousTestCase):
    """
    Tests for L{WildcardIndex}.
    """

    def test_match(self) -> None:
        """
        A channel is routed to the subscribers whose patterns match it, and only to them.
        """
        index = WildcardIndex()
        index.add("devices/*/events", "alice")
        index.add("devices/**", "bob")
        index.add("fleet/sensor-*/telemetry", "carol")
        index.add("**", "dave")
        self.assertEqual(index.match("devices/d1/events"), {"alice", "bob", "dave"})
        self.assertEqual(index.match("fleet/sensor-7/telemetry"), {"carol", "dave"})
        self.assertEqual(index.match("fleet/truck-7/telemetry"), {"dave"})
        self.assertEqual(index.match("devices"), {"dave"})

    def test_escaped_prefix(self) -> None:
        """
        Escapes in a pattern's literal prefix are matched as the characters they stand for.
        """
        index = WildcardIndex()
        index.add("a\\*b/\\\\/*", 1)
        self.assertEqual(index.match("a*b/\\/x"), {1})
        self.assertEqual(index.match("a\\*b/\\/x"), set())

    def test_concrete_pattern(self) -> None:
        """
        A pattern without wildcards routes its one channel.
        """
        index = WildcardIndex()
        index.add("a/b", 1)
        self.assertEqual(index.match("a/b"), {1})
        self.assertEqual(index.match("a/b/c"), set())
        self.assertEqual(index.match("a"), set())

    def test_subscriber_once(self) -> None:
        """
        A subscriber with two matching patterns is returned once, with both patterns.
        """
        index = WildcardIndex()
        index.add("a/*", "alice")
        index.add("a/**", "alice")
        index.add("*/b", "alice")
        index.add("a/**", "bob")
        self.assertEqual(index.match("a/b"), {"alice", "bob"})
        found = index.subscribers_matching("a/b")
        self.assertEqual(sorted(found["alice"]), ["*/b", "a/*", "a/**"])
        self.assertEqual(found["bob"], ["a/**"])
        self.assertEqual(set(found), {"alice", "bob"})

    def test_len(self) -> None:
        """
        The length counts distinct (pattern, subscriber) pairs.
        """
        index = WildcardIndex()
        index.add("a/*", 1)
        index.add("a/*", 1)
        index.add("a/*", 2)
        index.add("b/*", 1)
        self.assertEqual(len(index), 3)
        index.remove("a/*", 1)
        self.assertEqual(len(index), 2)

    def test_subscriber_count(self) -> None:
        """
        L{WildcardIndex.subscriber_count} counts the subscribers of exactly one pattern.
        """
        index = WildcardIndex()
        index.add("a/*", 1)
        index.add("a/*", 2)
        index.add("a/**", 1)
        self.assertEqual(index.subscriber_count("a/*"), 2)
        self.assertEqual(index.subscriber_count("a/**"), 1)
        self.assertEqual(index.subscriber_count("a/b/*"), 0)
        index.remove("a/*", 1)
        index.remove("a/*", 2)
        self.assertEqual(index.subscriber_count("a/*"), 0)

    def test_remove(self) -> None:
        """
        A removed pair is no longer routed; other subscribers of the pattern still are.
        """
        index = WildcardIndex()
        index.add("a/*", 1)
        index.add("a/*", 2)
        index.remove("a/*", 1)
        self.assertEqual(index.match("a/x"), {2})

    def test_remove_absent(self) -> None:
        """
        Removing a pair that is not held changes nothing.
        """
        index = WildcardIndex()
        index.add("a/*", 1)
        index.remove("a/*", 2)
        index.remove("a/b/*", 1)
        index.remove("x/*", 1)
        index.remove("a\\", 1)
        self.assertEqual(len(index), 1)
        self.assertEqual(index.match("a/x"), {1})

    def test_prunes(self) -> None:
        """
        Removing the last pattern under a prefix removes the trie nodes that held it.
        """
        index = WildcardIndex()
        index.add("a/b/c/*", 1)
        index.add("a/*", 2)
        index.remove("a/b/c/*", 1)
        self.assertEqual(list(index._root.children), ["a"])
        self.assertEqual(index._root.children["a"].children, {})
        index.remove("a/*", 2)
        self.assertEqual(index._root.children, {})
        self.assertEqual(len(index), 0)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(capped_patterns, min_size=1, max_size=6), st.lists(channels, max_size=20), st.data())
    def test_patterns_at_limit(self, held: list[str], samples: list[str], data: st.DataObject) -> None:
        """
        Patterns with as many wildcards as a valid pattern may hold are routed as their regular
        expressions match, including channels built to match them.
        """
        index: WildcardIndex[str] = WildcardIndex()
        for pattern in held:
            self.assertIsNone(pattern_error(pattern))
            index.add(pattern, pattern)
        # A channel matching a held pattern: its literals, with a short filler for each wildcard.
        chosen = data.draw(st.sampled_from(held))
        filler = data.draw(st.sampled_from(["", "a", "ab", "ba/"]))
        built = "".join(
            token if isinstance(token, str) else (filler.replace("/", "") if token == globs._STAR else filler)
            for token in globs._tokenize(chosen)
        )
        for channel in [*samples, built]:
            expected = {p for p in held if compile_glob(p).fullmatch(channel) is not None}
            self.assertEqual(index.match(channel), expected, channel)
        self.assertIn(chosen, index.match(built))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(lead_patterns, st.integers(0, 3)), max_size=12),
        st.lists(st.integers(0, 100), max_size=8),
        st.lists(lead_channels, min_size=1, max_size=10),
    )
    def test_leads_agree_with_brute_force(
        self,
        pairs: list[tuple[str, int]],
        removals: list[int],
        samples: list[str],
    ) -> None:
        """
        With patterns whose wildcard segments start with literal leads of several lengths, the
        index routes every channel as testing every pair would, before and after removals, and
        leaves no empty bucket behind.
        """
        index = WildcardIndex()
        for pattern, subscriber in pairs:
            index.add(pattern, subscriber)
        held: set[tuple[str, Hashable]] = set(pairs)
        for channel in samples:
            self.assertEqual(index.match(channel), _brute_force(held, channel), channel)
        for removal in removals:
            if pairs:
                pattern, subscriber = pairs[removal % len(pairs)]
                index.remove(pattern, subscriber)
                held.discard((pattern, subscriber))
                self.assertEqual(index.subscriber_count(pattern), sum(p == pattern for p, _ in held))
        self.assertEqual(len(index), len(held))
        for channel in samples:
            self.assertEqual(index.match(channel), _brute_force(held, channel), channel)
        nodes = [index._root]
        while nodes:
            node = nodes.pop()
            self.assertNotIn({}, list(node.leads.values()))
            lengths: dict[int, int] = {}
            for lead in node.leads:
                lengths[len(lead)] = lengths.get(len(lead), 0) + 1
            self.assertEqual(node.lead_lengths, lengths)
            nodes.extend(node.children.values())

    def test_non_matching_patterns_not_tested(self) -> None:
        """
        A publish tests the same patterns whether 0 or 1,000 non-matching ones are held, with or
        without C{/}, sharing the channel's first characters or not.
        """
        tested: list[str] = []
        match = globs._Glob.match

        def counting(self: globs._Glob, channel: str) -> bool:
            tested.append(channel)
            return match(self, channel)

        globs._Glob.match = counting  # type: ignore[method-assign]
        try:
            counts = []
            for noise in (0, 1000):
                index: WildcardIndex[str] = WildcardIndex()
                index.add("bench.y-*", "hit")
                index.add("bench/y/*", "hit")
                for n in range(noise):
                    for pattern in (f"bench.x-{n}-*", f"bench/x-{n}/*", f"bench.{n}*", f"bench/y/{n}x*"):
                        index.add(pattern, pattern)
                tested.clear()
                self.assertEqual(index.match("bench.y-7"), {"hit"})
                self.assertEqual(index.match("bench/y/7"), {"hit"})
                counts.append(len(tested))
        finally:
            globs._Glob.match = match  # type: ignore[method-assign]
        self.assertEqual(counts, [2, 2])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(patterns, st.integers(0, 3)), max_size=12),
        st.lists(st.integers(0, 100), max_size=8),
        st.lists(channels, min_size=1, max_size=10),
    )
    def test_agrees_with_brute_force(
        self,
        pairs: list[tuple[str, int]],
        removals: list[int],
        samples: list[str],
    ) -> None:
        """
        The index routes every channel as testing every pair would, before and after removals.
        """
        index = WildcardIndex()
        for pattern, subscriber in pairs:
            index.add(pattern, subscriber)
        held: set[tuple[str, Hashable]] = set(pairs)
        self.assertEqual(len(index), len(held))
        for channel in samples:
            self.assertEqual(index.match(channel), _brute_force(held, channel))

        for removal in removals:
            if pairs:
                pattern, subscriber = pairs[removal % len(pairs)]
                index.remove(pattern, subscriber)
                held.discard((pattern, subscriber))
        self.assertEqual(len(index), len(held))
        for channel in samples:
            self.assertEqual(index.match(channel), _brute_force(held, channel))
            expected: dict[Hashable, list[str]] = {}
            for pattern, subscriber in sorted(held):
                if matches(pattern, channel):
                    expected.setdefault(subscriber, []).append(pattern)
            found = index.subscribers_matching(channel)
            self.assertEqual({k: sorted(v) for k, v in found.items()}, expected)
        if not held:
            self.assertEqual(index._root.children, {})
            self.assertEqual(index._root.leads, {})
            self.assertEqual(index._root.lead_lengths, {})
