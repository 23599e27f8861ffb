"""Resource usage of tasks and of the host, measured with psutil, in Nomad's shapes:
``AllocResourceUsage`` (``/v1/client/allocation/:id/stats``) and ``HostStats``
(``/v1/client/stats``).

A task's usage is that of its whole process tree: the process its driver handle names (for
raw_exec, the executor) and every descendant. A task with a cgroup (exec: its handle's
``driver_state`` names it) is measured by the cgroup's counters instead, as Nomad's exec
driver does; its ``Pids`` are still the tree's. CPU percentages are the difference between two
samples over the time between them, so a request never waits for a second sample: each
sampler keeps its previous ones (per task, and for the host). A sample is measured against
the latest one at least ``MIN_INTERVAL`` older (two requests in a row would otherwise
measure a few milliseconds); a task's first sample measures from its processes' start, the
host's first from boot.

Everything here is synchronous and may take milliseconds (``/proc`` reads, a ``statvfs`` per
mount): callers run it in a worker thread. Samplers are safe to use from several threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import psutil

from nomad_client.client.cgroups import CgroupManager, CgroupUsage
from nomad_client.client.drivers import proctree

# What the per-process measurements fill in (Nomad's labels, not field names).
MEMORY_MEASURED = ("RSS", "Swap")
CPU_MEASURED = ("System Mode", "User Mode", "Percent")
# What a task's cgroup fills in, as Nomad's exec driver labels it per cgroup version.
CGROUP_MEMORY_MEASURED = {
    1: ("RSS", "Cache", "Swap", "Usage", "Max Usage", "Kernel Usage", "Kernel Max Usage"),
    2: ("RSS", "Cache", "Swap", "Usage"),
}
CGROUP_CPU_MEASURED = ("System Mode", "User Mode", "Throttled Periods", "Throttled Time",
                       "Percent")
# Stands for a task's cgroup among its processes' CPU samples: no process has pid 0.
_CGROUP_PID = 0
# Memory fields an allocation's usage sums over its tasks (the others are labels or derived).
_SUMMED_MEMORY = ("RSS", "Cache", "Swap", "MappedFile", "Usage", "MaxUsage", "KernelUsage",
                  "KernelMaxUsage")

ProcessKey = tuple[int, float]  # (pid, create time): a reused pid is another process
# The shortest interval a CPU percentage is measured over (seconds).
MIN_INTERVAL = 0.5
S = TypeVar("S")
Key = tuple[str, ...]


class Baselines(Generic[S]):
    """The samples new ones are measured against, per key. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (older, latest): (monotonic time, sample) each; older may be None.
        self._kept: dict[Key, tuple[tuple[float, S] | None, tuple[float, S]]] = {}

    def measure_against(self, key: Key, sample: S) -> tuple[float, S] | None:
        """(time, sample) to measure ``sample``, taken now, against: the latest kept one at
        least ``MIN_INTERVAL`` old, None if there is none. ``sample`` is kept in turn unless
        the latest is younger than that."""
        now = self._clock()
        with self._lock:
            kept = self._kept.get(key)
            if kept is None:
                self._kept[key] = (None, (now, sample))
                return None
            older, latest = kept
            if now - latest[0] < MIN_INTERVAL:
                return older
            self._kept[key] = (latest, (now, sample))
            return latest

    def forget(self, keep: Callable[[Key], bool]) -> None:
        """Drop the samples of every key ``keep`` says no to."""
        with self._lock:
            self._kept = {k: v for k, v in self._kept.items() if keep(k)}


@attrs.frozen
class _CPUTimes:
    user: float  # seconds
    system: float


# A task's processes' CPU times at one moment.
CPUSample = Mapping[ProcessKey, "_CPUTimes"]


@attrs.frozen
class _Measured:
    """One process as sampled."""

    key: ProcessKey
    cpu: _CPUTimes
    rss: int
    swap: int


