"""Drivers: raw_exec with real processes, mock_driver, durations and signal names."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import psutil
import pytest

from nomad_client.client.drivers import (
    DriverError,
    ExitResult,
    TaskConfig,
    TaskHandle,
    builtin_drivers,
    parse_duration,
)
from nomad_client.client.drivers import raw_exec as raw_exec_mod
from nomad_client.client.drivers.mock import MockDriver
from nomad_client.client.drivers.proctree import kill_tree, parse_signal, same_process
from nomad_client.client.drivers.raw_exec import RawExecDriver
from tests.unit.factories import fresh_dir, settle

pytestmark = pytest.mark.timeout(30)

BASE_ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside the alloc dir that a task would like the agent to write into."""
    with fresh_dir("drv-outside-") as path:
        yield path


class TrackingDriver(RawExecDriver):
    """A raw_exec driver that remembers what it started, so teardown can kill leftovers."""

    def __init__(self, started: list[TaskHandle]) -> None:
        super().__init__()
        self._started = started

    async def start_task(self, cfg: TaskConfig) -> TaskHandle:
        handle = await super().start_task(cfg)
        self._started.append(handle)
        return handle


def _kill_everything(handles: list[TaskHandle]) -> None:
    for h in handles:
        kill_tree(h.pid, h.create_time, include_root=True)
        task_pid, task_ct = h.driver_state["task_pid"], h.driver_state["task_create_time"]
        kill_tree(task_pid, task_ct, include_root=True)


@pytest.fixture
async def started() -> AsyncIterator[list[TaskHandle]]:
    handles: list[TaskHandle] = []
    yield handles
    await asyncio.to_thread(_kill_everything, handles)


@pytest.fixture
def drv(started: list[TaskHandle]) -> RawExecDriver:
    return TrackingDriver(started)


