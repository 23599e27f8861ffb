"""Nomad's list paging: ``per_page`` and ``next_token`` in, ``X-Nomad-NextToken`` out.

A list is cut after ``per_page`` items; the token names the first item of the next page, so a
page asked for with it starts there (items are in token order, ascending or, for
``reverse``, descending).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs
from aiohttp import web
from multidict import MultiMapping

from nomad_client.http.errors import bad_request
from nomad_client.http.router import Reply, json_response

_T = TypeVar("_T")
_MAX_PER_PAGE = 2**31 - 1  # Go's int32


def per_page(query: MultiMapping[str]) -> int:
    """``?per_page`` (0: no paging). A negative value means no paging, as in Nomad."""
    raw = query.get("per_page")
    if not raw:
        return 0
    try:
        value = int(raw)
        if not -_MAX_PER_PAGE - 1 <= value <= _MAX_PER_PAGE:
            raise ValueError
    except ValueError:
        raise bad_request("Expect a number for `per_page` query string parameter") from None
    return max(value, 0)


@attrs.frozen
class Tokenizer(Generic[_T]):
    """How a list names its items: ``token`` of an item, and ``key``, the order of items and
    of tokens (``key_of_token`` turns a caller's token into one; None: malformed)."""

    token: Callable[[_T], str]
    key: Callable[[_T], Any]
    key_of_token: Callable[[str], Any | None]


def page(items: Sequence[_T], tokenizer: Tokenizer[_T], query: MultiMapping[str],
         *, reverse: bool = False) -> tuple[list[_T], str]:
    """The page of ``items`` that ``query`` asks for, in ``tokenizer.key`` order (descending
    when ``reverse``), and the token of the next page ("" on the last)."""
    size = per_page(query)
    selected = sorted(items, key=tokenizer.key, reverse=reverse)
    start = query.get("next_token", "")
    if start:
        first = tokenizer.key_of_token(start)
        if first is None:
            raise bad_request(f"failed to read result page: invalid next_token {start!r}")
        selected = [i for i in selected
                    if (tokenizer.key(i) <= first if reverse else tokenizer.key(i) >= first)]
    if size and len(selected) > size:
        return selected[:size], tokenizer.token(selected[size])
    return selected, ""


def paged_response(reply: Reply, next_token: str, *, pretty: bool = False) -> web.Response:
    """``reply`` as JSON (indented with ``pretty``), with the next page's token when there
    is one."""
    response = json_response(reply, pretty=pretty)
    if next_token:
        response.headers["X-Nomad-NextToken"] = next_token
    return response
