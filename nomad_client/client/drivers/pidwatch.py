"""Waiting for a process to end without a thread or a timer per process.

A pidfd becomes readable when its process exits, whoever its parent is, so the agent can
watch hundreds of supervisors (children of the launcher, or of init after an agent restart)
with one descriptor each on the event loop: nothing wakes while they run. A pid is checked
against its start time after the pidfd is opened, so a reused pid never stands in for the
process that was meant.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time

from . import proctree

# Only where the kernel has no pidfds (before Linux 5.3): then each wait polls.
_POLL_INTERVAL = 1.0


async def wait_gone(pid: int, create_time: float, limit: float | None = None) -> bool:
    """Wait until process ``pid`` started at ``create_time`` has exited; False if ``limit``
    seconds passed first (None: no limit)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            raise
        return await _poll_gone(pid, create_time, limit)
    try:
        if not await asyncio.to_thread(proctree.same_process, pid, create_time):
            return True  # the pid is another process's now: ours is long gone
        return await _readable(pidfd, limit)
    finally:
        os.close(pidfd)


async def _readable(fd: int, limit: float | None) -> bool:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _settle, ready)
    try:
        async with asyncio.timeout(limit):
            await ready
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


async def _poll_gone(pid: int, create_time: float, limit: float | None) -> bool:
    deadline = None if limit is None else time.monotonic() + limit
    while await asyncio.to_thread(proctree.same_process, pid, create_time):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_INTERVAL)
    return True


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
