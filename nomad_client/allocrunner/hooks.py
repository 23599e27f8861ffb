"""Hook interfaces for alloc runners and task runners, and the context hooks receive.

A hook is one class implementing the Protocols for the phases it cares about; the runners
find those by ``isinstance`` and call them in registration order. Runners own ordering,
events and error handling; a hook never reaches into another hook.

Task-level phases (per task runner), in the order they happen:
  prestart  (before every start: first start, each restart, after agent restore) -> env
  poststart (after the driver started the task)
  exited    (after each exit, before the restart decision)
  prekill   (before the runner kills the task)
  stop      (once, when the task is dead for good)
  update    (the allocation changed on the server)

Alloc-level phases: prerun (before any task runs), update, postrun (all tasks dead),
destroy (the allocation is garbage collected or the agent tears it down). Alloc hooks may
also observe task lifecycles (``TaskLifecycleObserver``): ``task_starting`` is called after
a task's prestart hooks and before its driver start on every start, so a resource the task
needs from its first instruction (the Task API socket) can be in place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from nomad_client.client.allocdir import AllocDir, TaskDir
from nomad_client.client.drivers.base import ExitResult, TaskHandle
from nomad_client.client.taskenv import NodeView
from nomad_client.structs.models import Allocation, TaskEvent

if TYPE_CHECKING:
    from nomad_client.http.router import Router


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


@attrs.define
class TaskContext:
    """What a task hook may see and do. ``emit`` records a task event."""

    alloc: Allocation
    task: Mapping[str, Any]
    alloc_dir: AllocDir
    task_dir: TaskDir
    node: NodeView
    emit: Callable[[TaskEvent], None]
    log: logging.Logger
    identities: WorkloadIdentities | None = None

    @property
    def name(self) -> str:
        return str(self.task["Name"])

    @property
    def user(self) -> str | None:
        return self.task.get("User") or None


@attrs.frozen
class AllocHookDeps:
    """Everything an alloc hook may be constructed with."""

    alloc: Allocation
    alloc_dir: AllocDir
    router: Router | None
    log: logging.Logger


# ---- task hooks ----------------------------------------------------------------------
@runtime_checkable
class TaskPrestartHook(Protocol):
    name: str

    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        """Prepare the next start; return env vars to add. Raising fails this start."""
        ...


@runtime_checkable
class TaskPoststartHook(Protocol):
    name: str

    async def poststart(self, ctx: TaskContext, handle: TaskHandle) -> None: ...


@runtime_checkable
class TaskExitedHook(Protocol):
    name: str

    async def exited(self, ctx: TaskContext, result: ExitResult) -> None: ...


@runtime_checkable
class TaskPreKillHook(Protocol):
    name: str

    async def prekill(self, ctx: TaskContext) -> None: ...


@runtime_checkable
class TaskStopHook(Protocol):
    name: str

    async def stop(self, ctx: TaskContext) -> None: ...


@runtime_checkable
class TaskUpdateHook(Protocol):
    name: str

    async def update(self, ctx: TaskContext, alloc: Allocation) -> None: ...


# ---- alloc hooks ---------------------------------------------------------------------
@runtime_checkable
class AllocPrerunHook(Protocol):
    name: str

    async def prerun(self) -> None: ...


@runtime_checkable
class AllocUpdateHook(Protocol):
    name: str

    async def update(self, alloc: Allocation) -> None: ...


@runtime_checkable
class AllocPostrunHook(Protocol):
    name: str

    async def postrun(self) -> None: ...


@runtime_checkable
class AllocDestroyHook(Protocol):
    name: str

    async def destroy(self) -> None: ...


@runtime_checkable
class AllocShutdownHook(Protocol):
    """The agent is shutting down and leaves the allocation's tasks running."""

    name: str

    async def shutdown(self) -> None: ...


@runtime_checkable
class TaskLifecycleObserver(Protocol):
    """Alloc-level view of each task's lifecycle. Errors here never fail a task."""

    name: str

    async def task_starting(self, ctx: TaskContext) -> None: ...

    async def task_exited(self, ctx: TaskContext, result: ExitResult, will_restart: bool
                          ) -> None: ...

    async def task_stopped(self, ctx: TaskContext) -> None: ...


class HookError(Exception):
    """A hook failed; ``hook`` names it for the task event."""

    def __init__(self, hook: str, cause: BaseException) -> None:
        super().__init__(f"{hook}: {cause}")
        self.hook = hook
        self.cause = cause
