"""The ``exec`` driver on a real agent: a task in its own namespaces, root and cgroup.

What a task sees (its root, its processes, its user), the spec's Task API example with
``network { mode = "none" }`` (the agent's TCP address out of reach, its socket the one way
in; ACLs off and on), an OOM kill, a reattach after the agent is SIGKILLed, and that nothing
remains once the job is stopped and the allocation collected.

Skipped, with the driver's own reason, where the node cannot isolate tasks (not root, no
namespaces, no cgroups). Touches only the agents the fixtures start, their tasks (found by a
marker in their command lines) and the agents' own cgroups.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from nomad_client.api.client import ApiClient
from nomad_client.client import cgroups
from nomad_client.jobspec import canonicalize_job
from tests.integration.harness import (
    POLICY_DIR,
    AgentProcess,
    bootstrap_acls,
    eventually,
    is_alive,
    load_job,
    new_marker,
    procs_with,
    raw_exec_job,
    run_job,
    task_dir,
    wait_client_status,
    wait_task_state,
)

AgentFactory = Callable[..., AgentProcess]
ENV_IDENTITY = {"Env": True}
NO_RESTARTS = {"Attempts": 0, "Interval": int(60e9), "Delay": int(1e9), "Mode": "fail"}


@pytest.fixture
async def exec_agents(short_agent_factory: AgentFactory) -> AsyncIterator[AgentFactory]:
    """Agents whose cgroups are removed afterwards (a test that fails midway may leave
    tasks that outlive the agent, and they live in those cgroups)."""
    made: list[AgentProcess] = []

    def make(name: str = "a", **kwargs: Any) -> AgentProcess:
        agent = short_agent_factory(name, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.kill()
        try:
            manager = cgroups.CgroupManager.detect(parent=cgroups.agent_parent(agent.data_dir))
        except cgroups.CgroupsUnavailable:
            continue
        manager.destroy_parent()


async def start_exec_agent(make: AgentFactory, *, acl: bool = False
                           ) -> tuple[AgentProcess, str | None]:
    """A started agent whose node runs exec tasks, and its management token (ACLs on); the
    test is skipped with the driver's reason where the node cannot run them."""
    agent = make(acl=acl)
    await agent.start()
    token = await bootstrap_acls(agent) if acl else None
    async with agent.api(token) as api:
        async def node() -> dict[str, Any] | None:
            nodes = await api.nodes_list()
            return await api.node_get(nodes[0]["ID"]) if nodes else None
        found = await eventually(node, message="the node")
    driver = found["Drivers"]["exec"]
    if not driver["Healthy"]:
        pytest.skip(f"exec driver unavailable: {driver['HealthDescription']}")
    return agent, token


def exec_job(job_id: str, script: str, *, network_mode: str | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """A canonical job whose task ``t`` runs ``/bin/sh -c script`` with exec."""
    job = raw_exec_job(job_id, script, **kwargs)
    group = job["TaskGroups"][0]
    group["Tasks"][0]["Driver"] = "exec"
    if network_mode is not None:
        group["Networks"] = [{"Mode": network_mode}]
    return canonicalize_job(job)


def local_file(agent: AgentProcess, alloc_id: str, name: str) -> Path:
    return task_dir(agent, alloc_id, "t") / "local" / name


async def read_when_written(agent: AgentProcess, alloc_id: str, name: str) -> str:
    """A file the task writes in ``/local`` and finishes with a line ``done``."""
    path = local_file(agent, alloc_id, name)

    def done() -> str | None:
        text = path.read_text() if path.exists() else ""
        return text if text.endswith("done\n") else None
    text: str = await eventually(done, message=f"the task's {name}")
    return text


def task_cgroup(agent: AgentProcess, alloc_id: str) -> cgroups.TaskCgroup | None:
    manager = cgroups.CgroupManager.detect(parent=cgroups.agent_parent(agent.data_dir))
    return manager.open(cgroups.task_cgroup_name(alloc_id, "t"))


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line for line in fh if str(path) in line]


async def stop_and_collect(api: ApiClient, agent: AgentProcess, job_id: str, alloc_id: str,
                           procs: list[psutil.Process]) -> None:
    """Stop the job, collect the allocation and check nothing of the task remains."""
    await api.job_deregister(job_id)
    await wait_client_status(api, alloc_id, "complete", "failed")
    await api.client_gc()
    alloc_dir = agent.data_dir / "alloc" / alloc_id
    await eventually(lambda: not alloc_dir.exists(), message="the alloc dir to be removed")
    assert [p.pid for p in procs if is_alive(p)] == []
    assert mounts_under(alloc_dir) == []
    assert task_cgroup(agent, alloc_id) is None


