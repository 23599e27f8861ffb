"""``job scale [options] <job> [<group>] <count>`` and ``scaling policy list|info``, with
Nomad's flags and output.

``job scale`` may leave out the group only when the job has one; it sends Nomad's CLI
message ("submitted using the Nomad CLI") and monitors the evaluation unless ``-detach`` (a
periodic or parameterized parent gets none).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    Command,
    CommandError,
    CommandParser,
    command_group,
    out,
    print_formatted,
    reporting,
    resolve_item,
    run_with_client,
)
from nomad_client.cli.job import report_or_monitor, resolve_job

CLI_MESSAGE = "submitted using the Nomad CLI"


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise CommandError(f"Failed to convert count string to int: {text}") from None
    if count < 0:
        raise CommandError("Count must not be negative")
    return count


def _group_of(job: Mapping[str, Any], wanted: str | None) -> str:
    names = [g.get("Name") for g in job.get("TaskGroups") or ()]
    if wanted is None:
        if len(names) != 1:
            raise CommandError("Group name required")
        return str(names[0])
    if wanted not in names:
        raise CommandError(f"Group {wanted} not found within job")
    return wanted


def scale_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("job scale", "job scale [options] <job> [<group>] <count>",
                      "Change the count of a job's task group (a new job version) and "
                      "monitor the evaluation.", namespaced=True)
    p.add_positionals("args", 2, 3)
    p.add_flag("check-index", type=int, default=0, metavar="INDEX",
               help="scale only if the job's modify index is still INDEX")
    p.add_bool_flag("detach", help="return right after submitting, without monitoring")
    p.add_bool_flag("verbose", help="show full IDs")
    ns = p.parse(argv)
    ident, *rest = ns.args
    count = _count(rest[-1])

    async def body(client: ApiClient) -> int:
        with reporting("Error querying job"):
            job_id = await resolve_job(client, ident)
            job = await client.job_get(job_id)
        group = _group_of(job, rest[0] if len(rest) == 2 else None)
        with reporting("Error submitting scaling request"):
            resp = await client.job_scale(job_id, group, count, message=CLI_MESSAGE,
                                          check_index=ns.check_index)
        return await report_or_monitor(client, resp, ns, "Job scale successful")

    return run_with_client(ns, body)


def _target(policy: Mapping[str, Any]) -> str:
    target = policy.get("Target") or {}
    return ",".join(f"{k}:{target[k]}" for k in ("Namespace", "Job", "Group") if k in target)


def _policies_table(policies: list[dict[str, Any]], verbose: bool = False) -> str:
    return fmt.table(["ID", "Enabled", "Type", "Target"],
                     [[fmt.short_id(p.get("ID"), verbose), p.get("Enabled"), p.get("Type"),
                       _target(p)] for p in policies])


def policy_list_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("scaling policy list", "scaling policy list [options]",
                      "List scaling policies.", namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 0, 0)
    p.add_flag("job", default="", metavar="JOB", help="only the policies of this job")
    p.add_flag("type", default="", metavar="TYPE", help="only policies of this type")
    p.add_format_flags("policies")
    p.add_bool_flag("verbose", help="show full IDs")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error listing scaling policies"):
            policies = await client.scaling_policies(job=ns.job or None,
                                                     policy_type=ns.type or None)
        if not print_formatted(ns, policies):
            out(_policies_table(policies, ns.verbose) if policies
                else "No policies found")
        return 0

    return run_with_client(ns, body)


def policy_info_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("scaling policy info", "scaling policy info [options] <policy_id>",
                      "Show a scaling policy.", namespaced=True)
    p.add_positionals("args", 1, 1)
    p.add_format_flags("policy")
    ns = p.parse(argv)
    ident = ns.args[0]

    async def body(client: ApiClient) -> int:
        with reporting("Error querying scaling policy"):
            stub = await resolve_item(client.scaling_policies(prefix=ident), ident,
                                      "scaling policy",
                                      "scaling policies", _policies_table)
            policy = await client.scaling_policy(str(stub["ID"]))
        if print_formatted(ns, policy):
            return 0
        out(fmt.kv([("ID", policy.get("ID")), ("Enabled", policy.get("Enabled")),
                    ("Target", _target(policy)), ("Min", policy.get("Min")),
                    ("Max", policy.get("Max"))]))
        out("\nPolicy:")
        out(json.dumps(policy.get("Policy") or {}, indent=4))
        return 0

    return run_with_client(ns, body)


JOB_COMMANDS: Mapping[str, Command] = {"scale": scale_cmd}
COMMANDS: Mapping[str, Command] = {
    "policy": command_group("scaling policy", {"list": policy_list_cmd,
                                               "info": policy_info_cmd}),
}
