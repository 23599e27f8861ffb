"""The README's tour, end to end against a real agent: run a raw_exec batch job, read its logs."""

from __future__ import annotations

from tests.integration.harness import AgentProcess, load_job, run_job, wait_client_status


async def test_hello_job_completes_and_logs(agent: AgentProcess) -> None:
    async with agent.api() as api:
        allocs = await run_job(api, load_job("hello.nomad.hcl"))
        alloc = await wait_client_status(api, allocs[0]["ID"], "complete", "failed")
        assert alloc["ClientStatus"] == "complete"
        logs = await api.alloc_logs(alloc["ID"], "hello")
        assert logs == b"hello from hello\n"
