"""``alloc`` commands: status, logs, fs.  Everything goes through the agent API.

An allocation ID prefix is looked up in the namespace of ``-namespace`` (or
``$NOMAD_NAMESPACE``; ``*``: any the caller may see)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    CommandError,
    CommandParser,
    out,
    reporting,
    resolve_prefix,
    run_with_client,
    write_bytes,
)


def _allocs_table(allocs: list[dict[str, Any]]) -> str:
    return fmt.table(
        ["ID", "Eval ID", "Job ID", "Task Group", "Node ID", "Desired", "Status"],
        [[fmt.short_id(a.get("ID")), fmt.short_id(a.get("EvalID")), a.get("JobID"),
          a.get("TaskGroup"), fmt.short_id(a.get("NodeID")), a.get("DesiredStatus"),
          a.get("ClientStatus")] for a in allocs],
    )


async def _get_alloc(client: ApiClient, ident: str) -> dict[str, Any]:
    with reporting("Error querying allocation"):
        alloc_id = await resolve_prefix(client.allocations_list(prefix=ident), ident,
                                        "allocation", "allocations", _allocs_table)
        return await client.allocation_get(alloc_id)


def _task_names(alloc: dict[str, Any]) -> list[str]:
    """Tasks of the alloc's group, from its job; task states as a fallback."""
    job = alloc.get("Job") or {}
    for group in job.get("TaskGroups") or []:
        if group.get("Name") == alloc.get("TaskGroup"):
            names = [t.get("Name") for t in group.get("Tasks") or [] if t.get("Name")]
            if names:
                return sorted(names)
    return sorted((alloc.get("TaskStates") or {}).keys())


def _events_table(events: list[dict[str, Any]]) -> str:
    rows = []
    for ev in sorted(events, key=lambda e: e.get("Time", 0), reverse=True):
        desc = ev.get("DisplayMessage") or ev.get("Message") or ""
        rows.append([fmt.format_unix_nanos(ev.get("Time")), ev.get("Type"), desc])
    return fmt.table(["Time", "Type", "Description"], rows)


def status_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc status", "alloc status [options] <alloc>",
                      "Show an allocation and the state of its tasks.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("alloc", 1, 1)
    p.add_bool_flag("verbose", help="show full IDs and exact times")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        alloc = await _get_alloc(client, ns.alloc[0])
        v = ns.verbose

        def when(ns_time: Any) -> str:
            return fmt.format_unix_nanos(ns_time) if v else fmt.pretty_time_diff(ns_time)

        out(fmt.kv([
            ("ID", fmt.short_id(alloc.get("ID"), v)),
            ("Eval ID", fmt.short_id(alloc.get("EvalID"), v)),
            ("Name", alloc.get("Name")),
            ("Node ID", fmt.short_id(alloc.get("NodeID"), v)),
            ("Node Name", alloc.get("NodeName")),
            ("Job ID", alloc.get("JobID")),
            ("Job Version", alloc.get("JobVersion", (alloc.get("Job") or {}).get("Version"))),
            ("Client Status", alloc.get("ClientStatus")),
            ("Client Description", alloc.get("ClientDescription")),
            ("Desired Status", alloc.get("DesiredStatus")),
            ("Desired Description", alloc.get("DesiredDescription")),
            ("Created", when(alloc.get("CreateTime"))),
            ("Modified", when(alloc.get("ModifyTime"))),
        ]))
        states = alloc.get("TaskStates") or {}
        for task in sorted(states):
            state = states[task] or {}
            out(f'\nTask "{task}" is "{state.get("State", "pending")}"')
            events = state.get("Events") or []
            out("Recent Events:")
            out(_events_table(events) if events else "No events")
        return 0

    return run_with_client(ns, body)


def logs_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc logs", "alloc logs [options] <alloc> [task]",
                      "Print the stdout (or stderr) log of a task.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 1, 2)
    p.add_bool_flag("stderr", help="show stderr instead of stdout")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        alloc = await _get_alloc(client, ns.args[0])
        tasks = _task_names(alloc)
        if len(ns.args) == 2:
            task = ns.args[1]
            if tasks and task not in tasks:
                raise CommandError(f'Could not find task named "{task}" in allocation; '
                                   f"tasks: {', '.join(tasks)}")
        elif len(tasks) == 1:
            task = tasks[0]
        else:
            listing = "\n".join(f"  * {t}" for t in tasks) or "  (none)"
            raise CommandError(f'Allocation "{fmt.short_id(alloc.get("ID"))}" is running the '
                               f"following tasks:\n{listing}\n\nPlease specify the task.")
        with reporting("Error reading logs"):
            data = await client.alloc_logs(alloc["ID"], task, stderr=ns.stderr)
        write_bytes(data)
        return 0

    return run_with_client(ns, body)


def fs_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc fs", "alloc fs [options] <alloc> [path]",
                      "List a directory or print a file of an allocation's directory.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 1, 2)
    ns = p.parse(argv)
    path = ns.args[1] if len(ns.args) == 2 else "/"

    async def body(client: ApiClient) -> int:
        alloc = await _get_alloc(client, ns.args[0])
        alloc_id = alloc["ID"]
        with reporting("Error reading file"):
            info = await client.fs_stat(alloc_id, path)
            if not (info or {}).get("IsDir"):
                write_bytes(await client.fs_cat(alloc_id, path))
                return 0
            entries = await client.fs_ls(alloc_id, path)
        rows = [[e.get("FileMode"), fmt.ibytes(e.get("Size")),
                 fmt.format_time(fmt.from_rfc3339(e.get("ModTime"))),
                 e.get("Name", "") + ("/" if e.get("IsDir") else "")]
                for e in entries or []]
        out(fmt.table(["Mode", "Size", "Modified Time", "Name"], rows))
        return 0

    return run_with_client(ns, body)


COMMANDS = {"status": status_cmd, "logs": logs_cmd, "fs": fs_cmd}
