"""Server writes that race each other, evaluation growth, and scaling a job down.

The races are made deterministic with a fake ``StateDB`` whose next write can be held open:
while it is held, the store's write lock is taken, so the writes queued behind it land in the
order the test starts them (``asyncio.Lock`` is first come, first served).
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Sequence
from typing import Any, cast

import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.server.scheduler import plan_job
from nomad_client.server.server import MAX_EVALS_PER_JOB, Server
from nomad_client.server.state import JOBS, StateStore, job_key
from nomad_client.state_db import StateDB
from nomad_client.structs.models import ACLToken, AllocUpdate, DriverInfo
from tests.unit.factories import SEALER, job, make_server, node, settle


class GatedDB:
    """Stands in for ``StateDB``: records batches and can hold the next one open."""

    def __init__(self) -> None:
        self._armed: str | None = None
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    def hold_next(self, bucket: str = "") -> None:
        """Hold the next batch (that writes to ``bucket``, when given) until ``release``."""
        self._armed = bucket
        self.held.clear()
        self.release.clear()

    async def write_batch(self, puts: Sequence[tuple[str, str, Any]],
                          deletes: Sequence[tuple[str, str]] = ()) -> None:
        if self._armed is not None and (
                not self._armed or any(b == self._armed for b, _, _ in puts)):
            self._armed = None
            self.held.set()
            await self.release.wait()


def server(keyring: Keyring) -> tuple[Server, GatedDB]:
    db = GatedDB()
    return make_server(keyring, store=StateStore(cast(StateDB, db), SEALER)), db


def running(alloc_id: str) -> AllocUpdate:
    return AllocUpdate(id=alloc_id, client_status="running", client_description="Tasks are running",
                       task_states={})


@pytest.mark.parametrize("client_first", [False, True], ids=["stop-first", "report-first"])
async def test_a_stop_and_a_client_report_racing_both_survive(
        keyring: Keyring, client_first: bool) -> None:
    srv, db = server(keyring)
    await srv.register_node(node())
    await srv.register_job(job())
    (alloc,) = srv.job_allocs("web")
    stopped_job = {**cast(dict[str, Any], srv.job("web")), "Stop": True}
    await srv.store.write({JOBS: [(job_key("default", "web"), stopped_job)]})

    # Hold the write lock so that both contenders read the same row and then queue up.
    db.hold_next()
    blocker = asyncio.create_task(srv.store.write({"nodes": [("n2", node("n2"))]}))
    await asyncio.wait_for(db.held.wait(), 1)
    evaluate = lambda: srv._evaluate("web", "job-deregister")  # noqa: E731
    report = lambda: srv.update_allocs_from_client([running(alloc.id)])  # noqa: E731
    first, second = (report, evaluate) if client_first else (evaluate, report)
    tasks = [asyncio.create_task(first())]
    await settle()
    tasks.append(asyncio.create_task(second()))
    await settle()
    db.release.set()
    await asyncio.wait_for(asyncio.gather(blocker, *tasks), 2)

    final = srv.store.get("allocs", alloc.id)
    assert final.desired_status == "stop"
    assert final.desired_description == "alloc not needed due to job update"
    assert final.client_status == "running"
    assert final.client_description == "Tasks are running"
    assert final.alloc_modify_index > alloc.alloc_modify_index


async def test_deregister_racing_a_client_report_keeps_the_stop(keyring: Keyring) -> None:
    srv, db = server(keyring)
    await srv.register_node(node())
    await srv.register_job(job())
    (alloc,) = srv.job_allocs("web")
    db.hold_next("table/evals")  # the job's own write goes through; its evaluation's waits
    stop = asyncio.create_task(srv.deregister_job("web", purge=False))
    await asyncio.wait_for(db.held.wait(), 1)
    report = asyncio.create_task(srv.update_allocs_from_client([running(alloc.id)]))
    await settle()
    db.release.set()
    await asyncio.wait_for(asyncio.gather(stop, report), 2)
    final = srv.store.get("allocs", alloc.id)
    assert (final.desired_status, final.client_status) == ("stop", "running")


async def test_new_allocs_get_the_index_of_the_write_that_created_them(
        keyring: Keyring) -> None:
    srv, db = server(keyring)
    await srv.register_node(node())
    await srv.store.write({JOBS: [(job_key("default", "web"), job(count=2))]})
    db.hold_next()
    blocker = asyncio.create_task(srv.store.write({"nodes": [("n2", node("n2"))]}))
    await asyncio.wait_for(db.held.wait(), 1)
    evaluate = asyncio.create_task(srv._evaluate("web", "job-register"))
    await settle()
    db.release.set()
    await asyncio.wait_for(asyncio.gather(blocker, evaluate), 2)
    allocs = srv.job_allocs("web")
    assert len(allocs) == 2
    for alloc in allocs:
        assert alloc.alloc_modify_index == alloc.create_index == alloc.modify_index


async def test_a_purge_racing_the_final_report_still_collects_the_alloc(
        keyring: Keyring) -> None:
    srv, db = server(keyring)
    await srv.register_node(node())
    await srv.register_job(job())
    (alloc,) = srv.job_allocs("web")
    db.hold_next("table/evals")
    purge = asyncio.create_task(srv.deregister_job("web", purge=True))
    await asyncio.wait_for(db.held.wait(), 1)
    report = asyncio.create_task(srv.update_allocs_from_client([AllocUpdate(
        id=alloc.id, client_status="complete", client_description="", task_states={})]))
    await settle()
    db.release.set()
    await asyncio.wait_for(asyncio.gather(report, purge), 2)
    assert srv.job("web") is None and srv.store.values(JOBS) == []
    assert srv.store.get("allocs", alloc.id) is None


# ---- evaluations do not pile up ---------------------------------------------------------
def evals_of(srv: Server, job_id: str = "web") -> list[Any]:
    return [e for e in srv.store.rows("evals") if e.job_id == job_id]


async def test_re_registering_an_unchanged_node_writes_no_evaluation(keyring: Keyring) -> None:
    srv, _ = server(keyring)
    await srv.register_node(node())
    await srv.register_job(job(driver="docker"))  # cannot be placed: stays queued
    assert len(evals_of(srv)) == 1
    for _ in range(5):
        # What the client sends when only non-scheduling details move.
        await srv.register_node(node(node_resources={"cpu": 1000}))
    assert len(evals_of(srv)) == 1


async def test_a_node_change_that_places_nothing_keeps_the_latest_evaluation(
        keyring: Keyring) -> None:
    srv, _ = server(keyring)
    await srv.register_node(node())
    eval_id, _ = await srv.register_job(job(driver="docker"))
    for i in range(5):
        await srv.register_node(node(meta={"change": str(i)}))  # relevant, but still no docker
    assert [e.id for e in evals_of(srv)] == [eval_id]
    docker = {**node().drivers, "docker": DriverInfo(detected=True, healthy=True)}
    await srv.register_node(node(drivers=docker))  # now it fits: a new evaluation places it
    assert len(evals_of(srv)) == 2
    (alloc,) = srv.job_allocs("web")
    assert alloc.desired_status == "run"


async def test_only_the_newest_evaluations_of_a_job_are_kept(keyring: Keyring) -> None:
    srv, _ = server(keyring)
    await srv.register_node(node())
    ids = [(await srv.register_job(job()))[0] for _ in range(MAX_EVALS_PER_JOB + 5)]
    kept = evals_of(srv)
    assert len(kept) == MAX_EVALS_PER_JOB
    assert {e.id for e in kept} == set(ids[-MAX_EVALS_PER_JOB:])


# ---- scaling down and removing groups ---------------------------------------------------
def test_plan_stops_allocs_beyond_the_count() -> None:
    first = plan_job(job(count=3), "e1", [node()], [])
    plan = plan_job(job(count=1), "e2", [node()], list(first.new_allocs))
    assert not plan.new_allocs
    assert sorted(a.name for a in plan.stopped_allocs) == ["web.g[1]", "web.g[2]"]
    assert {(a.desired_status, a.desired_description) for a in plan.stopped_allocs} == {
        ("stop", "alloc not needed due to job update")}


def test_plan_stops_allocs_of_a_removed_group() -> None:
    two = job()
    two["TaskGroups"] = [*two["TaskGroups"], {"Name": "h", "Count": 1,
                                              "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}]
    first = plan_job(two, "e1", [node()], [])
    plan = plan_job(job(), "e2", [node()], list(first.new_allocs))
    assert [a.name for a in plan.stopped_allocs] == ["web.h[0]"]
    assert not plan.new_allocs


async def test_scaling_a_job_down_stops_the_extra_allocs(keyring: Keyring) -> None:
    srv, _ = server(keyring)
    await srv.register_node(node())
    await srv.register_job(job(count=3))
    await srv.register_job(job(count=1))
    status = {a.name: a.desired_status for a in srv.job_allocs("web")}
    assert status == {"web.g[0]": "run", "web.g[1]": "stop", "web.g[2]": "stop"}


# ---- signing and tokens -----------------------------------------------------------------
async def test_identities_are_signed_off_the_event_loop(
        keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _ = server(keyring)
    loop_thread = threading.get_ident()
    threads: list[int] = []
    sign = srv.keyring.sign_identity

    def spy(**kw: Any) -> str:
        threads.append(threading.get_ident())
        return sign(**kw)

    monkeypatch.setattr(srv.keyring, "sign_identity", spy)
    await srv.register_node(node(secret_id="s1"))
    await srv.register_job(job(count=3))
    # Signed when the node fetches its allocations (never stored with them).
    ids = [a.id for a in srv.job_allocs("web")]
    _, signed = await srv.allocs_for_node("n1", "s1", ids)
    assert len(threads) == 3 and loop_thread not in threads
    assert len(set(threads)) == 1  # one hop to a worker thread for the whole fetch
    assert all(signed[i]["t"] for i in ids)


async def test_token_lookup_compares_secrets_in_constant_time(
        keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _ = server(keyring)
    tokens = [ACLToken(accessor_id=f"a{i}", secret_id=f"s{i}", name=f"t{i}", type="client")
              for i in range(3)]
    await srv.store.write({"acl_tokens": [(t.accessor_id, t) for t in tokens]})
    calls: list[tuple[Any, Any]] = []
    compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    found = srv.token_by_secret("s1")
    assert found is not None and found.accessor_id == "a1"
    assert calls
    assert srv.token_by_secret("s9") is None
    assert srv.token_by_secret("sé") is None  # not ASCII: no match, no error
