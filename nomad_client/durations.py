"""Go-style duration strings ("1h2m3.5s", "250ms", "10us") to seconds.

Pure parsing; touches nothing. Shared by drivers, job specs and anything else that reads
durations the way Nomad writes them.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration"]

_UNIT_SECONDS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign, as Go accepts
    "μs": 1e-6,  # U+03BC Greek mu, as Go accepts
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

# One "<number><unit>" piece; longest units first so "ms" is not read as "m" + "s".
_PIECE = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` in seconds.

    Numbers are taken as seconds. Strings follow Go's ``time.ParseDuration``: an optional
    sign and one or more ``<decimal><unit>`` pieces; a bare ``"0"`` is allowed. Raises
    ``ValueError`` naming the offending text otherwise.
    """
    if isinstance(value, bool):  # bool is an int subclass; True seconds is surely a mistake
        raise ValueError(f"invalid duration {value!r}: expected a string or a number")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"invalid duration {value!r}: not a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: expected a string or a number")

    text = value.strip()
    sign = 1.0
    body = text
    if body[:1] in ("+", "-"):
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"invalid duration {value!r}: empty")

    total = 0.0
    pos = 0
    while pos < len(body):
        match = _PIECE.match(body, pos)
        if match is None:
            rest = body[pos:]
            if re.match(r"\d+\.?\d*$|\.\d+$", rest):
                raise ValueError(f"invalid duration {value!r}: missing unit after {rest!r}")
            raise ValueError(
                f"invalid duration {value!r}: unexpected {rest!r} (units are ns, us, ms, s, m, h)"
            )
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return sign * total
