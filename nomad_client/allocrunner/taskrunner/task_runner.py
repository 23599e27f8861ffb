"""The task runner: drives one task through prestart -> start -> wait -> exited -> restart
decision -> ... -> stop, recording task state and events, and persisting what an agent
restart needs (state + driver handle).

It owns ordering and error handling for its task hooks and calls the alloc-level lifecycle
observers, each sorted by phase once, in the constructor. It builds its task's
``TaskContext`` (whose ``emit`` records into this runner's state) and touches its driver, its
hooks and the callbacks it was given — nothing else.

Safety rule: the task never becomes dead while its driver handle may still name a live
process. Any failure after a reattach (or any fault of ours) stops and destroys the handle
first, and the handle is dropped from the saved state only once the driver says it is gone.

Users control a running task through ``restart`` and ``signal`` (the client's allocation
routes). A restart is carried out by the run loop, the handle's one owner: it stops the task
with its kill signal and timeout, records how it exited and starts it again at once, without
counting against the restart policy (the restart count still shows it, as Nomad's does).
"""

from __future__ import annotations

import asyncio
import logging
import signal as signals
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from nomad_client.allocrunner.hooks import (
    AllocHook,
    HookError,
    TaskContext,
    TaskExitedHook,
    TaskExitedObserver,
    TaskHandleView,
    TaskHook,
    TaskPoststartHook,
    TaskPreKillHook,
    TaskPreparingObserver,
    TaskPrestartHook,
    TaskStartingObserver,
    TaskStopHook,
    TaskStoppedObserver,
    TaskUpdateHook,
    WorkloadIdentities,
    log_failure,
)
from nomad_client.allocrunner.taskrunner.restarts import NS, RestartDecision, RestartTracker
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.drivers import proctree
from nomad_client.client.drivers.base import (
    Driver,
    DriverError,
    ExitResult,
    TaskConfig,
    TaskHandle,
)
from nomad_client.client.taskapi_config import LiveTaskAPIConfig
from nomad_client.client.taskenv import (
    FS_ISOLATION_NONE,
    NodeView,
    TaskEnvInput,
    build_task_env,
    interpolate_config,
)
from nomad_client.jobspec.rollout import LOG_DEFAULTS
from nomad_client.structs import models as m
from nomad_client.structs.jobs import is_batch, task_group
from nomad_client.structs.models import Allocation, TaskEvent, TaskState, rfc3339
from nomad_client.structs.network import group_network_mode

Persist = Callable[["TaskRunner"], Awaitable[None]]

# Killing a task is retried until the driver confirms it gone, backing off between tries.
KILL_RETRY_FIRST = 0.5
KILL_RETRY_MAX = 30.0
# How long, after destroy_task, the driver has to show the task is gone before a retry.
GONE_TIMEOUT = 10.0
RESTORE_KILL_REASON = "failed to restore task: killing it"
DEFAULT_KILL_SIGNAL = "SIGINT"
SIGNALING_MESSAGE = "Task being sent a signal"
OOM_KILLED_MESSAGE = "OOM Killed"


class ControlRefused(Exception):
    """A restart or signal that cannot be done as asked; ``str()`` says why, for the caller."""


