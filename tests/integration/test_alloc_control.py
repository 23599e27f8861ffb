"""Allocation control from inside a workload, end to end: a real agent with ACLs on, a job
whose task "ctl" calls its own Task API socket with its workload identity (``identity { env =
true }``) and a policy attached to its job (``acl policy apply -job``, granting
``alloc-lifecycle`` and ``read-job``). Through it, ctl signals its sibling "worker" (which
traps SIGUSR1), restarts it in place, reads its own allocation's resource usage, and stops an
allocation of another job, whose replacement then runs.

ctl serves the test: it runs each request file the test drops in its ``local/`` dir with
curl, so every call is made by the task's own process and credential.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_client.api import ApiClient
from nomad_client.jobspec import canonicalize_job
from tests.integration.harness import (
    NEEDS_CURL,
    REPO,
    AgentProcess,
    bootstrap_acls,
    eventually,
    raw_exec_job,
    run_job,
    task_dir,
    wait_client_status,
    wait_task_state,
)

pytestmark = [
    pytest.mark.timeout(120),
    NEEDS_CURL,
]

JOB = "ctl-demo"
# ctl: run each request file req.N, publish its output as out.N (renamed into place).
SERVE_REQUESTS = """cd "$NOMAD_TASK_DIR"
n=1
while :; do
  if [ -f "req.$n" ]; then
    sh "req.$n" > "part.$n" 2>&1
    mv "part.$n" "out.$n"
    n=$((n+1))
  else
    sleep 0.05
  fi
