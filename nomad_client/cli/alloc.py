"""``alloc`` commands: status, logs, fs.  Everything goes through the agent API.

An allocation ID prefix is looked up in the namespace of ``-namespace`` (or
``$NOMAD_NAMESPACE``; ``*``: any the caller may see)."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs

from nomad_client.api import ApiClient, ApiConnectionError, ApiError
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    CommandError,
    CommandParser,
    out,
    print_formatted,
    reporting,
    resolve_prefix,
    run_with_client,
    write_bytes,
)
from nomad_client.cli.monitor import monitor_evaluation
from nomad_client.structs.network import join_host_port


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


def _addresses(alloc: dict[str, Any]) -> str:
    """Nomad's "Allocation Addresses" table of the ports the allocation was given ("" when it
    has none): dynamic ports first, ``host:port -> to`` when mapped."""
    networks = ((alloc.get("AllocatedResources") or {}).get("Shared") or {}).get("Networks")
    if not networks:
        return ""
    network = networks[0]
    rows = [[f"*{port.get('Label')}", dynamic,
             join_host_port(network.get("IP") or "", port.get("Value") or 0)
             + (f" -> {port['To']}" if (port.get("To") or 0) > 0 else "")]
            for key, dynamic in (("DynamicPorts", "yes"), ("ReservedPorts", "no"))
            for port in network.get(key) or ()]
    if not rows:
        return ""
    return (f'Allocation Addresses (mode = "{network.get("Mode") or "host"}"):\n'
            + fmt.table(["Label", "Dynamic", "Address"], rows))


def status_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc status", "alloc status [options] <alloc>",
                      "Show an allocation and the state of its tasks.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("alloc", 1, 1)
    p.add_bool_flag("verbose", help="show full IDs and exact times")
    p.add_bool_flag("stats", help="show each running task's CPU and memory use")
    p.add_format_flags("allocation")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        alloc = await _get_alloc(client, ns.alloc[0])
        if print_formatted(ns, alloc):
            return 0
        v = ns.verbose
        usage = await _usage(client, alloc) if ns.stats else {}

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
        addresses = _addresses(alloc)
        if addresses:
            out(f"\n{addresses}")
        states = alloc.get("TaskStates") or {}
        for task in sorted(states):
            state = states[task] or {}
            out(f'\nTask "{task}" is "{state.get("State", "pending")}"')
            if task in usage:
                out(_task_resources(_task_def(alloc, task), usage[task]))
            events = state.get("Events") or []
            out("Recent Events:")
            out(_events_table(events) if events else "No events")
        return 0

    return run_with_client(ns, body)


# ---- logs and fs ----------------------------------------------------------------------
# Lines asked for with -n become this many bytes per line from the end (as Nomad's CLI);
# what arrives is then cut to the lines wanted.
BYTES_PER_LINE = 120
DEFAULT_TAIL_LINES = 10
# Following a tail of lines: the tail has arrived once the stream is quiet this long.
TAIL_SETTLE_SECONDS = 0.2


@attrs.frozen
class TailSpec:
    """Where a read starts (``origin``, ``offset``) and how many lines of what arrives
    first to keep (None: all of it)."""

    origin: str = "start"
    offset: int = 0
    lines: int | None = None


def add_read_flags(p: CommandParser) -> None:
    p.add_bool_flag("f", help="follow: keep printing what is written (Ctrl-C stops)")
    p.add_bool_flag("tail", help="read from the end (the last 10 lines unless -n or -c)")
    p.add_flag("n", type=int, default=-1, metavar="LINES",
               help="with -tail: this many lines from the end (best effort)")
    p.add_flag("c", type=int, default=-1, metavar="BYTES",
               help="with -tail: this many bytes from the end")
    p.add_bool_flag("job", help="the first argument is a job: use a random running "
                                "allocation of it")


def tail_spec(ns: argparse.Namespace) -> TailSpec:
    if ns.n >= 0 and ns.c >= 0:
        raise CommandError("Only one of -n and -c may be given")
    if not (ns.tail or ns.n >= 0 or ns.c >= 0):
        return TailSpec()
    if ns.c >= 0:
        return TailSpec("end", ns.c)
    lines = ns.n if ns.n >= 0 else DEFAULT_TAIL_LINES
    return TailSpec("end", lines * BYTES_PER_LINE, lines)


def last_lines(data: bytes, count: int) -> bytes:
    """The last ``count`` lines of ``data`` (a final line without a newline counts)."""
    if count <= 0:
        return b""
    return b"".join(data.splitlines(keepends=True)[-count:])


async def print_stream(chunks: AsyncIterator[bytes], spec: TailSpec, follow: bool) -> None:
    """Print ``chunks`` as they come. With ``spec.lines``, of the tail only its last lines:
    all of it when not following, else what arrives before the stream first goes quiet
    (the tail is sent at once; then the follow begins)."""
    if spec.lines is None:
        async for chunk in chunks:
            write_bytes(chunk)
        return
    if not follow:
        write_bytes(last_lines(b"".join([chunk async for chunk in chunks]), spec.lines))
        return
    head = bytearray()
    pending: asyncio.Future[bytes | None] = asyncio.ensure_future(anext(chunks, None))
    try:
        # Never cancelled on a timeout: that would end the stream itself.
        while (await asyncio.wait({pending}, timeout=TAIL_SETTLE_SECONDS))[0]:
            if (piece := pending.result()) is None:
                break
            head += piece
            pending = asyncio.ensure_future(anext(chunks, None))
        write_bytes(last_lines(bytes(head), spec.lines))
        while (piece := await pending) is not None:
            write_bytes(piece)
            pending = asyncio.ensure_future(anext(chunks, None))
    finally:
        pending.cancel()


async def _random_running_alloc(client: ApiClient, job_id: str) -> dict[str, Any]:
    """A random running allocation of the job, as Nomad's ``-job`` picks one."""
    with reporting("Error querying job allocations"):
        allocs = await client.job_allocations(job_id)
        running = [a for a in allocs or [] if a.get("ClientStatus") == "running"]
        if not running:
            raise CommandError(f'No running allocations found for job "{job_id}"')
        return await client.allocation_get(random.choice(running)["ID"])


