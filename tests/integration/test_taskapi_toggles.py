"""Who gets a Task API socket, on real agents with real raw_exec tasks: the agent's
``client { task_api { enabled, default_mode } }``, a namespace's ``Capabilities.TaskAPI`` and
a task's own ``task_api { enabled }``; ``NOMAD_UNIX_ADDR`` only where there is a socket, and
a task event where there is none. Then the secrets tmpfs across an agent crash.

Each task reports what its environment says (``NOMAD_UNIX_ADDR`` or "unset") in its own
``local/unix_addr`` file, then sleeps.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from nomad_client.api.client import ApiClient
from nomad_client.client import tmpfs
from nomad_client.jobspec import canonicalize_job, parse_jobspec
from tests.integration.harness import (
    AgentProcess,
    eventually,
    run_job,
    task_dir,
    wait_task_state,
)
from tests.integration.test_taskapi import answers, api_sock, local_dir, read_token

pytestmark = pytest.mark.timeout(120)

NS = 1_000_000_000
# ``${NOMAD_UNIX_ADDR+set}`` is not a jobspec interpolation (``+`` ends no name): the shell
# tells a variable that is unset from one that is empty.
REPORT_ADDR = ('if [ "${NOMAD_UNIX_ADDR+set}" = set ]; then printf %s "$NOMAD_UNIX_ADDR"; '
               'else printf unset; fi > "$NOMAD_TASK_DIR/.addr" && '
               'mv "$NOMAD_TASK_DIR/.addr" "$NOMAD_TASK_DIR/unix_addr"; exec sleep 300')
DISABLED = "Task API Disabled"
AgentFactory = Callable[..., AgentProcess]


def toggles_job(job_id: str, choices: Mapping[str, bool | None], *,
                namespace: str | None = None) -> dict[str, Any]:
    """A service job with one task per entry of ``choices``: the task's ``TaskAPI.Enabled``
    (None: it makes no choice). Every task has ``identity { env = true, file = true }``."""
    tasks = []
    for name, choice in choices.items():
        task: dict[str, Any] = {
            "Name": name, "Driver": "raw_exec", "KillTimeout": NS,
            "Config": {"command": "/bin/sh", "args": ["-c", REPORT_ADDR]},
            "Identity": {"Env": True, "File": True},
        }
        if choice is not None:
            task["TaskAPI"] = {"Enabled": choice}
        tasks.append(task)
    job: dict[str, Any] = {"ID": job_id, "Type": "service",
                           "TaskGroups": [{"Name": "g", "Tasks": tasks}]}
    if namespace is not None:
        job["Namespace"] = namespace
    return canonicalize_job(job)


async def run_tasks(agent: AgentProcess, job: Mapping[str, Any],
                    namespace: str | None = None) -> str:
    """Run ``job``; its alloc id once every task runs and has reported its env."""
    async with ApiClient(agent.address, namespace=namespace) as api:
        [alloc] = await run_job(api, job)
        for task in job["TaskGroups"][0]["Tasks"]:
            await wait_task_state(api, alloc["ID"], task["Name"], "running")
            addr = local_dir(agent, alloc["ID"], task["Name"]) / "unix_addr"
            await eventually(addr.exists, message=f"task {task['Name']} to report its env")
    return str(alloc["ID"])


async def events_of(agent: AgentProcess, alloc_id: str, task: str,
                    namespace: str | None = None) -> list[dict[str, Any]]:
    async with ApiClient(agent.address, namespace=namespace) as api:
        alloc = await api.allocation_get(alloc_id)
    events: list[dict[str, Any]] = alloc["TaskStates"][task]["Events"]
    return events


async def assert_socket(agent: AgentProcess, alloc_id: str, task: str) -> None:
    """The task has a working socket and its env names it."""
    sock = api_sock(agent, alloc_id, task)
    reported = (local_dir(agent, alloc_id, task) / "unix_addr").read_text()
    assert reported == f"unix://{sock}"
    assert await answers(sock, read_token(agent, alloc_id, task))


async def assert_no_socket(agent: AgentProcess, alloc_id: str, task: str, reason: str,
                           namespace: str | None = None) -> None:
    """The task has no socket, no NOMAD_UNIX_ADDR, and one event saying ``reason``."""
    assert not os.path.lexists(api_sock(agent, alloc_id, task))
    assert (local_dir(agent, alloc_id, task) / "unix_addr").read_text() == "unset"
    said = [e for e in await events_of(agent, alloc_id, task, namespace)
            if e["Type"] == DISABLED]
    assert [e["DisplayMessage"] for e in said] == [reason], said
    assert not said[0]["FailsTask"]


async def test_an_agent_with_the_task_api_off_gives_no_task_a_socket(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory(task_api={"enabled": False})
    await agent.start()
    alloc_id = await run_tasks(agent, toggles_job("off", {"asks": True, "quiet": None}))
    for task in ("asks", "quiet"):
        await assert_no_socket(agent, alloc_id, task, "Task API is disabled on this node")


async def test_an_opt_in_agent_gives_a_socket_only_to_tasks_that_ask(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory(task_api={"default_mode": "opt_in"})
    await agent.start()
    # Written as an operator would: the task's choice in its jobspec.
    jobspec = f"""
