"""HCL's implicit conversions between primitive values (to strings, and strings to bools),
and the marker for a value written as an expression where a literal was wanted.

The one home of these rules for the jobspec evaluator, decoder, variables and functions, and
for the agent config. Pure functions; touches nothing.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Expression:
    """A value that was written as an expression rather than a literal, kept as its source
    text (what plain-data HCL files such as the agent config get for ``var.x`` or ``f()``)."""

    text: str


def number_to_string(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def as_hcl_string(value: Any) -> str | None:
    """A primitive's HCL string form (``true``, ``3``, ``1.5``), or None for other types."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return number_to_string(value)
    return None


def as_hcl_bool(value: Any) -> bool | None:
    """A bool, or the string ``"true"``/``"false"`` as HCL converts it; None for other values.

    HCL's conversion, not Go's strconv.ParseBool (see ``nomad_client.goflags``): a jobspec
    says ``true``, never ``T`` or ``1``.
    """
    if isinstance(value, bool):
        return value
    if value == "true":
        return True
    if value == "false":
        return False
    return None
