"""/v1/nodes (with go-bexpr ``filter`` over the full node), /v1/node/:id with its
eligibility, drain and evaluate, and the node pools (/v1/node/pools,
/v1/node/pool/:name[/nodes])."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from nomad_client.http.auth import Need, allows, require_in_request
from nomad_client.http.bodyfields import object_fields, string_field, string_map_field
from nomad_client.http.endpoints.cluster import rpc_address
from nomad_client.http.endpoints.jobs import READ_JOB, alloc_stub
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import (
    PERMISSION_DENIED,
    HTTPError,
    bad_request,
    found_or_404,
    not_found,
)
from nomad_client.http.query import block, list_query, query_bool
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.server.drain import DrainError, DrainSpec, UnknownNode
from nomad_client.server.server import NotFound, Resource
from nomad_client.structs.codec import to_api
from nomad_client.structs.models import Node

STUB_KEYS = ("ID", "Datacenter", "Name", "NodeClass", "NodePool", "Drain",
             "SchedulingEligibility", "Status", "StatusDescription", "Drivers", "LastDrain",
             "CreateIndex", "ModifyIndex")


def node_api(node: Node) -> dict[str, Any]:
    return to_api(node) | {"SecretID": ""}


def node_stub(full: dict[str, Any], *, resources: bool = False,
              os: bool = False) -> dict[str, Any]:
    """Nomad's NodeListStub; ``?resources=true`` adds the node's resources and ``?os=true``
    its ``os.name`` attribute."""
    stub = {k: full[k] for k in STUB_KEYS}
    stub["Address"] = full["HTTPAddr"].rsplit(":", 1)[0]
    stub["Version"] = full["Attributes"].get("nomad.version", "")
    if resources:
        stub["NodeResources"] = full["NodeResources"]
        stub["ReservedResources"] = full["ReservedResources"]
    if os:
        stub["Attributes"] = {"os.name": full["Attributes"].get("os.name", "")}
    return stub


async def list_nodes(services: Services, req: ApiRequest) -> web.StreamResponse:
    with_resources = query_bool(req.query, "resources")
    with_os = query_bool(req.query, "os")
    listing = await list_query(services.own_server, req.query, (Resource.NODES,))
    # The filter runs on the full node, as Nomad's; each is shown as its stub.
    return await listing.reply(
        [node_api(node) for node in services.own_server.nodes()],
        view=lambda full: node_stub(full, resources=with_resources, os=with_os))


async def get_node(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.own_server, req.query, (Resource.NODES,))
    node = found_or_404(services.own_server.node(req.params["node_id"]), "node not found")
    return Reply(node_api(node), index)


async def node_allocs(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.own_server, req.query, (Resource.ALLOCATIONS,))
    allocs = services.own_server.node_allocs(req.params["node_id"])
    return Reply([alloc_stub(a) for a in allocs if allows(req, a.namespace, READ_JOB)], index)


# ---- eligibility and drain ---------------------------------------------------------------
async def _body_fields(req: ApiRequest, names: tuple[str, ...]) -> dict[str, Any]:
    fields = object_fields(await req.json(), names)
    node_id = string_field(fields, "NodeID")
    if node_id and node_id != req.params["node_id"]:
        raise bad_request("NodeID in the body does not match the path")
    return fields


def _update_reply(index: int) -> dict[str, Any]:
    # Nomad's NodeDrainUpdateResponse / NodeEligibilityUpdateResponse.
    return {"NodeModifyIndex": index, "EvalIDs": [], "EvalCreateIndex": 0, "Index": index,
            "LastIndex": index, "RequestTime": 0}


async def set_eligibility(services: Services, req: ApiRequest) -> Any:
    fields = await _body_fields(req, ("NodeID", "Eligibility"))
    eligibility = string_field(fields, "Eligibility")
    if eligibility not in ("eligible", "ineligible"):
        raise bad_request(f"invalid scheduling eligibility {eligibility!r}")
    with _node_refusals():
        index = await services.own_server.drainer.set_eligibility(req.params["node_id"],
                                                              eligibility)
    return _update_reply(index)


def _drain_spec(value: Any) -> DrainSpec | None:
    if value is None:
        return None
    fields = object_fields(value, ("Deadline", "IgnoreSystemJobs"), "DrainSpec")
    deadline = fields.get("Deadline", 0)
    ignore = fields.get("IgnoreSystemJobs", False)
    if isinstance(deadline, bool) or not isinstance(deadline, int):
        raise bad_request("DrainSpec.Deadline must be an integer of nanoseconds")
    if not isinstance(ignore, bool):
        raise bad_request("DrainSpec.IgnoreSystemJobs must be a boolean")
    return DrainSpec(deadline_ns=deadline, ignore_system_jobs=ignore)


async def drain_node(services: Services, req: ApiRequest) -> Any:
    fields = await _body_fields(req, ("NodeID", "DrainSpec", "MarkEligible", "Meta"))
    mark_eligible = fields.get("MarkEligible", False)
    if not isinstance(mark_eligible, bool):
        raise bad_request("MarkEligible must be a boolean")
    spec = _drain_spec(fields.get("DrainSpec"))
    meta = string_map_field(fields, "Meta")
    # Who asked, as Nomad records it: the caller's token (none: anonymous, ACLs off, or a
    # workload identity); only its public accessor, never the secret.
    token = req.identity.token
    with _node_refusals():
        index = await services.own_server.drainer.update_drain(
            req.params["node_id"], spec, mark_eligible,
            accessor_id=token.accessor_id if token is not None else "", meta=meta)
    return _update_reply(index)


@contextlib.contextmanager
def _node_refusals() -> Iterator[None]:
    """The drainer's refusals as HTTP errors."""
    try:
        yield
    except UnknownNode:
        raise not_found("node not found") from None
    except DrainError as err:
        raise bad_request(str(err)) from None


