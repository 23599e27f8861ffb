"""Placement: turn a job's desired counts into allocations on feasible nodes.

Pure functions over the records the server hands in; the server applies the result. A node
is feasible for a group when it is ready and eligible, in one of the job's datacenters and
its node pool, has every driver the group's tasks use (detected and healthy), and meets the
job's, group's and tasks' constraints. Placement spreads by picking the node with the fewest
live allocations among those that have room for its ephemeral disk (``disk``) and can give
the group's network ports (``ports``); a node that cannot is exhausted, and the reason is
recorded as Nomad's exhausted dimension. Live allocations the job no longer asks for (its
group is gone, or the group's count shrank below their index) are stopped. An allocation
whose node is disconnected (client status ``unknown``) holds its slot only when its group says
``disconnect { replace = false }``; otherwise a replacement is placed, naming it as its
``PreviousAllocation`` (as does the replacement of a lost one). The caller hands
in the job's own allocations (those of its namespace and ID) and, for the ports and disk they
hold, every allocation; new ones carry the job's namespace.
"""

from __future__ import annotations

import fnmatch
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from nomad_client.server.constraints import check_constraints
from nomad_client.server.disconnect import replaced_while_unknown
from nomad_client.server.disk import DISK_EXHAUSTED, DiskBook, group_disk_mb
from nomad_client.server.ports import PortBook, PortsExhausted
from nomad_client.server.rolling import UPDATING, outdated
from nomad_client.structs.codec import to_api
from nomad_client.structs.jobs import is_batch, iter_groups
from nomad_client.structs.models import (
    ALLOC_LOST,
    DESIRED_RUN,
    DESIRED_STOP,
    NODE_READY,
    Allocation,
    AllocMetric,
    Node,
)
from nomad_client.structs.namespaces import job_namespace
from nomad_client.structs.network import NetworkAsk, group_networks

# Dynamic ports are picked at random so that allocations placed after a restart of the server
# do not all reach for the same ports; tests hand plan_job a seeded one.
_PORT_RANDOM = random.Random()


@attrs.frozen
class PlacementPlan:
    new_allocs: tuple[Allocation, ...]
    stopped_allocs: tuple[Allocation, ...]
    failed_groups: Mapping[str, AllocMetric]
    queued: Mapping[str, int]
    # Of ``stopped_allocs``, those stopped to be replaced by the new version (rolling).
    replaced: tuple[Allocation, ...] = ()
    # Live allocations the new version still has to replace after this pass.
    outdated_left: int = 0


def node_feasibility(job: Mapping[str, Any], group: Mapping[str, Any], node: Node,
                     node_view: Mapping[str, Any]) -> str | None:
    """None if the group may run on the node, else the reason it may not."""
    if node.status != NODE_READY or node.scheduling_eligibility != "eligible" or node.drain:
        return "node not ready"
    dcs = job.get("Datacenters") or ["*"]
    if not any(fnmatch.fnmatchcase(node.datacenter, dc) for dc in dcs):
        return "datacenter"
    if (job.get("NodePool") or "default") not in ("all", node.node_pool):
        return "node pool"
    for task in group.get("Tasks") or ():
        driver = node.drivers.get(task["Driver"])
        if driver is None or not driver.detected or not driver.healthy:
            return f"missing driver {task['Driver']}"
    constraints = [
        *(job.get("Constraints") or ()),
        *(group.get("Constraints") or ()),
        *(c for task in group.get("Tasks") or () for c in task.get("Constraints") or ()),
    ]
    result = check_constraints(constraints, node_view)
    return None if result.ok else result.reason


STOP_NOT_NEEDED = "alloc not needed due to job update"


def _stop(alloc: Allocation, why: str = STOP_NOT_NEEDED) -> Allocation:
    return attrs.evolve(alloc, desired_status=DESIRED_STOP, desired_description=why)


