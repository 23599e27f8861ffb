"""/v1/jobs, /v1/jobs/parse, /v1/job/:id[/allocations|/evaluations] (evaluations themselves:
``evaluations``).

A job is found by its ID in the namespace the request names (``?namespace=``, default
``default``); two namespaces may each hold a job of one ID. On the list routes ``*`` lists
every namespace, keeping what the caller may see.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from nomad_client.http.auth import (
    Need,
    allows,
    request_namespace,
    require,
    require_in_request,
)
from nomad_client.http.endpoints.namespaces import refusals
from nomad_client.http.endpoints.register_request import register_request
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.endpoints.submitted import submitted_job
from nomad_client.http.errors import bad_request, found_or_404
from nomad_client.http.query import block, by_namespace_and, list_query, parse_uint64, query_bool
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.jobspec import (
    JobspecError,
    JobValidationError,
    canonicalize_job,
    parse_jobspec,
)
from nomad_client.server.job_versions import VersionConflict, job_modify_index
from nomad_client.server.parent_jobs import JobKindChange
from nomad_client.server.server import Resource, Server
from nomad_client.structs.codec import to_api
from nomad_client.structs.models import Allocation
from nomad_client.structs.namespaces import job_namespace

PARSE_KEYS = {"JobHCL", "Variables", "Canonicalize"}
MAX_JOBSPEC_CHARS = 256 * 1024

LIST_JOBS = Need.namespace("list-jobs")
SUBMIT_JOB = Need.namespace("submit-job", "register-job")
PARSE_JOB = Need.namespace("parse-job", "submit-job")
READ_JOB = Need.namespace("read-job")
DEREGISTER_JOB = Need.namespace("submit-job", "purge-job", "deregister-job")
PURGE_JOB = Need.namespace("submit-job", "purge-job")


def alloc_stub(alloc: Allocation, *, resources: bool = True,
               task_states: bool = True) -> dict[str, Any]:
    """Nomad's AllocListStub; ``AllocatedResources`` and ``TaskStates`` left out when not
    asked for (``/v1/allocations?resources=false&task_states=false``)."""
    full = to_api(alloc)
    job = full.pop("Job")
    full["JobType"] = job.get("Type")
    full["JobVersion"] = job.get("Version", 0)
    if not resources:
        del full["AllocatedResources"]
    if not task_states:
        del full["TaskStates"]
    return full


def _parse(hcl: str, variables: str | None, canonicalize: bool) -> dict[str, Any]:
    job = parse_jobspec(hcl, "<request>", var_files_text=variables)
    return canonicalize_job(job) if canonicalize else job


def _object_body(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"Unknown field(s) in request body: {', '.join(unknown)}")
    return body


def query_version(query: MultiMapping[str]) -> int | None:
    """``?version=N``: a job version (None when not asked for)."""
    raw = query.get("version")
    if raw is None or raw == "":
        return None
    version = parse_uint64(raw)
    if version is None:
        raise bad_request("Unable to parse job version parameter")
    return version


def _job_view(server: Server, job: dict[str, Any]) -> dict[str, Any]:
    return {**job, "Status": server.job_status(job)}


JOB_STUB_KEYS = ("ID", "ParentID", "Name", "Namespace", "Datacenters", "NodePool",
                 "Multiregion", "Type", "Priority", "Periodic", "ParameterizedJob", "Stop",
                 "StatusDescription", "CreateIndex", "ModifyIndex", "SubmitTime")
BY_NAMESPACE_AND_ID = by_namespace_and("ID")


def job_stub(job: dict[str, Any], summary: dict[str, Any] | None, *, meta: bool
             ) -> dict[str, Any]:
    """Nomad's JobListStub of a job as ``_job_view`` shows it (``Meta`` when asked)."""
    stub = {k: job.get(k) for k in JOB_STUB_KEYS} | {
        "Status": job["Status"], "JobSummary": summary,
        "JobModifyIndex": job.get("JobModifyIndex") or job.get("ModifyIndex")}
    if meta:
        stub["Meta"] = job.get("Meta") or {}
    return stub


