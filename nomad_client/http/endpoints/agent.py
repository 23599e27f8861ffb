"""/v1/agent/health, /v1/agent/self, /v1/status/leader."""

from __future__ import annotations

from typing import Any

from nomad_client.http.router import ApiRequest, Reply, Router
from nomad_client.http.services import Services

GET = ("GET",)


def register(router: Router, services: Services) -> None:
    async def health(req: ApiRequest) -> Any:
        asked = set(req.query.getall("type", ())) if req.raw.query_string else set()
        # Without ?type, report only the parts this agent runs (as Nomad does).
        wanted = asked or {"server"} | ({"client"} if services.client is not None else set())
        body: dict[str, Any] = {}
        ok = True
        if "client" in wanted:
            if services.client is None:
                body["client"] = {"message": "client not enabled", "ok": False}
            else:
                healthy, message = services.client.healthy()
                body["client"] = {"message": message, "ok": healthy}
            ok = ok and body["client"]["ok"]
        if "server" in wanted:
            body["server"] = {"message": "ok", "ok": True}
        return body if ok else Reply(body, status=500)

    async def self_(req: ApiRequest) -> Any:
        return {"config": services.agent_config, "member": services.member,
                "stats": {"nomad": {"server": "true",
                                    "client": str(services.client is not None).lower()}}}

    async def leader(req: ApiRequest) -> Any:
        return f"{services.member['Addr']}:{services.member['Port']}"

    router.add(GET, "/v1/agent/health", health)
    router.add(GET, "/v1/agent/self", self_, capability="agent:read")
    router.add(GET, "/v1/status/leader", leader)
