"""The alloc runner: one per allocation on this node. It runs the alloc-level hooks around
the allocation's task runners, derives the allocation's client status from its tasks, and
reports changes through the callbacks the client gave it.

Its hooks come from its config (``alloc_hooks``, ``task_hooks``), run in that order; the
built-in lists are in ``builtin_hooks``. To add a hook: write one class, add it there.

Users act on its running tasks through ``restart`` and ``signal`` (Nomad's client
allocation routes); each task runner carries out its own part.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import attrs

from nomad_client.allocrunner.hooks import (
    AllocConfigReloadHook,
    AllocDestroyHook,
    AllocHookDeps,
    AllocHookFactory,
    AllocPostrunHook,
    AllocPrerunHook,
    AllocShutdownHook,
    AllocUpdateHook,
    NamespaceTaskAPIModes,
    TaskHookFactory,
    TaskSocketServer,
    WorkloadIdentities,
    log_failure,
)
from nomad_client.allocrunner.taskrunner.task_runner import ControlRefused, TaskRunner, signal_name
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.drivers.base import Driver, TaskHandle
from nomad_client.client.taskapi_config import LiveTaskAPIConfig
from nomad_client.client.taskenv import NodeView
from nomad_client.structs import models as m
from nomad_client.structs.jobs import tasks as job_tasks
from nomad_client.structs.models import Allocation, AllocUpdate, TaskEvent, TaskState

log = logging.getLogger(__name__)

# Nomad's reasons for a user restart, by what was asked for.
RESTART_TASK_REASON = "User requested task to restart"
RESTART_RUNNING_REASON = "User requested running tasks to restart"
RESTART_ALL_REASON = "User requested all tasks to restart"


class UnknownAllocation(LookupError):
    """The client runs no allocation of this ID."""


@attrs.frozen
class RestoredTask:
    state: TaskState
    handle: TaskHandle | None


@attrs.frozen
class AllocRunnerConfig:
    """What every alloc runner of a client shares. ``alloc_hooks`` and ``task_hooks`` make
    each runner's hooks, in run order; ``task_api`` serves Task API sockets (None: none);
    ``task_api_config`` is the agent's live Task API configuration and ``namespaces`` tells
    a namespace's Task API capability (None: the defaults, and no say)."""

    alloc_dir_root: Path
    driver_state_root: Path
    drivers: Mapping[str, Driver]
    node_view: Callable[[], NodeView]
    alloc_hooks: Sequence[AllocHookFactory]
    task_hooks: Sequence[TaskHookFactory]
    task_api: TaskSocketServer | None
    host_env: Mapping[str, str]
    persist_task: Callable[[str, str, TaskState, TaskHandle | None], Awaitable[None]]
    report: Callable[[AllocUpdate], None]
    identities: WorkloadIdentities | None = None
    task_api_config: LiveTaskAPIConfig | None = None
    namespaces: NamespaceTaskAPIModes | None = None


def client_status(states: Mapping[str, TaskState]) -> str:
    """Nomad's precedence: any failed task fails the allocation; else any running task makes
    it running (a sibling waiting to restart does not flip it back to pending); else any
    pending task keeps it pending; else every task finished well."""
    values = list(states.values())
    if any(s.failed for s in values):
        return m.ALLOC_FAILED
    if any(s.state == m.TASK_RUNNING for s in values):
        return m.ALLOC_RUNNING
    if not values or any(s.state == m.TASK_PENDING for s in values):
        return m.ALLOC_PENDING
    return m.ALLOC_COMPLETE


