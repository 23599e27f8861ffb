"""The shared query-string parser: blocking-query ``index``/``wait``, booleans, and the one
reading of a list request's query (``list_query``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from aiohttp import web
from multidict import MultiMapping

from nomad_client.durations import parse_duration
from nomad_client.goflags import parse_go_bool
from nomad_client.http.auth import ALL_NAMESPACES, request_namespace
from nomad_client.http.errors import HTTPError
from nomad_client.http.paging import Tokenizer, page, paged_response, per_page
from nomad_client.http.router import Reply
from nomad_client.server.bexpr import Filter, FilterError, FilterSyntaxError, compile_filter
from nomad_client.server.server import Resource, Server
from nomad_client.server.state import MAX_BLOCKING_WAIT


def query_bool(query: MultiMapping[str], name: str, default: bool = False) -> bool:
    """``?name`` as Go's strconv.ParseBool reads it; present without a value means true."""
    raw = query.get(name)
    if raw is None:
        return default
    if raw == "":
        return True
    value = parse_go_bool(raw)
    if value is None:
        raise HTTPError(400, f"Failed to parse value of {name!r} ({raw!r}) as a boolean")
    return value


def blocking_params(query: MultiMapping[str]) -> tuple[int, float]:
    raw_index = query.get("index", "0") or "0"
    try:
        index = int(raw_index)
        if index < 0:
            raise ValueError
    except ValueError:
        raise HTTPError(400, "Invalid index") from None
    wait = MAX_BLOCKING_WAIT
    raw_wait = query.get("wait")
    if raw_wait:
        try:
            wait = parse_duration(raw_wait)
        except ValueError:
            raise HTTPError(400, "Invalid wait time") from None
        if wait <= 0:
            wait = MAX_BLOCKING_WAIT
    return index, wait


async def block(server: Server, query: MultiMapping[str], resources: Iterable[Resource]) -> int:
    """Wait as a blocking query asks (only when ``index`` > 0); return the resources' index."""
    index, wait = blocking_params(query)
    watched = tuple(resources)
    if index > 0:
        return await server.wait_for_change(watched, index, wait)
    return server.index_of(*watched)


def query_filter(query: MultiMapping[str]) -> Filter | None:
    """The ``?filter=`` expression of a list request, compiled; None without one."""
    expression = query.get("filter")
    if not expression:
        return None
    try:
        return compile_filter(expression)
    except FilterSyntaxError as err:
        raise HTTPError(400, f"failed to read filter expression: {err}") from None


def filtered(items: list[dict[str, Any]], item_filter: Filter) -> list[dict[str, Any]]:
    """The items ``item_filter`` matches; 400 when it cannot be evaluated on one. CPU work
    on caller input: call it off the event loop."""
    try:
        return [item for item in items if item_filter.matches(item)]
    except FilterError as err:
        raise HTTPError(400, f"failed to read result page: {err}") from None


# ---- list requests ---------------------------------------------------------------------------
# Every list endpoint reads Nomad's list query the same way: ``region``, ``namespace``
# (``*``: every one), ``prefix``, ``filter``, ``reverse``, ``per_page``/``next_token`` and
# blocking ``index``/``wait``. ``list_query`` reads and checks it (a bad value is a 400 before
# anything waits), then blocks; ``ListQuery.reply`` applies it to the items and answers.

Item = dict[str, Any]


def by_field(name: str) -> Tokenizer[Item]:
    """Items in the order of one string field, which is also their token."""
    def value(item: Item) -> str:
        return str(item.get(name, ""))
    return Tokenizer(token=value, key=value, key_of_token=lambda token: token)


_MAX_UINT64 = 2**64 - 1


