"""Task hook ``identity``: exposes the task's signed workload identity as the task asked —
``NOMAD_TOKEN`` in its env for ``env = true`` (with ``NOMAD_UNIX_ADDR`` when this start gets
a Task API socket, as the ``task_api`` hook decided), a 0600 token file for ``file = true`` —
on every start, so a task that deleted its file gets it back.

An identity with a ttl is renewed before it expires, and each renewal rewrites the token
file (atomically: a reader sees the old token or the new one, never a torn file). The env
copy cannot change under a running process, so only ``file = true`` gets renewals.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from collections.abc import Awaitable, Callable, Mapping

from nomad_client.allocrunner.hooks import TaskContext
from nomad_client.client.secretsdir import (
    DEFAULT_SOCKET_NAME,
    DEFAULT_TOKEN_PATH,
    write_secret_file,
)


class IdentityHook:
    name = "identity"

    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        identity = ctx.task.get("Identity") or {}
        if ctx.identities is None or not (identity.get("Env") or identity.get("File")):
            return {}
        rel_path = identity.get("Filepath") or DEFAULT_TOKEN_PATH
        write = _token_file_writer(ctx, rel_path)
        try:
            token = await ctx.identities.token(ctx.alloc.id, ctx.name)
        except Exception as exc:
            if identity.get("Env") or not await _file_exists(ctx, rel_path):
                raise
            # A task reattached after an agent restart still has its token file; failing
            # this start would kill it. Keep the file and get a new token as soon as we can.
            ctx.log.warning("task %s: no new workload identity (%s); keeping its token file "
                            "and retrying", ctx.name, exc)
            ctx.identities.watch(ctx.alloc.id, ctx.name, None, deliver=write, report=ctx.emit)
            return {}
        env: dict[str, str] = {}
        if identity.get("Env"):
            env["NOMAD_TOKEN"] = token
            if ctx.has_task_api_socket:
                env["NOMAD_UNIX_ADDR"] = (
                    f"unix://{posixpath.join(ctx.paths.secrets_dir, DEFAULT_SOCKET_NAME)}")
        if identity.get("File"):
            await write(token)
            if identity.get("TTL"):
                ctx.identities.watch(ctx.alloc.id, ctx.name, token, deliver=write,
                                     report=ctx.emit)
        return env

    async def stop(self, ctx: TaskContext) -> None:
        if ctx.identities is not None:
            ctx.identities.forget(ctx.alloc.id, ctx.name)


async def _file_exists(ctx: TaskContext, rel_path: str) -> bool:
    # Only whether something is there; nothing is read from the task's directory.
    return await asyncio.to_thread(os.path.lexists, ctx.task_dir.path / rel_path)


def _token_file_writer(ctx: TaskContext, rel_path: str) -> Callable[[str], Awaitable[None]]:
    async def write(token: str) -> None:
        await asyncio.to_thread(write_secret_file, ctx.task_dir.path, rel_path,
                                token.encode(), user=ctx.user)
    return write
