"""Native service discovery (Nomad's routes and shapes): ``GET /v1/services``,
``GET /v1/service/:name``, ``DELETE /v1/service/:name/:id``, ``GET /v1/job/:id/services``,
``GET /v1/allocation/:id/services`` and ``GET /v1/allocation/:id/checks``.

Reading registrations needs ``read-job`` in their namespace, or a workload identity of that
namespace, which needs no policy for it (``auth.allows_service_read``, beside the workloads'
other implicit grants). So those two routes declare no ``Need``: the handler checks the
namespace asked for before it waits or reads (a 403 when refused), and with
``?namespace=*`` keeps the namespaces the caller may read. Job and allocation routes need
``read-job``, as Nomad's; deleting needs ``submit-job`` (or ``delete-service-registration``).

``GET /v1/service/:name`` narrows, in order: ``?tag=`` (every one given must be among the
registration's tags; Nomad has only ``filter``), ``?filter=`` (the registrations' fields)
and ``?choose=<n>|<key>``, Nomad's rendezvous choice of ``n`` of them. Unlike Nomad, an
unknown registration to delete is a 404 (Nomad: 500) and ``namespace=*`` on
``/v1/service/:name`` means every namespace the caller may read (Nomad: none).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from nomad_client.http.auth import (
    ALL_NAMESPACES,
    PERMISSION_REFUSED,
    Need,
    allows_service_read,
    request_namespace,
    require,
)
from nomad_client.http.endpoints.jobs import READ_JOB
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request, not_found
from nomad_client.http.query import (
    block,
    by_field,
    filtered,
    list_query,
    listed_namespace,
    query_filter,
)
from nomad_client.http.router import ApiRequest, Reply, json_response
from nomad_client.http.services import Services
from nomad_client.server.server import Resource
from nomad_client.server.services import ServiceError
from nomad_client.structs.models import Allocation

DELETE_SERVICE = Need.namespace("submit-job", "delete-service-registration")
Registration = dict[str, Any]

_CHOOSE_FORM = "failed to choose services: Parameter for choose must be in form '<number>|<key>'"
_GO_INT = re.compile(r"\A[+-]?[0-9]+\Z")
BY_NAMESPACE = by_field("Namespace")


def choose(registrations: list[Registration], param: str) -> list[Registration]:
    """Nomad's ``choose=<n>|<key>``: rendezvous (highest random weight) hashing, so one key
    keeps getting the same ``n`` registrations while they exist."""
    count_text, sep, key = param.partition("|")
    if not sep or not key or not _GO_INT.match(count_text):
        raise bad_request(_CHOOSE_FORM)
    count = int(count_text)
    if count < 0:
        raise bad_request("failed to choose services: the number to choose must not be "
                          "negative")

    def weight(registration: Registration) -> str:
        digest = hashlib.sha256(registration["Port"].to_bytes(8, "big"))
        for part in (registration["AllocID"], registration["ID"], registration["Namespace"],
                     registration["Address"], registration["ServiceName"],
                     *registration["Tags"], key):
            digest.update(part.encode())
        return digest.hexdigest()

    return sorted(registrations, key=weight)[:count]


def _readable(services: Services, req: ApiRequest, namespace: str | None,
              registrations: Iterable[Registration]) -> list[Registration]:
    """``registrations`` the caller may read: of ``namespace`` (None: every one it may)."""
    if namespace is not None:
        return list(registrations)  # checked before the read (``_require_read``)
    known: dict[str, bool] = {}
    return [r for r in registrations if known.setdefault(
        r["Namespace"], allows_service_read(req, services.own_server, r["Namespace"]))]


def _require_read(services: Services, req: ApiRequest) -> str | None:
    """The namespace the request reads (None: every one), refused with 403 when it is one
    the caller may not read."""
    namespace = listed_namespace(req.query)
    if namespace is not None and not allows_service_read(req, services.own_server, namespace):
        raise PERMISSION_REFUSED
    return namespace


async def list_services(services: Services, req: ApiRequest) -> web.StreamResponse:
    namespace = _require_read(services, req)
    listing = await list_query(services.own_server, req.query, (Resource.SERVICES,))
    names: dict[str, dict[str, set[str]]] = {}
    for row in _readable(services, req, namespace, services.own_server.services.all(namespace)):
        tags = names.setdefault(row["Namespace"], {}).setdefault(row["ServiceName"], set())
        tags.update(row["Tags"])
    # One item per namespace, as Nomad's; no prefix (Nomad's list takes none).
    return await listing.reply([{"Namespace": ns, "Services": [
        {"ServiceName": name, "Tags": sorted(tags)} for name, tags in sorted(found.items())]}
        for ns, found in names.items()], BY_NAMESPACE, prefix_of=None)


async def get_service(services: Services, req: ApiRequest) -> Reply:
    namespace = _require_read(services, req)
    service_filter = query_filter(req.query)
    choice = req.query.get("choose")
    index = await block(services.own_server, req.query, (Resource.SERVICES,))
    found = _readable(services, req, namespace,
                      services.own_server.services.by_name(req.params["name"], namespace))
    tags = req.query.getall("tag", [])
    found = [r for r in found if all(tag in r["Tags"] for tag in tags)]
    if service_filter is not None:
        # A caller's filter is CPU work on caller input: evaluate it off the event loop.
        found = await asyncio.to_thread(filtered, found, service_filter)
    if choice:
        found = choose(found, choice)
    return Reply(found, index)


async def delete_service(services: Services, req: ApiRequest) -> web.Response:
    namespace = request_namespace(req.query)
    require(req, namespace, DELETE_SERVICE)
    try:
        index = await services.own_server.services.delete(namespace, req.params["service_id"])
    except ServiceError as err:
        raise HTTPError(err.status, err.message) from None
    # Nomad answers 200 with an empty body and the index headers.
    headers = json_response(Reply(None, index)).headers
    return web.Response(headers={k: v for k, v in headers.items() if k.startswith("X-Nomad-")})


async def missing_name(services: Services, req: ApiRequest) -> Any:
    raise bad_request("missing service name")


def _alloc_asked(services: Services, req: ApiRequest) -> Allocation:
    """The allocation the path names, in the namespace the request names (``*``: any),
    which the caller may read jobs of: else 404 (another namespace counts as none)."""
    alloc = services.own_server.allocation(req.params["alloc_id"])
    namespace = request_namespace(req.query)
    if alloc is None or namespace not in (ALL_NAMESPACES, alloc.namespace):
        raise not_found("allocation not found")
    require(req, alloc.namespace, READ_JOB)
    return alloc


async def alloc_services(services: Services, req: ApiRequest) -> Reply:
    alloc = _alloc_asked(services, req)
    index = await block(services.own_server, req.query, (Resource.SERVICES,))
    return Reply(services.own_server.services.of_alloc(alloc.id), index)


async def job_services(services: Services, req: ApiRequest) -> Reply:
    namespace = request_namespace(req.query)
    job_id = req.params["job_id"]
    if services.own_server.job(job_id, namespace) is None:
        raise not_found("job not found")
    index = await block(services.own_server, req.query, (Resource.SERVICES,))
    return Reply([r for r in services.own_server.services.all(namespace) if r["JobID"] == job_id],
                 index)


async def alloc_checks(services: Services, req: ApiRequest) -> Any:
    """The results of the allocation's checks, from the client running it (this agent's:
    an allocation of another node is unknown here)."""
    alloc = _alloc_asked(services, req)
    client = services.client
    if client is None or alloc.node_id != client.node_id:
        raise not_found(f"Unknown allocation {alloc.id!r}")
    return client.alloc_checks(alloc.id)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/services", list_services)
    routes.add(("GET", "PUT", "POST", "DELETE"), "/v1/service/", missing_name)
    routes.add(("GET",), "/v1/service/{name}", get_service)
    routes.add(("DELETE",), "/v1/service/{name}/{service_id}", delete_service, DELETE_SERVICE)
    routes.add(("GET",), "/v1/job/{job_id}/services", job_services, READ_JOB)
    routes.add(("GET",), "/v1/allocation/{alloc_id}/services", alloc_services, READ_JOB)
    routes.add(("GET",), "/v1/allocation/{alloc_id}/checks", alloc_checks, READ_JOB)
