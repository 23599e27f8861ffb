"""Task hook ``identity``: exposes the task's signed workload identity as the task asked —
``NOMAD_TOKEN`` (+ ``NOMAD_UNIX_ADDR``) in its env for ``env = true``, a 0600 token file
for ``file = true`` — on every start, so a task that deleted its file gets it back."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

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
        token = ctx.alloc.signed_identities.get(ctx.name)
        if token is None or not (identity.get("Env") or identity.get("File")):
            return {}
        env: dict[str, str] = {}
        if identity.get("Env"):
            env["NOMAD_TOKEN"] = token
            env["NOMAD_UNIX_ADDR"] = f"unix://{ctx.task_dir.secrets_dir / DEFAULT_SOCKET_NAME}"
        if identity.get("File"):
            rel_path = identity.get("Filepath") or DEFAULT_TOKEN_PATH
            await asyncio.to_thread(write_secret_file, ctx.task_dir.path, rel_path,
                                    token.encode(), user=ctx.user)
        return env
