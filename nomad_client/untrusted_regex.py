"""Regular expressions written by API callers: the one place such patterns are compiled and run.

Filter expressions (``matches``) and job constraints (``regexp``) carry patterns from whoever
calls the API. Python's ``re`` backtracks without limit, so a pattern such as ``^(.+)+!$``
can hold the event loop for minutes. Patterns here are run by the third-party ``regex``
engine with a per-search timeout, and are vetted before compiling because that engine unrolls
counted repetitions at compile time (``(?:a{1000}){1000}`` would allocate gigabytes):

* a pattern may be at most :data:`MAX_PATTERN_CHARS` characters long;
* a counted repetition may not exceed :data:`MAX_REPEAT` (the limit Go's RE2 syntax sets);
* the size of the pattern once counted repetitions are unrolled, estimated from above, may
  not exceed :data:`MAX_EXPANSION`;
* inline flags that change how the pattern is read (``x`` verbose, ``V0``/``V1`` versions)
  are refused, so the estimate above reads the pattern the way the engine does;
* recursion and group calls (``(?R)``, ``(?1)``, ``(?&name)``) are refused: they grow
  memory until the timeout. Go's RE2 has none of these.

This module is pure apart from a small cache of compiled patterns.
"""

from __future__ import annotations

import functools
import re
import string
from typing import Any

import attrs
import regex

__all__ = [
    "MATCH_TIMEOUT",
    "MAX_EXPANSION",
    "MAX_PATTERN_CHARS",
    "MAX_REPEAT",
    "UntrustedPattern",
    "UntrustedRegexError",
    "compile_untrusted",
]

MAX_PATTERN_CHARS = 1024
MAX_REPEAT = 1000
MAX_EXPANSION = 10_000
MATCH_TIMEOUT = 0.05  # seconds per search; long enough for any sane pattern on node data

# ``{m}``, ``{m,}``, ``{,n}``, ``{m,n}`` with ASCII digits: the forms the engine treats as a
# counted repetition (anything else in braces is literal text or a fuzzy-match constraint).
_COUNTED = re.compile(r"\{([0-9]*),?([0-9]*)\}")
# Flags that change the lexing of the rest of the pattern.
_LEXING_FLAGS = frozenset("xV")
_FLAG_CHARS = frozenset("abefilmprsuwxLV0123456789-^")
# After "(?": a recursive or subroutine call, ``(?R)``, ``(?1)``, ``(?-1)``, ``(?&name)``,
# ``(?P>name)``; these recurse without bound and grow memory until the timeout.
_CALL = re.compile(r"R|[0-9]|[+-][0-9]|&|P>")
# What the engine accepts in ``[:name:]`` and ``[:name=value:]`` inside a class.
_PROPERTY_NAME_CHARS = frozenset(string.ascii_letters + string.digits + " &_-.")
_PROPERTY_VALUE_CHARS = _PROPERTY_NAME_CHARS | {"/"}


class UntrustedRegexError(ValueError):
    """The pattern is invalid or too costly, or a search ran out of time."""


def _shown(pattern: str) -> str:
    """The pattern for an error message, shortened so a huge pattern cannot flood a log."""
    return f'"{pattern}"' if len(pattern) <= 60 else f'"{pattern[:57]}..."'


@attrs.frozen
class UntrustedPattern:
    """A vetted, compiled pattern whose searches give up after ``timeout`` seconds."""

    pattern: str
    timeout: float
    _compiled: Any = attrs.field(repr=False, eq=False)

    def search(self, text: str, *, timeout: float | None = None) -> bool:
        """Whether the pattern matches anywhere in ``text``; raises on running out of time.

        ``timeout`` may shorten (never lengthen) the pattern's own limit, for callers that
        share one allowance between several searches.
        """
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        try:
            return self._compiled.search(text, timeout=limit) is not None
        except TimeoutError:
            raise UntrustedRegexError(
                f"regular expression {_shown(self.pattern)} took longer than {limit:g}s to run"
            ) from None


def _skip_class(pattern: str, i: int) -> int:
    r"""Index just past the character class starting at ``pattern[i] == "["``.

    Mirrors how the engine (version 0) reads a class, since a misread end would hide or
    invent structure: a first item is never the end, so ``[]a]`` is one class; a
    backslash takes the next character (longer escapes such as ``\p{..}`` only continue with
    letters, digits and punctuation that are not structure); ``[:name:]`` is one item.
    """
    i += 1
    if pattern.startswith("^", i):
        i += 1
    first = True
    while i < len(pattern):
        ch = pattern[i]
        if ch == "]" and not first:
            return i + 1
        first = False
        if ch == "\\":
            i += 2
        elif pattern.startswith("[:", i) and (end := _posix_class_end(pattern, i)):
            i = end
        else:
            i += 1
    return i  # unterminated: the engine will reject it without unrolling anything


