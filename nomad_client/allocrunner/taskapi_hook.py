"""Alloc hook ``task_api``: one Task API socket per task of the allocation that is to have
one, at ``<task>/secrets/api.sock``, handed to the agent's ``TaskSocketServer`` (the HTTP
layer serves it as that task's Task API: authentication is mandatory, the anonymous policy
never applies).

Who gets a socket is decided on every start, before the task's prestart hooks
(``task_preparing``), by ``decide_socket``: the agent's live ``task_api`` config, the
namespace's Task API capability and the task's own ``task_api { enabled }``. The decision is
recorded in the task's context (``ctx.task_api``): the identity hook sets ``NOMAD_UNIX_ADDR``
from it, ``task_starting`` follows it. A task without a socket gets one ``Task API
Disabled`` event saying why, not one per restart (again only when the reason changes).

Lifecycle, per task:
* ``task_starting`` (after prestart hooks, before the driver starts the process, on every
  start): create the socket if the task is to have one and has none; keep the existing one
  across restarts (same socket, still served, no gap) unless the task deleted or replaced
  ``api.sock``, in which case a fresh socket is put back; remove it if the task is no longer
  to have one.
* ``task_stopped`` (the task is dead for good): stop serving it and unlink the socket.
* ``config_reloaded`` (the agent replaced its live config): re-decide for every running
  task, creating or removing its socket at once, with an event either way.
* ``destroy`` / ``shutdown``: stop serving every socket.

One lock serializes all of this for the allocation, so a reload never interleaves with a
task's start or stop. Failures never fail the task or its siblings, but they are never
silent either: the task gets a ``Task API unavailable: <reason>`` event and the agent logs the
path and reason once. How the socket is created safely (ownership, mode, symlinks, long
paths) lives in ``nomad_client.client.secretsdir``, how it is served in the HTTP layer; this
hook only decides when.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from nomad_client.allocrunner.hooks import (
    AllocHookDeps,
    ServedSocket,
    TaskContext,
    TaskHandleView,
    TaskSocketInfo,
)
from nomad_client.client.drivers.base import ExitResult
from nomad_client.client.secretsdir import (
    DEFAULT_SOCKET_NAME,
    BoundSocket,
    SecretsDirError,
    create_task_socket,
    remove_task_socket,
    socket_in_place,
    socket_owner_for,
)
from nomad_client.client.taskapi_config import (
    LiveTaskAPIConfig,
    SocketDecision,
    TaskAPIConfig,
    decide_socket,
)
from nomad_client.structs.models import EVENT_HOOK_MESSAGE, TaskEvent

SOCKET_NAME = DEFAULT_SOCKET_NAME
PRIVATE_DIR = ".taskapi"
EVENT_TASK_API_DISABLED = "Task API Disabled"
EVENT_TASK_API_ENABLED = "Task API Enabled"
RELOAD_ENABLED = "Task API enabled by agent configuration reload"
RELOAD_DISABLED = "Task API disabled by agent configuration reload"
NAMESPACE_UNREADABLE = ("Task API unavailable: the namespace's Task API setting could not "
                        "be read")


@attrs.frozen
class _TaskSocket:
    served: ServedSocket
    bound: BoundSocket
    task_dir: Path


@attrs.frozen
class _HandleProcesses:
    """The task's processes as its runner's current driver handle names them: the watched
    process (for raw_exec its executor, whose descendants are the task)."""

    handle: TaskHandleView

    def root(self) -> tuple[int, float] | None:
        handle = self.handle.current
        return None if handle is None else (handle.pid, handle.create_time)

    async def started(self) -> None:
        await self.handle.started()


def task_choice(task: Mapping[str, Any]) -> bool | None:
    """The task's own ``task_api { enabled }`` (``TaskAPI.Enabled``); None: no choice."""
    spec = task.get("TaskAPI")
    enabled = spec.get("Enabled") if isinstance(spec, Mapping) else None
    return enabled if isinstance(enabled, bool) else None


def _event(kind: str, message: str) -> TaskEvent:
    return TaskEvent(type=kind, message=message, display_message=message)