class TaskRunner:
    """``hooks``: this task's own hooks; ``observers``: the allocation's hooks, of which
    those observing task lifecycles are called."""

    def __init__(self, *, alloc: Allocation, task: Mapping[str, Any], alloc_dir: AllocDir,
                 node: NodeView, log: logging.Logger, identities: WorkloadIdentities | None,
                 driver: Driver, hooks: Sequence[TaskHook], observers: Sequence[AllocHook],
                 persist: Persist, on_change: Callable[[], None], driver_state_dir: Path,
                 host_env: Mapping[str, str], state: TaskState | None = None,
                 handle: TaskHandle | None = None,
                 task_api_config: LiveTaskAPIConfig | None = None) -> None:
        self.ctx = ctx = TaskContext(
            alloc=alloc, task=task, alloc_dir=alloc_dir,
            task_dir=alloc_dir.task_dir(str(task["Name"])), node=node, emit=self.emit, log=log,
            identities=identities, handle=TaskHandleView(handle),
            task_api_config=task_api_config,
            fs_isolation=getattr(driver, "fs_isolation", FS_ISOLATION_NONE),
            default_user=getattr(driver, "default_user", None))
        self.driver = driver
        self._prestart_hooks = [h for h in hooks if isinstance(h, TaskPrestartHook)]
        self._poststart_hooks = [h for h in hooks if isinstance(h, TaskPoststartHook)]
        self._exited_hooks = [h for h in hooks if isinstance(h, TaskExitedHook)]
        self._prekill_hooks = [h for h in hooks if isinstance(h, TaskPreKillHook)]
        self._stop_hooks = [h for h in hooks if isinstance(h, TaskStopHook)]
        self._update_hooks = [h for h in hooks if isinstance(h, TaskUpdateHook)]
        self._preparing_observers = [h for h in observers
                                     if isinstance(h, TaskPreparingObserver)]
        self._starting_observers = [h for h in observers if isinstance(h, TaskStartingObserver)]
        self._exited_observers = [h for h in observers if isinstance(h, TaskExitedObserver)]
        self._stopped_observers = [h for h in observers if isinstance(h, TaskStoppedObserver)]
        self.state = state or TaskState()
        self._persist = persist
        self._on_change = on_change
        self._driver_state_dir = driver_state_dir
        self._host_env = host_env
        self._kill = asyncio.Event()
        self._kill_reason = ""
        # A user restart: set by ``restart``, carried out by the run loop, which releases
        # the waiting callers once the task has exited for it (or the runner ends).
        self._restart = asyncio.Event()
        self._restart_reason: str | None = None
        self._restart_waiters: list[asyncio.Future[None]] = []
        # While the run loop waits on the task: resolved by a kill or a restart (a callback,
        # not a task per event: an idle task is waited on for its whole life).
        self._wakeup: asyncio.Future[None] | None = None
        group = task_group(ctx.alloc.job, ctx.alloc.task_group)
        policy = ctx.task.get("RestartPolicy") or group.get("RestartPolicy") or {}
        self.restarts = RestartTracker.from_policy(policy, batch=is_batch(ctx.alloc.job))
        self.log = log

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def handle(self) -> TaskHandle | None:
        return self.ctx.handle.current

    @handle.setter
    def handle(self, handle: TaskHandle | None) -> None:
        self.ctx.handle.set(handle)

    @property
    def finished(self) -> bool:
        return self.state.state == m.TASK_DEAD

    @property
    def running(self) -> bool:
        """Whether the task runs now and is not being stopped: what a restart or a signal
        needs."""
        return (self.state.state == m.TASK_RUNNING and self.handle is not None
                and not self._kill.is_set())

    @property
    def kill_timeout(self) -> float:
        """Seconds the task has between its kill signal and SIGKILL."""
        return float(self.ctx.task.get("KillTimeout", 5 * NS)) / NS

    @property
    def kill_signal(self) -> str:
        return str(self.ctx.task.get("KillSignal") or DEFAULT_KILL_SIGNAL)

    # ---- state -------------------------------------------------------------------------
    def emit(self, event: TaskEvent) -> None:
        self.state = self.state.with_event(event)
        self._on_change()

    def _set_state(self, state: str, event: TaskEvent | None = None) -> None:
        changes: dict[str, Any] = {"state": state}
        if state == m.TASK_RUNNING and self.state.state != m.TASK_RUNNING:
            changes["started_at"] = rfc3339()
        if state == m.TASK_DEAD:
            changes["finished_at"] = rfc3339()
        self.state = attrs.evolve(self.state, **changes)
        if event is not None:
            self.state = self.state.with_event(event)
        self._on_change()

    def kill(self, reason: str = "") -> None:
        self._kill_reason = reason
        self._kill.set()
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # ---- user control ------------------------------------------------------------------
    async def restart(self, reason: str) -> None:
        """Restart the running task in place; return once it has exited for the restart
        (its new start follows at once). ``ControlRefused`` when it is not running."""
        if not self.running:
            raise ControlRefused(f"Task not running: {self.name}")
        if self._restart_reason is None:  # else: one is on its way, which this one joins
            self.emit(TaskEvent(type=m.EVENT_RESTART_SIGNALED, restart_reason=reason,
                                display_message=reason))
            self._restart_reason = reason
            self._restart.set()
            self._wake()
        done = asyncio.get_running_loop().create_future()
        self._restart_waiters.append(done)
        await asyncio.shield(done)

    async def signal(self, name: str) -> None:
        """Send the signal ``name`` (``SIGUSR1``, ``usr1``) to the running task.
        ``ControlRefused`` for a name that is no signal, or a task that is not running."""
        canonical = signal_name(name)
        handle = self.handle
        if handle is None or not self.running:
            raise ControlRefused(f"Task not running: {self.name}")
        self.emit(TaskEvent(type=m.EVENT_SIGNALING, display_message=SIGNALING_MESSAGE,
                            details={"signal": canonical}))
        try:
            await self.driver.signal_task(handle, canonical)
        except DriverError as err:
            raise ControlRefused(f"Failed to signal task {self.name}: {err}") from None

    def _release_restart_waiters(self) -> None:
        self._restart.clear()
        self._restart_reason = None
        waiters, self._restart_waiters = self._restart_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ---- the run loop ------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if self.finished:
                # Restored from state: this task already ran to completion. A handle saved
                # beside a dead state (an older agent could leave one) may name a live task.
                await self.kill_leftover("task is dead but its process may remain: killing it")
                return
            await self._run_loop()
        except asyncio.CancelledError:
            raise  # agent shutdown: the task keeps running for the next agent
        except Exception as exc:
            # A fault of ours (disk full, a driver bug): never leave the task unsupervised.
            self.log.exception("task %s: runner failed", self.name)
            self.emit(TaskEvent(type=m.EVENT_SETUP_FAILURE, fails_task=True,
                                setup_error=str(exc),
                                display_message=f"task runner failed: {exc}"))
            if self.handle is not None:
                await self._kill_task(self.handle, "task runner failed: killing it")
            await self._finish()

    async def kill_leftover(self, reason: str) -> None:
        """Kill the task behind a handle this runner will not supervise (it is finished, or
        its allocation failed to set up), then save the state without the handle."""
        if self.handle is None:
            return
        if self.driver is None:  # its driver is missing from this agent
            self.log.error("task %s: no driver %s to kill its process", self.name,
                           self.handle.driver)
            return
        await self._kill_task(self.handle, reason)

    async def _run_loop(self) -> None:
        restoring = self.handle is not None
        if not self.state.events:
            self.emit(TaskEvent(type=m.EVENT_RECEIVED,
                                display_message="Task received by client"))
        while not self._kill.is_set():
            decision = await self._run_once(restoring)
            restoring = False
            if decision is None:  # killed
                break
            if not decision.restart:
                if decision.event_type == m.EVENT_NOT_RESTARTING:
                    self.emit(TaskEvent(type=m.EVENT_NOT_RESTARTING, fails_task=decision.fails_task,
                                        message=decision.reason,
                                        display_message=decision.reason))
                break
            self.state = attrs.evolve(self.state, restarts=self.state.restarts + 1,
                                      last_restart=rfc3339())
            self._set_state(m.TASK_PENDING, TaskEvent(
                type=m.EVENT_RESTARTING, restart_reason=decision.reason,
                start_delay=int(decision.delay * NS),
                display_message=f"Task restarting in {decision.delay:.3f}s"))
            await self._persist(self)
            if await self._wait_killed(decision.delay):
                break
        await self._finish()

    async def _run_once(self, restoring: bool) -> RestartDecision | None:
        for preparing in self._preparing_observers:
            await self._observed(preparing, "task_preparing", preparing.task_preparing(self.ctx))
        try:
            extra_env = await self._prestart()
        except HookError as err:
            self.emit(TaskEvent(type=m.EVENT_HOOK_FAILED, message=str(err),
                                display_message=str(err), setup_error=str(err)))
            if self.handle is not None:
                # A reattached task whose setup cannot be redone (its directories, its Task
                # API socket) must not run on unsupervised while we retry or give up.
                await self._kill_task(self.handle, RESTORE_KILL_REASON)
            return self.restarts.next(exit_ok=False, start_failed=True)
        env = self._build_env(extra_env)
        for starting in self._starting_observers:
            await self._observed(starting, "task_starting", starting.task_starting(self.ctx))
        if restoring and self.handle is not None:
            if not await self._recover(self.handle):
                self.emit(TaskEvent(type=m.EVENT_FAILED_RESTORING,
                                    display_message="failed to restore task; restarting it"))
                # "Not recovered" is not "not running": kill it before starting another.
                await self._kill_task(self.handle, RESTORE_KILL_REASON)
        if self.handle is None:
            if self._kill.is_set():
                return None  # killed while preparing: never launch it
            try:
                self.handle = await self.driver.start_task(self._task_config(env))
            except DriverError as err:
                self.emit(TaskEvent(type=m.EVENT_DRIVER_FAILURE, driver_error=str(err),
                                    display_message=f"Failed to start task: {err}"))
                return self.restarts.next(exit_ok=False, start_failed=True,
                                          recoverable=err.recoverable)
            self._set_state(m.TASK_RUNNING, TaskEvent(type=m.EVENT_STARTED,
                                                      display_message="Task started by client"))
        else:
            self._set_state(m.TASK_RUNNING)
        await self._persist(self)
        for poststart in self._poststart_hooks:
            await self._hooked(poststart, "poststart", poststart.poststart(self.ctx, self.handle))

        result = await self._wait_or_kill(self.handle)
        if result is None:
            await self._kill_task(self.handle)
            return None
        self.handle = None
        self.emit(terminated_event(result))
        await self._persist(self)
        for exited in self._exited_hooks:
            await self._hooked(exited, "exited", exited.exited(self.ctx, result))
        if self._restart_reason is not None:
            # Whatever ended it, this exit is the one the user asked for: restart at once,
            # outside the policy's count.
            decision = RestartDecision(True, 0.0, m.EVENT_RESTARTING, self._restart_reason,
                                       False)
            self._release_restart_waiters()
        else:
            decision = self.restarts.next(exit_ok=result.successful)
        for observer in self._exited_observers:
            await self._observed(observer, "task_exited",
                                 observer.task_exited(self.ctx, result, decision.restart))
        return decision

    async def _prestart(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for hook in self._prestart_hooks:
            try:
                env.update(await hook.prestart(self.ctx))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise HookError(hook.name, exc) from exc
        return env

    async def _recover(self, handle: TaskHandle) -> bool:
        try:
            return await self.driver.recover_task(handle)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("task %s: recovering its driver handle failed", self.name)
            return False

    async def _wait_or_kill(self, handle: TaskHandle) -> ExitResult | None:
        """How the task exited; None when it is to be killed. A user restart on the way
        stops it, and its exit is then waited for like any other."""
        waiter = asyncio.ensure_future(self.driver.wait_task(handle))
        try:
            while not waiter.done() and not self._kill.is_set():
                if self._restart.is_set():
                    self._restart.clear()
                    await self._stop_for_restart(handle, waiter)
                else:
                    await self._woken_or_done(waiter)
        finally:
            if not waiter.done():
                waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        if waiter.cancelled():
            return None  # to be killed
        if (error := waiter.exception()) is not None:
            # Whether the task still runs is now unknown: make sure it does not.
            await self._kill_task(handle, f"waiting for the task failed: killing it ({error})")
            return ExitResult(exit_code=-1, err=str(error))
        return waiter.result()

    async def _woken_or_done(self, waiter: asyncio.Future[Any]) -> None:
        """Wait until ``waiter`` is done or a kill or restart comes; never cancels it."""
        self._wakeup = wakeup = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({waiter, wakeup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wakeup = None
            wakeup.cancel()

    async def _stop_for_restart(self, handle: TaskHandle, waiter: asyncio.Future[Any]
                                ) -> None:
        """Stop the task for a user restart with its kill signal and timeout; ``waiter``
        then tells how it exited. One that outlasts that is killed as a kill would."""
        await self._prekill()
        try:
            await self.driver.stop_task(handle, self.kill_timeout, self.kill_signal)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.log.warning("task %s: stopping it for a restart failed: %s", self.name, err)
        exited, _ = await asyncio.wait({waiter}, timeout=GONE_TIMEOUT)
        if not exited:
            await self._stop_until_gone(handle, self.kill_timeout)

    async def _wait_killed(self, delay: float) -> bool:
        try:
            async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancel
                await self._kill.wait()
            return True
        except TimeoutError:
            return False

    async def _kill_task(self, handle: TaskHandle, reason: str | None = None) -> None:
        """Stop and destroy ``handle``; forget it (and save that) only once it is gone."""
        reason = self._kill_reason if reason is None else reason
        await self._prekill()
        timeout = self.kill_timeout
        self.emit(TaskEvent(type=m.EVENT_KILLING, kill_timeout=int(timeout * NS),
                            kill_reason=reason,
                            display_message=reason or
                            f"Sent interrupt. Waiting {timeout:g}s before force killing"))
        await self._stop_until_gone(handle, timeout)
        self.handle = None
        self.emit(TaskEvent(type=m.EVENT_KILLED, display_message="Task successfully killed"))
        await self._persist_logged()

    async def _prekill(self) -> None:
        for prekill in self._prekill_hooks:
            await self._hooked(prekill, "prekill", prekill.prekill(self.ctx))

    async def _stop_until_gone(self, handle: TaskHandle, grace: float) -> None:
        """``stop_task`` then ``destroy_task`` until the driver shows the task gone. Never
        gives up: giving up would leave a process that no agent supervises."""
        delay = KILL_RETRY_FIRST
        while True:
            try:
                await self._stop_and_destroy(handle, grace)
                if await self._gone(handle):
                    return
                problem = "still running after destroy"
            except asyncio.CancelledError:
                raise  # agent shutdown: the saved handle lets the next agent finish the job
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self.log.warning("task %s: killing it failed (%s); retrying in %gs",
                             self.name, problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, KILL_RETRY_MAX)

    async def _stop_and_destroy(self, handle: TaskHandle, grace: float) -> None:
        try:
            await self.driver.stop_task(handle, grace, self.kill_signal)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            # destroy_task below still kills it; only the graceful part was lost.
            self.log.warning("task %s: stop failed: %s", self.name, err)
        await self.driver.destroy_task(handle)

    async def _gone(self, handle: TaskHandle) -> bool:
        """True once ``wait_task`` returns (or the driver no longer knows the task)."""
        try:
            async with asyncio.timeout(GONE_TIMEOUT):
                await self.driver.wait_task(handle)
        except TimeoutError:
            return False
        except DriverError:
            pass  # destroyed tasks may be forgotten by the driver: nothing left to wait for
        return True

    async def _persist_logged(self) -> None:
        try:
            await self._persist(self)
        except Exception:
            # The state is still reported to the servers; the caller's work must go on.
            self.log.exception("task %s: persisting its state failed", self.name)

    async def _finish(self) -> None:
        if self.handle is not None:
            # Only reachable with a handle that was never waited on (e.g. a restored task
            # killed before its first run): dead must mean its process is gone.
            await self._kill_task(self.handle)
        self._set_state(m.TASK_DEAD)
        self._release_restart_waiters()  # a restart asked for meanwhile will not happen
        await self._persist_logged()  # stop hooks must run regardless
        for stop in self._stop_hooks:
            await self._hooked(stop, "stop", stop.stop(self.ctx))
        for stopped in self._stopped_observers:
            await self._observed(stopped, "task_stopped", stopped.task_stopped(self.ctx))

    async def update(self, alloc: Allocation) -> None:
        self.ctx.alloc = alloc
        for hook in self._update_hooks:
            await self._hooked(hook, "update", hook.update(self.ctx, alloc))

    # ---- helpers -----------------------------------------------------------------------
    async def _hooked(self, hook: TaskHook, phase: str, call: Awaitable[None]) -> None:
        """Non-prestart phases: every hook runs; failures are logged, not fatal."""
        await log_failure(self.log, call, "task %s: %s hook %s failed", self.name, phase,
                          hook.name)

    async def _observed(self, observer: AllocHook, phase: str, call: Awaitable[None]) -> None:
        """Observer failures never fail the task."""
        await log_failure(self.log, call, "task %s: observer %s.%s failed", self.name,
                          observer.name, phase)

    def _build_env(self, extra_env: Mapping[str, str]) -> dict[str, str]:
        alloc, task, paths = self.ctx.alloc, self.ctx.task, self.ctx.paths
        job = alloc.job
        group = task_group(job, alloc.task_group)
        resources = task.get("Resources") or {}
        inp = TaskEnvInput(
            alloc_id=alloc.id, alloc_name=alloc.name, alloc_index=alloc.index,
            job_id=alloc.job_id, job_name=job.get("Name") or alloc.job_id,
            group=alloc.task_group, task=self.name, namespace=alloc.namespace,
            region=job.get("Region") or "global", datacenter=self.ctx.node.datacenter,
            alloc_dir=paths.alloc_dir, task_dir=paths.local_dir,
            secrets_dir=paths.secrets_dir, job_meta=job.get("Meta") or {},
            group_meta=group.get("Meta") or {}, task_meta=task.get("Meta") or {},
            task_env=task.get("Env") or {}, cpu_mhz=int(resources.get("CPU") or 0),
            memory_mb=int(resources.get("MemoryMB") or 0), extra_env=extra_env,
            allocated_resources=alloc.allocated_resources,
            parent_job_id=job.get("ParentID") or "")
        return build_task_env(inp, self.ctx.node, self._host_env)

    def _task_config(self, env: Mapping[str, str]) -> TaskConfig:
        td, task = self.ctx.task_dir, self.ctx.task
        logs = self.ctx.alloc_dir.logs_dir
        return TaskConfig(
            alloc_id=self.ctx.alloc.id, task=self.name,
            driver_config=interpolate_config(task.get("Config") or {}, env, self.ctx.node),
            env=env, task_dir=td.path, user=self.ctx.user,
            stdout_path=logs / f"{self.name}.stdout.0",
            stderr_path=logs / f"{self.name}.stderr.0",
            kill_timeout=self.kill_timeout,
            state_dir=self._driver_state_dir,
            network_mode=group_network_mode(task_group(self.ctx.alloc.job,
                                                       self.ctx.alloc.task_group)),
            resources=task.get("Resources") or {},
            # A job stored before logs were rotated has none: Nomad's defaults then.
            log_config=task.get("LogConfig") or LOG_DEFAULTS)


def signal_name(name: str) -> str:
    """The signal ``name`` stands for, as Nomad names it (``usr1`` -> ``SIGUSR1``);
    ``ControlRefused`` when it is none, in Nomad's words (clients match "invalid signal")."""
    try:
        return signals.Signals(proctree.parse_signal(name)).name
    except ValueError:
        raise ControlRefused(f"failed to parse signal: invalid signal: {name}") from None


def terminated_event(result: ExitResult) -> TaskEvent:
    """Nomad's Terminated event: exit code, signal and OOM kill in ``Details`` too, and an
    OOM kill the driver gave no other reason for shown as "OOM Killed" (as Nomad's docker
    driver words it), so ``alloc status`` says why the task died."""
    message = result.err or (OOM_KILLED_MESSAGE if result.oom_killed else "")
    details = {"exit_code": str(result.exit_code), "signal": str(result.signal),
               "oom_killed": "true" if result.oom_killed else "false"}
    if message:
        details["exit_message"] = message
    return TaskEvent(type=m.EVENT_TERMINATED, exit_code=result.exit_code, signal=result.signal,
                     message=message, details=details,
                     display_message=_exit_message(result, message))


def _exit_message(result: ExitResult, message: str) -> str:
    text = f"Exit Code: {result.exit_code}"
    if result.signal:
        text += f", Signal: {result.signal}"
    if message:
        text += f', Exit Message: "{message}"'
    return text