WHAT_IT_SEES = (
    '{ echo "user=$(id -un)"; echo "groups=$(id -G)"; echo "pid=$$"; echo "root=$(ls / | '
    'tr "\\n" " ")"; echo "procs=$(ls /proc | grep -E "^[0-9]+$" | tr "\\n" " ")"; '
    'test -S /secrets/api.sock && echo socket=yes; '
    'if touch /usr/planted 2>/dev/null; then echo usr=writable; else echo usr=read-only; fi; '
    'echo "dirs=$NOMAD_ALLOC_DIR $NOMAD_TASK_DIR $NOMAD_SECRETS_DIR $NOMAD_UNIX_ADDR"; '
    'echo "dev=$(ls /dev | tr "\\n" " ")"; echo done; } > /local/seen; sleep 600 & wait')


async def test_task_sees_only_its_root_processes_and_user(exec_agents: AgentFactory) -> None:
    agent, _ = await start_exec_agent(exec_agents)
    marker = new_marker()
    async with agent.api() as api:
        job = exec_job("isolated", f": {marker}; {WHAT_IT_SEES}", identity=ENV_IDENTITY,
                       kill_timeout_s=1)
        (alloc,) = await run_job(api, job)
        await wait_task_state(api, alloc["ID"], "t", "running")
        seen = dict(line.split("=", 1) for line in
                    (await read_when_written(agent, alloc["ID"], "seen")).splitlines()
                    if "=" in line)
        assert seen["user"] == "nobody"
        # Its allocation's group, to share alloc/data: the alloc dir's group.
        alloc_gid = (agent.data_dir / "alloc" / alloc["ID"]).stat().st_gid
        assert str(alloc_gid) in seen["groups"].split()
        # pid 1 of its own PID namespace, seeing none of the host's processes.
        assert seen["pid"] == "1"
        pids = [int(p) for p in seen["procs"].split()]
        assert 1 in pids and max(pids) < 100, pids
        root = seen["root"].split()
        assert {"alloc", "local", "secrets", "tmp", "usr", "proc", "dev"} <= set(root)
        assert seen["socket"] == "yes"
        assert seen["usr"] == "read-only"
        assert not Path("/usr/planted").exists()
        assert seen["dirs"] == "/alloc /local /secrets unix:///secrets/api.sock"
        assert {"null", "zero", "urandom", "pts", "shm"} <= set(seen["dev"].split())
        assert "sda" not in seen["dev"] and "mem" not in seen["dev"].split()

        # From the host: the task runs in its cgroup, under its own pid.
        procs = await eventually(lambda: procs_with(marker), message="the task's process")
        cgroup = task_cgroup(agent, alloc["ID"])
        assert cgroup is not None and procs[0].pid in cgroup.pids()
        await stop_and_collect(api, agent, "isolated", alloc["ID"], procs)


def curl_both_ways(agent: AgentProcess) -> str:
    """Shell: try the agent's TCP address (must fail), then the socket (must work)."""
    return (
        f'curl -s -m 5 -o /dev/null "{agent.address}/v1/agent/self"; echo "tcp=$?" > /local/out; '
        'code=$(curl -s -o /local/meta.json -w "%{http_code}" --unix-socket /secrets/api.sock '
        '-H "X-Nomad-Token: $NOMAD_TOKEN" -X POST '
        '--data-binary \'{"Meta": {"isolated": "yes"}}\' http://localhost/v1/client/metadata); '
        'echo "socket=$code" >> /local/out; echo done >> /local/out')


async def test_network_none_reaches_the_agent_only_through_its_socket(
        exec_agents: AgentFactory) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the task runs the system curl, which is not installed")
    agent, _ = await start_exec_agent(exec_agents)
    async with agent.api() as api:
        job = exec_job("netless", curl_both_ways(agent), network_mode="none",
                       identity=ENV_IDENTITY, job_type="batch")
        (alloc,) = await run_job(api, job)
        done = await wait_client_status(api, alloc["ID"], "complete", "failed")
        out = (await read_when_written(agent, alloc["ID"], "out")).splitlines()
        assert done["ClientStatus"] == "complete", done["TaskStates"]
        # curl's 7: no route to the agent's address from a namespace with only loopback.
        assert out[:2] == ["tcp=7", "socket=200"], out
        assert (await api.client_metadata_read())["Dynamic"]["isolated"] == "yes"