def memory_stats(rss: int = 0, swap: int = 0) -> dict[str, Any]:
    return {"RSS": rss, "Cache": 0, "Swap": swap, "MappedFile": 0, "Usage": 0, "MaxUsage": 0,
            "KernelUsage": 0, "KernelMaxUsage": 0, "Measured": list(MEMORY_MEASURED)}


def cpu_stats(user: float = 0.0, system: float = 0.0, *, cpu_mhz: float) -> dict[str, Any]:
    """CPU use as percentages of one core; ``TotalTicks`` is the same in MHz."""
    percent = user + system
    return {"SystemMode": system, "UserMode": user, "TotalTicks": percent / 100 * cpu_mhz,
            "ThrottledPeriods": 0, "ThrottledTime": 0, "Percent": percent,
            "Measured": list(CPU_MEASURED)}


def resource_usage(memory: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    return {"MemoryStats": memory, "CpuStats": cpu, "DeviceStats": None}


def sum_usage(usages: Iterable[Mapping[str, Any]], *, cpu_mhz: float) -> dict[str, Any]:
    """The sum of ``ResourceUsage`` values (an allocation's is the sum of its tasks'), each
    ``Measured`` list the union of the parts' (as Nomad adds them)."""
    memory = memory_stats()
    user = system = 0.0
    throttled_periods = throttled_time = 0
    mem_measured: dict[str, None] = {}
    cpu_measured: dict[str, None] = {}
    for usage in usages:
        mem, cpu = usage["MemoryStats"], usage["CpuStats"]
        for field in _SUMMED_MEMORY:
            memory[field] += mem[field]
        user += cpu["UserMode"]
        system += cpu["SystemMode"]
        throttled_periods += cpu["ThrottledPeriods"]
        throttled_time += cpu["ThrottledTime"]
        mem_measured.update(dict.fromkeys(mem["Measured"]))
        cpu_measured.update(dict.fromkeys(cpu["Measured"]))
    total_cpu = cpu_stats(user, system, cpu_mhz=cpu_mhz)
    total_cpu.update(ThrottledPeriods=throttled_periods, ThrottledTime=throttled_time)
    if mem_measured:
        memory["Measured"], total_cpu["Measured"] = list(mem_measured), list(cpu_measured)
    return resource_usage(memory, total_cpu)


def _tree(root_pid: int, root_create_time: float) -> list[psutil.Process]:
    """The process ``root_pid`` (if it is still the one started then) and its descendants."""
    if root_pid <= 0 or not proctree.same_process(root_pid, root_create_time):
        return []
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _measure(proc: psutil.Process) -> _Measured | None:
    try:
        with proc.oneshot():
            key = (proc.pid, proc.create_time())
            times = proc.cpu_times()
            try:
                full = proc.memory_full_info()
                rss, swap = int(full.rss), int(getattr(full, "swap", 0))
            except psutil.AccessDenied:
                rss, swap = int(proc.memory_info().rss), 0
    except psutil.Error:
        return None  # gone since the tree was listed
    return _Measured(key, _CPUTimes(times.user, times.system), rss, swap)


class TaskUsageSampler:
    """Measures tasks' process trees, keeping each task's previous sample for the next CPU
    percentage. ``cpu_mhz`` tells one core's speed (for ``TotalTicks``)."""

    def __init__(self, cpu_mhz: Callable[[], float], *,
                 cgroups: Callable[[], CgroupManager | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cpu_mhz = cpu_mhz
        self._cgroups = cgroups
        self._clock = clock
        # (alloc ID, task) -> the CPU times of each of its processes
        self._baselines: Baselines[CPUSample] = Baselines(clock)

    def alloc_usage(self, alloc_id: str, roots: Mapping[str, tuple[int, float]],
                    cgroups: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``AllocResourceUsage`` of the tasks in ``roots`` (task -> (pid, create time) of
        the process its handle names); ``cgroups`` names the tasks' cgroups, if they have."""
        cgroups = cgroups or {}
        tasks = {task: self.task_usage(alloc_id, task, *root, cgroup=cgroups.get(task))
                 for task, root in roots.items()}
        return {"ResourceUsage": sum_usage((t["ResourceUsage"] for t in tasks.values()),
                                           cpu_mhz=self._cpu_mhz()),
                "Tasks": tasks, "Timestamp": time.time_ns()}

    def task_usage(self, alloc_id: str, task: str, root_pid: int, root_create_time: float,
                   cgroup: str | None = None) -> dict[str, Any]:
        """``TaskResourceUsage``: the tree's sums (the cgroup's counters when the task has
        one), and each process of the tree under ``Pids``."""
        measured = [m for m in map(_measure, _tree(root_pid, root_create_time))
                    if m is not None]
        in_cgroup = self._cgroup_usage(cgroup)
        whole = None if in_cgroup is None else _as_process(in_cgroup[1], root_create_time)
        sampled = measured if whole is None else [*measured, whole]
        now = self._clock()
        previous = self._baselines.measure_against((alloc_id, task),
                                                   {m.key: m.cpu for m in sampled})
        mhz = self._cpu_mhz()
        pids = {str(m.key[0]): _process_usage(m, previous, now, mhz) for m in measured}
        if in_cgroup is None or whole is None:
            usage = sum_usage(pids.values(), cpu_mhz=mhz)
        else:
            usage = _with_cgroup(_process_usage(whole, previous, now, mhz), *in_cgroup)
        return {"ResourceUsage": usage, "Timestamp": time.time_ns(), "Pids": pids}

    def _cgroup_usage(self, name: str | None) -> tuple[int, CgroupUsage] | None:
        """(cgroup version, counters) of the task cgroup ``name``; None to measure the
        process tree instead (no cgroup, or it cannot be read)."""
        manager = self._cgroups() if name else None
        if manager is None or name is None:
            return None
        try:
            cg = manager.open(name)
            return None if cg is None else (cg.version, cg.usage())
        except (OSError, ValueError):
            return None

    def forget(self, alloc_id: str) -> None:
        """Drop the previous samples of ``alloc_id``'s tasks (it is gone)."""
        self._baselines.forget(lambda key: key[0] != alloc_id)


def _process_usage(m: _Measured, previous: tuple[float, CPUSample] | None, now: float,
                   cpu_mhz: float) -> dict[str, Any]:
    """One process's usage since ``previous`` (its time and CPU times; monotonic ``now``)."""
    before = previous[1].get(m.key) if previous is not None else None
    if previous is not None and before is not None:
        since = previous[0]
        user, system = m.cpu.user - before.user, m.cpu.system - before.system
    else:
        # New since the last sample (or none yet): all its CPU time is in the interval,
        # which starts when the process did if that is later.
        started = now - max(0.0, time.time() - m.key[1])
        since = started if previous is None else max(previous[0], started)
        user, system = m.cpu.user, m.cpu.system
    elapsed = now - since

    def percent(seconds: float) -> float:
        return max(0.0, seconds) / elapsed * 100 if elapsed > 0 else 0.0

    return resource_usage(memory_stats(m.rss, m.swap),
                          cpu_stats(percent(user), percent(system), cpu_mhz=cpu_mhz))


def _as_process(c: CgroupUsage, started: float) -> _Measured:
    """A task's cgroup as if it were one process (pid 0), started when its root was: so its
    CPU times are measured against the previous sample like a process's."""
    return _Measured((_CGROUP_PID, started),
                     _CPUTimes(c.cpu_user_ns / 1e9, c.cpu_system_ns / 1e9),
                     c.memory_rss, c.memory_swap)


def _with_cgroup(usage: dict[str, Any], version: int, c: CgroupUsage) -> dict[str, Any]:
    """A task's ``ResourceUsage`` from its cgroup's counters, in Nomad's fields and labels."""
    usage["MemoryStats"].update(
        Cache=c.memory_cache, Usage=c.memory_usage, MaxUsage=c.memory_max_usage,
        KernelUsage=c.memory_kernel_usage, KernelMaxUsage=c.memory_kernel_max_usage,
        Measured=list(CGROUP_MEMORY_MEASURED[version]))
    usage["CpuStats"].update(ThrottledPeriods=c.throttled_periods,
                             ThrottledTime=c.throttled_time_ns,
                             Measured=list(CGROUP_CPU_MEASURED))
    return usage


# ---- the host ------------------------------------------------------------------------------
def _cpu_total(times: Any) -> float:
    # guest time is already part of user time on Linux.
    total = float(sum(times))
    return total - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _disk_stats(device: str, mountpoint: str) -> dict[str, Any] | None:
    try:
        usage = psutil.disk_usage(mountpoint)
        vfs = os.statvfs(mountpoint)
    except OSError:
        return None  # unmounted meanwhile, or not ours to look at
    inodes = vfs.f_files
    inodes_used = (inodes - vfs.f_ffree) / inodes * 100 if inodes else 0.0
    return {"Device": device, "Mountpoint": mountpoint, "Size": usage.total,
            "Used": usage.used, "Available": usage.free, "UsedPercent": usage.percent,
            "InodesUsedPercent": inodes_used}


def _one_cpu(index: int, now: Any, before: Any | None, cpu_mhz: float) -> dict[str, Any]:
    """One core's use since ``before`` (None: since boot), in percent."""
    total = _cpu_total(now) - (_cpu_total(before) if before is not None else 0.0)

    def share(field: str) -> float:
        spent = getattr(now, field) - (getattr(before, field) if before is not None else 0.0)
        return max(0.0, spent) / total * 100 if total > 0 else 0.0

    idle = share("idle")
    busy = 100.0 - idle if total > 0 else 0.0
    return {"CPU": f"cpu{index}", "User": share("user"), "System": share("system"),
            "Idle": idle, "Total": busy, "TotalPercent": busy,
            "TotalTicks": busy / 100 * cpu_mhz}


class HostStatsSampler:
    """Measures the host, keeping the previous CPU times for the next percentages.
    ``cpu_mhz`` tells one core's speed (for ``TotalTicks`` and ``CPUTicksConsumed``)."""

    def __init__(self, cpu_mhz: Callable[[], float]) -> None:
        self._cpu_mhz = cpu_mhz
        self._baselines: Baselines[list[Any]] = Baselines()

    def host_stats(self, alloc_dir: Path) -> dict[str, Any]:
        """``HostStats``; ``AllocDirStats`` is the file system holding ``alloc_dir``."""
        memory = psutil.virtual_memory()
        cpus = self._cpu_stats()
        partitions = psutil.disk_partitions(all=False)
        disks = [s for p in partitions if (s := _disk_stats(p.device, p.mountpoint))]
        return {
            "Memory": {"Total": memory.total, "Available": memory.available,
                       "Used": memory.used, "Free": memory.free},
            "CPU": cpus,
            "DiskStats": disks,
            "AllocDirStats": _alloc_dir_stats(alloc_dir),
            "DeviceStats": [],
            "Uptime": max(0, int(time.time() - psutil.boot_time())),
            "Timestamp": time.time_ns(),
            "CPUTicksConsumed": sum(cpu["TotalTicks"] for cpu in cpus),
        }

    def _cpu_stats(self) -> list[dict[str, Any]]:
        current = psutil.cpu_times(percpu=True)
        kept = self._baselines.measure_against(("cpus",), current)
        previous = kept[1] if kept is not None else []
        mhz = self._cpu_mhz()
        return [_one_cpu(index, now, previous[index] if index < len(previous) else None, mhz)
                for index, now in enumerate(current)]


def _alloc_dir_stats(alloc_dir: Path) -> dict[str, Any] | None:
    """The file system holding ``alloc_dir``: the deepest mount above it (of every kind:
    in a container it is often one that ``DiskStats`` leaves out)."""
    path = str(alloc_dir)
    mounts = [p for p in psutil.disk_partitions(all=True)
              if path == p.mountpoint or path.startswith(p.mountpoint.rstrip("/") + "/")]
    best = max(mounts, key=lambda p: len(p.mountpoint), default=None)
    stats = _disk_stats(best.device if best is not None else "", path)
    if stats is not None and best is not None:
        stats["Mountpoint"] = best.mountpoint
    return stats
