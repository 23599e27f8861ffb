"""Read-only accessors over a canonical job dict (Nomad's API JSON for a job).

The scheduler and the runners use these instead of indexing the dict all over the code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

Job = Mapping[str, Any]

# How many distinct job versions ``share_job`` remembers (the most recently seen).
SHARED_JOBS = 256


class SharedJobs:
    """One copy of each job version for the allocations that carry it: every allocation
    decoded from the wire or from disk holds a whole job, and a count-1000 group would hold
    a thousand equal copies (Nomad's allocations share one job struct per version).

    A job is shared only with one *equal* to it, so sharing never changes what anyone reads;
    it relies on nobody mutating an allocation's job in place (nothing does: job rows and
    allocations are replaced, never edited). Bounded: the ``size`` most recently seen."""

    def __init__(self, size: int = SHARED_JOBS) -> None:
        self._size = size
        self._jobs: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._lock = threading.Lock()  # decoding may run in worker threads

    def share(self, job: dict[str, Any]) -> dict[str, Any]:
        """``job``, or the equal job already held (then ``job`` itself can be dropped)."""
        key = (job.get("Namespace"), job.get("ID"), job.get("Version"),
               job.get("JobModifyIndex"), job.get("ModifyIndex"))
        with self._lock:
            held = self._jobs.pop(key, None)
            if held is not None and held == job:
                job = held
            self._jobs[key] = job  # (re)inserted last: the most recently seen
            if len(self._jobs) > self._size:
                del self._jobs[next(iter(self._jobs))]
        return job


shared_jobs = SharedJobs()


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
