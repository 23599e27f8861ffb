"""Rolling updates: a job's new version replaces the allocations whose group it changed, at
most ``update.max_parallel`` at a time (Nomad's ``update`` block, without deployments or
canaries).

Two parts. ``outdated`` and ``replace_allowance`` are pure: which live allocations a new
version must replace (their group differs in more than count and rollout settings), and how
many of them one evaluation may replace. Both sides of that comparison are canonical: an
allocation carries its job as the agent that placed it filled it in, so its stored job is
filled again by today's canonicalizer (``CanonicalGroups``, cached per stored version) before
its group is compared, and a default added since is no change.

``RollingUpdates`` owns one background task per job being rolled: after an evaluation
replaced a batch, it waits until every allocation that evaluation placed has been running for
``min_healthy_time``, then asks for the next batch (an evaluation triggered by
``rolling-update``). When a batch is not healthy within ``healthy_deadline`` (or one of it
fails) it gives up: the remaining old allocations stay. It sleeps on the store's changes and
the clock, never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from nomad_client.jobspec import canonicalize_job
from nomad_client.server.job_versions import job_modify_index
from nomad_client.structs.jobs import iter_groups
from nomad_client.structs.models import DESIRED_RUN, Allocation

log = logging.getLogger(__name__)

ROLLING_TRIGGER = "rolling-update"
UPDATING = "alloc is being updated due to job update"
# Evaluations that may start replacing: a new version, or the next batch of a rollout.
_STARTS = frozenset({"job-register", ROLLING_TRIGGER})
# Group fields a running allocation does not depend on: a change to them replaces nothing.
_NOT_DESTRUCTIVE = frozenset({"Count", "Update", "Migrate", "Scaling", "ReschedulePolicy",
                              "Spreads", "Affinities", "Constraints", "Meta"})
# A wait on the store is cut at this many seconds, to look at the clock again.
_STORE_WAIT = 5.0
_NS = 1e9

Evaluate = Callable[[str, str, str], Awaitable[tuple[str, int]]]
# What is compared of a job: the running part of each of its groups, by group name.
RunningGroups = Mapping[str, Mapping[str, Any]]
# How many stored job versions ``CanonicalGroups`` keeps: a pass over one job's allocations
# meets a few versions at most (those of a rollout in progress).
CANONICAL_CACHE_SIZE = 64


def _group(job: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return next((g for g in iter_groups(job) if g.get("Name") == name), None)


def _running_part(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in _NOT_DESTRUCTIVE}


def update_strategy(job: Mapping[str, Any], group: str) -> Mapping[str, Any] | None:
    """The group's ``Update`` when it rolls (service and system jobs with ``max_parallel``
    above zero), else None: its allocations are then never replaced."""
    found = _group(job, group)
    update = (found or {}).get("Update")
    if job.get("Type") not in ("service", "system") or not isinstance(update, Mapping):
        return None
    return update if int(update.get("MaxParallel") or 0) > 0 else None


def outdated(job: Mapping[str, Any], live: Iterable[Allocation],
             canonical: CanonicalGroups | None = None) -> list[Allocation]:
    """The live allocations ``job`` must replace: its group rolls and differs from the one
    they run in (both canonical, through ``canonical``) in more than count and rollout
    settings. In index order."""
    canonical = CANONICAL_GROUPS if canonical is None else canonical
    new_groups: RunningGroups | None = None  # filled once, when a group is compared
    found = []
    for alloc in live:
        if update_strategy(job, alloc.task_group) is None:
            continue
        if new_groups is None:
            new_groups = canonical.of_new(job)
        new = new_groups.get(alloc.task_group)
        old = canonical.of_stored(alloc.job).get(alloc.task_group)
        if new is not None and old is not None and new != old:
            found.append(alloc)
    return sorted(found, key=lambda a: (a.task_group, a.index))


class CanonicalGroups:
    """The running part of each group of a job, as ``canonicalize`` (the register path's
    canonicalizer) fills it in.

    A stored job (an allocation's) is canonicalized once per version: the cache is keyed by
    what the server set when it stored that version (namespace, ID, ``Version``, job modify
    index, ``SubmitTime``) and keeps the ``size`` most recently used. A stored job without
    those is filled on every call. A job that no longer canonicalizes (refused by a newer
    validation) is compared as stored, and that is logged once per version: the scheduler
    never fails on an old allocation. The new job's markers come from whoever sent it (a
    plan may carry an older version's), so it is never cached."""

    def __init__(self, size: int = CANONICAL_CACHE_SIZE,
                 canonicalize: Callable[[Mapping[str, Any]], Mapping[str, Any]]
                 = canonicalize_job) -> None:
        self._size = size
        self._canonicalize = canonicalize
        self._stored: OrderedDict[tuple[Any, ...], RunningGroups] = OrderedDict()
        # A plan's dry run schedules in a worker thread while the server's passes run on
        # the loop; the lock only guards the dict, held for no more than a lookup.
        self._lock = threading.Lock()

    def of_new(self, job: Mapping[str, Any]) -> RunningGroups:
        return self._fill(job)

    def of_stored(self, job: Mapping[str, Any]) -> RunningGroups:
        key = _stored_version(job)
        if key is None:
            return self._fill(job)
        with self._lock:
            found = self._stored.get(key)
            if found is not None:
                self._stored.move_to_end(key)
                return found
        # Filled outside the lock: two passes may both fill a version, never wait on one.
        found = self._fill(job)
        with self._lock:
            self._stored[key] = found
            self._stored.move_to_end(key)
            while len(self._stored) > self._size:
                self._stored.popitem(last=False)
        return found

    def _fill(self, job: Mapping[str, Any]) -> RunningGroups:
        try:
            filled = self._canonicalize(job)
        except Exception as err:  # whatever the reason: compare the job as stored
            # Only the error's kind: its text may quote the job's values (env, config).
            log.debug("job %s (namespace %s) version %s no longer canonicalizes (%s); its "
                      "groups are compared as stored", job.get("ID"), job.get("Namespace"),
                      job.get("Version"), type(err).__name__)
            filled = job
        return {g["Name"]: _running_part(g) for g in iter_groups(filled)
                if isinstance(g, Mapping) and isinstance(g.get("Name"), str)}


def _stored_version(job: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """What names one stored version of a job (the server set it), or None."""
    try:
        modify_index = job_modify_index(job)
    except (TypeError, ValueError):
        return None
    # Older rows may lack a Version or SubmitTime; the modify index alone names a version
    # within one server, the submit time sets apart servers sharing a process (tests).
    key = (job.get("Namespace") or "default", job.get("ID"), job.get("Version"), modify_index,
           job.get("SubmitTime"))
    if not modify_index or not isinstance(key[1], str) \
            or not all(isinstance(part, str | int | None) for part in key):
        return None
    return key


# The scheduler's: one server per agent, and its stored versions are named uniquely.
CANONICAL_GROUPS = CanonicalGroups()


def replace_allowance(job: Mapping[str, Any], triggered_by: str) -> dict[str, int]:
    """How many outdated allocations of each group one evaluation may replace."""
    if triggered_by not in _STARTS:
        return {}
    allowance = {}
    for group in iter_groups(job):
        update = update_strategy(job, group["Name"])
        if update is not None:
            allowance[group["Name"]] = int(update["MaxParallel"])
    return allowance


@attrs.frozen
class Batch:
    """What one evaluation of a rollout did: the allocations it placed, and whether older
    ones are still left to replace."""

    namespace: str
    job_id: str
    eval_id: str
    min_healthy_ns: int
    healthy_deadline_ns: int
    remaining: bool
    # When the batch was placed (the clock's seconds): its deadline runs from then.
    placed_at: float = 0.0


def batch_of(job: Mapping[str, Any], eval_id: str, replaced: Sequence[Allocation],
             remaining: int) -> Batch:
    """The rollout step an evaluation made; its timing is the strictest of its groups'."""
    updates = [u for u in (update_strategy(job, a.task_group) for a in replaced) if u]
    return Batch(namespace=str(job.get("Namespace") or "default"), job_id=job["ID"],
                 eval_id=eval_id,
                 min_healthy_ns=max((int(u["MinHealthyTime"]) for u in updates), default=0),
                 healthy_deadline_ns=min((int(u["HealthyDeadline"]) for u in updates),
                                         default=0),
                 remaining=remaining > 0)


class RollingUpdates:
    """The rollouts in progress, one task per job. ``allocs`` reads the job's allocations,
    ``wait_for_allocs(min_index, wait)`` blocks until allocations change, ``evaluate`` asks
    for the next batch; ``clock`` and ``sleep`` time health."""

    def __init__(self, allocs: Callable[[str, str], list[Allocation]],
                 wait_for_allocs: Callable[[int, float], Awaitable[int]],
                 evaluate: Evaluate, *, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self._allocs = allocs
        self._wait_for_allocs = wait_for_allocs
        self._evaluate = evaluate
        self._clock = clock
        self._sleep = sleep
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._batches: dict[tuple[str, str], Batch] = {}
        # Rollouts taken over by a newer version, held until their cancellation has run.
        self._ending: set[asyncio.Task[None]] = set()

    def after_evaluation(self, batch: Batch, triggered_by: str, replaced: bool) -> None:
        """An evaluation of the job finished. A batch it replaced is followed (a new version
        takes over from a rollout in progress); one of the rollout's own is its next step."""
        key = (batch.namespace, batch.job_id)
        batch = attrs.evolve(batch, placed_at=self._clock())
        if triggered_by == ROLLING_TRIGGER and key in self._tasks:
            self._batches[key] = batch
            return
        if not replaced:
            return
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
            self._ending.add(old)
            old.add_done_callback(self._ending.discard)
        self._batches[key] = batch
        self._tasks[key] = asyncio.create_task(self._roll(key), name=f"rolling {key}")

    def rolling(self, namespace: str, job_id: str) -> bool:
        return (namespace, job_id) in self._tasks

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._ending]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _roll(self, key: tuple[str, str]) -> None:
        try:
            while True:
                batch = self._batches[key]
                if not await self._healthy(batch):
                    log.warning("rolling update of job %s (namespace %s) stopped: its new "
                                "allocations were not healthy in time", key[1], key[0])
                    return
                if not batch.remaining:
                    return
                await self._evaluate(key[1], ROLLING_TRIGGER, key[0])
                if self._batches[key] is batch:
                    return  # the evaluation replaced nothing more (the job went away)
        except Exception:
            log.exception("rolling update of job %s (namespace %s) failed", key[1], key[0])
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]
                self._batches.pop(key, None)

    async def _healthy(self, batch: Batch) -> bool:
        """Wait until every allocation ``batch`` placed has run for its minimum healthy time
        (True), or the deadline passes or one of them fails (False)."""
        deadline = batch.placed_at + batch.healthy_deadline_ns / _NS
        running_since: dict[str, float] = {}
        index = 0
        while True:
            now = self._clock()
            placed = [a for a in self._allocs(batch.namespace, batch.job_id)
                      if a.eval_id == batch.eval_id]
            if any(a.client_terminal() or a.desired_status != DESIRED_RUN for a in placed):
                return False
            for alloc in placed:
                if alloc.client_status == "running":
                    running_since.setdefault(alloc.id, now)
                else:
                    running_since.pop(alloc.id, None)
            healthy_at = max((running_since.get(a.id, now) for a in placed), default=now) \
                + batch.min_healthy_ns / _NS
            if len(running_since) == len(placed) and now >= healthy_at:
                return True
            if now >= deadline:
                return False
            wake = min(deadline, healthy_at) if len(running_since) == len(placed) else deadline
            index = await self._wait(index, wake - now)

    async def _wait(self, index: int, seconds: float) -> int:
        """Until the allocations change or ``seconds`` pass on the clock; the new index."""
        changed = asyncio.ensure_future(self._wait_for_allocs(index, _STORE_WAIT))
        slept = asyncio.ensure_future(self._sleep(max(seconds, 0.0)))
        try:
            await asyncio.wait((changed, slept), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (changed, slept):
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
        if changed.done() and not changed.cancelled() and changed.exception() is None:
            return changed.result()
        return index
