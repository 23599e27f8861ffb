"""Who the cluster is: /v1/agent/members, /v1/agent/servers, /v1/regions, /v1/status/peers
and /v1/status/leader, from the agent's ``ClusterView``.

Nomad names servers by their RPC address (``host:4647``). A member's ``Port`` is its gossip
port in Nomad; servers here keep no gossip pool, so it is the port the view gives (the
embedded agent's is Nomad's default 4648) or else the RPC port, which is what a Nomad tool
can use to reach it.
"""

from __future__ import annotations

from typing import Any

from nomad_client.client.fingerprint import NOMAD_VERSION
from nomad_client.http.auth import Need
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import RPC_PORT, Services

GET = ("GET",)
# What a current Nomad server's serf member reports; tools only check they are present.
_PROTOCOL = {"ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
             "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4}
NO_LEADER = HTTPError(500, "No cluster leader")


def rpc_address(member: dict[str, Any]) -> str:
    """The server's RPC address as Nomad writes it: ``host:port``."""
    return str(member.get("RPCAddr") or f"{member.get('Addr', '')}:{RPC_PORT}")


def _rpc_port(member: dict[str, Any]) -> int:
    _, _, port = rpc_address(member).rpartition(":")
    return int(port) if port.isdigit() else RPC_PORT


def _region(services: Services) -> str:
    if services.server is not None:
        return services.server.region
    return str(services.member.get("Tags", {}).get("region", "global"))


def _tags(member: dict[str, Any], expect: int) -> dict[str, str]:
    host, _, port = rpc_address(member).rpartition(":")
    return {"role": "nomad", "region": str(member.get("Region", "")),
            "dc": str(member.get("Datacenter", "")), "port": port,
            "bootstrap": "1" if expect == 1 else "0", "expect": str(expect),
            "build": str(member.get("Build") or NOMAD_VERSION), "vsn": "1", "raft_vsn": "3",
            "rpc_addr": host.strip("[]")}


def _member(member: dict[str, Any], expect: int) -> dict[str, Any]:
    return {"Name": member.get("Name", ""), "Addr": member.get("Addr", ""),
            "Port": member.get("Port") or _rpc_port(member), "Tags": _tags(member, expect),
            "Status": member.get("Status", "alive"), **_PROTOCOL}


async def members(services: Services, req: ApiRequest) -> Any:
    member, region = services.member, _region(services)
    datacenter = member.get("Tags", {}).get("dc", "dc1")
    servers = services.cluster.members()
    return {"ServerName": member.get("Name", "").removesuffix(f".{region}"),
            "ServerRegion": region, "ServerDC": datacenter,
            "Members": [_member(m, len(servers)) for m in servers]}


async def servers(services: Services, req: ApiRequest) -> Any:
    # A client agent answers with the servers it would try; a server with all of them.
    if services.server is None:
        return services.cluster.known_servers()
    return [rpc_address(m) for m in services.cluster.members()]


async def regions(services: Services, req: ApiRequest) -> Any:
    return [_region(services)]


async def peers(services: Services, req: ApiRequest) -> Any:
    return [rpc_address(m) for m in services.cluster.members()]


async def leader(services: Services, req: ApiRequest) -> Any:
    current = services.cluster.leader()
    if current is None:
        raise NO_LEADER
    return rpc_address(current)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(GET, "/v1/agent/members", members, Need.node_read)
    routes.add(GET, "/v1/agent/servers", servers, Need.agent_read)
    routes.add(GET, "/v1/regions", regions)
    routes.add(GET, "/v1/status/peers", peers)
    routes.add(GET, "/v1/status/leader", leader)
