"""Tests for compiling and running caller-supplied regular expressions (RE2, Go's syntax)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomad_client.untrusted_regex import (
    MAX_PATTERN_CHARS,
    UntrustedPattern,
    UntrustedRegexError,
    compile_untrusted,
)

UUID = "8f2c6b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"
LONG = 100_000
META_VALUE_MAX = 4096  # the default client.meta_limits.max_value_length

# Patterns that backtrack exponentially in a backtracking engine on the paired text; none match.
CATASTROPHIC = [
    ("(a+)+$", "a" * LONG + "!"),
    ("^(a|a)*$", "a" * LONG + "!"),
    (r"^(\w|\w)*$", "a" * LONG + "!"),
    ("(.*){1,1000}[bc]", "a" * LONG),
    ("^(.+)+!$", UUID * 1000),
    ("(x+x+)+y", "x" * LONG),
]


def elapsed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn``'s result (or the UntrustedRegexError it raised) and how long it took."""
    start = time.monotonic()
    try:
        result = fn(*args)
    except UntrustedRegexError as exc:
        result = exc
    return result, time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Ordinary use, read as Go's regexp reads it


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("^web-", "web-1", True),
        ("^web-", "db-1", False),
        ("in", "linux", True),  # unanchored search
        (r"worker-\d+\.local$", "worker-7.local", True),
        (r"^1\.[0-9]+$", "1.12", True),
        (r"^1\.[0-9]+$", "2.1", False),
        (r"^1\.[0-9]+$", "1.12\n", False),  # $ is the end of the text, as in Go
        ("(?i)linux", "Linux", True),
        ("(?i)LINUX", "linux", True),
        ("(?i)k", "\u212a", True),  # Kelvin sign: Unicode simple folding
        (r"\p{Greek}{3}", "xαβγ", True),
        (r"\pL", "é", True),
        ("[[:alpha:]]{2}", "ab", True),
        ("[[:alpha:]]{2}", "a]", False),
        (r"\d", "٣", False),  # ASCII digits only, as in Go
        (r"\w", "é", False),
        (".", "\n", False),
        ("(?s).", "\n", True),
        ("(?m)^b$", "a\nb\nc", True),
        (r"\Qa.b\E", "a.b", True),
        (r"\Qa.b\E", "axb", False),
        (r"[(]\)", "()", True),
        ("[]a]", "]", True),
        ("[^]a]", "]a", False),
        ("(?P<name>x)(?<other>y)", "xy", True),
        ("(?U)a+b", "aab", True),
        (r"\bword\b", "a word here", True),
        (r"a\z", "a", True),
        ("a{2,3}", "a", False),
        ("a{1000}", "a" * 1000, True),
        ("", "anything", True),
    ],
)
def test_search(pattern: str, text: str, expected: bool) -> None:
    compiled = compile_untrusted(pattern)
    assert isinstance(compiled, UntrustedPattern)
    assert compiled.pattern == pattern
    assert compiled.search(text) is expected


def test_compiled_patterns_are_cached() -> None:
    assert compile_untrusted("^cached-[0-9]+$") is compile_untrusted("^cached-[0-9]+$")


def test_lone_surrogates_read_as_the_replacement_character() -> None:
    # JSON allows "\ud800"; Go's decoder makes it U+FFFD, and a search never fails on it.
    assert compile_untrusted("^.$").search("\ud800") is True
    assert compile_untrusted("^\ufffd$").search("\udc80") is True
    assert compile_untrusted("\udc80").search("\ufffd") is True


# ---------------------------------------------------------------------------------------------
# No pattern runs away: RE2 searches in time linear in the text


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("pattern", "text"), CATASTROPHIC)
def test_catastrophic_backtracking_patterns_finish_fast(pattern: str, text: str) -> None:
    compiled = compile_untrusted(pattern)
    result, seconds = elapsed(compiled.search, text)
    assert result is False
    assert seconds < 1


