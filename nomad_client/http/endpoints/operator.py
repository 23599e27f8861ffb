"""/v1/operator/keyring/*: the root keyring, listed and rotated, with Nomad's shapes.

``GET keys`` lists every root key held (``RootKeyMeta``); ``PUT|POST rotate`` makes a new
active key, and with ``full`` (its presence, as Nomad reads it) seals every sealed value of
the state again with it before answering. Keys are not deleted here: every key ever made
stays held, so anything it signed or sealed keeps opening.
"""

from __future__ import annotations

from typing import Any

from nomad_client.http.auth import Need
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services

KEYRING_READ = Need.operator_capability("keyring-read")
KEYRING_ROTATE = Need.operator_capability("keyring-rotate")
ANY_METHOD = ("GET", "PUT", "POST", "DELETE")


async def keyring_keys(services: Services, req: ApiRequest) -> Reply:
    server = services.own_server
    return Reply([key.meta() for key in server.keyring.keys()], server.store.index or 1)


async def keyring_rotate(services: Services, req: ApiRequest) -> dict[str, Any]:
    # ``algo`` names the data key algorithm; aes256-gcm is the only one, and Nomad silently
    # uses it for any other value too.
    if req.query.get("publish_time"):
        raise bad_request("publish_time is not supported: keys cannot be prepublished")
    full = "full" in req.query
    server = services.own_server
    key = await server.keyring.rotate(full=full)
    index = server.store.index
    if full:
        index = await server.store.reseal()
        await server.keyring.finish_rekeying()
    return {"Key": key.meta(), "Index": index}


async def invalid_method(services: Services, req: ApiRequest) -> None:
    raise HTTPError(405, "Invalid method")


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/operator/keyring/keys", keyring_keys, KEYRING_READ)
    routes.add(("PUT", "POST"), "/v1/operator/keyring/rotate", keyring_rotate, KEYRING_ROTATE)
    # As Nomad: anything else under the prefix is a method the keyring does not have.
    routes.add(ANY_METHOD, "/v1/operator/keyring/{rest*}", invalid_method)
