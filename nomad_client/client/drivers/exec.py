"""The ``exec`` driver: ``raw_exec``'s executor, with the task isolated as Nomad's exec does.

Each task runs in new mount, UTS and (``pid_mode``/``ipc_mode`` ``private``, the default)
PID and IPC namespaces, with its task dir as its root: the client's ``chroot_env`` bound
read-only, the allocation's shared dir at ``/alloc``, its ``local``, ``secrets`` (the Task
API socket inside) and ``tmp``, a private ``/proc`` and a small ``/dev``. With the group
network in mode ``none`` it also gets a network namespace with only loopback, so the Task
API socket is its one way to the agent. It runs as ``task.user`` (default ``nobody``) with
its allocation's group, no-new-privileges and the capability set of Nomad's ``allow_caps``
less ``cap_drop`` plus ``cap_add`` as its bounding set (ambient only for what ``cap_add``
asks, so ``nobody`` holds no capability by default).

Its cgroup (``client/cgroups.py``, named ``<alloc>.<task>``) is created before the start with
the task's ``resources`` as limits; the task's process joins it before it execs. The name is
kept in the handle's ``driver_state``, so a restarted agent finds it; it is removed once the
task has exited (after its OOM record is read) and on destroy.

Everything else (the detached executor, the exit record, reattaching, signals, stopping)
is ``raw_exec``'s, the isolation is the executor's (``isolation.py``), so the two drivers
differ only in what they ask the executor for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from nomad_client.client import cgroups
from nomad_client.client.taskenv import FS_ISOLATION_CHROOT

from . import isolation, proctree
from .base import DriverError, DriverInfo, ExecTarget, ExitResult, TaskConfig, TaskHandle
from .raw_exec import (
    RawExecDriver,
    executor_env,
    parse_command_config,
    process_env,
    task_spec,
)

__all__ = [
    "DEFAULT_CHROOT_ENV",
    "ExecDriver",
    "ExecDriverConfig",
    "ExecTaskConfig",
    "cgroup_limits",
    "parse_task_config",
]

# Nomad's default chroot: host path -> path inside (a missing host path is skipped).
DEFAULT_CHROOT_ENV: Final[Mapping[str, str]] = {
    path: path
    for path in ("/bin", "/etc", "/lib", "/lib32", "/lib64", "/run/resolvconf",
                 "/run/systemd/resolve", "/sbin", "/usr")
}
DEFAULT_USER: Final = "nobody"
# Nomad's client option ``user.denylist`` default, applied to exec.
DEFAULT_USER_DENYLIST: Final = frozenset({"root", "Administrator"})
# Not Nomad's (it sets none): a fork bomb in one task must not starve the node.
DEFAULT_PIDS_LIMIT: Final = 4096
NAMESPACE_MODES: Final = ("private", "host")
NETWORK_MODES: Final = ("host", "none")
_CONFIG_KEYS: Final = frozenset({"command", "args", "pid_mode", "ipc_mode", "cap_add",
                                 "cap_drop", "work_dir"})
_MIB: Final = 1024 * 1024
_ALL: Final = "ALL"
_PROBE: Final = (
    "from nomad_client.client.drivers import isolation as i\n"
    "try:\n"
    "    i.unshare(i.CLONE_NEWNS | i.CLONE_NEWPID | i.CLONE_NEWIPC | i.CLONE_NEWUTS"
    " | i.CLONE_NEWNET)\n"
    "except OSError as exc:\n"
    "    raise SystemExit(str(exc))\n"
)


def _frozen_caps(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _path_map(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@attrs.frozen
class ExecDriverConfig:
    """The client's options for ``exec`` (Nomad's ``chroot_env`` client option and the
    plugin's ``allow_caps``, ``default_pid_mode``, ``default_ipc_mode``; ``user.denylist``)."""

    chroot_env: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_CHROOT_ENV),
                                                converter=_path_map)
    allow_caps: frozenset[str] = attrs.field(default=isolation.DEFAULT_CAPS,
                                             converter=_frozen_caps)
    default_pid_mode: str = "private"
    default_ipc_mode: str = "private"
    user_denylist: frozenset[str] = attrs.field(default=DEFAULT_USER_DENYLIST,
                                                converter=_frozen_caps)
    pids_limit: int | None = DEFAULT_PIDS_LIMIT
    # The agent's own parent cgroup (``cgroups.agent_parent(data_dir)``); None (no agent
    # named one): no cgroups, rather than a parent another agent could share.
    cgroup_parent: str | None = None
    cgroup_root: Path = cgroups.DEFAULT_ROOT


