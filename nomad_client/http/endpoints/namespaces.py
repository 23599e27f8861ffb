"""/v1/namespaces and /v1/namespace[/:name], with Nomad's shapes, codes and texts.

Reads are open to any caller and answer for the namespaces it holds any capability in (a
list leaves the others out, a read of one is 403); writes and deletes are management only.
Bodies are Nomad's Namespace object, read as Go's decoder reads it (``bodyfields``). Where
Nomad answers 500 for the caller's mistakes (invalid namespace, delete refused), we answer
400, and 404 for a namespace that does not exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
from aiohttp import web

from nomad_client.http.auth import Need, allows, require
from nomad_client.http.bodyfields import (
    object_fields,
    path_id,
    string_field,
    string_map_field,
    strings_field,
)
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request, found_or_404
from nomad_client.http.query import block, by_field, list_query
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.server.namespaces import NamespaceError
from nomad_client.server.server import Resource
from nomad_client.structs.codec import to_api
from nomad_client.structs.namespaces import Namespace, NamespaceCapabilities

NAMESPACE_FIELDS = ("Name", "Description", "Quota", "Capabilities", "Meta",
                    "NodePoolConfiguration", "VaultConfiguration", "ConsulConfiguration")
CAPABILITY_FIELDS = ("EnabledTaskDrivers", "DisabledTaskDrivers", "TaskAPI")
# Parts of a namespace only Nomad Enterprise has: any value is refused, as Nomad CE does.
UNLICENSED = {"NodePoolConfiguration": "Node Pools Governance is unlicensed.",
              "VaultConfiguration": "Multi-Cluster Vault is unlicensed.",
              "ConsulConfiguration": "Multi-Cluster Consul is unlicensed."}
NAME_MISMATCH = "Namespace name does not match request path"
GET = ("GET",)
WRITE = ("PUT", "POST")
BY_NAME = by_field("Name")


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """A namespace refusal (``NamespaceError``) as the HTTP error it maps to."""
    try:
        yield
    except NamespaceError as err:
        raise HTTPError(err.status, err.message) from None


def namespace_draft(body: Any) -> Namespace:
    """The namespace a request body describes (validated by the server when written)."""
    fields = object_fields(body, NAMESPACE_FIELDS)
    for name, refusal in UNLICENSED.items():
        if name in fields:
            raise bad_request(refusal)
    capabilities = None
    if "Capabilities" in fields:
        given = object_fields(fields["Capabilities"], CAPABILITY_FIELDS, "Capabilities")
        capabilities = NamespaceCapabilities(
            enabled_task_drivers=strings_field(given, "EnabledTaskDrivers"),
            disabled_task_drivers=strings_field(given, "DisabledTaskDrivers"),
            task_api=string_field(given, "TaskAPI"))
    return Namespace(name=string_field(fields, "Name"),
                     description=string_field(fields, "Description"),
                     quota=string_field(fields, "Quota"), capabilities=capabilities,
                     meta=string_map_field(fields, "Meta"))


def _written(index: int) -> web.Response:
    """A write Nomad answers with an empty 200 body (and the write's index)."""
    return web.Response(headers={"X-Nomad-Index": str(index)})


async def list_namespaces(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = services.own_server
    listing = await list_query(server, req.query, (Resource.NAMESPACES,))
    return await listing.reply(
        [to_api(ns) for ns in server.namespaces() if allows(req, ns.name, Need.namespace_access)],
        BY_NAME, prefix_of=lambda ns: ns["Name"])


async def get_namespace(services: Services, req: ApiRequest) -> Reply:
    name = req.params["name"]
    # Before the lookup, as Nomad: a refused caller cannot learn which namespaces exist.
    require(req, name, Need.namespace_access)
    index = await block(services.own_server, req.query, (Resource.NAMESPACES,))
    namespace = found_or_404(services.own_server.namespace(name), "Namespace not found")
    return Reply(to_api(namespace), index)


async def upsert_namespace(services: Services, req: ApiRequest) -> web.Response:
    """PUT/POST /v1/namespace[s] (name from the body) and /v1/namespace/:name."""
    draft = namespace_draft(await req.json())
    name = path_id(draft.name, req.params.get("name"), NAME_MISMATCH)
    with refusals():
        return _written(await services.own_server.upsert_namespace(attrs.evolve(draft, name=name)))


async def delete_namespace(services: Services, req: ApiRequest) -> web.Response:
    with refusals():
        return _written(await services.own_server.delete_namespace(req.params["name"]))


async def missing_name(services: Services, req: ApiRequest) -> Any:
    raise bad_request("Missing Namespace Name")


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(GET, "/v1/namespaces", list_namespaces)  # filtered: any caller
    routes.add(WRITE, "/v1/namespaces", upsert_namespace, Need.management)
    routes.add(WRITE, "/v1/namespace", upsert_namespace, Need.management)
    routes.add((*GET, *WRITE, "DELETE"), "/v1/namespace/", missing_name)
    routes.add(GET, "/v1/namespace/{name}", get_namespace)  # checked in the handler
    routes.add(WRITE, "/v1/namespace/{name}", upsert_namespace, Need.management)
    routes.add(("DELETE",), "/v1/namespace/{name}", delete_namespace, Need.management)
