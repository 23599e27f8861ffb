"""Who the cluster is: /v1/agent/members, /v1/agent/servers, /v1/regions, /v1/status/peers
and /v1/status/leader.

This agent is a cluster of one: its embedded server is the leader, the only peer and the
only gossip member. Nomad names servers by their RPC address (port 4647) and members by
their gossip address (4648); this agent listens on neither (the client reaches the server in
process), so both are Nomad's default ports on the agent's advertised host, which is what a
Nomad client or tool expects to parse.
"""

from __future__ import annotations

from typing import Any

from nomad_client.client.fingerprint import NOMAD_VERSION
from nomad_client.http.auth import Need
from nomad_client.http.endpoints.routes import Routes
from nomad_client.http.router import ApiRequest, Router
from nomad_client.http.services import Services

GET = ("GET",)
RPC_PORT = 4647
SERF_PORT = 4648
# What a current Nomad server's serf member reports; tools only check they are present.
_PROTOCOL = {"ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
             "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4}


def rpc_address(member: dict[str, Any]) -> str:
    """The server's RPC address as Nomad writes it: ``ip:4647``."""
    return f"{member['Addr']}:{RPC_PORT}"


def _tags(member: dict[str, Any], region: str, datacenter: str) -> dict[str, str]:
    return {"role": "nomad", "region": region, "dc": datacenter, "port": str(RPC_PORT),
            "bootstrap": "1", "expect": "1", "build": NOMAD_VERSION, "vsn": "1",
            "raft_vsn": "3", "rpc_addr": member["Addr"]}


async def members(services: Services, req: ApiRequest) -> Any:
    member, region = services.member, services.server.region
    datacenter = member.get("Tags", {}).get("dc", "dc1")
    return {"ServerName": member["Name"].removesuffix(f".{region}"), "ServerRegion": region,
            "ServerDC": datacenter,
            "Members": [{"Name": member["Name"], "Addr": member["Addr"], "Port": SERF_PORT,
                         "Tags": _tags(member, region, datacenter),
                         "Status": member.get("Status", "alive"), **_PROTOCOL}]}


async def servers(services: Services, req: ApiRequest) -> Any:
    return [rpc_address(services.member)]


async def regions(services: Services, req: ApiRequest) -> Any:
    return [services.server.region]


async def peers(services: Services, req: ApiRequest) -> Any:
    return [rpc_address(services.member)]


async def leader(services: Services, req: ApiRequest) -> Any:
    return rpc_address(services.member)


def register(router: Router, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(GET, "/v1/agent/members", members, Need.node_read)
    routes.add(GET, "/v1/agent/servers", servers, Need.agent_read)
    routes.add(GET, "/v1/regions", regions)
    routes.add(GET, "/v1/status/peers", peers)
    routes.add(GET, "/v1/status/leader", leader)
