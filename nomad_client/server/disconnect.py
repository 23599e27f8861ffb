"""What becomes of a node's allocations when the node stops heartbeating, and when it comes
back (Nomad's disconnect handling, as of 1.8's group ``disconnect`` block).

Missed heartbeats: an allocation whose group has ``disconnect.lost_after`` is ``unknown``
for that long after its node went quiet (its node is then ``disconnected``); any other,
and one whose window has passed, is ``lost`` and stopped (its node is ``down`` once nothing
on it is unknown). The scheduler replaces lost allocations, and unknown ones unless the group
says ``replace = false``.

Return: a lost allocation was stopped when it was lost, so its client stops it. An unknown
one runs on, unless it was replaced and ``reconcile`` keeps the replacement; when the
original is kept, its replacement is stopped. ``best_score`` and ``longest_running`` keep
the original here: both allocations run the same version, and the original has run longest.

Pure functions over allocations; the server writes what they decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from nomad_client.structs.jobs import iter_groups
from nomad_client.structs.models import (
    ALLOC_LOST,
    ALLOC_PENDING,
    ALLOC_RUNNING,
    ALLOC_UNKNOWN,
    DESIRED_RUN,
    DESIRED_STOP,
    NODE_DISCONNECTED,
    NODE_DOWN,
    TASK_RUNNING,
    Allocation,
)

KEEP_ORIGINAL = "keep_original"
KEEP_REPLACEMENT = "keep_replacement"
BEST_SCORE = "best_score"
LONGEST_RUNNING = "longest_running"
RECONCILE_OPTIONS = (BEST_SCORE, LONGEST_RUNNING, KEEP_ORIGINAL, KEEP_REPLACEMENT)

# Nomad's descriptions.
LOST = "alloc is lost since its node is down"
UNKNOWN = "alloc is unknown since its node is disconnected"
RECONNECTED = "alloc not needed due to disconnected client reconnect"

_NS = 1_000_000_000


@attrs.frozen
class DisconnectPolicy:
    """A group's ``Disconnect``, with Nomad's defaults when it has none."""

    lost_after_ns: int = 0
    replace: bool = True
    reconcile: str = BEST_SCORE

    @classmethod
    def of_group(cls, group: Mapping[str, Any] | None) -> DisconnectPolicy:
        block = (group or {}).get("Disconnect")
        if not isinstance(block, Mapping):
            return cls()
        lost_after = block.get("LostAfter")
        replace = block.get("Replace")
        reconcile = block.get("Reconcile")
        return cls(lost_after_ns=lost_after if isinstance(lost_after, int) else 0,
                   replace=replace if isinstance(replace, bool) else True,
                   reconcile=reconcile if reconcile in RECONCILE_OPTIONS else BEST_SCORE)


def group_of(job: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return next((g for g in iter_groups(job) if g.get("Name") == name), None)


def policy_of(job: Mapping[str, Any], group: str) -> DisconnectPolicy:
    return DisconnectPolicy.of_group(group_of(job, group))


def replaced_while_unknown(job: Mapping[str, Any], alloc: Allocation) -> bool:
    """Whether the scheduler should place a replacement of ``alloc`` (its node is
    disconnected): an unknown allocation whose group allows replacing it."""
    return alloc.client_status == ALLOC_UNKNOWN and policy_of(job, alloc.task_group).replace


@attrs.frozen
class Missed:
    """What a missed heartbeat does: allocations to mark ``unknown`` and ``lost`` (the
    latter also stopped), the node's new status, and when to look again (seconds; None: no
    allocation waits)."""

    unknown: tuple[Allocation, ...]
    lost: tuple[Allocation, ...]
    node_status: str
    recheck_in: float | None


def on_missed(allocs: Iterable[Allocation], disconnected_at: float, now: float, *,
              windows: bool = True) -> Missed:
    """``allocs``: the node's allocations; ``disconnected_at``: when the node went quiet
    (unix seconds). ``windows`` False (an operator marked the node down): every live
    allocation is lost at once."""
    unknown: list[Allocation] = []
    lost: list[Allocation] = []
    recheck: float | None = None
    for alloc in allocs:
        if alloc.desired_status != DESIRED_RUN or alloc.client_terminal():
            continue
        window = policy_of(alloc.job, alloc.task_group).lost_after_ns / _NS if windows else 0
        left = disconnected_at + window - now
        if left > 0:
            unknown.append(alloc)
            recheck = left if recheck is None else min(recheck, left)
        else:
            lost.append(alloc)
    return Missed(tuple(a for a in unknown if a.client_status != ALLOC_UNKNOWN), tuple(lost),
                  NODE_DISCONNECTED if unknown else NODE_DOWN, recheck)


def mark_unknown(alloc: Allocation, modify_time: int) -> Allocation:
    return attrs.evolve(alloc, client_status=ALLOC_UNKNOWN, client_description=UNKNOWN,
                        modify_time=modify_time)


def mark_lost(alloc: Allocation, modify_time: int) -> Allocation:
    return attrs.evolve(alloc, client_status=ALLOC_LOST, client_description=LOST,
                        desired_status=DESIRED_STOP, desired_description=LOST,
                        modify_time=modify_time)


@attrs.frozen
class Reconnect:
    """What a node's return does: its unknown allocations that run on (with the client
    status their task states say, until the client reports), and allocations stopped, each
    with why."""

    resumed: tuple[tuple[Allocation, str], ...]
    stopped: tuple[tuple[Allocation, str], ...]


def on_reconnect(node_allocs: Iterable[Allocation], every_alloc: Sequence[Allocation]
                 ) -> Reconnect:
    """``node_allocs``: the returning node's allocations; ``every_alloc``: all of them
    (where replacements are found)."""
    replacements: dict[str, Allocation] = {
        a.previous_allocation: a for a in every_alloc
        if a.previous_allocation and a.desired_status == DESIRED_RUN
        and not a.client_terminal()}
    resumed: list[tuple[Allocation, str]] = []
    stopped: list[tuple[Allocation, str]] = []
    for alloc in node_allocs:
        if alloc.client_status != ALLOC_UNKNOWN or alloc.desired_status != DESIRED_RUN:
            continue
        replacement = replacements.get(alloc.id)
        reconcile = policy_of(alloc.job, alloc.task_group).reconcile
        if replacement is not None and reconcile == KEEP_REPLACEMENT:
            stopped.append((alloc, RECONNECTED))
            continue
        resumed.append((alloc, _status_of_tasks(alloc)))
        if replacement is not None:
            stopped.append((replacement, RECONNECTED))
    return Reconnect(tuple(resumed), tuple(stopped))


def _status_of_tasks(alloc: Allocation) -> str:
    """What the allocation's last reported task states say it is (the client soon reports
    afresh)."""
    if any(s.state == TASK_RUNNING for s in alloc.task_states.values()):
        return ALLOC_RUNNING
    return ALLOC_PENDING
