"""A job plan (``POST /v1/job/:id/plan``): the scheduler's dry run for a job as submitted,
against the current state, writing nothing.

``dry_run`` runs the same placement the server runs on registration (``scheduler.plan_job``)
and counts, per task group, what it would do (Nomad's ``DesiredUpdates``); ``job_diff`` gives
the difference from the registered version in Nomad's ``JobDiff`` shape. The diff is generic:
maps become objects, scalars fields, lists of scalars one field per element, lists of maps one
object per element (matched by name where they have one).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from nomad_client.server.parent_jobs import is_parent
from nomad_client.server.rolling import replace_allowance
from nomad_client.server.scheduler import PlacementPlan, plan_job
from nomad_client.structs.jobs import iter_groups
from nomad_client.structs.models import DESIRED_RUN, Allocation, AllocMetric, Node

ADDED, DELETED, EDITED, NONE = "Added", "Deleted", "Edited", "None"
UPDATE_KINDS = ("Ignore", "Place", "Migrate", "Stop", "InPlaceUpdate", "DestructiveUpdate",
                "Canary", "Preemptions", "Disconnect", "Reconnect", "RescheduleNow",
                "RescheduleLater")
# Bookkeeping the server sets: never a difference the submitter made.
_JOB_BOOKKEEPING = frozenset({
    "ID", "TaskGroups", "Status", "StatusDescription", "Version", "Stable", "CreateIndex",
    "ModifyIndex", "JobModifyIndex", "SubmitTime", "Stop"})
_NESTED_BOOKKEEPING = frozenset({"ID", "CreateIndex", "ModifyIndex", "Target"})
# Keys that name an element of a list of objects, so that a reordered list is no change.
_ELEMENT_NAMES = ("Name", "Label", "LTarget", "Attribute", "Destination")


@attrs.frozen
class JobPlan:
    """What ``dry_run`` found; ``annotations`` is None for a parent job, which never runs."""

    annotations: Mapping[str, Mapping[str, int]] | None
    failed_groups: Mapping[str, AllocMetric]
    diff: Mapping[str, Any] | None


def dry_run(job: Mapping[str, Any], previous: Mapping[str, Any] | None, nodes: Sequence[Node],
            existing: Sequence[Allocation], every_alloc: Sequence[Allocation], *,
            with_diff: bool, rng: random.Random | None = None) -> JobPlan:
    """``job`` as it would be registered over ``previous`` (None: a new job); ``existing``
    are the job's allocations, ``every_alloc`` all of them (for the ports they hold)."""
    diff = job_diff(previous, job) if with_diff else None
    if is_parent(job):
        return JobPlan(None, {}, diff)
    # The eval ID is never stored: nothing of this plan is written.
    placement = plan_job(job, "", nodes, existing, every_alloc, rng or random.Random(),
                         replace_allowance(job, "job-register"))
    annotations = desired_updates(job, placement, existing)
    if diff is not None:
        for group in diff["TaskGroups"]:
            group["Updates"] = _group_updates(annotations.get(group["Name"], {}))
    return JobPlan(annotations, placement.failed_groups, diff)


# What the CLI prints beside a task group, for each kind of update.
_UPDATE_NAMES = {"Ignore": "ignore", "Place": "create", "Stop": "destroy", "Migrate": "migrate",
                 "InPlaceUpdate": "in-place update", "DestructiveUpdate": "create/destroy update",
                 "Canary": "canary"}


def _group_updates(counts: Mapping[str, int]) -> dict[str, int] | None:
    updates = {name: counts[kind] for kind, name in _UPDATE_NAMES.items() if counts.get(kind)}
    return updates or None


def desired_updates(job: Mapping[str, Any], placement: PlacementPlan,
                    existing: Sequence[Allocation]) -> dict[str, dict[str, int]]:
    """Per task group, how many allocations the placement leaves alone, places, stops and
    replaces (a replacement is one destructive update, not a stop and a placement)."""
    updates: dict[str, dict[str, int]] = {}

    def bump(group: str, kind: str, by: int = 1) -> None:
        counts = updates.setdefault(group, dict.fromkeys(UPDATE_KINDS, 0))
        counts[kind] += by

    for group in iter_groups(job):
        updates.setdefault(group["Name"], dict.fromkeys(UPDATE_KINDS, 0))
    stopped = {a.id for a in placement.stopped_allocs}
    replaced = {a.id for a in placement.replaced}
    for alloc in existing:
        if alloc.desired_status == DESIRED_RUN and not alloc.client_terminal():
            kind = ("DestructiveUpdate" if alloc.id in replaced
                    else "Stop" if alloc.id in stopped else "Ignore")
            bump(alloc.task_group, kind)
    for group in iter_groups(job):
        # What the group wants placed, placeable or not (Nomad counts both as Place), less
        # the replacements: each is counted once, as its destructive update.
        name = group["Name"]
        wanted = (sum(1 for a in placement.new_allocs if a.task_group == name)
                  + placement.queued.get(name, 0))
        replacing = sum(1 for a in placement.replaced if a.task_group == name)
        bump(name, "Place", max(wanted - replacing, 0))
    return updates


