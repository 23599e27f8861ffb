"""Nomad Variables through the Task API, end to end: real agents (ACLs off and on), raw_exec
tasks running the project's CLI (``python -m nomad_client var ...``) over their own socket
with their workload identity (``env { NOMAD_ADDR = "${NOMAD_UNIX_ADDR}" }``,
``identity { env = true }``).

A long-running task serves as the test's hands inside the allocation: it runs each request
file the test drops into a shared, world-writable directory and writes the output and exit
status beside it, so every check is made by the task's own identity.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_client.api import ApiClient, ApiError
from tests.integration.harness import (
    AgentProcess,
    bootstrap_acls,
    eventually,
    rotate_keyring_full,
    run_job,
    variable_job,
    wait_client_status,
    wait_task_state,
)

pytestmark = pytest.mark.timeout(60)

AgentFactory = Callable[..., AgentProcess]
CLI = f"{sys.executable} -m nomad_client"
# Runs request N ("$D/req.N", a shell script) once it appears; output and status go to
# "$D/out.N", published by a rename so the test never reads half of it.
SERVE_REQUESTS = (
    'n=1; while :; do if [ -e "$D/req.$n" ]; then '
    '/bin/sh "$D/req.$n" > "$D/out.$n.tmp" 2>&1; echo "rc=$?" >> "$D/out.$n.tmp"; '
    'mv "$D/out.$n.tmp" "$D/out.$n"; n=$((n+1)); else sleep 0.05; fi; done')
# Holds the lock twice; each critical section writes start and end marks with timestamps.
CRITICAL = ('[ -n "$D" ] || exit 3; '
            'echo "start $NOMAD_ALLOC_ID $(date +%s%N)" >> "$D/marks"; sleep 0.3; '
            'echo "end $NOMAD_ALLOC_ID $(date +%s%N)" >> "$D/marks"')
LOCK_PATH = "locks/critical"


def job_rules(*paths: str) -> str:
    blocks = "".join(f'    path "{p}" {{\n      capabilities = ["read", "write", "list"]\n    }}\n'
                     for p in paths)
    return f'namespace "default" {{\n  variables {{\n{blocks}  }}\n}}\n'


class Setup:
    """A started agent, a management client (no token with ACLs off) and the shared dir."""

    def __init__(self, agent: AgentProcess, token: str, shared: Path) -> None:
        self.agent = agent
        self.token = token
        self.shared = shared

    def api(self) -> ApiClient:
        return self.agent.api(self.token)

    async def attach(self, api: ApiClient, job_id: str, *paths: str) -> None:
        """Give the job's identities read/write on ``paths`` (ACLs on only)."""
        if self.agent.acl:
            await api.acl_policy_apply({
                "Name": f"{job_id}-vars", "Rules": job_rules(*paths),
                "JobACL": {"Namespace": "default", "JobID": job_id}})


@pytest.fixture(params=[False, True], ids=["acl-off", "acl-on"])
async def setup(request: pytest.FixtureRequest, agent_factory: AgentFactory,
                tmp_path: Path) -> Setup:
    agent = agent_factory(acl=request.param)
    await agent.start()
    token = await bootstrap_acls(agent) if request.param else ""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # tasks may run as another user: both must write here
    return Setup(agent, token, shared)


