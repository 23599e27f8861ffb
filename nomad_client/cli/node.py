"""``node`` commands: status (list or one node, with ``-stats`` its host's resource usage)
and dynamic metadata (meta read / apply).

Everything goes through the agent API.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nomad_client.api import ApiClient, ApiConnectionError, ApiError
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    CommandError,
    CommandParser,
    out,
    reporting,
    resolve_prefix,
    run_with_client,
)
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


def _show_node(node: Mapping[str, Any], verbose: bool) -> None:
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


def status_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("node status", "node status [options] [node]",
                      "List client nodes, or show one node.")
    p.add_positionals("node", 0, 1)
    p.add_flag("filter", metavar="EXPR", help="filter expression applied to the node list")
    p.add_bool_flag("verbose", help="show full IDs")
    p.add_bool_flag("stats", help="with a node: show its host's resource usage")
    ns = p.parse(argv)
    if ns.stats and not ns.node:
        raise CommandError("The -stats option needs a node: node status -stats <node>")

    async def body(client: ApiClient) -> int:
        if not ns.node:
            with reporting("Error querying node status"):
                nodes = await client.nodes_list(filter=ns.filter)
            out(_nodes_table(nodes, ns.verbose) if nodes else "No nodes registered")
            return 0
        with reporting("Error querying node info"):
            node_id = await resolve_prefix(client.nodes_list(prefix=ns.node[0]), ns.node[0],
                                           "node", "nodes", _nodes_table)
            node = await client.node_get(node_id)
        _show_node(node, ns.verbose)
        if ns.stats:
            await _show_host_stats(client, node)
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


COMMANDS = {"status": status_cmd, "meta": meta_cmd}