async def evaluate_node(services: Services, req: ApiRequest) -> Reply:
    """Nomad's NodeUpdateResponse: the evaluations made, and the node as it was."""
    server = services.own_server
    try:
        eval_ids, eval_index = await server.evaluate_node(req.params["node_id"])
    except NotFound:
        raise not_found("node not found") from None
    node = found_or_404(server.node(req.params["node_id"]), "node not found")
    index = eval_index or server.index_of(Resource.NODES)
    return Reply({"EvalIDs": eval_ids, "EvalCreateIndex": eval_index,
                  "NodeModifyIndex": node.modify_index, "HeartbeatTTL": 0, "Features": 0,
                  "LeaderRPCAddr": rpc_address(services.cluster.leader() or services.member),
                  "NumNodes": len(server.nodes()), "Servers": None,
                  "SchedulingEligibility": node.scheduling_eligibility,
                  "SignedIdentity": None, "Index": index, "LastContact": 0,
                  "KnownLeader": True, "NextToken": ""}, index)


# ---- node pools -----------------------------------------------------------------------
BUILTIN_POOLS = {"all": "Node pool with all nodes in the cluster.",
                 "default": "Default node pool."}


def _pool_api(name: str, index: int) -> dict[str, Any]:
    return {"Name": name, "Description": BUILTIN_POOLS.get(name, ""), "Meta": None,
            "SchedulerConfiguration": None, "CreateIndex": 1, "ModifyIndex": index}


def _pool_names(services: Services) -> list[str]:
    """The built-in pools and every pool a node registered in (Nomad creates those)."""
    return sorted({*BUILTIN_POOLS, *(n.node_pool for n in services.own_server.nodes())})


def _require_pool_read(req: ApiRequest, name: str) -> None:
    if not req.identity.acl.allow_node_pool(name, "read"):
        raise HTTPError(403, PERMISSION_DENIED)


async def list_pools(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.own_server, req.query, (Resource.NODES,))
    prefix = req.query.get("prefix", "")
    acl = req.identity.acl
    return Reply([_pool_api(name, 1) for name in _pool_names(services)
                  if name.startswith(prefix) and acl.allow_node_pool_access(name)], index)


async def get_pool(services: Services, req: ApiRequest) -> Reply:
    name = req.params["pool"]
    _require_pool_read(req, name)
    index = await block(services.own_server, req.query, (Resource.NODES,))
    if name not in _pool_names(services):
        raise not_found("node pool not found")
    return Reply(_pool_api(name, 1), index)


async def pool_nodes(services: Services, req: ApiRequest) -> web.StreamResponse:
    name = req.params["pool"]
    _require_pool_read(req, name)
    require_in_request(req, Need.node_read)
    listing = await list_query(services.own_server, req.query, (Resource.NODES,))
    if name not in _pool_names(services):
        raise not_found("node pool not found")
    return await listing.reply(
        [node_api(n) for n in services.own_server.nodes() if name == "all" or n.node_pool == name],
        view=node_stub)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/nodes", list_nodes, Need.node_read)
    # Static, so ``pools`` is never taken for a node ID.
    routes.add(("GET",), "/v1/node/pools", list_pools)
    routes.add(("GET",), "/v1/node/pool/{pool}", get_pool)
    routes.add(("GET",), "/v1/node/pool/{pool}/nodes", pool_nodes)
    routes.add(("PUT", "POST"), "/v1/node/{node_id}/eligibility", set_eligibility,
               Need.node_write)
    routes.add(("PUT", "POST"), "/v1/node/{node_id}/drain", drain_node, Need.node_write)
    routes.add(("PUT", "POST"), "/v1/node/{node_id}/evaluate", evaluate_node,
               Need.node_write)
    routes.add(("GET",), "/v1/node/{node_id}", get_node, Need.node_read)
    routes.add(("GET",), "/v1/node/{node_id}/allocations", node_allocs, Need.node_read)
