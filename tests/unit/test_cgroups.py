"""Task cgroups: v1 and v2 logic against fake trees (the files a kernel shows), then the
real kernel's cgroups as root, each test removing what it made even when it fails."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import psutil
import pytest

from nomad_client.agent.client import Client, ClientSettings
from nomad_client.allocrunner.alloc_runner import RestoredTask
from nomad_client.client import cgroups
from nomad_client.client.cgroups import (
    CgroupLimits,
    CgroupManager,
    CgroupsUnavailable,
    agent_cgroups,
    agent_parent,
    cgroup_of,
    cpu_weight,
    remove_agent_cgroups,
    task_cgroup_name,
)
from nomad_client.client.drivers.base import TaskHandle
from nomad_client.client.stats import TaskUsageSampler
from nomad_client.structs.models import TaskState

MiB = 1 << 20
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "freezer", "cpuset", "pids")
LIMITS = CgroupLimits(memory_bytes=256 * MiB, memory_max_bytes=None, cpu_shares=500)


# ---- fake trees -------------------------------------------------------------------------

def fake_v1(root: Path, controllers: tuple[str, ...] = V1_CONTROLLERS) -> Path:
    for c in controllers:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("")
    if "cpuset" in controllers:
        (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
        (root / "cpuset" / "cpuset.mems").write_text("0\n")
    return root


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    return root


@pytest.fixture
def fake_rmdir(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel's rmdir of a cgroup takes its files along; a plain directory's would not."""
    def remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
    monkeypatch.setattr(cgroups, "_remove_dir", remove)


