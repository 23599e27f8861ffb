"""The periodic launcher: launches the children of periodic jobs on their cron schedule
(Nomad's ``PeriodicDispatch``).

One background task, owned here (``start``, stopped by ``close``), sleeps until the earliest
next launch of any active periodic job and is woken early when periodic jobs change
(``notify``). At each tick of a job it registers the child ``<parent>/periodic-<unix launch
time>`` (a copy of the parent without its ``periodic`` block, evaluated with
``TriggeredBy: periodic-job``), exactly once per tick:

* the last launch of each parent is kept in the state store (``periodic_launches``), and a
  schedule never starts before it, so neither a restart nor a wall clock stepped back
  launches a tick twice; the child's ID is derived from the tick, and a tick whose child
  exists is not launched again either;
* ticks missed while the agent was down, or the loop late by more than a tick, are not
  replayed: after a launch the schedule goes on from now (as Nomad);
* ``prohibit_overlap`` skips a tick while a child of the job still runs (or waits to).

``force`` launches a child at once (``<parent>/periodic-<now>``), whatever the overlap rule.
``clock`` (unix seconds) and ``sleep`` are injectable, so a test drives a fake clock across
ticks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from zoneinfo import ZoneInfo

import attrs

from nomad_client.jobspec.cron import CronError, CronSpec, next_launch, parse_cron, parse_time_zone
from nomad_client.server.parent_jobs import (
    RegisterJob,
    child_job,
    children,
    is_live,
    is_periodic,
    is_periodic_active,
)
from nomad_client.server.state import JOBS, PERIODIC_LAUNCHES, StateStore, job_key
from nomad_client.structs.namespaces import job_namespace

log = logging.getLogger(__name__)

TRIGGERED_BY = "periodic-job"

JobStatus = Callable[[Mapping[str, Any]], str]
Sleep = Callable[[float], Awaitable[None]]


class PeriodicError(ValueError):
    """A force launch the job does not allow (Nomad's message)."""


class PeriodicJobNotFound(LookupError):
    pass


def periodic_child_id(parent_id: str, launch: int) -> str:
    return f"{parent_id}/periodic-{launch}"


@attrs.frozen
class Schedule:
    """A periodic job's parsed ``periodic`` block."""

    specs: tuple[CronSpec, ...]
    zone: ZoneInfo
    prohibit_overlap: bool

    @classmethod
    def of(cls, job: Mapping[str, Any]) -> Schedule:
        """``job``'s schedule (``CronError`` for one registration should have refused)."""
        periodic = job["Periodic"]
        texts = [periodic["Spec"]] if periodic.get("Spec") else list(periodic.get("Specs") or ())
        return cls(specs=tuple(parse_cron(t) for t in texts),
                   zone=parse_time_zone(periodic.get("TimeZone")),
                   prohibit_overlap=bool(periodic.get("ProhibitOverlap")))

    def next_after(self, after: float) -> int | None:
        found = next_launch(self.specs, after, self.zone)
        return None if found is None else int(found)


@attrs.define
class _Tracked:
    schedule: Schedule
    next_at: int | None


class PeriodicLauncher:
    def __init__(self, store: StateStore, register: RegisterJob, job_status: JobStatus, *,
                 clock: Callable[[], float] = time.time, sleep: Sleep = asyncio.sleep) -> None:
        self._store = store
        self._register = register
        self._job_status = job_status
        self._clock = clock
        self._sleep = sleep
        self._tracked: dict[str, _Tracked] = {}
        # When each job was last registered (``notify``): its schedule starts there, even
        # if the loop first looks at it a little later.
        self._registered_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the launcher's task (once); a no-op without a running event loop."""
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name="periodic-launcher")

    def start_if_needed(self) -> None:
        """Start the launcher if the store holds an active periodic job (after a restart)."""
        if any(is_periodic_active(job) for job in self._store.values(JOBS)):
            self.start()

    def notify(self, job: Mapping[str, Any]) -> None:
        """``job`` was registered or stopped: if it is periodic, look at the schedules
        again."""
        if is_periodic(job):
            self._registered_at[job_key(job_namespace(job), job["ID"])] = self._clock()
            self.start()
            self._wake.set()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def next_launch(self, job: Mapping[str, Any]) -> int | None:
        """When ``job``'s next child is due (unix seconds), or None."""
        tracked = self._tracked.get(job_key(job_namespace(job), job["ID"]))
        return None if tracked is None else tracked.next_at

    # ---- force -----------------------------------------------------------------------------
    async def force(self, namespace: str, job_id: str) -> tuple[str, int]:
        """Launch a child of the periodic job now: (eval ID, index)."""
        job = self._store.get(JOBS, job_key(namespace, job_id))
        if job is None:
            raise PeriodicJobNotFound("job not found")
        if not is_periodic(job):
            raise PeriodicError("can't force launch non-periodic job")
        if not is_periodic_active(job):
            raise PeriodicError(f'force launch for job "{job_id}" failed: can\'t force run '
                                f'non-tracked job "{job_id}" ({namespace})')
        return await self._launch(job, int(self._clock()))

    # ---- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                due_at = await self._launch_due(self._clock())
            except Exception:
                # One bad pass must not end periodic launches: try again in a while.
                log.exception("periodic launcher: pass failed")
                due_at = int(self._clock()) + 60
            await self._nap(None if due_at is None else due_at - self._clock())

    async def _nap(self, seconds: float | None) -> None:
        """Until ``seconds`` pass (None: forever) or ``notify`` wakes us."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        if seconds is not None:
            waits.append(asyncio.ensure_future(self._sleep(max(seconds, 0.0))))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _launch_due(self, now: float) -> int | None:
        """Launch every job whose tick has come; return the earliest next tick (None: no
        active periodic job has one)."""
        active = {job_key(job_namespace(j), j["ID"]): j for j in self._store.values(JOBS)
                  if is_periodic_active(j)}
        for key in set(self._tracked) - set(active):
            del self._tracked[key]
        for key in set(self._registered_at) - set(active):
            del self._registered_at[key]
        earliest: int | None = None
        for key, job in active.items():
            tracked = self._track(key, job, now)
            if tracked is None:
                continue
            if tracked.next_at is not None and tracked.next_at <= now:
                await self._launch_tick(key, job, tracked, tracked.next_at)
                # Ticks missed meanwhile are not replayed: go on from now.
                tracked.next_at = tracked.schedule.next_after(max(tracked.next_at, now))
            if tracked.next_at is not None and (earliest is None or tracked.next_at < earliest):
                earliest = tracked.next_at
        return earliest

    def _track(self, key: str, job: Mapping[str, Any], now: float) -> _Tracked | None:
        """The job's schedule and next tick; a new or changed schedule starts when the job
        was registered (now, for a job found in the store at start), and never before its
        last launch."""
        try:
            schedule = Schedule.of(job)
        except (CronError, KeyError, TypeError) as exc:
            log.warning("periodic job %s: unusable schedule: %s", job.get("ID"), exc)
            self._tracked.pop(key, None)
            return None
        tracked = self._tracked.get(key)
        registered_at = self._registered_at.pop(key, now)
        if tracked is None or tracked.schedule != schedule:
            start = max(registered_at, self._last_launch(key))
            tracked = self._tracked[key] = _Tracked(schedule, schedule.next_after(start))
        return tracked

    def _last_launch(self, key: str) -> int:
        row = self._store.get(PERIODIC_LAUNCHES, key)
        return int(row["Launch"]) if row else 0

    async def _launch_tick(self, key: str, job: Mapping[str, Any], tracked: _Tracked,
                           tick: int) -> None:
        if tick <= self._last_launch(key):
            return  # launched already (before a restart, or with the clock further on)
        if self._store.get(JOBS, job_key(job_namespace(job),
                                         periodic_child_id(job["ID"], tick))) is not None:
            await self._record_launch(key, job, tick)
            return
        if tracked.schedule.prohibit_overlap and any(
                is_live(child, self._job_status)
                for child in children(self._store.values(JOBS), job)):
            log.info("periodic job %s (namespace %s): skipping the launch at %d: a previous "
                     "child still runs and the job prohibits overlap", job["ID"],
                     job_namespace(job), tick)
            return
        await self._launch(job, tick)
        await self._record_launch(key, job, tick)

    async def _launch(self, job: Mapping[str, Any], launch: int) -> tuple[str, int]:
        child = child_job(job, periodic_child_id(job["ID"], launch), Periodic=None)
        return await self._register(child, triggered_by=TRIGGERED_BY)

    async def _record_launch(self, key: str, job: Mapping[str, Any], tick: int) -> None:
        def record(current: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            if current is not None and current.get("Launch", 0) >= tick:
                return None
            return {"ID": job["ID"], "Namespace": job_namespace(job), "Launch": tick}

        await self._store.write(updates={PERIODIC_LAUNCHES: [(key, record)]})
