"""Node metadata rules: what a key may look like and how much dynamic metadata a node keeps.

The one home of both, shared by the agent config (``client { meta }``), the
``/v1/client/metadata`` endpoint and the client that stores dynamic metadata.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

__all__ = [
    "MetaLimitError",
    "MetaLimits",
    "check_meta_update",
    "is_meta_key",
    "meta_key_problem",
    "shown_key",
]

# One dot-separated part of a key: an HCL identifier. Always used with fullmatch: `$` would
# also accept a trailing newline.
_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_SHOWN_KEY_CHARS = 64  # keys echoed in error messages are cut to this


def is_meta_key(key: str) -> bool:
    """True when ``key`` is non-empty and every dot-separated part is an HCL identifier."""
    return bool(key) and all(_KEY_PART.fullmatch(part) for part in key.split("."))


def meta_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a metadata key (the message for the user), or None if it can."""
    if not key:
        return "metadata keys must not be empty"
    if not is_meta_key(key):
        return f"{shown_key(key)} is invalid; metadata keys must be valid dotted hcl identifiers"
    return None


def shown_key(key: str) -> str:
    """``key`` quoted for an error message; a huge key is cut short."""
    if len(key) > _SHOWN_KEY_CHARS:
        key = key[:_SHOWN_KEY_CHARS] + "..."
    return '"' + key.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _positive(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive whole number, not {value!r}")


@attrs.frozen
class MetaLimits:
    """Bounds on a node's dynamic metadata (``client { meta_limits { ... } }``).

    Lengths and sizes are UTF-8 bytes; the total counts every stored key and value.
    """

    max_keys: int = attrs.field(default=512, validator=_positive)
    max_key_length: int = attrs.field(default=128, validator=_positive)
    max_value_length: int = attrs.field(default=4096, validator=_positive)
    max_total_bytes: int = attrs.field(default=64 * 1024, validator=_positive)


class MetaLimitError(ValueError):
    """A metadata update would exceed a limit; str() names the limit's config key."""


def _bytes(text: str) -> int:
    # surrogatepass: measuring must never fail, whatever a caller managed to pass in.
    return len(text.encode("utf-8", "surrogatepass"))


def _total_bytes(meta: Mapping[str, str | None]) -> int:
    return sum(_bytes(key) + _bytes(value or "") for key, value in meta.items())


def _refuse(what: str, limit: int, setting: str) -> MetaLimitError:
    return MetaLimitError(f"{what}; the limit is {limit} (client.meta_limits.{setting})")


def check_meta_update(current: Mapping[str, str | None], changes: Mapping[str, str | None],
                      updated: Mapping[str, str | None], limits: MetaLimits) -> None:
    """Raise :class:`MetaLimitError` unless applying ``changes`` to the stored ``current``
    dynamic metadata, giving ``updated``, stays within ``limits``.

    Count and total size refuse only an update that grows them past the limit, so keys can
    always be removed from a node that holds more than (lowered) limits allow.
    """
    for key, value in changes.items():
        if value is None:
            continue
        if (size := _bytes(key)) > limits.max_key_length:
            raise _refuse(f"metadata key {shown_key(key)} is {size} bytes",
                          limits.max_key_length, "max_key_length")
        if (size := _bytes(value)) > limits.max_value_length:
            raise _refuse(f"metadata value for {shown_key(key)} is {size} bytes",
                          limits.max_value_length, "max_value_length")
    if len(updated) > limits.max_keys and len(updated) > len(current):
        raise _refuse(f"dynamic metadata would have {len(updated)} keys",
                      limits.max_keys, "max_keys")
    total = _total_bytes(updated)
    if total > limits.max_total_bytes and total > _total_bytes(current):
        raise _refuse(f"dynamic metadata would be {total} bytes",
                      limits.max_total_bytes, "max_total_bytes")
