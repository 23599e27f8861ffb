"""State store (indexes, blocking queries, persistence), scheduler placement, restart policy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from nomad_client.allocrunner.taskrunner.restarts import RestartTracker
from nomad_client.server.keyring import Keyring
from nomad_client.server.scheduler import plan_job
from nomad_client.server.state import JOBS, StateStore
from nomad_client.state_db import StateDB
from tests.unit.factories import SEALER, job, make_server, node, settle

NS = 1_000_000_000


async def test_writes_bump_index_and_stamp_records() -> None:
    store = StateStore()
    first = await store.write({"nodes": [("n1", node())]})
    second = await store.write({"nodes": [("n1", node(name="renamed"))]})
    assert second == first + 1
    stored = store.get("nodes", "n1")
    assert (stored.create_index, stored.modify_index, stored.name) == (first, second, "renamed")
    await store.write({JOBS: [("web", job())]})
    assert store.get(JOBS, "web")["ModifyIndex"] == store.index


async def test_blocking_query_waits_and_wakes() -> None:
    store = StateStore()
    index = await store.write({"nodes": [("n1", node())]})
    started = time.monotonic()
    assert await store.wait_for_change(("nodes",), index, 0.2) == index
    assert time.monotonic() - started >= 0.19
    waiter = asyncio.create_task(store.wait_for_change(("nodes",), index, 5))
    await settle()  # the waiter is waiting now
    await store.write({"allocs": []})  # another table: must not wake it
    await settle()
    assert not waiter.done()
    new = await store.write({"nodes": [("n2", node("n2"))]})
    assert await asyncio.wait_for(waiter, 1) == new


async def test_store_survives_restart_through_state_db(tmp_path: Path) -> None:
    db = await StateDB.open(tmp_path / "state.db")
    store = StateStore(db, SEALER)
    await store.write({"nodes": [("n1", node())], JOBS: [("web", job())]})
    await store.write({}, {JOBS: ["web"]})
    await db.close()
    db = await StateDB.open(tmp_path / "state.db")
    restored = await StateStore.restore(db, SEALER)
    await db.close()
    assert restored.index == store.index
    assert restored.get("nodes", "n1") == store.get("nodes", "n1")
    assert restored.get(JOBS, "web") is None


def test_placement_spreads_and_names_allocs() -> None:
    plan = plan_job(job(count=3), "e1", [node("n1"), node("n2")], [])
    assert sorted(a.name for a in plan.new_allocs) == ["web.g[0]", "web.g[1]", "web.g[2]"]
    per_node = sorted(sum(1 for a in plan.new_allocs if a.node_id == n) for n in ("n1", "n2"))
    assert per_node == [1, 2]
    assert not plan.failed_groups


def test_placement_failure_names_missing_driver_and_constraints() -> None:
    plan = plan_job(job(driver="docker"), "e1", [node()], [])
    assert not plan.new_allocs
    assert plan.failed_groups["g"].constraint_filtered == {"missing driver docker": 1}
    assert plan.queued == {"g": 1}
    constrained = job(Constraints=[{"LTarget": "${meta.rack}", "RTarget": "r9",
                                    "Operand": "="}])
    plan = plan_job(constrained, "e1", [node()], [])
    (reason,) = plan.failed_groups["g"].constraint_filtered
    assert "meta.rack" in reason


def test_placement_skips_nodes_outside_datacenters_and_not_ready() -> None:
    plan = plan_job(job(), "e1", [node("a", datacenter="eu1"), node("b", status="down")], [])
    assert plan.failed_groups["g"].constraint_filtered == {"datacenter": 1,
                                                           "node not ready": 1}


def test_existing_allocs_are_kept_and_stop_stops_them() -> None:
    first = plan_job(job(count=2), "e1", [node()], [])
    again = plan_job(job(count=2), "e2", [node()], list(first.new_allocs))
    assert not again.new_allocs
    stopped = plan_job(job(count=2, Stop=True), "e3", [node()], list(first.new_allocs))
    assert {a.desired_status for a in stopped.stopped_allocs} == {"stop"}


def test_finished_batch_work_is_not_redone() -> None:
    batch = job(Type="batch")
    (alloc,) = plan_job(batch, "e1", [node()], []).new_allocs
    done = attrs.evolve(alloc, client_status="complete")
    assert not plan_job(batch, "e2", [node()], [done]).new_allocs
    failed = attrs.evolve(alloc, client_status="failed")
    assert len(plan_job(batch, "e2", [node()], [failed]).new_allocs) == 1


# ---- restart policy --------------------------------------------------------------------
def tracker(mode: str = "fail", attempts: int = 2, batch: bool = False) -> tuple[
        RestartTracker, list[float]]:
    now = [0.0]
    t = RestartTracker.from_policy({"Attempts": attempts, "Interval": 60 * NS,
                                    "Delay": 2 * NS, "Mode": mode}, batch=batch,
                                   clock=lambda: now[0], jitter=lambda: 0.0)
    return t, now


def test_restart_within_policy_then_fail() -> None:
    t, _ = tracker()
    assert [t.next(exit_ok=False).restart for _ in range(3)] == [True, True, False]
    t, _ = tracker()
    t.next(exit_ok=False)
    t.next(exit_ok=False)
    last = t.next(exit_ok=False)
    assert last.event_type == "Not Restarting" and last.fails_task
    assert last.reason == 'Exceeded allowed attempts 2 in interval 1m0s and mode is "fail"'


def test_restart_window_resets_after_interval() -> None:
    t, now = tracker()
    t.next(exit_ok=False)
    t.next(exit_ok=False)
    now[0] = 61
    assert t.next(exit_ok=False).restart


def test_delay_mode_waits_out_the_interval() -> None:
    t, now = tracker(mode="delay")
    t.next(exit_ok=False)
    t.next(exit_ok=False)
    now[0] = 10
    third = t.next(exit_ok=False)
    assert third.restart and third.delay == pytest.approx(50)


def test_batch_success_terminates_and_service_success_restarts() -> None:
    t, _ = tracker(batch=True)
    assert t.next(exit_ok=True).event_type == "Terminated"
    t, _ = tracker(batch=False)
    assert t.next(exit_ok=True).restart
    t, _ = tracker(attempts=0)
    assert t.next(exit_ok=False).reason == "Policy allows no restarts"


def test_unrecoverable_start_error_is_not_retried() -> None:
    t, _ = tracker()
    d = t.next(exit_ok=False, start_failed=True, recoverable=False)
    assert not d.restart and d.reason == "Error was unrecoverable" and d.fails_task


async def test_a_job_that_cannot_be_evaluated_never_blocks_node_registration(
        keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    from nomad_client.server import server as server_mod

    srv = make_server(keyring)
    await srv.register_job(job(driver="docker"))  # unplaceable: stays queued
    assert srv.job_allocs("web") == []

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("cannot evaluate this job")

    monkeypatch.setattr(server_mod, "plan_job", broken)
    await srv.register_node(node())  # re-evaluation fails, registration does not
    assert srv.store.get("nodes", "n1").status == "ready"
