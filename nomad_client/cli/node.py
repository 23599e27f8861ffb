"""``node`` commands: status (list or one node, with ``-stats`` its host's resource usage),
dynamic metadata (meta read / apply), scheduling eligibility and drains.

Everything goes through the agent API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

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
)
from nomad_client.durations import DurationError, parse_duration_ns
from nomad_client.goflags import UsageError


def _nodes_table(nodes: list[dict[str, Any]], verbose: bool = False) -> str:
    return fmt.table(
        ["ID", "Node Pool", "DC", "Name", "Class", "Drain", "Eligibility", "Status"],
        [[fmt.short_id(n.get("ID"), verbose), n.get("NodePool"), n.get("Datacenter"),
          n.get("Name"), n.get("NodeClass"), bool(n.get("Drain")),
          n.get("SchedulingEligibility"), n.get("Status")] for n in nodes],
    )


def _drivers(node: Mapping[str, Any]) -> str:
    drivers = node.get("Drivers") or {}
    healthy = sorted(name for name, info in drivers.items()
                     if (info or {}).get("Detected") and (info or {}).get("Healthy"))
    return ",".join(healthy)


def _show_node(node: Mapping[str, Any], verbose: bool, short: bool = False) -> None:
    out(fmt.kv([
        ("ID", fmt.short_id(node.get("ID"), verbose)),
        ("Name", node.get("Name")),
        ("Node Pool", node.get("NodePool")),
        ("Class", node.get("NodeClass")),
        ("DC", node.get("Datacenter")),
        ("Drain", bool(node.get("Drain") or node.get("DrainStrategy"))),
        ("Eligibility", node.get("SchedulingEligibility")),
        ("Status", node.get("Status")),
        ("Address", node.get("HTTPAddr")),
        ("Driver Status", _drivers(node)),
    ]))
    if short:
        return
    events = node.get("Events") or []
    if events:
        out("\nNode Events")
        rows = [[fmt.format_time(fmt.from_rfc3339(e.get("Timestamp"))), e.get("Subsystem"),
                 e.get("Message")] for e in reversed(events)]
        out(fmt.table(["Time", "Subsystem", "Message"], rows))
    meta = node.get("Meta") or {}
    out("\nMeta")
    out(fmt.kv(sorted(meta.items())) if meta else fmt.EMPTY)


def _percent(value: Any) -> str:
    return f"{float(value or 0):.2f}%"


def _host_utilization(node: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    """Nomad's "Host Resource Utilization": CPU, memory and alloc dir disk in use."""
    attributes = node.get("Attributes") or {}
    memory = stats.get("Memory") or {}
    disk = stats.get("AllocDirStats") or {}
    row = [f"{int(stats.get('CPUTicksConsumed') or 0)}/"
           f"{attributes.get('cpu.totalcompute') or 0} MHz",
           f"{fmt.ibytes(memory.get('Used'))}/{fmt.ibytes(memory.get('Total'))}",
           f"{fmt.ibytes(disk.get('Used'))}/{fmt.ibytes(disk.get('Size'))}"]
    return "Host Resource Utilization\n" + fmt.table(["CPU", "Memory", "Disk"], [row])


def _host_details(stats: Mapping[str, Any]) -> str:
    """The per-core, memory and per-disk figures behind the utilization."""
    cpus = fmt.table(["CPU", "User", "System", "Idle", "Total"], [
        [c.get("CPU"), _percent(c.get("User")), _percent(c.get("System")),
         _percent(c.get("Idle")), _percent(c.get("TotalPercent"))]
        for c in stats.get("CPU") or []])
    memory = stats.get("Memory") or {}
    memory_table = fmt.table(["Total", "Available", "Used", "Free"], [
        [fmt.ibytes(memory.get(k)) for k in ("Total", "Available", "Used", "Free")]])
    disks = fmt.table(["Device", "Mountpoint", "Size", "Used", "Available", "Used %",
                       "Inodes %"], [
        [d.get("Device"), d.get("Mountpoint"), fmt.ibytes(d.get("Size")),
         fmt.ibytes(d.get("Used")), fmt.ibytes(d.get("Available")),
         _percent(d.get("UsedPercent")), _percent(d.get("InodesUsedPercent"))]
        for d in stats.get("DiskStats") or []])
    return (f"Detailed CPU Stats\n{cpus}\n\nMemory Stats\n{memory_table}\n\n"
            f"Disk Stats\n{disks}")


