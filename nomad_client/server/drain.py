"""Node scheduling eligibility and drains (``POST /v1/node/:id/eligibility`` and ``/drain``).

An ineligible or draining node gets no new placements (``scheduler.node_feasibility``). A
drain marks its node ineligible, then one watcher task per draining node migrates the
node's live allocations whenever another node could take them (each is stopped with
Nomad's "alloc is being migrated" and its job evaluated, which places the replacement
elsewhere), and completes the drain (``DrainStrategy`` cleared, ``LastDrain`` "complete")
once nothing on the node is left running or its deadline passed. An allocation no other
node could run (none ready and eligible, or none with its datacenter, pool, drivers and
constraints) stays where it is, and the drain completes at its deadline. A batch job's
allocation is left to finish its work until the deadline, as in Nomad. A drain with
``Deadline`` 0 has none; a negative one is due at once, as in Nomad.

The node's drain fields are the server's: a client re-registering keeps them
(``keep_server_fields``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from nomad_client.server.scheduler import node_feasibility
from nomad_client.server.state import StateStore
from nomad_client.structs.codec import to_api
from nomad_client.structs.jobs import iter_groups
from nomad_client.structs.models import (
    DESIRED_RUN,
    DESIRED_STOP,
    Allocation,
    Node,
    parse_rfc3339_ns,
    rfc3339,
)

log = logging.getLogger(__name__)

ELIGIBLE = "eligible"
INELIGIBLE = "ineligible"
MIGRATING = "alloc is being migrated"
DRAIN_TRIGGER = "node-drain"
DRAIN_COMPLETE = "complete"
DRAIN_CANCELED = "canceled"
DRAINING = "draining"
# Go's zero time: a drain without a deadline, as Nomad writes its ForceDeadline.
NO_DEADLINE = "0001-01-01T00:00:00Z"
# How long a watcher sleeps at most between looks when nothing changes (no deadline).
_MAX_WAIT = 60.0
# A deadline is Go's time.Duration, an int64 of nanoseconds: Nomad refuses one beyond it.
_MAX_DEADLINE_NS = 2**63 - 1

Evaluate = Callable[[str, str, str], Awaitable[tuple[str, int]]]


class DrainError(Exception):
    """A request the node's state refuses (e.g. eligible while draining)."""


class UnknownNode(Exception):
    pass


@attrs.frozen
class DrainSpec:
    deadline_ns: int = 3600 * 1_000_000_000
    ignore_system_jobs: bool = False


def keep_server_fields(previous: Node | None, node: Node) -> Node:
    """A client's registration of ``node`` with the server-owned fields of ``previous``."""
    if previous is None:
        return node
    return attrs.evolve(node, scheduling_eligibility=previous.scheduling_eligibility,
                        drain=previous.drain, drain_strategy=previous.drain_strategy,
                        last_drain=previous.last_drain)


