"""``PUT|POST /v1/job/:id/plan``: the scheduler's dry run for a job (``server.plan``), with
Nomad's ``JobPlanResponse``. Needs ``submit-job`` or ``plan-job`` in the job's namespace, as
Nomad's; nothing is written.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nomad_client.http.auth import Need
from nomad_client.http.bodyfields import object_fields
from nomad_client.http.endpoints.namespaces import refusals
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.endpoints.submitted import submitted_job
from nomad_client.http.errors import bad_request
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.server.job_versions import job_modify_index
from nomad_client.server.namespaces import admit_job
from nomad_client.server.plan import dry_run
from nomad_client.structs.codec import to_api

PLAN_JOB = Need.namespace("submit-job", "plan-job")
PLAN_FIELDS = ("Job", "Diff", "PolicyOverride", "Region", "Namespace", "SecretID")
# Go's zero time: a job that is not periodic has no next launch.
NO_PERIODIC_LAUNCH = "0001-01-01T00:00:00Z"


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false")
    return value


async def plan_job(services: Services, req: ApiRequest) -> Reply:
    fields = object_fields(await req.json(), PLAN_FIELDS)
    with_diff = _flag(fields, "Diff")
    _flag(fields, "PolicyOverride")  # Sentinel's; accepted and ignored, as in Nomad CE
    server = services.own_server
    job, namespace = submitted_job(req, fields, PLAN_JOB, region=server.region)
    with refusals():  # no such namespace, or it refuses a driver the job uses
        admit_job(server.namespace(namespace), job)
    previous = server.job(job["ID"], namespace)
    # One consistent view of the state, read at once on the loop (frozen nodes and allocs,
    # job dicts the store replaces, never changes); the scheduler's pass over it, CPU work
    # that grows with the job's counts, runs in a worker thread.
    index = server.store.index
    planned = await asyncio.to_thread(
        dry_run, {**job, "Stop": False}, previous, server.nodes(),
        server.job_allocs(job["ID"], namespace), server.allocations(), with_diff=with_diff)
    annotations = None if planned.annotations is None else {
        "DesiredTGUpdates": planned.annotations, "PreemptedAllocs": None}
    return Reply({
        # What ``job run -check-index`` sends back: the index of the last version change.
        "Index": index, "JobModifyIndex": job_modify_index(previous) if previous else 0,
        "CreatedEvals": None, "Diff": planned.diff, "Annotations": annotations,
        "FailedTGAllocs": {g: to_api(m) for g, m in planned.failed_groups.items()} or None,
        "NextPeriodicLaunch": NO_PERIODIC_LAUNCH, "Warnings": ""}, index)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}/plan", plan_job, PLAN_JOB)
