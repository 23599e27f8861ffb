"""``PUT /v1/system/gc``: the server's garbage collection, forced (no age threshold).

What goes: allocations whose client reported them terminal (except a batch job's completed
one that still counts as done work), dead jobs with nothing left running (and their scaling
events and periodic launch records), and evaluations of the jobs that went. A live job keeps
its newest evaluation: re-evaluation after a node change reads what it left queued; and an
evaluation stays while an allocation it placed does (its ``EvalID`` still resolves). Every
row is dropped only if it is still the row that was judged, so a job registered again or an
allocation that changed meanwhile stays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from nomad_client.server.parent_jobs import is_parent
from nomad_client.server.state import (
    DELETE,
    JOB_VERSIONS,
    JOBS,
    PERIODIC_LAUNCHES,
    SCALING_EVENTS,
    RowUpdate,
    StateStore,
    job_key,
)
from nomad_client.structs.jobs import is_batch
from nomad_client.structs.models import DESIRED_RUN, Allocation, Evaluation
from nomad_client.structs.namespaces import job_namespace


@attrs.frozen
class Collected:
    jobs: int
    allocations: int
    evaluations: int
    index: int


def _still(row: Any) -> RowUpdate:
    """Delete the row only if it is still ``row``."""
    def apply(current: Any | None, index: int) -> Any:
        return DELETE if current is not None and current is row else None
    return apply


def _with_job(store: StateStore, key: str, job: Any) -> RowUpdate:
    """Delete a row kept beside the job ``key`` (its versions, scaling events, launches) only
    while the job is still ``job``: a job registered again meanwhile keeps its new rows."""
    def apply(current: Any | None, index: int) -> Any:
        return DELETE if current is not None and store.get(JOBS, key) is job else None
    return apply


def _collectable(alloc: Allocation, job: Mapping[str, Any] | None, job_goes: bool) -> bool:
    if not alloc.client_terminal():
        return False
    # A completed batch allocation is the job's record that the work was done.
    keeps_batch_work = (job is not None and not job_goes and is_batch(job)
                        and alloc.desired_status == DESIRED_RUN
                        and alloc.client_status == "complete")
    return not keeps_batch_work


async def collect_garbage(store: StateStore, job_status: Callable[[Mapping[str, Any]], str]
                          ) -> Collected:
    jobs = {job_key(job_namespace(j), j["ID"]): j for j in store.rows(JOBS)}
    allocs: list[Allocation] = store.values("allocs")
    live_allocs = {job_key(a.namespace, a.job_id) for a in allocs if not a.client_terminal()}
    dead = {key for key, job in jobs.items()
            if not is_parent(job) and key not in live_allocs and job_status(job) == "dead"}
    gone_allocs = [a for a in allocs
                   if _collectable(a, jobs.get(job_key(a.namespace, a.job_id)),
                                   job_key(a.namespace, a.job_id) in dead)]
    newest: dict[str, Evaluation] = {}
    evals: list[Evaluation] = store.values("evals")
    for ev in evals:
        key = job_key(ev.namespace, ev.job_id)
        if key not in newest or ev.create_index > newest[key].create_index:
            newest[key] = ev
    # As in Nomad, an evaluation stays while an allocation it placed stays.
    gone_ids = {a.id for a in gone_allocs}
    placed_kept = {a.eval_id for a in allocs if a.id not in gone_ids}
    gone_evals = [ev for ev in evals
                  if ev.id not in placed_kept
                  and ((key := job_key(ev.namespace, ev.job_id)) in dead or key not in jobs
                       or newest[key] is not ev)]
    # A dead job's versions go with it: a job registered again under its ID starts afresh.
    beside_job = {table: [(key, _with_job(store, key, jobs[key])) for key in sorted(dead)]
                  for table in (SCALING_EVENTS, PERIODIC_LAUNCHES, JOB_VERSIONS)}
    index = await store.write(
        updates={**beside_job, JOBS: [(key, _still(jobs[key])) for key in sorted(dead)],
                 "allocs": [(a.id, _still(a)) for a in gone_allocs],
                 "evals": [(ev.id, _still(ev)) for ev in gone_evals]})
    return Collected(len(dead), len(gone_allocs), len(gone_evals), index)