def make_cfg(
    base: Path,
    command: str,
    args: list[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    user: str | None = None,
    task: str = "web",
) -> TaskConfig:
    task_dir = base / task
    task_dir.mkdir(exist_ok=True)
    task_dir.chmod(0o777)
    logs = base / "alloc" / "logs"  # base plays the alloc dir
    logs.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {"command": command}
    if args is not None:
        config["args"] = args
    return TaskConfig(
        alloc_id="a1b2c3d4-0000-0000-0000-000000000000",
        task=task,
        driver_config=config,
        env=dict(BASE_ENV if env is None else env),
        task_dir=task_dir,
        user=user,
        stdout_path=logs / f"{task}.stdout.0",
        stderr_path=logs / f"{task}.stderr.0",
        kill_timeout=1.0,
        state_dir=base / "state" / task,
    )


def sh(base: Path, script: str, **kw: object) -> TaskConfig:
    return make_cfg(base, "/bin/sh", ["-c", script], **kw)  # type: ignore[arg-type]


def _read_stripped(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


async def wait_for_file(path: Path, limit: float = 5.0) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(_read_stripped, path)
        if text:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        await asyncio.sleep(0.02)
    return False


# -- raw_exec: running and exit status --------------------------------------------------------


async def test_exit_code_and_stdout(workdir: Path, drv: RawExecDriver) -> None:
    cfg = sh(workdir, "echo hi; echo oops >&2; exit 3")
    handle = await drv.start_task(cfg)
    assert handle.driver == "raw_exec" and handle.pid > 0
    assert handle.driver_state["task_pid"] != handle.pid
    result = await drv.wait_task(handle)
    assert result == ExitResult(exit_code=3)
    assert cfg.stdout_path.read_text() == "hi\n"
    assert cfg.stderr_path.read_text() == "oops\n"
    assert oct(cfg.stdout_path.stat().st_mode & 0o777) == oct(0o644)


async def test_logs_are_appended_across_runs_and_exit_file_is_per_run(
    workdir: Path, drv: RawExecDriver
) -> None:
    first = await drv.start_task(sh(workdir, "echo one; exit 4"))
    assert (await drv.wait_task(first)).exit_code == 4
    cfg = sh(workdir, "echo two")
    second = await drv.start_task(cfg)
    assert (await drv.wait_task(second)).exit_code == 0
    assert cfg.stdout_path.read_text() == "one\ntwo\n"


async def test_env_is_exactly_the_given_env(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, drv: RawExecDriver
) -> None:
    monkeypatch.setenv("AGENT_ONLY_SECRET", "must-not-leak")
    env = {"PATH": "/usr/bin:/bin", "FOO": "bar baz", "NOMAD_TASK_NAME": "web"}
    cfg = make_cfg(workdir, "env", env=env)
    handle = await drv.start_task(cfg)
    assert (await drv.wait_task(handle)).exit_code == 0
    lines = set(cfg.stdout_path.read_text().splitlines())
    assert lines == {f"{k}={v}" for k, v in env.items()}


async def test_cwd_is_task_dir_and_bare_names_are_found_in_local(
    workdir: Path, drv: RawExecDriver
) -> None:
    cfg = make_cfg(workdir, "hello.sh")
    local = cfg.task_dir / "local"
    local.mkdir()
    script = local / "hello.sh"
    script.write_text("#!/bin/sh\npwd\n")
    script.chmod(0o755)
    handle = await drv.start_task(cfg)
    assert (await drv.wait_task(handle)).exit_code == 0
    assert cfg.stdout_path.read_text().strip() == str(cfg.task_dir)


# -- raw_exec: start failures -----------------------------------------------------------------


async def test_missing_command_is_a_driver_error(workdir: Path, drv: RawExecDriver) -> None:
    with pytest.raises(DriverError, match="'no-such-binary-xyz' not found"):
        await drv.start_task(make_cfg(workdir, "no-such-binary-xyz"))
    with pytest.raises(DriverError, match="not found"):
        await drv.start_task(make_cfg(workdir, "/nonexistent/bin/tool"))


async def test_missing_task_dir_is_a_driver_error(workdir: Path) -> None:
    cfg = attrs.evolve(make_cfg(workdir, "/bin/true"), task_dir=workdir / "gone")
    with pytest.raises(DriverError, match="task directory .*gone does not exist"):
        await RawExecDriver().start_task(cfg)


async def test_non_executable_command_is_a_driver_error(workdir: Path) -> None:
    target = workdir / "data.txt"
    target.write_text("not a program")
    target.chmod(0o644)
    with pytest.raises(DriverError, match="not executable"):
        await RawExecDriver().start_task(make_cfg(workdir, str(target)))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "'command' is required"),
        ({"command": ""}, "'command' is required"),
        ({"command": 5}, "'command' is required"),
        ({"command": "/bin/true", "args": "x"}, "'args' must be a list of strings"),
        ({"command": "/bin/true", "args": [1]}, "'args' must be a list of strings"),
        ({"command": "/bin/true", "bogus": 1}, "unknown config key"),
    ],
)
async def test_bad_config_is_unrecoverable(
    workdir: Path, config: dict[str, object], message: str
) -> None:
    cfg = attrs.evolve(make_cfg(workdir, "/bin/true"), driver_config=config)
    with pytest.raises(DriverError, match=message) as info:
        await RawExecDriver().start_task(cfg)
    assert info.value.recoverable is False


async def test_log_file_symlink_is_refused(workdir: Path) -> None:
    cfg = sh(workdir, "echo pwned")
    victim = workdir / "victim"
    victim.write_text("original\n")
    cfg.stdout_path.symlink_to(victim)
    with pytest.raises(DriverError, match="log path .*web.stdout.0 is a symlink"):
        await RawExecDriver().start_task(cfg)
    assert victim.read_text() == "original\n"


