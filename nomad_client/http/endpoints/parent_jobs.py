"""What parent jobs do on request: ``PUT|POST /v1/job/:id/dispatch`` (dispatch a
parameterized job: capability ``dispatch-job``) and ``PUT|POST /v1/job/:id/periodic/force``
(launch a periodic job's child now: ``submit-job``, ``dispatch-job`` or
``force-periodic-job``). The server does the work (``server.dispatch``,
``server.periodic``); here are the request checks, with Nomad's messages.

Where we differ from Nomad: a dispatch or force the job does not allow is 400 (Nomad: 500),
an unknown job 404.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import Iterator
from typing import Any

from nomad_client.http.auth import Need, request_namespace
from nomad_client.http.bodyfields import object_fields, string_field, string_map_field
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import bad_request, not_found
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.server.dispatch import DispatchError, ParentNotFound
from nomad_client.server.periodic import PeriodicError, PeriodicJobNotFound

DISPATCH_JOB = Need.namespace("dispatch-job")
FORCE_PERIODIC = Need.namespace("submit-job", "dispatch-job", "force-periodic-job")

DISPATCH_FIELDS = ("JobID", "Payload", "Meta", "IdempotencyToken", "IdPrefixTemplate",
                   "Priority", "Region", "Namespace", "SecretID")
# Longest idempotency token kept with a child job.
MAX_TOKEN_CHARS = 256
# An ID prefix template becomes part of a job ID (and so of URL paths).
_ID_PREFIX_TEMPLATE = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")


@contextlib.contextmanager
def parent_job_refusals() -> Iterator[None]:
    try:
        yield
    except (ParentNotFound, PeriodicJobNotFound) as err:
        raise not_found(str(err)) from None
    except (DispatchError, PeriodicError) as err:
        raise bad_request(str(err)) from None


def _payload(fields: dict[str, Any]) -> bytes | None:
    text = string_field(fields, "Payload")
    if not text:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("Payload must be base64-encoded") from None


def _priority(fields: dict[str, Any]) -> int | None:
    value = fields.get("Priority", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("Priority must be a whole number")
    if value and not 1 <= value <= 100:
        raise bad_request("dispatch job priority must be between [1, 100]")
    return value or None


async def dispatch(services: Services, req: ApiRequest) -> Reply:
    job_id = req.params["job_id"]
    fields = object_fields(await req.json(), DISPATCH_FIELDS)
    if string_field(fields, "JobID") not in ("", job_id):
        raise bad_request("Job ID does not match")
    token = req.query.get("idempotency_token") or string_field(fields, "IdempotencyToken")
    if len(token) > MAX_TOKEN_CHARS:
        raise bad_request(f"IdempotencyToken is longer than {MAX_TOKEN_CHARS} characters")
    template = string_field(fields, "IdPrefixTemplate")
    if template and not _ID_PREFIX_TEMPLATE.match(template):
        raise bad_request("IdPrefixTemplate may hold only letters, digits, '.', '_' and '-' "
                          "(1 to 64)")
    payload, meta = _payload(fields), string_map_field(fields, "Meta")
    priority = _priority(fields)
    with parent_job_refusals():
        result = await services.own_server.dispatcher.dispatch(
            request_namespace(req.query), job_id, payload, meta, token,
            id_prefix_template=template, priority=priority)
    return Reply({"DispatchedJobID": result.dispatched_job_id, "EvalID": result.eval_id,
                  "EvalCreateIndex": result.eval_create_index,
                  "JobCreateIndex": result.job_create_index, "Index": result.index},
                 result.index)


async def force_periodic(services: Services, req: ApiRequest) -> Reply:
    with parent_job_refusals():
        eval_id, index = await services.own_server.periodic.force(request_namespace(req.query),
                                                              req.params["job_id"])
    return Reply({"EvalID": eval_id, "EvalCreateIndex": index if eval_id else 0,
                  "Index": index}, index)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}/dispatch", dispatch, DISPATCH_JOB)
    routes.add(("PUT", "POST"), "/v1/job/{job_id}/periodic/force", force_periodic,
               FORCE_PERIODIC)