@pytest.mark.timeout(10)
def test_the_reported_pattern_runs_fast_on_a_uuid() -> None:
    result, seconds = elapsed(compile_untrusted("^(.+)+!$").search, UUID)
    assert result is False
    assert seconds < 1


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        # Among the slowest searches found for a pattern RE2 accepts: its automaton keeps
        # missing its cache, so RE2 steps through every state for each byte.
        ("(?:x*y*){1000}z", "xy" * (META_VALUE_MAX // 2)),
        ("(?:a{1000}|b{1000}|c{1000})" * 3 + "x", "a" * META_VALUE_MAX),
        ("(?:[^!]*.){999}!", "aé€😀 1x" * (META_VALUE_MAX // 12)),
        (r"(?i)\pL{300}!", "a" * META_VALUE_MAX),
    ],
)
def test_the_slowest_patterns_are_still_quick_on_a_node_value(pattern: str, text: str) -> None:
    compiled, compile_seconds = elapsed(compile_untrusted, pattern)
    assert isinstance(compiled, UntrustedPattern) and compile_seconds < 2
    result, seconds = elapsed(compiled.search, text)
    assert result is False
    assert seconds < 2


# ---------------------------------------------------------------------------------------------
# Limits: the pattern length cap, and RE2's own (Go's repeat and size limits)


def test_pattern_length_is_capped() -> None:
    assert compile_untrusted("a" * MAX_PATTERN_CHARS).search("a" * MAX_PATTERN_CHARS)
    with pytest.raises(UntrustedRegexError, match=f"the limit is {MAX_PATTERN_CHARS}"):
        compile_untrusted("a" * (MAX_PATTERN_CHARS + 1))


@pytest.mark.parametrize(
    "pattern",
    ["a{1001}", "a{1,1001}", "(ab){1001,}",
     # Nested counts multiply, as in Go: more than 1000 copies of the innermost item.
     "(?:a{1000}){1000}", "(a{99}){99}", "(a{65}){65}(b{65}){65}", "((((a{9}){9}){9}){9}){9}"],
)  # fmt: skip
def test_repeat_counts_above_go_limit_are_refused(pattern: str) -> None:
    with pytest.raises(UntrustedRegexError, match="invalid repeat count"):
        compile_untrusted(pattern)


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        ("a{1000}", "a" * 1000),
        ("((a{10}){10}){10}", "a" * 1000),
        ("x{1000}y{1000}z{1000}", "x" * 1000 + "y" * 1000 + "z" * 1000),
        (r"^\d{10,1000}$", "7" * 10),
        (r"\{1000}", "{1000}"),  # escaped, classed braces are literal text
        ("[{]1000}", "{1000}"),
    ],
)
def test_repeat_counts_within_the_limit_are_accepted(pattern: str, text: str) -> None:
    compiled = compile_untrusted(pattern)
    assert compiled.search(text) is True
    assert compiled.search(text[1:]) is False


@pytest.mark.timeout(10)
@pytest.mark.parametrize("pattern", [r"\pL{1000}", r"(?:\pL|\pN|\pP){1000}", r"\PL{1000}"])
def test_programs_too_large_for_the_memory_budget_are_refused(pattern: str) -> None:
    result, seconds = elapsed(compile_untrusted, pattern)
    assert isinstance(result, UntrustedRegexError)
    assert "expression too large" in str(result)
    assert seconds < 2


# ---------------------------------------------------------------------------------------------
# What Go's syntax lacks is refused with a reason


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"(a)\1", "invalid escape sequence"),  # backreference
        ("(?P<n>a)(?P=n)", "invalid or unsupported Perl syntax"),
        ("a(?=b)", "invalid or unsupported Perl syntax"),  # lookahead
        ("a(?!b)", "invalid or unsupported Perl syntax"),
        ("(?<=a)b", "invalid or unsupported Perl syntax"),  # lookbehind
        ("(?<!a)b", "invalid or unsupported Perl syntax"),
        ("(?R)", "invalid or unsupported Perl syntax"),  # recursion
        ("(a)(?1)", "invalid or unsupported Perl syntax"),
        ("(?>a)", "invalid or unsupported Perl syntax"),  # atomic group
        ("(?(1)a|b)", "invalid or unsupported Perl syntax"),  # conditional
        ("(?#a comment)x", "invalid or unsupported Perl syntax"),
        ("(?x)a b", "invalid or unsupported Perl syntax"),  # verbose
        ("a++", "invalid nested repetition operator"),  # possessive
        (r"a\Z", "invalid escape sequence"),  # Go spells it \z
    ],
)
def test_perl_only_syntax_is_refused(pattern: str, message: str) -> None:
    with pytest.raises(UntrustedRegexError, match="invalid regular expression") as info:
        compile_untrusted(pattern)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(unclosed", 'missing closing ): "(unclosed"'),
        (")", "unexpected )"),
        ("[a", "missing closing ]"),
        ("[z-a]", 'invalid character class range: "z-a"'),
        ("a{2,1}", 'invalid repeat count: "{2,1}"'),
        ("*a", "missing argument to repetition operator"),
        ("a**", "invalid nested repetition operator"),
        ("\\", "trailing backslash at end of expression"),
        (r"\p{Nope}", "invalid character class range"),
        ("(?P<>a)", "invalid named capture"),
    ],
)
def test_invalid_patterns_raise_untrusted_regex_error(pattern: str, message: str) -> None:
    with pytest.raises(UntrustedRegexError, match="invalid regular expression") as info:
        compile_untrusted(pattern)
    assert isinstance(info.value, ValueError)
    assert message in str(info.value)


def test_messages_shorten_long_patterns() -> None:
    with pytest.raises(UntrustedRegexError) as info:
        compile_untrusted("(" + "a" * 500)
    assert "a" * 60 not in str(info.value)
    assert "..." in str(info.value)


def test_messages_are_encodable() -> None:
    with pytest.raises(UntrustedRegexError) as info:
        compile_untrusted("\ud800(")
    assert str(info.value).encode()


def test_non_string_pattern_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        compile_untrusted(b"abc")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Any input: only UntrustedRegexError, and quickly

_META = "a()[]{}0123456789,|*+?\\^$.:#-<>=!PpLQEzCx"


@settings(max_examples=400, deadline=None)
@given(st.text(st.sampled_from(_META), max_size=40), st.text("ab!\n\ud800", max_size=30))
def test_any_pattern_compiles_or_raises_untrusted_regex_error(pattern: str, text: str) -> None:
    start = time.monotonic()
    try:
        compiled = compile_untrusted(pattern)
        assert isinstance(compiled.search(text), bool)
    except UntrustedRegexError:
        pass
    assert time.monotonic() - start < 1