async def _show_host_stats(client: ApiClient, node: Mapping[str, Any]) -> None:
    """The node's host stats; a warning when they cannot be read (the agent answers only
    for its own node), as Nomad's CLI goes on without them."""
    try:
        stats = await client.client_stats(str(node.get("ID") or ""))
    except (ApiError, ApiConnectionError) as err:
        out(f"\nCouldn't retrieve host stats: {err}")
        return
    out(f"\n{_host_utilization(node, stats)}\n\n{_host_details(stats)}")


def _list_table(nodes: list[dict[str, Any]], ns: argparse.Namespace,
                running: Mapping[str, int]) -> str:
    """Nomad's node list, with the optional OS, address/version and running-allocs columns."""
    headers = ["ID", "Node Pool", "DC", "Name", "Class"]
    headers += ["OS"] if ns.os else []
    headers += ["Address", "Version"] if ns.verbose else []
    headers += ["Drain", "Eligibility", "Status"]
    headers += ["Running Allocs"] if ns.allocs else []
    rows = []
    for n in nodes:
        row = [fmt.short_id(n.get("ID"), ns.verbose), n.get("NodePool"), n.get("Datacenter"),
               n.get("Name"), n.get("NodeClass")]
        row += [(n.get("Attributes") or {}).get("os.name", "")] if ns.os else []
        row += [n.get("Address"), n.get("Version")] if ns.verbose else []
        row += [bool(n.get("Drain")), n.get("SchedulingEligibility"), n.get("Status")]
        row += [running.get(str(n.get("ID")), 0)] if ns.allocs else []
        rows.append(row)
    return fmt.table(headers, rows)


async def _running_allocs(client: ApiClient, node_id: str) -> int:
    allocs = await client.get(f"/v1/node/{node_id}/allocations") or []
    return sum(1 for alloc in allocs if alloc.get("ClientStatus") == "running")


async def _local_node_id(client: ApiClient) -> str:
    """The agent's own node, as Nomad's CLI finds it: ``stats.client.node_id`` of agent/self."""
    with reporting("Error querying agent info"):
        info = await client.agent_self()
    stats = (info or {}).get("stats") or {}
    if "client" not in stats:
        raise CommandError("Nomad not running in client mode")
    node_id = (stats.get("client") or {}).get("node_id")
    if not node_id:
        raise CommandError("Failed to determine node ID")
    return str(node_id)


async def _show_allocs(client: ApiClient, node_id: str, verbose: bool) -> None:
    with reporting("Error querying node allocations"):
        allocs = await client.get(f"/v1/node/{node_id}/allocations") or []
    out("\nAllocations")
    if not allocs:
        out("No allocations placed")
        return
    out(fmt.table(["ID", "Eval ID", "Job ID", "Task Group", "Version", "Desired", "Status"],
                  [[fmt.short_id(a.get("ID"), verbose), fmt.short_id(a.get("EvalID"), verbose),
                    a.get("JobID"), a.get("TaskGroup"), a.get("JobVersion"),
                    a.get("DesiredStatus"), a.get("ClientStatus")] for a in allocs]))


def status_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("node status", "node status [options] [node]",
                      "List client nodes, or show one node.")
    p.add_positionals("node", 0, 1)
    p.add_flag("filter", metavar="EXPR", help="filter expression applied to the node list")
    p.add_bool_flag("verbose", help="show full IDs (and, listing, address and version)")
    p.add_bool_flag("stats", help="with a node: show its host's resource usage")
    p.add_bool_flag("self", help="show the node of the agent queried")
    p.add_bool_flag("short", help="with a node: its basic information only")
    p.add_bool_flag("os", help="listing: show each node's operating system")
    p.add_bool_flag("allocs", help="listing: count each node's running allocations; "
                                   "with a node: list its allocations")
    p.add_format_flags("nodes")
    ns = p.parse(argv)
    if ns.self and ns.node:
        raise CommandError("The -self option cannot be used with a node argument")
    one_node = bool(ns.node) or ns.self
    if ns.stats and not one_node:
        raise CommandError("The -stats option needs a node: node status -stats <node>")

    async def body(client: ApiClient) -> int:
        if not one_node:
            with reporting("Error querying node status"):
                nodes = await client.get("/v1/nodes", {"filter": ns.filter,
                                                       "os": "true" if ns.os else None})
            if print_formatted(ns, nodes):
                return 0
            if not nodes:
                out("No nodes registered")
                return 0
            running: dict[str, int] = {}
            if ns.allocs:
                with reporting("Error querying node allocations"):
                    for n in nodes:
                        running[str(n.get("ID"))] = await _running_allocs(client, str(n["ID"]))
            out(_list_table(nodes, ns, running))
            return 0
        if ns.self:
            node_id = await _local_node_id(client)
        with reporting("Error querying node info"):
            if not ns.self:
                node_id = await resolve_prefix(client.nodes_list(prefix=ns.node[0]),
                                               ns.node[0], "node", "nodes", _nodes_table)
            node = await client.node_get(node_id)
        if print_formatted(ns, node):
            return 0
        _show_node(node, ns.verbose, short=ns.short)
        if ns.stats:
            await _show_host_stats(client, node)
        if not ns.short:
            await _show_allocs(client, node_id, ns.verbose)
        return 0

    return run_with_client(ns, body)