class NodeDrainer:
    def __init__(self, store: StateStore, evaluate: Evaluate,
                 reevaluate_queued: Callable[[], Awaitable[None]],
                 clock: Callable[[], float] = time.time,
                 leading: Callable[[], bool] = lambda: True) -> None:
        """``leading``: whether this server leads now; a drain set through another server
        is watched by the leader only (it resumes drains when it takes over)."""
        self._store = store
        self._leading = leading
        self._evaluate = evaluate
        self._reevaluate_queued = reevaluate_queued
        self._clock = clock
        self._watchers: dict[str, asyncio.Task[None]] = {}

    def resume(self) -> None:
        """Watch every node the store says is draining (after a restart)."""
        for node in self._store.values("nodes"):
            if node.drain_strategy is not None:
                self._watch(node.id)

    async def close(self) -> None:
        watchers, self._watchers = list(self._watchers.values()), {}
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    def draining(self, node_id: str) -> bool:
        """Whether a watcher is still working on ``node_id``'s drain."""
        task = self._watchers.get(node_id)
        return task is not None and not task.done()

    # ---- eligibility -------------------------------------------------------------------
    async def set_eligibility(self, node_id: str, eligibility: str) -> int:
        if eligibility not in (ELIGIBLE, INELIGIBLE):
            raise ValueError(f"invalid scheduling eligibility {eligibility!r}")
        self._require(node_id)

        def apply(current: Node | None, index: int) -> Node | None:
            if current is None or current.scheduling_eligibility == eligibility:
                return None
            if eligibility == ELIGIBLE and current.drain_strategy is not None:
                raise DrainError("can not set node's scheduling eligibility to eligible: "
                                 "node has an active drain strategy")
            return attrs.evolve(current, scheduling_eligibility=eligibility)

        index = await self._store.write(updates={"nodes": [(node_id, apply)]})
        if eligibility == ELIGIBLE:
            await self._reevaluate_queued()  # what waited for a node may land here now
        return index

    # ---- drain -------------------------------------------------------------------------
    async def update_drain(self, node_id: str, spec: DrainSpec | None,
                           mark_eligible: bool, *, accessor_id: str = "",
                           meta: Mapping[str, str] | None = None) -> int:
        """Start (or replace) a drain with ``spec``, or cancel one (None). ``accessor_id``
        (the caller's ACL token, "" without one) and ``meta`` go to ``LastDrain``."""
        self._require(node_id)
        now = self._clock()
        if spec is None:
            return await self._finish(node_id, DRAIN_CANCELED,
                                      ELIGIBLE if mark_eligible else None,
                                      accessor_id=accessor_id, meta=meta)
        if abs(spec.deadline_ns) > _MAX_DEADLINE_NS:
            raise DrainError(f"drain deadline {spec.deadline_ns} is out of range: at most "
                             f"{_MAX_DEADLINE_NS} nanoseconds")
        deadline = (now + spec.deadline_ns / 1e9 if spec.deadline_ns > 0
                    else now if spec.deadline_ns < 0 else None)
        strategy = {"DrainSpec": {"Deadline": spec.deadline_ns,
                                  "IgnoreSystemJobs": spec.ignore_system_jobs},
                    "ForceDeadline": rfc3339(deadline) if deadline is not None
                    else NO_DEADLINE,
                    "StartedAt": rfc3339(now)}

        def start(current: Node | None, index: int) -> Node | None:
            if current is None:
                return None
            started = (current.drain_strategy or {}).get("StartedAt", strategy["StartedAt"])
            # A new drain starts a new record; an update of a running one amends it.
            last = None if current.drain_strategy is None else current.last_drain
            return attrs.evolve(
                current, drain=True, scheduling_eligibility=INELIGIBLE,
                drain_strategy={**strategy, "StartedAt": started},
                last_drain=_drain_record(last, DRAINING, started, rfc3339(now), accessor_id,
                                         meta))

        index = await self._store.write(updates={"nodes": [(node_id, start)]})
        if self._leading():
            self._watch(node_id)
        return index

    def _require(self, node_id: str) -> Node:
        node: Node | None = self._store.get("nodes", node_id)
        if node is None:
            raise UnknownNode(f"node {node_id} not found")
        return node

    def _watch(self, node_id: str) -> None:
        """Start the node's watcher unless one runs: a watcher reads the node's drain anew on
        every change of it, and is never cancelled mid-migration (allocations stopped but
        their jobs not yet evaluated would get no replacements)."""
        running = self._watchers.get(node_id)
        if running is None or running.done():
            self._watchers[node_id] = asyncio.create_task(self._run(node_id),
                                                          name=f"drain {node_id}")

    async def _run(self, node_id: str) -> None:
        try:
            while True:
                index = self._store.table_index("allocs", "nodes")
                node: Node | None = self._store.get("nodes", node_id)
                if node is None or node.drain_strategy is None:
                    return
                remaining = self._remaining(node)
                deadline = _force_deadline(node.drain_strategy)
                left = None if deadline is None else deadline - self._clock()
                due = left is not None and left <= 0
                # As in Nomad, a batch allocation may finish its work until the deadline.
                movable = self._placeable_elsewhere(
                    node_id, [a for a in remaining if a.desired_status == DESIRED_RUN
                              and (due or a.job.get("Type") != "batch")])
                if movable:
                    await self._migrate(movable)
                    continue
                if not remaining or due:
                    await self._finish(node_id, DRAIN_COMPLETE, None)
                    return
                await self._store.wait_for_change(
                    ("allocs", "nodes"), index, _MAX_WAIT if left is None
                    else min(left, _MAX_WAIT))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("draining node %s failed", node_id)
        finally:
            if self._watchers.get(node_id) is asyncio.current_task():
                del self._watchers[node_id]

    def _remaining(self, node: Node) -> list[Allocation]:
        """The node's allocations the drain still waits for."""
        ignore_system = (node.drain_strategy or {}).get("DrainSpec", {}).get(
            "IgnoreSystemJobs", False)
        return [a for a in self._store.values("allocs")
                if a.node_id == node.id and not a.client_terminal()
                and not (ignore_system and a.job.get("Type") == "system")]

    def _placeable_elsewhere(self, node_id: str, allocs: list[Allocation]
                             ) -> list[Allocation]:
        """Those of ``allocs`` whose group some other node could run (as Nomad, a migration
        that has nowhere to go leaves its allocation running until the deadline)."""
        if not allocs:
            return []
        others = [(n, to_api(n)) for n in self._store.values("nodes") if n.id != node_id]
        return [alloc for alloc in allocs
                if (group := _group_of(alloc)) is not None
                and any(node_feasibility(alloc.job, group, other, view) is None
                        for other, view in others)]

    async def _migrate(self, allocs: list[Allocation]) -> None:
        def stop(current: Allocation | None, index: int) -> Allocation | None:
            if current is None or current.desired_status != DESIRED_RUN:
                return None
            return attrs.evolve(current, desired_status=DESIRED_STOP,
                                desired_description=MIGRATING, alloc_modify_index=index)

        await self._store.write(updates={"allocs": [(a.id, stop) for a in allocs]})
        for job in sorted({(a.namespace, a.job_id) for a in allocs}):
            await self._evaluate(job[1], DRAIN_TRIGGER, job[0])

    async def _finish(self, node_id: str, status: str, eligibility: str | None, *,
                      accessor_id: str = "", meta: Mapping[str, str] | None = None) -> int:
        now = rfc3339(self._clock())

        def finish(current: Node | None, index: int) -> Node | None:
            if current is None:
                return None
            if current.drain_strategy is None and eligibility is None:
                return None
            changed = attrs.evolve(
                current, drain=False, drain_strategy=None,
                last_drain=_drain_record(current.last_drain, status, now, now, accessor_id,
                                         meta)
                if current.drain_strategy is not None else current.last_drain)
            if eligibility is not None:
                changed = attrs.evolve(changed, scheduling_eligibility=eligibility)
            return changed

        # A cancelled drain's watcher wakes on this write and ends by itself.
        index = await self._store.write(updates={"nodes": [(node_id, finish)]})
        if eligibility == ELIGIBLE:
            await self._reevaluate_queued()
        return index


def _drain_record(last: Mapping[str, Any] | None, status: str, started: str, updated: str,
                  accessor_id: str, meta: Mapping[str, str] | None) -> dict[str, Any]:
    """Nomad's ``DrainMetadata``: ``last`` (the drain's record so far, None for a new drain)
    with ``status``; the caller's accessor and meta replace the recorded ones only when given
    (a drain completing by itself has neither)."""
    last = last or {}
    return {"StartedAt": last.get("StartedAt", started), "Status": status, "UpdatedAt": updated,
            "AccessorID": accessor_id or last.get("AccessorID", ""),
            "Meta": dict(meta) if meta else dict(last.get("Meta") or {})}


def _group_of(alloc: Allocation) -> Mapping[str, Any] | None:
    return next((g for g in iter_groups(alloc.job) if g.get("Name") == alloc.task_group), None)


def _force_deadline(strategy: dict[str, Any]) -> float | None:
    """When the drain is due (unix seconds); None: it has no deadline."""
    text = strategy.get("ForceDeadline", NO_DEADLINE)
    return None if text == NO_DEADLINE else parse_rfc3339_ns(text) / 1e9
