"""Size, depth and work limits that keep evaluating a jobspec cheap.

Jobspecs come from users (the parse endpoint takes them over HTTP), and a few
lines of expressions can grow values exponentially: locals are computed once
and may refer to each other, so thirty lines that each double a string make a
gigabyte. The evaluator measures every value it produces with a ``Meter`` and
stops with ``LimitError`` once one passes a limit; operations that can grow a
value a lot check the size of their result before building it.

Pure computation: no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

KIB = 1 << 10
MIB = 1 << 20

MAX_STRING_CHARS = MIB
MAX_ELEMENTS = 10_000
MAX_INT_BITS = 256
# Decimal digits in the largest literal worth converting (2**256 has 78).
MAX_INT_DIGITS = 80
# A value's size counts each string's characters and each element once per
# place it appears, so a list repeating one big string is as big as its copies
# would be (that is how it ends up in JSON).
MAX_VALUE_SIZE = 4 * MIB
MAX_VALUE_DEPTH = 32
# Blocks inside blocks (``job`` is level 1; driver config may nest more).
MAX_BLOCK_DEPTH = 32
# Expression nesting, counted across locals and heredocs; keeps the evaluator
# far below Python's recursion limit.
MAX_EXPR_DEPTH = 100
# Everything one parse may build, scan or return, in the units of a value's size.
MAX_WORK = 16 * MIB


class LimitError(Exception):
    """A value would pass one of the limits; the message says which."""


def _human(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    if n % KIB == 0:
        return f"{n // KIB} KiB"
    return str(n)


def check_string_length(length: int) -> None:
    """Raise if a string of ``length`` characters would be too long."""
    if length > MAX_STRING_CHARS:
        raise LimitError(
            f"string would be {length} characters long; the limit is "
            f"{_human(MAX_STRING_CHARS)} ({MAX_STRING_CHARS} characters)"
        )


def check_element_count(count: int, what: str = "list") -> None:
    """Raise if a list or map of ``count`` elements would be too long."""
    if count > MAX_ELEMENTS:
        raise LimitError(
            f"{what} would have {count} elements; the limit is {MAX_ELEMENTS} elements"
        )


def check_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise LimitError(f"number is larger than the limit of {MAX_INT_BITS} bits")


def check_int_literal(digits: str) -> None:
    """Raise before ``int()`` would work on a literal far beyond the limits."""
    if len(digits.lstrip("+-").lstrip("0")) > MAX_INT_DIGITS:
        raise LimitError(f"number is larger than the limit of {MAX_INT_BITS} bits")


def _scalar_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):
        return value.bit_length() // 3 + 1  # about its decimal digits
    return 24  # a float's repr


@attrs.define
class Meter:
    """Measures values and keeps the running totals of one parse.

    Sizes of lists and maps are remembered by identity (the meter holds the
    value, so the identity stays unique), so measuring a value that repeats a
    big part many times costs one step per repeat, not per character.
    """

    work: int = 0
    # Current expression nesting; the evaluator raises and lowers it.
    depth: int = 0
    _known: dict[int, tuple[Any, int, int]] = attrs.field(factory=dict)

    def charge(self, units: int) -> None:
        """Count ``units`` of work (characters or elements built, scanned or returned)."""
        self.work += units
        if self.work > MAX_WORK:
            raise LimitError(
                f"the jobspec builds or uses too much data (more than {_human(MAX_WORK)} "
                "in total, counting repeated values each time)"
            )

    def check(self, value: Any) -> None:
        """Raise if ``value`` passes a limit; charge the building of new lists and maps."""
        if isinstance(value, str):
            check_string_length(len(value))
        elif isinstance(value, bool):
            pass
        elif isinstance(value, int):
            check_int_bits(value.bit_length())
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise LimitError(f"number is out of range ({value})")
        elif isinstance(value, list | dict):
            if id(value) not in self._known:
                self.charge(max(len(value), 1))
            self.measure(value)

    def size(self, value: Any) -> int:
        """The size of ``value`` (see ``MAX_VALUE_SIZE``)."""
        return self.measure(value)[0]

    def measure(self, value: Any, level: int = 0) -> tuple[int, int]:
        """``(size, depth)`` of ``value``; raises if either passes its limit."""
        if not isinstance(value, list | dict):
            return _scalar_size(value), 0
        known = self._known.get(id(value))
        if known is not None:
            return known[1], known[2]
        if level >= MAX_VALUE_DEPTH:
            raise LimitError(f"value is nested more than {MAX_VALUE_DEPTH} levels deep")
        what = "list" if isinstance(value, list) else "map"
        check_element_count(len(value), what)
        size, depth = len(value), 0
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            item_size, item_depth = self.measure(item, level + 1)
            size += item_size + (len(key) if isinstance(key, str) else 0)
            depth = max(depth, item_depth)
            if size > MAX_VALUE_SIZE:
                raise LimitError(
                    f"{what} is larger than the limit of {_human(MAX_VALUE_SIZE)} "
                    "(counting repeated values each time)"
                )
        depth += 1
        if depth > MAX_VALUE_DEPTH:
            raise LimitError(f"value is nested more than {MAX_VALUE_DEPTH} levels deep")
        self._known[id(value)] = (value, size, depth)
        return size, depth
