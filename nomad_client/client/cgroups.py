"""Control groups for isolated tasks: the one home of ``/sys/fs/cgroup``.

A ``CgroupManager`` owns one *parent* cgroup per agent and the task cgroups beneath it; a
``TaskCgroup`` is one task's: its limits, the files a pid is written to, its OOM record, its
usage, and killing and removing it. Both cgroup versions are served:

* v1 (also a "hybrid" host whose cgroup2 mount has no controllers): one directory per
  controller, ``<root>/<controller>/<parent>/<name>``;
* v2: one directory, ``<root>/<parent>/<name>``, with the controllers enabled in the
  ``cgroup.subtree_control`` of the root and of the parent.

The parent must be unique per agent, because ``remove_orphans`` removes every task cgroup
under it that the agent does not know, and several agents may share a machine: callers use
``agent_parent(data_dir)``, ``nomad_client-<12 hex of sha256(data_dir)>`` (``detect`` has
no default parent). Its lifecycle: ``detect`` only looks (fingerprinting makes nothing); the
first ``create`` makes the parent; the agent removes it once empty, at shutdown and at a
start with no exec task to restore (``remove_parent_if_empty``).

Every method makes blocking system calls (and ``kill_all`` polls the kernel for a bounded
time); async callers run them in a worker thread.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import math
import os
import signal
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "CgroupLimits",
    "CgroupManager",
    "CgroupUsage",
    "CgroupsUnavailable",
    "DRIVER_STATE_KEY",
    "TaskCgroup",
    "agent_cgroups",
    "agent_parent",
    "cgroup_of",
    "cpu_weight",
    "remove_agent_cgroups",
    "task_cgroup_name",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/fs/cgroup")
# A directory name: at most NAME_MAX bytes.
_MAX_NAME_BYTES = 255
# cpu.shares bounds, as the kernel's (and Nomad's clamp).
_MIN_SHARES = 2
_MAX_SHARES = 262_144
# Where a driver's TaskHandle.driver_state names the task's cgroup.
DRIVER_STATE_KEY = "cgroup"
# memory_max_bytes of -1: Nomad's "memory_max = -1", no hard limit at all.
NO_MEMORY_LIMIT = -1

_V1_REQUIRED = ("memory", "cpu", "cpuacct", "freezer")
_V1_OPTIONAL = ("cpuset", "pids")
_V2_REQUIRED = ("memory", "cpu", "pids")
_V2_OPTIONAL = ("cpuset",)

# How long kill_all and destroy wait for the kernel before giving up.
_KILL_TIMEOUT = 10.0
_POLL = 0.01
_USER_HZ = os.sysconf("SC_CLK_TCK")


class CgroupsUnavailable(Exception):
    """This node cannot give tasks cgroups; the message says why, for the exec fingerprint."""


@attrs.frozen
class CgroupLimits:
    """What a task may use, from its ``resources`` block."""

    memory_bytes: int
    # Oversubscription's hard limit; None (or Nomad's 0): ``memory_bytes`` is the hard
    # limit; -1: no hard limit.
    memory_max_bytes: int | None
    # Nomad's shares: the task's CPU in MHz (v1 cpu.shares; converted for v2's cpu.weight).
    cpu_shares: int
    # A cpuset such as "0-1" for ``resources.cores``; None: no pinning.
    cpuset_cpus: str | None = None
    pids_max: int | None = None

    @property
    def hard_and_soft(self) -> tuple[int, int]:
        """(hard limit, soft limit) in bytes as Nomad sets them; -1 is "no limit", 0 "none"."""
        if not self.memory_max_bytes or self.memory_max_bytes == self.memory_bytes:
            return self.memory_bytes, 0
        return self.memory_max_bytes, self.memory_bytes

    @property
    def clamped_shares(self) -> int:
        return min(max(self.cpu_shares, _MIN_SHARES), _MAX_SHARES)


@attrs.frozen
class CgroupUsage:
    """A task cgroup's counters, in bytes and nanoseconds."""

    memory_rss: int = 0
    memory_cache: int = 0
    memory_swap: int = 0
    memory_usage: int = 0
    memory_max_usage: int = 0
    memory_kernel_usage: int = 0
    memory_kernel_max_usage: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    cpu_total_ns: int = 0
    throttled_periods: int = 0
    throttled_time_ns: int = 0


