"""``job`` commands: run (parse locally, register, monitor), status, stop.

Reads the job file and variable files named on the command line; everything else goes
through the agent API. Jobs are addressed in the namespace of ``-namespace`` (or
``$NOMAD_NAMESPACE``); ``run`` submits into the job's own ``namespace`` when it names one;
``status`` and ``stop`` take ``*`` to find a job in any namespace.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from nomad_client.api import ApiClient, ApiConnectionError, ApiError
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    ALL_NAMESPACES,
    CommandError,
    CommandParser,
    out,
    print_formatted,
    reporting,
    resolve_item,
    run_with_client,
)
from nomad_client.cli.monitor import monitor_evaluation

# Nomad's RegisterEnforceIndexErrPrefix: what a refused ``-check-index`` answers.
ENFORCE_INDEX_PREFIX = "Enforcing job modify index"
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


def read_job_file(path: str, var_flags: Sequence[str], var_files: Sequence[str], *,
                  as_json: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job of the file at ``path`` (HCL, or with ``as_json`` JSON), and the submission
    that records its source (Nomad's JobSubmission)."""
    if not as_json:
        job = _parse_job(path, var_flags, var_files)
        flags = dict(flag.partition("=")[::2] for flag in var_flags)
        variables = "\n".join(_read(f, "variable file") for f in var_files)
        return job, {"Source": _read(path, "job file"), "Format": "hcl2",
                     "VariableFlags": flags, "Variables": variables}
    text = _read(path, "job file")
    try:
        decoded = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"Error getting job struct: Failed to parse JSON: {exc}") from None
    found = decoded.get("Job", decoded) if isinstance(decoded, dict) else None
    if not isinstance(found, dict):
        raise CommandError("Error getting job struct: the JSON is not a job")
    return found, {"Source": text, "Format": "json", "VariableFlags": {}, "Variables": ""}


def job_file_parser(prog: str, usage: str, description: str) -> CommandParser:
    """The parser of a command that reads a job file: namespaced, the file as ``<path>``,
    and the repeatable ``-var``/``-var-file`` input variables."""
    p = CommandParser(prog, usage, description, namespaced=True)
    p.add_positionals("path", 1, 1, help="job file")
    p.add_flag("var", action="append", default=[], metavar="KEY=VALUE",
               help="set an input variable (repeatable)")
    p.add_flag("var-file", action="append", default=[], metavar="FILE",
               help="file of input variable values (repeatable)")
    return p


def job_parser(prog: str, usage: str, description: str) -> CommandParser:
    """The parser of a command on one job named as ``<job>`` (an ID or a unique prefix; with
    ``-namespace '*'`` looked for in every namespace)."""
    p = CommandParser(prog, usage, description, namespaced=True, wildcard_ok=True)
    p.add_positionals("job", 1, 1)
    return p


def add_monitor_flags(p: CommandParser) -> None:
    """``-detach`` and ``-verbose`` of a write that monitors its evaluation."""
    p.add_bool_flag("detach", help="return right after submitting, without monitoring")
    p.add_bool_flag("verbose", help="show full IDs")


def run_cmd(argv: Sequence[str]) -> int:
    p = job_file_parser("job run", "job run [options] <path>",
                        "Parse a job file locally, submit it, and monitor the evaluation.")
    add_monitor_flags(p)
    p.add_bool_flag("json", help="the job file is JSON (a job, or {\"Job\": job})")
    p.add_bool_flag("output", help="print the job as JSON for the API instead of submitting")
    p.add_flag("check-index", dest="check_index", type=int, default=None, metavar="N",
               help="submit only if the job's modify index is N (0: only if it is new)")
    ns = p.parse(argv)
    job, submission = read_job_file(ns.path[0], ns.var, ns.var_file, as_json=ns.json)
    if ns.output:
        out(json.dumps({"Job": job}, indent=4))
        return 0
    # The job's own namespace wins over the flag: every request of the run goes there.
    ns.client_namespace = job.get("Namespace") or ns.client_namespace

    async def body(client: ApiClient) -> int:
        try:
            resp = await client.job_register(job, enforce_index=ns.check_index,
                                             submission=submission)
        except ApiError as exc:
            if ENFORCE_INDEX_PREFIX in exc.body:  # as Nomad's CLI: the reason, then this
                raise CommandError(f"{exc.body}\nJob not updated") from None
            raise CommandError(f"Error submitting job: {exc}") from None
        except ApiConnectionError as exc:
            raise CommandError(f"Error submitting job: {exc}") from None
        warnings = (resp or {}).get("Warnings")
        if warnings:
            out(f"Job Warnings:\n{warnings}\n")
        return await report_or_monitor(client, resp, ns, "Job registration successful")

    return run_with_client(ns, body)


