"""The groups of a job and the tasks of a group, as the fillers and checks walk them: a job
not yet validated may hold anything, so what is not a list of objects is skipped (the checks
say so)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def object_groups(job: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    groups = job.get("TaskGroups")
    for group in groups if isinstance(groups, list) else ():
        if isinstance(group, dict):
            yield group


def object_tasks(group: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    tasks = group.get("Tasks")
    for task in tasks if isinstance(tasks, list) else ():
        if isinstance(task, dict):
            yield task
