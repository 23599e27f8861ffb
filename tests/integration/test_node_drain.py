"""Node eligibility and drain against a real agent (one node): an ineligible node gets no
new placements but keeps what runs, and a client re-registering (a metadata change) does not
make it eligible again; a drain with nowhere to move leaves the allocation running and
completes at its deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from nomad_client.api import ApiClient
from tests.integration.harness import AgentProcess, eventually, raw_exec_job, run_job

pytestmark = pytest.mark.timeout(120)

SLEEPER = "while :; do sleep 0.2; done"


async def node_id(api: ApiClient) -> str:
    nodes = await eventually(api.nodes_list, message="the node to register")
    return str(nodes[0]["ID"])


async def running(api: ApiClient, alloc_id: str) -> bool:
    return (await api.allocation_get(alloc_id))["ClientStatus"] == "running"


async def test_eligibility_and_drain_with_one_node(
        agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory()
    await agent.start()
    async with agent.api() as api:
        node = await node_id(api)
        [first] = await run_job(api, raw_exec_job("first", SLEEPER))
        await eventually(lambda: running(api, first["ID"]), message="the first job to run")

        await api.node_eligibility(node, eligible=False)
        await api.client_metadata_apply({"touched": "yes"})  # the client registers again

        async def registered_again() -> Any:
            shown = await api.node_get(node)
            return shown["Meta"].get("touched") == "yes" and shown
        shown = await eventually(registered_again, message="the client to register again")
        assert shown["SchedulingEligibility"] == "ineligible"
        await api.job_register(raw_exec_job("second", SLEEPER))

        async def second_blocked() -> Any:
            evals = await api.job_evaluations("second")
            return evals and evals[0]["FailedTGAllocs"]
        await eventually(second_blocked, message="the second job's failed placement")
        assert await api.job_allocations("second") == []
        assert await running(api, first["ID"])  # what ran stays

        await api.node_eligibility(node, eligible=True)
        [second] = await eventually(lambda: api.job_allocations("second"),
                                    message="the second job to be placed")
        assert second["NodeID"] == node

        await api.node_drain(node, 1_000_000_000)  # 1s: nowhere to move, so it waits
        draining = await api.node_get(node)
        assert draining["SchedulingEligibility"] == "ineligible"
        assert draining["DrainStrategy"]["DrainSpec"]["Deadline"] == 1_000_000_000

        async def drained() -> Any:
            shown = await api.node_get(node)
            return shown["DrainStrategy"] is None and shown
        done = await eventually(drained, message="the drain to complete at its deadline")
        assert done["LastDrain"]["Status"] == "complete"
        assert done["SchedulingEligibility"] == "ineligible"
        assert await running(api, first["ID"]) and await running(api, second["ID"])

        await api.node_drain(node, None, mark_eligible=True)
        assert (await api.node_get(node))["SchedulingEligibility"] == "eligible"
    await agent.stop()