def changes_allocations(annotations: Mapping[str, Mapping[str, int]] | None) -> bool:
    """Whether a plan would create, stop or replace any allocation."""
    return any(counts.get(kind, 0) for counts in (annotations or {}).values()
               for kind in UPDATE_KINDS if kind != "Ignore")


# ---- the diff ----------------------------------------------------------------------------
def job_diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """Nomad's ``JobDiff`` of two jobs (``old`` None: the job is added)."""
    before = old or {}
    fields, objects = _members(_strip(before, _JOB_BOOKKEEPING), _strip(new, _JOB_BOOKKEEPING))
    groups = _named_pairs(before.get("TaskGroups") or [], new.get("TaskGroups") or [])
    group_diffs = [_group_diff(name, a, b) for name, a, b in groups]
    if old is None:
        kind = ADDED
    else:
        kind = EDITED if fields or objects or any(g["Type"] != NONE for g in group_diffs) \
            else NONE
    return {"Type": kind, "ID": new.get("ID", ""), "Fields": fields, "Objects": objects,
            "TaskGroups": group_diffs}


def _group_diff(name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
                ) -> dict[str, Any]:
    skip = _NESTED_BOOKKEEPING | {"Name", "Tasks"}
    fields, objects = _members(_strip(old or {}, skip), _strip(new or {}, skip))
    tasks = []
    for task_name, a, b in _named_pairs((old or {}).get("Tasks") or [],
                                        (new or {}).get("Tasks") or []):
        task_fields, task_objects = _members(_strip(a or {}, skip), _strip(b or {}, skip))
        tasks.append({"Type": _kind(a, b, task_fields or task_objects), "Name": task_name,
                      "Fields": task_fields, "Objects": task_objects, "Annotations": None})
    changed = fields or objects or any(t["Type"] != NONE for t in tasks)
    return {"Type": _kind(old, new, changed), "Name": name,
            "Fields": fields, "Objects": objects, "Tasks": tasks, "Updates": None}


def _kind(old: Any, new: Any, changed: Any) -> str:
    if old is None:
        return ADDED
    if new is None:
        return DELETED
    return EDITED if changed else NONE


def _strip(value: Mapping[str, Any], skip: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k not in skip}


def _named_pairs(old: Sequence[Any], new: Sequence[Any]
                 ) -> list[tuple[str, Any | None, Any | None]]:
    """Elements of two lists of objects paired by name (else by position), in new's order
    then the removed ones."""
    def keyed(items: Sequence[Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for position, item in enumerate(items):
            name = _element_name(item) if isinstance(item, Mapping) else None
            result[name if name is not None and name not in result else f"[{position}]"] = item
        return result

    before, after = keyed(old), keyed(new)
    names = [*after, *(n for n in before if n not in after)]
    return [(name, before.get(name), after.get(name)) for name in names]


def _element_name(item: Mapping[str, Any]) -> str | None:
    for key in _ELEMENT_NAMES:
        if isinstance(item.get(key), str) and item[key]:
            return str(item[key])
    return None


def _members(old: Mapping[str, Any], new: Mapping[str, Any]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The changed fields and objects between two maps, sorted by name as Nomad's are."""
    fields: list[dict[str, Any]] = []
    objects: list[dict[str, Any]] = []
    for key in sorted({*old, *new}):
        a, b = old.get(key), new.get(key)
        if _empty(a) and _empty(b):
            continue
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            objects.extend(_object_diff(key, _as_map(a), _as_map(b)))
        elif _is_object_list(a) or _is_object_list(b):
            for _, x, y in _named_pairs(a or [], b or []):
                objects.extend(_object_diff(key, _as_map(x), _as_map(y)))
        elif isinstance(a, list) or isinstance(b, list):
            objects.extend(_scalar_list_diff(key, a or [], b or []))
        elif a != b:
            fields.append(_field(key, a, b))
    return fields, objects


def _object_diff(name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
                 ) -> list[dict[str, Any]]:
    fields, objects = _members(_strip(old or {}, _NESTED_BOOKKEEPING),
                               _strip(new or {}, _NESTED_BOOKKEEPING))
    if not fields and not objects:
        return []
    return [{"Type": _kind(old, new, True), "Name": name, "Fields": fields,
             "Objects": objects}]


def _scalar_list_diff(name: str, old: Sequence[Any], new: Sequence[Any]
                      ) -> list[dict[str, Any]]:
    before, after = [_text(v) for v in old], [_text(v) for v in new]
    fields = [*({"Type": DELETED, "Name": name, "Old": v, "New": "", "Annotations": None}
                for v in before if v not in after),
              *({"Type": ADDED, "Name": name, "Old": "", "New": v, "Annotations": None}
                for v in after if v not in before)]
    if not fields:
        return []
    kind = ADDED if not before else DELETED if not after else EDITED
    return [{"Type": kind, "Name": name, "Fields": fields, "Objects": []}]


def _field(name: str, old: Any, new: Any) -> dict[str, Any]:
    kind = ADDED if _empty(old) else DELETED if _empty(new) else EDITED
    return {"Type": kind, "Name": name, "Old": _text(old), "New": _text(new),
            "Annotations": None}


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def _as_map(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) and value else None


def _is_object_list(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(v, Mapping) for v in value)


def _text(value: Any) -> str:
    """A scalar as Nomad prints it in a diff (Go's formatting of bools and numbers)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