@attrs.frozen
class ExecTaskConfig:
    """A task's ``config {}`` for ``exec``, checked. ``capabilities`` is the bounding set;
    ``added`` what ``cap_add`` asked for (made ambient for a non-root user)."""

    command: str
    args: tuple[str, ...]
    pid_mode: str
    ipc_mode: str
    capabilities: frozenset[str]
    added: frozenset[str]
    work_dir: str = "/"


def _refuse(message: str) -> DriverError:
    return DriverError(f"exec: {message}", recoverable=False)


def parse_caps(value: Any, key: str) -> frozenset[str]:
    """Nomad's capability names (any case, ``CAP_`` optional, ``all``) to canonical ones."""
    if value is None:
        return frozenset()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _refuse(f"config key {key!r} must be a list of strings")
    names = {v.strip().upper().removeprefix("CAP_") for v in value}
    unknown = sorted(n for n in names if n != _ALL and n not in isolation.CAPABILITIES)
    if unknown:
        raise _refuse(f"{key} configured with capabilities not supported by system: "
                      f"{', '.join(n.lower() for n in unknown)}")
    return frozenset(names)


def _namespace_mode(config: Mapping[str, Any], key: str, default: str) -> str:
    mode = config.get(key) or default
    if mode not in NAMESPACE_MODES:
        raise _refuse(f'{key} must be "private" or "host", got {mode!r}')
    return str(mode)


def parse_task_config(config: Mapping[str, Any], plugin: ExecDriverConfig) -> ExecTaskConfig:
    """Check a task's ``config {}``; a non-recoverable ``DriverError`` naming the key."""
    command, args = parse_command_config(config, "exec", _CONFIG_KEYS)
    added = parse_caps(config.get("cap_add"), "cap_add")
    dropped = parse_caps(config.get("cap_drop"), "cap_drop")
    allowed = plugin.allow_caps
    if _ALL in allowed:
        allowed = frozenset(isolation.CAPABILITIES)
    if _ALL in added:
        added = allowed
    refused = sorted(added - allowed)
    if refused:
        raise _refuse("driver does not allow the following capabilities: "
                      f"{', '.join(n.lower() for n in refused)}")
    base = frozenset() if _ALL in dropped else (isolation.DEFAULT_CAPS & allowed) - dropped
    work_dir = config.get("work_dir") or "/"
    if not isinstance(work_dir, str) or not work_dir.startswith("/"):
        raise _refuse(f"work_dir must be absolute but got relative path {work_dir!r}")
    return ExecTaskConfig(
        command=command, args=tuple(args),
        pid_mode=_namespace_mode(config, "pid_mode", plugin.default_pid_mode),
        ipc_mode=_namespace_mode(config, "ipc_mode", plugin.default_ipc_mode),
        capabilities=base | added, added=added, work_dir=work_dir)


def cgroup_limits(resources: Mapping[str, Any], pids_max: int | None) -> cgroups.CgroupLimits:
    """A task's canonical ``Resources`` as cgroup limits (Nomad's: memory and memory_max
    in MiB, CPU shares = MHz)."""
    memory_mb = int(resources.get("MemoryMB") or 0)
    memory_max_mb = int(resources.get("MemoryMaxMB") or 0)
    memory_max: int | None
    if memory_max_mb == cgroups.NO_MEMORY_LIMIT:
        memory_max = cgroups.NO_MEMORY_LIMIT
    elif memory_max_mb > memory_mb:
        memory_max = memory_max_mb * _MIB
    else:
        memory_max = None
    return cgroups.CgroupLimits(
        memory_bytes=memory_mb * _MIB if memory_mb > 0 else cgroups.NO_MEMORY_LIMIT,
        memory_max_bytes=memory_max, cpu_shares=int(resources.get("CPU") or 0),
        pids_max=pids_max)


def _cap_numbers(names: Iterable[str]) -> list[int]:
    return sorted(isolation.CAPABILITIES[n] for n in names)


def _user_env(user: str) -> dict[str, str]:
    """Nomad appends the task user's ``USER``, ``LOGNAME`` and ``HOME``."""
    entry = pwd.getpwnam(user)
    return {"USER": entry.pw_name, "LOGNAME": entry.pw_name, "HOME": entry.pw_dir}


