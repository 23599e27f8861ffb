"""/v1/jobs, /v1/jobs/parse, /v1/job/:id[/allocations|/evaluations], /v1/evaluation/:id.

A job is found by its ID in the namespace the request names (``?namespace=``, default
``default``); two namespaces may each hold a job of one ID. On the list routes ``*`` lists
every namespace, keeping what the caller may see.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nomad_client.http.auth import (
    ALL_NAMESPACES,
    DEFAULT_NAMESPACE,
    Need,
    allows,
    request_namespace,
    require,
    require_in_request,
)
from nomad_client.http.endpoints.namespaces import refusals
from nomad_client.http.endpoints.routes import Routes
from nomad_client.http.errors import bad_request, found_or_404
from nomad_client.http.query import block, query_bool
from nomad_client.http.router import ApiRequest, Reply, Router
from nomad_client.http.services import Services
from nomad_client.jobspec import (
    JobspecError,
    JobValidationError,
    canonicalize_job,
    parse_jobspec,
)
from nomad_client.server.parent_jobs import JobKindChange
from nomad_client.server.server import Resource, Server
from nomad_client.structs.codec import to_api
from nomad_client.structs.models import Allocation
from nomad_client.structs.namespaces import NAMESPACE_NAME, job_namespace

REGISTER_KEYS = {"Job", "EnforceIndex", "JobModifyIndex", "PolicyOverride", "PreserveCounts",
                 "PreserveResources", "EvalPriority", "Submission", "Region", "Namespace",
                 "SecretID"}
PARSE_KEYS = {"JobHCL", "Variables", "Canonicalize"}
MAX_JOBSPEC_CHARS = 256 * 1024

LIST_JOBS = Need.namespace("list-jobs")
SUBMIT_JOB = Need.namespace("submit-job", "register-job")
PARSE_JOB = Need.namespace("parse-job", "submit-job")
READ_JOB = Need.namespace("read-job")
DEREGISTER_JOB = Need.namespace("submit-job", "purge-job", "deregister-job")
PURGE_JOB = Need.namespace("submit-job", "purge-job")


def listed_namespace(req: ApiRequest) -> str | None:
    """The namespace a list request reads; None for every namespace (``*``)."""
    namespace = request_namespace(req.query)
    return None if namespace == ALL_NAMESPACES else namespace


def alloc_stub(alloc: Allocation) -> dict[str, Any]:
    full = to_api(alloc)
    job = full.pop("Job")
    full["JobType"] = job.get("Type")
    full["JobVersion"] = job.get("Version", 0)
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


def _job_view(server: Server, job: dict[str, Any]) -> dict[str, Any]:
    return {**job, "Status": server.job_status(job)}


async def list_jobs(services: Services, req: ApiRequest) -> Reply:
    server = services.server
    index = await block(server, req.query, (Resource.JOBS, Resource.ALLOCATIONS))
    prefix = req.query.get("prefix", "")
    stubs = []
    for job in server.jobs(listed_namespace(req)):
        if not job["ID"].startswith(prefix) or not allows(req, job_namespace(job), LIST_JOBS):
            continue
        stubs.append({k: job.get(k) for k in (
            "ID", "ParentID", "Name", "Namespace", "Datacenters", "NodePool", "Type",
            "Priority", "Periodic", "ParameterizedJob", "Stop", "StatusDescription",
            "CreateIndex", "ModifyIndex", "SubmitTime")} | {
            "Status": server.job_status(job), "JobModifyIndex": job.get("ModifyIndex")})
    return Reply(stubs, index)


async def register_job(services: Services, req: ApiRequest) -> Reply:
    """PUT/POST /v1/jobs, and /v1/job/:id (whose ID must then match the job's)."""
    body = _object_body(await req.json(), REGISTER_KEYS)
    job = body.get("Job")
    if not isinstance(job, dict):
        raise bad_request("Job must be specified")
    if not job.get("ID"):
        raise bad_request("Job ID hasn't been provided")
    path_id = req.params.get("job_id")
    if path_id is not None and path_id != job["ID"]:
        raise bad_request("Job ID does not match name")
    # Nomad's precedence: ?namespace=, the body's Namespace, the job's own, default.
    namespace = (req.query.get("namespace") or body.get("Namespace") or job.get("Namespace")
                 or DEFAULT_NAMESPACE)
    try:
        job = canonicalize_job({**job, "Namespace": namespace})
    except JobValidationError as err:
        raise bad_request(str(err)) from None
    if not isinstance(namespace, str) or not NAMESPACE_NAME.fullmatch(namespace):
        raise bad_request("invalid namespace: a namespace name is 1 to 128 letters, digits "
                          "and dashes")
    # The caller's right first: the namespace's existence is not told to just anyone.
    require(req, namespace, SUBMIT_JOB)
    with refusals():  # no such namespace, or it refuses a driver the job uses
        try:
            eval_id, index = await services.server.register_job(job)
        except JobKindChange as err:  # e.g. a periodic job registered again without it
            raise bad_request(str(err)) from None
    return Reply({"EvalID": eval_id, "EvalCreateIndex": index, "JobModifyIndex": index,
                  "Warnings": "", "Index": index, "LastContact": 0,
                  "KnownLeader": True, "NextToken": ""}, index)


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
    server = services.server
    index = await block(server, req.query, (Resource.JOBS, Resource.ALLOCATIONS))
    job = found_or_404(server.job(req.params["job_id"], request_namespace(req.query)),
                       "job not found")
    require(req, job_namespace(job), READ_JOB)
    return Reply(_job_view(server, job), index)


async def delete_job(services: Services, req: ApiRequest) -> Reply:
    purge = query_bool(req.query, "purge")
    need = DEREGISTER_JOB  # what the route declares
    if purge:
        need = PURGE_JOB
        require_in_request(req, need)
    namespace = request_namespace(req.query)
    require(req, namespace, need)
    eval_id, index = await services.server.deregister_job(req.params["job_id"], purge=purge,
                                                          namespace=namespace)
    return Reply({"EvalID": eval_id, "EvalCreateIndex": index, "JobModifyIndex": index,
                  "Index": index, "LastContact": 0, "KnownLeader": True,
                  "NextToken": ""}, index)


async def job_allocations(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.server, req.query, (Resource.ALLOCATIONS,))
    allocs = services.server.job_allocs(req.params["job_id"], request_namespace(req.query))
    return Reply([alloc_stub(a) for a in allocs if allows(req, a.namespace, READ_JOB)], index)


async def job_evaluations(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.server, req.query, (Resource.EVALUATIONS,))
    evals = services.server.job_evaluations(req.params["job_id"],
                                            request_namespace(req.query))
    return Reply([to_api(e) for e in evals if allows(req, e.namespace, READ_JOB)], index)


async def get_evaluation(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.server, req.query, (Resource.EVALUATIONS,))
    ev = found_or_404(services.server.evaluation(req.params["eval_id"]), "eval not found")
    require(req, ev.namespace, READ_JOB)
    return Reply(to_api(ev), index)


def register(router: Router, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/jobs", list_jobs, LIST_JOBS)
    routes.add(("PUT", "POST"), "/v1/jobs", register_job, SUBMIT_JOB)
    routes.add(("PUT", "POST"), "/v1/jobs/parse", parse, PARSE_JOB)
    routes.add(("GET",), "/v1/job/{job_id}", get_job, READ_JOB)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}", register_job, SUBMIT_JOB)
    routes.add(("DELETE",), "/v1/job/{job_id}", delete_job, DEREGISTER_JOB)
    routes.add(("GET",), "/v1/job/{job_id}/allocations", job_allocations, READ_JOB)
    routes.add(("GET",), "/v1/job/{job_id}/evaluations", job_evaluations, READ_JOB)
    routes.add(("GET",), "/v1/evaluation/{eval_id}", get_evaluation, READ_JOB)
