"""/v1/agent/health, /v1/agent/self, /v1/status/leader."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from nomad_client.http.router import ApiRequest, Router
from nomad_client.http.services import Services

GET = ("GET",)
KNOWN_PARTS = frozenset({"client", "server"})


def register(router: Router, services: Services) -> None:
    default_parts = frozenset({"server"} | ({"client"} if services.client else set()))
    encoded: dict[tuple[Any, ...], web.Response] = {}

    async def health(req: ApiRequest) -> Any:
        # Without ?type, report only the parts this agent runs (as Nomad does).
        asked = (frozenset(req.query.getall("type", ())) & KNOWN_PARTS or None
                 if req.raw.query_string else None)
        client_health = services.client.healthy() if services.client is not None else None
        # Health is polled constantly (probes, tasks); its few possible bodies are encoded
        # once. A fresh Response each time: a response object can only be sent once.
        key = (asked, client_health)
        cached = encoded.get(key)
        if cached is None:
            cached = encoded[key] = _health_body(asked or default_parts, client_health)
        return web.Response(body=cached.body, status=cached.status,
                            content_type="application/json")

    def _health_body(wanted: frozenset[str], client_health: tuple[bool, str] | None
                     ) -> web.Response:
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
        return web.Response(body=json.dumps(body, separators=(",", ":")).encode(),
                            status=200 if ok else 500)

    async def self_(req: ApiRequest) -> Any:
        return {"config": services.agent_config, "member": services.member,
                "stats": {"nomad": {"server": "true",
                                    "client": str(services.client is not None).lower()}}}

    async def leader(req: ApiRequest) -> Any:
        return f"{services.member['Addr']}:{services.member['Port']}"

    router.add(GET, "/v1/agent/health", health)
    router.add(GET, "/v1/agent/self", self_, capability="agent:read")
    router.add(GET, "/v1/status/leader", leader)
