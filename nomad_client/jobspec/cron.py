"""Cron expressions and time zones of periodic jobs, in Nomad's dialect, on ``croniter``.

Nomad (hashicorp/cronexpr) reads whitespace-separated fields: 5 fields are ``minute hour
day-of-month month day-of-week``; 6 add a ``year`` at the end (seconds are 0); 7 are
``second minute hour day-of-month month day-of-week year``; fields past the seventh are
ignored. The aliases ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` and
``@hourly`` are accepted; ``@every`` and ``@midnight`` are not. Times are computed in the
job's IANA time zone. The one home of this dialect: the jobspec validates with it and the
server's periodic launcher schedules with it. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
from croniter import CroniterBadDateError, CroniterError, croniter

DEFAULT_TIME_ZONE = "UTC"
ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"})
_MAX_FIELDS = 7
_MAX_SPEC_CHARS = 256


class CronError(ValueError):
    """A cron expression or time zone that cannot be used; the message says why, as Nomad's
    (``Invalid cron spec "x": ...``, ``Invalid time zone "x": ...``)."""


@attrs.frozen
class CronSpec:
    """One parsed expression: ``text`` as written, ``expression`` as croniter reads it
    (seconds first)."""

    text: str
    expression: str

    def next_after(self, after: float, zone: ZoneInfo) -> float | None:
        """The first launch strictly after ``after`` (unix seconds) in ``zone``; None when
        the expression has no later time (e.g. a year in the past)."""
        start = datetime.fromtimestamp(after, zone)
        try:
            found: datetime = croniter(self.expression, start,
                                       second_at_beginning=True).get_next(datetime)
        except CroniterBadDateError:
            return None
        return found.timestamp()


def parse_cron(text: str) -> CronSpec:
    """``text`` as a ``CronSpec``, or ``CronError``."""
    if not isinstance(text, str):
        raise CronError(f"Invalid cron spec {text!r}: must be a string")
    if len(text) > _MAX_SPEC_CHARS:
        raise CronError(f"Invalid cron spec: longer than {_MAX_SPEC_CHARS} characters")
    fields = text.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        if fields[0] not in ALIASES:
            raise CronError(f'Invalid cron spec "{text}": unknown alias {fields[0]!r}')
        expression = fields[0]
    elif len(fields) == 5:
        expression = " ".join(fields)
    elif len(fields) == 6:  # minute ... day-of-week year: seconds are 0
        expression = " ".join(["0", *fields])
    elif len(fields) >= _MAX_FIELDS:
        expression = " ".join(fields[:_MAX_FIELDS])
    else:
        raise CronError(f'Invalid cron spec "{text}": expected 5 to 7 fields, got '
                        f"{len(fields)}")
    try:
        croniter(expression, second_at_beginning=True)
    except (CroniterError, ValueError, KeyError, IndexError) as exc:
        raise CronError(f'Invalid cron spec "{text}": {exc}') from None
    return CronSpec(text=text, expression=expression)


def parse_time_zone(name: str | None) -> ZoneInfo:
    """The IANA zone ``name`` (``UTC`` when empty), or ``CronError``."""
    name = name or DEFAULT_TIME_ZONE
    if not isinstance(name, str) or "\x00" in name or name.startswith(("/", ".")) \
            or ".." in name.split("/"):
        raise CronError(f"Invalid time zone {name!r}: not an IANA time zone name")
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:
        raise CronError(f'Invalid time zone "{name}": unknown time zone {name}') from None
    except (ValueError, OSError) as exc:
        raise CronError(f'Invalid time zone "{name}": {exc}') from None


def next_launch(specs: Iterable[CronSpec], after: float, zone: ZoneInfo) -> float | None:
    """The earliest launch of any of ``specs`` strictly after ``after``; None if none has
    one."""
    times = [t for spec in specs if (t := spec.next_after(after, zone)) is not None]
    return min(times) if times else None