def agent_parent(data_dir: Path | str) -> str:
    """The parent cgroup name of the agent whose data dir is ``data_dir``: unique per agent."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(data_dir))).hexdigest()
    return f"nomad_client-{digest[:12]}"


def cgroup_of(driver_state: Mapping[str, Any] | None) -> str | None:
    """The task cgroup a driver handle's state names (the exec driver's), if any."""
    name = (driver_state or {}).get(DRIVER_STATE_KEY)
    return name if isinstance(name, str) and name else None


def agent_cgroups(data_dir: Path | str, root: Path = DEFAULT_ROOT) -> CgroupManager | None:
    """The manager of the agent whose data dir is ``data_dir`` if its parent cgroup exists
    (an exec task made it), else None: neither looking nor a node without cgroups makes one."""
    parent = agent_parent(data_dir)
    if not ((root / parent).is_dir() or (root / "memory" / parent).is_dir()):
        return None
    try:
        return CgroupManager.detect(root, parent=parent)
    except CgroupsUnavailable:
        return None


def remove_agent_cgroups(data_dir: Path | str, root: Path = DEFAULT_ROOT) -> list[str]:
    """Kill every process in the task cgroups of the agent whose data dir is ``data_dir``,
    and remove them and its parent; the task cgroups' names. For test and bench teardown
    after an agent was killed: its tasks outlive it, and a chrooted one shows no path of it.
    """
    manager = agent_cgroups(data_dir, root)
    if manager is None:
        return []
    names = manager.names()
    manager.destroy_parent()
    return names


def task_cgroup_name(alloc_id: str, task: str) -> str:
    """``<alloc_id>.<task>`` made safe as one directory name.

    Characters a path could misread (``/``, NUL, ``%`` itself, controls, spaces) are
    percent-escaped; an over-long name keeps a readable prefix and a hash of the whole.
    """
    name = f"{alloc_id}.{urllib.parse.quote(task, safe='-_.@+=:,~')}"
    if len(name.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = f"{name[: _MAX_NAME_BYTES - 17]}~{digest}"
    return name


def cpu_weight(shares: int) -> int:
    """cgroup v2 ``cpu.weight`` for v1 ``cpu.shares``, as runc converts them.

    The curve maps the bounds to the bounds (2 -> 1, 262144 -> 10000) and the defaults to
    each other (1024 -> 100), so a task's share of a busy node is about what v1 gives it.
    """
    if shares <= _MIN_SHARES:
        return 1
    if shares >= _MAX_SHARES:
        return 10_000
    exp = math.log2(shares)
    return math.ceil(10 ** ((exp * exp + 125 * exp) / 612.0 - 7.0 / 34.0))


def _check_name(name: str, what: str) -> None:
    if (not name or name in (".", "..") or "/" in name or "\0" in name
            or len(name.encode()) > _MAX_NAME_BYTES):
        raise ValueError(f"invalid {what} cgroup name {name!r}")


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, value: str) -> None:
    # cgroupfs takes one value per write(2); no buffering, no partial writes.
    with open(path, "w", buffering=1) as f:
        f.write(value)


def _read_int(path: Path, default: int = 0) -> int:
    try:
        text = _read(path).strip()
    except FileNotFoundError:
        return default
    return int(text) if text.lstrip("-").isdigit() else default


def _keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (``key value`` lines), such as memory.stat or cpu.stat."""
    try:
        text = _read(path)
    except FileNotFoundError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _pids_in(path: Path) -> set[int]:
    try:
        return {int(p) for p in _read(path / "cgroup.procs").split()}
    except FileNotFoundError:
        return set()


