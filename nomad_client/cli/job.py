"""``job`` commands: run (parse locally, register, monitor), status, stop.

Reads the job file and variable files named on the command line; everything else goes
through the agent API. Jobs are addressed in the namespace of ``-namespace`` (or
``$NOMAD_NAMESPACE``); ``run`` submits into the job's own ``namespace`` when it names one;
``status`` and ``stop`` take ``*`` to find a job in any namespace.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nomad_client.api import ApiClient, ApiError
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    ALL_NAMESPACES,
    CommandError,
    CommandParser,
    out,
    reporting,
    resolve_item,
    run_with_client,
)
from nomad_client.cli.monitor import monitor_evaluation

# Overall limit for following an evaluation and its allocations.
MONITOR_TIMEOUT = 60.0


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandError(f'Error reading {what} "{path}": no such file or directory') from None
    except IsADirectoryError:
        raise CommandError(f'Error reading {what} "{path}": is a directory') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f'Error reading {what} "{path}": {exc}') from None


def _parse_job(path: str, var_flags: Sequence[str], var_files: Sequence[str]) -> dict[str, Any]:
    try:
        from nomad_client.jobspec import JobspecError, parse_jobspec, parse_var_assignments
    except ImportError as exc:
        raise CommandError(f"Error getting job struct: jobspec parser unavailable ({exc})") \
            from None
    text = _read(path, "job file")
    # Each file is parsed on its own: a later file overrides an earlier one, and
    # errors point at the file and line they are in.
    files = [(f, _read(f, "variable file")) for f in var_files]
    try:
        variables = parse_var_assignments(list(var_flags)) if var_flags else None
        return parse_jobspec(text, path, variables, var_files=files)
    except JobspecError as exc:
        raise CommandError(f"Error getting job struct: {exc}") from None


def run_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("job run", "job run [options] <path>",
                      "Parse a job file locally, submit it, and monitor the evaluation.",
                      namespaced=True)
    p.add_positionals("path", 1, 1, help="job file")
    p.add_flag("var", action="append", default=[], metavar="KEY=VALUE",
               help="set an input variable (repeatable)")
    p.add_flag("var-file", action="append", default=[], metavar="FILE",
               help="file of input variable values (repeatable)")
    p.add_bool_flag("detach", help="return right after submitting, without monitoring")
    p.add_bool_flag("verbose", help="show full IDs")
    ns = p.parse(argv)
    job = _parse_job(ns.path[0], ns.var, ns.var_file)
    # The job's own namespace wins over the flag: every request of the run goes there.
    ns.client_namespace = job.get("Namespace") or ns.client_namespace

    async def body(client: ApiClient) -> int:
        with reporting("Error submitting job"):
            resp = await client.job_register(job)
        warnings = (resp or {}).get("Warnings")
        if warnings:
            out(f"Job Warnings:\n{warnings}\n")
        return await report_or_monitor(client, resp, ns, "Job registration successful")

    return run_with_client(ns, body)


async def report_or_monitor(client: ApiClient, resp: Any, ns: argparse.Namespace,
                            success: str) -> int:
    """After a write that may have made an evaluation (``resp``'s ``EvalID``): with
    ``-detach``, or when there is none, print ``success`` and the evaluation's ID; else
    monitor it (``-verbose``: full IDs)."""
    eval_id = (resp or {}).get("EvalID") or ""
    if ns.detach or not eval_id:
        out(success)
        if eval_id:
            out(f"Evaluation ID: {eval_id}")
        return 0
    return await monitor_evaluation(client, eval_id, verbose=ns.verbose,
                                    time_limit=MONITOR_TIMEOUT)


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    """The job list; with a Namespace column when it holds more than one namespace."""
    namespaces = len({j.get("Namespace") for j in jobs}) > 1
    return fmt.table(
        ["ID", *(["Namespace"] if namespaces else []), "Type", "Priority", "Status",
         "Submit Date"],
        [[j.get("ID"), *([j.get("Namespace")] if namespaces else []), j.get("Type"),
          j.get("Priority"), j.get("Status"), fmt.format_unix_nanos(j.get("SubmitTime"))]
         for j in jobs],
    )


async def resolve_job(client: ApiClient, ident: str, kind: str = "job",
                      keep: Callable[[dict[str, Any]], bool] | None = None) -> str:
    """The full ID of the one job whose ID is or starts with ``ident``, in the client's
    namespace (of those ``keep`` keeps; ``kind`` names them in errors). With ``*`` it is
    looked for in every namespace, and the client's later requests go to the namespace it
    was found in."""
    async def listed() -> list[dict[str, Any]]:
        jobs = await client.jobs_list(prefix=ident) or []
        return [job for job in jobs if keep is None or keep(job)]

    stub = await resolve_item(listed(), ident, kind, "jobs", _jobs_table)
    if client.default_namespace == ALL_NAMESPACES:
        client.default_namespace = stub.get("Namespace") or None
    return str(stub["ID"])


def _allocs_table(allocs: list[dict[str, Any]], verbose: bool) -> str:
    allocs = sorted(allocs, key=lambda a: a.get("CreateIndex", 0), reverse=True)
    return fmt.table(
        ["ID", "Node ID", "Task Group", "Version", "Desired", "Status", "Created",
         "Modified"],
        [[fmt.short_id(a.get("ID"), verbose), fmt.short_id(a.get("NodeID"), verbose),
          a.get("TaskGroup"), a.get("JobVersion"), a.get("DesiredStatus"),
          a.get("ClientStatus"),
          _when(a.get("CreateTime"), verbose), _when(a.get("ModifyTime"), verbose)]
         for a in allocs],
    )


def _when(ns: Any, verbose: bool) -> str:
    return fmt.format_unix_nanos(ns) if verbose else fmt.pretty_time_diff(ns)


_SUMMARY_COLUMNS = ["Queued", "Starting", "Running", "Failed", "Complete", "Lost", "Unknown"]


async def _show_job(client: ApiClient, job_id: str, verbose: bool) -> None:
    with reporting("Error querying job"):
        job = await client.job_get(job_id)
        allocs = await client.job_allocations(job_id)
        try:
            summary = await client.job_summary(job_id)
        except ApiError:
            summary = None  # the summary is optional decoration
    out(fmt.kv([
        ("ID", job.get("ID")),
        ("Name", job.get("Name")),
        ("Submit Date", fmt.format_unix_nanos(job.get("SubmitTime"))),
        ("Type", job.get("Type")),
        ("Priority", job.get("Priority")),
        ("Datacenters", ",".join(job.get("Datacenters") or [])),
        ("Namespace", job.get("Namespace")),
        ("Node Pool", job.get("NodePool")),
        ("Status", job.get("Status")),
        ("Periodic", bool(job.get("Periodic"))),
        ("Parameterized", bool(job.get("ParameterizedJob"))),
    ]))
    groups = (summary or {}).get("Summary") or {}
    if groups:
        out("\nSummary")
        out(fmt.table(["Task Group", *_SUMMARY_COLUMNS],
                      [[g, *[groups[g].get(c, 0) for c in _SUMMARY_COLUMNS]]
                       for g in sorted(groups)]))
    out("\nAllocations")
    out(_allocs_table(allocs, verbose) if allocs else "No allocations placed")


def status_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("job status", "job status [options] [job]",
                      "List jobs, or show one job and its allocations.", namespaced=True,
                      wildcard_ok=True)
    p.add_positionals("job", 0, 1)
    p.add_bool_flag("verbose", help="show full IDs and exact times")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        if not ns.job:
            with reporting("Error querying jobs"):
                jobs = await client.jobs_list()
            out(_jobs_table(jobs) if jobs else "No running jobs")
            return 0
        with reporting("Error querying job"):
            job_id = await resolve_job(client, ns.job[0])
        await _show_job(client, job_id, ns.verbose)
        return 0

    return run_with_client(ns, body)


def stop_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("job stop", "job stop [options] <job>",
                      "Stop a job (and with -purge remove it) and monitor the evaluation.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("job", 1, 1)
    p.add_bool_flag("purge", help="remove the job immediately instead of keeping it dead")
    p.add_bool_flag("detach", help="return right after submitting, without monitoring")
    p.add_bool_flag("verbose", help="show full IDs")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error deregistering job"):
            job_id = await resolve_job(client, ns.job[0])
            resp = await client.job_deregister(job_id, purge=ns.purge)
        eval_id = (resp or {}).get("EvalID") or ""
        if ns.detach or not eval_id:
            if eval_id:
                out(eval_id)
            return 0
        return await monitor_evaluation(client, eval_id, verbose=ns.verbose,
                                        wait_allocs=False, time_limit=MONITOR_TIMEOUT)

    return run_with_client(ns, body)


COMMANDS = {"run": run_cmd, "status": status_cmd, "stop": stop_cmd}
