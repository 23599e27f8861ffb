"""``job plan``: parse a job file locally, ask the agent for the scheduler's dry run
(``POST /v1/job/:id/plan``) and print it as Nomad does: the job's diff (``+`` added, ``-``
deleted, ``+/-`` edited), the "Scheduler dry-run" section and the job modify index.

Exit codes are Nomad's: 0 when nothing would change, 1 when allocations would be created,
stopped or replaced, 255 on any error.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli.common import CommandError, out, reporting, run_with_client
from nomad_client.cli.job import _parse_job, job_file_parser
from nomad_client.cli.monitor import placement_failure_lines
from nomad_client.goflags import HelpRequested, UsageError

PLAN_ERROR = 255
# Counts that mean allocations would change (an "Ignore" does not).
_CHANGING = ("Stop", "Place", "Migrate", "DestructiveUpdate", "Canary")
_MARKERS = {"Added": "+ ", "Deleted": "- ", "Edited": "+/- "}


def plan_cmd(argv: Sequence[str]) -> int:
    try:
        return _plan(argv)
    except HelpRequested:
        raise
    except (UsageError, CommandError) as exc:
        print(str(exc) if isinstance(exc, CommandError) else f"Error: {exc}", file=sys.stderr)
        return PLAN_ERROR


def _plan(argv: Sequence[str]) -> int:
    p = job_file_parser("job plan", "job plan [options] <path>",
                        "Dry-run a job: show what the scheduler would do, changing nothing.")
    p.add_bool_flag("diff", default=True, help="show the difference from the running job")
    p.add_bool_flag("policy-override", help="accepted for compatibility (no Sentinel)")
    p.add_bool_flag("verbose", help="show unchanged fields of added and deleted objects too")
    ns = p.parse(argv)
    job = _parse_job(ns.path[0], ns.var, ns.var_file)
    ns.client_namespace = job.get("Namespace") or ns.client_namespace

    async def body(client: ApiClient) -> int:
        with reporting("Error during plan"):
            resp = await client.job_plan(job, diff=True, policy_override=ns.policy_override)
        if ns.diff and resp.get("Diff"):
            out(format_job_diff(resp["Diff"], ns.verbose).strip() + "\n")
        out("Scheduler dry-run:")
        out(format_dry_run(resp, job))
        out()
        if resp.get("Warnings"):
            out(f"Job Warnings:\n{resp['Warnings']}\n")
        index = resp.get("JobModifyIndex", 0)
        out(f"Job Modify Index: {index}")
        out("To submit the job only if nobody has changed it since this plan, run:\n\n"
            f"nomad-client job run -check-index {index} {_run_args(ns)}{ns.path[0]}")
        return plan_exit_code(resp)

    return run_with_client(ns, body)


def _run_args(ns: Any) -> str:
    """The flags ``job run`` needs to submit what was planned."""
    args = [*(f'-var="{v}"' for v in ns.var), *(f'-var-file="{f}"' for f in ns.var_file)]
    if ns.namespace:
        args.append(f'-namespace="{ns.namespace}"')
    return "".join(f"{a} " for a in args)


def plan_exit_code(resp: Mapping[str, Any]) -> int:
    if (resp.get("Diff") or {}).get("Type") == "None":
        return 0
    updates = (resp.get("Annotations") or {}).get("DesiredTGUpdates") or {}
    return 1 if any(counts.get(kind, 0) for counts in updates.values()
                    for kind in _CHANGING) else 0


def format_dry_run(resp: Mapping[str, Any], job: Mapping[str, Any]) -> str:
    failed = resp.get("FailedTGAllocs") or {}
    if not failed:
        return "- All tasks successfully allocated."
    system = job.get("Type") == "system"
    lines = ["- WARNING: Failed to place allocations on all nodes." if system
             else "- WARNING: Failed to place all allocations."]
    for group in sorted(failed):
        head, *bullets = placement_failure_lines(group, failed[group])
        lines += [f"  {head}", *(f"  {b}" for b in bullets), ""]
    return "\n".join(lines).rstrip("\n")


# ---- the diff, laid out as Nomad's CLI lays it out --------------------------------------
def _marker(kind: str) -> str:
    return _MARKERS.get(kind, "")


def format_job_diff(diff: Mapping[str, Any], verbose: bool = False) -> str:
    text = f'{_marker(diff["Type"])}Job: "{diff.get("ID", "")}"\n'
    fields, objects = diff.get("Fields") or [], diff.get("Objects") or []
    groups = diff.get("TaskGroups") or []
    longest_field, longest_marker = _longest(fields, objects)
    longest_marker = max([longest_marker, *(len(_marker(g["Type"])) for g in groups)])
    if diff["Type"] == "Edited" or verbose:
        members = _members(fields, objects, 0, longest_field, longest_marker)
        text += members + ("\n" if members else "")
    for group in groups:
        pad = longest_marker - len(_marker(group["Type"]))
        text += _group(group, pad, verbose) + "\n"
    return text


def _group(group: Mapping[str, Any], pad: int, verbose: bool) -> str:
    text = f'{_marker(group["Type"])}{" " * pad}Task Group: "{group["Name"]}"'
    updates = group.get("Updates") or {}
    if updates:
        text += " (" + ", ".join(f"{updates[k]} {k}" for k in sorted(updates)) + ")"
    text += "\n"
    fields, objects = group.get("Fields") or [], group.get("Objects") or []
    tasks = group.get("Tasks") or []
    longest_field, longest_marker = _longest(fields, objects)
    longest_marker = max([longest_marker, *(len(_marker(t["Type"])) for t in tasks)])
    indent = pad + 2
    if group["Type"] == "Edited" or verbose:
        members = _members(fields, objects, indent, longest_field, longest_marker)
        text += members + ("\n" if members else "")
    for task in tasks:
        text += _task(task, indent, longest_marker - len(_marker(task["Type"])), verbose) + "\n"
    return text


def _task(task: Mapping[str, Any], indent: int, pad: int, verbose: bool) -> str:
    text = f'{" " * indent}{_marker(task["Type"])}{" " * pad}Task: "{task["Name"]}"'
    if task.get("Annotations"):
        text += f" ({', '.join(task['Annotations'])})"
    if task["Type"] == "None" or (task["Type"] in ("Added", "Deleted") and not verbose):
        return text
    fields, objects = task.get("Fields") or [], task.get("Objects") or []
    return text + "\n" + _members(fields, objects, indent + 2, *_longest(fields, objects))


def _object(obj: Mapping[str, Any], indent: int, pad: int) -> str:
    marker = _marker(obj["Type"])
    fields, objects = obj.get("Fields") or [], obj.get("Objects") or []
    text = f'{" " * indent}{marker}{" " * pad}{obj["Name"]} {{\n'
    text += _members(fields, objects, indent + pad + 2, *_longest(fields, objects))
    return f'{text}\n{" " * (indent + len(marker) + pad)}}}'


def _field(field: Mapping[str, Any], indent: int, pad: int, value_pad: int) -> str:
    kind = field["Type"]
    text = f'{" " * indent}{_marker(kind)}{" " * pad}{field["Name"]}: {" " * value_pad}'
    if kind == "Deleted":
        text += _quoted(field.get("Old"))
    elif kind == "Edited":
        text += f'{_quoted(field.get("Old"))} => {_quoted(field.get("New"))}'
    else:
        text += _quoted(field.get("New"))
    if field.get("Annotations"):
        text += f" ({', '.join(field['Annotations'])})"
    return text


def _members(fields: Sequence[Mapping[str, Any]], objects: Sequence[Mapping[str, Any]],
             indent: int, longest_field: int, longest_marker: int) -> str:
    lines = [_field(f, indent, longest_marker - len(_marker(f["Type"])),
                    longest_field - len(f["Name"])) for f in fields]
    lines += [_object(o, indent, longest_marker - len(_marker(o["Type"]))) for o in objects]
    return "\n".join(lines)


def _longest(fields: Sequence[Mapping[str, Any]], objects: Sequence[Mapping[str, Any]]
             ) -> tuple[int, int]:
    longest_field = max((len(f["Name"]) for f in fields), default=0)
    longest_marker = max((len(_marker(x["Type"])) for x in (*fields, *objects)), default=0)
    return longest_field, longest_marker


def _quoted(value: Any) -> str:
    """A value quoted as Go's %q quotes a string."""
    text = str(value or "")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


COMMANDS = {"plan": plan_cmd}
