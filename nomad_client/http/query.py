"""The shared query-string parser: blocking-query ``index``/``wait``, booleans, prefixes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from multidict import MultiMapping

from nomad_client.durations import parse_duration
from nomad_client.goflags import parse_go_bool
from nomad_client.http.errors import HTTPError
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