class TaskAPIHook:
    name = "task_api"

    def __init__(self, deps: AllocHookDeps) -> None:
        self._alloc = deps.alloc
        self._task_api = deps.task_api
        self._config = deps.task_api_config or LiveTaskAPIConfig()
        self._namespaces = deps.namespaces
        self._log = deps.log
        self._sockets: dict[str, _TaskSocket] = {}
        self._tasks: dict[str, TaskContext] = {}  # every task that prepared a start, until stopped
        self._started: set[str] = set()  # from task_starting until the task exits
        self._announced: dict[str, str] = {}  # the reason of a task's last "disabled" event
        self._lock = asyncio.Lock()
        self._private_dir = deps.alloc_dir.path / PRIVATE_DIR

    # ---- task lifecycle ----------------------------------------------------------------
    async def task_preparing(self, ctx: TaskContext) -> None:
        if self._task_api is None:
            return
        async with self._lock:
            await self._decide(ctx)

    async def task_starting(self, ctx: TaskContext) -> None:
        if self._task_api is None:
            return
        async with self._lock:
            if ctx.task_api is None:  # not prepared (the runners always prepare first)
                await self._decide(ctx)
            self._started.add(ctx.name)
            if not ctx.has_task_api_socket:
                await self._close(ctx.name)  # one an earlier start had goes now
                return
            current = self._sockets.get(ctx.name)
            if current is not None:
                if await asyncio.to_thread(socket_in_place, current.task_dir, current.bound):
                    return
                await self._close(ctx.name)
            await self._open(ctx)

    async def task_exited(self, ctx: TaskContext, result: ExitResult, will_restart: bool
                          ) -> None:
        async with self._lock:
            self._started.discard(ctx.name)

    async def task_stopped(self, ctx: TaskContext) -> None:
        async with self._lock:
            self._started.discard(ctx.name)
            self._tasks.pop(ctx.name, None)
            await self._close(ctx.name)

    # ---- the decision --------------------------------------------------------------------
    async def _decide(self, ctx: TaskContext) -> None:
        """Decide whether this start of the task gets a socket, and record it."""
        self._tasks[ctx.name] = ctx
        self._started.discard(ctx.name)
        config = self._config.current
        try:
            mode = await self._namespace_mode(config)
        except Exception as err:
            # Never a socket the namespace may forbid: without its setting, none.
            self._log.warning("task %s: %s: %s", ctx.name, NAMESPACE_UNREADABLE, err)
            decision = SocketDecision(False, NAMESPACE_UNREADABLE)
        else:
            decision = decide_socket(config, mode, task_choice(ctx.task))
        self._record(ctx, decision)

    async def _namespace_mode(self, config: TaskAPIConfig) -> str | None:
        if self._namespaces is None or not config.enabled:
            return None  # no say, or nothing to ask: the agent's enabled = false beats it
        return await self._namespaces.namespace_task_api_mode(self._alloc.namespace)

    def _record(self, ctx: TaskContext, decision: SocketDecision) -> None:
        """Put ``decision`` in the task's context; a new reason for having no socket is told
        to the task once (a debug line for the operator: it is the node's policy)."""
        ctx.task_api = decision
        if decision.enabled:
            self._announced.pop(ctx.name, None)
        elif self._announced.get(ctx.name) != decision.reason:
            self._announced[ctx.name] = decision.reason
            self._log.debug("task %s gets no Task API socket: %s", ctx.name, decision.reason)
            ctx.emit(_event(EVENT_TASK_API_DISABLED, decision.reason))

    # ---- a reload ------------------------------------------------------------------------
    async def config_reloaded(self) -> None:
        if self._task_api is None:
            return
        async with self._lock:
            if not self._tasks:
                return
            config = self._config.current
            try:
                mode = await self._namespace_mode(config)
            except Exception as err:
                self._log.warning("Task API sockets left as they are after the reload: %s "
                                  "(%s)", NAMESPACE_UNREADABLE, err)
                return
            for name, ctx in list(self._tasks.items()):
                decision = decide_socket(config, mode, task_choice(ctx.task))
                if name in self._started:
                    await self._apply_now(ctx, decision)
                else:  # not running: its next start follows the decision
                    self._record(ctx, decision)

    async def _apply_now(self, ctx: TaskContext, decision: SocketDecision) -> None:
        """Give a running task a socket, or take it away, as ``decision`` says."""
        has_socket = ctx.name in self._sockets
        if decision.enabled and not has_socket:
            ctx.task_api = decision
            self._announced.pop(ctx.name, None)
            if await self._open(ctx):
                ctx.emit(_event(EVENT_TASK_API_ENABLED, RELOAD_ENABLED))
        elif not decision.enabled and has_socket:
            ctx.task_api = decision
            self._announced[ctx.name] = decision.reason
            await self._close(ctx.name)
            ctx.emit(_event(EVENT_TASK_API_DISABLED, f"{RELOAD_DISABLED}: {decision.reason}"))
        else:
            self._record(ctx, decision)

    # ---- sockets -------------------------------------------------------------------------
    async def _open(self, ctx: TaskContext) -> bool:
        """Create, serve and remember the task's socket; False (and an event) on failure."""
        assert self._task_api is not None
        try:
            bound = await asyncio.to_thread(self._create_socket, ctx.task_dir.path, ctx.user)
        except (SecretsDirError, OSError) as err:
            self._unavailable(ctx, str(err) or type(err).__name__)
            return False
        info = TaskSocketInfo(alloc_id=self._alloc.id, task=ctx.name,
                              namespace=self._alloc.namespace, job_id=self._alloc.job_id,
                              processes=_HandleProcesses(ctx.handle))
        try:
            served = await self._task_api.serve(bound.sock, info)
        except OSError as err:  # the server has closed the socket; its file goes too
            await asyncio.to_thread(remove_task_socket, ctx.task_dir.path, bound, SOCKET_NAME)
            self._unavailable(ctx, str(err))
            return False
        self._sockets[ctx.name] = _TaskSocket(served, bound, ctx.task_dir.path)
        return True

    def _unavailable(self, ctx: TaskContext, reason: str) -> None:
        """Never silent: the task gets an event, the operator a log line with the path."""
        path = ctx.task_dir.secrets_dir / SOCKET_NAME
        self._log.warning("Task API unavailable for task %s at %s: %s", ctx.name, path, reason)
        ctx.emit(_event(EVENT_HOOK_MESSAGE, f"Task API unavailable: {reason}"))

    def _create_socket(self, task_dir: Path, user: str | None) -> BoundSocket:
        # Runs in a worker thread: the user lookup and the file work may block.
        return create_task_socket(task_dir, private_dir=self._private_dir,
                                  owner=socket_owner_for(user), name=SOCKET_NAME)

    # ---- alloc lifecycle ---------------------------------------------------------------
    async def destroy(self) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        async with self._lock:
            for task in list(self._sockets):
                await self._close(task)

    async def _close(self, task: str) -> None:
        held = self._sockets.pop(task, None)
        if held is None:
            return
        await held.served.close()
        try:
            await asyncio.to_thread(remove_task_socket, held.task_dir, held.bound,
                                    SOCKET_NAME)
        except (SecretsDirError, OSError) as err:
            self._log.warning("could not remove Task API socket of %s: %s", task, err)
