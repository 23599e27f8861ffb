"""Task lifecycle against a real agent running real raw_exec processes: start, stop (the
whole process tree), batch success and failure with restarts, kill timeouts, placement
failures and retries, and what a task finds in its environment and directories.

Touches only the agents the fixtures start and the processes their tasks spawn (found by a
unique marker in their command lines).
"""

from __future__ import annotations

import stat
import time
import uuid
from typing import Any

import psutil

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

# Short delays so restarts happen within the test's time budget (durations are in ns).
FAST_FAIL = {"Attempts": 2, "Interval": int(60e9), "Delay": int(0.2e9), "Mode": "fail"}
NO_RESTARTS = {"Attempts": 0, "Interval": int(60e9), "Delay": int(0.2e9), "Mode": "fail"}





def _events(alloc: dict[str, Any], task: str = "t") -> list[dict[str, Any]]:
    return list(alloc["TaskStates"][task]["Events"])



async def _task_tree(marker: str) -> list[psutil.Process]:
    """The task's main process (carrying the marker) and all its descendants."""
    async def tree() -> list[psutil.Process]:
        roots = procs_with(marker)
        if len(roots) != 1:
            return []
        kids = roots[0].children(recursive=True)
        return [roots[0], *kids] if kids else []
    return await eventually(tree, timeout=10, message=f"process tree of {marker}")


async def test_service_starts_and_job_stop_kills_the_whole_tree(agent: AgentProcess) -> None:
    marker = new_marker()
    # The task's shell starts a background child and waits: stopping the task must take
    # down the child too, not just the shell.
    job = raw_exec_job("svc", f": {marker}; sleep 300 & wait", kill_timeout_s=3)
    async with agent.api() as api:
        allocs = await run_job(api, job)
        alloc = await wait_task_state(api, allocs[0]["ID"], "t", "running")
        assert alloc["ClientStatus"] == "running"
        assert "Started" in event_types(alloc)
        tree = await _task_tree(marker)
        assert any("sleep" in " ".join(p.cmdline()) for p in tree[1:])

        await api.job_deregister("svc")
        alloc = await wait_client_status(api, alloc["ID"], "complete", "failed")
        types = event_types(alloc)
        assert alloc["TaskStates"]["t"]["State"] == "dead"
        assert types.index("Killing") < types.index("Killed")
        assert "Not Restarting" not in types
        still_alive = [p.pid for p in tree if is_alive(p)]
        assert still_alive == [], f"processes survived job stop: {still_alive}"
        assert alloc["DesiredStatus"] == "stop"


async def test_batch_success_completes(agent: AgentProcess) -> None:
    async with agent.api() as api:
        allocs = await run_job(api, raw_exec_job("ok", "exit 0", job_type="batch",
                                                 restart=FAST_FAIL))
        alloc = await wait_client_status(api, allocs[0]["ID"], "complete", "failed")
        state = alloc["TaskStates"]["t"]
        assert alloc["ClientStatus"] == "complete"
        assert state["State"] == "dead" and state["Failed"] is False
        assert state["Restarts"] == 0
        terminated = [e for e in state["Events"] if e["Type"] == "Terminated"]
        assert [e["ExitCode"] for e in terminated] == [0]
        assert "Restarting" not in event_types(alloc)


async def test_batch_failure_restarts_per_policy_then_fails(agent: AgentProcess) -> None:
    async with agent.api() as api:
        allocs = await run_job(api, raw_exec_job("bad", "exit 3", job_type="batch",
                                                 restart=FAST_FAIL))
        alloc = await wait_client_status(api, allocs[0]["ID"], "complete", "failed")
        state = alloc["TaskStates"]["t"]
        assert alloc["ClientStatus"] == "failed"
        assert state["State"] == "dead" and state["Failed"] is True
        assert state["Restarts"] == 2  # Attempts = 2
        types = event_types(alloc)
        assert types.count("Restarting") == 2
        assert types[-1] == "Not Restarting"
        last = state["Events"][-1]
        assert last["FailsTask"] is True
        assert "Exceeded allowed attempts 2" in last["DisplayMessage"]
        exits = [e["ExitCode"] for e in state["Events"] if e["Type"] == "Terminated"]
        assert exits and set(exits) == {3}


