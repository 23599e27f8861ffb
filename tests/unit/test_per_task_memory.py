"""What the agent holds per task: one job per version shared by the
allocations decoded from the wire or from disk, one runner config for every allocation, and
no asyncio task per idle task beyond the ones that must wait on it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import attrs

from nomad_client.allocrunner.alloc_runner import AllocRunner
from nomad_client.server.keyring import Keyring
from nomad_client.structs.codec import from_rpc, msgpack_roundtrip, to_api, to_rpc
from nomad_client.structs.jobs import SharedJobs
from nomad_client.structs.models import Allocation
from tests.unit.factories import start_agent, wait_until
from tests.unit.test_alloc_runner import Recorder, make_alloc, mock_task, runner_for


def _job(version: int = 0, **extra: Any) -> dict[str, Any]:
    return {"ID": "web", "Namespace": "default", "Version": version, "JobModifyIndex": 7,
            "ModifyIndex": 7, "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t"}]}],
            **extra}


def _alloc(index: int, job: dict[str, Any]) -> Allocation:
    return Allocation(id=f"alloc-{index}", namespace="default", eval_id="e",
                      name=f"web.g[{index}]", node_id="n", node_name="node", job_id="web",
                      job=job, task_group="g")


def _decoded(alloc: Allocation) -> Allocation:
    """``alloc`` as the client gets it from the servers (or reads it back from disk)."""
    return from_rpc(msgpack_roundtrip(to_rpc(alloc)), Allocation)


def test_allocations_of_one_job_version_share_one_decoded_job() -> None:
    job = _job(version=41)
    originals = [_alloc(i, job) for i in range(3)]
    decoded = [_decoded(alloc) for alloc in originals]
    assert decoded[0].job == job
    assert all(a.job is decoded[0].job for a in decoded)
    # Sharing changes nothing anyone reads: the API form is the same, byte for byte.
    for original, shared in zip(originals, decoded, strict=True):
        assert json.dumps(to_api(shared)) == json.dumps(to_api(original))


def test_only_equal_jobs_are_shared() -> None:
    first = _decoded(_alloc(0, _job(version=42)))
    next_version = _decoded(_alloc(1, _job(version=43)))
    # Same key, different content (e.g. a field the server stamps without a new version).
    same_key = _decoded(_alloc(2, _job(version=42, Stable=True)))
    assert next_version.job is not first.job and next_version.job["Version"] == 43
    assert same_key.job is not first.job and same_key.job["Stable"] is True
    assert first.job == _job(version=42)


def test_the_shared_jobs_are_bounded() -> None:
    table = SharedJobs(size=2)
    kept = table.share(_job(version=1))
    for version in (2, 3):
        table.share(_job(version=version))
    again = table.share(_job(version=1))
    assert again is not kept  # forgotten: the table held only the two most recent


async def test_an_idle_task_holds_at_most_two_asyncio_tasks(tmp_path: Path) -> None:
    """The alloc runner's own task and the driver wait: a single-task allocation runs its
    task in place, and waiting for a kill or a restart costs a callback, not tasks."""
    before = len(asyncio.all_tasks())
    runners: list[AllocRunner] = []
    count = 10
    for index in range(count):
        alloc = attrs.evolve(make_alloc([mock_task(run_for="1h")], job_type="service"),
                             id=f"0f0e0d0c-aaaa-bbbb-cccc-{index:012d}")
        runner = runner_for(alloc, tmp_path, Recorder())
        runner.start()
        runners.append(runner)
    try:
        await wait_until(lambda: all(r.task_runners.get("t") and r.task_runners["t"].running
                                     for r in runners), "every task to run")
        await asyncio.sleep(0)  # let anything started with the task get going
        assert len(asyncio.all_tasks()) - before <= 2 * count
        # Still woken at once by a kill while idle.
        for runner in runners:
            runner.kill("done")
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in runners)), 10)
        assert all(r.task_runners["t"].state.state == "dead" for r in runners)
    finally:
        for runner in runners:
            await runner.destroy()


async def test_every_alloc_runner_shares_one_config(workdir: Path, keyring: Keyring) -> None:
    agent = await start_agent(workdir, keyring)
    try:
        client = agent.client
        assert client is not None
        job = {"ID": "pair", "Name": "pair", "Type": "service", "Namespace": "default",
               "Datacenters": ["dc1"], "TaskGroups": [{
                   "Name": "g", "Count": 2,
                   "Tasks": [{"Name": "t", "Driver": "mock_driver",
                              "Config": {"run_for": "1h"},
                              "Resources": {"CPU": 10, "MemoryMB": 10}}]}]}
        await agent.server.register_job(job)
        runners = await wait_until(
            lambda: len(client.runners) == 2 and list(client.runners.values()),
            "both allocations to have runners")
        assert runners[0].config is runners[1].config
        # ... and so one copy of the host environment, one job between them.
        assert runners[0].alloc.job is runners[1].alloc.job
    finally:
        await agent.stop()