def plan_job(job: Mapping[str, Any], eval_id: str, nodes: Sequence[Node],
             existing: Sequence[Allocation], every_alloc: Iterable[Allocation] = (),
             rng: random.Random | None = None, replace: Mapping[str, int] | None = None
             ) -> PlacementPlan:
    """``existing``: the job's allocations; ``every_alloc``: all allocations (for the host
    ports they hold; ``existing`` is always counted); ``rng`` picks dynamic ports;
    ``replace``: how many outdated allocations of each group to replace now (``rolling``)."""
    live = [a for a in existing if a.desired_status == DESIRED_RUN and not a.client_terminal()]
    if job.get("Stop"):
        return PlacementPlan((), tuple(_stop(a) for a in live), {}, {})

    counts = {g["Name"]: int(g.get("Count", 1)) for g in iter_groups(job)}
    # Allocations on a disconnected node that their group lets be replaced hold no slot
    # (``server.disconnect``); they are neither stopped nor updated while unknown.
    absent = {a.id for a in live if replaced_while_unknown(job, a)}
    # Those the new version has no slot for are stopped; those it changed are replaced, as
    # many as ``replace`` allows (``rolling``).
    surplus = [a for a in live if a.index >= counts.get(a.task_group, 0)]
    surplus_ids = {a.id for a in surplus}
    stale = [a for a in outdated(job, [a for a in live if a.id not in absent])
             if a.id not in surplus_ids]
    replaced = _first_of_each_group(stale, replace or {})
    stopped = {a.id for a in (*surplus, *replaced)}
    batch = is_batch(job)
    load: dict[str, int] = {n.id: 0 for n in nodes}
    for alloc in live:
        if alloc.id not in stopped and alloc.id not in absent:
            load[alloc.node_id] = load.get(alloc.node_id, 0) + 1
    # What a new allocation replaces, by slot: an absent one, or one lost and not yet
    # replaced (Nomad's PreviousAllocation).
    previous = {(a.task_group, a.index): a.id for a in existing
                if a.id in absent or (a.client_status == ALLOC_LOST and not a.next_allocation)}
    node_views = {n.id: to_api(n) for n in nodes}
    # What this plan stops is free for what it places (as Nomad's plan applier counts it).
    everyone = [a for a in {a.id: a for a in (*every_alloc, *existing)}.values()
                if a.id not in stopped]
    ports = PortBook(everyone, rng or _PORT_RANDOM)
    disks = DiskBook(everyone)

    new: list[Allocation] = []
    failed: dict[str, AllocMetric] = {}
    queued: dict[str, int] = {}
    for group in iter_groups(job):
        name = group["Name"]
        # A batch alloc that finished successfully still counts: batch work is not redone.
        taken = {a.index for a in existing
                 if a.task_group == name and a.desired_status == DESIRED_RUN
                 and a.id not in stopped and a.id not in absent
                 and (not a.client_terminal() or (batch and a.client_status == "complete"))}
        missing = [i for i in range(int(group.get("Count", 1))) if i not in taken]
        if not missing:
            continue
        filtered: dict[str, int] = {}
        feasible: list[Node] = []
        for node in nodes:
            reason = node_feasibility(job, group, node, node_views[node.id])
            if reason is None:
                feasible.append(node)
            else:
                filtered[reason] = filtered.get(reason, 0) + 1
        networks = group_networks(group)
        disk_mb = group_disk_mb(group)
        for placed, index in enumerate(missing):
            fit = _first_fit(sorted(feasible, key=lambda n: (load[n.id], n.id)), ports,
                             networks, disks, disk_mb)
            if not isinstance(fit, tuple):
                # Nothing frees up within one pass: the group's other missing allocations
                # fail alike.
                failed[name] = AllocMetric(
                    nodes_evaluated=len(nodes), nodes_filtered=len(nodes) - len(feasible),
                    constraint_filtered=filtered, nodes_available=_count_by_dc(nodes),
                    nodes_exhausted=len(feasible), dimension_exhausted=fit,
                    coalesced_failures=len(missing) - placed - 1)
                queued[name] = len(missing) - placed
                break
            node, resources = fit
            load[node.id] += 1
            new.append(Allocation(
                id=str(uuid.uuid4()), namespace=job_namespace(job),
                eval_id=eval_id, name=f"{job['ID']}.{name}[{index}]", node_id=node.id,
                node_name=node.name, job_id=job["ID"], job=dict(job), task_group=name,
                allocated_resources=resources,
                previous_allocation=previous.get((name, index), "")))
    return PlacementPlan(tuple(new), (*(_stop(a) for a in surplus),
                                      *(_stop(a, UPDATING) for a in replaced)),
                         failed, queued, tuple(replaced), len(stale) - len(replaced))


def _first_of_each_group(allocs: Sequence[Allocation], allowance: Mapping[str, int]
                         ) -> list[Allocation]:
    taken: dict[str, int] = {}
    chosen = []
    for alloc in allocs:
        if taken.get(alloc.task_group, 0) < allowance.get(alloc.task_group, 0):
            taken[alloc.task_group] = taken.get(alloc.task_group, 0) + 1
            chosen.append(alloc)
    return chosen


def _first_fit(candidates: Sequence[Node], ports: PortBook, networks: Sequence[NetworkAsk],
               disks: DiskBook, disk_mb: int) -> tuple[Node, dict[str, Any]] | dict[str, int]:
    """The first of ``candidates`` with room for the group's ephemeral disk that can give
    its ports, with them (now held, as is the disk); else how many nodes each dimension
    exhausted."""
    exhausted: dict[str, int] = {}
    for node in candidates:
        if not disks.fits(node, disk_mb):
            exhausted[DISK_EXHAUSTED] = exhausted.get(DISK_EXHAUSTED, 0) + 1
            continue
        resources = ports.assign(node, networks)
        if not isinstance(resources, PortsExhausted):
            disks.take(node, disk_mb)
            return node, resources
        exhausted[resources.dimension] = exhausted.get(resources.dimension, 0) + 1
    return exhausted


def _count_by_dc(nodes: Sequence[Node]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.datacenter] = counts.get(node.datacenter, 0) + 1
    return counts
