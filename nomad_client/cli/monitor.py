"""Evaluation monitor for ``job run`` / ``job stop``: follows one evaluation and the
allocations it creates, printing Nomad-style progress lines.

It only reads from the agent (evaluation and job allocations, as blocking queries).
Exit codes: 0 success, 2 placement failures, 1 other failures (including time-out).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import out, reporting

TERMINAL_EVAL = {"complete", "failed", "canceled", "blocked"}
# Pause between polls when the agent answered without blocking (index unchanged).
POLL_PAUSE = 0.2
BLOCK_WAIT = "5s"


def _now() -> str:
    return fmt.format_time(datetime.now().astimezone())


def _line(text: str) -> None:
    out(f"    {_now()}: {text}")


def _headline(text: str) -> None:
    out(f"==> {_now()}: {text}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def placement_failure_lines(group: str, metrics: Mapping[str, Any]) -> list[str]:
    """Lines describing why a task group could not be placed."""
    failed = int(metrics.get("CoalescedFailures") or 0) + 1
    lines = [f'Task Group "{group}" (failed to place {_plural(failed, "allocation")}):']
    bullets: list[str] = []
    for dc, count in sorted((metrics.get("NodesAvailable") or {}).items()):
        if count == 0:
            bullets.append(f'No nodes are available in datacenter "{dc}"')
    if metrics.get("NodesEvaluated", 0) == 0:
        bullets.append("No nodes were eligible for evaluation")
    for cls, count in sorted((metrics.get("ClassFiltered") or {}).items()):
        bullets.append(f'Class "{cls}": {count} nodes excluded by filter')
    for reason, count in sorted((metrics.get("ConstraintFiltered") or {}).items()):
        bullets.append(f'Constraint "{reason}": {count} nodes excluded by filter')
    if metrics.get("NodesExhausted"):
        bullets.append(f"Resources exhausted on {metrics['NodesExhausted']} nodes")
    for dim, count in sorted((metrics.get("DimensionExhausted") or {}).items()):
        bullets.append(f'Dimension "{dim}" exhausted on {count} nodes')
    return lines + [f"  * {b}" for b in bullets]


class _AllocTracker:
    """Remembers allocation statuses so only changes are printed."""

    def __init__(self, eval_id: str, verbose: bool) -> None:
        self.eval_id = eval_id
        self.verbose = verbose
        self.status: dict[str, str] = {}

    def update(self, allocs: list[dict[str, Any]]) -> None:
        for alloc in allocs:
            if alloc.get("EvalID") != self.eval_id:
                continue
            aid, status = alloc["ID"], alloc.get("ClientStatus", "")
            sid = fmt.short_id(aid, self.verbose)
            if aid not in self.status:
                _line(f'Allocation "{sid}" created: node '
                      f'"{fmt.short_id(alloc.get("NodeID"), self.verbose)}", '
                      f'group "{alloc.get("TaskGroup", "")}"')
                if status != "pending":
                    _line(f'Allocation "{sid}" status changed: "pending" -> "{status}"')
            elif self.status[aid] != status:
                desc = alloc.get("ClientDescription")
                _line(f'Allocation "{sid}" status changed: "{self.status[aid]}" -> '
                      f'"{status}"' + (f" ({desc})" if desc else ""))
            self.status[aid] = status

    def pending(self) -> bool:
        return any(s == "pending" for s in self.status.values())


async def monitor_evaluation(client: ApiClient, eval_id: str, *, verbose: bool = False,
                             wait_allocs: bool = True, time_limit: float = 60.0) -> int:
    """Follow evaluation ``eval_id`` to a terminal status, then (if ``wait_allocs``) its
    allocations until none is pending.  Returns the exit code."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + time_limit
    sid = fmt.short_id(eval_id, verbose)
    _headline(f'Monitoring evaluation "{sid}"')
    tracker = _AllocTracker(eval_id, verbose)
    index, status = 0, ""
    evaluation: dict[str, Any] = {}

    with reporting("Error reading evaluation"):
        while True:
            evaluation, new_index = await client.get_blocking(
                f"/v1/evaluation/{quote(eval_id, safe='')}", index, wait=BLOCK_WAIT)
            new_status = evaluation.get("Status", "")
            if not status:
                _line(f'Evaluation triggered by job "{evaluation.get("JobID", "")}"')
                status = "pending"
            # Allocations first: they are placed before the evaluation is marked complete.
            allocs = await client.job_allocations(evaluation.get("JobID", ""))
            tracker.update(allocs or [])
            if new_status != status:
                _line(f'Evaluation status changed: "{status}" -> "{new_status}"')
                status = new_status
            if status in TERMINAL_EVAL:
                break
            if loop.time() >= deadline:
                return _timed_out(time_limit, f'evaluation "{sid}"')
            if new_index <= index:
                await asyncio.sleep(POLL_PAUSE)
            index = new_index

    failed = evaluation.get("FailedTGAllocs") or {}
    if failed:
        _headline(f'Evaluation "{sid}" finished with status "{status}" but failed to '
                  "place all allocations:")
        for group in sorted(failed):
            lines = placement_failure_lines(group, failed[group] or {})
            _line(lines[0])
            for extra in lines[1:]:
                out(f"    {extra}")
        if evaluation.get("BlockedEval"):
            _line(f'Evaluation "{fmt.short_id(evaluation["BlockedEval"], verbose)}" '
                  "waiting for additional capacity to place remainder")
        return 2
    desc = evaluation.get("StatusDescription")
    _headline(f'Evaluation "{sid}" finished with status "{status}"'
              + (f" ({desc})" if desc and status != "complete" else ""))
    if status != "complete":
        return 1
    if not wait_allocs:
        return 0

    with reporting("Error reading allocations"):
        index = 0
        while tracker.pending():
            if loop.time() >= deadline:
                return _timed_out(time_limit, "allocations to start")
            allocs, new_index = await client.get_blocking(
                f"/v1/job/{quote(evaluation.get('JobID', ''), safe='')}/allocations", index,
                wait=BLOCK_WAIT)
            tracker.update(allocs or [])
            if new_index <= index:
                await asyncio.sleep(POLL_PAUSE)
            index = new_index
    return 0


def _timed_out(timeout: float, what: str) -> int:
    _headline(f"Timed out after {timeout:g}s waiting for {what}")
    return 1
