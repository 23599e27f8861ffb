"""The body of a job registration (Nomad's ``JobRegisterRequest``), read as Nomad reads it.

A key Nomad's request does not know is ignored, as Go's JSON decoder ignores it; a key it
knows that this agent does not implement is refused (400, naming it) when it asks for
something, so a caller never believes it was honoured. ``EnforceIndex`` with
``JobModifyIndex`` and the ``Submission`` (the source the job was made from) are read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from nomad_client.http.errors import bad_request

# Every key of Nomad's JobRegisterRequest (with its WriteRequest).
REGISTER_KEYS = frozenset({
    "Job", "Submission", "EnforceIndex", "JobModifyIndex", "PolicyOverride", "PreserveCounts",
    "PreserveResources", "EvalPriority", "Region", "Namespace", "SecretID", "IdempotencyToken"})
# Known, not implemented: refused unless left at their zero value.
UNIMPLEMENTED_KEYS = ("PolicyOverride", "PreserveCounts", "PreserveResources", "EvalPriority")
_SUBMISSION_TEXT = ("Source", "Format", "Variables")
# The largest source kept with a version (Nomad's default job_max_source_size is 1 MB).
MAX_SOURCE_BYTES = 1024 * 1024


@attrs.frozen
class RegisterOptions:
    # The JobModifyIndex the job must have (0: must not exist); None: not enforced.
    enforce_index: int | None = None
    submission: Mapping[str, Any] | None = None


def register_request(body: Any) -> tuple[dict[str, Any], RegisterOptions]:
    """The known keys of ``body`` and the options they ask for (400 for what cannot be)."""
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    known = {k: v for k, v in body.items() if k in REGISTER_KEYS}
    for key in UNIMPLEMENTED_KEYS:
        if known.get(key):
            raise bad_request(f"{key} is not supported by this agent")
    return known, RegisterOptions(enforce_index=_enforced_index(known),
                                  submission=_submission(known.get("Submission")))


def _enforced_index(body: Mapping[str, Any]) -> int | None:
    index = body.get("JobModifyIndex") or 0
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise bad_request("JobModifyIndex must be a non-negative integer")
    enforce = body.get("EnforceIndex") or False
    if not isinstance(enforce, bool):
        raise bad_request("EnforceIndex must be a boolean")
    return index if enforce else None


def _submission(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad_request("Submission must be an object")
    submission: dict[str, Any] = {}
    for key in _SUBMISSION_TEXT:
        value = raw.get(key) or ""
        if not isinstance(value, str):
            raise bad_request(f"Submission.{key} must be a string")
        submission[key] = value
    flags = raw.get("VariableFlags") or {}
    if not isinstance(flags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in flags.items()):
        raise bad_request("Submission.VariableFlags must map names to strings")
    submission["VariableFlags"] = dict(flags)
    size = sum(len(submission[k].encode()) for k in _SUBMISSION_TEXT)
    if size > MAX_SOURCE_BYTES:
        # Nomad drops an oversized source (with a warning) rather than refuse the job.
        return None
    return submission if submission["Source"] else None
