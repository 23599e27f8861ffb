r"""Regular expressions written by API callers: the one place such patterns are compiled and run.

Filter expressions (``matches``) and job constraints (``regexp``) carry patterns from whoever
calls the API; Nomad runs them with Go's ``regexp``. We run them with RE2 (``google-re2``), whose
syntax Go's follows and which never backtracks: a search takes time linear in the text, and a
compiled pattern keeps within RE2's memory budget (``max_mem``, 8 MiB by default). So a pattern
needs no vetting and a search no timeout. What is left here:

* a pattern may be at most :data:`MAX_PATTERN_CHARS` characters long;
* RE2 refuses the rest with a reason, worded as Go words it: counted repetitions above 1000
  (nested ones multiplied), a program too large for the budget, and what Go lacks too
  (backreferences, lookaround, ``(?#...)``, ``(?x)``, recursion, ``\Z``).

Read as in Go, not as in Python's ``re``: ``$`` matches only at the end of the text (not before
a final newline), ``\d``, ``\w``, ``\s`` and ``\b`` are ASCII, ``.`` does not match ``\n``
without ``(?s)``, and a lone surrogate (JSON allows ``"\ud800"``) reads as U+FFFD. RE2 is more
lenient than Go in three corners, each still linear: a repeat count too long to read
(``a{4294967296}``) is literal text, ``\C`` matches one byte, and group names may repeat.

This module is pure apart from caches of compiled patterns: its own (64) and the ``re2``
module's (128), each pattern within the memory budget above.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import attrs
import re2

__all__ = ["MAX_PATTERN_CHARS", "UntrustedPattern", "UntrustedRegexError", "compile_untrusted"]

MAX_PATTERN_CHARS = 1024

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print the caller's pattern to stderr
_OPTIONS.never_capture = True  # a search only answers yes or no: no group offsets to track

# RE2's reasons that Go words differently; the others read the same in both.
_GO_WORDING = {
    "missing ]": "missing closing ]",
    "missing )": "missing closing )",
    "trailing \\": "trailing backslash at end of expression",
    "no argument for repetition operator": "missing argument to repetition operator",
    "invalid repetition size": "invalid repeat count",
    "bad repetition operator": "invalid nested repetition operator",
    "invalid perl operator": "invalid or unsupported Perl syntax",
    "invalid named capture group": "invalid named capture",
    "pattern too large - compile failed": "expression too large",
}

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class UntrustedRegexError(ValueError):
    """The pattern is invalid or too large."""


def _shown(text: str) -> str:
    """``text`` quoted for an error message, shortened so a huge pattern cannot flood a log."""
    text = _LONE_SURROGATE.sub("\ufffd", text)  # and encodable by whatever writes the message
    return f'"{text}"' if len(text) <= 60 else f'"{text[:57]}..."'


def _utf8(text: str) -> bytes:
    """``text`` as RE2 reads it; a lone surrogate becomes U+FFFD, as Go's JSON decoder makes it."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode()


@attrs.frozen
class UntrustedPattern:
    """A compiled caller-supplied pattern; searching it takes time linear in the text."""

    pattern: str
    _compiled: Any = attrs.field(repr=False, eq=False)

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text`` (Go's ``MatchString``)."""
        # Bytes, not str: the binding would map every match offset back to characters.
        return self._compiled.search(_utf8(text)) is not None


def _reason(error: re2.error) -> str:
    """RE2's complaint in Go's words, with the offending piece of the pattern shortened."""
    raw = error.args[0] if error.args else b""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    code, _, piece = text.partition(": ")
    wording = _GO_WORDING.get(code, code)
    return f"{wording}: {_shown(piece)}" if piece else wording


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> UntrustedPattern:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UntrustedRegexError(
            f"regular expression is {len(pattern)} characters long; "
            f"the limit is {MAX_PATTERN_CHARS}"
        )
    try:
        compiled = re2.compile(_utf8(pattern), _OPTIONS)
    except re2.error as exc:
        raise UntrustedRegexError(
            f"invalid regular expression {_shown(pattern)}: {_reason(exc)}"
        ) from None
    return UntrustedPattern(pattern, compiled)


def compile_untrusted(pattern: str) -> UntrustedPattern:
    """Compile a caller-supplied pattern; raises :class:`UntrustedRegexError`."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, not {type(pattern).__name__}")
    return _compile(pattern)
