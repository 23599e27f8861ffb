"""Work at scale: per-task client state writes are group-committed, a pass of new
allocations is one transaction, and a client's status report wakes no allocation watcher
(each wake-up used to resend and re-diff every allocation of the node: O(N^2) for a start
storm of N)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nomad_client.agent import client as client_module
from nomad_client.agent.client import B_ALLOCS, B_TASKS
from nomad_client.jobspec import canonicalize_job
from nomad_client.server.keyring import Keyring
from nomad_client.server.state import StateStore
from nomad_client.state_db import CoalescingWriter, StateDB, StateDBError
from nomad_client.structs.models import AllocUpdate, DriverInfo, TaskState
from tests.unit.factories import (
    InProcessAgent,
    fresh_dir,
    make_alloc,
    make_server,
    node,
    settle,
    wait_until,
)
from tests.unit.test_cli import mock_job
from tests.unit.test_client_gc import agent as in_process_agent

pytestmark = pytest.mark.timeout(60)

COUNT = 40


def _storm_job() -> dict[str, Any]:
    """COUNT mock tasks that run for an hour."""
    job = mock_job("storm")
    job["TaskGroups"][0]["Count"] = COUNT
    return job


class Transactions:
    """Counts the write transactions a StateDB commits, by the buckets each one writes
    (sqlite's statement trace, on the database's own thread)."""

    def __init__(self) -> None:
        self.committed: list[set[str]] = []
        self._open: set[str] | None = None
        self._lock = threading.Lock()

    @classmethod
    async def on(cls, db: StateDB) -> Transactions:
        counter = cls()
        await db._run(lambda conn: conn.set_trace_callback(counter._statement))
        return counter

    def _statement(self, sql: str) -> None:
        with self._lock:
            words = sql.split()
            if words[:2] == ["BEGIN", "IMMEDIATE"]:
                self._open = set()
            elif words[:1] == ["COMMIT"]:
                self.committed.append(self._open or set())
                self._open = None
            elif words[:1] in (["INSERT"], ["DELETE"]):
                bucket = sql.split("VALUES (", 1)[-1].split("'")[1] if "VALUES (" in sql \
                    else "?"
                if self._open is not None:
                    self._open.add(bucket)
                else:  # autocommit: a transaction of its own
                    self.committed.append({bucket})

    def writing(self, bucket: str) -> int:
        with self._lock:
            return sum(1 for buckets in self.committed if bucket in buckets)


def _rows(path: Path, bucket: str) -> set[str]:
    """What a fresh connection (another process, after a crash) finds on disk."""
    with sqlite3.connect(path) as conn:
        return {key for (key,) in conn.execute("SELECT key FROM kv WHERE bucket = ?",
                                               (bucket,))}


@pytest.fixture
async def db() -> AsyncIterator[StateDB]:
    with fresh_dir("scale-db-") as base:
        state = await StateDB.open(base / "state.db")
        try:
            yield state
        finally:
            await state.close()


async def _blocked(db: StateDB) -> threading.Event:
    """Hold the database's one worker thread until the returned event is set."""
    release, holding = threading.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def hold(conn: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(holding.set)
        release.wait(30)
    asyncio.create_task(db._run(hold))
    await holding.wait()
    return release


# ---- the writer ------------------------------------------------------------------------
async def test_puts_made_while_a_transaction_is_written_share_the_next_one(
        db: StateDB) -> None:
    writer = CoalescingWriter(db)
    release = await _blocked(db)
    first = asyncio.create_task(writer.put("b", "first", 1))
    await settle()  # its transaction is submitted, waiting behind the held thread
    rest = [asyncio.create_task(writer.put("b", f"k{i}", i)) for i in range(COUNT)]
    await settle()
    # Nothing is acknowledged before it is on disk.
    assert not first.done() and not any(t.done() for t in rest)
    release.set()
    await asyncio.gather(first, *rest)
    assert writer.transactions == 2
    assert _rows(db.path, "b") == {"first", *(f"k{i}" for i in range(COUNT))}


async def test_the_latest_value_of_a_key_wins_and_a_bad_value_fails_only_its_caller(
        db: StateDB) -> None:
    writer = CoalescingWriter(db)
    release = await _blocked(db)
    puts = [asyncio.create_task(writer.put("b", "k", i)) for i in range(3)]
    bad = asyncio.create_task(writer.put("b", "bad", object()))
    await settle()
    release.set()
    await asyncio.gather(*puts)
    with pytest.raises(TypeError):
        await bad
    assert await db.get("b", "k") == 2
    assert await db.get("b", "bad") is None


async def test_a_failed_transaction_fails_its_callers_and_not_later_ones(db: StateDB) -> None:
    writer = CoalescingWriter(db)
    await db.close()
    with pytest.raises(StateDBError):
        await writer.put("b", "k", 1)
    # The writer is not stuck: a later put gets its own answer, not a hang.
    with pytest.raises(StateDBError):
        await asyncio.wait_for(writer.put("b", "k", 2), 10)


# ---- the client ------------------------------------------------------------------------
# A real in-process agent per test, as the client GC tests use.
agent = in_process_agent


async def test_task_state_writes_of_many_tasks_at_once_are_one_transaction(
        agent: InProcessAgent) -> None:
    client = agent.client
    assert client is not None
    counted = await Transactions.on(client.db)
    await asyncio.gather(*(client._persist_task(f"a{i}", "t", TaskState(), None)
                           for i in range(COUNT)))
    # Each returned only once its row was durable.
    assert _rows(client.db.path, B_TASKS) >= {f"a{i}/t" for i in range(COUNT)}
    assert counted.writing(B_TASKS) == 1  # was one per call


async def test_a_start_storm_writes_its_allocations_in_one_transaction(
        agent: InProcessAgent) -> None:
    client = agent.client
    assert client is not None
    counted = await Transactions.on(client.db)
    await agent.server.register_job(canonicalize_job(_storm_job()))
    await wait_until(lambda: len(client.runners) == COUNT and all(
        r.task_runners["t"].running for r in client.runners.values()), "every task running")
    assert counted.writing(B_ALLOCS) == 1  # was one per allocation
    # Task states are coalesced too (how much depends on timing; never one per change).
    assert counted.writing(B_TASKS) < COUNT
    assert _rows(client.db.path, B_ALLOCS) == set(client.runners)


async def test_a_start_storm_is_fetched_in_chunks_that_each_write_once(
        agent: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    client = agent.client
    assert client is not None
    monkeypatch.setattr(client_module, "FETCH_CHUNK", 16)
    fetched: list[int] = []
    fetch = client.rpc.alloc_get_allocs

    async def counted_fetch(node_id: str, secret_id: str, alloc_ids: Sequence[str]) -> Any:
        fetched.append(len(alloc_ids))
        return await fetch(node_id, secret_id, alloc_ids)
    monkeypatch.setattr(client.rpc, "alloc_get_allocs", counted_fetch)
    counted = await Transactions.on(client.db)
    await agent.server.register_job(canonicalize_job(_storm_job()))
    await wait_until(lambda: len(client.runners) == COUNT, "every allocation to be fetched")
    # No one step signs, decodes and starts them all (the event loop stays responsive).
    assert fetched == [16, 16, COUNT - 32]
    assert counted.writing(B_ALLOCS) == 3


async def test_a_backlog_of_reports_is_sent_in_bounded_chunks(
        agent: InProcessAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    client = agent.client
    assert client is not None
    monkeypatch.setattr(client_module, "REPORT_CHUNK", 16)
    sent: list[int] = []
    send = client.rpc.node_update_alloc

    async def counted_send(updates: Sequence[AllocUpdate]) -> int:
        sent.append(len(updates))
        return await send(updates)
    monkeypatch.setattr(client.rpc, "node_update_alloc", counted_send)
    await agent.server.register_job(canonicalize_job(_storm_job()))
    await wait_until(lambda: [a.client_status for a in agent.server.job_allocs("storm")]
                     == ["running"] * COUNT, "the server to see every allocation running")
    assert sent and max(sent) <= 16  # a start storm used to go in one report of them all


# ---- the server ------------------------------------------------------------------------
async def test_client_reports_wake_no_allocation_watcher(keyring: Keyring) -> None:
    server = make_server(keyring)
    await server.register_node(node(drivers={"mock_driver": DriverInfo(detected=True,
                                                                       healthy=True)}))
    await server.register_job(canonicalize_job(_storm_job()))
    allocs, index = await server.client_allocs("n1", 0, 0)
    assert len(allocs) == COUNT
    watcher = asyncio.create_task(server.client_allocs("n1", index, 30))
    await settle()
    await server.update_allocs_from_client([
        AllocUpdate(id=alloc_id, client_status="running", client_description="",
                    task_states={}) for alloc_id in allocs])
    await settle()
    assert not watcher.done()  # nothing it watches changed: it used to wake and resend all
    await server.deregister_job("storm", purge=False)
    changed, new_index = await asyncio.wait_for(watcher, 10)
    assert new_index > index and changed.keys() == allocs.keys()
    assert all(changed[a] > allocs[a] for a in allocs)  # stopped by the server


async def test_node_watch_sees_restored_allocations_and_deletions(keyring: Keyring) -> None:
    store = StateStore()
    mine, other = make_alloc(node_id="n1"), make_alloc(node_id="n2")
    await store.write({"allocs": [(mine.id, mine), (other.id, other)]})
    server = make_server(keyring, store=store)  # as after a restart: built from the store
    allocs, index = await server.client_allocs("n1", 0, 30)
    assert allocs == {mine.id: mine.alloc_modify_index}
    watcher = asyncio.create_task(server.client_allocs("n1", index, 30))
    await store.write(deletes={"allocs": [other.id]})  # another node's: not this watcher's
    await settle()
    assert not watcher.done()
    await store.write(deletes={"allocs": [mine.id]})
    allocs, new_index = await asyncio.wait_for(watcher, 10)
    assert allocs == {} and new_index > index
