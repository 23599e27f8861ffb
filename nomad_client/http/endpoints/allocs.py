"""/v1/allocations (of the namespace the request names; ``*``: of every namespace, keeping
what the caller may see), /v1/allocation/:id (found by ID, checked in its namespace) and
/v1/allocation/:id/stop (a user's stop: the allocation is replaced, see
``server.alloc_control``)."""

from __future__ import annotations

from aiohttp import web

from nomad_client.http.auth import Need, allows, require
from nomad_client.http.endpoints.jobs import READ_JOB, alloc_stub
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import found_or_404, not_found
from nomad_client.http.query import block, list_query, query_bool
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.server.server import NotFound, Resource
from nomad_client.structs.codec import to_api

ALLOC_LIFECYCLE = Need.namespace("alloc-lifecycle")


async def list_allocs(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = services.own_server
    with_states = query_bool(req.query, "task_states", default=True)
    with_resources = query_bool(req.query, "resources")
    listing = await list_query(server, req.query, (Resource.ALLOCATIONS,))
    stubs = [alloc_stub(alloc, resources=with_resources, task_states=with_states)
             for alloc in server.allocations(listing.namespace)
             if allows(req, alloc.namespace, READ_JOB)]
    return await listing.reply(stubs)


async def get_alloc(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.own_server, req.query, (Resource.ALLOCATIONS,))
    alloc = found_or_404(services.own_server.allocation(req.params["alloc_id"]), "alloc not found")
    require(req, alloc.namespace, READ_JOB)
    return Reply(to_api(alloc), index)


async def stop_alloc(services: Services, req: ApiRequest) -> Reply:
    no_shutdown_delay = query_bool(req.query, "no_shutdown_delay")
    reschedule = query_bool(req.query, "reschedule")
    server = services.own_server
    alloc = found_or_404(server.allocation(req.params["alloc_id"]), "allocation not found")
    require(req, alloc.namespace, ALLOC_LIFECYCLE)
    try:
        eval_id, index = await server.stop_allocation(
            alloc.id, no_shutdown_delay=no_shutdown_delay, reschedule=reschedule)
    except NotFound as err:  # garbage-collected meanwhile
        raise not_found(str(err)) from None
    return Reply({"EvalID": eval_id, "Index": index}, index)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/allocations", list_allocs, READ_JOB)
    routes.add(("GET",), "/v1/allocation/{alloc_id}", get_alloc, READ_JOB)
    routes.add(("PUT", "POST"), "/v1/allocation/{alloc_id}/stop", stop_alloc, ALLOC_LIFECYCLE)