async def target_alloc(client: ApiClient, ident: str, by_job: bool) -> dict[str, Any]:
    """The allocation a command names (with ``-job``: a random running one of the job)."""
    return await (_random_running_alloc(client, ident) if by_job else _get_alloc(client, ident))


def _run_read(ns: argparse.Namespace, body: Callable[[ApiClient], Awaitable[int]]) -> int:
    """Run a logs/fs command; Ctrl-C ends a follow quietly (exit 0), as Nomad's CLI."""
    if not ns.f:
        return run_with_client(ns, body)
    try:
        return run_with_client(ns, lambda client: _until_interrupted(body(client)))
    except KeyboardInterrupt:
        return 0


async def _until_interrupted(follow: Awaitable[int]) -> int:
    """``follow``'s result, or 0 once SIGINT arrives. The follow listens for SIGINT itself, as
    Nomad's CLI does: started as a shell's background job, it would otherwise inherit SIGINT
    ignored and never stop."""
    loop = asyncio.get_running_loop()
    following = asyncio.ensure_future(follow)
    interrupted = asyncio.Event()

    def interrupt() -> None:
        interrupted.set()
        following.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        return await following
    except asyncio.CancelledError:
        if not interrupted.is_set():
            raise
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def alloc_task(alloc: dict[str, Any], flag: str | None, positional: Sequence[str]) -> str:
    """The task a command names (``-task`` or its positional argument), or the one task."""
    task = _chosen_task(alloc, flag, positional)
    if task:
        return task
    tasks = _task_names(alloc)
    if len(tasks) == 1:
        return tasks[0]
    listing = "\n".join(f"  * {t}" for t in tasks) or "  (none)"
    raise CommandError(f'Allocation "{fmt.short_id(alloc.get("ID"))}" is running the '
                       f"following tasks:\n{listing}\n\nPlease specify the task.")


