"""/v1/agent/health, /v1/agent/self, /v1/status/leader."""

from __future__ import annotations

import functools
import json
from typing import Any

from aiohttp import web

from nomad_client.http.auth import Need
from nomad_client.http.endpoints.routes import Routes
from nomad_client.http.router import ApiRequest, Router
from nomad_client.http.services import Services

GET = ("GET",)
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


async def agent_self(services: Services, req: ApiRequest) -> Any:
    return {"config": services.agent_config(), "member": services.member,
            "stats": {"nomad": {"server": "true",
                                "client": str(services.client is not None).lower()}}}


async def leader(services: Services, req: ApiRequest) -> Any:
    return f"{services.member['Addr']}:{services.member['Port']}"


def register(router: Router, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(GET, "/v1/agent/health", health)
    routes.add(GET, "/v1/agent/self", agent_self, Need.agent_read)
    routes.add(GET, "/v1/status/leader", leader)
