"""/v1/evaluations, /v1/evaluation/:id and /v1/evaluation/:id/allocations.

The list takes Nomad's query: ``prefix`` (of the ID), ``namespace`` (``*``: every one the
caller may read), ``filter`` (or the older ``job`` and ``status``, never both), ``reverse``,
paging (``per_page``, ``next_token``) and blocking. Without a prefix, evaluations are in
creation order and a token is ``<CreateIndex>.<ID>``; with one, in ID order, the token an ID.
"""

from __future__ import annotations

from aiohttp import web

from nomad_client.http.auth import allows, require
from nomad_client.http.endpoints.jobs import READ_JOB, alloc_stub
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import bad_request, found_or_404
from nomad_client.http.query import BY_ID, block, by_creation, list_query
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.server.server import Resource
from nomad_client.structs.codec import to_api

EVALS = (Resource.EVALUATIONS,)


def _legacy_filter(req: ApiRequest) -> dict[str, str]:
    """``?job=`` and ``?status=``: exact matches on JobID and Status."""
    wanted = {"JobID": req.query.get("job", ""), "Status": req.query.get("status", "")}
    return {field: value for field, value in wanted.items() if value}


async def list_evaluations(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = services.own_server
    legacy = _legacy_filter(req)
    if legacy and req.query.get("filter"):
        raise bad_request("filter expression cannot be used with other filter parameters")
    listing = await list_query(server, req.query, EVALS)
    found = [to_api(e) for e in server.store.values("evals")
             if (listing.namespace is None or e.namespace == listing.namespace)
             and allows(req, e.namespace, READ_JOB)]
    return await listing.reply([e for e in found if all(e.get(k) == v
                                                        for k, v in legacy.items())],
                               BY_ID if listing.prefix else by_creation())


async def get_evaluation(services: Services, req: ApiRequest) -> Reply:
    index = await block(services.own_server, req.query, EVALS)
    ev = found_or_404(services.own_server.evaluation(req.params["eval_id"]), "eval not found")
    require(req, ev.namespace, READ_JOB)
    return Reply(to_api(ev), index)


async def evaluation_allocations(services: Services, req: ApiRequest) -> Reply:
    """The stubs of the allocations an evaluation placed (or last touched)."""
    server = services.own_server
    index = await block(server, req.query, (Resource.ALLOCATIONS, Resource.EVALUATIONS))
    eval_id = req.params["eval_id"]
    ev = server.evaluation(eval_id)
    if ev is not None:
        require(req, ev.namespace, READ_JOB)
    allocs = [a for a in server.allocations() if a.eval_id == eval_id]
    # Nomad's stubs here are its default ones: no AllocatedResources.
    return Reply([alloc_stub(a, resources=False) for a in allocs
                  if allows(req, a.namespace, READ_JOB)], index)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/evaluations", list_evaluations, READ_JOB)
    routes.add(("GET",), "/v1/evaluation/{eval_id}", get_evaluation, READ_JOB)
    routes.add(("GET",), "/v1/evaluation/{eval_id}/allocations", evaluation_allocations,
               READ_JOB)
