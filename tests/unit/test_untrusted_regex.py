"""Tests for compiling and running caller-supplied regular expressions."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomad_client.untrusted_regex import (
    MATCH_TIMEOUT,
    MAX_EXPANSION,
    MAX_PATTERN_CHARS,
    MAX_REPEAT,
    UntrustedPattern,
    UntrustedRegexError,
    compile_untrusted,
)

UUID = "8f2c6b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"

# Patterns that backtrack exponentially on the paired text.
CATASTROPHIC = [
    ("^(a|a)*$", "a" * 30 + "!"),
    (r"^(\w|\w)*$", "a" * 30 + "!"),
    ("(.*){1,1000}[bc]", "a" * 30),
]


def elapsed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn``'s result (or the UntrustedRegexError it raised) and how long it took."""
    start = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except UntrustedRegexError as exc:
        result = exc
    return result, time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Ordinary use


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("^web-", "web-1", True),
        ("^web-", "db-1", False),
        ("in", "linux", True),  # unanchored search
        (r"worker-\d+\.local$", "worker-7.local", True),
        ("(?i)LINUX", "linux", True),
        (r"\p{Greek}{3}", "xαβγ", True),
        (r"[(]\)", "()", True),
        ("(?#a comment with ( in it)x", "x", True),
        ("a{2,3}", "a", False),
        ("", "anything", True),
    ],
)
def test_search(pattern: str, text: str, expected: bool) -> None:
    compiled = compile_untrusted(pattern)
    assert isinstance(compiled, UntrustedPattern)
    assert compiled.pattern == pattern
    assert compiled.timeout == MATCH_TIMEOUT
    assert compiled.search(text) is expected


def test_the_reported_pattern_runs_fast_on_a_uuid() -> None:
    result, seconds = elapsed(compile_untrusted("^(.+)+!$").search, UUID)
    assert result is False
    assert seconds < 1


# ---------------------------------------------------------------------------------------------
# Time limits


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("pattern", "text"), CATASTROPHIC)
def test_catastrophic_backtracking_times_out(pattern: str, text: str) -> None:
    result, seconds = elapsed(compile_untrusted(pattern).search, text)
    assert isinstance(result, UntrustedRegexError)
    assert isinstance(result, ValueError)
    assert "took longer than" in str(result)
    assert seconds < 1


def test_a_caller_can_shorten_but_not_lengthen_the_timeout() -> None:
    compiled = compile_untrusted(CATASTROPHIC[0][0], timeout=0.2)
    with pytest.raises(UntrustedRegexError, match="longer than 0.01s"):
        compiled.search(CATASTROPHIC[0][1], timeout=0.01)
    result, seconds = elapsed(compiled.search, CATASTROPHIC[0][1], timeout=60)
    assert isinstance(result, UntrustedRegexError)
    assert "longer than 0.2s" in str(result)
    assert seconds < 1


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        compile_untrusted("a", timeout=0)


# ---------------------------------------------------------------------------------------------
# Patterns refused before compiling


def test_pattern_length_is_capped() -> None:
    assert compile_untrusted("a" * MAX_PATTERN_CHARS).search("a" * MAX_PATTERN_CHARS)
    with pytest.raises(UntrustedRegexError, match=f"the limit is {MAX_PATTERN_CHARS}"):
        compile_untrusted("a" * (MAX_PATTERN_CHARS + 1))


@pytest.mark.parametrize(
    "pattern",
    ["a{4294967296}", "a{99999999999999999999999}", f"a{{{MAX_REPEAT + 1}}}",
     f"a{{1,{MAX_REPEAT + 1}}}", f"a{{,{MAX_REPEAT + 1}}}", f"(ab){{{MAX_REPEAT + 1},}}"],
)  # fmt: skip
def test_huge_repetition_counts_are_refused(pattern: str) -> None:
    with pytest.raises(UntrustedRegexError, match=f"exceeds {MAX_REPEAT}"):
        compile_untrusted(pattern)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "pattern",
    [
        # The engine unrolls these at compile time: gigabytes for a few characters.
        "(?:a{1000}){1000}",
        "(a{65}){65}(b{65}){65}(c{65}){65}",
        "((((a{9}){9}){9}){9}){9}",
        "(?:[ab]{2}|x){1000}" * 9,
        "a{1000}" * 11,
    ],
)
def test_repetitions_that_unroll_too_far_are_refused(pattern: str) -> None:
    result, seconds = elapsed(compile_untrusted, pattern)
    assert isinstance(result, UntrustedRegexError)
    assert f"more than {MAX_EXPANSION} elements" in str(result)
    assert seconds < 1


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        ("a{1000}", "a" * 1000),
        ("(a{99}){99}", "a" * 99 * 99),
        ("((a{10}){10}){10}", "a" * 1000),
        ("x{1000}y{1000}z{1000}", "x" * 1000 + "y" * 1000 + "z" * 1000),
        (r"^\d{10,1000}$", "7" * 10),
    ],
)
def test_moderate_repetitions_are_accepted(pattern: str, text: str) -> None:
    compiled = compile_untrusted(pattern)
    assert compiled.search(text) is True
    assert compiled.search(text[1:]) is False


