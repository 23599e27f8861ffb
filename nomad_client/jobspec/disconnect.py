"""A group's ``disconnect`` block, as Nomad's Canonicalize and Validate treat it: what the
servers do with the group's allocations while their node is not heard from (``lost_after``,
``replace``), which copy runs on when it comes back (``reconcile``), and how long a client
without servers keeps them (``stop_on_client_after``).

A group without the block gets none (Nomad's defaults apply where it is read); a written
block gets ``Replace`` true and ``Reconcile`` ``best_score`` unless it says otherwise.
Durations are nanoseconds. ``canonical`` calls in here for every job. Pure computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nomad_client.jobspec.errors import short_repr
from nomad_client.jobspec.walk import object_groups

RECONCILE_OPTIONS = ("best_score", "longest_running", "keep_original", "keep_replacement")
_STOP_AFTER_TYPES = ("service", "batch")
_MAX_NS = 2**63 - 1


def fill_disconnect(job: dict[str, Any]) -> None:
    for group in object_groups(job):
        block = group.get("Disconnect")
        if not isinstance(block, dict):
            continue  # absent (None), or not an object: validation says so
        if block.get("LostAfter") is None:
            block["LostAfter"] = 0
        if block.get("Replace") is None:
            block["Replace"] = True
        if not block.get("Reconcile"):
            block["Reconcile"] = "best_score"
        block.setdefault("StopOnClientAfter", None)


def disconnect_problems(job: Mapping[str, Any]) -> list[str]:
    """Every problem of a filled job's ``disconnect`` blocks, each as ``where: message``."""
    problems: list[str] = []
    for group in object_groups(job):
        block = group.get("Disconnect")
        if block is None:
            continue
        where = f"group {group.get('Name')!r} disconnect"
        problems.extend(f"{where}: {p}" for p in _problems(block, job.get("Type")))
    return problems


def _duration(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_NS


def _problems(block: Any, job_type: Any) -> list[str]:
    """Nomad's DisconnectStrategy.Validate, with its texts."""
    if not isinstance(block, dict):
        return ["Disconnect must be an object"]
    lost_after: Any = block.get("LostAfter")
    stop_after: Any = block.get("StopOnClientAfter")
    problems = []
    if not _duration(lost_after):
        return [f"LostAfter must be a duration in nanoseconds, got {short_repr(lost_after)}"]
    if stop_after is not None and not _duration(stop_after):
        return ["StopOnClientAfter must be a duration in nanoseconds, got "
                f"{short_repr(stop_after)}"]
    if not isinstance(block.get("Replace"), bool):
        problems.append(f"Replace must be true or false, got {short_repr(block.get('Replace'))}")
    if stop_after is not None:
        if stop_after < 0:
            problems.append("stop_after cannot be a negative duration")
        if job_type not in _STOP_AFTER_TYPES:
            problems.append("stop_after can only be used with service or batch job types")
    if lost_after < 0:
        problems.append("lost_after cannot be a negative duration")
    if stop_after is not None and lost_after != 0:
        problems.append("Disconnect cannot be configured with both lost_after and stop_after")
    reconcile = block.get("Reconcile")
    if reconcile not in RECONCILE_OPTIONS:
        shown = reconcile if isinstance(reconcile, str) else short_repr(reconcile)
        problems.append(f"reconcile option is invalid: {shown}")
    return problems
