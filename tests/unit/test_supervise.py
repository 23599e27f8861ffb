"""The executor's handoff to the compiled supervisor (``supervise.c``), with real processes
and no agent: exit records, signal forwarding, leftovers, zombies and the Python fallback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import pytest

from nomad_client.client import cgroups
from nomad_client.client.drivers import executor, isolation
from nomad_client.client.drivers.base import ExitResult, TaskHandle
from nomad_client.client.drivers.exec import ExecDriver, ExecDriverConfig
from nomad_client.client.drivers.proctree import create_time, kill_tree
from nomad_client.client.drivers.raw_exec import (
    EXECUTOR_MODULE,
    RawExecDriver,
    _load_exit,
    executor_env,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor is Linux's"),
]

needs_supervisor = pytest.mark.skipif(
    not executor.supervisor_available(), reason="the install built no supervisor (no compiler)"
)

# Runs the executor with its supervisor somewhere else: how a test points the separate
# executor process at a missing or broken binary.
_RELOCATED = (
    "import sys; from nomad_client.client.drivers import executor as e; "
    "e.SUPERVISOR_PATH = sys.argv[1]; sys.exit(e.main())"
)


def wait_until(condition: Callable[[], bool], message: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.01)


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def proc_state(pid: int) -> str:
    """The State letter from ``/proc/<pid>/status`` (``Z`` for a zombie), or "" if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    for line in status.splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return ""