def _probe_namespaces() -> str | None:
    """None if a child can enter every namespace a task gets, else why not."""
    try:
        done = subprocess.run([sys.executable, "-P", "-c", _PROBE], env=executor_env(),
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"namespace probe failed: {exc}"
    if done.returncode == 0:
        return None
    detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return f"namespaces unavailable: {detail[-1] if detail else done.returncode}"


def _fresh_cgroup(manager: cgroups.CgroupManager, name: str,
                  limits: cgroups.CgroupLimits) -> cgroups.TaskCgroup:
    # A previous run of the same task may have left its cgroup (an agent crash).
    stale = manager.open(name)
    if stale is not None:
        stale.destroy()
    try:
        return manager.create(name, limits)
    except cgroups.CgroupsUnavailable:
        if limits.pids_max is None:
            raise
        # The pids limit is ours, not the job's: a node without the pids controller runs
        # the task without it rather than not at all.
        return manager.create(name, attrs.evolve(limits, pids_max=None))


class ExecDriver(RawExecDriver):
    """Runs tasks isolated in namespaces, a chroot and a cgroup (Linux, as root)."""

    name = "exec"
    fs_isolation = FS_ISOLATION_CHROOT
    default_user = DEFAULT_USER

    def __init__(self, config: ExecDriverConfig | None = None) -> None:
        super().__init__()
        self.config = config or ExecDriverConfig()
        self._lock = threading.Lock()  # fingerprint runs in a worker thread
        self._namespaces_ok = False
        self._cgroups: cgroups.CgroupManager | None = None

    # -- fingerprint --------------------------------------------------------------------------

    def _manager(self) -> cgroups.CgroupManager:
        """The agent's cgroup manager (detected once); raises ``CgroupsUnavailable``."""
        with self._lock:
            if self._cgroups is None:
                if self.config.cgroup_parent is None:
                    raise cgroups.CgroupsUnavailable("no cgroup parent set for this agent")
                self._cgroups = cgroups.CgroupManager.detect(
                    self.config.cgroup_root, parent=self.config.cgroup_parent)
            return self._cgroups

    def unavailable_reason(self) -> str | None:
        """Why this node cannot run exec tasks, or None. Probes once it succeeded."""
        if sys.platform != "linux":
            return "exec driver unsupported on client OS"
        if os.geteuid() != 0:
            return "Driver must run as root"
        if not self._namespaces_ok:
            problem = _probe_namespaces()
            if problem is not None:
                return problem
            self._namespaces_ok = True
        try:
            self._manager()
        except cgroups.CgroupsUnavailable as exc:
            return f"Failed to discover cgroup mount point: {exc}"
        return None

    def fingerprint(self) -> DriverInfo:
        reason = self.unavailable_reason()
        if reason is not None:
            return DriverInfo(sys.platform == "linux", False, reason)
        return DriverInfo(True, True, "Healthy", {"driver.exec": "1"})

    # -- start ------------------------------------------------------------------------------

    async def start_task(self, cfg: TaskConfig) -> TaskHandle:
        parsed = parse_task_config(cfg.driver_config, self.config)
        if cfg.network_mode not in NETWORK_MODES:
            raise _refuse(f"task {cfg.task} does not support {cfg.network_mode!r} networking "
                          "mode")
        user = cfg.user or DEFAULT_USER
        if user in self.config.user_denylist:
            raise _refuse(f'running as user "{user}" is disallowed')
        spec = await task_spec(cfg, parsed.command, list(parsed.args), user, self.name)
        try:
            user_env = await asyncio.to_thread(_user_env, user)
            manager = await asyncio.to_thread(self._manager)
        except (KeyError, cgroups.CgroupsUnavailable) as exc:
            raise DriverError(f"exec: {exc}") from exc
        root_user = spec["uid"] == 0
        spec["env"] = {**spec["env"], **user_env}
        spec["isolation"] = {
            "pid_namespace": parsed.pid_mode == "private",
            "ipc_namespace": parsed.ipc_mode == "private",
            "network_namespace": cfg.network_mode == "none",
            "shared_alloc_dir": str(Path(spec["alloc_dir"]) / "alloc"),
            # By path inside: a parent is bound (read-only) before anything below it, so a
            # mount point is never created inside a bind of a host directory.
            "chroot_env": sorted(self.config.chroot_env.items(), key=lambda pair: pair[1]),
            "capabilities": _cap_numbers(parsed.capabilities),
            "ambient_capabilities": [] if root_user else _cap_numbers(parsed.added),
            "work_dir": parsed.work_dir,
        }
        # Made last, once nothing but the start itself can fail, which then removes it.
        name = cgroups.task_cgroup_name(cfg.alloc_id, cfg.task)
        limits = cgroup_limits(cfg.resources, self.config.pids_limit)
        try:
            cgroup = await asyncio.to_thread(_fresh_cgroup, manager, name, limits)
        except (OSError, ValueError, cgroups.CgroupsUnavailable) as exc:
            raise DriverError(f"exec: cannot create cgroup {name}: {exc}") from exc
        spec["isolation"]["cgroup_procs"] = list(cgroup.procs_files)
        state = {"cgroup": name, "uid": spec["uid"], "gid": spec["gid"],
                 "groups": spec["groups"], "work_dir": parsed.work_dir}
        try:
            return await self._start_executor(cfg, spec, state)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(cgroup.destroy))
            raise

    # -- wait / stop / cleanup -------------------------------------------------------------------

    async def _cgroup(self, handle: TaskHandle) -> cgroups.TaskCgroup | None:
        name = handle.driver_state.get("cgroup")
        if not name:
            return None
        try:
            manager = await asyncio.to_thread(self._manager)
        except cgroups.CgroupsUnavailable:
            return None
        return await asyncio.to_thread(manager.open, str(name))

    async def wait_task(self, handle: TaskHandle) -> ExitResult:
        result = await super().wait_task(handle)
        cgroup = await self._cgroup(handle)
        if cgroup is None:
            return result
        # The executor is gone, so is every process of the task: read the OOM record, then
        # remove the cgroup (a restart creates a fresh one).
        oom_killed = await asyncio.to_thread(cgroup.oom_killed)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(cgroup.destroy)
        return attrs.evolve(result, oom_killed=oom_killed) if oom_killed else result

    async def stop_task(
        self,
        handle: TaskHandle,
        timeout: float,  # noqa: ASYNC109 - the task's kill_timeout, by contract
        signal: str = "SIGINT",
    ) -> None:
        await super().stop_task(handle, timeout, signal)
        await self._kill_cgroup(handle, destroy=False)

    async def destroy_task(self, handle: TaskHandle) -> None:
        await super().destroy_task(handle)
        await self._kill_cgroup(handle, destroy=True)

    async def _kill_cgroup(self, handle: TaskHandle, *, destroy: bool) -> None:
        """Kill whatever is left in the task's cgroup once its executor is gone (a process
        that left the executor's tree still counts), and with ``destroy`` remove it."""
        if await asyncio.to_thread(proctree.same_process, handle.pid, handle.create_time):
            return  # still stopping: the executor records the exit first
        cgroup = await self._cgroup(handle)
        if cgroup is not None:
            await asyncio.to_thread(cgroup.destroy if destroy else cgroup.kill_all)

    # -- alloc exec ---------------------------------------------------------------------------

    async def exec_target(self, handle: TaskHandle) -> ExecTarget:
        """Where ``alloc exec`` runs a command for this task: in the namespaces, root and
        cgroup of its pid 1, as its user, with its env, in its ``work_dir``."""
        state = handle.driver_state
        task_pid = int(state.get("task_pid", 0))
        task_ct = float(state.get("task_create_time", 0.0))
        if not await asyncio.to_thread(proctree.same_process, task_pid, task_ct):
            raise DriverError("exec: task is not running")
        try:
            env = await asyncio.to_thread(process_env, task_pid)
        except OSError as exc:
            raise DriverError(f"exec: cannot read the task's environment: {exc}") from exc
        cgroup = await self._cgroup(handle)
        uid, gid = state.get("uid"), state.get("gid")
        return ExecTarget(
            env=env, cwd=str(state.get("work_dir") or "/"),
            uid=None if uid is None else int(uid), gid=None if gid is None else int(gid),
            groups=tuple(int(g) for g in state.get("groups") or ()),
            pid=task_pid, pid_create_time=task_ct,
            cgroup_procs=cgroup.procs_files if cgroup is not None else ())
