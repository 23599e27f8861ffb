"""Within one plan, the allocations it stops free their disk and ports for its placements,
as in Nomad: a destructive update on a full node places its replacement at once."""

from __future__ import annotations

from typing import Any

from nomad_client.jobspec import canonicalize_job
from nomad_client.server.keyring import Keyring
from nomad_client.server.scheduler import plan_job
from nomad_client.structs.models import DESIRED_STOP, AllocUpdate
from tests.unit.factories import make_server, node

FULL_FOR_ONE = {"kernel.name": "linux", "unique.storage.bytesfree": str(1000 * 2**20)}


def web(env: str, **group: Any) -> dict[str, Any]:
    return canonicalize_job({"ID": "web", "Datacenters": ["dc1"], "TaskGroups": [{
        "Name": "g", "Count": 1, "Update": {"MaxParallel": 1},
        "Tasks": [{"Name": "t", "Driver": "raw_exec", "Env": {"V": env}}], **group}]})


def test_a_replaced_allocation_frees_its_disk_within_the_plan() -> None:
    small = node(datacenter="dc1", attributes=FULL_FOR_ONE)
    disk = {"EphemeralDisk": {"SizeMB": 600}}
    v1 = plan_job(web("1", **disk), "e1", [small], []).new_allocs
    assert len(v1) == 1
    plan = plan_job(web("2", **disk), "e2", [small], v1, v1, replace={"g": 1})
    assert [a.id for a in plan.replaced] == [v1[0].id]
    assert plan.stopped_allocs[0].desired_status == DESIRED_STOP
    assert len(plan.new_allocs) == 1 and not plan.failed_groups, plan.failed_groups


def test_a_replaced_allocation_frees_its_static_port_within_the_plan() -> None:
    static = {"Networks": [{"ReservedPorts": [{"Label": "http", "Value": 8080}]}]}
    one = node(datacenter="dc1")
    v1 = plan_job(web("1", **static), "e1", [one], []).new_allocs
    assert len(v1) == 1
    plan = plan_job(web("2", **static), "e2", [one], v1, v1, replace={"g": 1})
    assert len(plan.new_allocs) == 1 and not plan.failed_groups, plan.failed_groups
    # Not stopped by the plan: still holds its port.
    blocked = plan_job(canonicalize_job({**web("1", **static), "ID": "other"}), "e3", [one],
                       [], v1)
    assert not blocked.new_allocs and blocked.failed_groups


async def test_a_destructive_update_on_a_full_node_places_in_the_same_evaluation(
        keyring: Keyring) -> None:
    server = make_server(keyring)
    try:
        await server.register_node(node(datacenter="dc1", attributes=FULL_FOR_ONE))
        disk = {"EphemeralDisk": {"SizeMB": 600}}
        await server.register_job(web("1", **disk))
        (old,) = server.job_allocs("web")
        await server.update_allocs_from_client([AllocUpdate(old.id, "running", "", {})])
        eval_id, _ = await server.register_job(web("2", **disk))
        placed = [a for a in server.job_allocs("web") if a.id != old.id]
        assert len(placed) == 1, server.job_allocs("web")
        stopped = server.allocation(old.id)
        assert stopped is not None and stopped.desired_status == DESIRED_STOP
        assert placed[0].eval_id == eval_id  # this evaluation, not a later retry
        evaluation = server.evaluation(eval_id)
        assert evaluation is not None and not evaluation.failed_tg_allocs
    finally:
        await server.close()