def handed_off(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == os.path.realpath(executor.SUPERVISOR_PATH)
    except OSError:
        return False


@attrs.frozen
class Run:
    """One executor started with a task: its process, the task's pid and its files."""

    proc: subprocess.Popen[bytes]
    task_pid: int
    exit_path: Path
    log_path: Path

    def finish(self, limit: float = 10.0) -> int:
        return self.proc.wait(timeout=limit)

    def exit_record(self) -> dict[str, Any]:
        record = json.loads(self.exit_path.read_text())
        assert isinstance(record, dict)
        return record

    def result(self) -> ExitResult | None:
        return _load_exit(self.exit_path, self.proc.pid)


class Runner:
    """Starts executors the way the driver does and kills whatever a test leaves behind."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runs: list[Run] = []

    def start(self, command: str, args: list[str], *, task: str = "t",
              supervisor: str | None = None, **extra_spec: Any) -> Run:
        task_dir, state = self.base / task, self.base / "state" / task
        logs = self.base / "alloc" / "logs"
        for path in (task_dir, state, logs):
            path.mkdir(parents=True, exist_ok=True)
        exit_path = state / "exit.json"
        spec: dict[str, Any] = {
            "command": command, "args": args, "cwd": str(task_dir), "alloc_dir": str(self.base),
            "env": {"PATH": "/usr/bin:/bin"}, "uid": None, "gid": None, "groups": [],
            "stdout_path": str(logs / f"{task}.stdout.0"),
            "stderr_path": str(logs / f"{task}.stderr.0"),
            "exit_path": str(exit_path), **extra_spec,
        }
        boot = ["-m", EXECUTOR_MODULE] if supervisor is None else ["-c", _RELOCATED, supervisor]
        log_path = state / "executor.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-P", *boot], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                                    cwd=state, env=executor_env())
        reply = self._exchange(proc, spec)
        assert reply.get("ok"), reply
        run = Run(proc, int(reply["pid"]), exit_path, log_path)
        self.runs.append(run)
        return run

    @staticmethod
    def _exchange(proc: subprocess.Popen[bytes], spec: dict[str, Any]) -> dict[str, Any]:
        stdin: IO[bytes] | None = proc.stdin
        stdout: IO[bytes] | None = proc.stdout
        assert stdin is not None and stdout is not None
        with stdin:
            stdin.write(json.dumps(spec).encode() + b"\n")
            stdin.flush()
            with stdout:
                reply = json.loads(stdout.readline())
            stdin.write(b"\n")  # the task is taken over (see executor.py)
        assert isinstance(reply, dict)
        return reply

    def sh(self, script: str, **kw: Any) -> Run:
        return self.start("/bin/sh", ["-c", script], **kw)

    def cleanup(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                ct = create_time(run.proc.pid)
                if ct is not None:
                    kill_tree(run.proc.pid, ct, include_root=True)
                run.proc.kill()
                run.proc.wait(timeout=10)


@pytest.fixture
def runner(workdir: Path) -> Iterator[Runner]:
    runner = Runner(workdir)
    try:
        yield runner
    finally:
        runner.cleanup()


# -- the exit record ---------------------------------------------------------------------------


@needs_supervisor
def test_exit_code_is_recorded_atomically_after_the_handoff(runner: Runner,
                                                            workdir: Path) -> None:
    before = time.time()
    run = runner.sh(f"while [ ! -e {workdir}/go ]; do sleep 0.02; done; exit 7")
    wait_until(lambda: handed_off(run.proc.pid), "the executor to exec the supervisor")
    (workdir / "go").touch()
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=7)
    record = run.exit_record()
    assert set(record) == {"executor_pid", "task_pid", "exit_code", "signal", "finished_at"}
    assert record["executor_pid"] == run.proc.pid and record["task_pid"] == run.task_pid
    assert record["signal"] == 0
    assert isinstance(record["finished_at"], float)
    assert before <= record["finished_at"] <= time.time()
    # Written through a temp file that was renamed into place: nothing else is left.
    assert sorted(p.name for p in run.exit_path.parent.iterdir()) == ["executor.log",
                                                                      "exit.json"]
    assert run.exit_path.stat().st_mode & 0o777 == 0o600
    assert run.log_path.read_text() == ""


@needs_supervisor
def test_a_task_killed_by_a_signal_records_128_plus_n(runner: Runner) -> None:
    run = runner.start("/bin/sleep", ["300"])
    wait_until(lambda: handed_off(run.proc.pid), "the executor to exec the supervisor")
    os.kill(run.task_pid, signal.SIGKILL)
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=128 + signal.SIGKILL, signal=signal.SIGKILL)


@needs_supervisor
async def test_a_handed_off_executor_is_recovered_by_a_new_driver(runner: Runner) -> None:
    run = runner.start("/bin/sleep", ["300"])
    wait_until(lambda: handed_off(run.proc.pid), "the executor to exec the supervisor")
    executor_ct = create_time(run.proc.pid)
    assert executor_ct is not None
    handle = TaskHandle(driver="raw_exec", alloc_id="a1", task="t", pid=run.proc.pid,
                        create_time=executor_ct, started_at=time.time(),
                        driver_state={"task_pid": run.task_pid,
                                      "exit_path": str(run.exit_path)})
    assert await RawExecDriver().recover_task(handle) is True


# -- signals -----------------------------------------------------------------------------------


@needs_supervisor
def test_a_forwarded_sigterm_reaches_the_whole_task_group(runner: Runner, workdir: Path) -> None:
    seen = workdir / "seen"
    # The shell survives SIGTERM (its trap) and reports how its background child ended.
    run = runner.sh(f"sleep 300 & child=$!; trap 'wait $child; echo $? > {seen}; exit 3' TERM; "
                    "while :; do wait; done")
    wait_until(lambda: handed_off(run.proc.pid), "the executor to exec the supervisor")
    wait_until(lambda: bool(Path(f"/proc/{run.task_pid}/task/{run.task_pid}/children")
                            .read_text().strip()), "the task's child to start")
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=3)
    assert seen.read_text().strip() == str(128 + signal.SIGTERM)


@needs_supervisor
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_a_signal_sent_during_the_handoff_is_not_lost(runner: Runner, signum: int) -> None:
    # Sent as soon as the task is reported: it lands before, during or after the execve.
    for attempt in range(8):
        run = runner.start("/bin/sleep", ["300"], task=f"t{attempt}")
        os.kill(run.proc.pid, signum)
        assert run.finish() == 0, f"attempt {attempt}"
        assert run.result() == ExitResult(exit_code=128 + signum, signal=signum), attempt


def _cannot_isolate() -> str | None:
    config = ExecDriverConfig(cgroup_parent=cgroups.agent_parent("test-supervise"))
    return ExecDriver(config).unavailable_reason()


@needs_supervisor
def test_an_isolated_task_is_supervised_in_its_pid_namespace(runner: Runner,
                                                              workdir: Path) -> None:
    reason = _cannot_isolate()
    if reason is not None:
        pytest.skip(f"exec driver unavailable: {reason}")
    isolated = {
        "pid_namespace": True, "shared_alloc_dir": str(workdir / "alloc"),
        "chroot_env": [[p, p] for p in ("/bin", "/lib", "/lib64", "/usr")],
        "capabilities": [isolation.CAPABILITIES["KILL"]], "ambient_capabilities": [],
    }
    # pid 1 of its namespace ignores a signal it has no handler for: the trap is the proof.
    run = runner.sh("trap 'exit 3' TERM; echo $$ > /alloc/pid; while :; do sleep 0.05; done",
                    isolation=isolated)
    pid_file = workdir / "alloc" / "pid"
    # Not just there: the shell creates the file before it writes the pid into it.
    wait_until(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"),
               "the task to write its pid")
    assert pid_file.read_text().strip() == "1"
    wait_until(lambda: handed_off(run.proc.pid), "the executor to exec the supervisor")
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=3)


# -- leftovers and zombies ---------------------------------------------------------------------


@needs_supervisor
def test_leftovers_are_killed_and_reaped(runner: Runner, workdir: Path) -> None:
    pidfile = workdir / "daemon.pid"
    run = runner.sh(f"setsid sleep 300 & echo $! > {pidfile}.new; mv {pidfile}.new {pidfile}; "
                    f"while [ ! -e {workdir}/go ]; do sleep 0.02; done; exit 0")
    wait_until(pidfile.exists, "the task to start its daemon")
    daemon = int(pidfile.read_text())
    wait_until(lambda: handed_off(run.proc.pid), "the executor to exec the supervisor")
    (workdir / "go").touch()
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=0)
    assert not exists(daemon), proc_state(daemon)


@needs_supervisor
def test_an_orphan_that_exits_is_reaped_while_the_task_runs(runner: Runner,
                                                            workdir: Path) -> None:
    pidfile = workdir / "orphan.pid"
    # The subshell exits at once, so its child is reparented to the executor (a subreaper).
    run = runner.sh(f"(sleep 0.5 & echo $! > {pidfile}.new; mv {pidfile}.new {pidfile}); "
                    "exec sleep 300")
    wait_until(pidfile.exists, "the task to start its orphan")
    orphan = int(pidfile.read_text())
    wait_until(lambda: not exists(orphan), f"the orphan to be reaped (State {proc_state(orphan)})")
    assert run.proc.poll() is None and handed_off(run.proc.pid)
    assert proc_state(run.task_pid) == "S"
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.finish() == 0
    assert not exists(run.task_pid)


# -- the Python fallback -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_supervisor", "logged"),
    [
        (lambda base: base / "missing", "no usable supervisor"),
        # Executable but not a program: execve itself fails (ENOEXEC).
        (lambda base: _garbage_executable(base / "garbage"), "cannot run the supervisor"),
    ],
)
def test_without_a_usable_supervisor_the_executor_waits_in_python(
    runner: Runner, workdir: Path, make_supervisor: Callable[[Path], Path], logged: str
) -> None:
    supervisor = make_supervisor(workdir)
    run = runner.start("/bin/sleep", ["300"], supervisor=str(supervisor))
    wait_until(lambda: logged in run.log_path.read_text(), "the fallback to be logged")
    assert len(run.log_path.read_text().splitlines()) == 1
    assert not handed_off(run.proc.pid)
    # The forwarded signals were unblocked again: SIGTERM still reaches the task.
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=128 + signal.SIGTERM, signal=signal.SIGTERM)


def _garbage_executable(path: Path) -> Path:
    path.write_bytes(b"\0not a program\0")
    path.chmod(0o755)
    return path


def test_fingerprint_says_which_supervisor_runs_tasks(
    monkeypatch: pytest.MonkeyPatch, workdir: Path
) -> None:
    attribute = "driver.raw_exec.supervisor"
    expected = "compiled" if executor.supervisor_available() else "python"
    assert RawExecDriver().fingerprint().attributes == {attribute: expected}
    monkeypatch.setattr(executor, "SUPERVISOR_PATH", str(workdir / "missing"))
    assert RawExecDriver().fingerprint().attributes == {attribute: "python"}


# -- the supervisor's own arguments ------------------------------------------------------------


@needs_supervisor
@pytest.mark.parametrize("args", [[], ["12x", "exit.json"], ["1", "x"], ["-5", "x"], ["5"]])
def test_the_supervisor_refuses_bad_arguments(args: list[str]) -> None:
    done = subprocess.run([executor.SUPERVISOR_PATH, *args], capture_output=True, timeout=10)
    assert done.returncode == 2
    assert done.stderr.startswith((b"usage:", b"supervise: bad task pid"))
