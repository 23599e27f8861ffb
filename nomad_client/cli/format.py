"""Text formatting for CLI output: aligned tables, key = value blocks, times, sizes, IDs.

Pure functions over plain values; nothing here performs I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

EMPTY = "<none>"
_FRACTION = re.compile(r"\.(\d+)")
SHORT_ID = 8


def short_id(value: str | None, verbose: bool = False) -> str:
    """IDs are shown by their first 8 characters unless verbose."""
    if not value:
        return ""
    return value if verbose else value[:SHORT_ID]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns padded to their widest cell and joined by two spaces; empty cells read
    ``<none>``; trailing whitespace trimmed."""
    body = [[_cell(c) or EMPTY for c in row] for row in rows]
    all_rows = [list(headers), *body]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in all_rows]
    return "\n".join(lines)


def kv(pairs: Sequence[tuple[str, Any]]) -> str:
    """``Key = value`` lines with the '=' aligned; empty values read ``<none>``."""
    if not pairs:
        return ""
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)} = {_cell(v) or EMPTY}" for k, v in pairs)


def format_time(dt: datetime | None) -> str:
    """RFC 3339 in local time, to the second (``2006-01-02T15:04:05+02:00``)."""
    if dt is None:
        return ""
    text = dt.astimezone().isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def from_unix_nanos(ns: Any) -> datetime | None:
    if not isinstance(ns, int) or ns <= 0:
        return None
    return datetime.fromtimestamp(ns / 1e9).astimezone()


def from_rfc3339(value: Any) -> datetime | None:
    """Parse Nomad's RFC 3339 strings (nanosecond fractions allowed); zero time → None."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    text = value.replace("Z", "+00:00")
    # Python accepts at most microseconds: cut longer fractions.
    m = _FRACTION.search(text)
    if m:
        text = text[:m.start()] + "." + m.group(1)[:6] + text[m.end():]
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def format_unix_nanos(ns: Any) -> str:
    return format_time(from_unix_nanos(ns))


def pretty_time_diff(ns: Any, now: float | None = None) -> str:
    """How long ago a unix-nanosecond time was, with the two largest units: ``2m13s ago``."""
    if not isinstance(ns, int) or ns <= 0:
        return ""
    seconds = int(round((now if now is not None else time.time()) - ns / 1e9))
    suffix = " ago" if seconds >= 0 else " from now"
    seconds = abs(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount or parts:
            parts.append(f"{amount}{unit}")
    significant = [p for p in parts[:2] if not p.startswith("0")] or ["0s"]
    return "".join(significant) + suffix


def ibytes(size: Any) -> str:
    """Binary-prefixed sizes: ``12 B``, ``4.0 KiB``, ``12 MiB``."""
    if not isinstance(size, int) or size < 0:
        return ""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")
