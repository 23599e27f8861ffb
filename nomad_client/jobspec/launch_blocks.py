"""Defaults and validation of the blocks that say how a job is launched: ``periodic`` and
``parameterized`` (job), ``scaling`` (group) and ``dispatch_payload`` (task), as Nomad's
Canonicalize and Validate treat them; ``canonical`` calls in here for every job.

Also refuses, in a submitted job, what only the server may set on the children it derives
from a parent (``ParentID``, ``Dispatched``, ``Payload``): a job claiming a parent would get
that parent's ACL policies for its workload identities. Pure computation.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

from nomad_client.jobspec.cron import CronError, parse_cron, parse_time_zone
from nomad_client.jobspec.errors import short_repr
from nomad_client.jobspec.walk import object_groups as _groups
from nomad_client.jobspec.walk import object_tasks as _tasks

PAYLOAD_MODES = ("optional", "required", "forbidden")
LAUNCHED_TYPES = ("batch", "sysbatch")  # periodic and parameterized jobs
SCALING_TYPE = "horizontal"
SPEC_TYPE = "cron"
# Where a dispatched payload is written, relative to the task dir.
PAYLOAD_DIR = "local"

_PERIODIC_DEFAULTS: dict[str, Any] = {"Enabled": True, "Spec": "", "Specs": [],
                                      "SpecType": SPEC_TYPE, "ProhibitOverlap": False,
                                      "TimeZone": "UTC"}
_PARAMETERIZED_DEFAULTS: dict[str, Any] = {"Payload": "optional", "MetaRequired": [],
                                           "MetaOptional": []}
_SCALING_INVALID = "Task group scaling policy validation failed: Scaling policy invalid: "


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _filled(defaults: Mapping[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    # Fresh lists per job: filled-in jobs must not share a mutable default.
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def fill_launch_blocks(job: dict[str, Any]) -> None:
    """Fill the defaults of the blocks a job, its groups and tasks have (None: no block)."""
    for key, defaults in (("Periodic", _PERIODIC_DEFAULTS),
                          ("ParameterizedJob", _PARAMETERIZED_DEFAULTS)):
        block = job.get(key)
        job[key] = _filled(defaults, block) if isinstance(block, dict) else block
    for group in _groups(job):
        scaling = group.get("Scaling")
        if isinstance(scaling, dict):
            # Nomad: an unset minimum is the group's count; an unset maximum is invalid.
            scaling = _filled({"Enabled": True, "Type": SCALING_TYPE, "Policy": {},
                               "Min": group.get("Count"), "Max": None}, scaling)
        group["Scaling"] = scaling
        for task in _tasks(group):
            task.setdefault("DispatchPayload", None)


def launch_block_problems(job: Mapping[str, Any]) -> list[str]:
    """Every problem of a filled job's launch blocks, each as ``where: message``."""
    problems: list[str] = []
    launched = job.get("Type") in LAUNCHED_TYPES
    problems.extend(_child_fields(job))
    periodic = job.get("Periodic")
    if periodic is not None:
        problems.extend(_periodic(periodic, launched))
    parameterized = job.get("ParameterizedJob")
    if parameterized is not None:
        problems.extend(_parameterized(parameterized, launched))
    for group in _groups(job):
        where = f"group {group.get('Name')!r}"
        scaling = group.get("Scaling")
        if scaling is not None:
            if job.get("Type") == "system":
                problems.append(f"{where}: Task groups with job type system do not support "
                                "scaling blocks")
            else:
                problems.extend(f"{where}: {p}" for p in _scaling(scaling, group.get("Count")))
        for task in _tasks(group):
            payload = task.get("DispatchPayload")
            if payload is not None:
                problems.extend(f"{where} task {task.get('Name')!r}: {p}"
                                for p in _dispatch_payload(payload))
    return problems


def _child_fields(job: Mapping[str, Any]) -> Iterator[str]:
    if job.get("Dispatched"):
        yield "job can't be submitted with 'Dispatched' set"
    if job.get("ParentID"):
        yield "job can't be submitted with a ParentID: only the server derives child jobs"
    if job.get("Payload"):
        yield "job can't be submitted with a Payload: dispatch the job to give it one"


