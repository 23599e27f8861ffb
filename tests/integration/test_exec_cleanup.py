"""What an ``exec`` task leaves behind on a real agent: nothing, whichever way it ends.

* The agent is SIGKILLed with the task running, and the test harness cleans up: no
  process, no cgroup and no mount of that agent remain (the task's cwd reads ``/`` in its
  chroot, so only its cgroup finds it).
* The job is stopped, the allocation collected and the agent shut down: the agent's parent
  cgroup goes too (it is made by the first exec task, never by fingerprinting).
* An agent restarted after a crash removes a task cgroup no restored task names (and kills
  its processes), and keeps the restored task's.

Skipped, with the driver's reason, where the node cannot run exec tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from nomad_client.client import cgroups
from tests.integration.harness import (
    AgentProcess,
    eventually,
    is_alive,
    kill_exec_leftovers,
    new_marker,
    procs_with,
    run_job,
    wait_task_state,
)
from tests.integration.test_exec_driver import (
    AgentFactory,
    exec_agents,  # noqa: F401  (a fixture)
    exec_job,
    mounts_under,
    start_exec_agent,
    stop_and_collect,
    task_cgroup,
)

STRAY_LIMITS = cgroups.CgroupLimits(memory_bytes=64 << 20, memory_max_bytes=None,
                                    cpu_shares=100)


def parent_dirs(agent: AgentProcess) -> list[Path]:
    """The agent's parent cgroup directories that exist, in either cgroup version."""
    parent = cgroups.agent_parent(agent.data_dir)
    return [d for d in cgroups.DEFAULT_ROOT.glob(f"*/{parent}") if d.is_dir()] + \
        [d for d in [cgroups.DEFAULT_ROOT / parent] if d.is_dir()]


def procs_of(agent: AgentProcess) -> list[psutil.Process]:
    """Processes naming the agent's data dir in their command line or cwd (its executors)."""
    inside = str(agent.data_dir)
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or ())
        if inside in cmdline or (proc.info.get("cwd") or "").startswith(inside):
            found.append(proc)
    return found


async def start_sleeper(make: AgentFactory, job_id: str
                        ) -> tuple[AgentProcess, str, list[psutil.Process]]:
    """An agent running exec job ``job_id`` (a sleeper); its alloc ID and the task's
    processes (found by their marker)."""
    agent, _ = await start_exec_agent(make)
    marker = new_marker()
    async with agent.api() as api:
        (alloc,) = await run_job(api, exec_job(job_id, f": {marker}; sleep 600 & wait",
                                               kill_timeout_s=1))
        await wait_task_state(api, alloc["ID"], "t", "running")
    procs = await eventually(lambda: procs_with(marker), message="the task's processes")
    cgroup = task_cgroup(agent, alloc["ID"])
    assert cgroup is not None and procs[0].pid in cgroup.pids()
    return agent, alloc["ID"], procs


async def test_sigkilled_agent_leaves_nothing_after_the_harness_cleans_up(
        exec_agents: AgentFactory) -> None:  # noqa: F811
    agent, alloc_id, procs = await start_sleeper(exec_agents, "orphaned")
    assert parent_dirs(agent) != []
    assert mounts_under(agent.data_dir) != []  # the task's secrets tmpfs, in our namespace
    await agent.kill()
    assert all(is_alive(p) for p in procs)  # tasks outlive a killed agent by design

    assert kill_exec_leftovers(agent.data_dir) == [cgroups.task_cgroup_name(alloc_id, "t")]
    await eventually(lambda: not any(is_alive(p) for p in procs),
                     message="the task's processes to die")
    # Its executor, outside the cgroup, ends with the task.
    await eventually(lambda: not [p for p in procs_of(agent) if is_alive(p)],
                     message="the agent's executors to exit")
    assert parent_dirs(agent) == []
    assert mounts_under(agent.data_dir) == []


async def test_stopped_job_collected_alloc_and_shutdown_remove_the_parent(
        exec_agents: AgentFactory) -> None:  # noqa: F811
    agent, alloc_id, procs = await start_sleeper(exec_agents, "tidy")
    async with agent.api() as api:
        await stop_and_collect(api, agent, "tidy", alloc_id, procs)
    assert parent_dirs(agent) != []  # the agent keeps it while it runs
    assert await agent.stop() == 0
    assert parent_dirs(agent) == []


@pytest.fixture
async def stray_sleepers() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_restart_removes_stray_cgroups_and_keeps_the_restored_tasks(
        exec_agents: AgentFactory,  # noqa: F811
        stray_sleepers: list[asyncio.subprocess.Process]) -> None:
    agent, alloc_id, procs = await start_sleeper(exec_agents, "survivor")
    await agent.kill()

    # While the agent is down: a task cgroup no allocation of it names, with a process.
    manager = cgroups.CgroupManager.detect(parent=cgroups.agent_parent(agent.data_dir))
    stray = manager.create("stray.t", STRAY_LIMITS)
    join = "; ".join(f"echo $$ > {f}" for f in stray.procs_files)
    stray_sleepers.append(await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", f"{join}; exec sleep 600"))
    await eventually(lambda: stray.pids() == [stray_sleepers[0].pid],
                     message="the stray sleeper in its cgroup")

    await agent.start()
    await eventually(lambda: manager.open("stray.t") is None,
                     message="the stray cgroup to be removed")
    assert await asyncio.wait_for(stray_sleepers[0].wait(), 10) == -9
    kept = task_cgroup(agent, alloc_id)
    assert kept is not None and procs[0].pid in kept.pids()
    assert all(is_alive(p) for p in procs)
    async with agent.api() as api:
        await wait_task_state(api, alloc_id, "t", "running")
        await stop_and_collect(api, agent, "survivor", alloc_id, procs)
