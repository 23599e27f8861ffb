"""Our JSON carries every field Nomad's ``api`` package declares for the objects its clients
read: each object is served by a real in-process agent (server, client, mock driver) and its
keys must include Nomad's; keys of ours that Nomad lacks are reported, not refused.

``nomad_api_fields.json`` holds, per struct, the JSON names of Nomad's fields: from the
struct declarations of ``api/jobs.go`` (Job, JobListStub, JobSummary), ``api/tasks.go``
(TaskGroup, Task, TaskState), ``api/allocations.go`` (Allocation, AllocationListStub),
``api/nodes.go`` (Node, NodeListStub), ``api/evaluations.go`` (Evaluation) and
``api/agent.go`` (AgentMember), each exported field under its ``json`` tag name (the field
name when the tag has none; ``json:"-"`` fields left out). Fields tagged ``omitempty`` are
listed apart: Go leaves them out when empty, so they are not required. ``AgentConfig`` is
the top-level fields of the agent's ``Config`` (``command/agent/config.go``), which
``/v1/agent/self`` encodes under ``config``; ``AgentStats`` the sections an agent running
both server and client reports under ``stats`` (the server's ``Stats()`` and the client's).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nomad_client.client.drivers.mock import MockDriver
from nomad_client.server.keyring import Keyring
from tests.unit.factories import InProcessAgent, call_http, start_agent, wait_until

FIELDS: dict[str, dict[str, list[str]]] = json.loads(
    (Path(__file__).parent / "nomad_api_fields.json").read_text())

JOB = {"ID": "shape", "Type": "service", "Datacenters": ["dc1"], "Meta": {"team": "a"},
       "TaskGroups": [{"Name": "g", "Count": 1, "Tasks": [
           {"Name": "t", "Driver": "mock_driver", "Config": {"run_for": "1h"}}]}]}


@pytest.fixture
async def served(workdir: Path, keyring: Keyring) -> AsyncIterator[dict[str, Any]]:
    """Each object of the table, as the agent serves it, once a task of its runs."""
    agent = await start_agent(workdir, keyring, drivers={"mock_driver": MockDriver()})
    try:
        async with aiohttp.ClientSession() as session:
            yield await _objects(agent, session)
    finally:
        await agent.stop()


async def _objects(agent: InProcessAgent, session: aiohttp.ClientSession) -> dict[str, Any]:
    async def get(path: str) -> Any:
        answer = await call_http(session, agent.api.url, "GET", path)
        assert answer.status == 200, (path, answer.body)
        return answer.body

    registered = await call_http(session, agent.api.url, "PUT", "/v1/jobs", {"Job": JOB})
    assert registered.status == 200, registered.body
    server = agent.server
    await wait_until(lambda: any(a.task_states.get("t") for a in server.job_allocs("shape")),
                     "the task to report its state")
    (alloc_stub,) = await get("/v1/job/shape/allocations")
    alloc = await get(f"/v1/allocation/{alloc_stub['ID']}")
    job = await get("/v1/job/shape")
    job_stub = (await get("/v1/jobs?prefix=shape"))[0]
    node = await get(f"/v1/node/{alloc['NodeID']}")
    agent_self = await get("/v1/agent/self")
    return {
        "Job": job, "JobListStub": job_stub, "JobSummary": job_stub["JobSummary"],
        "TaskGroup": job["TaskGroups"][0], "Task": job["TaskGroups"][0]["Tasks"][0],
        "TaskState": alloc["TaskStates"]["t"], "Allocation": alloc,
        "AllocationListStub": (await get("/v1/allocations"))[0],
        "Node": node, "NodeListStub": (await get("/v1/nodes"))[0],
        "Evaluation": await get(f"/v1/evaluation/{alloc['EvalID']}"),
        "AgentMember": agent_self["member"], "AgentConfig": agent_self["config"],
        "AgentStats": agent_self["stats"],
    }


@pytest.mark.parametrize("struct", sorted(FIELDS))
async def test_our_json_has_every_field_nomads_api_declares(
        served: dict[str, Any], struct: str, record_property: Any) -> None:
    ours = served[struct]
    assert isinstance(ours, dict), (struct, ours)
    declared = FIELDS[struct]
    missing = sorted(set(declared["fields"]) - set(ours))
    extras = sorted(set(ours) - set(declared["fields"]) - set(declared["omitempty"]))
    record_property("extra_fields", extras)  # ours only: reported, not an error
    assert not missing, f"{struct} lacks Nomad's {missing} (extras of ours: {extras})"
