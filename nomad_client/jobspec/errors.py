"""Error types raised by the jobspec package, and how values appear in their messages.

Pure value types: nothing here touches files, the network or the event loop.
"""

from __future__ import annotations

import reprlib
from typing import Any

import attrs

from nomad_client.jobspec.values import Expression


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = 60
        self.maxlist = self.maxdict = self.maxtuple = 6
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int with thousands of digits is slow or refused outright.
        if x.bit_length() > 256:
            return f"<a {x.bit_length()}-bit number>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def type_name(value: Any) -> str:
    """The HCL name of a value's type: the one way messages name a type (the agent config's
    too); an expression is named with its source text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, Expression):
        return f"expression {value.text}"
    return type(value).__name__


def short_repr(value: Any) -> str:
    """``repr(value)`` cut down for an error message: values from users may be huge."""
    try:
        return _SHORT.repr(value)
    except (ValueError, RecursionError):  # pragma: no cover - defensive
        return f"<a {type(value).__name__}>"


@attrs.define(auto_exc=True, eq=False)
class JobspecError(Exception):
    """A jobspec could not be parsed or decoded.

    ``line`` is 1-based and ``None`` when no source position is known (for
    example for a variable supplied on the command line).
    """

    filename: str
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.filename}: {self.message}"
        return f"{self.filename}:{self.line}: {self.message}"


@attrs.define(auto_exc=True, eq=False)
class JobValidationError(Exception):
    """A job (parsed or posted as JSON) failed validation after canonicalization.

    ``problems`` lists every problem found, so a user can fix them all at once.
    """

    message: str
    problems: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.message
