"""No escaped processes: a task runner never reports its task dead while its driver handle
may still run it, and any failure after a reattach kills the handle first.

Driven through a real AllocRunner with a driver whose tasks outlive the runner that started
them (as raw_exec's do), so a restored handle can name a live task. A guard checks every
report and every saved state against what the driver still runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from nomad_client.allocrunner.alloc_dir_hook import AllocDirHook
from nomad_client.allocrunner.alloc_runner import AllocRunner, AllocRunnerConfig, RestoredTask
from nomad_client.allocrunner.hooks import AllocHookDeps, AllocHookFactory, TaskContext, TaskHook
from nomad_client.allocrunner.taskrunner import task_runner as tr_mod
from nomad_client.client.drivers.base import (
    DriverError,
    DriverInfo,
    ExitResult,
    TaskConfig,
    TaskHandle,
)
from nomad_client.structs.models import AllocUpdate, TaskEvent, TaskState
from tests.unit.test_alloc_runner import NODE, NS, make_alloc, mock_task

RESTORE_REASON = "failed to restore task: killing it"
RETRY_TWICE = {"Attempts": 2, "Interval": 600 * NS, "Delay": NS // 100, "Mode": "fail"}


class SurvivingDriver:
    """A driver whose tasks live until stopped or destroyed, whatever happens to runners.

    ``calls`` records ``(method, task id)``; ``alive()`` is the set of task ids still running.
    """

    name = "mock_driver"

    def __init__(self, *, recover: str = "ok", destroy_failures: int = 0,
                 start_error: str | None = None, wait_failures: int = 0) -> None:
        self.recover = recover  # "ok", "false" or "raise"
        self.destroy_failures = destroy_failures
        self.start_error = start_error
        self.wait_failures = wait_failures
        self.calls: list[tuple[str, str]] = []
        self._ended: dict[str, asyncio.Event] = {}

    def fingerprint(self) -> DriverInfo:
        return DriverInfo(True, True, "Healthy", {})

    def launch(self, alloc_id: str, task: str) -> TaskHandle:
        """A task as an earlier agent left it: running, its handle in the saved state."""
        task_id = uuid.uuid4().hex
        self._ended[task_id] = asyncio.Event()
        now = time.time()
        return TaskHandle(driver=self.name, alloc_id=alloc_id, task=task, pid=0,
                          create_time=now, started_at=now, driver_state={"id": task_id})

    def alive(self) -> set[str]:
        return {tid for tid, ended in self._ended.items() if not ended.is_set()}

    def calls_for(self, handle: TaskHandle) -> list[str]:
        return [method for method, tid in self.calls if tid == _tid(handle)]

    async def start_task(self, cfg: TaskConfig) -> TaskHandle:
        self.calls.append(("start", ""))
        if self.start_error:
            raise DriverError(self.start_error, recoverable=False)
        return self.launch(cfg.alloc_id, cfg.task)

    async def wait_task(self, handle: TaskHandle) -> ExitResult:
        ended = self._ended.get(_tid(handle))
        if ended is None:
            raise DriverError("unknown task")
        if self.wait_failures:
            self.wait_failures -= 1
            raise OSError(5, "Input/output error")
        await ended.wait()
        return ExitResult(exit_code=143, signal=15)

    async def stop_task(self, handle: TaskHandle, timeout: float, signal: str = "SIGINT"
                        ) -> None:
        self.calls.append(("stop", _tid(handle)))
        if (ended := self._ended.get(_tid(handle))) is not None:
            ended.set()

    async def recover_task(self, handle: TaskHandle) -> bool:
        self.calls.append(("recover", _tid(handle)))
        if self.recover == "raise":
            raise RuntimeError("driver plugin crashed")
        return self.recover == "ok"

    async def destroy_task(self, handle: TaskHandle) -> None:
        self.calls.append(("destroy", _tid(handle)))
        if self.destroy_failures:
            self.destroy_failures -= 1
            raise OSError(16, "Device or resource busy")
        if (ended := self._ended.pop(_tid(handle), None)) is not None:
            ended.set()


def _tid(handle: TaskHandle) -> str:
    return str(handle.driver_state["id"])


class Guard:
    """Checks the rule at every report and every save, and keeps what was saved."""

    def __init__(self, driver: SurvivingDriver, *, check_reports: bool = True) -> None:
        self.driver = driver
        self.check_reports = check_reports
        self.violations: list[str] = []
        self.saved: list[tuple[TaskState, TaskHandle | None]] = []
        self.fail_saves = 0

    def report(self, update: AllocUpdate) -> None:
        state = update.task_states.get("t")
        alive = self.driver.alive()
        if self.check_reports and state is not None and state.state == "dead" and alive:
            self.violations.append(f"reported dead while {sorted(alive)} ran")

    async def persist(self, alloc_id: str, task: str, state: TaskState,
                      handle: TaskHandle | None) -> None:
        if self.fail_saves:
            self.fail_saves -= 1
            raise OSError(28, "No space left on device")
        forgotten = self.driver.alive() - ({_tid(handle)} if handle else set())
        if forgotten:
            self.violations.append(f"saved ({state.state}) without live {sorted(forgotten)}")
        self.saved.append((state, handle))


class PrestartHook:
    """Fails its first ``failures`` prestarts (all when None), after ``gate`` opens."""

    name = "task_dir"

    def __init__(self, failures: int | None = 0, gate: asyncio.Event | None = None) -> None:
        self.failures = failures
        self.gate = gate
        self.entered = asyncio.Event()
        self.calls = 0

    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures is None or self.calls <= self.failures:
            raise RuntimeError("secrets exists but is not a plain directory")
        return {}


class FailingPoststartHook:
    name = "poststart_boom"

    def __init__(self) -> None:
        self.failed = asyncio.Event()

    async def poststart(self, ctx: TaskContext, handle: TaskHandle) -> None:
        self.failed.set()
        raise RuntimeError("poststart exploded")


class FailingPrerunHook:
    name = "alloc_dir"

    def __init__(self, deps: AllocHookDeps) -> None:
        pass

    async def prerun(self) -> None:
        raise OSError(13, "Permission denied")


def restored_runner(tmp_path: Path, driver: SurvivingDriver, guard: Guard, *hooks: TaskHook,
                    job_type: str = "service", restart: Mapping[str, Any] | None = None,
                    state: str = "running", desired_status: str = "run",
                    alloc_hooks: Sequence[AllocHookFactory] = (AllocDirHook,),
                    ) -> tuple[AllocRunner, TaskHandle]:
    """An alloc runner as a restarted agent builds it: task ``t`` restored with a handle
    naming a task that is still running. ``hooks`` are task ``t``'s hooks (these very
    instances, so a test can watch them)."""
    alloc = make_alloc([mock_task(run_for="60s")], job_type=job_type, restart=restart)
    alloc = attrs.evolve(alloc, desired_status=desired_status)
    handle = driver.launch(alloc.id, "t")
    events = (TaskEvent(type="Received"), TaskEvent(type="Started"))
    restored = RestoredTask(TaskState(state=state, events=events), handle)
    config = AllocRunnerConfig(
        alloc_dir_root=tmp_path / "alloc", driver_state_root=tmp_path / "state",
        drivers={"mock_driver": driver}, node_view=lambda: NODE, alloc_hooks=alloc_hooks,
        task_hooks=[(lambda h=h: h) for h in hooks], task_api=None, host_env={},
        persist_task=guard.persist, report=guard.report)
    return AllocRunner(alloc, config, {"t": restored}), handle


async def run_to_end(runner: AllocRunner, timeout: float = 10) -> None:
    runner.start()
    await asyncio.wait_for(runner.wait(), timeout)


async def wait_for(check: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the runner"
        await asyncio.sleep(0.005)


def types(runner: AllocRunner) -> list[str]:
    return [e.type for e in runner.task_runners["t"].state.events]


def killing_reasons(runner: AllocRunner) -> list[str]:
    return [e.kill_reason for e in runner.task_runners["t"].state.events if e.type == "Killing"]


def assert_dead_and_failed(runner: AllocRunner) -> None:
    state = runner.task_runners["t"].state
    assert state.state == "dead" and state.failed


def assert_all_gone(driver: SurvivingDriver, guard: Guard, runner: AllocRunner) -> None:
    assert guard.violations == []
    assert driver.alive() == set()
    assert runner.task_runners["t"].handle is None
    assert guard.saved and guard.saved[-1][1] is None  # the kill is what was saved last


# ---- prestart fails after a reattach -------------------------------------------------------


async def test_prestart_failing_after_restore_kills_the_task_before_any_retry(
        tmp_path: Path) -> None:
    driver = SurvivingDriver()
    guard = Guard(driver)
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook(failures=None),
                                  restart=RETRY_TWICE)
    await run_to_end(runner)

    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["stop", "destroy"]
    assert ("start", "") not in driver.calls  # every later attempt failed in prestart
    seen = types(runner)
    # Killed right after the first failure, before the restart loop began.
    assert seen[2:6] == ["Task hook failed", "Killing", "Killed", "Restarting"]
    assert seen.count("Task hook failed") == 3 and seen[-1] == "Not Restarting"
    assert killing_reasons(runner) == [RESTORE_REASON]
    assert_dead_and_failed(runner)


async def test_prestart_failing_once_after_restore_restarts_fresh_not_unchecked(
        tmp_path: Path) -> None:
    """The retry must not carry on with the restored handle it never re-checked."""
    driver = SurvivingDriver()
    guard = Guard(driver)
    hook = PrestartHook(failures=1)
    runner, old = restored_runner(tmp_path, driver, guard, hook, restart=RETRY_TWICE)
    runner.start()
    await wait_for(lambda: hook.calls == 2 and guard.saved[-1][0].state == "running")
    assert driver.calls_for(old) == ["stop", "destroy"]
    assert ("start", "") in driver.calls and len(driver.alive()) == 1
    runner.kill("operator asked")
    await asyncio.wait_for(runner.wait(), 5)
    assert_all_gone(driver, guard, runner)


# ---- recover_task fails ---------------------------------------------------------------------


@pytest.mark.parametrize("recover", ["false", "raise"])
async def test_failed_recover_kills_the_old_task_before_starting_a_new_one(
        tmp_path: Path, recover: str) -> None:
    driver = SurvivingDriver(recover=recover)
    guard = Guard(driver)
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook())
    runner.start()
    await wait_for(lambda: ("start", "") in driver.calls or runner.done)
    order = [method for method, tid in driver.calls if tid in (_tid(old), "")]
    assert order == ["recover", "stop", "destroy", "start"]
    assert "Failed Restoring Task" in types(runner)
    assert killing_reasons(runner) == [RESTORE_REASON]
    runner.kill("operator asked")
    await asyncio.wait_for(runner.wait(), 5)
    assert_all_gone(driver, guard, runner)


async def test_failed_restart_after_a_failed_recover_still_kills_the_old_task(
        tmp_path: Path) -> None:
    driver = SurvivingDriver(recover="false", start_error="binary vanished")
    guard = Guard(driver)
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook())
    await run_to_end(runner)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["recover", "stop", "destroy"]
    assert types(runner)[-2:] == ["Driver Failure", "Not Restarting"]
    assert runner.task_runners["t"].state.state == "dead"


# ---- after a successful reattach ------------------------------------------------------------


async def test_failing_poststart_hook_leaves_the_restored_task_supervised(
        tmp_path: Path) -> None:
    driver = SurvivingDriver()
    guard = Guard(driver)
    poststart = FailingPoststartHook()
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook(), poststart)
    runner.start()
    await asyncio.wait_for(poststart.failed.wait(), 5)
    await asyncio.sleep(0)  # the runner handles the failure
    assert runner.task_runners["t"].state.state == "running"
    assert driver.calls_for(old) == ["recover"]
    assert driver.alive() == {_tid(old)}
    runner.kill("operator asked")
    await asyncio.wait_for(runner.wait(), 5)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["recover", "stop", "destroy"]


async def test_failed_wait_on_a_restored_task_kills_it_before_going_on(
        tmp_path: Path) -> None:
    """A wait_task error says nothing about the process: it may well still run."""
    driver = SurvivingDriver(wait_failures=1)
    guard = Guard(driver)
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook())
    await run_to_end(runner)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["recover", "stop", "destroy"]
    assert types(runner)[-4:] == ["Killing", "Killed", "Terminated", "Not Restarting"]
    assert runner.task_runners["t"].state.state == "dead"


async def test_kill_before_a_restored_task_is_waited_on_kills_it(
        tmp_path: Path) -> None:
    """The allocation was stopped while no agent ran: the runner is killed before its loop."""
    driver = SurvivingDriver()
    guard = Guard(driver)
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook(),
                                  desired_status="stop")
    await run_to_end(runner)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["stop", "destroy"]
    assert killing_reasons(runner) == ["alloc not needed"]
    assert runner.task_runners["t"].state.state == "dead"


async def test_alloc_destroy_during_a_failing_prestart_kills_the_restored_task(
        tmp_path: Path) -> None:
    driver = SurvivingDriver()
    guard = Guard(driver)
    gate = asyncio.Event()
    hook = PrestartHook(failures=None, gate=gate)
    runner, old = restored_runner(tmp_path, driver, guard, hook, restart=RETRY_TWICE)
    runner.start()
    await asyncio.wait_for(hook.entered.wait(), 5)
    destroying = asyncio.create_task(runner.destroy())
    await asyncio.sleep(0)  # destroy() has asked the task runner to stop
    gate.set()
    await asyncio.wait_for(destroying, 5)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["stop", "destroy"]
    assert runner.task_runners["t"].state.state == "dead"


async def test_runner_fault_after_restore_stops_then_destroys_until_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run() exception path: a graceful stop first, and a failed destroy is retried,
    never ignored."""
    monkeypatch.setattr(tr_mod, "KILL_RETRY_FIRST", 0.01)
    driver = SurvivingDriver(destroy_failures=1)
    guard = Guard(driver)
    guard.fail_saves = 1  # the first save after the reattach: disk full
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook())
    await run_to_end(runner)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["recover", "stop", "destroy", "stop", "destroy"]
    assert killing_reasons(runner) == ["task runner failed: killing it"]
    assert_dead_and_failed(runner)


# ---- the alloc runner's own paths -----------------------------------------------------------


async def test_alloc_setup_failure_kills_restored_tasks_before_failing_them(
        tmp_path: Path) -> None:
    driver = SurvivingDriver()
    guard = Guard(driver)
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook(),
                                  alloc_hooks=(FailingPrerunHook,))
    await run_to_end(runner)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["stop", "destroy"]
    assert_dead_and_failed(runner)


async def test_dead_task_restored_with_a_handle_has_its_process_killed(
        tmp_path: Path) -> None:
    """State an older agent could save: the task dead, its handle (and process) still there."""
    driver = SurvivingDriver()
    guard = Guard(driver, check_reports=False)  # it was reported dead before this agent ran
    runner, old = restored_runner(tmp_path, driver, guard, PrestartHook(), state="dead")
    await run_to_end(runner)
    assert_all_gone(driver, guard, runner)
    assert driver.calls_for(old) == ["stop", "destroy"]
    assert runner.task_runners["t"].state.state == "dead"
