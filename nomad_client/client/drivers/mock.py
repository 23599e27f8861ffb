"""The ``mock_driver``: a task with no process, for tests of the machinery above drivers.

Touches nothing outside its own memory. A task "runs" for ``run_for`` on the event loop and
then exits with ``exit_code``; ``stop_task`` ends it at once as if killed by SIGTERM
(``exit_code=143, signal=15``). ``signal_task`` records the signal (see
``signals_received``); SIGKILL ends the task (``exit_code=137, signal=9``), any other is
caught. Mock tasks do not survive the driver object, so ``recover_task`` is always False.

Config keys: ``run_for`` (duration string like ``"2s"`` or seconds; default 0),
``exit_code`` (int, default 0), ``start_error`` (str: fail the start with this message),
``start_error_recoverable`` (bool, default False).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from nomad_client.durations import parse_duration

from . import proctree
from .base import DriverError, DriverInfo, ExitResult, TaskConfig, TaskHandle

__all__ = ["MockDriver"]

_CONFIG_KEYS = frozenset({"run_for", "exit_code", "start_error", "start_error_recoverable"})
_SIGTERM = 15
_SIGKILL = 9


@attrs.define
class _MockTask:
    deadline: float  # event-loop time at which the task exits on its own
    exit_code: int
    stopped: asyncio.Event = attrs.field(factory=asyncio.Event)
    result: ExitResult | None = None
    signals: list[str] = attrs.field(factory=list)  # names, in the order received


def _bad(message: str) -> DriverError:
    return DriverError(f"mock_driver: {message}", recoverable=False)


def _parse_config(config: Mapping[str, Any]) -> tuple[float, int, str | None, bool]:
    if not isinstance(config, Mapping):
        raise _bad("config must be a map")
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise _bad(
            f"unknown config key(s) {', '.join(map(repr, unknown))} "
            f"(allowed: {', '.join(sorted(_CONFIG_KEYS))})"
        )
    try:
        run_for = parse_duration(config.get("run_for", 0))
    except ValueError as exc:
        raise _bad(f"config key 'run_for': {exc}") from None
    if run_for < 0:
        raise _bad("config key 'run_for' must not be negative")
    exit_code = config.get("exit_code", 0)
    if isinstance(exit_code, bool) or not isinstance(exit_code, int):
        raise _bad("config key 'exit_code' must be an integer")
    start_error = config.get("start_error")
    if start_error is not None and not isinstance(start_error, str):
        raise _bad("config key 'start_error' must be a string")
    recoverable = config.get("start_error_recoverable", False)
    if not isinstance(recoverable, bool):
        raise _bad("config key 'start_error_recoverable' must be a boolean")
    return run_for, exit_code, start_error or None, recoverable


class MockDriver:
    """Pretend tasks that only consume time on the event loop."""

    name = "mock_driver"

    def __init__(self) -> None:
        self._tasks: dict[str, _MockTask] = {}

    def fingerprint(self) -> DriverInfo:
        return DriverInfo(True, True, "Healthy", {})

    async def start_task(self, cfg: TaskConfig) -> TaskHandle:
        run_for, exit_code, start_error, recoverable = _parse_config(cfg.driver_config)
        if start_error:
            raise DriverError(start_error, recoverable=recoverable)
        task_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        self._tasks[task_id] = _MockTask(deadline=loop.time() + run_for, exit_code=exit_code)
        now = time.time()
        return TaskHandle(
            driver=self.name,
            alloc_id=cfg.alloc_id,
            task=cfg.task,
            pid=0,
            create_time=now,
            started_at=now,
            driver_state={"id": task_id, "run_for": run_for, "exit_code": exit_code},
        )

    def _get(self, handle: TaskHandle) -> _MockTask:
        task = self._tasks.get(str(handle.driver_state.get("id", "")))
        if task is None:
            raise DriverError(f"mock_driver: unknown task {handle.alloc_id}/{handle.task}")
        return task

    async def wait_task(self, handle: TaskHandle) -> ExitResult:
        task = self._get(handle)
        if task.result is None:
            remaining = task.deadline - asyncio.get_running_loop().time()
            if remaining > 0:
                try:
                    async with asyncio.timeout(remaining):
                        await task.stopped.wait()
                except TimeoutError:
                    pass
            if task.result is None:
                task.result = ExitResult(exit_code=task.exit_code)
        return task.result

    async def stop_task(
        self,
        handle: TaskHandle,
        timeout: float,  # noqa: ASYNC109 - part of the driver contract; nothing to wait for
        signal: str = "SIGINT",
    ) -> None:
        task = self._get(handle)
        if task.result is None and asyncio.get_running_loop().time() < task.deadline:
            task.result = ExitResult(exit_code=128 + _SIGTERM, signal=_SIGTERM)
        task.stopped.set()

    async def signal_task(self, handle: TaskHandle, signal: str) -> None:
        try:
            signum = proctree.parse_signal(signal)
        except ValueError as exc:
            raise _bad(str(exc)) from None
        task = self._get(handle)
        if task.result is not None or asyncio.get_running_loop().time() >= task.deadline:
            raise DriverError("mock_driver: task is not running")
        task.signals.append(signal)
        if signum == _SIGKILL:
            task.result = ExitResult(exit_code=128 + _SIGKILL, signal=_SIGKILL)
            task.stopped.set()

    def signals_received(self, handle: TaskHandle) -> list[str]:
        """The signals ``signal_task`` delivered to the task, in order (for tests)."""
        return list(self._get(handle).signals)

    async def recover_task(self, handle: TaskHandle) -> bool:
        return False

    async def destroy_task(self, handle: TaskHandle) -> None:
        task = self._tasks.pop(str(handle.driver_state.get("id", "")), None)
        if task is not None and task.result is None:
            task.result = ExitResult(exit_code=128 + _SIGTERM, signal=_SIGTERM)
            task.stopped.set()
