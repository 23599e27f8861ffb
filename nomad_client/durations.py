"""Go-style duration strings ("1h2m3.5s", "250ms", "10us"): the one parser for them.

``parse_duration_ns`` is exact (integer nanoseconds, as job specs store durations);
``parse_duration`` gives float seconds for runtime use and also takes plain numbers as
seconds; ``format_duration`` renders nanoseconds the way Go prints a ``time.Duration``.
Pure functions; touches nothing.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

NANOSECOND = 1
MICROSECOND = 1_000
MILLISECOND = 1_000_000
SECOND = 1_000_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_UNITS: dict[str, int] = {
    "ns": NANOSECOND,
    "us": MICROSECOND,
    "\u00b5s": MICROSECOND,  # micro sign
    "\u03bcs": MICROSECOND,  # Greek mu; Go accepts both spellings
    "ms": MILLISECOND,
    "s": SECOND,
    "m": MINUTE,
    "h": HOUR,
}

_COMPONENT = re.compile(r"(\d+\.?\d*|\.\d+)([a-zA-Z\u00b5\u03bc]+)")


class DurationError(ValueError):
    """The text is not a valid duration; the message says why."""


def parse_duration_ns(text: str) -> int:
    """Parse a Go duration string into integer nanoseconds.

    Accepts an optional sign, then one or more ``<number><unit>`` components
    (units ns, us, µs, ms, s, m, h); a bare ``0`` is also accepted. Fractions
    are computed exactly and truncated toward zero, as Go does.
    """
    if not isinstance(text, str):
        raise DurationError(f'expected a duration string like "15s", got {text!r}')
    s = text
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise DurationError(f"invalid duration {text!r}")
    total = Fraction(0)
    pos = 0
    while pos < len(s):
        m = _COMPONENT.match(s, pos)
        if m is None:
            raise DurationError(f'invalid duration {text!r}: expected <number><unit> such as "15s"')
        number, unit = m.groups()
        if unit not in _UNITS:
            raise DurationError(
                f"invalid duration {text!r}: unknown unit {unit!r} (use ns, us, ms, s, m or h)"
            )
        total += Fraction(number) * _UNITS[unit]
        pos = m.end()
    return sign * int(total)


def _frac_digits(value: int, scale: int) -> str:
    """``value / scale`` rendered with trailing fractional zeros dropped."""
    whole, rest = divmod(value, scale)
    if rest == 0:
        return str(whole)
    width = len(str(scale)) - 1
    return f"{whole}.{str(rest).rjust(width, '0').rstrip('0')}"


def format_duration(ns: int) -> str:
    """Render nanoseconds the way Go's ``time.Duration.String`` does ("1h2m3.5s")."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    n = abs(ns)
    if n < MICROSECOND:
        return f"{sign}{n}ns"
    if n < MILLISECOND:
        return f"{sign}{_frac_digits(n, MICROSECOND)}\u00b5s"
    if n < SECOND:
        return f"{sign}{_frac_digits(n, MILLISECOND)}ms"
    hours, n = divmod(n, HOUR)
    minutes, n = divmod(n, MINUTE)
    out = sign
    if hours:
        out += f"{hours}h{minutes}m"
    elif minutes:
        out += f"{minutes}m"
    return out + f"{_frac_digits(n, SECOND)}s"


def parse_duration(value: str | int | float) -> float:
    """``value`` in seconds: numbers are taken as seconds, strings as Go durations."""
    if isinstance(value, bool):  # bool is an int subclass; True seconds is surely a mistake
        raise DurationError(f"invalid duration {value!r}: expected a string or a number")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise DurationError(f"invalid duration {value!r}: not a finite number")
        return float(value)
    if not isinstance(value, str):
        raise DurationError(f"invalid duration {value!r}: expected a string or a number")
    return parse_duration_ns(value.strip()) / SECOND
