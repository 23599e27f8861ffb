"""Task hook ``task_dir``: builds the task's directory tree before every start."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from nomad_client.allocrunner.hooks import TaskContext
from nomad_client.structs.models import EVENT_TASK_SETUP, TaskEvent


class TaskDirHook:
    name = "task_dir"

    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        ctx.emit(TaskEvent(type=EVENT_TASK_SETUP, message="Building Task Directory",
                           display_message="Building Task Directory"))
        # Idempotent, so a restart repairs whatever the task removed from its tree.
        await asyncio.to_thread(ctx.alloc_dir.build_task_dir, ctx.name, ctx.user)
        return {}
