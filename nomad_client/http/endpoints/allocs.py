"""/v1/allocations and /v1/allocation/:id."""

from __future__ import annotations

from typing import Any

from nomad_client.http.endpoints.jobs import alloc_stub
from nomad_client.http.errors import not_found
from nomad_client.http.query import block, query_bool
from nomad_client.http.router import ApiRequest, Reply, Router
from nomad_client.http.services import Services
from nomad_client.structs.codec import to_api


def register(router: Router, services: Services) -> None:
    store = services.server.store

    async def list_allocs(req: ApiRequest) -> Any:
        index = await block(store, req.query, ("allocs",))
        prefix = req.query.get("prefix", "")
        with_states = query_bool(req.query, "task_states", default=True)
        stubs = []
        for alloc in store.rows("allocs"):
            if alloc.id.startswith(prefix):
                stub = alloc_stub(alloc)
                if not with_states:
                    stub.pop("TaskStates")
                stubs.append(stub)
        return Reply(stubs, index)

    async def get_alloc(req: ApiRequest) -> Any:
        index = await block(store, req.query, ("allocs",))
        alloc = store.get("allocs", req.params["alloc_id"])
        if alloc is None:
            raise not_found("alloc not found")
        return Reply(to_api(alloc), index)

    router.add(("GET",), "/v1/allocations", list_allocs, "namespace:read-job")
    router.add(("GET",), "/v1/allocation/{alloc_id}", get_alloc, "namespace:read-job")
