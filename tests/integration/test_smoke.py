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


async def test_purged_job_allocations_are_garbage_collected(agent: AgentProcess) -> None:
    from tests.integration.harness import eventually, raw_exec_job, task_dir

    async with agent.api() as api:
        job = raw_exec_job("gc-me", "sleep 300")
        allocs = await run_job(api, job)
        alloc_id = allocs[0]["ID"]
        await eventually(lambda: task_dir(agent, alloc_id, "t").is_dir(), message="task dir")
        await api.job_deregister("gc-me", purge=True)

        async def gone() -> bool:
            return await api.allocations_list() == [] and \
                not task_dir(agent, alloc_id, "t").parent.exists()
        await eventually(gone, message="allocation and its directory removed")
