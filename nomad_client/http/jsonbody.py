"""Decoding of JSON request bodies: the one edge where caller bytes become Python values.

Whatever passes here is safe for the rest of the agent to handle: UTF-8 text, nesting no
deeper than ``MAX_JSON_DEPTH`` (recursive code further on, and the JSON and msgpack encoders,
cannot be driven into a RecursionError) and strings without lone surrogates (which no encoder
can write out). Anything else is a :class:`BadJSONBody` with a plain reason.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "BadJSONBody", "decode_json_body"]

MAX_JSON_DEPTH = 64


class BadJSONBody(ValueError):
    """The body is not acceptable JSON; str() says why, for the caller."""


# A JSON string, escapes included (the unrolled form: linear, no backtracking).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Brackets become depth steps (+1 / -1 as signed bytes); every other byte is dropped.
_DEPTH_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_CHUNK = 64 * 1024


def decode_json_body(data: bytes) -> Any:
    """The decoded body, or :class:`BadJSONBody`."""
    try:
        text = data.decode("utf-8")  # strict: refuses encoded surrogates as well
    except UnicodeDecodeError as exc:
        raise BadJSONBody(f"Request body is not valid UTF-8 (at byte {exc.start})") from None
    if _nested_deeper_than(data, MAX_JSON_DEPTH):
        raise BadJSONBody(f"Request body is nested too deeply (limit {MAX_JSON_DEPTH} levels)")
    try:
        value = json.loads(text)
    except RecursionError:  # a safety net: the depth screen refuses such bodies first
        raise BadJSONBody(
            f"Request body is nested too deeply (limit {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:
        raise BadJSONBody(f"Failed to decode request body: {exc}") from None
    # Once the text is strict UTF-8, a lone surrogate can only come from a \u escape.
    if "\\u" in text and _has_lone_surrogate(value):
        raise BadJSONBody("Request body has a string with an unpaired UTF-16 surrogate escape")
    return value


def _nested_deeper_than(data: bytes, limit: int) -> bool:
    """Whether brackets outside JSON strings nest deeper than ``limit``, before parsing.

    Runs in C-level loops (a body can be megabytes). Only a valid document is judged
    exactly; json.loads refuses any other afterwards, if this does not first.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case: too few brackets to nest that deep
    brackets = _JSON_STRING.sub(b"", data).translate(_DEPTH_STEPS, _NOT_BRACKETS)
    steps = memoryview(brackets).cast("b")
    depth = 0
    for start in range(0, len(steps), _DEPTH_CHUNK):
        levels = list(accumulate(steps[start:start + _DEPTH_CHUNK], initial=depth))
        if max(levels) > limit:
            return True
        depth = levels[-1]
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in a decoded, depth-checked JSON value has one."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and not _encodes(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
