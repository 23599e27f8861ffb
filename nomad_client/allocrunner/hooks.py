"""Hook interfaces for alloc runners and task runners, the context hooks receive, and the one
interface the Task API hook serves its sockets through.

Every hook phase is a one-method Protocol. A hook is one class implementing the phases it
cares about; each runner sorts its hooks into typed per-phase lists once, in its constructor,
and calls them in registration order (the order of the factories in ``AllocRunnerConfig``).
Runners own ordering, events and error handling; a hook never reaches into another hook.

Task-level phases (per task runner), in the order they happen:
  prestart  (before every start: first start, each restart, after agent restore) -> env
  poststart (after the driver started the task)
  exited    (after each exit, before the restart decision)
  prekill   (before the runner kills the task)
  stop      (once, when the task is dead for good)
  update    (the allocation changed on the server)

Alloc-level phases: prerun (before any task runs), update, postrun (all tasks dead),
destroy (the allocation is garbage collected or the agent tears it down), shutdown (the agent
stops and leaves the tasks running), config_reloaded (the agent's configuration changed).
Alloc hooks may also observe each task's lifecycle: ``task_preparing`` is called before a
task's prestart hooks on every start, so what it records in the task's context (whether this
start gets a Task API socket) is known to them; ``task_starting`` after the prestart hooks
and before the driver start, so a resource the task needs from its first instruction (the
Task API socket) can be in place; ``task_exited`` after each exit; ``task_stopped`` once the
task is dead for good.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from nomad_client.client.allocdir import AllocDir, TaskDir
from nomad_client.client.drivers.base import ExitResult, TaskHandle
from nomad_client.client.taskapi_config import LiveTaskAPIConfig, SocketDecision
from nomad_client.client.taskenv import FS_ISOLATION_NONE, NodeView, TaskPaths, task_paths
from nomad_client.structs.models import Allocation, TaskEvent


class WorkloadIdentities(Protocol):
    """The client's workload identities as a task hook sees them. Tokens live in memory
    (and in the task's secrets dir); none is ever logged, put in an event or persisted."""

    async def token(self, alloc_id: str, task: str) -> str:
        """The task's current identity; a fresh one when there is none or it is due for
        renewal. Raises when none can be had."""
        ...

    def watch(self, alloc_id: str, task: str, token: str | None, *,
              deliver: Callable[[str], Awaitable[None]],
              report: Callable[[TaskEvent], None]) -> None:
        """Renew ``token`` before it expires (if it does; None: get one at once), handing
        each new token to ``deliver``; failures are retried and reported through ``report``."""
        ...

    def forget(self, alloc_id: str, task: str) -> None:
        """The task is dead for good: stop renewing its identity and drop it."""
        ...


class ServedSocket(Protocol):
    """A task socket being served."""

    async def close(self) -> None:
        """Stop accepting, drop open connections and close the socket (the file stays)."""
        ...


class TaskProcesses(Protocol):
    """Which processes are the task's, for checking who connects to its socket."""

    def root(self) -> tuple[int, float] | None:
        """(pid, create time) of the process whose descendants are the task (for raw_exec:
        its executor), or None while the task is not running."""
        ...

    async def started(self) -> None:
        """Return once the task has a root process. Its socket exists before the driver
        starts it, so a task that connects at once may be early for ``root``."""
        ...


@attrs.frozen
class TaskSocketInfo:
    """The task a socket serves: named in its audit lines and log lines; ``processes``
    tells its peer-credential check which processes belong to the task."""

    alloc_id: str
    task: str
    namespace: str
    job_id: str
    processes: TaskProcesses


class TaskSocketServer(Protocol):
    """Serves the agent's API to one task over a listening socket: the Task API. The HTTP
    layer implements it; the Task API hook only decides when a socket exists."""

    async def serve(self, sock: socket.socket, info: TaskSocketInfo) -> ServedSocket:
        """Start serving ``sock`` as the Task API of the task ``info`` names. ``sock`` is
        the server's from this call on: on failure it is closed and ``OSError`` raised."""
        ...


class NamespaceTaskAPIModes(Protocol):
    """The Task API capability of namespaces, as the servers know it."""

    async def namespace_task_api_mode(self, namespace: str) -> str | None:
        """``Capabilities.TaskAPI`` of ``namespace``: "enabled", "disabled" or "opt_in";
        None (or "") when the namespace has no say. Raises when it cannot be learnt."""
        ...


class TaskHandleView:
    """The task runner's current driver handle, as hooks may read it: ``current`` (None
    while the task is not running) and ``started`` to wait for one. Only the runner sets it."""

    def __init__(self, handle: TaskHandle | None = None) -> None:
        self._handle = handle
        self._present = asyncio.Event()
        if handle is not None:
            self._present.set()

    @property
    def current(self) -> TaskHandle | None:
        return self._handle

    def set(self, handle: TaskHandle | None) -> None:
        self._handle = handle
        if handle is None:
            self._present.clear()
        else:
            self._present.set()

    async def started(self) -> TaskHandle:
        while self._handle is None:
            await self._present.wait()
        return self._handle


@attrs.define
class TaskContext:
    """What a task hook may see and do. ``emit`` records a task event; ``current_handle``
    gives the driver handle of the task's process (None while it is not running).

    ``task_api`` says whether this start of the task gets a Task API socket: the ``task_api``
    alloc hook decides it before the prestart hooks run (None: this agent serves no Task
    API). ``task_api_config`` is the agent's live Task API configuration (None: defaults
    without a tmpfs secrets dir, as in runners built outside an agent)."""

    alloc: Allocation
    task: Mapping[str, Any]
    alloc_dir: AllocDir
    task_dir: TaskDir
    node: NodeView
    emit: Callable[[TaskEvent], None]
    log: logging.Logger
    identities: WorkloadIdentities | None = None
    handle: TaskHandleView = attrs.field(factory=TaskHandleView)
    task_api_config: LiveTaskAPIConfig | None = None
    task_api: SocketDecision | None = None
    # The task driver's filesystem isolation: where the task sees its directories.
    fs_isolation: str = FS_ISOLATION_NONE
    # Who the driver runs a task without ``user`` as (exec: nobody); None: the agent's user.
    default_user: str | None = None

    @property
    def name(self) -> str:
        return str(self.task["Name"])

    @property
    def paths(self) -> TaskPaths:
        """The task's alloc, local and secrets dirs as the task sees them."""
        return task_paths(self.fs_isolation, alloc_dir=str(self.alloc_dir.shared_dir),
                          local_dir=str(self.task_dir.local_dir),
                          secrets_dir=str(self.task_dir.secrets_dir))

    @property
    def user(self) -> str | None:
        return self.task.get("User") or self.default_user

    @property
    def secrets_tmpfs(self) -> bool:
        """Whether the task's secrets dir is to be a tmpfs (read when the dir is built)."""
        return self.task_api_config is not None and self.task_api_config.current.secrets_tmpfs

    @property
    def has_task_api_socket(self) -> bool:
        """Whether this start of the task was decided to get a Task API socket."""
        return self.task_api is not None and self.task_api.enabled


@attrs.frozen
class AllocHookDeps:
    """Everything an alloc hook may be constructed with. ``task_api`` is None where no
    Task API is served (tasks then get no socket). ``task_api_config`` is the agent's live
    Task API configuration (None: the defaults) and ``namespaces`` tells a namespace's Task
    API capability (None: namespaces have no say)."""

    alloc: Allocation
    alloc_dir: AllocDir
    task_api: TaskSocketServer | None
    log: logging.Logger
    task_api_config: LiveTaskAPIConfig | None = None
    namespaces: NamespaceTaskAPIModes | None = None


# ---- task hooks ----------------------------------------------------------------------
class TaskHook(Protocol):
    """What every task hook has: the name its failures are reported under."""

    name: str


# Makes one task runner's instance of a hook.
TaskHookFactory = Callable[[], TaskHook]


@runtime_checkable
class TaskPrestartHook(TaskHook, Protocol):
    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        """Prepare the next start; return env vars to add. Raising fails this start."""
        ...


@runtime_checkable
class TaskPoststartHook(TaskHook, Protocol):
    async def poststart(self, ctx: TaskContext, handle: TaskHandle) -> None: ...


@runtime_checkable
class TaskExitedHook(TaskHook, Protocol):
    async def exited(self, ctx: TaskContext, result: ExitResult) -> None: ...


@runtime_checkable
class TaskPreKillHook(TaskHook, Protocol):
    async def prekill(self, ctx: TaskContext) -> None: ...


@runtime_checkable
class TaskStopHook(TaskHook, Protocol):
    async def stop(self, ctx: TaskContext) -> None: ...


@runtime_checkable
class TaskUpdateHook(TaskHook, Protocol):
    async def update(self, ctx: TaskContext, alloc: Allocation) -> None: ...


# ---- alloc hooks ---------------------------------------------------------------------
class AllocHook(Protocol):
    """What every alloc hook has: the name its failures are logged under."""

    name: str


# Makes one alloc runner's instance of a hook.
AllocHookFactory = Callable[[AllocHookDeps], AllocHook]


@runtime_checkable
class AllocPrerunHook(AllocHook, Protocol):
    async def prerun(self) -> None: ...


@runtime_checkable
class AllocUpdateHook(AllocHook, Protocol):
    async def update(self, alloc: Allocation) -> None: ...


@runtime_checkable
class AllocPostrunHook(AllocHook, Protocol):
    async def postrun(self) -> None: ...


@runtime_checkable
class AllocDestroyHook(AllocHook, Protocol):
    async def destroy(self) -> None: ...


@runtime_checkable
class AllocShutdownHook(AllocHook, Protocol):
    """The agent is shutting down and leaves the allocation's tasks running."""

    async def shutdown(self) -> None: ...


@runtime_checkable
class AllocConfigReloadHook(AllocHook, Protocol):
    """The agent replaced its live configuration: re-apply what depends on it to the
    allocation's running tasks."""

    async def config_reloaded(self) -> None: ...


# Alloc-level views of each task's lifecycle. Errors here never fail a task.
@runtime_checkable
class TaskPreparingObserver(AllocHook, Protocol):
    async def task_preparing(self, ctx: TaskContext) -> None: ...


@runtime_checkable
class TaskStartingObserver(AllocHook, Protocol):
    async def task_starting(self, ctx: TaskContext) -> None: ...


@runtime_checkable
class TaskExitedObserver(AllocHook, Protocol):
    async def task_exited(self, ctx: TaskContext, result: ExitResult, will_restart: bool
                          ) -> None: ...


@runtime_checkable
class TaskStoppedObserver(AllocHook, Protocol):
    async def task_stopped(self, ctx: TaskContext) -> None: ...


class HookError(Exception):
    """A hook failed; ``hook`` names it for the task event."""

    def __init__(self, hook: str, cause: BaseException) -> None:
        super().__init__(f"{hook}: {cause}")
        self.hook = hook
        self.cause = cause


async def log_failure(log: logging.Logger, call: Awaitable[None], what: str, *args: object
                      ) -> None:
    """Await one hook call of a phase whose failures are not fatal: an error is logged as
    ``what % args`` and swallowed (a cancellation is not)."""
    try:
        await call
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception(what, *args)