def _meta_section(title: str, meta: Mapping[str, Any] | None) -> str:
    items = sorted((meta or {}).items())
    rendered = fmt.kv([(k, "<unset>" if v is None else v) for k, v in items]) if items \
        else fmt.EMPTY
    return f"{title}\n{rendered}"


def meta_read_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("node meta read", "node meta read [options]",
                      "Show a client node's metadata: merged, dynamic and static.")
    p.add_flag("node-id", metavar="ID", help="node to read (default: the agent's own node)")
    p.add_bool_flag("json", help="print the raw JSON response")
    p.add_positionals("rest", 0, 0)
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error reading dynamic node metadata"):
            doc = await client.client_metadata_read(node_id=ns.node_id)
        if ns.json:
            out(json.dumps(doc, indent=4, sort_keys=True))
            return 0
        out("\n\n".join([_meta_section("All Meta", doc.get("Meta")),
                         _meta_section("Dynamic Meta", doc.get("Dynamic")),
                         _meta_section("Static Meta", doc.get("Static"))]))
        return 0

    return run_with_client(ns, body)


def _parse_pairs(pairs: Sequence[str], unset: Sequence[str]) -> dict[str, str | None]:
    meta: dict[str, str | None] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f'Error parsing metadata: "{pair}" is not a key=value pair')
        meta[key] = value
    for item in unset:
        for key in (k.strip() for k in item.split(",")):
            if key:
                meta[key] = None
    if not meta:
        raise CommandError("Must specify at least one key=value pair or -unset")
    return meta


def meta_apply_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("node meta apply", "node meta apply [options] key=value...",
                      "Set or unset dynamic metadata on a client node.")
    p.add_flag("node-id", metavar="ID", help="node to change (default: the agent's own node)")
    p.add_flag("unset", action="append", default=[], metavar="KEY,...",
               help="comma-separated keys to remove")
    p.add_argument("pairs", nargs="*")
    ns = p.parse(argv)
    meta = _parse_pairs(ns.pairs, ns.unset)

    async def body(client: ApiClient) -> int:
        with reporting("Error applying dynamic node metadata"):
            await client.client_metadata_apply(meta, node_id=ns.node_id)
        return 0  # like Nomad: silence on success

    return run_with_client(ns, body)


def meta_cmd(argv: Sequence[str]) -> int:
    sub: dict[str, Callable[[Sequence[str]], int]] = {"read": meta_read_cmd,
                                                      "apply": meta_apply_cmd}
    if not argv or argv[0] not in sub:
        raise UsageError("node meta: expected a subcommand: read or apply",
                         "usage: nomad-client node meta <read|apply> [options]")
    return sub[argv[0]](argv[1:])


# ---- eligibility and drain ---------------------------------------------------------------
def _toggle_parser(name: str, description: str) -> CommandParser:
    p = CommandParser(f"node {name}", f"node {name} [options] <node>", description)
    p.add_positionals("node", 0, 1)
    p.add_bool_flag("enable", help=f"enable {name}")
    p.add_bool_flag("disable", help=f"disable {name}")
    p.add_bool_flag("self", help="act on the node of the agent queried")
    return p


def _check_toggle(ns: argparse.Namespace, what: str) -> None:
    if ns.enable == ns.disable:
        raise CommandError("Either the '-enable' or '-disable' flag must be set"
                           if not ns.enable else
                           f"Only one of '-enable' or '-disable' may be set for {what}")
    if ns.self == bool(ns.node):
        raise CommandError("Node ID must be specified if -self isn't being used"
                           if not ns.self else
                           "The -self option cannot be used with a node argument")


