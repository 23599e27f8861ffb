"""Resource usage: the samplers (real processes, measured with psutil) and their routes,
``/v1/client/allocation/:id/stats`` (Nomad's ``AllocResourceUsage``) and
``/v1/client/stats`` (``HostStats``), with their capabilities."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from nomad_client.client.stats import (
    MIN_INTERVAL,
    Baselines,
    HostStatsSampler,
    TaskUsageSampler,
)
from nomad_client.server.keyring import Keyring
from nomad_client.structs.models import ACLPolicy, PolicyJobACL
from tests.unit.factories import call_http, identity_token, start_agent, wait_until

pytestmark = pytest.mark.timeout(60)

MHZ = 2000.0
MEMORY_KEYS = {"RSS", "Cache", "Swap", "MappedFile", "Usage", "MaxUsage", "KernelUsage",
               "KernelMaxUsage", "Measured"}
CPU_KEYS = {"SystemMode", "UserMode", "TotalTicks", "ThrottledPeriods", "ThrottledTime",
            "Percent", "Measured"}
# A parent that spins, with a child that sleeps: a tree of two.
SPINNER = ("import subprocess\n"
           "child = subprocess.Popen(['sleep', '60'])\n"
           "print(child.pid, flush=True)\n"
           "while True:\n    pass\n")


def assert_usage_shape(usage: dict[str, Any]) -> None:
    assert set(usage) == {"MemoryStats", "CpuStats", "DeviceStats"}
    assert set(usage["MemoryStats"]) == MEMORY_KEYS
    assert set(usage["CpuStats"]) == CPU_KEYS
    assert usage["MemoryStats"]["Measured"] == ["RSS", "Swap"]
    assert usage["CpuStats"]["Measured"] == ["System Mode", "User Mode", "Percent"]


@pytest.fixture
async def spinner() -> AsyncIterator[tuple[psutil.Process, int]]:
    """A spinning process and the pid of its sleeping child."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SPINNER,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        child = int((await proc.stdout.readline()).decode())
        yield psutil.Process(proc.pid), child
    finally:
        for process in psutil.Process(proc.pid).children(recursive=True):
            process.kill()
        proc.kill()
        await proc.wait()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_task_is_its_whole_process_tree(spinner: tuple[psutil.Process, int]) -> None:
    root, child = spinner
    clock = Clock()
    sampler = TaskUsageSampler(lambda: MHZ, clock=clock)

    def sample() -> dict[str, Any]:
        return sampler.task_usage("a", "t", root.pid, root.create_time())

    before_first = cpu_seconds(root)
    first = await asyncio.to_thread(sample)
    after_first = cpu_seconds(root)
    assert set(first) == {"ResourceUsage", "Timestamp", "Pids"}
    assert set(first["Pids"]) == {str(root.pid), str(child)}
    for usage in (first["ResourceUsage"], *first["Pids"].values()):
        assert_usage_shape(usage)
    total = first["ResourceUsage"]
    assert total["MemoryStats"]["RSS"] == sum(
        p["MemoryStats"]["RSS"] for p in first["Pids"].values()) > 0

    # The next sample's percentage is the CPU time spent since the first over the time
    # between them (one second here, by the sampler's clock).
    await wait_until(lambda: cpu_seconds(root) > after_first + 0.05, "the spinner to use CPU")
    clock.now += 1.0
    before_second = cpu_seconds(root)
    second = await asyncio.to_thread(sample)
    after_second = cpu_seconds(root)
    spinning = second["Pids"][str(root.pid)]["CpuStats"]
    # CPU times come in clock ticks, so a bound may equal the measure exactly: allow for
    # float rounding of the subtraction, nothing more.
    assert (before_second - after_first) * 100 - 1e-9 <= spinning["Percent"] \
        <= (after_second - before_first) * 100 + 1e-9
    assert spinning["Percent"] == pytest.approx(spinning["UserMode"] + spinning["SystemMode"])
    assert spinning["TotalTicks"] == pytest.approx(spinning["Percent"] / 100 * MHZ)
    assert second["Pids"][str(child)]["CpuStats"]["Percent"] < 5  # it sleeps
    cpu = second["ResourceUsage"]["CpuStats"]
    assert cpu["Percent"] == pytest.approx(sum(
        p["CpuStats"]["Percent"] for p in second["Pids"].values()))
    assert second["Timestamp"] > first["Timestamp"]

    # A sample soon after another is measured against the one before: the interval is
    # never a few milliseconds.
    clock.now += 0.1
    third = await asyncio.to_thread(sample)
    after_third = cpu_seconds(root)
    assert third["Pids"][str(root.pid)]["CpuStats"]["Percent"] \
        <= (after_third - before_first) * 100 / 1.1 + 1e-9


async def test_gone_processes_and_reused_pids_measure_nothing(
        spinner: tuple[psutil.Process, int]) -> None:
    root, _ = spinner
    sampler = TaskUsageSampler(lambda: MHZ)
    # The same pid, but started at another time: not the task's process.
    usage = sampler.task_usage("a", "t", root.pid, root.create_time() - 100)
    assert usage["Pids"] == {} and usage["ResourceUsage"]["MemoryStats"]["RSS"] == 0
    assert sampler.task_usage("a", "t", 0, 0.0)["Pids"] == {}


