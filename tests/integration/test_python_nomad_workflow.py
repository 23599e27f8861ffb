"""A user's day with python-nomad (unmodified) against a real agent with ACLs on: parse a
jobspec, validate, plan and register it, then read what Nomad's clients read — jobs, the job's
summary, versions, evaluations and allocations, nodes, files and logs of the running task —
flip the node's eligibility, and ask the cluster calls (agent members, regions, status leader
and peers, system gc).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import nomad
import pytest

from tests.integration.harness import AgentProcess, eventually
from tests.integration.test_variables_python_nomad import (
    _no_nomad_environment,
    call,
    started,
)

__all__ = ["_no_nomad_environment"]  # the autouse fixture, shared

pytestmark = pytest.mark.timeout(120)

AgentFactory = Callable[..., AgentProcess]
JOB_ID = "workflow"
SCRIPT = "echo hello from the task; echo data > $NOMAD_ALLOC_DIR/data/out.txt; exec sleep 600"
JOBSPEC = """
job "workflow" {
  datacenters = ["*"]
  type        = "service"

  group "web" {
    task "server" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", SCRIPT]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
""".replace("SCRIPT", json.dumps(SCRIPT))


async def running_alloc(api: nomad.Nomad) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        allocs = await call(api.job.get_allocations, JOB_ID)
        return next((a for a in allocs if a["ClientStatus"] == "running"), None)

    alloc: dict[str, Any] = await eventually(find, timeout=30, message="a running alloc")
    return alloc


async def test_a_job_from_jobspec_to_logs(agent_factory: AgentFactory) -> None:
    api = await started(agent_factory, acl=True)
    job = await call(api.jobs.parse, JOBSPEC)
    assert (job["ID"], job["Type"]) == (JOB_ID, "service")
    validated = (await call(api.validate.validate_job, {"Job": job})).json()
    assert not validated["ValidationErrors"] and not validated["Error"]
    plan = await call(api.job.plan_job, JOB_ID, {"Job": job}, True)
    assert plan["Diff"]["Type"] == "Added"
    registered = await call(api.jobs.register_job, {"Job": job})
    assert registered["EvalID"]

    alloc = await running_alloc(api)
    assert [j["ID"] for j in await call(api.jobs.get_jobs)] == [JOB_ID]
    assert (await call(api.job.get_job, JOB_ID))["TaskGroups"][0]["Name"] == "web"
    summary = await call(api.job.get_summary, JOB_ID)
    assert summary["Summary"]["web"]["Running"] == 1
    versions = await call(api.job.get_versions, JOB_ID)
    assert [v["Version"] for v in versions["Versions"]] == [0]

    evals = await call(api.job.get_evaluations, JOB_ID)
    assert registered["EvalID"] in [e["ID"] for e in evals]
    evaluation = await call(api.evaluation.get_evaluation, registered["EvalID"])
    assert evaluation["JobID"] == JOB_ID
    assert alloc["ID"] in [a["ID"] for a in await call(api.allocations.get_allocations)]
    assert (await call(api.allocation.get_allocation, alloc["ID"]))["JobID"] == JOB_ID

    names = [entry["Name"] for entry in await call(api.client.ls.list_files, alloc["ID"],
                                                   "alloc/data")]
    assert "out.txt" in names
    assert await call(api.client.cat.read_file, alloc["ID"], "alloc/data/out.txt") == "data\n"

    async def logged() -> bool:
        text = await call(api.client.stream_logs.stream, alloc["ID"], "server", "stdout",
                          False, 0, "start", True)
        return "hello from the task" in text

    await eventually(logged, timeout=15, message="the task's stdout")


async def test_nodes_and_cluster_calls(agent_factory: AgentFactory) -> None:
    api = await started(agent_factory, acl=True)
    nodes = await call(api.nodes.get_nodes)
    assert len(nodes) == 1
    node_id = nodes[0]["ID"]
    assert (await call(api.node.get_node, node_id))["ID"] == node_id
    assert await call(api.node.get_allocations, node_id) == []

    await call(api.node.eligible_node, node_id, None, True)
    assert (await call(api.node.get_node, node_id))["SchedulingEligibility"] == "ineligible"
    await call(api.node.eligible_node, node_id, True)
    assert (await call(api.node.get_node, node_id))["SchedulingEligibility"] == "eligible"

    members = await call(api.agent.get_members)
    assert len(members["Members"]) == 1
    assert await call(api.regions.get_regions) == ["global"]
    leader = await call(api.status.leader.get_leader)
    assert await call(api.status.peers.get_peers) == [leader]
    await call(api.system.initiate_garbage_collection)