def parse_uint64(raw: str) -> int | None:
    """``raw`` as Go's ``strconv.ParseUint(raw, 10, 64)`` reads it; None when it would fail.
    Only ASCII digits: ``str.isdigit`` also takes "²", which ``int`` then refuses, and a
    caller's thousands of digits must not reach ``int`` (Python refuses those too)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 20:
        return None
    value = int(raw)
    return value if value <= _MAX_UINT64 else None


MAX_INT64 = 2**63 - 1


def parse_int64(name: str, raw: str) -> int:
    """``raw`` as Go's ``strconv.ParseInt(raw, 10, 64)`` reads it, or ValueError with
    Nomad's wording (``error parsing <name>: ...``). Only an optional sign and ASCII digits:
    Python's ``int`` would also take spaces, underscores and other scripts' digits."""
    digits = raw[1:] if raw[:1] in ("+", "-") else raw
    if not digits.isascii() or not digits.isdigit():
        reason = "invalid syntax"
    elif len(digits) > 19 or not -MAX_INT64 - 1 <= (value := int(raw)) <= MAX_INT64:
        reason = "value out of range"
    else:
        return value
    raise ValueError(f'error parsing {name}: strconv.ParseInt: parsing "{raw}": {reason}')


def by_namespace_and(name: str) -> Tokenizer[Item]:
    """Items of every namespace in (``Namespace``, field ``name``) order, each token
    ``<namespace>.<value>``: namespaces have no dots, so a token's first one ends it."""
    return Tokenizer(token=lambda item: f"{item['Namespace']}.{item[name]}",
                     key=lambda item: (item["Namespace"], item[name]),
                     key_of_token=lambda token: tuple(token.partition(".")[::2]))


def _index_and_id(token: str) -> tuple[int, str] | None:
    index, dot, item_id = token.partition(".")
    create_index = parse_uint64(index) if dot else None
    return None if create_index is None else (create_index, item_id)


def by_creation(id_field: str = "ID") -> Tokenizer[Item]:
    """Items oldest first, as Nomad's create-index tokens (``<CreateIndex>.<ID>``) name them."""
    return Tokenizer(token=lambda item: f"{item['CreateIndex']}.{item[id_field]}",
                     key=lambda item: (item["CreateIndex"], item[id_field]),
                     key_of_token=_index_and_id)


def _item_id(item: Item) -> str:
    return str(item.get("ID", ""))


BY_ID = by_field("ID")


def check_region(server: Server, query: MultiMapping[str]) -> None:
    """``?region``: this agent serves its own region only, and knows no path to another."""
    region = query.get("region")
    if region and region != server.region:
        raise HTTPError(400, "No path to region")


def listed_namespace(query: MultiMapping[str]) -> str | None:
    """The namespace a list request reads; None for every namespace (``*``)."""
    namespace = request_namespace(query)
    return None if namespace == ALL_NAMESPACES else namespace


@attrs.frozen
class ListQuery:
    """A list request's query, read and checked, and the index its blocking wait ended at."""

    query: MultiMapping[str]
    namespace: str | None  # None: every namespace
    prefix: str
    item_filter: Filter | None
    reverse: bool
    index: int

    async def reply(self, items: Iterable[Item], tokenizer: Tokenizer[Item] = BY_ID, *,
                    prefix_of: Callable[[Item], str] | None = _item_id,
                    view: Callable[[Item], Any] | None = None) -> web.StreamResponse:
        """The page of ``items`` (dicts the filter is evaluated on) the query asks for, each
        shown as ``view`` gives it, with ``X-Nomad-Index`` and, when more follow,
        ``X-Nomad-NextToken``. ``prefix_of``: what ``prefix`` matches (None: a list that
        takes none)."""
        chosen = [item for item in items
                  if prefix_of is None or prefix_of(item).startswith(self.prefix)]
        if self.item_filter is not None:
            # A caller's filter is CPU work on caller input: evaluate it off the event loop.
            chosen = await asyncio.to_thread(filtered, chosen, self.item_filter)
        selected, next_token = page(chosen, tokenizer, self.query, reverse=self.reverse)
        shown = selected if view is None else [view(item) for item in selected]
        # The router indents what a handler returns for ``?pretty``, but not a response made
        # here, so it is read here the way the router reads it.
        return paged_response(Reply(shown, self.index), next_token,
                              pretty=self.query.get("pretty", "0") != "0")


async def list_query(server: Server, query: MultiMapping[str],
                     resources: Iterable[Resource]) -> ListQuery:
    """``query`` as a list request's, checked; waits first when it is a blocking query."""
    check_region(server, query)
    item_filter = query_filter(query)
    per_page(query)  # a bad page size is refused before anything waits
    read = ListQuery(query=query, namespace=listed_namespace(query),
                     prefix=query.get("prefix", ""), item_filter=item_filter,
                     reverse=query.get("reverse") == "true", index=0)
    return attrs.evolve(read, index=await block(server, query, resources))