done"""
# worker: note each start, and each SIGUSR1, in the allocation's shared data dir.
WORKER = """data="$NOMAD_ALLOC_DIR/data"
trap 'echo usr1 >> "$data/signals"' USR1
echo "start $$" >> "$data/starts"
while :; do sleep 0.1; done"""
LIFECYCLE_POLICY = 'namespace "default" {\n  capabilities = ["alloc-lifecycle", "read-job"]\n}\n'
CLI = [sys.executable, "-m", "nomad_client"]


def control_job() -> dict[str, Any]:
    def task(name: str, script: str, **extra: Any) -> dict[str, Any]:
        return {"Name": name, "Driver": "raw_exec", "KillTimeout": 2_000_000_000,
                "Config": {"command": "/bin/sh", "args": ["-c", script]}, **extra}

    return canonicalize_job({"ID": JOB, "Type": "service", "TaskGroups": [{
        "Name": "g", "Count": 1,
        "Tasks": [task("ctl", SERVE_REQUESTS, Identity={"Env": True}),
                  task("worker", WORKER)]}]})


class Ctl:
    """Requests made by task ctl over its own socket, as its own identity."""

    def __init__(self, agent: AgentProcess, alloc_id: str) -> None:
        self.local = task_dir(agent, alloc_id, "ctl") / "local"
        self.numbers = itertools.count(1)

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        """(status, body) of one request the task makes."""
        number = next(self.numbers)
        data = f"-d '{json.dumps(body)}' " if body is not None else ""
        staged = self.local / f".staged.{number}"
        staged.write_text(
            'curl -s -w "\\n%{http_code}" --unix-socket "$NOMAD_SECRETS_DIR/api.sock" '
            f'-H "X-Nomad-Token: $NOMAD_TOKEN" -X {method} {data}'
            f'"http://localhost{path}"\n')
        staged.rename(self.local / f"req.{number}")
        out = self.local / f"out.{number}"
        await eventually(out.exists, timeout=30, message=f"ctl's answer to {method} {path}")
        text, _, status = out.read_text().rpartition("\n")
        return int(status or 0), text


async def attach_policy(agent: AgentProcess, token: str, rules_file: Path) -> None:
    """``acl policy apply -namespace default -job ctl-demo lifecycle <file>``, as an
    operator would."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")},
           "NOMAD_ADDR": agent.address, "NOMAD_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        *CLI, "acl", "policy", "apply", "-namespace", "default", "-job", JOB, "lifecycle",
        str(rules_file), env=env, cwd=str(REPO), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, output.decode()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_task_controls_allocations_through_its_socket(
        short_agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    agent = short_agent_factory(acl=True, task_api={"secrets_tmpfs": False})
    await agent.start()
    token = await bootstrap_acls(agent)
    async with ApiClient(agent.address, token=token) as api:
        (other,) = await run_job(api, raw_exec_job("other", "while :; do sleep 1; done",
                                                   kill_timeout_s=1))
        await wait_task_state(api, other["ID"], "t", "running")
        (alloc,) = await run_job(api, control_job())
        alloc_id = alloc["ID"]
        for task in ("ctl", "worker"):
            await wait_task_state(api, alloc_id, task, "running")
        ctl = Ctl(agent, alloc_id)
        data = agent.data_dir / "alloc" / alloc_id / "alloc" / "data"
        signal_worker = (f"/v1/client/allocation/{alloc_id}/signal",
                         {"Task": "worker", "Signal": "SIGUSR1"})
        await eventually(lambda: lines(data / "starts"), message="the worker to start")

        # Without a policy attached to its job, its identity may do none of it.
        status, text = await ctl.call("POST", *signal_worker)
        assert (status, text) == (403, "Permission denied")

        rules = tmp_path / "lifecycle.hcl"
        rules.write_text(LIFECYCLE_POLICY)
        await attach_policy(agent, token, rules)

        # Signal: the worker's trap runs.
        status, text = await ctl.call("POST", *signal_worker)
        assert (status, json.loads(text)) == (200, {"Index": 0})
        await eventually(lambda: lines(data / "signals") == ["usr1"],
                         message="the worker to catch SIGUSR1")
        assert (await ctl.call("POST", signal_worker[0],
                               {"Task": "worker", "Signal": "SIGNOPE"}))[0] == 400

        # Restart in place: a new process, one user restart on record, nothing failed.
        first_start = lines(data / "starts")
        status, text = await ctl.call("PUT", f"/v1/client/allocation/{alloc_id}/restart",
                                      {"TaskName": "worker"})
        assert status == 200, text
        await eventually(lambda: len(lines(data / "starts")) == 2,
                         message="the worker to start again")
        assert lines(data / "starts")[0] == first_start[0]

        async def restarted() -> dict[str, Any] | None:
            states = (await api.allocation_get(alloc_id))["TaskStates"]
            worker = states["worker"]
            started = worker["Events"][-1]["Type"] == "Started"
            return states if worker["Restarts"] == 1 and started else None
        states = await eventually(restarted, message="the worker's restart to be reported")
        worker = states["worker"]
        assert worker["State"] == "running" and not worker["Failed"]
        kinds = [e["Type"] for e in worker["Events"]]
        assert kinds[-5:] == ["Restart Signaled", "Terminated", "Restarting", "Task Setup",
                              "Started"], kinds
        signaled = next(e for e in worker["Events"] if e["Type"] == "Restart Signaled")
        assert signaled["RestartReason"] == "User requested task to restart"
        assert states["ctl"]["Restarts"] == 0

        # Its own allocation's resource usage: ctl's process tree holds memory.
        status, text = await ctl.call("GET", f"/v1/client/allocation/{alloc_id}/stats")
        assert status == 200, text
        stats = json.loads(text)
        ctl_usage = stats["Tasks"]["ctl"]["ResourceUsage"]
        assert ctl_usage["MemoryStats"]["RSS"] > 0
        assert len(stats["Tasks"]["ctl"]["Pids"]) >= 2  # the executor, the shell, ...
        assert stats["ResourceUsage"]["MemoryStats"]["RSS"] >= ctl_usage["MemoryStats"]["RSS"]

        # Stop another job's allocation: it ends, and a replacement of the same name runs.
        status, text = await ctl.call("POST", f"/v1/allocation/{other['ID']}/stop")
        assert status == 200, text
        assert set(json.loads(text)) == {"EvalID", "Index"}
        stopped = await wait_client_status(api, other["ID"], "complete")
        assert stopped["DesiredStatus"] == "stop"
        assert stopped["DesiredTransition"]["Migrate"] is True

        async def replacement() -> dict[str, Any] | None:
            allocs = await api.job_allocations("other")
            return next((a for a in allocs if a["ID"] != other["ID"]
                         and a["ClientStatus"] == "running"), None)
        new = await eventually(replacement, timeout=30, message="other's replacement to run")
        assert new["Name"] == other["Name"] == "other.g[0]"
    await agent.stop()


async def test_python_nomad_controls_an_allocation(
        agent_factory: Callable[..., AgentProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same routes as a third-party client calls them (python-nomad)."""
    import nomad

    for name in [n for n in os.environ if n.startswith("NOMAD_")]:
        monkeypatch.delenv(name)  # python-nomad would read them
    agent = agent_factory()
    await agent.start()
    client = nomad.Nomad(address=agent.address, timeout=30)
    async with agent.api() as api:
        (alloc,) = await run_job(api, raw_exec_job("py", "while :; do sleep 0.1; done",
                                                   kill_timeout_s=1))
        alloc_id = alloc["ID"]
        await wait_task_state(api, alloc_id, "t", "running")

        stats = await asyncio.to_thread(client.client.allocation.read_allocation_stats,
                                        alloc_id)
        assert stats["Tasks"]["t"]["ResourceUsage"]["MemoryStats"]["RSS"] > 0
        host = await asyncio.to_thread(client.client.stats.read_stats)
        assert host["Memory"]["Total"] > 0 and host["CPU"]
        # SIGWINCH: ignored by the shell, so the task runs on.
        assert await asyncio.to_thread(client.client.allocation.signal_allocation, alloc_id,
                                       "SIGWINCH", "t") == {"Index": 0}
        assert await asyncio.to_thread(client.client.allocation.restart_allocation,
                                       alloc_id) == {"Index": 0}

        async def restarted() -> dict[str, Any] | None:
            state = (await api.allocation_get(alloc_id))["TaskStates"]["t"]
            return state if state["Restarts"] == 1 and state["State"] == "running" else None
        state = await eventually(restarted, message="the task to run again")
        assert [e["Type"] for e in state["Events"]].count("Signaling") == 1
        stopped = await asyncio.to_thread(client.allocation.stop_allocation, alloc_id)
        assert set(stopped) == {"EvalID", "Index"}
        await wait_client_status(api, alloc_id, "complete")
    await agent.stop()
