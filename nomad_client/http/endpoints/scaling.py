"""Scaling: ``GET|PUT|POST /v1/job/:id/scale`` (scale status, the scale action),
``GET /v1/scaling/policies`` and ``GET /v1/scaling/policy/:id`` (the policies of group
``scaling`` blocks). The work is the server's (``server.scaling``); here are the request
checks, with Nomad's messages, and the capabilities, as Nomad's: ``scale-job`` (or
``submit-job``) to scale, ``read-job-scaling`` (or ``read-job``) for the status,
``list-scaling-policies`` / ``read-scaling-policy`` (or ``list-jobs`` and ``read-job``) for
the policies.

Where we differ from Nomad: reading one policy also needs the capability in the policy's own
namespace (Nomad checks only the request's), and an oversized event message or meta is 400.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from nomad_client.acl import ACL
from nomad_client.http.auth import Need, allows, request_namespace, require
from nomad_client.http.bodyfields import object_fields, string_field
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request, found_or_404, not_found
from nomad_client.http.query import block, list_query
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.jobspec.canonical import MAX_GROUP_COUNT
from nomad_client.server.scaling import (
    JobNotFound,
    ScaleRequest,
    ScalingError,
    policy_stub,
    policy_view,
)
from nomad_client.server.server import Resource
from nomad_client.structs.namespaces import job_namespace

SCALE_JOB = Need.namespace("scale-job", "submit-job")
READ_JOB_SCALING = Need.namespace("read-job-scaling", "read-job")

SCALE_FIELDS = ("Count", "Target", "Message", "Error", "Meta", "PolicyOverride",
                "JobModifyIndex", "Region", "Namespace", "SecretID")
# A scaling event's message and meta together, JSON-encoded: events are kept (20 per group).
MAX_EVENT_BYTES = 16 * 1024


def _policy_need(name: str, own: str) -> Need:
    """``own`` (a scaling capability), or ``list-jobs`` and ``read-job`` together."""
    def check(acl: ACL, namespace: str) -> bool:
        return acl.allow_namespace_op(namespace, own) or (
            acl.allow_namespace_op(namespace, "list-jobs")
            and acl.allow_namespace_op(namespace, "read-job"))
    return Need(name, check, namespaced=True)


LIST_SCALING_POLICIES = _policy_need("namespace:list-scaling-policies|list-jobs+read-job",
                                     "list-scaling-policies")
READ_SCALING_POLICY = _policy_need("namespace:read-scaling-policy|list-jobs+read-job",
                                   "read-scaling-policy")


@contextlib.contextmanager
def scaling_refusals() -> Iterator[None]:
    try:
        yield
    except JobNotFound as err:
        raise not_found(str(err)) from None
    except ScalingError as err:
        raise bad_request(str(err)) from None


def _whole(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be a whole number")
    return value


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false")
    return value


def scale_request(body: Any, job_id: str, namespace: str) -> ScaleRequest:
    """The scale action a request body asks for, checked as Nomad checks it."""
    fields = object_fields(body, SCALE_FIELDS)
    target = fields.get("Target") or {}
    if not isinstance(target, dict) or not all(isinstance(v, str) for v in target.values()):
        raise bad_request("Target must be an object of strings")
    target = {k.lower(): v for k, v in target.items()}
    if target.get("job", job_id) != job_id:
        raise bad_request("job ID in payload did not match URL")
    if target.get("namespace", namespace) != namespace:
        raise bad_request("namespace in payload did not match header")
    group = target.get("group")
    if not group:
        raise bad_request("missing task group name for scaling action")
    count = _whole(fields, "Count")
    error = _flag(fields, "Error")
    if count is not None and count < 0:
        raise bad_request("scaling action count can't be negative")
    if count is not None and count > MAX_GROUP_COUNT:
        raise bad_request(f'scaling action count for task group "{group}" must be at most '
                          f"{MAX_GROUP_COUNT}, got {count}")
    if count is not None and error:
        raise bad_request("scaling action should not contain count if error is true")
    meta = fields.get("Meta")
    if meta is not None and not isinstance(meta, dict):
        raise bad_request("Meta must be an object")
    message = string_field(fields, "Message")
    if len(json.dumps([message, meta])) > MAX_EVENT_BYTES:
        raise bad_request(f"scaling event message and meta exceed {MAX_EVENT_BYTES} bytes")
    _flag(fields, "PolicyOverride")  # Sentinel's; accepted and ignored, as in Nomad CE
    modify_index = _whole(fields, "JobModifyIndex") or 0
    if modify_index < 0:
        raise bad_request("JobModifyIndex must not be negative")
    return ScaleRequest(group=group, count=count, message=message, error=error, meta=meta,
                        job_modify_index=modify_index)


async def scale_status(services: Services, req: ApiRequest) -> Reply:
    server = services.own_server
    index = await block(server, req.query, (Resource.JOBS, Resource.ALLOCATIONS,
                                            Resource.SCALING_EVENTS))
    namespace = request_namespace(req.query)
    job = found_or_404(server.job(req.params["job_id"], namespace), "job not found")
    require(req, job_namespace(job), READ_JOB_SCALING)
    return Reply(server.scaling.status(job, server.job_allocs(job["ID"], namespace)), index)


async def scale_job(services: Services, req: ApiRequest) -> Reply:
    namespace = request_namespace(req.query)
    request = scale_request(await req.json(), req.params["job_id"], namespace)
    with scaling_refusals():
        result = await services.own_server.scaling.scale(namespace, req.params["job_id"], request)
    return Reply({"EvalID": result.eval_id, "EvalCreateIndex": result.eval_create_index,
                  "JobModifyIndex": result.job_modify_index, "Warnings": "",
                  "Index": result.index, "LastContact": 0, "KnownLeader": True,
                  "NextToken": ""}, result.index)


async def list_policies(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = services.own_server
    listing = await list_query(server, req.query, (Resource.JOBS,))
    job_id = req.query.get("job", "")
    type_prefix = req.query.get("type", "")
    return await listing.reply([
        policy_stub(p) for p in server.scaling.policies(server.jobs(listing.namespace))
        if (not job_id or p["Target"]["Job"] == job_id)
        and p.get("Type", "").startswith(type_prefix)
        and allows(req, p["Target"]["Namespace"], LIST_SCALING_POLICIES)])


async def get_policy(services: Services, req: ApiRequest) -> Reply:
    server = services.own_server
    index = await block(server, req.query, (Resource.JOBS,))
    policy = server.scaling.policy(req.params["policy_id"])
    if policy is None or not allows(req, policy["Target"]["Namespace"], READ_SCALING_POLICY):
        # A policy the caller may not read is not told apart from a missing one.
        raise HTTPError(404, "policy not found")
    return Reply(policy_view(policy), index)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/job/{job_id}/scale", scale_status, READ_JOB_SCALING)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}/scale", scale_job, SCALE_JOB)
    routes.add(("GET",), "/v1/scaling/policies", list_policies, LIST_SCALING_POLICIES)
    routes.add(("GET",), "/v1/scaling/policy/{policy_id}", get_policy, READ_SCALING_POLICY)