async def _target_node(client: ApiClient, ns: argparse.Namespace) -> str:
    if ns.self:
        return await _local_node_id(client)
    with reporting("Error querying node info"):
        return await resolve_prefix(client.nodes_list(prefix=ns.node[0]), ns.node[0],
                                    "node", "nodes", _nodes_table)


def eligibility_cmd(argv: Sequence[str]) -> int:
    p = _toggle_parser("eligibility", "Mark a client node eligible or ineligible for new "
                                      "placements (what runs on it stays).")
    ns = p.parse(argv)
    _check_toggle(ns, "eligibility")

    async def body(client: ApiClient) -> int:
        node_id = await _target_node(client, ns)
        with reporting("Error updating scheduling eligibility"):
            await client.node_eligibility(node_id, ns.enable)
        state = "eligible" if ns.enable else "ineligible"
        out(f'Node "{node_id}" scheduling eligibility set: {state} for scheduling')
        return 0

    return run_with_client(ns, body)


def _drain_deadline(ns: argparse.Namespace) -> int:
    """The drain's deadline in nanoseconds: -force is at once (-1), -no-deadline none (0)."""
    if ns.force and ns.no_deadline:
        raise CommandError("-force and -no-deadline are mutually exclusive")
    if ns.force:
        return -1
    if ns.no_deadline:
        return 0
    try:
        deadline = parse_duration_ns(ns.deadline)
    except DurationError as err:
        raise CommandError(f"Failed to parse deadline: {err}") from None
    if deadline <= 0:
        raise CommandError("A positive drain deadline must be given")
    return deadline


def _confirmed(node_id: str, enable: bool) -> bool:
    verb = "enable" if enable else "disable"
    sys.stdout.write(f'Are you sure you want to {verb} drain mode for node "{node_id}"? '
                     "[y/N] ")
    sys.stdout.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


async def _wait_for_drain(client: ApiClient, node_id: str) -> None:
    """Follow the node with blocking queries until its drain is over, as Nomad's -monitor."""
    index = 0
    while True:
        with reporting("Error monitoring drain"):
            node, index = await client.get_blocking(f"/v1/node/{node_id}", index, "30s")
        if not node.get("DrainStrategy"):
            status = (node.get("LastDrain") or {}).get("Status", "complete")
            out(f"{fmt.format_time(datetime.now(UTC))}: Drain {status} for node {node_id}")
            return


def drain_cmd(argv: Sequence[str]) -> int:
    p = _toggle_parser("drain", "Drain a client node: mark it ineligible and move its "
                                "allocations to other nodes (-disable: stop draining).")
    p.add_flag("deadline", default="1h", metavar="DURATION",
               help="time after which the drain is complete whatever is left (default 1h)")
    p.add_bool_flag("force", help="complete the drain at once")
    p.add_bool_flag("no-deadline", help="no deadline: wait for every allocation to move")
    p.add_bool_flag("ignore-system", help="leave system jobs' allocations where they are")
    p.add_bool_flag("keep-ineligible", help="with -disable: leave the node ineligible")
    p.add_bool_flag("detach", help="return at once instead of waiting for the drain")
    p.add_bool_flag("monitor", help="only wait for a drain already under way")
    p.add_bool_flag("yes", help="do not ask for confirmation")
    ns = p.parse(argv)
    if not ns.monitor:
        _check_toggle(ns, "drain")
    deadline = _drain_deadline(ns) if ns.enable else None

    async def body(client: ApiClient) -> int:
        node_id = await _target_node(client, ns)
        if ns.monitor:
            await _wait_for_drain(client, node_id)
            return 0
        # The prompt reads stdin: off the event loop.
        if not ns.yes and not await asyncio.to_thread(_confirmed, node_id, ns.enable):
            out("Canceling drain")
            return 1
        with reporting("Error updating drain specification"):
            await client.node_drain(node_id, deadline, ignore_system_jobs=ns.ignore_system,
                                    mark_eligible=ns.disable and not ns.keep_ineligible)
        if not ns.enable:
            out(f'Node "{node_id}" drain strategy unset')
            return 0
        out(f'Node "{node_id}" drain strategy set')
        if not ns.detach:
            await _wait_for_drain(client, node_id)
        return 0

    return run_with_client(ns, body)


COMMANDS = {"status": status_cmd, "meta": meta_cmd, "eligibility": eligibility_cmd,
            "drain": drain_cmd}