def test_detect_v1_makes_nothing_and_create_makes_the_parent_with_cpus_and_mems(
        tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    manager = CgroupManager.detect(root, parent="nomad_client-abc")
    assert manager.version == 1
    for c in V1_CONTROLLERS:
        assert not (root / c / "nomad_client-abc").exists()
    manager.create("a.t", LIMITS)
    for c in V1_CONTROLLERS:
        assert (root / c / "nomad_client-abc").is_dir()
    # A v1 cpuset without cpus and mems would refuse every task below it.
    assert (root / "cpuset/nomad_client-abc/cpuset.cpus").read_text() == "0-3"
    assert (root / "cpuset/nomad_client-abc/cpuset.mems").read_text() == "0"


def test_detect_hybrid_host_uses_v1(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    fake_v2(root / "unified", controllers="")
    assert CgroupManager.detect(root, parent="p").version == 1
    assert not (root / "unified" / "p").exists()


def test_detect_says_why_when_unavailable(tmp_path: Path) -> None:
    fake_v1(tmp_path, controllers=("cpu", "cpuacct"))
    with pytest.raises(CgroupsUnavailable, match="memory, freezer"):
        CgroupManager.detect(tmp_path, parent="p")
    with pytest.raises(CgroupsUnavailable, match="lacks controllers: memory"):
        CgroupManager.detect(fake_v2(tmp_path / "v2", controllers="cpu pids"), parent="p")


def test_create_reports_a_kernel_refusal_of_the_parent(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    (root / "p").write_text("not a directory")
    manager = CgroupManager.detect(root, parent="p")  # looking is not refused
    with pytest.raises(OSError):
        manager.create("a.t", LIMITS)


def test_detect_turns_an_unreadable_tree_into_unavailable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v2(tmp_path)

    def refuse(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(cgroups, "_read", refuse)
    with pytest.raises(CgroupsUnavailable, match="cannot read cgroups"):
        CgroupManager.detect(root, parent="p")


def test_detect_needs_a_parent_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        CgroupManager.detect(fake_v1(tmp_path))  # type: ignore[call-arg]
    assert os.listdir(tmp_path / "memory") == ["cgroup.procs"]


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "a\0b", "x" * 256])
def test_names_are_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        CgroupManager.detect(fake_v1(tmp_path / "p"), parent=bad)
    manager = CgroupManager.detect(fake_v2(tmp_path / "t"), parent="p")
    with pytest.raises(ValueError):
        manager.create(bad, LIMITS)
    with pytest.raises(ValueError):
        manager.open(bad)


def test_task_cgroup_name_is_one_safe_directory_name() -> None:
    alloc = "0b7c5a2e-1234-4cde-8f00-9a8b7c6d5e4f"
    assert task_cgroup_name(alloc, "web") == f"{alloc}.web"
    assert task_cgroup_name(alloc, "../etc") == f"{alloc}...%2Fetc"
    assert task_cgroup_name(alloc, "a b%") == f"{alloc}.a%20b%25"
    long = task_cgroup_name(alloc, "t" * 300)
    assert len(long.encode()) <= 255 and long.startswith(f"{alloc}.ttt")
    assert long != task_cgroup_name(alloc, "t" * 301)


def test_agent_parent_is_unique_per_data_dir(tmp_path: Path) -> None:
    a, b = agent_parent(tmp_path / "a"), agent_parent(tmp_path / "b")
    assert a != b and a == agent_parent(tmp_path / "a")
    assert a.startswith("nomad_client-") and len(a) == len("nomad_client-") + 12


def test_cpu_weight_matches_the_v1_bounds_and_default() -> None:
    assert [cpu_weight(s) for s in (2, 1024, 262_144)] == [1, 100, 10_000]
    assert cpu_weight(1) == 1 and cpu_weight(10**7) == 10_000
    assert 1 < cpu_weight(100) < cpu_weight(500) < 100 < cpu_weight(4000) < 10_000


def test_v1_create_writes_limits_per_controller(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    manager = CgroupManager.detect(root, parent="p")
    limits = CgroupLimits(memory_bytes=256 * MiB, memory_max_bytes=512 * MiB, cpu_shares=1,
                          cpuset_cpus="1", pids_max=64)
    cg = manager.create("a.t", limits)
    task = {c: root / c / "p" / "a.t" for c in V1_CONTROLLERS}
    assert (task["memory"] / "memory.limit_in_bytes").read_text() == str(512 * MiB)
    assert (task["memory"] / "memory.soft_limit_in_bytes").read_text() == str(256 * MiB)
    assert (task["cpu"] / "cpu.shares").read_text() == "2"  # the kernel's minimum
    assert (task["cpuset"] / "cpuset.cpus").read_text() == "1"
    assert (task["cpuset"] / "cpuset.mems").read_text() == "0"
    assert (task["pids"] / "pids.max").read_text() == "64"
    assert set(cg.procs_files) == {str(d / "cgroup.procs") for d in task.values()}
    assert manager.names() == ["a.t"]
    with pytest.raises(FileExistsError):
        manager.create("a.t", limits)


@pytest.mark.parametrize("memory_max", [None, 0, 256 * MiB])
def test_v1_memory_is_the_hard_limit_without_memory_max(
        tmp_path: Path, memory_max: int | None) -> None:
    root = fake_v1(tmp_path)
    limits = CgroupLimits(memory_bytes=256 * MiB, memory_max_bytes=memory_max, cpu_shares=500)
    CgroupManager.detect(root, parent="p").create("a.t", limits)
    memory = root / "memory/p/a.t"
    assert (memory / "memory.limit_in_bytes").read_text() == str(256 * MiB)
    assert not (memory / "memory.soft_limit_in_bytes").exists()
    # Nomad's cores pin; without them the task has the whole parent's cpuset.
    assert (root / "cpuset/p/a.t/cpuset.cpus").read_text() == "0-3"
    assert not (root / "pids/p/a.t/pids.max").exists()


def test_v1_shared_cpu_cpuacct_mount_is_one_directory(tmp_path: Path) -> None:
    root = fake_v1(tmp_path, controllers=("memory", "cpu,cpuacct", "freezer"))
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    cg = CgroupManager.detect(root, parent="p").create("a.t", LIMITS)
    assert len(cg.procs_files) == 3
    assert (root / "cpu,cpuacct/p/a.t/cpu.shares").read_text() == "500"


def test_v2_create_enables_controllers_and_writes_limits(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    manager = CgroupManager.detect(root, parent="p")
    assert manager.version == 2
    assert (root / "cgroup.subtree_control").read_text() == ""
    assert not (root / "p").exists()
    limits = CgroupLimits(memory_bytes=256 * MiB, memory_max_bytes=512 * MiB, cpu_shares=1024,
                          cpuset_cpus="0-1", pids_max=64)
    cg = manager.create("a.t", limits)
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu +pids +cpuset"
    assert (root / "p/cgroup.subtree_control").read_text() == "+memory +cpu +pids +cpuset"
    task = root / "p/a.t"
    assert cg.procs_files == (str(task / "cgroup.procs"),)
    assert (task / "memory.max").read_text() == str(512 * MiB)
    assert (task / "memory.low").read_text() == str(256 * MiB)
    assert (task / "cpu.weight").read_text() == "100"
    assert (task / "cpuset.cpus").read_text() == "0-1"
    assert (task / "pids.max").read_text() == "64"


def test_v2_controllers_already_enabled_are_left_alone(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    (root / "cgroup.subtree_control").write_text("cpu memory pids cpuset\n")
    CgroupManager.detect(root, parent="p").create("a.t", LIMITS)
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory pids cpuset\n"


@pytest.mark.parametrize("make, hard_file, unlimited", [
    (fake_v1, "memory/p/a.t/memory.limit_in_bytes", "-1"),
    (fake_v2, "p/a.t/memory.max", "max"),
])
def test_memory_max_minus_one_removes_the_hard_limit(
        tmp_path: Path, make: Callable[[Path], Path], hard_file: str, unlimited: str) -> None:
    root = make(tmp_path)
    limits = CgroupLimits(memory_bytes=64 * MiB, memory_max_bytes=-1, cpu_shares=100)
    CgroupManager.detect(root, parent="p").create("a.t", limits)
    assert (root / hard_file).read_text() == unlimited


def test_a_limit_without_its_controller_is_refused(tmp_path: Path) -> None:
    manager = CgroupManager.detect(fake_v2(tmp_path, controllers="cpu memory pids"), parent="p")
    with pytest.raises(CgroupsUnavailable, match="cpuset"):
        manager.create("a.t", CgroupLimits(64 * MiB, None, 100, cpuset_cpus="0"))
    assert manager.names() == []


def test_create_removes_its_directories_when_the_kernel_refuses(
        tmp_path: Path, fake_rmdir: None, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v1(tmp_path)
    manager = CgroupManager.detect(root, parent="p")
    real_write = cgroups._write

    def refuse_shares(path: Path, value: str) -> None:
        if path.name == "cpu.shares":
            raise PermissionError(13, "Permission denied", str(path))
        real_write(path, value)
    monkeypatch.setattr(cgroups, "_write", refuse_shares)
    with pytest.raises(PermissionError):
        manager.create("a.t", LIMITS)
    assert manager.names() == [] and manager.open("a.t") is None


def test_oom_killed_v1_reads_oom_control(tmp_path: Path) -> None:
    cg = CgroupManager.detect(fake_v1(tmp_path), parent="p").create("a.t", LIMITS)
    control = tmp_path / "memory/p/a.t/memory.oom_control"
    control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not cg.oom_killed()
    control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.oom_killed()


def test_oom_killed_v2_reads_memory_events(tmp_path: Path) -> None:
    cg = CgroupManager.detect(fake_v2(tmp_path), parent="p").create("a.t", LIMITS)
    events = tmp_path / "p/a.t/memory.events"
    events.write_text("low 0\nhigh 0\nmax 5\noom 1\noom_kill 0\noom_group_kill 0\n")
    assert not cg.oom_killed()
    events.write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\noom_group_kill 0\n")
    assert cg.oom_killed()


def test_usage_v1(tmp_path: Path) -> None:
    cg = CgroupManager.detect(fake_v1(tmp_path), parent="p").create("a.t", LIMITS)
    task = tmp_path
    (task / "memory/p/a.t/memory.stat").write_text(
        "cache 1\nrss 2\nswap 0\ntotal_cache 4096\ntotal_rss 8192\ntotal_swap 12\n")
    (task / "memory/p/a.t/memory.usage_in_bytes").write_text("20000\n")
    (task / "memory/p/a.t/memory.max_usage_in_bytes").write_text("30000\n")
    (task / "memory/p/a.t/memory.kmem.usage_in_bytes").write_text("500\n")
    (task / "memory/p/a.t/memory.kmem.max_usage_in_bytes").write_text("700\n")
    (task / "cpuacct/p/a.t/cpuacct.usage").write_text("9000000\n")
    (task / "cpuacct/p/a.t/cpuacct.usage_user").write_text("6000000\n")
    (task / "cpuacct/p/a.t/cpuacct.usage_sys").write_text("3000000\n")
    (task / "cpu/p/a.t/cpu.stat").write_text(
        "nr_periods 10\nnr_throttled 3\nthrottled_time 777\n")
    assert cg.usage() == cgroups.CgroupUsage(
        memory_rss=8192, memory_cache=4096, memory_swap=12, memory_usage=20000,
        memory_max_usage=30000, memory_kernel_usage=500, memory_kernel_max_usage=700,
        cpu_user_ns=6000000, cpu_system_ns=3000000, cpu_total_ns=9000000,
        throttled_periods=3, throttled_time_ns=777)


def test_usage_v1_from_cpuacct_stat_ticks(tmp_path: Path) -> None:
    cg = CgroupManager.detect(fake_v1(tmp_path), parent="p").create("a.t", LIMITS)
    hz = os.sysconf("SC_CLK_TCK")
    (tmp_path / "cpuacct/p/a.t/cpuacct.stat").write_text(f"user {2 * hz}\nsystem {hz}\n")
    usage = cg.usage()
    assert (usage.cpu_user_ns, usage.cpu_system_ns) == (2_000_000_000, 1_000_000_000)


def test_usage_v2(tmp_path: Path) -> None:
    cg = CgroupManager.detect(fake_v2(tmp_path), parent="p").create("a.t", LIMITS)
    task = tmp_path / "p/a.t"
    (task / "memory.stat").write_text("anon 8192\nfile 4096\nkernel 500\nsock 0\n")
    (task / "memory.current").write_text("20000\n")
    (task / "memory.swap.current").write_text("12\n")
    (task / "memory.peak").write_text("30000\n")
    (task / "cpu.stat").write_text(
        "usage_usec 9000\nuser_usec 6000\nsystem_usec 3000\n"
        "nr_periods 10\nnr_throttled 3\nthrottled_usec 7\n")
    assert cg.usage() == cgroups.CgroupUsage(
        memory_rss=8192, memory_cache=4096, memory_swap=12, memory_usage=20000,
        memory_max_usage=30000, memory_kernel_usage=500, cpu_user_ns=6000000,
        cpu_system_ns=3000000, cpu_total_ns=9000000, throttled_periods=3,
        throttled_time_ns=7000)
    (task / "memory.peak").unlink()
    assert cg.usage().memory_max_usage == 20000


@pytest.mark.parametrize("make", [fake_v1, fake_v2])
def test_remove_orphans_keeps_the_known_and_other_agents(
        tmp_path: Path, fake_rmdir: None, make: Callable[[Path], Path]) -> None:
    root = make(tmp_path)
    mine = CgroupManager.detect(root, parent="agent-a")
    theirs = CgroupManager.detect(root, parent="agent-b")
    live = mine.create("live.web", LIMITS)
    for name in ("gone.web", "gone.db"):
        mine.create(name, LIMITS)
    theirs.create("gone.web", LIMITS)
    assert mine.remove_orphans(keep={"live.web"}) == ["gone.db", "gone.web"]
    assert mine.names() == ["live.web"]
    assert theirs.names() == ["gone.web"]
    opened = mine.open("live.web")
    assert opened is not None and opened.procs_files == live.procs_files
    assert mine.open("gone.web") is None


def test_open_after_a_partial_create_sees_the_directories_left(
        tmp_path: Path, fake_rmdir: None) -> None:
    root = fake_v1(tmp_path)
    manager = CgroupManager.detect(root, parent="p")
    (root / "freezer/p/crashed.t").mkdir(parents=True)  # what a crashed agent left
    (root / "freezer/p/crashed.t/cgroup.procs").write_text("")
    cg = manager.open("crashed.t")
    assert cg is not None
    assert cg.procs_files == (str(root / "freezer/p/crashed.t/cgroup.procs"),)
    with pytest.raises(FileNotFoundError, match="no memory cgroup"):
        cg.usage()
    sampler = TaskUsageSampler(lambda: 1000.0, cgroups=lambda: manager)
    usage = sampler.task_usage("crashed", "t", 0, 0.0, cgroup="crashed.t")["ResourceUsage"]
    assert usage["MemoryStats"]["Measured"] == ["RSS", "Swap"]  # the process tree's
    assert manager.remove_orphans(set()) == ["crashed.t"]
    assert not (root / "freezer/p/crashed.t").exists()


def test_cgroup_of_reads_the_handles_driver_state() -> None:
    assert cgroup_of({"cgroup": "a.t", "pid": 3}) == "a.t"
    assert cgroup_of({}) is None and cgroup_of(None) is None and cgroup_of({"cgroup": 7}) is None


def test_agent_cgroups_never_makes_the_parent(tmp_path: Path) -> None:
    root = fake_v1(tmp_path / "root")
    assert agent_cgroups(tmp_path / "data", root) is None
    assert not (root / "memory" / agent_parent(tmp_path / "data")).exists()
    made = CgroupManager.detect(root, parent=agent_parent(tmp_path / "data"))
    assert agent_cgroups(tmp_path / "data", root) is None  # detecting made nothing either
    made.create("a.t", LIMITS)
    manager = agent_cgroups(tmp_path / "data", root)
    assert manager is not None and manager.version == 1


@pytest.mark.parametrize("make", [fake_v1, fake_v2])
def test_parent_is_removed_once_empty_and_made_again_when_needed(
        tmp_path: Path, fake_rmdir: None, make: Callable[[Path], Path]) -> None:
    root = make(tmp_path)
    manager = CgroupManager.detect(root, parent="p")
    assert manager.remove_parent_if_empty()  # never made: nothing to do
    cg = manager.create("a.t", LIMITS)
    assert not manager.remove_parent_if_empty()  # a task cgroup keeps it
    assert manager.names() == ["a.t"]
    cg.destroy()
    assert manager.remove_parent_if_empty()
    assert [p for p in root.rglob("p") if p.is_dir()] == []
    manager.create("b.t", LIMITS)  # the same manager makes it again
    assert manager.names() == ["b.t"]


def test_remove_agent_cgroups_takes_the_task_cgroups_and_the_parent(
        tmp_path: Path, fake_rmdir: None) -> None:
    root = fake_v1(tmp_path / "root")
    data_dir = tmp_path / "data"
    assert remove_agent_cgroups(data_dir, root) == []
    manager = CgroupManager.detect(root, parent=agent_parent(data_dir))
    other = CgroupManager.detect(root, parent=agent_parent(tmp_path / "other"))
    for name in ("a.t", "b.t"):
        manager.create(name, LIMITS)
    other.create("a.t", LIMITS)
    assert remove_agent_cgroups(data_dir, root) == ["a.t", "b.t"]
    assert agent_cgroups(data_dir, root) is None
    assert other.names() == ["a.t"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_task_stats_come_from_its_cgroup(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    manager = CgroupManager.detect(root, parent="p")
    manager.create("a.t", LIMITS)
    task = {c: root / c / "p/a.t" for c in V1_CONTROLLERS}
    (task["memory"] / "memory.stat").write_text("total_cache 4096\ntotal_rss 8192\n")
    (task["memory"] / "memory.usage_in_bytes").write_text("20000\n")
    (task["cpu"] / "cpu.stat").write_text("nr_throttled 3\nthrottled_time 777\n")

    def cpu(user_s: float, system_s: float) -> None:
        (task["cpuacct"] / "cpuacct.usage_user").write_text(f"{int(user_s * 1e9)}\n")
        (task["cpuacct"] / "cpuacct.usage_sys").write_text(f"{int(system_s * 1e9)}\n")
    cpu(1.0, 0.5)
    clock = Clock()
    sampler = TaskUsageSampler(lambda: 1000.0, cgroups=lambda: manager, clock=clock)
    started = time.time() - 10  # the task's root process: nothing to measure but its cgroup
    first = sampler.alloc_usage("a", {"t": (0, started)}, {"t": "a.t"})
    usage = first["Tasks"]["t"]["ResourceUsage"]
    assert usage["MemoryStats"] == {
        "RSS": 8192, "Cache": 4096, "Swap": 0, "MappedFile": 0, "Usage": 20000,
        "MaxUsage": 0, "KernelUsage": 0, "KernelMaxUsage": 0,
        "Measured": ["RSS", "Cache", "Swap", "Usage", "Max Usage", "Kernel Usage",
                     "Kernel Max Usage"]}
    assert usage["CpuStats"]["Measured"] == [
        "System Mode", "User Mode", "Throttled Periods", "Throttled Time", "Percent"]
    assert (usage["CpuStats"]["ThrottledPeriods"], usage["CpuStats"]["ThrottledTime"]) == (3, 777)
    # Measured since the task started (about ten seconds of the clock's): some 15 percent.
    assert 10 < usage["CpuStats"]["Percent"] < 20
    assert first["ResourceUsage"]["MemoryStats"]["Usage"] == 20000
    assert first["ResourceUsage"]["CpuStats"]["ThrottledPeriods"] == 3

    cpu(1.5, 0.75)
    clock.now += 1.0
    usage = sampler.task_usage("a", "t", 0, started, cgroup="a.t")["ResourceUsage"]
    assert usage["CpuStats"]["UserMode"] == pytest.approx(50.0)
    assert usage["CpuStats"]["SystemMode"] == pytest.approx(25.0)
    assert usage["CpuStats"]["Percent"] == pytest.approx(75.0)
    assert usage["CpuStats"]["TotalTicks"] == pytest.approx(750.0)

    # A cgroup gone (or never there) falls back to the process tree.
    gone = sampler.task_usage("a", "t", 0, started, cgroup="a.other")["ResourceUsage"]
    assert gone["MemoryStats"]["Measured"] == ["RSS", "Swap"]


# ---- the real kernel --------------------------------------------------------------------

def _real_manager(tag: str) -> CgroupManager:
    try:
        return CgroupManager.detect(parent=f"nomad_client-test-{tag}-{uuid.uuid4().hex[:8]}")
    except CgroupsUnavailable as exc:
        pytest.skip(f"cgroups unavailable on this machine: {exc}")


@pytest.fixture
def real_managers() -> Iterator[Callable[[str], CgroupManager]]:
    """Managers on the real cgroup tree, each under its own parent; all removed afterwards."""
    made: list[CgroupManager] = []

    def make(tag: str) -> CgroupManager:
        made.append(_real_manager(tag))
        return made[-1]
    yield make
    for manager in made:
        manager.destroy_parent()


@pytest.fixture
def real(real_managers: Callable[[str], CgroupManager]) -> CgroupManager:
    return real_managers("a")


def spawn_in(cg: cgroups.TaskCgroup, *argv: str) -> subprocess.Popen[bytes]:
    """Start argv already inside ``cg``: a shell joins every procs file, then execs it."""
    joins = "".join(f'echo $$ > "{f}" && ' for f in cg.procs_files)
    return subprocess.Popen(["sh", "-c", f'{joins}exec "$@"', "sh", *argv])


def holds_only(cg: cgroups.TaskCgroup, proc: subprocess.Popen[bytes]) -> bool:
    return cg.pids() == [proc.pid]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _dirs_of(manager: CgroupManager, name: str) -> list[Path]:
    cg = manager.open(name)
    return [] if cg is None else [Path(f).parent for f in cg.procs_files]


def test_real_cgroup_limits_usage_kill_and_destroy(real: CgroupManager) -> None:
    limits = CgroupLimits(memory_bytes=64 * MiB, memory_max_bytes=128 * MiB, cpu_shares=300,
                          cpuset_cpus="0", pids_max=32)
    cg = real.create("alloc1.sleeper", limits)
    dirs = _dirs_of(real, "alloc1.sleeper")
    files = {f.name: f.read_text().strip() for d in dirs for f in d.iterdir() if f.is_file()
             and f.name in {"memory.limit_in_bytes", "memory.soft_limit_in_bytes", "memory.max",
                            "memory.low", "cpu.shares", "cpu.weight", "cpuset.cpus",
                            "pids.max"}}
    if real.version == 1:
        assert files["memory.limit_in_bytes"] == str(128 * MiB)
        assert files["memory.soft_limit_in_bytes"] == str(64 * MiB)
        assert files["cpu.shares"] == "300"
    else:
        assert files["memory.max"] == str(128 * MiB)
        assert files["memory.low"] == str(64 * MiB)
        assert files["cpu.weight"] == str(cpu_weight(300))
    assert files["cpuset.cpus"] == "0" and files["pids.max"] == "32"

    proc = spawn_in(cg, "sleep", "600")
    try:
        wait_until(lambda: cg.pids() == [proc.pid], "the sleeper in its cgroup")
        wait_until(lambda: cg.usage().memory_usage > 0, "memory usage")
        assert cg.usage().cpu_total_ns > 0
        stats = TaskUsageSampler(lambda: 1000.0, cgroups=lambda: real).task_usage(
            "alloc1", "sleeper", proc.pid, psutil.Process(proc.pid).create_time(),
            cgroup="alloc1.sleeper")
        assert stats["ResourceUsage"]["MemoryStats"]["Usage"] > 0
        assert "Throttled Periods" in stats["ResourceUsage"]["CpuStats"]["Measured"]
        assert set(stats["Pids"]) == {str(proc.pid)}
        assert not cg.oom_killed()
        cg.kill_all()
        assert proc.wait(timeout=10) == -9
        assert cg.pids() == []
    finally:
        proc.kill()
        proc.wait()
    cg.destroy()
    assert all(not d.exists() for d in dirs)
    assert real.open("alloc1.sleeper") is None and real.names() == []
    cg.destroy()  # again: nothing left is fine


def test_real_destroy_kills_what_remains(real: CgroupManager) -> None:
    cg = real.create("alloc2.forker", LIMITS)
    proc = spawn_in(cg, "sh", "-c", "sleep 600 & sleep 600 & wait")
    try:
        wait_until(lambda: len(cg.pids()) == 3, "the shell and its two children")
        cg.destroy()
        assert proc.wait(timeout=10) == -9
    finally:
        proc.kill()
        proc.wait()
    assert real.names() == []


def test_real_oom_kill_is_recorded(real: CgroupManager) -> None:
    cg = real.create("alloc3.hog", CgroupLimits(memory_bytes=32 * MiB, memory_max_bytes=None,
                                                 cpu_shares=100))
    proc = spawn_in(cg, sys.executable, "-c", "b = bytearray(200 << 20)")
    try:
        assert proc.wait(timeout=60) == -9
    finally:
        proc.kill()
        proc.wait()
    assert cg.oom_killed()
    assert cg.usage().memory_max_usage >= 30 * MiB


def test_real_orphans_removed_only_under_our_parent(
        real_managers: Callable[[str], CgroupManager]) -> None:
    mine, theirs = real_managers("mine"), real_managers("theirs")
    live = mine.create("live.web", LIMITS)
    orphan = mine.create("gone.web", LIMITS)
    other = theirs.create("gone.web", LIMITS)
    procs = [spawn_in(cg, "sleep", "600") for cg in (live, orphan, other)]
    try:
        for proc, cg in zip(procs, (live, orphan, other), strict=True):
            wait_until(functools.partial(holds_only, cg, proc), "a sleeper")
        assert mine.remove_orphans(keep={"live.web"}) == ["gone.web"]
        assert procs[1].wait(timeout=10) == -9
        assert mine.names() == ["live.web"] and theirs.names() == ["gone.web"]
        assert live.pids() == [procs[0].pid] and other.pids() == [procs[2].pid]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_agent_start_removes_only_orphans(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    try:
        manager = CgroupManager.detect(parent=agent_parent(data_dir))
    except CgroupsUnavailable as exc:
        pytest.skip(f"cgroups unavailable on this machine: {exc}")
    try:
        live, orphan = manager.create("a1.web", LIMITS), manager.create("a2.web", LIMITS)
        procs = [spawn_in(cg, "sleep", "600") for cg in (live, orphan)]
        try:
            for proc, cg in zip(procs, (live, orphan), strict=True):
                wait_until(functools.partial(holds_only, cg, proc), "a sleeper")
            handle = TaskHandle(driver="exec", alloc_id="a1", task="web", pid=procs[0].pid,
                                create_time=0.0, started_at=0.0,
                                driver_state={"cgroup": "a1.web"})
            agent = Client.__new__(Client)  # only its settings matter here
            agent.settings = cast(ClientSettings, SimpleNamespace(data_dir=data_dir))
            await agent._remove_orphan_cgroups({"a1": {"web": RestoredTask(TaskState(), handle)}})
            assert procs[1].wait(timeout=10) == -9
            assert manager.names() == ["a1.web"] and live.pids() == [procs[0].pid]

            # Nothing left to keep: the parent goes too (an exec task makes it again).
            await agent._remove_orphan_cgroups({})
            assert procs[0].wait(timeout=10) == -9
            assert agent_cgroups(data_dir) is None
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    finally:
        manager.destroy_parent()