async def test_spec_example_on_exec_with_acls_and_a_job_policy(
        exec_agents: AgentFactory) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the example's task runs the system curl, which is not installed")
    agent, token = await start_exec_agent(exec_agents, acl=True)
    job = load_job("taskapi-exec.nomad.hcl")
    async with agent.api(token) as api:
        # Without a policy its identity may not write node metadata: curl --fail-with-body.
        group = job["TaskGroups"][0]
        once = dict(job, TaskGroups=[dict(group, Tasks=[dict(group["Tasks"][0],
                                                                RestartPolicy=NO_RESTARTS)])])
        (refused,) = await run_job(api, once)
        failed = await wait_client_status(api, refused["ID"], "complete", "failed")
        assert failed["ClientStatus"] == "failed"
        assert b"403" in await api.alloc_logs(refused["ID"], "taskapi-exec", stderr=True)

        await api.acl_policy_apply({
            "Name": "exec-example", "Rules": (POLICY_DIR / "node-write.hcl").read_text(),
            "JobACL": {"Namespace": "default", "JobID": "taskapi-exec"}})
        await api.job_deregister("taskapi-exec", purge=True)
        await eventually(lambda: _no_job(api, "taskapi-exec"), message="the job purged")
        (alloc,) = await run_job(api, job)
        done = await wait_client_status(api, alloc["ID"], "complete", "failed")
        assert done["ClientStatus"] == "complete", done["TaskStates"]
        meta = await api.client_metadata_read()
        assert meta["Dynamic"] == {"example": "Hello World!"}


async def _no_job(api: ApiClient, job_id: str) -> bool:
    return all(j["ID"] != job_id for j in await api.jobs_list())


async def test_memory_over_the_limit_is_oom_killed(exec_agents: AgentFactory) -> None:
    if shutil.which("python3") is None:
        pytest.skip("the task allocates memory with the system python3")
    agent, _ = await start_exec_agent(exec_agents)
    script = "exec python3 -c 'data = bytearray(256 * 1024 * 1024)'"
    job = exec_job("hungry", script, job_type="batch", restart=NO_RESTARTS)
    job["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"] = 32
    async with agent.api() as api:
        (alloc,) = await run_job(api, canonicalize_job(job))
        done = await wait_client_status(api, alloc["ID"], "complete", "failed", timeout=30)
        assert done["ClientStatus"] == "failed"
        terminated = next(e for e in done["TaskStates"]["t"]["Events"]
                          if e["Type"] == "Terminated")
        assert (terminated["ExitCode"], terminated["Signal"]) == (137, 9)
        assert terminated["Details"]["oom_killed"] == "true"
        assert "OOM Killed" in terminated["DisplayMessage"]


SOCKET_LOOP = (
    "while :; do curl -s -o /dev/null -w '%{http_code}\\n' --unix-socket /secrets/api.sock "
    '-H "X-Nomad-Token: $NOMAD_TOKEN" http://localhost/v1/client/metadata >> /local/codes; '
    "sleep 0.2; done")


async def test_reattached_after_agent_sigkill_and_still_answers(
        exec_agents: AgentFactory) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the task runs the system curl, which is not installed")
    agent, _ = await start_exec_agent(exec_agents)
    marker = new_marker()
    codes = None
    async with agent.api() as api:
        job = exec_job("steady", f": {marker}; {SOCKET_LOOP}", network_mode="none",
                       identity=ENV_IDENTITY, kill_timeout_s=1)
        (alloc,) = await run_job(api, job)
        await wait_task_state(api, alloc["ID"], "t", "running")
        codes = local_file(agent, alloc["ID"], "codes")
        await eventually(lambda: codes.exists() and "200" in codes.read_text(),
                         message="the task's first answer")
        procs = await eventually(lambda: procs_with(marker), message="the task's process")
    await agent.kill()
    answered_before = codes.read_text().count("200")

    again = exec_agents("a")
    await again.start()
    async with again.api() as api:
        await eventually(lambda: codes.read_text().count("200") > answered_before + 2,
                         timeout=30, message="answers through the recreated socket")
        alloc_now = await api.allocation_get(alloc["ID"])
        assert alloc_now["TaskStates"]["t"]["State"] == "running"
        assert [e["Type"] for e in alloc_now["TaskStates"]["t"]["Events"]].count("Started") == 1
        assert all(is_alive(p) for p in procs), "the task was restarted, not reattached"
        assert task_cgroup(again, alloc["ID"]) is not None
        await stop_and_collect(api, again, "steady", alloc["ID"], procs)


async def test_raw_exec_refuses_network_mode_none(exec_agents: AgentFactory) -> None:
    agent = exec_agents()
    await agent.start()
    job = raw_exec_job("raw-netless", "exit 0", job_type="batch", restart=NO_RESTARTS)
    job["TaskGroups"][0]["Networks"] = [{"Mode": "none"}]
    async with agent.api() as api:
        (alloc,) = await run_job(api, canonicalize_job(job))
        done = await wait_client_status(api, alloc["ID"], "failed", "complete")
        assert done["ClientStatus"] == "failed"
        messages = json.dumps(done["TaskStates"]["t"]["Events"])
        assert "does not support 'none' networking mode" in messages
