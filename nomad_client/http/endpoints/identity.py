"""Workload identity discovery: JWKS and OIDC configuration (no /v1 prefix, as Nomad).

The issuer comes from the keyring (the agent's ``server.oidc_issuer``, else its advertised
HTTP address), never from the request: a ``Host`` header is the caller's to choose.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import not_found
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services


async def jwks(services: Services, req: ApiRequest) -> web.Response:
    return web.json_response(services.own_server.keyring.jwks(),
                             headers={"Cache-Control": "max-age=900"})


async def openid_configuration(services: Services, req: ApiRequest) -> Any:
    issuer = services.own_server.keyring.issuer
    if not issuer:
        raise not_found("OIDC Discovery endpoint disabled")
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer.rstrip('/')}/.well-known/jwks.json",
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
    }


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/.well-known/jwks.json", jwks)
    routes.add(("GET",), "/.well-known/openid-configuration", openid_configuration)