async def test_an_allocation_is_the_sum_of_its_tasks(spinner: tuple[psutil.Process, int]
                                                     ) -> None:
    root, _ = spinner
    sampler = TaskUsageSampler(lambda: MHZ)
    roots = {"one": (root.pid, root.create_time()), "none": (0, 0.0)}
    stats = await asyncio.to_thread(sampler.alloc_usage, "a", roots)
    assert set(stats) == {"ResourceUsage", "Tasks", "Timestamp"}
    assert set(stats["Tasks"]) == {"one", "none"}
    memory = stats["ResourceUsage"]["MemoryStats"]
    assert memory["RSS"] == stats["Tasks"]["one"]["ResourceUsage"]["MemoryStats"]["RSS"] > 0


def test_samples_are_measured_against_one_at_least_min_interval_older() -> None:
    clock = Clock()
    kept: Baselines[str] = Baselines(clock)
    assert kept.measure_against(("k",), "first") is None
    clock.now += MIN_INTERVAL / 10
    assert kept.measure_against(("k",), "too soon") is None  # nothing old enough yet
    clock.now += MIN_INTERVAL
    assert kept.measure_against(("k",), "second") == (1000.0, "first")
    clock.now += MIN_INTERVAL / 10
    assert kept.measure_against(("k",), "soon again") == (1000.0, "first")
    clock.now += MIN_INTERVAL
    assert kept.measure_against(("k",), "third")[1] == "second"  # type: ignore[index]
    assert kept.measure_against(("other",), "x") is None  # keys are apart

    kept.forget(lambda key: key != ("k",))
    assert kept.measure_against(("k",), "again") is None
    clock.now += MIN_INTERVAL
    assert kept.measure_against(("other",), "y") == (clock.now - MIN_INTERVAL, "x")


async def test_host_stats_shape(workdir: Path) -> None:
    sampler = HostStatsSampler(lambda: MHZ)
    first = await asyncio.to_thread(sampler.host_stats, workdir)
    second = await asyncio.to_thread(sampler.host_stats, workdir)
    for stats in (first, second):
        assert set(stats) == {"Memory", "CPU", "DiskStats", "AllocDirStats", "DeviceStats",
                              "Uptime", "Timestamp", "CPUTicksConsumed"}
        assert set(stats["Memory"]) == {"Total", "Available", "Used", "Free"}
        assert stats["Memory"]["Total"] == psutil.virtual_memory().total
        assert len(stats["CPU"]) == len(psutil.cpu_times(percpu=True))
        for cpu in stats["CPU"]:
            assert set(cpu) == {"CPU", "User", "System", "Idle", "Total", "TotalPercent",
                                "TotalTicks"}
            assert 0 <= cpu["Idle"] <= 100 and cpu["Total"] == pytest.approx(100 - cpu["Idle"])
        assert stats["CPUTicksConsumed"] == pytest.approx(
            sum(c["TotalTicks"] for c in stats["CPU"]))
        alloc_fs = stats["AllocDirStats"]
        assert alloc_fs["Size"] > 0 and str(workdir).startswith(alloc_fs["Mountpoint"])
        assert stats["Uptime"] > 0
    assert second["Timestamp"] > first["Timestamp"]


# ---- the routes --------------------------------------------------------------------------
async def test_stats_routes(workdir: Path, keyring: Keyring) -> None:
    agent = await start_agent(workdir, keyring, acl=True)
    try:
        server, client = agent.server, agent.client
        assert client is not None
        management = (await server.acls.bootstrap()).secret_id
        await server.register_job({"ID": "web", "Datacenters": ["dc1"], "TaskGroups": [{
            "Name": "g", "Tasks": [{"Name": "t", "Driver": "mock_driver",
                                    "Config": {"run_for": "1h"}}]}]})
        (alloc,) = server.job_allocs("web")
        await wait_until(lambda: alloc.id in client.runners
                         and client.runners[alloc.id].task_runners["t"].running,
                         "the task to run")
        token = identity_token(keyring, alloc)
        async with aiohttp.ClientSession() as session:
            async def get(path: str, secret: str = management) -> tuple[int, Any]:
                answer = await call_http(session, agent.api.url, "GET", path, token=secret)
                return answer.status, answer.body

            path = f"/v1/client/allocation/{alloc.id}/stats"
            status, stats = await get(path)
            assert status == 200 and set(stats["Tasks"]) == {"t"}
            assert set(stats["Tasks"]["t"]) == {"ResourceUsage", "Timestamp", "Pids"}
            assert_usage_shape(stats["ResourceUsage"])
            assert (await get(path + "?task=t"))[0] == 200
            assert await get(path + "?task=nope") == (
                400, "Could not find task runner for task: nope")
            assert (await get("/v1/client/allocation/nope/stats"))[0] == 404

            status, host = await get("/v1/client/stats")
            assert status == 200 and host["Memory"]["Total"] > 0
            assert (await get("/v1/client/stats?node_id=elsewhere"))[0] == 404

            # A workload identity needs read-job for its stats, node:read for the host's.
            assert await get(path, token) == (403, "Permission denied")
            assert await get("/v1/client/stats", token) == (403, "Permission denied")
            await server.acls.upsert_policy(ACLPolicy(
                name="reader", rules='namespace "default" { policy = "read" }\n'
                                     'node { policy = "read" }',
                job_acl=PolicyJobACL(namespace="default", job_id="web")))
            assert (await get(path, token))[0] == 200
            assert (await get("/v1/client/stats", token))[0] == 200
    finally:
        await agent.stop()
