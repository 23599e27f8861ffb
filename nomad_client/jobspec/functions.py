"""The small HCL function library available while parsing a jobspec.

Only pure string/collection helpers; file and network functions are absent on
purpose (the parse endpoint must not read the agent's disk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FunctionError(Exception):
    """A function was called with arguments it cannot accept."""


def _str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    raise FunctionError(f"cannot convert {type(value).__name__} to a string")


def _number(value: Any) -> int | float:
    if isinstance(value, bool):
        raise FunctionError("cannot convert a bool to a number")
    if isinstance(value, int | float):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise FunctionError(f"cannot convert {value!r} to a number") from None


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise FunctionError(f"expected a list, got {type(value).__name__}")
    return value


def _map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FunctionError(f"expected a map, got {type(value).__name__}")
    return value


def _length(value: Any) -> int:
    if isinstance(value, str | list | dict):
        return len(value)
    raise FunctionError("length() needs a string, list or map")


def _lookup(mapping: Any, key: Any, *default: Any) -> Any:
    m = _map(mapping)
    if key in m:
        return m[key]
    if default:
        return default[0]
    raise FunctionError(f"no key {key!r} and no default given")


def _coalesce(*values: Any) -> Any:
    for v in values:
        if v is not None and v != "":
            return v
    raise FunctionError("all arguments are null or empty")


def _tobool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise FunctionError(f"cannot convert {value!r} to a bool")


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "upper": lambda s: _str(s).upper(),
    "lower": lambda s: _str(s).lower(),
    "trimspace": lambda s: _str(s).strip(),
    "join": lambda sep, items: _str(sep).join(_str(i) for i in _list(items)),
    "split": lambda sep, s: _str(s).split(_str(sep)),
    "replace": lambda s, old, new: _str(s).replace(_str(old), _str(new)),
    "concat": lambda *lists: [x for lst in lists for x in _list(lst)],
    "contains": lambda items, v: v in _list(items),
    "length": _length,
    "lookup": _lookup,
    "merge": lambda *maps: {k: v for m in maps for k, v in _map(m).items()},
    "coalesce": _coalesce,
    "tostring": _str,
    "tonumber": _number,
    "tobool": _tobool,
    "min": lambda *ns: min(_number(n) for n in ns),
    "max": lambda *ns: max(_number(n) for n in ns),
    "abs": lambda n: abs(_number(n)),
}