async def list_jobs(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = services.own_server
    with_meta = query_bool(req.query, "meta")
    listing = await list_query(server, req.query, (Resource.JOBS, Resource.ALLOCATIONS))
    # The filter runs on the full job, as Nomad's; each is shown as its stub.
    jobs = [_job_view(server, job) for job in server.jobs(listing.namespace)
            if allows(req, job_namespace(job), LIST_JOBS)]
    return await listing.reply(jobs, BY_NAMESPACE_AND_ID,
                               view=lambda job: job_stub(
                                   job, server.job_summary(job["ID"], job["Namespace"]),
                                   meta=with_meta))


def register_reply(server: Server, job_id: str, namespace: str, eval_id: str,
                   index: int) -> Reply:
    """Nomad's JobRegisterResponse after a write that may have made an evaluation (register,
    revert, evaluate): ``JobModifyIndex`` is the job's, unchanged when the job was."""
    registered = server.job(job_id, namespace)
    return Reply({"EvalID": eval_id, "EvalCreateIndex": index,
                  "JobModifyIndex": job_modify_index(registered) if registered else index,
                  "Warnings": "", "Index": index, "LastContact": 0,
                  "KnownLeader": True, "NextToken": ""}, index)


async def register_job(services: Services, req: ApiRequest) -> Reply:
    """PUT/POST /v1/jobs, and /v1/job/:id (whose ID must then match the job's)."""
    body, options = register_request(await req.json())
    server = services.own_server
    job, namespace = submitted_job(req, body, SUBMIT_JOB, region=server.region)
    with refusals():  # no such namespace, or it refuses a driver the job uses
        try:
            eval_id, index = await server.register_job(
                job, enforce_index=options.enforce_index, submission=options.submission)
        except (JobKindChange, VersionConflict) as err:  # e.g. periodic no more; -check-index
            raise bad_request(str(err)) from None
    return register_reply(server, job["ID"], namespace, eval_id, index)


async def parse(services: Services, req: ApiRequest) -> Any:
    body = _object_body(await req.json(), PARSE_KEYS)
    hcl = body.get("JobHCL")
    if not isinstance(hcl, str) or not hcl.strip():
        raise bad_request("Job spec is empty")
    if len(hcl) > MAX_JOBSPEC_CHARS:
        # The HCL parser needs a few hundred bytes of memory per byte of input.
        raise bad_request(f"Job spec is too large (limit {MAX_JOBSPEC_CHARS} characters)")
    variables = body.get("Variables") or None
    try:
        # Parsing is CPU work on caller input: keep it off the event loop.
        job = await asyncio.to_thread(_parse, hcl, variables, bool(body.get("Canonicalize")))
    except (JobspecError, JobValidationError) as err:
        raise bad_request(f"Failed to parse job: {err}") from None
    return job


async def get_job(services: Services, req: ApiRequest) -> Reply:
    server = services.own_server
    index = await block(server, req.query, (Resource.JOBS, Resource.ALLOCATIONS))
    job = found_or_404(server.job(req.params["job_id"], request_namespace(req.query)),
                       "job not found")
    require(req, job_namespace(job), READ_JOB)
    version = query_version(req.query)
    if version is not None and version != job.get("Version"):
        kept = server.job_versions(job["ID"], job_namespace(job)) or []
        # An older version is shown as it was registered (its status then is not known).
        return Reply(found_or_404(next((v for v in kept if v.get("Version") == version), None),
                                  "job version not found"), index)
    return Reply(_job_view(server, job), index)


async def delete_job(services: Services, req: ApiRequest) -> Reply:
    purge = query_bool(req.query, "purge")
    need = DEREGISTER_JOB  # what the route declares
    if purge:
        need = PURGE_JOB
        require_in_request(req, need)
    namespace = request_namespace(req.query)
    require(req, namespace, need)
    eval_id, index = await services.own_server.deregister_job(req.params["job_id"], purge=purge,
                                                          namespace=namespace)
    return Reply({"EvalID": eval_id, "EvalCreateIndex": index, "JobModifyIndex": index,
                  "Index": index, "LastContact": 0, "KnownLeader": True,
                  "NextToken": ""}, index)


async def job_allocations(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.own_server, req.query, (Resource.ALLOCATIONS,))
    allocs = services.own_server.job_allocs(req.params["job_id"], request_namespace(req.query))
    return Reply([alloc_stub(a) for a in allocs if allows(req, a.namespace, READ_JOB)], index)


async def job_evaluations(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.own_server, req.query, (Resource.EVALUATIONS,))
    evals = services.own_server.job_evaluations(req.params["job_id"],
                                            request_namespace(req.query))
    return Reply([to_api(e) for e in evals if allows(req, e.namespace, READ_JOB)], index)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/jobs", list_jobs, LIST_JOBS)
    routes.add(("PUT", "POST"), "/v1/jobs", register_job, SUBMIT_JOB)
    routes.add(("PUT", "POST"), "/v1/jobs/parse", parse, PARSE_JOB)
    routes.add(("GET",), "/v1/job/{job_id}", get_job, READ_JOB)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}", register_job, SUBMIT_JOB)
    routes.add(("DELETE",), "/v1/job/{job_id}", delete_job, DEREGISTER_JOB)
    routes.add(("GET",), "/v1/job/{job_id}/allocations", job_allocations, READ_JOB)
    routes.add(("GET",), "/v1/job/{job_id}/evaluations", job_evaluations, READ_JOB)