def _remove_dir(path: Path) -> None:
    """rmdir a cgroup; a cgroup's files go with it, and a missing one is already gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def _kill(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(condition_met: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition_met():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


class TaskCgroup:
    """One task's cgroup: a directory per v1 controller, or one v2 directory."""

    def __init__(self, name: str, version: int, dirs: dict[str, Path]) -> None:
        self.name = name
        self.version = version
        # controller -> directory (v2: every controller -> the one directory)
        self._dirs = dirs
        self.procs_files: tuple[str, ...] = tuple(
            str(d / "cgroup.procs") for d in _distinct(dirs.values()))

    def __repr__(self) -> str:
        return f"TaskCgroup({self.name!r}, v{self.version})"

    def _dir(self, controller: str) -> Path:
        d = self._dirs.get(controller)
        if d is None:  # opened after a create an agent crash cut short
            raise FileNotFoundError(errno.ENOENT, f"no {controller} cgroup for {self.name}")
        return d

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for d in _distinct(self._dirs.values()):
            pids |= _pids_in(d)
        return sorted(pids)

    def oom_killed(self) -> bool:
        # v1 reports kills by the memcg OOM killer as oom_control's oom_kill line (Linux
        # 4.13+); memory.failcnt only counts hitting the limit, which reclaim often survives.
        if self.version == 1:
            counters = _keyed(self._dir("memory") / "memory.oom_control")
        else:
            counters = _keyed(self._dir("memory") / "memory.events")
        return counters.get("oom_kill", 0) > 0

    def usage(self) -> CgroupUsage:
        return self._usage_v1() if self.version == 1 else self._usage_v2()

    def _usage_v1(self) -> CgroupUsage:
        mem = self._dir("memory")
        stat = _keyed(mem / "memory.stat")
        acct = self._dir("cpuacct")
        user_ns = _read_int(acct / "cpuacct.usage_user", -1)
        system_ns = _read_int(acct / "cpuacct.usage_sys", -1)
        if user_ns < 0 or system_ns < 0:
            # Older kernels: only cpuacct.stat, in USER_HZ ticks.
            ticks = _keyed(acct / "cpuacct.stat")
            user_ns = ticks.get("user", 0) * 1_000_000_000 // _USER_HZ
            system_ns = ticks.get("system", 0) * 1_000_000_000 // _USER_HZ
        cpu = _keyed(self._dir("cpu") / "cpu.stat")
        return CgroupUsage(
            memory_rss=stat.get("total_rss", stat.get("rss", 0)),
            memory_cache=stat.get("total_cache", stat.get("cache", 0)),
            memory_swap=stat.get("total_swap", stat.get("swap", 0)),
            memory_usage=_read_int(mem / "memory.usage_in_bytes"),
            memory_max_usage=_read_int(mem / "memory.max_usage_in_bytes"),
            memory_kernel_usage=_read_int(mem / "memory.kmem.usage_in_bytes"),
            memory_kernel_max_usage=_read_int(mem / "memory.kmem.max_usage_in_bytes"),
            cpu_user_ns=user_ns,
            cpu_system_ns=system_ns,
            cpu_total_ns=_read_int(acct / "cpuacct.usage"),
            throttled_periods=cpu.get("nr_throttled", 0),
            throttled_time_ns=cpu.get("throttled_time", 0),
        )

    def _usage_v2(self) -> CgroupUsage:
        d = self._dir("memory")
        stat = _keyed(d / "memory.stat")
        cpu = _keyed(d / "cpu.stat")
        current = _read_int(d / "memory.current")
        return CgroupUsage(
            memory_rss=stat.get("anon", 0),
            memory_cache=stat.get("file", 0),
            memory_swap=_read_int(d / "memory.swap.current"),
            memory_usage=current,
            # memory.peak is Linux 5.19+; before it, the best known is the current usage.
            memory_max_usage=_read_int(d / "memory.peak", current),
            memory_kernel_usage=stat.get("kernel", 0),
            cpu_user_ns=cpu.get("user_usec", 0) * 1000,
            cpu_system_ns=cpu.get("system_usec", 0) * 1000,
            cpu_total_ns=cpu.get("usage_usec", 0) * 1000,
            throttled_periods=cpu.get("nr_throttled", 0),
            throttled_time_ns=cpu.get("throttled_usec", 0) * 1000,
        )

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, forks racing the kill included.

        Raises OSError (EBUSY) when processes remain after a bounded wait.
        """
        if self.version == 2 and (self._dir("memory") / "cgroup.kill").exists():
            if self.pids():
                _write(self._dir("memory") / "cgroup.kill", "1")
        else:
            # Frozen processes can neither fork nor exit, so every pid read stays theirs
            # until the thaw delivers the SIGKILLs.
            _wait_for(self._kill_frozen, _KILL_TIMEOUT)
        if not _wait_for(lambda: not self.pids(), _KILL_TIMEOUT):
            raise OSError(errno.EBUSY, f"processes remain in cgroup {self.name}: {self.pids()}")

    def _kill_frozen(self) -> bool:
        """One freeze, kill, thaw round; True when the cgroup was already empty."""
        pids = self.pids()
        if not pids:
            return True
        if self.version == 1 and "freezer" not in self._dirs:
            _kill(pids)  # nothing to freeze them with: kill what is there, look again
            return False
        self._freeze(True)
        try:
            _kill(self.pids())
        finally:
            self._freeze(False)
        return False

    def _freeze(self, frozen: bool) -> None:
        if self.version == 2:
            d = self._dir("memory")
            _write(d / "cgroup.freeze", "1" if frozen else "0")
            if frozen:
                _wait_for(lambda: _keyed(d / "cgroup.events").get("frozen") == 1, 1.0)
            return
        state = self._dir("freezer") / "freezer.state"
        _write(state, "FROZEN" if frozen else "THAWED")
        if frozen:
            _wait_for(lambda: _read(state).strip() == "FROZEN", 1.0)

    def destroy(self) -> None:
        """Kill what is left and remove every directory; ones already gone are fine."""
        if self.pids():
            self.kill_all()
        for d in _distinct(self._dirs.values()):
            # A process that just died may be counted for a moment after it is reaped.
            if not _wait_for(functools.partial(_rmdir_done, d), _KILL_TIMEOUT):
                _remove_dir(d)


def _rmdir_done(path: Path) -> bool:
    try:
        _remove_dir(path)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    return True


def _distinct(dirs: Iterable[Path]) -> list[Path]:
    """Directories in order, once each: v1 controllers may share a mount (cpu,cpuacct)."""
    seen: set[str] = set()
    out: list[Path] = []
    for d in dirs:
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


class CgroupManager:
    """This agent's parent cgroup and the task cgroups in it."""

    def __init__(self, version: int, parents: dict[str, Path]) -> None:
        self.version = version
        # controller -> the parent directory for it (v2: the same directory for all)
        self._parents = parents

    def __repr__(self) -> str:
        return f"CgroupManager(v{self.version}, {sorted(set(map(str, self._parents.values())))})"

    @classmethod
    def detect(cls, root: Path = DEFAULT_ROOT, *, parent: str) -> CgroupManager:
        """The node's cgroup version, for task cgroups under ``parent`` (``agent_parent``'s:
        no default, so no two agents share one by accident). Looks only: the parent is made
        by the first ``create``, and removed by ``remove_parent_if_empty``.

        Raises CgroupsUnavailable, saying why, when tasks cannot have cgroups here.
        """
        _check_name(parent, "parent")
        try:
            if (root / "cgroup.controllers").is_file():
                return cls._detect_v2(root, parent)
            if all((root / c / "cgroup.procs").is_file() for c in _V1_REQUIRED):
                return cls._detect_v1(root, parent)
        except OSError as exc:
            raise CgroupsUnavailable(f"cannot read cgroups at {root}: {exc}") from exc
        missing = [c for c in _V1_REQUIRED if not (root / c / "cgroup.procs").is_file()]
        raise CgroupsUnavailable(
            f"no cgroup v2 at {root} and cgroup v1 controllers missing: {', '.join(missing)}")

    @classmethod
    def _detect_v1(cls, root: Path, parent: str) -> CgroupManager:
        controllers = [*_V1_REQUIRED,
                       *(c for c in _V1_OPTIONAL if (root / c / "cgroup.procs").is_file())]
        return cls(1, {c: root / c / parent for c in controllers})

    @classmethod
    def _detect_v2(cls, root: Path, parent: str) -> CgroupManager:
        available = set(_read(root / "cgroup.controllers").split())
        missing = [c for c in _V2_REQUIRED if c not in available]
        if missing:
            raise CgroupsUnavailable(
                f"cgroup v2 at {root} lacks controllers: {', '.join(missing)}")
        wanted = [c for c in (*_V2_REQUIRED, *_V2_OPTIONAL) if c in available]
        return cls(2, dict.fromkeys(wanted, root / parent))

    def _ensure_parent(self) -> None:
        """Make the parent ready for task cgroups (again, if it was removed when empty)."""
        if self.version == 1:
            for c, d in self._parents.items():
                d.mkdir(exist_ok=True)
                if c == "cpuset":
                    _copy_cpuset(d.parent, d)
            return
        d = self._parents["memory"]
        controllers = list(self._parents)
        _enable_controllers(d.parent, controllers)
        d.mkdir(exist_ok=True)
        _enable_controllers(d, controllers)

    def _task_dirs(self, name: str) -> dict[str, Path]:
        _check_name(name, "task")
        return {c: p / name for c, p in self._parents.items()}

    def create(self, name: str, limits: CgroupLimits) -> TaskCgroup:
        """A new task cgroup with ``limits`` applied, ready for pids.

        Raises ValueError for a bad name, FileExistsError when it exists, CgroupsUnavailable
        when a limit needs a controller this node lacks, OSError when the kernel refuses.
        """
        dirs = self._task_dirs(name)
        if limits.cpuset_cpus is not None and "cpuset" not in dirs:
            raise CgroupsUnavailable("the cpuset controller is unavailable for resources.cores")
        if limits.pids_max is not None and "pids" not in dirs:
            raise CgroupsUnavailable("the pids controller is unavailable for a pids limit")
        self._ensure_parent()
        made: list[Path] = []
        try:
            for d in _distinct(dirs.values()):
                d.mkdir()
                made.append(d)
            if self.version == 1:
                self._limit_v1(dirs, limits)
            else:
                _limit_v2(dirs["memory"], limits)
        except BaseException:
            for d in reversed(made):
                _remove_dir(d)
            raise
        return TaskCgroup(name, self.version, dirs)

    def _limit_v1(self, dirs: dict[str, Path], limits: CgroupLimits) -> None:
        hard, soft = limits.hard_and_soft
        _write(dirs["memory"] / "memory.limit_in_bytes", str(hard))
        if soft:
            _write(dirs["memory"] / "memory.soft_limit_in_bytes", str(soft))
        _write(dirs["cpu"] / "cpu.shares", str(limits.clamped_shares))
        if "cpuset" in dirs:
            # A new v1 cpuset has no cpus and no mems, and refuses every pid until given some.
            _copy_cpuset(self._parents["cpuset"], dirs["cpuset"])
            if limits.cpuset_cpus is not None:
                _write(dirs["cpuset"] / "cpuset.cpus", limits.cpuset_cpus)
        if limits.pids_max is not None:
            _write(dirs["pids"] / "pids.max", str(limits.pids_max))

    def open(self, name: str) -> TaskCgroup | None:
        """The existing task cgroup ``name`` (its directories that exist), or None."""
        dirs = {c: d for c, d in self._task_dirs(name).items() if d.is_dir()}
        return TaskCgroup(name, self.version, dirs) if dirs else None

    def names(self) -> list[str]:
        found: set[str] = set()
        for p in _distinct(self._parents.values()):
            try:
                found |= {e.name for e in os.scandir(p) if e.is_dir(follow_symlinks=False)}
            except FileNotFoundError:
                pass
        return sorted(found)

    def remove_orphans(self, keep: set[str]) -> list[str]:
        """Kill and remove every task cgroup of this agent not in ``keep``; their names."""
        removed: list[str] = []
        for name in self.names():
            if name in keep:
                continue
            cg = self.open(name)
            if cg is None:
                continue
            try:
                cg.destroy()
            except OSError as exc:
                log.warning("cannot remove orphan cgroup %s: %s", name, exc)
                continue
            removed.append(name)
        return removed

    def remove_parent_if_empty(self) -> bool:
        """Remove the parent when no task cgroup is left in it; True if it is gone."""
        if self.names():
            return False
        try:
            for d in _distinct(self._parents.values()):
                _remove_dir(d)
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False  # a task cgroup was made meanwhile: it stays
            raise
        return True

    def destroy_parent(self) -> None:
        """Remove every task cgroup and the parent itself: for tests and node teardown."""
        for name in self.names():
            cg = self.open(name)
            if cg is not None:
                cg.destroy()
        for d in _distinct(self._parents.values()):
            _remove_dir(d)


def _copy_cpuset(source: Path, target: Path) -> None:
    for f in ("cpuset.cpus", "cpuset.mems"):
        current = _read(target / f).strip() if (target / f).exists() else ""
        value = _read(source / f).strip()
        if not current and value:
            _write(target / f, value)


def _enable_controllers(d: Path, controllers: list[str]) -> None:
    enabled = set(_read(d / "cgroup.subtree_control").split()) \
        if (d / "cgroup.subtree_control").exists() else set()
    todo = [c for c in controllers if c not in enabled]
    if todo:
        _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))


def _limit_v2(d: Path, limits: CgroupLimits) -> None:
    hard, soft = limits.hard_and_soft
    _write(d / "memory.max", "max" if hard == NO_MEMORY_LIMIT else str(hard))
    if soft:
        _write(d / "memory.low", str(soft))
    _write(d / "cpu.weight", str(cpu_weight(limits.clamped_shares)))
    if limits.cpuset_cpus is not None:
        _write(d / "cpuset.cpus", limits.cpuset_cpus)
    if limits.pids_max is not None:
        _write(d / "pids.max", str(limits.pids_max))
