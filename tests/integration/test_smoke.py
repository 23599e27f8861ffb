"""The README's tour, end to end against a real agent: run a raw_exec batch job, read its logs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from nomad_client.api.client import ApiClient
from tests.integration.harness import (
    AgentProcess,
    eventually,
    is_alive,
    load_job,
    new_marker,
    procs_with,
    raw_exec_job,
    run_job,
    task_dir,
    wait_client_status,
)


async def test_hello_job_completes_and_logs(agent: AgentProcess) -> None:
    async with agent.api() as api:
        allocs = await run_job(api, load_job("hello.nomad.hcl"))
        alloc = await wait_client_status(api, allocs[0]["ID"], "complete", "failed")
        assert alloc["ClientStatus"] == "complete"
        logs = await api.alloc_logs(alloc["ID"], "hello")
        assert logs == b"hello from hello\n"


async def test_purged_job_allocations_are_garbage_collected(agent: AgentProcess) -> None:
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


async def test_dev_agent_stops_its_tasks_and_removes_its_data_dir_on_sigint() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nomad_client", "agent", "-dev", "-http-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    marker = new_marker()
    try:
        match = None
        while match is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "the dev agent exited before it started"
            match = re.search(r"started! HTTP API: (http://\S+) \(data dir (.+)\)", line)
        address, data_dir = match.group(1), Path(match.group(2))
        async with ApiClient(address, token="") as api:
            await api.job_register(raw_exec_job("dev", f"sleep 300; echo {marker}"))
            (task,) = await eventually(lambda: procs_with(marker), message="task running")
        assert data_dir.is_dir()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not is_alive(task)
        assert not data_dir.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for leftover in procs_with(marker):
            leftover.kill()
