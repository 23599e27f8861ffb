"""A job's summary (Nomad's ``JobSummary``), computed from what the store holds now.

Nomad keeps the summary as a table updated with every allocation change; here it is derived
on each read, so it can never drift from the allocations: each allocation counts once, under
its client status, in its group, and ``Queued`` is what the job's latest evaluation could
not place. ``Children`` counts the jobs a parent (periodic or parameterized) launched, by
status; every job has it, zeros for one that launches none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nomad_client.server.parent_jobs import Job
from nomad_client.structs.models import Allocation, Evaluation
from nomad_client.structs.namespaces import job_namespace

# Client status -> the summary's counter for it.
_COUNTERS = {"pending": "Starting", "running": "Running", "complete": "Complete",
             "failed": "Failed", "lost": "Lost", "unknown": "Unknown"}
_GROUP_FIELDS = ("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown")
# A child's job status -> the parent's Children counter for it.
_CHILD_COUNTERS = {"pending": "Pending", "running": "Running", "dead": "Dead"}


def job_summary(job: Job, allocs: Iterable[Allocation], latest_eval: Evaluation | None,
                children: Iterable[Job], status: Callable[[Job], str]) -> dict[str, Any]:
    """``job``'s summary: ``allocs`` are the job's, ``latest_eval`` its newest evaluation,
    ``children`` its children (a parent's), ``status`` how a child's status is told."""
    groups: dict[str, dict[str, int]] = {
        group["Name"]: dict.fromkeys(_GROUP_FIELDS, 0) for group in job.get("TaskGroups") or ()}
    modify_index = job.get("ModifyIndex", 0)
    for alloc in allocs:
        counters = groups.setdefault(alloc.task_group, dict.fromkeys(_GROUP_FIELDS, 0))
        counter = _COUNTERS.get(alloc.client_status)
        if counter is not None:
            counters[counter] += 1
        modify_index = max(modify_index, alloc.alloc_modify_index, alloc.modify_index)
    if latest_eval is not None:
        for group, queued in latest_eval.queued_allocations.items():
            groups.setdefault(group, dict.fromkeys(_GROUP_FIELDS, 0))["Queued"] = queued
    summary: dict[str, Any] = {
        "JobID": job["ID"], "Namespace": job_namespace(job), "Summary": groups,
        "Children": _children_summary(children, status),
        "CreateIndex": job.get("CreateIndex", 0), "ModifyIndex": modify_index}
    return summary


def _children_summary(children: Iterable[Mapping[str, Any]],
                      status: Callable[[Job], str]) -> dict[str, int]:
    counts = {"Pending": 0, "Running": 0, "Dead": 0}
    for child in children:
        counts[_CHILD_COUNTERS.get(status(child), "Dead")] += 1
    return counts
