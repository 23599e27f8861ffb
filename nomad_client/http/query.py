"""The shared query-string parser: blocking-query ``index``/``wait``, booleans, prefixes."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import MultiMapping

from nomad_client.durations import parse_duration
from nomad_client.http.errors import HTTPError
from nomad_client.server.state import MAX_BLOCKING_WAIT, StateStore


def query_bool(query: MultiMapping[str], name: str, default: bool = False) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw == "":
        return True
    lowered = raw.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    raise HTTPError(400, f"Failed to parse value of {name!r} ({raw!r}) as a boolean")


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


async def block(store: StateStore, query: MultiMapping[str], tables: Iterable[str]) -> int:
    """Wait as a blocking query asks (only when ``index`` > 0); return the tables' index."""
    index, wait = blocking_params(query)
    names = tuple(tables)
    if index > 0:
        return await store.wait_for_change(names, index, wait)
    return store.table_index(*names)