def _posix_class_end(pattern: str, i: int) -> int | None:
    """Index past ``[:name:]`` at ``i`` if the engine reads one there, else None.

    The engine takes ``[:``, an optional ``^``, a run of name characters, optionally ``:`` or
    ``=`` and a non-blank run of value characters, then requires ``:]``; otherwise the ``[``
    is a literal.
    """
    j = i + 2
    if pattern.startswith("^", j):
        j += 1
    while j < len(pattern) and pattern[j] in _PROPERTY_NAME_CHARS:
        j += 1
    if pattern[j : j + 1] in (":", "="):
        k = j + 1
        while k < len(pattern) and pattern[k] in _PROPERTY_VALUE_CHARS:
            k += 1
        if pattern[j + 1 : k].strip():
            j = k
    return j + 2 if pattern.startswith(":]", j) else None


def _repeat_bound(match: re.Match[str]) -> int:
    """The larger count of ``{m,n}`` (at least one); refuses counts above MAX_REPEAT."""
    bound = 1
    for digits in (match.group(1), match.group(2)):
        if len(digits) > len(str(MAX_REPEAT)) or (digits and int(digits) > MAX_REPEAT):
            raise UntrustedRegexError(f"repetition count {match.group()} exceeds {MAX_REPEAT}")
        if digits:
            bound = max(bound, int(digits))
    return bound


def _expansion(pattern: str) -> int:
    """An upper bound on the pattern's size once counted repetitions are unrolled.

    Every atom counts one; a group counts its contents plus one; ``{m,n}`` multiplies the
    item before it by ``max(m, n)``. Alternation is counted as a sequence, which only
    overestimates.
    """
    # Each frame: [size of the finished items, size of the last item (a quantifier's target)].
    stack: list[list[int]] = [[0, 0]]
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "{" and (counted := _COUNTED.match(pattern, i)):
            stack[-1][1] *= _repeat_bound(counted)
            i = counted.end()
        else:
            i = _step(pattern, i, stack)
        if sum(stack[-1]) > MAX_EXPANSION:
            break  # already too big; the caller only needs to know that
    return sum(sum(frame) for frame in stack)


def _step(pattern: str, i: int, stack: list[list[int]]) -> int:
    """Read the element at ``i`` (anything but a counted repetition) into ``stack``."""
    ch = pattern[i]
    if ch == "(":
        if pattern.startswith("(?#", i):
            return _skip_comment(pattern, i)
        _refuse_unsupported_group(pattern, i)
        stack.append([0, 0])
        return i + 1
    item = 1
    if ch == "\\":
        # The backslash and one character. Longer escapes (\p{Greek}, \N{SPACE}, \x41) go on
        # only with letters, digits and harmless punctuation, counted as literals: an
        # overestimate. Skipping to a "}" would be wrong where the engine falls back to a
        # literal "p" and reads "{(}" as structure.
        i += 2
    elif ch == "[":
        i = _skip_class(pattern, i)
    else:
        if ch == ")" and len(stack) > 1:  # an unmatched ')' is left to the engine to reject
            inner = stack.pop()
            item = inner[0] + inner[1] + 1
        i += 1
    frame = stack[-1]
    frame[0] += frame[1]
    frame[1] = item
    return i


def _skip_comment(pattern: str, i: int) -> int:
    """Index just past the ``(?#...)`` comment at ``i``; the engine honours escapes in it."""
    i += 3
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
        elif pattern[i] == ")":
            return i + 1
        else:
            i += 1
    return i


def _refuse_unsupported_group(pattern: str, i: int) -> None:
    """Reject flags that change lexing and recursive calls at ``pattern[i] == "("``."""
    if pattern[i + 1 : i + 2] != "?":
        return
    j = i + 2
    if _CALL.match(pattern, j):
        raise UntrustedRegexError(f"recursion and group calls (position {i}) are not supported")
    while j < len(pattern) and pattern[j] in _FLAG_CHARS:
        if pattern[j] in _LEXING_FLAGS:
            raise UntrustedRegexError(
                f"inline flag {pattern[j]!r} at position {j} is not supported"
            )
        j += 1


@functools.lru_cache(maxsize=64)
def _compile(pattern: str, timeout: float) -> UntrustedPattern:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UntrustedRegexError(
            f"regular expression is {len(pattern)} characters long; "
            f"the limit is {MAX_PATTERN_CHARS}"
        )
    if _expansion(pattern) > MAX_EXPANSION:
        raise UntrustedRegexError(
            f"regular expression {_shown(pattern)} is too complex: its repetitions "
            f"would unroll to more than {MAX_EXPANSION} elements"
        )
    try:
        compiled = regex.compile(pattern, regex.VERSION0)
    except (regex.error, re.error, ValueError, OverflowError, RecursionError) as exc:
        raise UntrustedRegexError(f"invalid regular expression {_shown(pattern)}: {exc}") from None
    return UntrustedPattern(pattern, timeout, compiled)


def compile_untrusted(pattern: str, *, timeout: float = MATCH_TIMEOUT) -> UntrustedPattern:
    """Vet and compile a caller-supplied pattern; raises :class:`UntrustedRegexError`."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, not {type(pattern).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    return _compile(pattern, timeout)
