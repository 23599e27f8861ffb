"""Read-only accessors over a canonical job dict (Nomad's API JSON for a job).

The scheduler and the runners use these instead of indexing the dict all over the code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

Job = Mapping[str, Any]


def task_group(job: Job, name: str) -> Mapping[str, Any]:
    for group in job.get("TaskGroups") or ():
        if group["Name"] == name:
            return group
    raise KeyError(f"job {job.get('ID')!r} has no task group {name!r}")


def tasks(job: Job, group_name: str) -> list[Mapping[str, Any]]:
    return list(task_group(job, group_name).get("Tasks") or ())


def iter_groups(job: Job) -> Iterator[Mapping[str, Any]]:
    yield from job.get("TaskGroups") or ()


def is_batch(job: Job) -> bool:
    return job.get("Type") in ("batch", "sysbatch")
