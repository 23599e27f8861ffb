"""What Nomad serves about one registered job beyond the job itself: /v1/job/:id/summary,
/versions, /submission, the writes /revert, /stable and /evaluate, and /v1/validate/job.

Kept apart from ``jobs`` (registration, listing, reading) so each module stays about one
thing; the namespace rules are the same (``?namespace=``, default ``default``).
"""

from __future__ import annotations

from typing import Any

from nomad_client.http.auth import DEFAULT_NAMESPACE, Need, request_namespace, require
from nomad_client.http.endpoints.jobs import READ_JOB, query_version, register_reply
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import bad_request, found_or_404, not_found
from nomad_client.http.jsonbody import BadJSONBody, decode_json_body
from nomad_client.http.query import block
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.jobspec import JobValidationError, canonicalize_job
from nomad_client.server.job_versions import VersionConflict, VersionNotFound
from nomad_client.server.server import NotEvaluable, NotFound, Resource

REVERT_JOB = Need.namespace("submit-job", "revert-job")
STABLE_JOB = Need.namespace("submit-job", "stable-job")
EVALUATE_JOB = Need.namespace("submit-job", "evaluate-job")
# What a job's summary is made of: ``Queued`` comes from its latest evaluation.
JOB_TABLES = (Resource.JOBS, Resource.ALLOCATIONS, Resource.EVALUATIONS)


def _body(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise bad_request("Request body must be a JSON object")
    return raw


def _named_job(req: ApiRequest, body: dict[str, Any], field: str, mismatch: str) -> str:
    """The job ID ``body[field]`` names, which must be the path's."""
    job_id = body.get(field)
    if not job_id or not isinstance(job_id, str):
        raise bad_request(f"{field} must be specified")
    if job_id != req.params["job_id"]:
        raise bad_request(mismatch)
    return job_id


def _uint(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"{field} must be a non-negative integer")
    return value


async def job_summary(services: Services, req: ApiRequest) -> Reply:
    server = services.own_server
    index = await block(server, req.query, JOB_TABLES)
    namespace = request_namespace(req.query)
    require(req, namespace, READ_JOB)
    summary = found_or_404(server.job_summary(req.params["job_id"], namespace),
                           "job not found")
    return Reply(summary, index)


async def job_versions(services: Services, req: ApiRequest) -> Reply:
    """Nomad's JobVersionsResponse, newest first; diffs are not computed (``null``)."""
    server = services.own_server
    index = await block(server, req.query, (Resource.JOBS,))
    namespace = request_namespace(req.query)
    require(req, namespace, READ_JOB)
    versions = found_or_404(server.job_versions(req.params["job_id"], namespace),
                            "job versions not found")
    return Reply({"Versions": versions, "Diffs": None, "Index": index, "LastContact": 0,
                  "KnownLeader": True, "NextToken": ""}, index)


async def job_submission(services: Services, req: ApiRequest) -> Reply:
    server = services.own_server
    version = query_version(req.query)
    if version is None:
        raise bad_request("Unable to parse job submission version parameter")
    index = await block(server, req.query, (Resource.JOBS,))
    namespace = request_namespace(req.query)
    require(req, namespace, READ_JOB)
    submission = server.job_submission(req.params["job_id"], version, namespace)
    return Reply(found_or_404(submission, "job source not found"), index)


async def revert_job(services: Services, req: ApiRequest) -> Reply:
    body = _body(await req.json())
    job_id = _named_job(req, body, "JobID", "Job ID does not match")
    version = _uint(body, "JobVersion") or 0
    enforce = _uint(body, "EnforcePriorVersion")
    namespace = request_namespace(req.query)
    require(req, namespace, REVERT_JOB)
    server = services.own_server
    try:
        eval_id, index = await server.revert_job(job_id, version, namespace=namespace,
                                                 enforce_prior_version=enforce)
    except VersionNotFound as err:
        raise not_found(str(err)) from None
    except VersionConflict as err:
        raise bad_request(str(err)) from None
    return register_reply(server, job_id, namespace, eval_id, index)


async def stable_job(services: Services, req: ApiRequest) -> Reply:
    """Nomad's JobStabilityRequest ``{"JobID", "JobVersion", "Stable"}``; answers
    ``{"Index"}``."""
    body = _body(await req.json())
    job_id = _named_job(req, body, "JobID", "Job ID does not match")
    version = _uint(body, "JobVersion") or 0
    stable = body.get("Stable", False)
    if not isinstance(stable, bool):
        raise bad_request("Stable must be a boolean")
    namespace = request_namespace(req.query)
    require(req, namespace, STABLE_JOB)
    try:
        index = await services.own_server.set_job_stability(job_id, version, stable,
                                                        namespace=namespace)
    except VersionNotFound as err:
        raise not_found(str(err)) from None
    return Reply({"Index": index}, index)


async def evaluate_job(services: Services, req: ApiRequest) -> Reply:
    """Body optional (Nomad's compatibility): ``{"JobID", "EvalOptions": {ForceReschedule}}``."""
    raw = await req.body()
    job_id = req.params["job_id"]
    force = False
    if raw.strip():
        try:
            body = _body(decode_json_body(raw))
        except BadJSONBody as err:
            raise bad_request(str(err)) from None
        _named_job(req, body, "JobID", "JobID not same as job name")
        options = body.get("EvalOptions")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise bad_request("EvalOptions must be an object")
        force = options.get("ForceReschedule") or False
        if not isinstance(force, bool):
            raise bad_request("EvalOptions.ForceReschedule must be a boolean")
    namespace = request_namespace(req.query)
    require(req, namespace, EVALUATE_JOB)
    server = services.own_server
    try:
        eval_id, index = await server.evaluate_job(job_id, namespace=namespace,
                                                   force_reschedule=force)
    except NotFound as err:
        raise not_found(str(err)) from None
    except NotEvaluable as err:
        raise bad_request(str(err)) from None
    return register_reply(server, job_id, namespace, eval_id, index)


async def validate_job(services: Services, req: ApiRequest) -> Reply:
    """Nomad's JobValidateResponse: the problems are the answer (200), not an error."""
    body = _body(await req.json())
    job = body.get("Job")
    if not isinstance(job, dict):
        raise bad_request("Job must be specified")
    namespace = job.get("Namespace") or request_namespace(req.query) or DEFAULT_NAMESPACE
    if not isinstance(namespace, str):
        raise bad_request("Job.Namespace must be a string")
    require(req, namespace, READ_JOB)
    problems: list[str] = []
    error = ""
    try:
        canonicalize_job(job)
    except JobValidationError as err:
        problems = list(err.problems) or [str(err)]
        error = str(err)
    return Reply({"DriverConfigValidated": True, "ValidationErrors": problems,
                  "Error": error, "Warnings": ""})


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/job/{job_id}/summary", job_summary, READ_JOB)
    routes.add(("GET",), "/v1/job/{job_id}/versions", job_versions, READ_JOB)
    routes.add(("GET",), "/v1/job/{job_id}/submission", job_submission, READ_JOB)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}/revert", revert_job, REVERT_JOB)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}/stable", stable_job, STABLE_JOB)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}/evaluate", evaluate_job, EVALUATE_JOB)
    routes.add(("PUT", "POST"), "/v1/validate/job", validate_job, READ_JOB)


