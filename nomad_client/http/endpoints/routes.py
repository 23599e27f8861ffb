"""How an endpoint module puts its handlers on the router.

A handler is a plain module-level ``async def handler(services, req)``, so a test can call
it alone with any ``Services`` and request. ``Routes.add`` binds the agent's ``Services`` to
it with ``functools.partial``: no closure per route, and nothing on the request path but one
C-level call.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs

from nomad_client.http.auth import Need
from nomad_client.http.router import ApiRequest, Router
from nomad_client.http.services import Services

Endpoint = Callable[[Services, ApiRequest], Awaitable[Any]]


@attrs.frozen
class Routes:
    router: Router
    services: Services

    def add(self, methods: Iterable[str], path: str, handler: Endpoint,
            need: Need = Need.none) -> None:
        self.router.add(methods, path, functools.partial(handler, self.services), need)
