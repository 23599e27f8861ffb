"""The restart policy: after a task exits (or fails to start), decide whether to restart it,
after how long, and with which event. Pure logic with an injectable clock."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from nomad_client.durations import SECOND, format_duration
from nomad_client.structs.models import EVENT_NOT_RESTARTING, EVENT_RESTARTING, EVENT_TERMINATED

NS = SECOND  # nanoseconds in a second: policy durations are nanoseconds
REASON_WITHIN_POLICY = "Restart within policy"
REASON_NO_RESTARTS = "Policy allows no restarts"
REASON_UNRECOVERABLE = "Error was unrecoverable"


@attrs.frozen
class RestartDecision:
    restart: bool
    delay: float  # seconds
    event_type: str  # Restarting / Not Restarting / Terminated
    reason: str
    fails_task: bool


@attrs.define
class RestartTracker:
    attempts: int
    interval: float
    delay: float
    mode: str
    batch: bool
    clock: Callable[[], float] = time.monotonic
    jitter: Callable[[], float] = random.random
    count: int = 0
    window_start: float | None = None

    @classmethod
    def from_policy(cls, policy: Mapping[str, Any], *, batch: bool, **kw: Any) -> RestartTracker:
        return cls(attempts=int(policy.get("Attempts", 0)),
                   interval=policy.get("Interval", 0) / NS, delay=policy.get("Delay", 0) / NS,
                   mode=policy.get("Mode", "fail"), batch=batch, **kw)

    def next(self, *, exit_ok: bool, start_failed: bool = False, recoverable: bool = True
             ) -> RestartDecision:
        """``exit_ok``: exited with code 0 and no signal (ignored when ``start_failed``)."""
        succeeded = exit_ok and not start_failed
        if self.attempts == 0:
            if succeeded and self.batch:
                return RestartDecision(False, 0, EVENT_TERMINATED, "", False)
            return RestartDecision(False, 0, EVENT_NOT_RESTARTING, REASON_NO_RESTARTS,
                                   not succeeded)
        now = self.clock()
        if self.window_start is None or now - self.window_start > self.interval:
            self.window_start, self.count = now, 0
        self.count += 1
        if start_failed and not recoverable:
            return RestartDecision(False, 0, EVENT_NOT_RESTARTING, REASON_UNRECOVERABLE, True)
        if succeeded and self.batch:
            return RestartDecision(False, 0, EVENT_TERMINATED, "", False)
        if self.count > self.attempts:
            if self.mode == "delay":
                wait = max(0.0, self.interval - (now - self.window_start))
                self.window_start, self.count = now + wait, 0
                return RestartDecision(True, wait, EVENT_RESTARTING,
                                       "Exceeded allowed attempts, applying a delay", False)
            return RestartDecision(
                False, 0, EVENT_NOT_RESTARTING,
                f'Exceeded allowed attempts {self.attempts} in interval '
                f'{format_duration(int(self.interval) * SECOND)} and mode is "fail"', True)
        return RestartDecision(True, self.delay + self.jitter() * self.delay * 0.25,
                               EVENT_RESTARTING, REASON_WITHIN_POLICY, False)