@pytest.mark.parametrize(
    "pattern",
    # Escaped, classed and commented braces and parentheses are not structure.
    [r"\{1000}", "[{]1000}", r"[)(]{1000}", r"(?#)a{1000}", r"\p{L}{1000}", "[]{]{1000}"],
)
def test_scanner_reads_escapes_classes_and_comments(pattern: str) -> None:
    compile_untrusted(pattern)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "pattern",
    [
        # "\p{(" is no property, so the engine reads a literal "p{" and then a group.
        r"\p{(}(?:a{5}){1000}){1000}",
        r"\N{(}(?:a{5}){1000}){1000}",
        # "[:alpha:]" is one item of the class, so "(" and ")" are class members.
        "(?:(?:a{5}){1000}[[:alpha:](]){1000}[[:alpha:])]",
        "(?:(?:a{5}){1000}[[:^script=Greek:](]){1000}[[:alpha:])]",
        # A first "]" is a member, not the end of the class.
        "(?:(?:a{5}){1000}[](]){1000}[])]",
    ],
)
def test_structure_next_to_escapes_and_classes_is_counted(pattern: str) -> None:
    result, seconds = elapsed(compile_untrusted, pattern)
    assert isinstance(result, UntrustedRegexError)
    assert "too complex" in str(result)
    assert seconds < 1


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("[[:alpha:]]{2}", "ab", True),
        ("[[:alpha:]]{2}", "a]", False),
        ("[[:alpha:](]{2}", "a(", True),
        ("[]a]{2}", "]a", True),
        ("[^]a]", "]a", False),
        (r"\p{L}{3}", "xyz", True),
    ],
)
def test_classes_and_escapes_still_work(pattern: str, text: str, expected: bool) -> None:
    assert compile_untrusted(pattern).search(text) is expected


@pytest.mark.parametrize("pattern", ["(?x)a b", "(?x: a )", "(?ix)a", "(?-x)a", "(?V1)[[a]b]"])
def test_flags_that_change_how_the_pattern_reads_are_refused(pattern: str) -> None:
    # Verbose comments and V1 nested sets would hide structure from the size estimate.
    with pytest.raises(UntrustedRegexError, match="inline flag"):
        compile_untrusted(pattern)


@pytest.mark.parametrize(
    "pattern", ["(?R)", "a(?R)?b", "(a)(?1)", "(a)(?-1)", "(?P<n>a)(?&n)", "(?P<n>a)(?P>n)"]
)
def test_recursion_and_group_calls_are_refused(pattern: str) -> None:
    with pytest.raises(UntrustedRegexError, match="recursion"):
        compile_untrusted(pattern)


def test_similar_looking_groups_are_still_allowed() -> None:
    assert compile_untrusted("(?-i:A)(?P<n>b)(?P=n)(?(1)c|d)").search("Abbc")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(unclosed", "missing )"),
        ("[z-a]", "bad character range"),
        ("a{2,1}", "min repeat greater than max repeat"),
        ("*a", "nothing to repeat"),
        ("\\", "bad escape"),
        (r"\p{Nope}", "unknown property"),
    ],
)
def test_invalid_patterns_raise_untrusted_regex_error(pattern: str, message: str) -> None:
    with pytest.raises(UntrustedRegexError, match="invalid regular expression") as info:
        compile_untrusted(pattern)
    assert message in str(info.value)


def test_messages_shorten_long_patterns() -> None:
    with pytest.raises(UntrustedRegexError) as info:
        compile_untrusted("(" + "a" * 500)
    assert "a" * 60 not in str(info.value)
    assert "..." in str(info.value)


def test_non_string_pattern_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        compile_untrusted(b"abc")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Any input: only UntrustedRegexError, and quickly

_META = "a()[]{}0123456789,|*+?\\^$.:#-<>=!Pipe{}"


@settings(max_examples=400, deadline=None)
@given(st.text(st.sampled_from(_META), max_size=40), st.text("ab!", max_size=30))
def test_any_pattern_compiles_or_raises_untrusted_regex_error(pattern: str, text: str) -> None:
    start = time.monotonic()
    try:
        compiled = compile_untrusted(pattern)
        assert isinstance(compiled.search(text), bool)
    except UntrustedRegexError:
        pass
    assert time.monotonic() - start < 1