async def test_task_ignoring_sigint_is_killed_after_kill_timeout(agent: AgentProcess) -> None:
    marker = new_marker()
    kill_timeout = 1.5
    script = f": {marker}; trap 'echo got-int' INT; while :; do sleep 0.1; done"
    async with agent.api() as api:
        allocs = await run_job(api, raw_exec_job("stubborn", script,
                                                 kill_timeout_s=kill_timeout))
        alloc_id = allocs[0]["ID"]
        await wait_task_state(api, alloc_id, "t", "running")
        [shell] = await eventually(lambda: procs_with(marker), message="task shell")

        stop_sent = time.monotonic()
        await api.job_deregister("stubborn")
        # Half-way through the kill timeout the task has had SIGINT and is still there.
        async def interrupted() -> bool:
            return b"got-int" in await api.alloc_logs(alloc_id, "t")
        await eventually(interrupted, timeout=kill_timeout, interval=0.05,
                         message="task to receive SIGINT")
        assert is_alive(shell), "task died on SIGINT although it traps it"

        alloc = await wait_client_status(api, alloc_id, "complete", "failed")
        elapsed = time.monotonic() - stop_sent
        assert not is_alive(shell)
        events = _events(alloc)
        killing = next(e for e in events if e["Type"] == "Killing")
        killed = next(e for e in events if e["Type"] == "Killed")
        assert killing["KillTimeout"] == int(kill_timeout * 1e9)
        assert (killed["Time"] - killing["Time"]) / 1e9 >= kill_timeout * 0.9
        assert elapsed >= kill_timeout * 0.9


async def test_job_needing_missing_driver_is_not_placed(agent: AgentProcess) -> None:
    job = raw_exec_job("dock", "true", extra_task={"Driver": "docker",
                                                    "Config": {"image": "busybox"}})
    async with agent.api() as api:
        resp = await api.job_register(job)
        evaluation = await api.evaluation_get(resp["EvalID"])
        failed = evaluation["FailedTGAllocs"]
        assert set(failed) == {"g"}
        reasons = failed["g"]["ConstraintFiltered"]
        assert any("docker" in reason for reason in reasons), reasons
        assert evaluation["QueuedAllocations"] == {"g": 1}
        assert await api.job_allocations("dock") == []


async def test_meta_constraint_placed_once_node_gains_meta(agent: AgentProcess) -> None:
    rack = f"r-{uuid.uuid4().hex[:6]}"
    job = raw_exec_job("racked", "sleep 300", kill_timeout_s=1)
    job["Constraints"] = [{"LTarget": "${meta.rack}", "RTarget": rack, "Operand": "="}]
    async with agent.api() as api:
        resp = await api.job_register(job)
        evaluation = await api.evaluation_get(resp["EvalID"])
        assert "g" in (evaluation["FailedTGAllocs"] or {})
        assert await api.job_allocations("racked") == []

        started = time.monotonic()
        await api.client_metadata_apply({"rack": rack})
        allocs = await eventually(lambda: api.job_allocations("racked"), timeout=3,
                                  message="placement after the node gained meta.rack")
        assert time.monotonic() - started < 3
        assert len(allocs) == 1
        node = await api.node_get(allocs[0]["NodeID"])
        assert node["Meta"]["rack"] == rack
        await wait_task_state(api, allocs[0]["ID"], "t", "running")


async def _logs(api: ApiClient, alloc_id: str) -> str:
    return (await api.alloc_logs(alloc_id, "t")).decode()


async def test_task_environment_and_secrets_dir(agent: AgentProcess) -> None:
    job = raw_exec_job("envjob", "env", job_type="batch", restart=NO_RESTARTS)
    job["Meta"] = {"owner": "team-a"}
    async with agent.api() as api:
        allocs = await run_job(api, job)
        alloc_id = allocs[0]["ID"]
        alloc = await wait_client_status(api, alloc_id, "complete", "failed")
        assert alloc["ClientStatus"] == "complete"
        lines = (await _logs(api, alloc_id)).splitlines()
        env = dict(line.split("=", 1) for line in lines if "=" in line)
        secrets = task_dir(agent, alloc_id, "t") / "secrets"
        assert env["NOMAD_ALLOC_ID"] == alloc_id
        assert env["NOMAD_TASK_NAME"] == "t"
        assert env["NOMAD_JOB_ID"] == "envjob"
        assert env["NOMAD_SECRETS_DIR"] == str(secrets)
        assert env["NOMAD_META_owner"] == "team-a"
        assert env["NOMAD_META_OWNER"] == "team-a"
        mode = secrets.stat().st_mode
        assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o700
