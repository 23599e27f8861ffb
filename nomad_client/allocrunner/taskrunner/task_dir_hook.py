"""Task hook ``task_dir``: builds the task's directory tree before every start and, when
the agent's ``task_api { secrets_tmpfs }`` says so, makes its ``secrets`` dir a tmpfs before
anything is written into it. Where that is impossible the task runs with a plain directory;
the agent log says so once, and the task gets one event saying why."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from nomad_client.allocrunner.hooks import TaskContext
from nomad_client.client import tmpfs
from nomad_client.structs.models import EVENT_TASK_SETUP, TaskEvent


class TaskDirHook:
    name = "task_dir"

    def __init__(self) -> None:
        self._told_plain_secrets = False

    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        ctx.emit(TaskEvent(type=EVENT_TASK_SETUP, message="Building Task Directory",
                           display_message="Building Task Directory"))
        # Idempotent, so a restart repairs whatever the task removed from its tree.
        not_tmpfs = await asyncio.to_thread(_build, ctx)
        if not_tmpfs is not None and not self._told_plain_secrets:
            self._told_plain_secrets = True
            tmpfs.note_unavailable(not_tmpfs)
            message = f"Secrets dir is a plain directory, not tmpfs: {not_tmpfs}"
            ctx.emit(TaskEvent(type=EVENT_TASK_SETUP, message=message, display_message=message))
        return {}


def _build(ctx: TaskContext) -> str | None:
    """Build the task dir; why its secrets dir is not a tmpfs though it should be, if so."""
    ctx.alloc_dir.build_task_dir(ctx.name, ctx.user)
    if not ctx.secrets_tmpfs:
        return None
    return ctx.alloc_dir.mount_secrets_tmpfs(ctx.name, ctx.user)