async def report_or_monitor(client: ApiClient, resp: Any, ns: argparse.Namespace,
                            success: str | None, *, wait_allocs: bool = True) -> int:
    """After a write that may have made an evaluation (``resp``'s ``EvalID``): with
    ``-detach``, or when there is none, print ``success`` and the evaluation's ID (with no
    ``success``, as ``job stop`` does, the bare ID); else monitor it (``-verbose``: full IDs;
    ``wait_allocs``: see ``monitor_evaluation``)."""
    eval_id = (resp or {}).get("EvalID") or ""
    if ns.detach or not eval_id:
        if success is not None:
            out(success)
        if eval_id:
            out(eval_id if success is None else f"Evaluation ID: {eval_id}")
        return 0
    return await monitor_evaluation(client, eval_id, verbose=ns.verbose,
                                    wait_allocs=wait_allocs, time_limit=MONITOR_TIMEOUT)


def job_write_cmd(ns: argparse.Namespace, ident: str, failure: str,
                  write: Callable[[ApiClient, str], Awaitable[Any]], success: str | None, *,
                  wait_allocs: bool = True) -> int:
    """The body of a command that writes to one job: resolve ``ident`` (``resolve_job``),
    make ``write`` on the job's ID (errors start with ``failure``), then report or monitor the
    evaluation it made (``report_or_monitor``)."""
    async def body(client: ApiClient) -> int:
        with reporting(failure):
            job_id = await resolve_job(client, ident)
            resp = await write(client, job_id)
        return await report_or_monitor(client, resp, ns, success, wait_allocs=wait_allocs)

    return run_with_client(ns, body)


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
    children = (summary or {}).get("Children") or {}
    if job.get("Periodic") or job.get("ParameterizedJob"):
        # A parent runs nothing itself: Nomad shows what it launched instead.
        out("\nChildren Job Summary")
        out(fmt.table(["Pending", "Running", "Dead"],
                      [[children.get(c, 0) for c in ("Pending", "Running", "Dead")]]))
        groups = {}
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
    p.add_format_flags("jobs")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        if not ns.job:
            with reporting("Error querying jobs"):
                jobs = await client.jobs_list()
            if not print_formatted(ns, jobs):
                out(_jobs_table(jobs) if jobs else "No running jobs")
            return 0
        with reporting("Error querying job"):
            job_id = await resolve_job(client, ns.job[0])
            if ns.json or ns.template:
                print_formatted(ns, await client.job_get(job_id))
                return 0
        await _show_job(client, job_id, ns.verbose)
        return 0

    return run_with_client(ns, body)


def stop_cmd(argv: Sequence[str]) -> int:
    p = job_parser("job stop", "job stop [options] <job>",
                   "Stop a job (and with -purge remove it) and monitor the evaluation.")
    p.add_bool_flag("purge", help="remove the job immediately instead of keeping it dead")
    add_monitor_flags(p)
    ns = p.parse(argv)
    # As Nomad's: -detach prints the bare evaluation ID; the monitor ends with the evaluation.
    return job_write_cmd(ns, ns.job[0], "Error deregistering job",
                         lambda client, job_id: client.job_deregister(job_id, purge=ns.purge),
                         None, wait_allocs=False)


COMMANDS = {"run": run_cmd, "status": status_cmd, "stop": stop_cmd}
