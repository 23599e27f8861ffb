"""Job scaling on the server: the ``scale`` action, scale status, scaling events and the
scaling policies of group ``scaling`` blocks (Nomad's ``Job.Scale``, ``Job.ScaleStatus`` and
``Scaling.*`` RPCs).

Policies live in their job, in the group's ``Scaling`` object (Nomad's API job shows them
there too): registration gives each its ``ID``, ``Target`` and indexes, keeping the ID (and
CreateIndex) of the same group's policy in the previous version, so a re-registered job's
policies keep their IDs (``with_scaling_policies``). Listing policies reads the jobs.

A scale with a count writes a new job version with that count (one row update, so the
bounds are checked against the job as it is under the write lock), evaluates it (a parent
job is never evaluated) and records a scaling event; one without a count (``Error: true`` or
a message) records only the event. Events are kept per job and group, newest first, the
latest ``MAX_SCALING_EVENTS`` of each (as Nomad).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs

from nomad_client.server.job_versions import (
    DEFAULT_TRACKED_VERSIONS,
    job_modify_index,
    versioned,
    with_version,
)
from nomad_client.server.state import JOB_VERSIONS, JOBS, SCALING_EVENTS, StateStore, job_key
from nomad_client.structs.jobs import iter_groups
from nomad_client.structs.models import ALLOC_RUNNING, Allocation
from nomad_client.structs.namespaces import job_namespace

MAX_SCALING_EVENTS = 20
HORIZONTAL = "horizontal"

# (job ID, triggered by, namespace) -> (eval ID, index); "" for a job that is not evaluated.
Evaluate = Callable[[str, str, str], Awaitable[tuple[str, int]]]


class ScalingError(ValueError):
    """A scale request that cannot be done as asked (Nomad's message)."""


class JobNotFound(LookupError):
    """The job to scale does not exist."""


@attrs.frozen
class ScaleRequest:
    """One ``POST /v1/job/:id/scale``; ``count`` None records an event only.
    ``job_modify_index`` > 0: only if the job's JobModifyIndex is still that."""

    group: str
    count: int | None = None
    message: str = ""
    error: bool = False
    meta: Mapping[str, Any] | None = None
    job_modify_index: int = 0


@attrs.frozen
class ScaleResult:
    eval_id: str
    eval_create_index: int
    job_modify_index: int
    index: int  # of the write that recorded the scaling event


def with_scaling_policies(previous: Mapping[str, Any] | None, job: dict[str, Any],
                          index: int) -> dict[str, Any]:
    """``job`` with each group's ``Scaling`` given its ID, Target and indexes: the ID and
    CreateIndex of the previous version's policy of the same group, else new ones; the
    ModifyIndex moves only when the policy itself changed. Called under the write lock."""
    before = {g["Name"]: g.get("Scaling") for g in iter_groups(previous or {})}
    groups = []
    for group in job.get("TaskGroups") or ():
        scaling = group.get("Scaling")
        if isinstance(scaling, Mapping):
            old = before.get(group["Name"])
            policy = {**scaling, "Target": {"Namespace": job_namespace(job), "Job": job["ID"],
                                            "Group": group["Name"]}}
            if isinstance(old, Mapping) and old.get("ID"):
                policy.update(ID=old["ID"], CreateIndex=old.get("CreateIndex", index),
                              ModifyIndex=old.get("ModifyIndex", index))
                if _policy_content(policy) != _policy_content(old):
                    policy["ModifyIndex"] = index
            else:
                policy.update(ID=str(uuid.uuid4()), CreateIndex=index, ModifyIndex=index)
            group = {**group, "Scaling": policy}
        groups.append(group)
    return {**job, "TaskGroups": groups}


def _policy_content(policy: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(policy.get(k) for k in ("Type", "Target", "Policy", "Min", "Max", "Enabled"))


def policy_stub(policy: Mapping[str, Any]) -> dict[str, Any]:
    return {k: policy.get(k) for k in ("ID", "Enabled", "Type", "Target", "CreateIndex",
                                       "ModifyIndex")}


def policy_view(policy: Mapping[str, Any]) -> dict[str, Any]:
    return {k: policy.get(k) for k in ("ID", "Type", "Target", "Policy", "Min", "Max",
                                       "Enabled", "CreateIndex", "ModifyIndex")}


def job_policies(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The scaling policies of ``job``'s groups (none for a child job: children are not
    scaled by autoscalers, and share their parent's blocks)."""
    if job.get("ParentID"):
        return []
    return [dict(g["Scaling"]) for g in iter_groups(job)
            if isinstance(g.get("Scaling"), Mapping) and g["Scaling"].get("ID")]


class JobScaler:
    """Scales jobs of ``store``; ``evaluate`` runs the scheduler for a job after its count
    changed."""

    def __init__(self, store: StateStore, evaluate: Evaluate,
                 clock_ns: Callable[[], int] = time.time_ns, *,
                 tracked_versions: int = DEFAULT_TRACKED_VERSIONS) -> None:
        self._store = store
        self._evaluate = evaluate
        self._clock_ns = clock_ns
        self._tracked_versions = tracked_versions

    # ---- reads ---------------------------------------------------------------------------
    def events(self, namespace: str, job_id: str) -> Mapping[str, list[dict[str, Any]]]:
        row = self._store.get(SCALING_EVENTS, job_key(namespace, job_id))
        return (row or {}).get("ScalingEvents") or {}

    def status(self, job: Mapping[str, Any], allocs: Iterable[Allocation]) -> dict[str, Any]:
        """Nomad's JobScaleStatus of ``job`` given its allocations."""
        events = self.events(job_namespace(job), job["ID"])
        groups: dict[str, dict[str, Any]] = {
            g["Name"]: {"Desired": g.get("Count", 0), "Placed": 0, "Running": 0, "Healthy": 0,
                        "Unhealthy": 0, "Events": events.get(g["Name"]) or None}
            for g in iter_groups(job)}
        for alloc in allocs:
            counts = groups.get(alloc.task_group)
            if counts is None or alloc.terminal():
                continue
            counts["Placed"] += 1
            if alloc.client_status == ALLOC_RUNNING:
                counts["Running"] += 1
            # Healthy/Unhealthy come from deployments, which this agent does not run.
        return {"JobID": job["ID"], "Namespace": job_namespace(job),
                "JobCreateIndex": job.get("CreateIndex", 0),
                "JobModifyIndex": job.get("ModifyIndex", 0),
                "JobStopped": bool(job.get("Stop")), "TaskGroups": groups}

    def policies(self, jobs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Every scaling policy of ``jobs``, by ID."""
        found = [p for job in jobs for p in job_policies(job)]
        return sorted(found, key=lambda p: p["ID"])

    def policy(self, policy_id: str) -> dict[str, Any] | None:
        for job in self._store.values(JOBS):
            for policy in job_policies(job):
                if policy["ID"] == policy_id:
                    return policy
        return None

    # ---- the scale action ------------------------------------------------------------------
    async def scale(self, namespace: str, job_id: str, request: ScaleRequest) -> ScaleResult:
        """Scale ``request.group`` of the job (``JobNotFound``, ``ScalingError``)."""
        key = job_key(namespace, job_id)
        previous_count = 0

        def check(current: dict[str, Any] | None) -> int:
            """The group's count in ``current``, if the request may scale it."""
            if current is None:
                raise JobNotFound(f'job "{job_id}" not found')
            # As Nomad: the index of the job's last version, not of its last write.
            if 0 < request.job_modify_index != job_modify_index(current):
                raise ScalingError(
                    f"Enforcing job modify index {request.job_modify_index}: job exists with "
                    f"conflicting job modify index: {job_modify_index(current)}")
            group = next((g for g in iter_groups(current) if g["Name"] == request.group),
                         None)
            if group is None:
                raise ScalingError(f'task group "{request.group}" specified for scaling does '
                                   "not exist in job")
            return int(group.get("Count", 0))

        def rescale(current: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            nonlocal previous_count
            previous_count = check(current)
            assert current is not None and request.count is not None
            _check_bounds(current, request.group, request.count)
            groups = [{**g, "Count": request.count} if g["Name"] == request.group else g
                      for g in iter_groups(current)]
            # A new version (``job_versions``), as any change of the job, kept in its history.
            scaled[:] = [current, versioned(current, {**current, "TaskGroups": groups,
                                                      "SubmitTime": self._clock_ns()}, index)]
            return scaled[1]

        def record(history: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            return (with_version(history, scaled[0], scaled[1], self._tracked_versions)
                    if scaled else None)

        scaled: list[dict[str, Any]] = []  # [previous, scaled] once rescaled
        eval_id, eval_index = "", 0
        if request.count is None:
            previous_count = check(self._store.get(JOBS, key))
        else:
            await self._store.write(updates={JOBS: [(key, rescale)],
                                             JOB_VERSIONS: [(key, record)]})
            eval_id, eval_index = await self._evaluate(job_id, "job-scaling", namespace)
        job = self._store.get(JOBS, key)
        if job is None:  # purged right after it was scaled
            raise JobNotFound(f'job "{job_id}" not found')
        event_index = await self._record_event(key, request, previous_count, eval_id)
        return ScaleResult(eval_id=eval_id, eval_create_index=eval_index,
                           job_modify_index=job_modify_index(job), index=event_index)

    async def _record_event(self, key: str, request: ScaleRequest, previous_count: int,
                            eval_id: str) -> int:
        event = {"Time": self._clock_ns(), "Count": request.count,
                 "PreviousCount": previous_count, "Message": request.message,
                 "Error": request.error, "Meta": dict(request.meta or {}) or None,
                 "EvalID": eval_id or None}

        def add(current: dict[str, Any] | None, index: int) -> dict[str, Any]:
            by_group = dict((current or {}).get("ScalingEvents") or {})
            newest = [{**event, "CreateIndex": index}, *by_group.get(request.group, ())]
            by_group[request.group] = newest[:MAX_SCALING_EVENTS]
            return {"ScalingEvents": by_group}

        return await self._store.write(updates={SCALING_EVENTS: [(key, add)]})


def _check_bounds(job: Mapping[str, Any], group_name: str, count: int) -> None:
    if job.get("Type") == "system" and count > 1:
        raise ScalingError('jobs of type "system" can only be scaled between 0 and 1')
    for group in iter_groups(job):
        scaling = group.get("Scaling")
        if group["Name"] != group_name or not isinstance(scaling, Mapping):
            continue
        low, high = scaling.get("Min"), scaling.get("Max")
        if isinstance(low, int) and count < low:
            raise ScalingError(f"group count was less than scaling policy minimum: {count} < "
                               f"{low}")
        if isinstance(high, int) and count > high:
            raise ScalingError(f"group count was greater than scaling policy maximum: {count} "
                               f"> {high}")
