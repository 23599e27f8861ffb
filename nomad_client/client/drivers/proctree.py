"""Process identity and process-tree killing for drivers (psutil-based, synchronous).

Touches only the processes it is given. The functions may take a few milliseconds; async
callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

__all__ = [
    "create_time",
    "kill_tree",
    "parse_signal",
    "same_process",
]

# psutil derives create_time from clock ticks (10 ms); equal processes give equal values.
_CREATE_TIME_TOLERANCE = 0.01


def parse_signal(name: str | int) -> int:
    """``"SIGINT"``, ``"INT"``, ``"sigint"`` or ``2`` to a signal number.

    Raises ``ValueError`` naming the input if it is not a known signal.
    """
    if isinstance(name, int) and not isinstance(name, bool):
        try:
            return int(signal.Signals(name))
        except ValueError:
            raise ValueError(f"unknown signal {name!r}") from None
    if not isinstance(name, str):
        raise ValueError(f"unknown signal {name!r}")
    text = name.strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def create_time(pid: int) -> float | None:
    """The process's start time as psutil reports it, or None if it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def same_process(pid: int, expected_create_time: float) -> bool:
    """True if ``pid`` is alive (not a zombie) AND started at ``expected_create_time``.

    The start time check is what keeps a recycled pid from being mistaken for ours.
    """
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - expected_create_time) > _CREATE_TIME_TOLERANCE:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def kill_tree(
    pid: int,
    expected_create_time: float,
    *,
    include_root: bool,
    extra_pgid: int | None = None,
    settle: float = 2.0,
) -> None:
    """SIGKILL every descendant of ``pid`` (recursively, whatever their process group).

    Repeats until no descendants remain or ``settle`` seconds passed, because a dying tree
    can still fork. ``extra_pgid`` is also killed as a group (catches members already
    reparented away). With ``include_root`` the root itself is killed last. Does nothing
    if ``pid`` is not the process started at ``expected_create_time``.
    """
    if not same_process(pid, expected_create_time):
        return
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    deadline = time.monotonic() + settle
    while True:
        try:
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if extra_pgid is not None:
            try:
                os.killpg(extra_pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for child in children:
            try:
                child.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not children or time.monotonic() >= deadline:
            break
        psutil.wait_procs(children, timeout=0.2)
    if include_root:
        try:
            root.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
