"""``job history``, ``job revert``, ``job inspect``, ``job validate`` and ``job eval``: a
job's versions and the writes and checks around them, as Nomad's CLI has them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    CommandError,
    CommandParser,
    out,
    print_formatted,
    reporting,
    run_with_client,
)
from nomad_client.cli.job import (
    add_monitor_flags,
    job_file_parser,
    job_parser,
    job_write_cmd,
    read_job_file,
    resolve_job,
)


def _version_flag(p: CommandParser, help: str) -> None:
    p.add_flag("version", type=int, default=None, metavar="N", help=help)


def _version_arg(raw: str) -> int:
    if not raw.isdigit():
        raise CommandError(f"The job version to revert to must be a non-negative integer: "
                           f"{raw!r}")
    return int(raw)


def _version_kv(version: dict[str, Any]) -> str:
    return fmt.kv([("Version", version.get("Version")),
                   ("Stable", str(bool(version.get("Stable"))).lower()),
                   ("Submit Date", fmt.format_unix_nanos(version.get("SubmitTime")))])


def history_cmd(argv: Sequence[str]) -> int:
    p = job_parser("job history", "job history [options] <job>",
                   "Show the kept versions of a job, newest first.")
    p.add_bool_flag("full", help="print each version in full")
    p.add_bool_flag("p", dest="diff", help="(accepted; this agent computes no diffs)")
    _version_flag(p, "show only this version")
    p.add_format_flags("versions")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error retrieving job versions"):
            job_id = await resolve_job(client, ns.job[0])
            versions = (await client.job_versions(job_id)).get("Versions") or []
        if ns.version is not None:
            versions = [v for v in versions if v.get("Version") == ns.version]
            if not versions:
                raise CommandError(f"Job version {ns.version} not found")
        if print_formatted(ns, versions):
            return 0
        for n, version in enumerate(versions):
            if n:
                out()
            out(json.dumps(version, indent=4) if ns.full else _version_kv(version))
        return 0

    return run_with_client(ns, body)


def revert_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("job revert", "job revert [options] <job> <version>",
                      "Register an earlier version of a job again, as its newest version.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 2, 2)
    add_monitor_flags(p)
    ns = p.parse(argv)
    version = _version_arg(ns.args[1])
    return job_write_cmd(ns, ns.args[0], "Error retrieving job version",
                         lambda client, job_id: client.job_revert(job_id, version),
                         "Job reverted")


def inspect_cmd(argv: Sequence[str]) -> int:
    p = job_parser("job inspect", "job inspect [options] <job>",
                   "Print a job (or one of its versions) as the API's JSON.")
    _version_flag(p, "print this version of the job")
    p.add_format_flags("job")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error inspecting job"):
            job_id = await resolve_job(client, ns.job[0])
            job = (await client.job_get(job_id) if ns.version is None
                   else await client.job_version(job_id, ns.version))
        if not print_formatted(ns, job):
            out(json.dumps({"Job": job}, indent=4))  # as Nomad prints it: ready to run
        return 0

    return run_with_client(ns, body)


def validate_cmd(argv: Sequence[str]) -> int:
    p = job_file_parser("job validate", "job validate [options] <path>",
                        "Check a job file, locally and by the agent, without submitting it.")
    p.add_bool_flag("json", help="the job file is JSON")
    ns = p.parse(argv)
    job, _ = read_job_file(ns.path[0], ns.var, ns.var_file, as_json=ns.json)
    ns.client_namespace = job.get("Namespace") or ns.client_namespace

    async def body(client: ApiClient) -> int:
        with reporting("Error validating job"):
            resp = await client.job_validate(job)
        problems = resp.get("ValidationErrors") or []
        if problems or resp.get("Error"):
            lines = [f"* {p}" for p in problems] or [resp.get("Error")]
            raise CommandError("Job validation errors:\n" + "\n".join(lines))
        if resp.get("Warnings"):
            out(f"Job Warnings:\n{resp['Warnings']}\n")
        out("Job validation successful")
        return 0

    return run_with_client(ns, body)


def eval_cmd(argv: Sequence[str]) -> int:
    p = job_parser("job eval", "job eval [options] <job>",
                   "Create a new evaluation of a job and monitor it.")
    p.add_bool_flag("force-reschedule", help="replace failed allocations now")
    add_monitor_flags(p)
    ns = p.parse(argv)
    return job_write_cmd(
        ns, ns.job[0], "Error evaluating job",
        lambda client, job_id: client.job_evaluate(job_id,
                                                   force_reschedule=ns.force_reschedule),
        "Evaluation created")


COMMANDS = {"history": history_cmd, "revert": revert_cmd, "inspect": inspect_cmd,
            "validate": validate_cmd, "eval": eval_cmd}
