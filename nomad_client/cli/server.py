"""``server members``: the cluster's servers as the agent knows them, in Nomad's table
(Name, Address, Port, Status, Leader, Raft Version, Build, Datacenter, Region; with
``-detailed`` (or ``-verbose``) every member's tags instead of the last five columns)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import CommandParser, formatted, out, reporting, run_with_client

Command = Callable[[Sequence[str]], int]


def _sorted(members: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    # As Nomad sorts them: by region, then datacenter, then name.
    def key(member: Mapping[str, Any]) -> tuple[str, str, str]:
        tags = member.get("Tags") or {}
        return (str(tags.get("region", "")), str(tags.get("dc", "")),
                str(member.get("Name", "")))
    return sorted(members, key=key)


def _rpc_address(member: Mapping[str, Any]) -> str:
    tags = member.get("Tags") or {}
    return f"{tags.get('rpc_addr', '')}:{tags.get('port', '')}"


def render_members(members: Sequence[Mapping[str, Any]], leader: str | None, *,
                   detailed: bool) -> str:
    """Nomad's ``server members`` table; ``leader`` is the leader's RPC address, if any."""
    members = _sorted(members)
    if detailed:
        return fmt.table(
            ("Name", "Address", "Port", "Status", "Tags"),
            [(m.get("Name"), m.get("Addr"), m.get("Port"), m.get("Status"),
              ",".join(f"{k}={v}" for k, v in sorted((m.get("Tags") or {}).items())))
             for m in members])
    rows = []
    for m in members:
        tags = m.get("Tags") or {}
        is_leader = leader is not None and _rpc_address(m) == leader
        rows.append((m.get("Name"), m.get("Addr"), m.get("Port"), m.get("Status"),
                     str(is_leader).lower(), tags.get("raft_vsn", ""), tags.get("build", ""),
                     tags.get("dc", ""), tags.get("region", "")))
    return fmt.table(("Name", "Address", "Port", "Status", "Leader", "Raft Version", "Build",
                      "Datacenter", "Region"), rows)


async def _leader(client: ApiClient) -> str | None:
    # No leader (Nomad's 500 "No cluster leader") is shown as no member leading.
    response = await client.request("GET", "/v1/status/leader")
    if response.status != 200:
        return None
    leader = response.json()
    return leader if isinstance(leader, str) and leader else None


def members_cmd(argv: Sequence[str]) -> int:
    parser = CommandParser("server members", "server members [options]",
                           "Show the servers of the cluster, as the agent knows them.")
    parser.add_bool_flag("detailed", help="show every member's tags")
    parser.add_bool_flag("verbose", help="the same as -detailed")
    parser.add_format_flags("members")
    parser.add_positionals("args", 0, 0)
    ns = parser.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error querying servers"):
            answer = await client.get("/v1/agent/members")
            members = (answer or {}).get("Members") or []
            text = formatted(ns, members)
            if text is None:
                leader = await _leader(client)
                text = render_members(members, leader, detailed=ns.detailed or ns.verbose)
        out(text)
        return 0

    return run_with_client(ns, body)


COMMANDS: Mapping[str, Command] = {"members": members_cmd}