def logs_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc logs", "alloc logs [options] <alloc | job> [task]",
                      "Print the stdout (or stderr) log of a task; -f follows it until the "
                      "task ends.", namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 1, 2)
    p.add_bool_flag("stderr", help="show stderr instead of stdout")
    p.add_flag("task", metavar="TASK", help="the task whose log to show")
    p.add_bool_flag("verbose", help="show full IDs (accepted)")
    add_read_flags(p)
    ns = p.parse(argv)
    spec = tail_spec(ns)

    async def body(client: ApiClient) -> int:
        alloc = await target_alloc(client, ns.args[0], ns.job)
        task = alloc_task(alloc, ns.task, ns.args[1:])
        with reporting("Error reading logs"):
            await print_stream(client.alloc_logs_stream(
                alloc["ID"], task, stderr=ns.stderr, follow=ns.f, origin=spec.origin,
                offset=spec.offset), spec, ns.f)
        return 0

    return _run_read(ns, body)


def _stat_row(info: dict[str, Any], name: str | None = None) -> list[Any]:
    return [info.get("FileMode"), fmt.ibytes(info.get("Size")),
            fmt.format_time(fmt.from_rfc3339(info.get("ModTime"))),
            (name if name is not None else info.get("Name", ""))
            + ("/" if info.get("IsDir") else "")]


def fs_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc fs", "alloc fs [options] <alloc | job> [path]",
                      "List a directory or print a file of an allocation's directory.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 1, 2)
    p.add_bool_flag("stat", help="show the file's (or directory's) details, not its content")
    p.add_bool_flag("H", help="human-readable sizes (always on)")
    p.add_bool_flag("verbose", help="show full IDs (accepted)")
    add_read_flags(p)
    ns = p.parse(argv)
    path = ns.args[1] if len(ns.args) == 2 else "/"
    spec = tail_spec(ns)

    async def body(client: ApiClient) -> int:
        alloc = await target_alloc(client, ns.args[0], ns.job)
        alloc_id = alloc["ID"]
        with reporting("Error reading file"):
            info = await client.fs_stat(alloc_id, path)
            if ns.stat:
                out(fmt.table(["Mode", "Size", "Modified Time", "Name"], [_stat_row(info)]))
                return 0
            if not (info or {}).get("IsDir"):
                if not ns.f and spec.origin == "start":
                    write_bytes(await client.fs_cat(alloc_id, path))
                    return 0
                await print_stream(client.fs_stream_plain(
                    alloc_id, path, offset=spec.offset, origin=spec.origin, follow=ns.f),
                    spec, ns.f)
                return 0
            if ns.f or spec.origin == "end":
                raise CommandError(f"{path} is a directory: -f and -tail read files")
            entries = await client.fs_ls(alloc_id, path)
        out(fmt.table(["Mode", "Size", "Modified Time", "Name"],
                      [_stat_row(e) for e in entries or []]))
        return 0

    return _run_read(ns, body)


# ---- resource usage, stop, restart, signal ---------------------------------------------
def _task_def(alloc: dict[str, Any], name: str) -> dict[str, Any]:
    """Task ``name`` of the allocation's group, from its job ({} when not there)."""
    for group in (alloc.get("Job") or {}).get("TaskGroups") or []:
        if group.get("Name") == alloc.get("TaskGroup"):
            for task in group.get("Tasks") or []:
                if task.get("Name") == name:
                    return dict(task)
    return {}


async def _usage(client: ApiClient, alloc: dict[str, Any]) -> dict[str, Any]:
    """Each running task's resource usage; a warning (and none) when it cannot be read, as
    Nomad's CLI goes on without it."""
    try:
        stats = await client.alloc_stats(alloc["ID"], namespace=alloc.get("Namespace"))
    except (ApiError, ApiConnectionError) as err:
        out(f"\nCouldn't retrieve stats: {err}")
        return {}
    return dict(stats.get("Tasks") or {})