class TaskHands:
    """Runs shell lines inside a serving task and returns (exit status, output)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    async def run(self, line: str) -> tuple[int, str]:
        self.count += 1
        request = self.directory / f"req.{self.count}"
        staged = request.with_suffix(".tmp")
        staged.write_text(line + "\n")
        staged.rename(request)
        answer = self.directory / f"out.{self.count}"
        await eventually(answer.exists, timeout=20, message=f"the task's answer to {line!r}")
        text = answer.read_text()
        body, _, status = text.rstrip("\n").rpartition("rc=")
        return int(status), body


async def serving_task(setup: Setup, api: ApiClient, job_id: str) -> TaskHands:
    directory = setup.shared / job_id
    directory.mkdir()
    os.chmod(directory, 0o777)
    script = f'D="{directory}"; ' + SERVE_REQUESTS
    (alloc,) = await run_job(api, variable_job(job_id, script, job_type="service"))
    await wait_task_state(api, alloc["ID"], "t", "running")
    return TaskHands(directory)


async def seed(api: ApiClient, path: str, **items: str) -> dict[str, Any]:
    return await api.variable_write(path, items)


async def test_task_reads_its_own_variable_and_nothing_else(setup: Setup) -> None:
    async with setup.api() as api:
        await seed(api, "nomad/jobs/reader", greeting="hello from reader")
        await seed(api, "nomad/jobs/other", secret="not for reader")
        await seed(api, "shared/config", level="3")
        await setup.attach(api, "reader", "scratch/*")
        task = await serving_task(setup, api, "reader")

        status, output = await task.run(f"{CLI} var get -item greeting nomad/jobs/reader")
        assert (status, output) == (0, "hello from reader")
        status, output = await task.run(f"{CLI} var get -out json nomad/jobs/reader")
        assert status == 0 and '"greeting": "hello from reader"' in output, output

        status, output = await task.run(f"{CLI} var get nomad/jobs/other")
        listed_status, listed = await task.run(f"{CLI} var list -out terse")
        if setup.agent.acl:
            assert status == 1 and "403" in output and "not for reader" not in output, output
            # the implicit grant covers the job's own paths only
            assert (listed_status, listed.split()) == (0, ["nomad/jobs/reader"])
        else:
            # ACLs disabled: a valid identity may do anything, as in Nomad
            assert status == 0 and "not for reader" in output, output
            assert listed.split() == ["nomad/jobs/other", "nomad/jobs/reader", "shared/config"]


async def test_cas_conflict_from_a_task_is_409_and_changes_nothing(setup: Setup) -> None:
    async with setup.api() as api:
        first = await seed(api, "scratch/counter", value="1")
        second = await api.variable_write("scratch/counter", {"value": "2"},
                                          cas=first["ModifyIndex"])
        await setup.attach(api, "writer", "scratch/*")
        task = await serving_task(setup, api, "writer")

        stale = first["ModifyIndex"]
        status, output = await task.run(
            f"{CLI} var put -check-index {stale} scratch/counter value=3")
        assert status == 1 and "Check-and-Set conflict" in output, output
        assert f"({second['ModifyIndex']})" in output
        with pytest.raises(ApiError) as conflict:
            await api.variable_write("scratch/counter", {"value": "3"}, cas=stale)
        assert conflict.value.status == 409
        after = await api.variable_read("scratch/counter")
        assert after["Items"] == {"value": "2"}
        assert after["ModifyIndex"] == second["ModifyIndex"]

        # with the current index the same write goes through
        status, output = await task.run(
            f"{CLI} var put -out json -check-index {second['ModifyIndex']} "
            "scratch/counter value=3")
        assert status == 0, output
        assert (await api.variable_read("scratch/counter"))["Items"] == {"value": "3"}


def critical_sections(marks: str) -> list[tuple[str, int, int]]:
    """(alloc, start, end) of each critical section, in start order; every start must be
    followed by the end of the same allocation before anything else happens."""
    events = [line.split() for line in marks.splitlines()]
    events.sort(key=lambda e: int(e[2]))
    sections = []
    for begin, finish in zip(events[::2], events[1::2], strict=True):
        assert begin[0] == "start" and finish[0] == "end" and begin[1] == finish[1], events
        sections.append((begin[1], int(begin[2]), int(finish[2])))
    return sections


async def test_contending_tasks_never_hold_the_lock_at_once(setup: Setup) -> None:
    lock = (f"{CLI} var lock -ttl 10s -delay 0s -backoff 50ms {LOCK_PATH} "
            f"'{CRITICAL}'")
    script = f'export D="{setup.shared}"; {lock} && {lock}'
    async with setup.api() as api:
        await setup.attach(api, "lockers", "locks/*")
        allocs = await run_job(api, variable_job("lockers", script, count=2))
        for alloc in allocs:
            done = await wait_client_status(api, alloc["ID"], "complete", "failed",
                                            timeout=40)
            assert done["ClientStatus"] == "complete", done["TaskStates"]
        sections = critical_sections((setup.shared / "marks").read_text())
        assert len(sections) == 4
        assert {alloc for alloc, _, _ in sections} == {a["ID"] for a in allocs}
        for (_, _, end), (_, start, _) in zip(sections, sections[1:], strict=False):
            assert end <= start, sections
        # released on exit: the lock is free, so a management write goes through
        held = await api.variable_read(LOCK_PATH)
        assert "Lock" not in held or not held["Lock"], held


async def test_key_rotation_keeps_variables_and_identities_working(setup: Setup) -> None:
    async with setup.api() as api:
        await seed(api, "nomad/jobs/rotated", greeting="before rotation")
        task = await serving_task(setup, api, "rotated")
        read = f"{CLI} var get -item greeting nomad/jobs/rotated"
        assert await task.run(read) == (0, "before rotation")

        await rotate_keyring_full(api)

        async def reencrypted() -> bool:
            keys = (await api.request("GET", "/v1/operator/keyring/keys")).json() or []
            return sum(1 for k in keys if k.get("State") == "active") == 1 and all(
                k.get("State") in ("active", "inactive") for k in keys)
        await eventually(reencrypted, timeout=20, message="the full rotation to finish")
        # the running task's identity was signed before the rotation; it still works
        assert await task.run(read) == (0, "before rotation")

        # a task started now gets an identity signed with the new key; it reads its own
        await seed(api, "nomad/jobs/rotated-fresh", greeting="after rotation")
        script = f"{CLI} var get -item greeting nomad/jobs/rotated-fresh"
        (fresh,) = await run_job(api, variable_job("rotated-fresh", script))
        done = await wait_client_status(api, fresh["ID"], "complete", "failed")
        logs = (await api.alloc_logs(fresh["ID"], "t")).decode()
        errors = (await api.alloc_logs(fresh["ID"], "t", stderr=True)).decode()
        assert (done["ClientStatus"], logs) == ("complete", "after rotation"), errors