@pytest.mark.parametrize("component", ["logs", "alloc"])
async def test_log_dir_symlink_is_refused(workdir: Path, outside: Path, component: str) -> None:
    # A task can replace the world-writable ``alloc/logs`` (or, were ``alloc`` itself
    # replaceable, ``alloc``) with a symlink; a root executor must not write through it.
    cfg = sh(workdir, "echo pwned")
    (outside / "logs").mkdir()
    swapped = cfg.stdout_path.parent if component == "logs" else cfg.stdout_path.parent.parent
    shutil.rmtree(swapped)
    swapped.symlink_to(outside / "logs" if component == "logs" else outside)
    with pytest.raises(DriverError, match=f"log path .*/{component} is a symlink") as info:
        await RawExecDriver().start_task(cfg)
    assert str(workdir) in str(info.value)
    assert sorted(p.name for p in outside.rglob("*")) == ["logs"]  # nothing created


@pytest.mark.skipif(os.geteuid() != 0, reason="a task swapping its logs dir needs a user switch")
async def test_task_cannot_redirect_the_next_runs_logs(
    workdir: Path, outside: Path, drv: RawExecDriver
) -> None:
    # The attack end to end: a task running as nobody swaps ``alloc/logs`` for a symlink to
    # a directory of the host, then the task is restarted by the root agent.
    cfg = sh(
        workdir,
        f"mv {workdir}/alloc/logs {workdir}/alloc/old && ln -s {outside} {workdir}/alloc/logs",
        user="nobody",
    )
    for shared in (workdir / "alloc", cfg.stdout_path.parent):
        shared.chmod(0o777)  # the shared dir's layout: writable by every task, not sticky
    first = await drv.start_task(cfg)
    assert (await drv.wait_task(first)).exit_code == 0
    assert (workdir / "alloc" / "logs").is_symlink()  # the swap itself is allowed
    with pytest.raises(DriverError, match="log path .*alloc/logs is a symlink"):
        await drv.start_task(cfg)
    assert list(outside.iterdir()) == []


async def test_log_file_hard_link_is_refused(workdir: Path) -> None:
    cfg = sh(workdir, "echo pwned")
    victim = workdir / "victim"
    victim.write_text("original\n")
    os.link(victim, cfg.stdout_path)
    with pytest.raises(DriverError, match="log path .*web.stdout.0 has 2 hard links"):
        await RawExecDriver().start_task(cfg)
    assert victim.read_text() == "original\n"


@pytest.mark.parametrize("with_reader", [False, True])
async def test_log_file_fifo_is_refused_without_hanging(workdir: Path, with_reader: bool) -> None:
    cfg = sh(workdir, "echo pwned")
    os.mkfifo(cfg.stdout_path)
    # With no reader the open itself fails; with one it succeeds and the fstat refuses.
    reader = os.open(cfg.stdout_path, os.O_RDONLY | os.O_NONBLOCK) if with_reader else None
    try:
        started = time.monotonic()
        with pytest.raises(DriverError, match="log path .*web.stdout.0 is not a regular file"):
            await asyncio.wait_for(RawExecDriver().start_task(cfg), 10)
        assert time.monotonic() - started < 5.0
        if reader is not None:
            assert os.read(reader, 100) == b""  # nothing was written into it
    finally:
        if reader is not None:
            os.close(reader)


@pytest.mark.parametrize(
    "where", ["logs/web.stdout.0", "alloc/web.stdout.0", "alloc/data/web.stdout.0"]
)
async def test_log_outside_alloc_logs_is_unrecoverable(workdir: Path, where: str) -> None:
    cfg = attrs.evolve(sh(workdir, "echo hi"), stdout_path=workdir / where)
    with pytest.raises(DriverError, match="is not inside <alloc dir>/alloc/logs") as info:
        await RawExecDriver().start_task(cfg)
    assert info.value.recoverable is False


