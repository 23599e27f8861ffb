"""The job of a register or plan request body: checked against the path, put in the
namespace Nomad's precedence picks, canonicalized, and the caller's right to submit it
checked."""

from __future__ import annotations

from typing import Any

from nomad_client.http.auth import DEFAULT_NAMESPACE, Need, require
from nomad_client.http.errors import bad_request
from nomad_client.http.router import ApiRequest
from nomad_client.jobspec import JobValidationError, canonicalize_job
from nomad_client.structs.namespaces import NAMESPACE_NAME


def submitted_job(req: ApiRequest, body: dict[str, Any], need: Need, *, region: str
                  ) -> tuple[dict[str, Any], str]:
    """The canonical job of ``body`` and its namespace, once the caller is known to hold
    ``need`` there. ``region``: the agent's, the only one a job may be submitted to."""
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
    # Nomad's precedence again; a job names no region of its own until it reaches one.
    job_region = (req.query.get("region") or body.get("Region") or job.get("Region")
                  or region)
    if job_region != region:
        raise bad_request("No path to region")
    try:
        job = canonicalize_job({**job, "Namespace": namespace, "Region": region})
    except JobValidationError as err:
        raise bad_request(str(err)) from None
    if not isinstance(namespace, str) or not NAMESPACE_NAME.fullmatch(namespace):
        raise bad_request("invalid namespace: a namespace name is 1 to 128 letters, digits "
                          "and dashes")
    # The caller's right first: the namespace's existence is not told to just anyone.
    require(req, namespace, need)
    return job, namespace