class AllocRunner:
    def __init__(self, alloc: Allocation, config: AllocRunnerConfig,
                 restored: Mapping[str, RestoredTask] | None = None) -> None:
        self.alloc = alloc
        self.config = config
        self.alloc_dir = AllocDir(config.alloc_dir_root, alloc.id)
        self.log = log.getChild(alloc.id[:8])
        deps = AllocHookDeps(alloc=alloc, alloc_dir=self.alloc_dir, task_api=config.task_api,
                             log=self.log, task_api_config=config.task_api_config,
                             namespaces=config.namespaces)
        self.hooks = [factory(deps) for factory in config.alloc_hooks]
        self._prerun_hooks = [h for h in self.hooks if isinstance(h, AllocPrerunHook)]
        self._update_hooks = [h for h in self.hooks if isinstance(h, AllocUpdateHook)]
        self._postrun_hooks = [h for h in self.hooks if isinstance(h, AllocPostrunHook)]
        self._reload_hooks = [h for h in self.hooks if isinstance(h, AllocConfigReloadHook)]
        # Teardown runs in reverse order: what was set up last (listeners in the alloc
        # dir) goes before what it lives in (the alloc dir).
        teardown = self.hooks[::-1]
        self._destroy_hooks = [h for h in teardown if isinstance(h, AllocDestroyHook)]
        self._shutdown_hooks = [h for h in teardown if isinstance(h, AllocShutdownHook)]
        self._restored = dict(restored or {})
        self.task_runners: dict[str, TaskRunner] = {}
        self._main: asyncio.Task[None] | None = None
        self._destroyed = False
        self._kill_reason: str | None = None
        self._setup_failure: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"alloc-{self.alloc.id[:8]}")

    async def wait(self) -> None:
        if self._main is not None:
            await asyncio.shield(self._main)

    @property
    def done(self) -> bool:
        return self._main is not None and self._main.done()

    async def _run(self) -> None:
        self._create_task_runners()
        if all(tr.finished for tr in self.task_runners.values()):
            for tr in self.task_runners.values():
                await tr.run()  # a finished runner only kills a process left behind
            self._report()
            return
        try:
            for prerun in self._prerun_hooks:
                await prerun.prerun()
        except Exception as exc:
            self.log.exception("alloc prerun failed")
            await self._fail_all(f"failed to setup alloc: {exc}")
            return
        if self.alloc.server_terminal():
            self.kill("alloc not needed")
        await self._run_tasks()
        for postrun in self._postrun_hooks:
            await _logged(self.log, postrun.name, postrun.postrun())
        self._report()

    async def _run_tasks(self) -> None:
        runners = list(self.task_runners.values())
        if len(runners) == 1:
            # The common case, run here: no task of its own to hold for the task's life.
            await self._run_task(runners[0])
            return
        tasks = [asyncio.create_task(self._run_task(tr), name=f"task-{tr.name}")
                 for tr in runners]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _run_task(self, runner: TaskRunner) -> None:
        await runner.run()
        if runner.state.failed:
            for sibling in self.task_runners.values():
                if sibling is not runner and not sibling.finished:
                    reason = f"Task's sibling {runner.name!r} failed"
                    sibling.emit(TaskEvent(type=m.EVENT_SIBLING_FAILED, display_message=reason))
                    sibling.kill(reason)

    def _create_task_runners(self) -> None:
        for task in job_tasks(self.alloc.job, self.alloc.task_group):
            name = task["Name"]
            restored = self._restored.get(name)
            driver = self.config.drivers.get(task["Driver"])
            runner = TaskRunner(
                alloc=self.alloc, task=task, alloc_dir=self.alloc_dir,
                node=self.config.node_view(), log=self.log, identities=self.config.identities,
                driver=driver,  # type: ignore[arg-type]  # None: failed just below, never run
                hooks=[factory() for factory in self.config.task_hooks],
                observers=self.hooks, persist=self._persist_task, on_change=self._report,
                driver_state_dir=self.config.driver_state_root / self.alloc.id / name,
                host_env=self.config.host_env,
                state=restored.state if restored else None,
                handle=restored.handle if restored else None,
                task_api_config=self.config.task_api_config)
            self.task_runners[name] = runner
            if self._kill_reason is not None:
                runner.kill(self._kill_reason)  # killed before its runner existed
            if driver is None and not runner.finished:
                runner.state = TaskState(state=m.TASK_DEAD, failed=True).with_event(TaskEvent(
                    type=m.EVENT_DRIVER_FAILURE, fails_task=True,
                    driver_error=f"missing driver {task['Driver']}",
                    display_message=f"missing driver {task['Driver']}"))

    async def _fail_all(self, message: str) -> None:
        self._setup_failure = message
        for runner in self.task_runners.values():
            # Restored tasks may still run: none may be reported dead before it is gone.
            await runner.kill_leftover(f"{message}: killing it")
            runner.state = attrs.evolve(runner.state, state=m.TASK_DEAD).with_event(TaskEvent(
                type=m.EVENT_SETUP_FAILURE, fails_task=True, setup_error=message,
                display_message=message))
        self._report()

    async def _persist_task(self, runner: TaskRunner) -> None:
        await self.config.persist_task(self.alloc.id, runner.name, runner.state, runner.handle)

    def _report(self) -> None:
        states = {name: tr.state for name, tr in self.task_runners.items()}
        status = client_status(states)
        self.config.report(AllocUpdate(id=self.alloc.id, client_status=status,
                                       client_description=self._setup_failure or "",
                                       task_states=states))

    # ---- server-driven changes ---------------------------------------------------------
    async def update(self, alloc: Allocation) -> None:
        self.alloc = alloc
        if alloc.server_terminal():
            self.kill(alloc.desired_description or "alloc stopped")
        for hook in self._update_hooks:
            await _logged(self.log, hook.name, hook.update(alloc))
        for runner in self.task_runners.values():
            await runner.update(alloc)

    async def config_reloaded(self) -> None:
        """The agent replaced its live configuration: each hook that depends on it
        re-applies it to the running tasks (failures are logged, never fatal)."""
        for hook in self._reload_hooks:
            await _logged(self.log, hook.name, hook.config_reloaded())

    # ---- user control ------------------------------------------------------------------
    def process_roots(self, task: str | None = None) -> dict[str, tuple[int, float]]:
        """(pid, create time) of the process each running task's handle names (only
        ``task``'s when given: ``ControlRefused`` if the allocation has no such task)."""
        runners = [self.task_runner(task)] if task else list(self.task_runners.values())
        return {r.name: (r.handle.pid, r.handle.create_time) for r in runners
                if r.handle is not None}

    def task_runner(self, name: str) -> TaskRunner:
        """The runner of task ``name``; ``ControlRefused`` when the allocation has none."""
        runner = self.task_runners.get(name)
        if runner is None:
            raise ControlRefused(f"Could not find task runner for task: {name}")
        return runner

    async def restart(self, task: str | None = None, *, all_tasks: bool = False) -> None:
        """Restart ``task`` in place, or (None) every running task; return once each has
        exited for it. ``all_tasks`` says the caller asked for all of them (Nomad also
        re-runs finished lifecycle tasks then; this agent has none, so it restarts the
        running ones). ``ControlRefused`` when that cannot be done."""
        if task and all_tasks:
            raise ControlRefused("task name cannot be set when restarting all tasks")
        if self.alloc.server_terminal() or self.done or self._kill_reason is not None:
            raise ControlRefused("restart of an alloc that should not run")
        if task:
            await self.task_runner(task).restart(RESTART_TASK_REASON)
            return
        reason = RESTART_ALL_REASON if all_tasks else RESTART_RUNNING_REASON
        # A task that stops meanwhile is just not restarted, as in Nomad.
        await self._each_running(lambda runner: runner.restart(reason), ignore_refusals=True)

    async def signal(self, signal: str, task: str | None = None) -> None:
        """Send ``signal`` to ``task``, or (None) to every running task. ``ControlRefused``
        for an unknown signal or task, or a task that does not run."""
        name = signal_name(signal)
        if task:
            await self.task_runner(task).signal(name)
            return
        if not any(runner.running for runner in self.task_runners.values()):
            raise ControlRefused("Task not running: no task of the allocation runs")
        await self._each_running(lambda runner: runner.signal(name), ignore_refusals=False)

    async def _each_running(self, action: Callable[[TaskRunner], Awaitable[None]], *,
                            ignore_refusals: bool) -> None:
        """``action`` on every running task at once; refusals are joined into one."""
        runners = [r for r in self.task_runners.values() if r.running]
        results = await asyncio.gather(*(action(r) for r in runners), return_exceptions=True)
        refusals = []
        for result in results:
            if isinstance(result, ControlRefused):
                refusals.append(str(result))
            elif isinstance(result, BaseException):
                raise result
        if refusals and not ignore_refusals:
            raise ControlRefused("; ".join(refusals))

    def kill(self, reason: str) -> None:
        self._kill_reason = reason
        for runner in self.task_runners.values():
            runner.kill(reason)

    async def destroy(self) -> None:
        """Kill everything, wait, and remove the allocation's files."""
        if self._destroyed:
            return
        self._destroyed = True
        self.kill("alloc destroyed")
        if self._main is not None:
            await asyncio.gather(self._main, return_exceptions=True)
        for hook in self._destroy_hooks:
            await _logged(self.log, hook.name, hook.destroy())

    async def shutdown(self) -> None:
        """Agent shutdown: stop watching, leave tasks running for the next agent."""
        if self._main is not None and not self._main.done():
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        for hook in self._shutdown_hooks:
            await _logged(self.log, hook.name, hook.shutdown())


async def _logged(logger: logging.Logger, name: str, call: Awaitable[None]) -> None:
    await log_failure(logger, call, "alloc hook %s failed", name)
