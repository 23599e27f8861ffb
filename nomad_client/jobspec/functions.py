"""The small HCL function library available while parsing a jobspec.

Only pure string/collection helpers; file and network functions are absent on
purpose (the parse endpoint must not read the agent's disk). Functions that can
make a result much bigger than their arguments check its size before building
it (see ``limits``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nomad_client.jobspec.errors import type_name
from nomad_client.jobspec.limits import check_element_count, check_string_length
from nomad_client.jobspec.values import as_hcl_bool, as_hcl_string


class FunctionError(Exception):
    """A function was called with arguments it cannot accept."""


def _str(value: Any) -> str:
    as_string = as_hcl_string(value)
    if as_string is None:
        raise FunctionError(f"cannot convert {type_name(value)} to a string")
    return as_string


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
        raise FunctionError(f"expected a list, got {type_name(value)}")
    return value


def _map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FunctionError(f"expected a map, got {type_name(value)}")
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


def _join(sep: Any, items: Any) -> str:
    parts = [_str(i) for i in _list(items)]
    separator = _str(sep)
    check_string_length(sum(map(len, parts)) + len(separator) * max(len(parts) - 1, 0))
    return separator.join(parts)


def _split(sep: Any, s: Any) -> list[str]:
    text, separator = _str(s), _str(sep)
    if not separator:
        raise FunctionError("the separator must not be empty")
    check_element_count(text.count(separator) + 1)
    return text.split(separator)


def _replace(s: Any, old: Any, new: Any) -> str:
    text, before, after = _str(s), _str(old), _str(new)
    # An empty ``old`` matches between every pair of characters.
    matches = text.count(before) if before else len(text) + 1
    check_string_length(len(text) + matches * (len(after) - len(before)))
    return text.replace(before, after)


def _concat(*lists: Any) -> list[Any]:
    checked = [_list(lst) for lst in lists]
    check_element_count(sum(map(len, checked)))
    return [x for lst in checked for x in lst]


def _merge(*maps: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in maps:
        out.update(_map(m))
        # Checked as it grows: repeated keys may keep the result small.
        check_element_count(len(out), "map")
    return out


def _tobool(value: Any) -> bool:
    as_bool = as_hcl_bool(value)
    if as_bool is None:
        raise FunctionError(f"cannot convert {value!r} to a bool")
    return as_bool


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "upper": lambda s: _str(s).upper(),
    "lower": lambda s: _str(s).lower(),
    "trimspace": lambda s: _str(s).strip(),
    "join": _join,
    "split": _split,
    "replace": _replace,
    "concat": _concat,
    "contains": lambda items, v: v in _list(items),
    "length": _length,
    "lookup": _lookup,
    "merge": _merge,
    "coalesce": _coalesce,
    "tostring": _str,
    "tonumber": _number,
    "tobool": _tobool,
    "min": lambda *ns: min(_number(n) for n in ns),
    "max": lambda *ns: max(_number(n) for n in ns),
    "abs": lambda n: abs(_number(n)),
}
