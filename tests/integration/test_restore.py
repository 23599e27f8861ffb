"""Agent restarts with the same data dir: running tasks are reattached (not restarted),
finished work is not redone, and a task that ended while no agent was watching still has
its real exit status reported.

Touches only the agents the fixtures start and the processes their tasks spawn (found by a
unique marker in their command lines).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from nomad_client.api.client import ApiClient
from tests.integration.harness import (
    AgentProcess,
    event_types,
    eventually,
    is_alive,
    new_marker,
    procs_with,
    raw_exec_job,
    run_job,
    task_dir,
    wait_client_status,
    wait_task_state,
)

NO_RESTARTS = {"Attempts": 0, "Interval": int(60e9), "Delay": int(0.2e9), "Mode": "fail"}
# Keeps a task whose starts fail retrying (pending) for the whole test.
KEEP_RETRYING = {"Attempts": 100, "Interval": int(3600e9), "Delay": int(0.5e9), "Mode": "fail"}

AgentFactory = Callable[..., AgentProcess]


async def _restored(api: ApiClient, alloc_id: str, before: dict[str, Any]) -> dict[str, Any]:
    """Wait until the restarted agent's client has reported on the allocation again (every
    client report stamps a new ModifyTime)."""
    async def check() -> dict[str, Any] | None:
        alloc = await api.allocation_get(alloc_id)
        return alloc if alloc["ModifyTime"] > before["ModifyTime"] else None
    return await eventually(check, message="the restarted client to report the allocation")


async def _running_service(api: ApiClient, job_id: str, marker: str
                           ) -> tuple[dict[str, Any], psutil.Process]:
    allocs = await run_job(api, raw_exec_job(job_id, f": {marker}; sleep 300 & wait",
                                             kill_timeout_s=2))
    alloc = await wait_task_state(api, allocs[0]["ID"], "t", "running")
    [shell] = await eventually(lambda: procs_with(marker), message="task process")
    return alloc, shell


async def _stop_and_check_gone(api: ApiClient, alloc_id: str, job_id: str,
                               procs: list[psutil.Process]) -> None:
    await api.job_deregister(job_id)
    alloc = await wait_client_status(api, alloc_id, "complete", "failed")
    assert "Killed" in event_types(alloc)
    assert [p.pid for p in procs if is_alive(p)] == []


async def _reattach_after(agent: AgentProcess, end: str) -> None:
    marker = new_marker()
    async with agent.api() as api:
        before, shell = await _running_service(api, "svc", marker)
        tree = [shell, *shell.children(recursive=True)]
    if end == "kill":
        await agent.kill()
    else:
        assert await agent.stop() == 0, agent.output
    assert is_alive(shell), f"task died with the agent ({end})"

    await agent.start()
    async with agent.api() as api:
        alloc = await _restored(api, before["ID"], before)
        state = alloc["TaskStates"]["t"]
        assert alloc["ClientStatus"] == "running"
        assert state["State"] == "running"
        assert state["Restarts"] == 0
        assert event_types(alloc).count("Started") == 1
        assert "Failed Restoring Task" not in event_types(alloc)
        assert state["StartedAt"] == before["TaskStates"]["t"]["StartedAt"]
        [same] = procs_with(marker)
        assert same.pid == shell.pid and is_alive(shell)
        # The reattached task is still under the agent's control.
        await _stop_and_check_gone(api, alloc["ID"], "svc", tree)


async def test_sigkilled_agent_reattaches_running_task(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    await _reattach_after(agent, "kill")


async def test_graceful_stop_leaves_tasks_running_and_reattaches(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    await _reattach_after(agent, "term")


async def test_completed_batch_task_is_not_rerun(agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    script = 'echo ran >> "$NOMAD_ALLOC_DIR/data/runs"'
    async with agent.api() as api:
        allocs = await run_job(api, raw_exec_job("once", script, job_type="batch",
                                                 restart=NO_RESTARTS))
        before = await wait_client_status(api, allocs[0]["ID"], "complete", "failed")
        assert before["ClientStatus"] == "complete"
    runs = task_dir(agent, before["ID"], "t").parent / "alloc" / "data" / "runs"
    assert runs.read_text() == "ran\n"

    await agent.kill()
    await agent.start()
    async with agent.api() as api:
        alloc = await _restored(api, before["ID"], before)
        assert alloc["ClientStatus"] == "complete"
        assert event_types(alloc).count("Started") == 1
        assert alloc["TaskStates"]["t"]["Events"] == before["TaskStates"]["t"]["Events"]
        assert len(await api.job_allocations("once")) == 1
    assert runs.read_text() == "ran\n"


async def test_exit_while_agent_down_is_reported_after_restart(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    marker = new_marker()
    async with agent.api() as api:
        allocs = await run_job(api, raw_exec_job("sevens", f": {marker}; sleep 2; exit 7",
                                                 job_type="batch", restart=NO_RESTARTS))
        before = await wait_task_state(api, allocs[0]["ID"], "t", "running")
    await agent.kill()
    # The task ends on its own while no agent is running.
    await eventually(lambda: not procs_with(marker), timeout=5,
                     message="the task to exit while the agent is down")

    await agent.start()
    async with agent.api() as api:
        alloc = await wait_client_status(api, before["ID"], "complete", "failed")
        state = alloc["TaskStates"]["t"]
        # The exit happened during the outage: it must be learned, not re-caused by a rerun.
        assert "Failed Restoring Task" not in event_types(alloc), event_types(alloc)
        assert event_types(alloc).count("Started") == 1, event_types(alloc)
        terminated = [e for e in state["Events"] if e["Type"] == "Terminated"]
        assert [e["ExitCode"] for e in terminated] == [7], state["Events"]
        assert state["State"] == "dead" and state["Failed"] is True
        assert alloc["ClientStatus"] == "failed"


@pytest.mark.skipif(os.geteuid() != 0, reason="running a task as another user needs root")
async def test_task_that_breaks_its_restore_is_killed_not_abandoned(
        short_agent_factory: AgentFactory) -> None:
    """A task swaps its own ``secrets`` dir for a symlink, so after an agent crash the
    restored task's prestart fails on every attempt. The reattached process must be killed,
    never left running behind a task reported dead."""
    # A plain secrets dir: a tmpfs one is a mount point, which the task cannot move away.
    agent = short_agent_factory(task_api={"secrets_tmpfs": False})
    await agent.start()
    marker = new_marker()
    swap_secrets = "mv secrets secrets.gone && ln -s local secrets"
    job = raw_exec_job("swapper", f": {marker}; {swap_secrets}; sleep 300 & wait",
                       user="nobody", restart=KEEP_RETRYING, kill_timeout_s=1)
    tree: list[psutil.Process] = []
    try:
        async with agent.api() as api:
            allocs = await run_job(api, job)
            alloc_id = allocs[0]["ID"]
            await wait_task_state(api, alloc_id, "t", "running")
        secrets = task_dir(agent, alloc_id, "t") / "secrets"
        await eventually(secrets.is_symlink, message="the task to swap its secrets dir")
        [shell] = await eventually(lambda: procs_with(marker), message="task process")
        tree = [shell]
        tree += await eventually(lambda: shell.children(recursive=True),
                                 message="the task's background sleep")

        await agent.kill()
        assert is_alive(shell), "task died with the agent"
        await agent.start()
        async with agent.api() as api:
            await eventually(lambda: _hook_failures(api, alloc_id),
                             message="the restored task's prestart to fail")
            await api.job_deregister("swapper")
            alloc = await wait_task_state(api, alloc_id, "t", "dead")
            # Dead only once the process is gone: no grace period here.
            assert [p.pid for p in tree if is_alive(p)] == [], event_types(alloc)
            assert alloc["ClientStatus"] in ("complete", "failed")
            messages = [e["DisplayMessage"] for e in alloc["TaskStates"]["t"]["Events"]]
            assert any("killing it" in msg for msg in messages), messages
    finally:
        for proc in [*tree, *procs_with(marker)]:
            if is_alive(proc):
                proc.kill()


async def _hook_failures(api: ApiClient, alloc_id: str) -> int:
    alloc = await api.allocation_get(alloc_id)
    return event_types(alloc).count("Task hook failed")
