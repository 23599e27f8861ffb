"""The launcher (one process forking every executor) and pidfd waits, with real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from nomad_client.client.drivers import pidwatch
from nomad_client.client.drivers.base import TaskHandle
from nomad_client.client.drivers.launcher import LAUNCHER_MODULE, Launcher
from nomad_client.client.drivers.proctree import kill_tree, same_process
from nomad_client.client.drivers.raw_exec import EXECUTOR_MODULE, RawExecDriver, executor_env
from tests.unit.test_drivers import gone, make_cfg, sh, wait_for_file, wait_gone

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def driver() -> AsyncIterator[tuple[RawExecDriver, list[TaskHandle]]]:
    drv = RawExecDriver()
    handles: list[TaskHandle] = []
    yield drv, handles
    for handle in handles:
        await asyncio.to_thread(kill_tree, handle.pid, handle.create_time, include_root=True)
        await asyncio.to_thread(kill_tree, handle.driver_state["task_pid"],
                                handle.driver_state["task_create_time"], include_root=True)
    await drv.close()


def parent_of(pid: int) -> psutil.Process:
    parent = psutil.Process(pid).parent()
    assert parent is not None
    return parent


async def started_with_launcher(drv: RawExecDriver, handles: list[TaskHandle], workdir: Path
                                ) -> tuple[TaskHandle, psutil.Process]:
    """A first task (kept for cleanup) and the launcher that forked its executor."""
    first = await drv.start_task(make_cfg(workdir, "sleep", ["30"], task="a"))
    handles.append(first)
    return first, parent_of(first.pid)


async def test_one_launcher_forks_every_executor(
    workdir: Path, driver: tuple[RawExecDriver, list[TaskHandle]]
) -> None:
    drv, handles = driver
    for i in range(5):
        handles.append(await drv.start_task(make_cfg(workdir, "sleep", ["30"], task=f"t{i}")))
    parents = {parent_of(h.pid).pid for h in handles}
    assert len(parents) == 1  # the same launcher, not this process
    launcher = psutil.Process(parents.pop())
    assert launcher.pid != os.getpid()
    assert LAUNCHER_MODULE in " ".join(launcher.cmdline())
    # Each executor leads its own session: a signal to the agent's group never reaches it.
    assert all(os.getsid(h.pid) == h.pid for h in handles)


async def test_launches_waiting_together_for_a_full_socket_all_go_out() -> None:
    # The launcher's socket is full (it reads nothing for now), and then several launches
    # come at once: every one must go out once it drains, not only the last to wait.
    launcher = Launcher({})
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        queued = 0
        with contextlib.suppress(BlockingIOError):
            while queued < 100_000:
                socket.send_fds(ours, [b"fill"], [fd, fd])
                queued += 1
        sends = [asyncio.ensure_future(launcher._send(ours, b"m%d" % i, [fd, fd]))
                 for i in range(20)]
        await asyncio.sleep(0)  # one loop turn: each has tried, and waits (room or its turn)
        assert not any(s.done() for s in sends)
        received: list[bytes] = []

        def drain() -> None:
            while len(received) < queued + 20:
                message, fds, _flags, _addr = socket.recv_fds(theirs, 64, 2)
                received.append(message)
                for got in fds:
                    os.close(got)

        async with asyncio.timeout(20):
            await asyncio.gather(asyncio.to_thread(drain), *sends)
        assert sorted(received[queued:]) == sorted(b"m%d" % i for i in range(20))
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


async def test_tasks_outlive_the_launcher_and_a_new_one_takes_over(
    workdir: Path, driver: tuple[RawExecDriver, list[TaskHandle]]
) -> None:
    drv, handles = driver
    first, launcher = await started_with_launcher(drv, handles, workdir)
    await drv.close()  # as at agent shutdown: the launcher exits, the task goes on
    assert await wait_gone(launcher.pid)
    assert same_process(first.pid, first.create_time)
    assert same_process(first.driver_state["task_pid"], first.driver_state["task_create_time"])

    second = await drv.start_task(make_cfg(workdir, "sleep", ["30"], task="b"))
    handles.append(second)
    assert parent_of(second.pid).pid != launcher.pid


async def test_a_killed_launcher_is_replaced_on_the_next_start(
    workdir: Path, driver: tuple[RawExecDriver, list[TaskHandle]]
) -> None:
    drv, handles = driver
    first, launcher = await started_with_launcher(drv, handles, workdir)
    launcher.kill()
    assert await wait_gone(launcher.pid)
    second = await drv.start_task(sh(workdir, "echo again; exec sleep 30", task="b"))
    handles.append(second)
    assert parent_of(second.pid).pid not in (launcher.pid, os.getpid())
    assert await wait_for_file(workdir / "alloc" / "logs" / "b.stdout.0") == "again"


async def test_finished_executors_are_reaped(
    workdir: Path, driver: tuple[RawExecDriver, list[TaskHandle]]
) -> None:
    drv, handles = driver
    keeper = await drv.start_task(make_cfg(workdir, "sleep", ["30"], task="keep"))
    handles.append(keeper)
    launcher = parent_of(keeper.pid)
    quick = [await drv.start_task(sh(workdir, f"exit {i}", task=f"q{i}")) for i in range(3)]
    results = [await drv.wait_task(h) for h in quick]
    assert [r.exit_code for r in results] == [0, 1, 2]

    def zombies() -> list[int]:
        return [c.pid for c in launcher.children() if c.status() == psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not zombies():
            break
        await asyncio.sleep(0.05)
    assert zombies() == []
    assert [c.pid for c in launcher.children()] == [keeper.pid]


async def test_a_supervisor_that_dies_while_no_agent_watches_leaves_no_task_behind(
    workdir: Path, driver: tuple[RawExecDriver, list[TaskHandle]]
) -> None:
    drv, handles = driver
    handle = await drv.start_task(make_cfg(workdir, "sleep", ["30"]))
    handles.append(handle)
    os.kill(handle.pid, signal.SIGKILL)
    assert await wait_gone(handle.pid)
    task_pid = handle.driver_state["task_pid"]
    assert not gone(task_pid)  # orphaned, still running: what a new agent finds
    fresh = RawExecDriver()
    try:
        assert await fresh.recover_task(handle) is True  # to report it, as below
        result = await fresh.wait_task(handle)
    finally:
        await fresh.close()
    assert result.exit_code == -1 and result.err is not None
    assert result.err.startswith("task supervisor died")
    assert await wait_gone(task_pid)
    # Once it is gone, a handle like it names nothing to recover.
    assert await fresh.recover_task(handle) is False


# -- the executor's take-over word ------------------------------------------------------------


def test_an_executor_not_taken_over_kills_its_task(workdir: Path) -> None:
    """The agent gave up on the start or died between the report and its word: the task
    would belong to nobody, so it must not survive."""
    cfg = make_cfg(workdir, "sleep", ["30"])
    cfg.state_dir.mkdir(parents=True)
    spec = {"command": "sleep", "args": ["30"], "cwd": str(cfg.task_dir),
            "alloc_dir": str(workdir), "env": {"PATH": "/usr/bin:/bin"}, "uid": None,
            "gid": None, "groups": [], "stdout_path": str(cfg.stdout_path),
            "stderr_path": str(cfg.stderr_path), "exit_path": str(cfg.state_dir / "exit.json")}
    proc = subprocess.Popen([sys.executable, "-P", "-m", EXECUTOR_MODULE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True, env=executor_env())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        assert reply["ok"] and reply["executor_pid"] == proc.pid
        task = psutil.Process(reply["pid"])
        assert task.is_running()
        proc.stdin.close()  # EOF, no word
        assert proc.wait(timeout=20) == 1
        assert not task.is_running() or task.status() == psutil.STATUS_ZOMBIE
        assert not (cfg.state_dir / "exit.json").exists()
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- pidwatch ---------------------------------------------------------------------------------


async def test_wait_gone_sees_a_process_that_is_not_our_child_end() -> None:
    # A grandchild: the shell exits at once, so sleep is reparented away from us.
    shell = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", "sleep 60 >/dev/null & echo $!", stdout=asyncio.subprocess.PIPE)
    out, _ = await shell.communicate()
    pid = int(out)
    ct = psutil.Process(pid).create_time()
    try:
        assert pid not in [c.pid for c in psutil.Process().children()]
        assert await pidwatch.wait_gone(pid, ct, 0.01) is False  # still sleeping
        waiter = asyncio.ensure_future(pidwatch.wait_gone(pid, ct, 20.0))
        await asyncio.sleep(0)
        assert not waiter.done()
        os.kill(pid, signal.SIGKILL)
        assert await waiter is True
    finally:
        kill_tree(pid, ct, include_root=True)


async def test_wait_gone_never_waits_for_a_reused_pid() -> None:
    me = psutil.Process()
    # This very process, named with another start time: not the process meant.
    assert await pidwatch.wait_gone(me.pid, me.create_time() - 100.0, 5.0) is True
    assert await pidwatch.wait_gone(2**22 + 12345, 0.0, 5.0) is True  # no such pid
