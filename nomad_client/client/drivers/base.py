"""The task-driver contract: value types, the error type and the ``Driver`` protocol.

Definitions only; touches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from nomad_client.structs.models import DriverInfo  # fingerprint() returns the API shape


class DriverError(Exception):
    """A driver could not do what was asked.

    ``recoverable`` tells the restart logic whether trying again may help (False for bad
    configuration, which a restart cannot fix).
    """

    recoverable: bool = True

    def __init__(self, message: str, *, recoverable: bool = True) -> None:
        super().__init__(message)
        self.recoverable = recoverable


@attrs.frozen
class TaskConfig:
    """What a driver needs to start one task.

    ``driver_config`` is already interpolated. ``task_dir`` is ``<alloc>/<task>`` and is the
    working directory. ``state_dir`` is private to the driver for this task and survives
    agent restarts.
    """

    alloc_id: str
    task: str
    driver_config: Mapping[str, Any]
    env: Mapping[str, str]
    task_dir: Path
    user: str | None
    stdout_path: Path
    stderr_path: Path
    kill_timeout: float
    state_dir: Path
    # The group network's mode ("host", "none"); only an isolating driver can honour "none".
    network_mode: str = "host"
    # The task's canonical ``Resources`` block (``MemoryMB``, ``CPU``, ...), for limits.
    resources: Mapping[str, Any] = attrs.field(factory=dict)
    # The task's canonical ``LogConfig`` (``MaxFiles``, ``MaxFileSizeMB``, ``Disabled``): how
    # its stdout and stderr files rotate. Empty: written to ``*_path`` as they are, uncapped.
    log_config: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class TaskHandle:
    """Identifies a started task; plain data so it can be persisted (msgpack) and reloaded.

    ``pid``/``create_time`` identify the process the driver watches (for raw_exec: the
    executor), so a reused pid is never mistaken for the task.
    """

    driver: str
    alloc_id: str
    task: str
    pid: int
    create_time: float
    started_at: float
    driver_state: Mapping[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskHandle:
        try:
            return cls(
                driver=str(data["driver"]),
                alloc_id=str(data["alloc_id"]),
                task=str(data["task"]),
                pid=int(data["pid"]),
                create_time=float(data["create_time"]),
                started_at=float(data["started_at"]),
                driver_state=dict(data.get("driver_state") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid task handle: {exc!r}") from exc


@attrs.frozen
class ExitResult:
    """How a task ended. A task killed by signal N reports ``exit_code=128+N, signal=N``."""

    exit_code: int
    signal: int = 0
    err: str | None = None
    # The kernel's OOM killer ended it (the task's memory cgroup recorded a kill).
    oom_killed: bool = False

    @property
    def successful(self) -> bool:
        return self.exit_code == 0 and self.signal == 0 and self.err is None


@attrs.frozen
class ExecTarget:
    """Where ``alloc exec`` runs a command for one running task, as its driver sees it.

    ``pid`` names a process of the task whose namespaces and root the command joins (None:
    the host's, as for raw_exec). ``cgroup_procs`` are the cgroup files the command's pid is
    written to before it runs, so its usage and limits are the task's. ``cwd`` is inside
    the task's root. ``uid``/``gid``/``groups`` are the task's user (None: the agent's).
    """

    # The task's env holds its NOMAD_TOKEN: kept out of the repr (logs, tracebacks).
    env: Mapping[str, str] = attrs.field(repr=False)
    cwd: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    pid: int | None = None
    pid_create_time: float = 0.0
    cgroup_procs: tuple[str, ...] = ()


@runtime_checkable
class Driver(Protocol):
    """A task driver. All methods but ``fingerprint`` are coroutines and never block."""

    name: str

    def fingerprint(self) -> DriverInfo: ...

    async def start_task(self, cfg: TaskConfig) -> TaskHandle: ...

    async def wait_task(self, handle: TaskHandle) -> ExitResult: ...

    async def stop_task(
        self,
        handle: TaskHandle,
        timeout: float,  # noqa: ASYNC109 - the task's kill_timeout, by contract
        signal: str = "SIGINT",
    ) -> None: ...

    async def signal_task(self, handle: TaskHandle, signal: str) -> None:
        """Deliver ``signal`` (a name such as ``"SIGUSR1"``) to the running task; a
        ``DriverError`` when the name is no signal or the task does not run."""
        ...

    async def recover_task(self, handle: TaskHandle) -> bool: ...

    async def destroy_task(self, handle: TaskHandle) -> None: ...
