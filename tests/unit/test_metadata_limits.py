"""Dynamic node metadata: bounded by ``client { meta_limits { ... } }``, refused whole with a
400 naming the limit, and stored one row per key (an update writes only what it changes).

Each test runs a real agent in-process (server, client, router, TCP listener) on a data dir
that outlives it, and talks to its HTTP API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nomad_client.agent.agent import Agent
from nomad_client.agent.client import B_META
from nomad_client.agent.config import AgentFlags, build_agent_config
from nomad_client.http.endpoints.client import validate_meta_update
from nomad_client.http.errors import HTTPError
from nomad_client.state_db import StateDB

TIGHT = "meta_limits {\n max_keys = 4\n max_key_length = 16\n max_value_length = 32\n" \
        " max_total_bytes = 120\n }"

StartAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[StartAgent]:
    """Start an agent on ``tmp_path/data`` with ``client { ... }`` lines added; started
    agents are stopped at the end (a test may stop one and start another on the same dir)."""
    running: list[Agent] = []

    async def start(client_extra: str = "") -> Agent:
        config = tmp_path / "agent.hcl"
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\nname = "meta-test"\n'
            'ports {\n  http = 0\n  rpc = 0\n}\n'
            'server { enabled = true }\n'
            f'client {{\n enabled = true\n meta {{ rack = "r1" }}\n {client_extra}\n}}\n')
        agent = Agent(build_agent_config([config], AgentFlags()))
        await agent.start()
        running.append(agent)
        return agent

    yield start
    for agent in running:
        await agent.stop()


async def apply(agent: Agent, meta: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(
            f"http://{agent.http_addr}/v1/client/metadata", json={"Meta": meta}) as r:
        body = await r.json() if r.status == 200 else await r.text()
        return r.status, body


async def read(agent: Agent) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://{agent.http_addr}/v1/client/metadata") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


def limit_message(what: str, limit: int, setting: str) -> str:
    return f"{what}; the limit is {limit} (client.meta_limits.{setting})"


# ---- limits ---------------------------------------------------------------------------
async def test_default_limits_refuse_a_huge_value(start_agent: StartAgent) -> None:
    agent = await start_agent()
    status, body = await apply(agent, {"k": "x" * 10_000})
    assert (status, body) == (400, 'metadata value for "k" is 10000 bytes; the limit is 4096 '
                                   "(client.meta_limits.max_value_length)")
    assert "k" not in (await read(agent))["Dynamic"]


@pytest.mark.parametrize(("meta", "message"), [
    ({"k": "x" * 33},
     limit_message('metadata value for "k" is 33 bytes', 32, "max_value_length")),
    ({"k": "\u00e9" * 20},  # lengths are UTF-8 bytes, not characters
     limit_message('metadata value for "k" is 40 bytes', 32, "max_value_length")),
    ({"k" * 17: "v"},
     limit_message(f'metadata key "{"k" * 17}" is 17 bytes', 16, "max_key_length")),
    ({c: "1" for c in "abcde"},
     limit_message("dynamic metadata would have 5 keys", 4, "max_keys")),
    ({c: "x" * 32 for c in "abcd"},
     limit_message("dynamic metadata would be 132 bytes", 120, "max_total_bytes")),
])
async def test_each_limit_refuses_with_a_400_naming_it(start_agent: StartAgent,
                                                       meta: dict[str, str],
                                                       message: str) -> None:
    agent = await start_agent(TIGHT)
    assert await apply(agent, meta) == (400, message)
    assert (await read(agent))["Dynamic"] == {}


async def test_limits_count_what_is_stored_already(start_agent: StartAgent) -> None:
    agent = await start_agent(TIGHT)
    assert (await apply(agent, {"a": "1", "b": "2", "c": "3"}))[0] == 200
    assert await apply(agent, {"d": "4", "e": "5"}) == \
        (400, limit_message("dynamic metadata would have 5 keys", 4, "max_keys"))
    # Replacing and unsetting keys in the same update keeps it within the limit.
    assert (await apply(agent, {"a": None, "d": "4", "e": "5"}))[0] == 200
    assert (await read(agent))["Dynamic"] == {"b": "2", "c": "3", "d": "4", "e": "5"}


async def test_refused_update_is_refused_whole_and_loses_nothing(
        start_agent: StartAgent) -> None:
    agent = await start_agent()
    assert (await apply(agent, {"a": "1", "b": "2", "rack": None}))[0] == 200
    before = await read(agent)
    status, body = await apply(agent, {"a": "changed", "b": None, "c": "x" * 5000})
    assert status == 400 and "max_value_length" in body
    assert await read(agent) == before
    await agent.stop()
    agent = await start_agent()
    assert await read(agent) == before  # and nothing of it reached the state DB


async def test_store_over_lowered_limits_is_kept_and_can_shrink(
        start_agent: StartAgent) -> None:
    agent = await start_agent()
    assert (await apply(agent, {c: "v" for c in "abcdef"}))[0] == 200
    await agent.stop()
    agent = await start_agent(TIGHT)  # now 6 keys where 4 are allowed: nothing is dropped
    assert set((await read(agent))["Dynamic"]) == set("abcdef")
    assert (await apply(agent, {"g": "v"}))[0] == 400
    assert (await apply(agent, {"a": "w"}))[0] == 200  # not growing: accepted
    assert (await apply(agent, {"a": None, "b": None}))[0] == 200
    assert set((await read(agent))["Dynamic"]) == set("cdef")


async def test_long_invalid_key_is_not_echoed_back_whole(start_agent: StartAgent) -> None:
    agent = await start_agent()
    status, body = await apply(agent, {"x" * 100_000 + "!": "v"})
    assert status == 400 and "is invalid" in body and len(body) < 200


# ---- storage: one row per key -------------------------------------------------------
class RecordingDB:
    """A real StateDB that records every row written or deleted through it."""

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self.written: list[tuple[str, str, Any]] = []
        self.deleted: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def put(self, bucket: str, key: str, value: Any) -> None:
        self.written.append((bucket, key, value))
        await self._db.put(bucket, key, value)

    async def write_batch(self, puts: Any, deletes: Any = ()) -> None:
        self.written.extend(puts)
        self.deleted.extend(deletes)
        await self._db.write_batch(puts, deletes)

    async def delete(self, bucket: str, key: str) -> None:
        self.deleted.append((bucket, key))
        await self._db.delete(bucket, key)


async def test_an_update_writes_only_the_rows_of_the_keys_it_changes(
        start_agent: StartAgent) -> None:
    agent = await start_agent()
    assert agent.client is not None
    many = {f"k{i:03d}": "v" for i in range(500)}
    assert (await apply(agent, many))[0] == 200
    recorder = RecordingDB(agent.client.db)
    agent.client.db = recorder  # type: ignore[assignment]

    assert (await apply(agent, {"k500": "new", "k001": "v"}))[0] == 200  # k001: unchanged
    assert (recorder.written, recorder.deleted) == ([(B_META, "k500", "new")], [])
    assert (await apply(agent, {"k000": None}))[0] == 200
    assert recorder.deleted == [(B_META, "k000")] and len(recorder.written) == 1
    rows = dict(await recorder.items(B_META))
    assert len(rows) == 500 and rows["k500"] == "new" and "k000" not in rows


async def test_old_single_row_metadata_is_migrated_on_start(start_agent: StartAgent,
                                                            tmp_path: Path) -> None:
    # What earlier agents stored: the whole dict in one row ("rack": None unsets a static
    # key and is kept; "gone": None unset a key the config no longer has and is dropped).
    db = await StateDB.open(tmp_path / "data" / "client" / "state.db")
    await db.put("nodemeta", "meta", {"a": "1", "rack": None, "gone": None})
    await db.close()

    agent = await start_agent()
    meta = await read(agent)
    assert meta["Dynamic"] == {"a": "1", "rack": None}
    assert meta["Meta"]["a"] == "1" and "rack" not in meta["Meta"]
    await agent.stop()
    db = await StateDB.open(tmp_path / "data" / "client" / "state.db")
    try:
        assert await db.get("nodemeta", "meta") is None
        assert await db.items(B_META) == [("a", "1"), ("rack", None)]
    finally:
        await db.close()


# ---- key syntax: checked whole --------------------------------------------------------
@pytest.mark.parametrize("key", ["key\n", "a.b\n", "a\n.b", "\nkey", "a..b", "1a", ""])
def test_meta_key_must_match_whole(key: str) -> None:
    with pytest.raises(HTTPError) as caught:
        validate_meta_update({"Meta": {key: "v"}})
    assert caught.value.status == 400


async def test_meta_key_with_trailing_newline_is_refused_by_the_api(
        start_agent: StartAgent) -> None:
    agent = await start_agent()
    assert await apply(agent, {"key\n": "v"}) == \
        (400, '"key\\n" is invalid; metadata keys must be valid dotted hcl identifiers')
    assert (await read(agent))["Dynamic"] == {}
