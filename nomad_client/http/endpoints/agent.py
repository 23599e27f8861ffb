"""/v1/agent/health, /v1/agent/self, and the gossip writes /v1/agent/join and
/v1/agent/force-leave (the cluster's routes are in ``cluster``)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import platform
import sys
from typing import Any

from aiohttp import web

from nomad_client.client.fingerprint import NOMAD_VERSION
from nomad_client.goflags import parse_go_bool
from nomad_client.http.auth import Need
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import bad_request
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services

GET = ("GET",)
WRITE = ("PUT", "POST")
KNOWN_PARTS = frozenset({"client", "server"})
_SERVER_ONLY = frozenset({"server"})


async def health(services: Services, req: ApiRequest) -> web.Response:
    # Without ?type, report only the parts this agent runs (as Nomad does).
    asked = (frozenset(req.query.getall("type", ())) & KNOWN_PARTS or None
             if req.raw.query_string else None)
    client = services.client
    client_health = client.healthy() if client is not None else None
    body, status = _health_body(asked or (KNOWN_PARTS if client is not None else _SERVER_ONLY),
                                client_health)
    # A fresh Response each time: a response object can only be sent once.
    return web.Response(body=body, status=status, content_type="application/json")


# Health is polled constantly (probes, tasks); its few possible bodies are encoded once.
@functools.lru_cache(maxsize=64)
def _health_body(wanted: frozenset[str], client_health: tuple[bool, str] | None
                 ) -> tuple[bytes, int]:
    body: dict[str, Any] = {}
    ok = True
    if "client" in wanted:
        if client_health is None:
            body["client"] = {"message": "client not enabled", "ok": False}
        else:
            healthy, message = client_health
            body["client"] = {"message": message, "ok": healthy}
        ok = ok and body["client"]["ok"]
    if "server" in wanted:
        body["server"] = {"message": "ok", "ok": True}
    return json.dumps(body, separators=(",", ":")).encode(), 200 if ok else 500


# Nomad's agent Config as /v1/agent/self shows it: every top-level field, Go's zero value
# where this agent has nothing to say (the agent's own config fills in the rest).
CONFIG_ZERO: dict[str, Any] = {
    "Region": "", "Datacenter": "", "NodeName": "", "DataDir": "", "PluginDir": "",
    "LogLevel": "", "LogJson": False, "LogFile": "", "LogIncludeLocation": False,
    "LogRotateDuration": "", "LogRotateBytes": 0, "LogRotateMaxFiles": 0, "BindAddr": "",
    "EnableDebug": False, "Ports": None, "Addresses": None, "AdvertiseAddrs": None,
    "Client": None, "Server": None, "RPC": None, "ACL": None, "Telemetry": None,
    "LeaveOnInt": False, "LeaveOnTerm": False, "EnableSyslog": False, "SyslogFacility": "",
    "DisableUpdateCheck": None, "DisableAnonymousSignature": False, "Consuls": None,
    "Vaults": None, "UI": None, "DevMode": False, "Files": None, "ConfigPaths": None,
    "TLSConfig": None, "HTTPAPIResponseHeaders": None, "Sentinel": None, "Autopilot": None,
    "Plugins": None, "Limits": {}, "Audit": None, "Reporting": None, "KEKProviders": None,
    "Eventlog": None,
    "Version": {"Revision": "", "Version": NOMAD_VERSION, "VersionPrerelease": "",
                "VersionMetadata": ""},
}
# A lone agent's gossip member, as Nomad's serf reports one.
MEMBER_ZERO: dict[str, Any] = {
    "Name": "", "Addr": "", "Port": 0, "Tags": {}, "Status": "alive", "ProtocolMin": 1,
    "ProtocolMax": 5, "ProtocolCur": 2, "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4}


def _runtime_stats() -> dict[str, str]:
    # Nomad reports Go's runtime; ours is the Python process and its event loop.
    return {"os": sys.platform, "arch": platform.machine(), "version": platform.python_version(),
            "max_procs": str(os.cpu_count() or 1), "cpu_count": str(os.cpu_count() or 1),
            "goroutines": str(len(asyncio.all_tasks()))}


def agent_stats(services: Services) -> dict[str, dict[str, str]]:
    """``stats`` of /v1/agent/self: Nomad's sections, every value a string."""
    member = services.member
    server = services.server
    # This server's own part in the election (a cluster of one always leads); who leads
    # and how many servers there are come from the cluster view.
    leading = server is not None and server.is_leader
    leader = services.cluster.leader()
    servers = len(services.cluster.members()) or 1
    stats: dict[str, dict[str, str]] = {
        "nomad": {"server": str(server is not None).lower(),
                  "client": str(services.client is not None).lower(),
                  "leader": str(leading).lower(), "bootstrap": "true", "known_regions": "1",
                  "leader_addr": (leader or {}).get("RPCAddr", "")
                  or f"{member.get('Addr', '')}:{member.get('Port', 0)}"},
        "raft": {"state": "Leader" if leading else "Follower",
                 "num_peers": str(servers - 1)},
        "serf": {"members": str(servers), "failed": "0", "left": "0"},
        "runtime": _runtime_stats(),
    }
    client = services.client
    if client is not None:
        # Nomad's CLI finds the local node here (node status -self).
        stats["client"] = {
            "node_id": client.node_id,
            "known_servers": ",".join(services.cluster.known_servers()),
            "num_allocations": str(len(services.server.node_allocs(client.node_id))
                                   if services.server is not None else 0),
            "last_heartbeat": "0s", "heartbeat_ttl": "0s"}
    return stats


async def agent_self(services: Services, req: ApiRequest) -> Any:
    return {"config": CONFIG_ZERO | services.agent_config(),
            "member": MEMBER_ZERO | services.member, "stats": agent_stats(services)}


# The agent is its region's only server and keeps no gossip pool: a join is refused in Nomad's
# answer shape (nothing joined, the reason in ``error``), never pretended.
NO_GOSSIP_POOL = "this agent is its region's only server and has no gossip pool to join"


async def join(services: Services, req: ApiRequest) -> Any:
    addresses = req.query.getall("address", ())
    if not addresses:
        raise bad_request("missing address to join")
    return {"num_joined": 0, "error": f"{NO_GOSSIP_POOL}: {', '.join(addresses)}"}


async def force_leave(services: Services, req: ApiRequest) -> Any:
    """Nomad's answer to a member that is not failed (as every name is here): 200, nothing."""
    if not req.query.get("node"):
        raise bad_request("missing node to force leave")
    prune = req.query.get("prune")
    if prune is not None and parse_go_bool(prune) is None:
        raise bad_request("invalid prune value")
    return None


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(GET, "/v1/agent/health", health)
    routes.add(GET, "/v1/agent/self", agent_self, Need.agent_read)
    routes.add(WRITE, "/v1/agent/join", join, Need.agent_write)
    routes.add(WRITE, "/v1/agent/force-leave", force_leave, Need.agent_write)