def _task_resources(task: dict[str, Any], usage: dict[str, Any]) -> str:
    """Nomad's "Task Resources" table: CPU and memory in use of what the task asked for."""
    resources = task.get("Resources") or {}
    used = usage.get("ResourceUsage") or {}
    ticks = int((used.get("CpuStats") or {}).get("TotalTicks") or 0)
    rss = int((used.get("MemoryStats") or {}).get("RSS") or 0)
    return "Task Resources:\n" + fmt.table(["CPU", "Memory"], [[
        f"{ticks}/{resources.get('CPU') or 0} MHz",
        f"{fmt.ibytes(rss)}/{resources.get('MemoryMB') or 0} MiB"]])


def _chosen_task(alloc: dict[str, Any], flag: str | None, positional: Sequence[str]
                 ) -> str | None:
    """The task a command names (``-task`` wins over the positional one), checked against
    the allocation's tasks; None when it names none."""
    task = flag or (positional[0] if positional else None)
    tasks = _task_names(alloc)
    if task and tasks and task not in tasks:
        raise CommandError(f"Could not find task named: {task}, found:\n"
                           + "\n".join(f"  * {t}" for t in tasks))
    return task


def stop_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc stop", "alloc stop [options] <alloc>",
                      "Stop an allocation; its job's scheduler places a replacement.",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("alloc", 1, 1)
    p.add_bool_flag("detach", help="print the evaluation ID instead of monitoring it")
    p.add_bool_flag("no-shutdown-delay", help="ignore the group's shutdown delay")
    p.add_bool_flag("verbose", help="show full IDs")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        alloc = await _get_alloc(client, ns.alloc[0])
        with reporting("Error stopping allocation"):
            reply = await client.alloc_stop(alloc["ID"], no_shutdown_delay=ns.no_shutdown_delay,
                                            namespace=alloc.get("Namespace"))
        eval_id = str(reply.get("EvalID") or "")
        if ns.detach or not eval_id:
            out(eval_id)
            return 0
        return await monitor_evaluation(client, eval_id, verbose=ns.verbose)

    return run_with_client(ns, body)


def restart_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc restart", "alloc restart [options] <alloc> [<task>]",
                      "Restart a task of an allocation (default: every running task) in "
                      "place.", namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 1, 2)
    p.add_flag("task", metavar="TASK", help="the task to restart")
    p.add_bool_flag("all-tasks", help="restart every task of the allocation")
    ns = p.parse(argv)
    if ns.all_tasks and (ns.task or len(ns.args) == 2):
        raise CommandError("The -all-tasks option is not allowed when restarting a specific "
                           "task.")

    async def body(client: ApiClient) -> int:
        alloc = await _get_alloc(client, ns.args[0])
        task = _chosen_task(alloc, ns.task, ns.args[1:])
        with reporting(f"Failed to restart {'task' if task else 'allocation'}"):
            await client.alloc_restart(alloc["ID"], task, all_tasks=ns.all_tasks,
                                       namespace=alloc.get("Namespace"))
        return 0  # like Nomad: silence on success

    return run_with_client(ns, body)


def signal_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc signal", "alloc signal [options] <alloc> [<task>]",
                      "Send a signal to a task of an allocation (default: every running "
                      "task).", namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 1, 2)
    p.add_flag("s", metavar="SIGNAL", default="SIGKILL", help="the signal (default SIGKILL)")
    p.add_flag("task", metavar="TASK", help="the task to signal")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        alloc = await _get_alloc(client, ns.args[0])
        task = _chosen_task(alloc, ns.task, ns.args[1:])
        with reporting("Error signalling allocation"):
            await client.alloc_signal(alloc["ID"], ns.s, task,
                                      namespace=alloc.get("Namespace"))
        return 0

    return run_with_client(ns, body)


COMMANDS = {"status": status_cmd, "logs": logs_cmd, "fs": fs_cmd, "stop": stop_cmd,
            "restart": restart_cmd, "signal": signal_cmd}
