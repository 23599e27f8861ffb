"""Task hook ``dispatch_payload``: before each start of a task with a ``dispatch_payload``
block, the payload its dispatched job carries is written to ``local/<file>`` (Nomad's
dispatch hook). No payload, or no block: nothing is written.

The task can write its own ``local/``, so the file is placed as the agent places secrets:
each directory is opened relative to its parent without following a symlink (missing ones
are created and given ``local/``'s owner and mode), and the file is written under a temp
name and renamed over the final one, which replaces, never follows, whatever the task put
there. The file is 0600 and belongs to ``local/``'s owner (the task's user).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path

from nomad_client import safefs
from nomad_client.allocrunner.hooks import TaskContext
from nomad_client.jobspec.launch_blocks import payload_path

# local/ and the directories made inside it for a payload.
_PAYLOAD_DIR_MODE = 0o750


class PayloadError(Exception):
    """The payload cannot be written where the task asked for it."""


class DispatchPayloadHook:
    name = "dispatch_payload"

    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        spec = ctx.task.get("DispatchPayload")
        encoded = ctx.alloc.job.get("Payload")
        if not isinstance(spec, Mapping) or not encoded:
            return {}
        rel_path = payload_path(spec.get("File") or "")
        if rel_path is None:
            raise PayloadError("dispatch_payload file escapes the task's local directory")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise PayloadError("the dispatched job's payload is not valid base64") from None
        try:
            await asyncio.to_thread(write_payload, ctx.task_dir.path, rel_path, data)
        except OSError as exc:
            raise PayloadError(f"cannot write {rel_path}: {exc.strerror or exc}") from None
        return {}


def write_payload(task_dir: Path, rel_path: str, data: bytes) -> None:
    """Write ``data`` at ``rel_path`` (``local/...``, as ``payload_path`` gives it) inside
    ``task_dir`` without following any symlink. Blocking: run it in a worker thread."""
    first, *middle, name = rel_path.split("/")
    dir_fd = safefs.open_dir(task_dir / first)
    try:
        local = os.fstat(dir_fd)
        owner = (local.st_uid, local.st_gid)
        for part in middle:
            safefs.make_dir(part, dir_fd=dir_fd)
            next_fd = safefs.open_dir(part, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
            if os.fstat(dir_fd).st_uid == os.geteuid() != owner[0]:
                # One we just made (the task's own are the task user's): the task's, as
                # local/ is, so it may tidy up after itself.
                safefs.set_owner_and_mode(dir_fd, _PAYLOAD_DIR_MODE, owner)
        safefs.write_private_file(dir_fd, name, data,
                                  uid=owner[0] if os.geteuid() == 0 else None)
    finally:
        os.close(dir_fd)
