"""Alloc hook ``task_api``: one Task API socket per task of the allocation, at
``<task>/secrets/api.sock``, handed to the agent's ``TaskSocketServer`` (the HTTP layer serves
it as that task's Task API: authentication is mandatory, the anonymous policy never applies).

Lifecycle, per task:
* ``task_starting`` (after prestart hooks, before the driver starts the process, on every
  start): create the socket if the task has none; keep the existing one across restarts
  (same socket, still served, no gap) unless the task deleted or replaced ``api.sock``, in
  which case a fresh socket is put back.
* ``task_stopped`` (the task is dead for good): stop serving it and unlink the socket.
* ``destroy`` / ``shutdown``: stop serving every socket.

Failures never fail the task or its siblings, but they are never silent either: the task gets
a ``Task API unavailable: <reason>`` event and the agent logs the path and reason once. How
the socket is created safely (ownership, mode, symlinks, long paths) lives in
``nomad_client.client.secretsdir``, how it is served in the HTTP layer; this hook only
decides when.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import attrs

from nomad_client.allocrunner.hooks import AllocHookDeps, ServedSocket, TaskContext
from nomad_client.client.secretsdir import (
    DEFAULT_SOCKET_NAME,
    BoundSocket,
    SecretsDirError,
    create_task_socket,
    remove_task_socket,
    socket_in_place,
    socket_owner_for,
)
from nomad_client.structs.models import EVENT_HOOK_MESSAGE, TaskEvent

SOCKET_NAME = DEFAULT_SOCKET_NAME
PRIVATE_DIR = ".taskapi"


@attrs.frozen
class _TaskSocket:
    served: ServedSocket
    bound: BoundSocket
    task_dir: Path


class TaskAPIHook:
    name = "task_api"

    def __init__(self, deps: AllocHookDeps) -> None:
        self._alloc_id = deps.alloc.id
        self._task_api = deps.task_api
        self._log = deps.log
        self._sockets: dict[str, _TaskSocket] = {}
        self._private_dir = deps.alloc_dir.path / PRIVATE_DIR

    # ---- task lifecycle ----------------------------------------------------------------
    async def task_starting(self, ctx: TaskContext) -> None:
        if self._task_api is None:
            return
        current = self._sockets.get(ctx.name)
        if current is not None:
            if await asyncio.to_thread(socket_in_place, current.task_dir, current.bound):
                return
            await self._close(ctx.name)
        try:
            bound = await asyncio.to_thread(self._create_socket, ctx.task_dir.path, ctx.user)
        except (SecretsDirError, OSError) as err:
            self._unavailable(ctx, str(err) or type(err).__name__)
            return
        try:
            served = await self._task_api.serve(bound.sock, self._alloc_id, ctx.name)
        except OSError as err:  # the server has closed the socket; its file goes too
            await asyncio.to_thread(remove_task_socket, ctx.task_dir.path, bound, SOCKET_NAME)
            self._unavailable(ctx, str(err))
            return
        self._sockets[ctx.name] = _TaskSocket(served, bound, ctx.task_dir.path)

    def _unavailable(self, ctx: TaskContext, reason: str) -> None:
        """Never silent: the task gets an event, the operator a log line with the path."""
        path = ctx.task_dir.secrets_dir / SOCKET_NAME
        self._log.warning("Task API unavailable for task %s at %s: %s", ctx.name, path, reason)
        ctx.emit(TaskEvent(type=EVENT_HOOK_MESSAGE, message=f"Task API unavailable: {reason}",
                           display_message=f"Task API unavailable: {reason}"))

    def _create_socket(self, task_dir: Path, user: str | None) -> BoundSocket:
        # Runs in a worker thread: the user lookup and the file work may block.
        return create_task_socket(task_dir, private_dir=self._private_dir,
                                  owner=socket_owner_for(user), name=SOCKET_NAME)

    async def task_stopped(self, ctx: TaskContext) -> None:
        await self._close(ctx.name)

    # ---- alloc lifecycle ---------------------------------------------------------------
    async def destroy(self) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
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
