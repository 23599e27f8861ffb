"""Garbage collection: ``PUT /v1/system/gc`` (the server's, management) and
``/v1/client/gc`` (the local client's finished allocations and their directories, ``node``
write; python-nomad sends it as a GET, which Nomad accepts)."""

from __future__ import annotations

from typing import Any

from nomad_client.http.auth import Need
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import bad_request, not_found
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.server.gc import collect_garbage


async def system_gc(services: Services, req: ApiRequest) -> Any:
    server = services.own_server
    await collect_garbage(server.store, server.job_status)
    return None


async def client_gc(services: Services, req: ApiRequest) -> Any:
    client = services.client
    if client is None:
        raise bad_request("No local Node and node_id not provided")
    node_id = req.query.get("node_id")
    if node_id and node_id != client.node_id:
        raise not_found(f"No path to node {node_id}")
    await client.collect_garbage()
    return None


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("PUT",), "/v1/system/gc", system_gc, Need.management)
    routes.add(("PUT", "POST", "GET"), "/v1/client/gc", client_gc, Need.node_write)