async def test_user_needs_root_agent(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_exec_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(DriverError, match="cannot run task as user nobody: agent is not root"):
        await RawExecDriver().start_task(sh(workdir, "true", user="nobody"))


@pytest.mark.skipif(os.geteuid() != 0, reason="running a task as another user needs root")
async def test_runs_as_nobody_with_no_supplementary_groups(
    workdir: Path, drv: RawExecDriver
) -> None:
    nobody = pwd.getpwnam("nobody")
    cfg = sh(workdir, "id -u; id -g; id -G", user="nobody")
    handle = await drv.start_task(cfg)
    assert (await drv.wait_task(handle)).exit_code == 0
    uid, gid, groups = cfg.stdout_path.read_text().split("\n")[:3]
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert groups.split() == [str(nobody.pw_gid)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_unknown_user_is_a_driver_error(workdir: Path) -> None:
    with pytest.raises(DriverError, match="no such user"):
        await RawExecDriver().start_task(sh(workdir, "true", user="no-such-user-xyz"))


# -- raw_exec: stopping -----------------------------------------------------------------------


async def test_stop_with_sigint_ends_a_sleep(workdir: Path, drv: RawExecDriver) -> None:
    handle = await drv.start_task(make_cfg(workdir, "sleep", ["30"]))
    started = time.monotonic()
    await drv.stop_task(handle, timeout=5.0)
    result = await drv.wait_task(handle)
    assert result == ExitResult(exit_code=128 + signal.SIGINT, signal=signal.SIGINT)
    assert time.monotonic() - started < 3.0


async def test_stop_escalates_to_sigkill_after_timeout(workdir: Path, drv: RawExecDriver) -> None:
    ready = workdir / "ready"
    cfg = sh(workdir, f"trap '' INT TERM; echo up > {ready}; while :; do sleep 0.1; done")
    handle = await drv.start_task(cfg)
    await wait_for_file(ready)
    started = time.monotonic()
    await drv.stop_task(handle, timeout=0.5, signal="SIGTERM")
    elapsed = time.monotonic() - started
    result = await drv.wait_task(handle)
    assert result.signal == signal.SIGKILL and result.exit_code == 128 + signal.SIGKILL
    assert 0.5 <= elapsed < 4.0
    assert gone(handle.driver_state["task_pid"])


async def test_tree_kill_reaches_a_grandchild_in_another_session(
    workdir: Path, drv: RawExecDriver
) -> None:
    pidfile = workdir / "grandchild.pid"
    # The grandchild writes its own pid after setsid(), so it has left the session by then.
    cfg = sh(
        workdir,
        f"trap '' INT; setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & wait",
    )
    handle = await drv.start_task(cfg)
    grandchild = int(await wait_for_file(pidfile))
    task_pid = handle.driver_state["task_pid"]
    assert os.getsid(grandchild) != os.getsid(task_pid)  # it really left the session
    await drv.stop_task(handle, timeout=0.3)
    assert (await drv.wait_task(handle)).signal == signal.SIGKILL
    assert await wait_gone(grandchild)


async def test_kill_tree_alone_kills_descendants_outside_the_group(workdir: Path) -> None:
    pidfile = workdir / "gc.pid"
    root = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & wait"
    )
    grandchild = int(await wait_for_file(pidfile))
    assert os.getpgid(grandchild) != os.getpgid(root.pid)
    ct = psutil.Process(root.pid).create_time()
    await asyncio.to_thread(kill_tree, root.pid, ct, include_root=True)
    await asyncio.wait_for(root.wait(), 5)  # sh may exit on its own once its child is gone
    assert await wait_gone(grandchild)


async def test_leftovers_are_killed_when_the_main_process_exits(
    workdir: Path, drv: RawExecDriver
) -> None:
    # A double fork puts the daemon outside the task's tree; the executor adopts it anyway.
    pidfile = workdir / "daemon.pid"
    cfg = sh(workdir, f"(setsid sleep 300 & echo $! > {pidfile}) ; sleep 0.2; exit 0")
    handle = await drv.start_task(cfg)
    daemon = int(await wait_for_file(pidfile))
    assert (await drv.wait_task(handle)).exit_code == 0
    assert await wait_gone(daemon)


async def test_stop_rejects_unknown_signal(workdir: Path, drv: RawExecDriver) -> None:
    handle = await drv.start_task(make_cfg(workdir, "sleep", ["30"]))
    try:
        with pytest.raises(DriverError, match="unknown signal 'SIGNOPE'"):
            await drv.stop_task(handle, timeout=1.0, signal="SIGNOPE")
    finally:
        await drv.destroy_task(handle)
    assert gone(handle.pid) and gone(handle.driver_state["task_pid"])


async def test_cancelling_wait_leaves_the_task_running(workdir: Path, drv: RawExecDriver) -> None:
    handle = await drv.start_task(make_cfg(workdir, "sleep", ["30"]))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(drv.wait_task(handle), 0.2)
    assert same_process(handle.pid, handle.create_time)
    assert not gone(handle.driver_state["task_pid"])
    await drv.stop_task(handle, timeout=2.0, signal="SIGTERM")
    assert (await drv.wait_task(handle)).signal == signal.SIGTERM


async def test_destroy_kills_and_cleans_state(workdir: Path, drv: RawExecDriver) -> None:
    cfg = make_cfg(workdir, "sleep", ["30"])
    handle = await drv.start_task(cfg)
    await drv.destroy_task(handle)
    assert gone(handle.pid) and gone(handle.driver_state["task_pid"])
    assert not cfg.state_dir.exists()


async def test_executor_death_is_reported(workdir: Path, drv: RawExecDriver) -> None:
    handle = await drv.start_task(make_cfg(workdir, "sleep", ["30"]))
    task_pid = handle.driver_state["task_pid"]
    try:
        os.kill(handle.pid, signal.SIGKILL)
        result = await drv.wait_task(handle)
        assert result.exit_code == -1
        assert result.err is not None and result.err.startswith("task supervisor died")
        assert gone(task_pid)  # never left running unsupervised
    finally:
        if not gone(task_pid):
            os.kill(task_pid, signal.SIGKILL)


# -- raw_exec: surviving the agent ------------------------------------------------------------


async def test_recover_with_a_new_driver_instance_learns_the_exit_code(
    workdir: Path, drv: RawExecDriver
) -> None:
    ready = workdir / "ready"
    handle = await drv.start_task(sh(workdir, f"echo up > {ready}; sleep 0.5; exit 7"))
    restored = TaskHandle.from_dict(json.loads(json.dumps(handle.to_dict())))
    fresh = RawExecDriver()
    assert await fresh.recover_task(restored) is True
    assert (await fresh.wait_task(restored)).exit_code == 7
    # Exited, but its exit record remains: still recoverable (so it is not rerun), and
    # waiting again reports the same exit.
    assert await fresh.recover_task(restored) is True
    assert (await fresh.wait_task(restored)).exit_code == 7
    await fresh.destroy_task(restored)
    assert await fresh.recover_task(restored) is False  # record cleaned up with the task


async def test_recovered_task_can_be_stopped(workdir: Path, drv: RawExecDriver) -> None:
    handle = await drv.start_task(make_cfg(workdir, "sleep", ["30"]))
    fresh = RawExecDriver()
    assert await fresh.recover_task(handle)
    await fresh.stop_task(handle, timeout=2.0)
    assert (await fresh.wait_task(handle)).signal == signal.SIGINT


AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path
    from nomad_client.client.drivers import TaskConfig
    from nomad_client.client.drivers.raw_exec import RawExecDriver

    async def main():
        base = Path(sys.argv[1])
        logs = base / "alloc" / "logs"
        logs.mkdir(parents=True)
        cfg = TaskConfig(
            alloc_id="a", task="t",
            driver_config={"command": "/bin/sh", "args": ["-c", "sleep 1; echo done; exit 5"]},
            env={"PATH": "/usr/bin:/bin"}, task_dir=base, user=None,
            stdout_path=logs / "t.stdout.0", stderr_path=logs / "t.stderr.0", kill_timeout=1.0,
            state_dir=base / "state")
        handle = await RawExecDriver().start_task(cfg)
        print(json.dumps(handle.to_dict()), flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_agent_sigkill_leaves_task_running_and_exit_code_recoverable(
    workdir: Path, drv: RawExecDriver, started: list[TaskHandle]
) -> None:
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT_SCRIPT, str(workdir), stdout=asyncio.subprocess.PIPE
    )
    assert agent.stdout is not None
    line = await asyncio.wait_for(agent.stdout.readline(), 10)
    agent.kill()  # SIGKILL: no cleanup of any kind in the "agent"
    await agent.wait()
    handle = TaskHandle.from_dict(json.loads(line))
    assert await drv.recover_task(handle) is True
    assert not gone(handle.driver_state["task_pid"])
    assert await drv.wait_task(handle) == ExitResult(exit_code=5)
    assert (workdir / "alloc" / "logs" / "t.stdout.0").read_text() == "done\n"


async def test_reused_pid_is_not_recovered(drv: RawExecDriver) -> None:
    me = psutil.Process()
    fake = TaskHandle(
        driver="raw_exec",
        alloc_id="a",
        task="t",
        pid=me.pid,  # alive, but not the process that was started at this time
        create_time=me.create_time() - 1000.0,
        started_at=time.time(),
        driver_state={"task_pid": me.pid, "exit_path": "/nonexistent/exit.json"},
    )
    assert await drv.recover_task(fake) is False
    # And a live process with the right create_time that is not an executor is refused too.
    genuine = TaskHandle(**{**fake.to_dict(), "create_time": me.create_time()})
    assert await drv.recover_task(genuine) is False
    # Stopping a handle that names someone else's process must not signal it.
    await drv.stop_task(fake, timeout=0.1)
    assert me.is_running()


@pytest.mark.parametrize(
    ("record", "recoverable"),
    [
        ({"executor_pid": "PID", "exit_code": 3, "signal": 0}, True),
        ({"executor_pid": "PID"}, False),  # no exit code: nothing to report
        ({"executor_pid": "PID", "exit_code": "three"}, False),
        ({"executor_pid": 1, "exit_code": 3}, False),  # another run's record
        (["not", "an", "object"], False),
    ],
)
async def test_exit_record_is_recoverable_only_if_wait_can_report_it(
    workdir: Path, record: object, recoverable: bool
) -> None:
    me = psutil.Process()
    exit_path = workdir / "exit.json"
    exit_path.write_text(json.dumps(record).replace('"PID"', str(me.pid)))
    handle = TaskHandle(
        driver="raw_exec",
        alloc_id="a",
        task="t",
        pid=me.pid,
        create_time=me.create_time() - 1000.0,  # so no live executor is found
        started_at=time.time(),
        driver_state={"task_pid": me.pid, "exit_path": str(exit_path)},
    )
    drv = RawExecDriver()
    assert await drv.recover_task(handle) is recoverable
    result = await drv.wait_task(handle)
    assert (result == ExitResult(exit_code=3)) is recoverable
    if not recoverable:
        assert result.exit_code == -1 and result.err is not None
        assert result.err.startswith("task supervisor died")


async def test_live_executor_with_wrong_create_time_is_not_recovered(
    workdir: Path, drv: RawExecDriver
) -> None:
    handle = await drv.start_task(make_cfg(workdir, "sleep", ["30"]))
    # Both pids reused by other processes: nothing of ours may be touched.
    stale_task = {**handle.driver_state,
                  "task_create_time": handle.driver_state["task_create_time"] - 5.0}
    impostor = attrs.evolve(handle, create_time=handle.create_time - 5.0,
                            driver_state=stale_task)
    fresh = RawExecDriver()
    assert await fresh.recover_task(impostor) is False
    await fresh.stop_task(impostor, timeout=0.1)  # must not touch the real executor
    assert same_process(handle.pid, handle.create_time)
    assert same_process(handle.driver_state["task_pid"], handle.driver_state["task_create_time"])
    assert await fresh.recover_task(handle) is True
    await fresh.destroy_task(handle)


async def test_recover_refuses_other_drivers_handles() -> None:
    handle = TaskHandle("mock_driver", "a", "t", os.getpid(), psutil.Process().create_time(), 0.0)
    assert await RawExecDriver().recover_task(handle) is False


# -- mock_driver ------------------------------------------------------------------------------


def mock_cfg(**config: object) -> TaskConfig:
    return TaskConfig(
        alloc_id="a",
        task="t",
        driver_config=config,
        env={},
        task_dir=Path("."),
        user=None,
        stdout_path=Path("/dev/null"),
        stderr_path=Path("/dev/null"),
        kill_timeout=1.0,
        state_dir=Path("."),
    )


async def test_mock_runs_for_and_exits() -> None:
    drv = MockDriver()
    started = time.monotonic()
    handle = await drv.start_task(mock_cfg(run_for="200ms", exit_code=2))
    assert await drv.wait_task(handle) == ExitResult(exit_code=2)
    assert time.monotonic() - started >= 0.19
    assert await drv.wait_task(handle) == ExitResult(exit_code=2)  # repeatable


async def test_mock_stop_ends_with_sigterm() -> None:
    drv = MockDriver()
    handle = await drv.start_task(mock_cfg(run_for=30))
    waiter = asyncio.create_task(drv.wait_task(handle))
    await settle()
    assert not waiter.done()
    await drv.stop_task(handle, timeout=1.0)
    assert await asyncio.wait_for(waiter, 1.0) == ExitResult(exit_code=143, signal=15)


async def test_mock_start_error_and_recovery() -> None:
    drv = MockDriver()
    with pytest.raises(DriverError, match="boom") as info:
        await drv.start_task(mock_cfg(start_error="boom", start_error_recoverable=True))
    assert info.value.recoverable is True
    with pytest.raises(DriverError, match="boom") as info:
        await drv.start_task(mock_cfg(start_error="boom"))
    assert info.value.recoverable is False
    handle = await drv.start_task(mock_cfg(run_for="1s"))
    assert await MockDriver().recover_task(handle) is False
    with pytest.raises(DriverError, match="unknown task"):
        await MockDriver().wait_task(handle)
    await drv.destroy_task(handle)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"run_for": "soon"}, "'run_for'"),
        ({"run_for": -1}, "must not be negative"),
        ({"exit_code": "1"}, "'exit_code' must be an integer"),
        ({"start_error_recoverable": "yes"}, "must be a boolean"),
        ({"stdout_string": "x"}, "unknown config key"),
    ],
)
async def test_mock_bad_config(config: dict[str, object], message: str) -> None:
    with pytest.raises(DriverError, match=message):
        await MockDriver().start_task(mock_cfg(**config))


def test_builtin_drivers_and_fingerprints() -> None:
    drivers = builtin_drivers()
    assert set(drivers) == {"raw_exec", "exec", "mock_driver"}
    for name, drv in drivers.items():
        assert drv.name == name
        if name == "exec":
            continue  # healthy only as root with namespaces and cgroups: test_exec_driver.py
        info = drv.fingerprint()
        assert info.detected and info.healthy and info.health_description == "Healthy"


# -- durations and signal names ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h2m3.5s", 3723.5),
        ("250ms", 0.25),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("1.5h", 5400.0),
        ("-2s", -2.0),
        ("0", 0.0),
        ("3ns", 3e-9),
        (2, 2.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "1x", "s", "1h 2m", "abc", "1.2.3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_rejects_non_numbers() -> None:
    for bad in (True, None, float("nan"), [1]):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)  # type: ignore[arg-type]


def test_parse_signal() -> None:
    assert parse_signal("SIGINT") == signal.SIGINT
    assert parse_signal("term") == signal.SIGTERM
    assert parse_signal(9) == signal.SIGKILL
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("SIGFOO")