job "optin" {{
  group "g" {{
    task "asks" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sh"
        args    = ["-c", {json.dumps(REPORT_ADDR)}]
      }}
      identity {{
        env  = true
        file = true
      }}
      task_api {{
        enabled = true
      }}
    }}
    task "quiet" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sh"
        args    = ["-c", {json.dumps(REPORT_ADDR)}]
      }}
      identity {{
        env = true
      }}
    }}
  }}
}}
"""
    job = canonicalize_job(parse_jobspec(jobspec, "optin.nomad.hcl"))
    alloc_id = await run_tasks(agent, job)
    await assert_socket(agent, alloc_id, "asks")
    await assert_no_socket(agent, alloc_id, "quiet",
                           "Task API is opt-in on this node and the task did not ask for it")


async def test_a_task_may_refuse_its_socket_on_an_enabled_node(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    alloc_id = await run_tasks(agent, toggles_job("refuse", {"refuses": False, "quiet": None}))
    await assert_no_socket(agent, alloc_id, "refuses", "Task API is disabled by the task")
    await assert_socket(agent, alloc_id, "quiet")


async def make_namespace(agent: AgentProcess, name: str, task_api: str) -> None:
    async with agent.api() as api:
        await api.apply_namespace({"Name": name, "Capabilities": {"TaskAPI": task_api}})


async def test_a_namespace_with_the_task_api_disabled_beats_a_task_that_asks(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    await make_namespace(agent, "locked", "disabled")
    alloc_id = await run_tasks(agent, toggles_job("locked", {"asks": True, "quiet": None},
                                                  namespace="locked"), namespace="locked")
    for task in ("asks", "quiet"):
        await assert_no_socket(agent, alloc_id, task, "Task API is disabled in this namespace",
                               namespace="locked")


async def test_an_opt_in_namespace_gives_a_socket_only_to_tasks_that_ask(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    await make_namespace(agent, "careful", "opt_in")
    alloc_id = await run_tasks(agent, toggles_job("careful", {"asks": True, "quiet": None},
                                                  namespace="careful"), namespace="careful")
    await assert_socket(agent, alloc_id, "asks")
    await assert_no_socket(
        agent, alloc_id, "quiet",
        "Task API is opt-in in this namespace and the task did not ask for it",
        namespace="careful")


# ---------------------------------------------------------------------- secrets on tmpfs


def mount_of(path: Path) -> tmpfs.Mount | None:
    """The mount whose mount point is ``path``, if any."""
    found = [m for m in tmpfs.mounts_under(path.parent) if m.mount_point == path.resolve()]
    return found[-1] if found else None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_secrets_tmpfs_outlives_an_agent_crash_and_orphans_are_unmounted(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory()
    await agent.start()
    # The task tries to run something from its secrets dir: noexec refuses.
    script = ('cp /bin/true "$NOMAD_SECRETS_DIR/tool" && chmod 755 "$NOMAD_SECRETS_DIR/tool"; '
              '"$NOMAD_SECRETS_DIR/tool"; echo $? > "$NOMAD_TASK_DIR/.rc" && '
              'mv "$NOMAD_TASK_DIR/.rc" "$NOMAD_TASK_DIR/exec_rc"; ' + REPORT_ADDR)
    job = toggles_job("tmpfs", {"t": None})
    job["TaskGroups"][0]["Tasks"][0]["Config"]["args"] = ["-c", script]
    alloc_id = await run_tasks(agent, job)
    secrets = task_dir(agent, alloc_id, "t") / "secrets"
    mounted = mount_of(secrets)
    assert mounted is not None and mounted.fstype == "tmpfs"
    assert (local_dir(agent, alloc_id) / "exec_rc").read_text().strip() == "126"
    assert await answers(api_sock(agent, alloc_id), read_token(agent, alloc_id))

    # What a crashed agent leaves for an allocation the next one will not restore.
    orphan = agent.data_dir / "alloc" / str(uuid.uuid4()) / "t" / "secrets"
    orphan.mkdir(parents=True)
    fd = os.open(orphan, os.O_RDONLY | os.O_DIRECTORY)
    try:
        tmpfs.mount_tmpfs(fd, uid=0, gid=0)
    finally:
        os.close(fd)
    assert mount_of(orphan) is not None

    await agent.kill()
    await agent.start()
    async with agent.api() as api:
        await wait_task_state(api, alloc_id, "t", "running")
    await eventually(lambda: mount_of(orphan) is None, message="the orphan to be unmounted")
    assert mount_of(secrets) == mounted  # the very same mount, still there
    started = [e for e in await events_of(agent, alloc_id, "t") if e["Type"] == "Started"]
    assert len(started) == 1  # reattached, not restarted: the mount was kept, not replaced
    await eventually(lambda: answers(api_sock(agent, alloc_id), read_token(agent, alloc_id)),
                     message="the restored task's socket to answer")