def _periodic(periodic: Any, launched: bool) -> Iterator[str]:
    if not isinstance(periodic, dict):
        yield f"Periodic must be an object, got {short_repr(periodic)}"
        return
    for key in ("Enabled", "ProhibitOverlap"):
        if not isinstance(periodic[key], bool):
            yield f"periodic: {key} must be a bool, got {short_repr(periodic[key])}"
    if periodic["Enabled"] is False:
        return  # Nomad validates only what it will launch
    if not launched:
        yield 'Periodic can only be used with "batch" or "sysbatch" scheduler'
    if periodic["SpecType"] != SPEC_TYPE:
        yield f"Unknown periodic specification type {short_repr(periodic['SpecType'])}"
        return
    spec, specs = periodic["Spec"], periodic["Specs"]
    if not isinstance(spec, str):
        yield f"periodic: cron must be a string, got {short_repr(spec)}"
        return
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        yield "periodic: crons must be a list of strings"
        return
    if spec and specs:
        yield "Only cron or crons may be used"
    elif not spec and not specs:
        yield "Must specify a spec"
    for text in [spec] if spec else specs:
        try:
            parse_cron(text)
        except CronError as err:
            yield str(err)
    zone = periodic["TimeZone"]
    if not isinstance(zone, str):
        yield f"periodic: time_zone must be a string, got {short_repr(zone)}"
        return
    try:
        parse_time_zone(zone)
    except CronError as err:
        yield str(err)


def _parameterized(parameterized: Any, launched: bool) -> Iterator[str]:
    if not isinstance(parameterized, dict):
        yield f"ParameterizedJob must be an object, got {short_repr(parameterized)}"
        return
    if not launched:
        yield 'Parameterized job can only be used with "batch" or "sysbatch" scheduler'
    payload = parameterized["Payload"]
    if payload not in PAYLOAD_MODES:
        yield (f"Unknown payload requirement: {short_repr(payload)} (expected one of "
               f"{', '.join(PAYLOAD_MODES)})")
    keys: dict[str, list[str]] = {}
    for field in ("MetaRequired", "MetaOptional"):
        value = parameterized[field]
        if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
            yield f"parameterized: {field} must be a list of non-empty strings"
        else:
            keys[field] = value
    both = sorted(set(keys.get("MetaRequired", ())) & set(keys.get("MetaOptional", ())))
    if both:
        yield ("Required and optional meta keys should be disjoint. Following keys exist in "
               f"both: [{' '.join(both)}]")


def _scaling(scaling: Any, count: Any) -> Iterator[str]:
    if not isinstance(scaling, dict):
        yield f"Scaling must be an object, got {short_repr(scaling)}"
        return
    if not isinstance(scaling["Enabled"], bool):
        yield f"scaling: Enabled must be a bool, got {short_repr(scaling['Enabled'])}"
    if scaling["Type"] != SCALING_TYPE:
        yield (f"scaling: unsupported policy type {short_repr(scaling['Type'])} (only "
               f"{SCALING_TYPE!r})")
    if not isinstance(scaling["Policy"], dict):
        yield f"scaling: policy must be an object, got {short_repr(scaling['Policy'])}"
    low, high = scaling["Min"], scaling["Max"]
    low_ok, high_ok = _is_int(low) and low >= 0, _is_int(high) and high >= 0
    if not high_ok:
        yield _SCALING_INVALID + "maximum count must be specified and non-negative"
    if not low_ok:
        yield _SCALING_INVALID + "minimum count must be specified and non-negative"
    if not (low_ok and high_ok):
        return
    if high < low:
        yield _SCALING_INVALID + "maximum count must not be less than minimum count"
    if _is_int(count):
        if count > high:
            yield (_SCALING_INVALID + "task group count must not be greater than maximum "
                   "count in scaling policy")
        if count < low:
            yield (_SCALING_INVALID + "task group count must not be less than minimum count "
                   "in scaling policy")


def payload_path(file: str) -> str | None:
    """Where ``dispatch_payload { file }`` puts the payload, relative to the task dir
    (``local/...``, normalised as Nomad joins it); None when it would leave ``local/``."""
    if not isinstance(file, str) or not file or "\x00" in file:
        return None
    joined = posixpath.normpath(f"{PAYLOAD_DIR}/{file}")
    if not joined.startswith(PAYLOAD_DIR + "/"):
        return None
    return joined


def _dispatch_payload(payload: Any) -> Iterator[str]:
    if not isinstance(payload, dict):
        yield f"DispatchPayload must be an object, got {short_repr(payload)}"
        return
    file = payload.get("File")
    if not isinstance(file, str) or not file:
        yield "Dispatch Payload validation failed: file must name a file inside local/"
    elif payload_path(file) is None:
        yield "Dispatch Payload validation failed: destination escapes allocation directory"
