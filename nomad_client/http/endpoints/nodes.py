"""/v1/nodes (with go-bexpr ``filter`` over the full node) and /v1/node/:id."""

from __future__ import annotations

import asyncio
from typing import Any

from nomad_client.http.auth import Need, allows
from nomad_client.http.endpoints.jobs import READ_JOB, alloc_stub
from nomad_client.http.endpoints.routes import Routes
from nomad_client.http.errors import bad_request, found_or_404
from nomad_client.http.query import block, query_filter
from nomad_client.http.router import ApiRequest, Reply, Router
from nomad_client.http.services import Services
from nomad_client.server.bexpr import Filter, FilterError
from nomad_client.server.server import Resource
from nomad_client.structs.codec import to_api
from nomad_client.structs.models import Node

STUB_KEYS = ("ID", "Datacenter", "Name", "NodeClass", "NodePool", "Drain",
             "SchedulingEligibility", "Status", "StatusDescription", "Drivers",
             "CreateIndex", "ModifyIndex")


def node_api(node: Node) -> dict[str, Any]:
    return to_api(node) | {"SecretID": ""}


def node_stub(full: dict[str, Any]) -> dict[str, Any]:
    stub = {k: full[k] for k in STUB_KEYS}
    stub["Address"] = full["HTTPAddr"].rsplit(":", 1)[0]
    stub["Version"] = full["Attributes"].get("nomad.version", "")
    return stub


def _filtered_stubs(nodes: list[Node], node_filter: Filter | None) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        full = node_api(node)
        if node_filter is not None:
            try:
                if not node_filter.matches(full):
                    continue
            except FilterError as err:
                raise bad_request(f"failed to read result page: {err}") from None
        out.append(node_stub(full))
    return out


async def list_nodes(services: Services, req: ApiRequest) -> Reply:
    node_filter = query_filter(req.query)
    index = await block(services.server, req.query, (Resource.NODES,))
    prefix = req.query.get("prefix", "")
    nodes = [n for n in services.server.nodes() if n.id.startswith(prefix)]
    # A caller's filter is CPU work on caller input: evaluate it off the event loop.
    out = await asyncio.to_thread(_filtered_stubs, nodes, node_filter)
    return Reply(out, index)


async def get_node(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.server, req.query, (Resource.NODES,))
    node = found_or_404(services.server.node(req.params["node_id"]), "node not found")
    return Reply(node_api(node), index)


async def node_allocs(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.server, req.query, (Resource.ALLOCATIONS,))
    allocs = services.server.node_allocs(req.params["node_id"])
    return Reply([alloc_stub(a) for a in allocs if allows(req, a.namespace, READ_JOB)], index)


def register(router: Router, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/nodes", list_nodes, Need.node_read)
    routes.add(("GET",), "/v1/node/{node_id}", get_node, Need.node_read)
    routes.add(("GET",), "/v1/node/{node_id}/allocations", node_allocs, Need.node_read)
