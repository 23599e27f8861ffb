"""Parent jobs and the children they launch: the one home of what makes a job a parent
(periodic, or parameterized and not itself dispatched), of deriving a child from its parent,
and of the rule that a job cannot change kind on re-registration.

A parent never runs itself: registering it creates no evaluation and no allocation, and it
shows as ``running`` until it is stopped (as Nomad shows parents). Its children are ordinary
jobs whose ID holds a ``/`` (``<parent>/periodic-<unix>``, ``<parent>/dispatch-<unix>-<hex>``)
and whose ``ParentID`` names it; their workload identities count as the parent's for ACL
policies (``acl_resolver.workload_key``). Pure functions over job dicts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from nomad_client.structs.namespaces import job_namespace

Job = Mapping[str, Any]

# What the server sets on every registration: never copied from a parent to a child.
_SERVER_FIELDS = ("CreateIndex", "ModifyIndex", "JobModifyIndex", "Version", "SubmitTime",
                  "Status", "StatusDescription", "Stop", "Stable")
# Job status of a child that still holds (or waits for) allocations.
_LIVE_STATUSES = frozenset({"pending", "running"})


class RegisterJob(Protocol):
    """How a child is registered (``Server.register_job``): (eval ID, index)."""

    async def __call__(self, job: Mapping[str, Any], *, triggered_by: str
                       ) -> tuple[str, int]: ...


class JobKindChange(ValueError):
    """A re-registration would turn a job into another kind (Nomad refuses these)."""


def is_periodic(job: Job) -> bool:
    return job.get("Periodic") is not None


def is_parameterized(job: Job) -> bool:
    """A parameterized parent (its dispatched children carry the block too, and are not)."""
    return job.get("ParameterizedJob") is not None and not job.get("Dispatched")


def is_parent(job: Job) -> bool:
    """Whether ``job`` only launches children and never runs itself."""
    return is_periodic(job) or is_parameterized(job)


def is_periodic_active(job: Job) -> bool:
    """Whether the periodic launcher launches ``job``'s children on schedule (Nomad's
    IsPeriodicActive): periodic and enabled, not stopped, not a parameterized parent."""
    periodic = job.get("Periodic")
    return (isinstance(periodic, Mapping) and periodic.get("Enabled") is not False
            and not job.get("Stop") and not is_parameterized(job))


def parent_status(job: Job) -> str:
    return "dead" if job.get("Stop") else "running"


def kind_change(previous: Job | None, job: Job) -> str | None:
    """Why ``job`` may not replace ``previous`` (Nomad's messages), or None."""
    if previous is None:
        return None
    if previous.get("Type") != job.get("Type"):
        if is_parent(previous) or is_parent(job):
            return (f"cannot update job from type {previous.get('Type')!r} to "
                    f"{job.get('Type')!r}")
    if is_periodic(previous) != is_periodic(job):
        return ("cannot update periodic job to being non-periodic" if is_periodic(previous)
                else "cannot update non-periodic job to being periodic")
    if is_parameterized(previous) != is_parameterized(job):
        return ("cannot update parameterized job to being non-parameterized"
                if is_parameterized(previous)
                else "cannot update non-parameterized job to being parameterized")
    return None


def child_job(parent: Job, child_id: str, **fields: Any) -> dict[str, Any]:
    """A new child of ``parent``: a copy of it named ``child_id`` with ``ParentID`` set,
    then ``fields`` (e.g. ``Periodic=None``, ``Dispatched=True``) on top."""
    child = {k: copy.deepcopy(v) for k, v in parent.items() if k not in _SERVER_FIELDS}
    child.update(ID=child_id, Name=child_id, ParentID=parent["ID"], **fields)
    return child


def children(jobs: Iterable[Job], parent: Job) -> list[Job]:
    """The children of ``parent`` among ``jobs`` (its namespace's, by ``ParentID``)."""
    namespace, parent_id = job_namespace(parent), parent["ID"]
    return [j for j in jobs if j.get("ParentID") == parent_id and job_namespace(j) == namespace]


def is_live(job: Job, status: Callable[[Job], str]) -> bool:
    """Whether a child still runs, or waits to: its status (``status``) is pending or
    running and it is not stopped."""
    return not job.get("Stop") and status(job) in _LIVE_STATUSES
