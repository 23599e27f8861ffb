"""The web UI: ``/ui/`` and everything under it on every listener, and on the TCP listener
``/`` redirecting there, as Nomad's agent does.

The page itself is public (``Need.none``, as Nomad's): what it shows comes from API calls
that carry the user's token. Any ``/ui/<path>`` that is not one of the UI's own files is the
page (the page routes on the URL's fragment), so a path is only ever looked up in the
asset table, never joined to a directory.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import not_found
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.ui import ASSETS, INDEX, SECURITY_HEADERS, cached_asset, read_asset

GET = ("GET", "HEAD")
UI_ROOT = "/ui/"


async def _asset_response(name: str) -> web.Response:
    asset = cached_asset(name)
    if asset is None:
        asset = await asyncio.to_thread(read_asset, name)  # once per file: a disk read
        if asset is None:
            raise not_found("UI file not found")
    body, content_type = asset
    return web.Response(body=body, headers={**SECURITY_HEADERS, "Content-Type": content_type})


async def index(services: Services, req: ApiRequest) -> web.Response:
    return await _asset_response(INDEX)


async def asset(services: Services, req: ApiRequest) -> web.Response:
    # Not a known file (a deep link, or any odd spelling of a path): the page.
    name = req.params["rest"]
    return await _asset_response(name if name in ASSETS else INDEX)


async def to_ui(services: Services, req: ApiRequest) -> web.Response:
    return web.Response(status=307, headers={**SECURITY_HEADERS, "Location": UI_ROOT})


async def root(services: Services, req: ApiRequest) -> web.Response:
    if req.ctx.task_api:
        # A task's socket serves the UI under /ui/ only: its root is no page of ours.
        raise not_found("Not Found")
    return await to_ui(services, req)


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(GET, "/", root)
    routes.add(GET, "/ui", to_ui)
    routes.add(GET, UI_ROOT, index)
    routes.add(GET, "/ui/{rest*}", asset)
