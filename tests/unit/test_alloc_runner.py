"""The hook framework: ordering, failure handling, events, restart policy, kill — driven by
the mock driver through a real AllocRunner (no agent, no server)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from nomad_client.allocrunner.alloc_dir_hook import AllocDirHook
from nomad_client.allocrunner.alloc_runner import AllocRunner, AllocRunnerConfig
from nomad_client.allocrunner.hooks import (
    AllocHookDeps,
    AllocHookFactory,
    TaskContext,
    TaskHookFactory,
)
from nomad_client.client.drivers import builtin_drivers
from nomad_client.client.drivers.base import ExitResult, TaskHandle
from nomad_client.client.taskenv import NodeView
from nomad_client.structs.models import Allocation, AllocUpdate, TaskState
from tests.unit.factories import wait_until

NS = 1_000_000_000
NODE = NodeView(id="n1", name="node1", datacenter="dc1", region="global", node_class="",
                pool="default", attributes={"kernel.name": "linux"}, meta={})


def make_alloc(tasks: list[dict[str, Any]], *, job_type: str = "batch",
               restart: Mapping[str, Any] | None = None) -> Allocation:
    group = {"Name": "g", "Count": 1, "Tasks": tasks,
             "RestartPolicy": dict(restart or {"Attempts": 0, "Interval": 60 * NS,
                                               "Delay": 0, "Mode": "fail"})}
    job = {"ID": "j", "Name": "j", "Type": job_type, "TaskGroups": [group]}
    return Allocation(id="0f0e0d0c-aaaa-bbbb-cccc-000000000001", namespace="default",
                      eval_id="e", name="j.g[0]", node_id="n1", node_name="node1",
                      job_id="j", job=job, task_group="g")


def mock_task(name: str = "t", **config: Any) -> dict[str, Any]:
    return {"Name": name, "Driver": "mock_driver", "Config": config, "KillTimeout": NS // 10}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.updates: list[AllocUpdate] = []
        self.persisted: list[tuple[str, str, TaskState, TaskHandle | None]] = []


class RecordingTaskHook:
    def __init__(self, name: str, rec: Recorder, fail_prestart: bool = False) -> None:
        self.name = name
        self._rec = rec
        self._fail = fail_prestart

    async def prestart(self, ctx: TaskContext) -> Mapping[str, str]:
        self._rec.calls.append(f"{self.name}.prestart")
        if self._fail:
            raise RuntimeError("disk on fire")
        return {f"HOOK_{self.name.upper()}": "1"}

    async def poststart(self, ctx: TaskContext, handle: TaskHandle) -> None:
        self._rec.calls.append(f"{self.name}.poststart")

    async def exited(self, ctx: TaskContext, result: ExitResult) -> None:
        self._rec.calls.append(f"{self.name}.exited")

    async def stop(self, ctx: TaskContext) -> None:
        self._rec.calls.append(f"{self.name}.stop")


class RecordingAllocHook:
    name = "recording_alloc"

    def __init__(self, deps: AllocHookDeps, rec: Recorder) -> None:
        self.deps = deps
        self.rec = rec

    async def prerun(self) -> None:
        self.rec.calls.append("alloc.prerun")

    async def postrun(self) -> None:
        self.rec.calls.append("alloc.postrun")

    async def destroy(self) -> None:
        self.rec.calls.append("alloc.destroy")

    async def config_reloaded(self) -> None:
        self.rec.calls.append("alloc.config_reloaded")

    async def task_preparing(self, ctx: TaskContext) -> None:
        self.rec.calls.append("observer.task_preparing")

    async def task_starting(self, ctx: TaskContext) -> None:
        self.rec.calls.append("observer.task_starting")

    async def task_exited(self, ctx: TaskContext, result: ExitResult, will_restart: bool
                          ) -> None:
        self.rec.calls.append(f"observer.task_exited(restart={will_restart})")

    async def task_stopped(self, ctx: TaskContext) -> None:
        self.rec.calls.append("observer.task_stopped")


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def runner_for(alloc: Allocation, tmp_path: Path, rec: Recorder,
               drivers: Mapping[str, Any] | None = None,
               task_hooks: Sequence[TaskHookFactory] | None = None,
               alloc_hooks: Sequence[AllocHookFactory] | None = None) -> AllocRunner:
    """A runner with (unless told otherwise) the real alloc dir hook, a recording alloc hook
    (which also observes task lifecycles) and two recording task hooks, ``first`` and
    ``second``."""
    async def persist(alloc_id: str, task: str, state: TaskState,
                      handle: TaskHandle | None) -> None:
        rec.persisted.append((alloc_id, task, state, handle))

    config = AllocRunnerConfig(
        alloc_dir_root=tmp_path / "alloc", driver_state_root=tmp_path / "state",
        drivers=drivers or builtin_drivers(), node_view=lambda: NODE,
        alloc_hooks=alloc_hooks or (AllocDirHook, lambda deps: RecordingAllocHook(deps, rec)),
        task_hooks=task_hooks or (lambda: RecordingTaskHook("first", rec),
                                  lambda: RecordingTaskHook("second", rec)),
        task_api=None, host_env={}, persist_task=persist, report=rec.updates.append)
    return AllocRunner(alloc, config)


def event_types(state: TaskState) -> list[str]:
    return [e.type for e in state.events]


async def run_to_end(runner: AllocRunner, timeout: float = 10) -> None:
    runner.start()
    await asyncio.wait_for(runner.wait(), timeout)


async def test_hooks_run_in_registration_order_around_the_task(tmp_path: Path,
                                                                rec: Recorder) -> None:
    runner = runner_for(make_alloc([mock_task(run_for="10ms")]), tmp_path, rec)
    await run_to_end(runner)
    assert rec.calls == [
        "alloc.prerun",
        "observer.task_preparing",
        "first.prestart", "second.prestart",
        "observer.task_starting",
        "first.poststart", "second.poststart",
        "first.exited", "second.exited",
        "observer.task_exited(restart=False)",
        "first.stop", "second.stop",
        "observer.task_stopped",
        "alloc.postrun",
    ]
    state = runner.task_runners["t"].state
    assert event_types(state) == ["Received", "Started", "Terminated"]
    assert state.state == "dead" and not state.failed
    assert rec.updates[-1].client_status == "complete"
    # the alloc dir hook built the task's tree before the task ran
    assert (tmp_path / "alloc" / runner.alloc.id / "alloc" / "logs").is_dir()


class StopOnlyHook:
    """A task hook and a task observer of one phase each: no empty methods for the rest."""

    name = "stop_only"

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def stop(self, ctx: TaskContext) -> None:
        self.rec.calls.append(f"stop({ctx.name})")

    async def task_stopped(self, ctx: TaskContext) -> None:
        self.rec.calls.append(f"task_stopped({ctx.name})")


async def test_hooks_implementing_one_phase_are_called_for_it_alone(tmp_path: Path,
                                                                    rec: Recorder) -> None:
    runner = runner_for(make_alloc([mock_task(run_for="1ms")]), tmp_path, rec,
                        task_hooks=(lambda: StopOnlyHook(rec),),
                        alloc_hooks=(AllocDirHook, lambda deps: StopOnlyHook(rec)))
    await run_to_end(runner)
    assert rec.calls == ["stop(t)", "task_stopped(t)"]
    assert runner.task_runners["t"].state.state == "dead"
    assert rec.updates[-1].client_status == "complete"


async def test_failing_prestart_hook_fails_the_task_with_the_hooks_error(
        tmp_path: Path, rec: Recorder) -> None:
    runner = runner_for(make_alloc([mock_task(run_for="10ms")]), tmp_path, rec, task_hooks=(
        lambda: RecordingTaskHook("first", rec, fail_prestart=True),
        lambda: RecordingTaskHook("second", rec)))
    await run_to_end(runner)
    state = runner.task_runners["t"].state
    hook_failed = [e for e in state.events if e.type == "Task hook failed"]
    assert len(hook_failed) == 1 and hook_failed[0].message == "first: disk on fire"
    assert "second.prestart" not in rec.calls  # the first error stops the chain
    assert "observer.task_starting" not in rec.calls  # the task never started
    assert state.failed and state.state == "dead"
    assert event_types(state)[-1] == "Not Restarting"
    assert rec.updates[-1].client_status == "failed"


async def test_restart_policy_restarts_then_gives_up(tmp_path: Path, rec: Recorder) -> None:
    alloc = make_alloc([mock_task(run_for="5ms", exit_code=3)],
                       restart={"Attempts": 2, "Interval": 600 * NS, "Delay": NS // 100,
                                "Mode": "fail"})
    runner = runner_for(alloc, tmp_path, rec)
    await run_to_end(runner)
    state = runner.task_runners["t"].state
    assert state.restarts == 2
    assert event_types(state).count("Restarting") == 2
    assert event_types(state).count("Terminated") == 3
    last = state.events[-1]
    assert last.type == "Not Restarting" and last.fails_task
    assert 'Exceeded allowed attempts 2' in last.message
    assert rec.calls.count("observer.task_preparing") == 3  # decided again on every start
    assert rec.calls.count("observer.task_starting") == 3
    assert rec.calls.count("observer.task_stopped") == 1  # stop happens once, at the end


async def test_kill_stops_a_running_task(tmp_path: Path, rec: Recorder) -> None:
    runner = runner_for(make_alloc([mock_task(run_for="60s")], job_type="service"),
                        tmp_path, rec)
    runner.start()
    tr = None
    for _ in range(200):
        tr = runner.task_runners.get("t")
        if tr is not None and tr.state.state == "running":
            break
        await asyncio.sleep(0.01)
    assert tr is not None and tr.state.state == "running"
    assert rec.updates[-1].client_status == "running"
    runner.kill("operator asked")
    await asyncio.wait_for(runner.wait(), 5)
    types = event_types(tr.state)
    assert types[-2:] == ["Killing", "Killed"]
    assert tr.state.events[-2].kill_reason == "operator asked"
    assert tr.state.state == "dead" and not tr.state.failed
    assert rec.updates[-1].client_status == "complete"


async def test_failed_sibling_kills_the_other_tasks(tmp_path: Path, rec: Recorder) -> None:
    alloc = make_alloc([mock_task("bad", start_error="no such binary"),
                        mock_task("good", run_for="60s")], job_type="service")
    runner = runner_for(alloc, tmp_path, rec)
    await run_to_end(runner)
    good = runner.task_runners["good"].state
    assert "Sibling Task Failed" in event_types(good)
    assert runner.task_runners["bad"].state.failed
    assert rec.updates[-1].client_status == "failed"


async def test_missing_driver_fails_the_task_without_running_hooks(tmp_path: Path,
                                                                  rec: Recorder) -> None:
    alloc = make_alloc([{"Name": "t", "Driver": "docker", "Config": {}}])
    runner = runner_for(alloc, tmp_path, rec)
    await run_to_end(runner)
    state = runner.task_runners["t"].state
    assert state.failed and state.events[-1].driver_error == "missing driver docker"
    assert not any(c.endswith("prestart") for c in rec.calls)


async def test_hook_env_reaches_the_driver(tmp_path: Path, rec: Recorder,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str] = {}
    mock = builtin_drivers()["mock_driver"]
    original = mock.start_task

    async def spy(cfg: Any) -> TaskHandle:
        seen.update(cfg.env)
        return await original(cfg)

    monkeypatch.setattr(mock, "start_task", spy)
    alloc = make_alloc([mock_task(run_for="1ms")])
    runner = runner_for(alloc, tmp_path, rec, drivers={"mock_driver": mock})
    await run_to_end(runner)
    assert seen["HOOK_FIRST"] == "1" and seen["HOOK_SECOND"] == "1"
    assert seen["NOMAD_TASK_NAME"] == "t" and seen["NOMAD_ALLOC_ID"] == alloc.id


def test_client_status_precedence() -> None:
    from nomad_client.allocrunner.alloc_runner import client_status

    running, pending = TaskState(state="running"), TaskState(state="pending")
    dead_ok, dead_failed = TaskState(state="dead"), TaskState(state="dead", failed=True)
    assert client_status({"a": running, "b": pending}) == "running"  # b is between restarts
    assert client_status({"a": dead_failed, "b": pending}) == "failed"
    assert client_status({"a": dead_ok, "b": pending}) == "pending"
    assert client_status({"a": dead_ok, "b": dead_ok}) == "complete"
    assert client_status({}) == "pending"


async def test_a_fault_in_the_runner_fails_the_task_instead_of_abandoning_it(
        tmp_path: Path, rec: Recorder) -> None:
    runner = runner_for(make_alloc([mock_task(run_for="60s")], job_type="service"),
                        tmp_path, rec)

    async def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    runner.config = attrs.evolve(runner.config, persist_task=disk_full)
    await run_to_end(runner)
    state = runner.task_runners["t"].state
    assert state.state == "dead" and state.failed
    assert any("No space left" in e.setup_error for e in state.events)
    assert "observer.task_stopped" in rec.calls  # the Task API socket would be closed
    assert rec.updates[-1].client_status == "failed"


async def test_kill_before_the_runners_exist_still_stops_everything(tmp_path: Path,
                                                                    rec: Recorder) -> None:
    runner = runner_for(make_alloc([mock_task(run_for="60s")], job_type="service"),
                        tmp_path, rec)
    runner.kill("agent shutting down")
    runner.start()
    await asyncio.wait_for(runner.wait(), 5)
    assert runner.task_runners["t"].state.state == "dead"
    assert "Started" not in event_types(runner.task_runners["t"].state)


class HandleWatcher:
    """A task hook recording what the context says the current handle is."""

    name = "handle_watcher"

    def __init__(self, seen: list[tuple[str, TaskHandle | None, TaskHandle | None]]) -> None:
        self.seen = seen

    async def poststart(self, ctx: TaskContext, handle: TaskHandle) -> None:
        self.seen.append(("poststart", ctx.handle.current, handle))

    async def exited(self, ctx: TaskContext, result: ExitResult) -> None:
        self.seen.append(("exited", ctx.handle.current, None))


async def test_the_context_names_the_running_process_and_nothing_after_it_exits(
        tmp_path: Path, rec: Recorder) -> None:
    seen: list[tuple[str, TaskHandle | None, TaskHandle | None]] = []
    runner = runner_for(make_alloc([mock_task(run_for="5ms")]), tmp_path, rec,
                        task_hooks=(lambda: HandleWatcher(seen),))
    await run_to_end(runner)
    (phase, current, handle), (later, after_exit, _) = seen
    assert phase == "poststart" and current is not None and current == handle
    assert later == "exited" and after_exit is None


class FailingReload:
    name = "failing_reload"

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def config_reloaded(self) -> None:
        self.rec.calls.append("failing.config_reloaded")
        raise RuntimeError("cannot apply")


async def test_a_config_reload_reaches_every_hook_that_wants_it(
        tmp_path: Path, rec: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    runner = runner_for(make_alloc([mock_task(run_for="60s")], job_type="service"), tmp_path,
                        rec, alloc_hooks=(AllocDirHook, lambda deps: FailingReload(rec),
                                          lambda deps: RecordingAllocHook(deps, rec)))
    runner.start()
    await wait_until(lambda: runner.task_runners["t"].state.state == "running" if
                     "t" in runner.task_runners else False, "the task to run")
    await runner.config_reloaded()  # one hook failing neither stops the next nor raises
    assert rec.calls[-2:] == ["failing.config_reloaded", "alloc.config_reloaded"]
    assert "cannot apply" in caplog.text
    runner.kill("done")
    await asyncio.wait_for(runner.wait(), 5)
