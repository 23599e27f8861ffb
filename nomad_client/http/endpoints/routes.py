"""How an endpoint module puts its handlers on the router.

A handler is a plain module-level ``async def handler(services, req)``, so a test can call
it alone with any ``Services`` and request. ``Routes.add`` binds the agent's ``Services`` to
it with ``functools.partial``: no closure per route, and nothing on the request path but one
C-level call.

On a client-only agent a server module registers into ``ForwardedRoutes`` instead of the
router: the same paths and needs (so the local router still authenticates and authorizes,
and answers 404/405 as the server would), each answered by forwarding to a server.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attrs

from nomad_client.http.auth import Need
from nomad_client.http.router import ApiRequest, Handler
from nomad_client.http.services import Services

Endpoint = Callable[[Services, ApiRequest], Awaitable[Any]]


class RouteTable(Protocol):
    """Where routes go: the ``Router``, or a ``ForwardedRoutes`` in front of it."""

    def add(self, methods: Iterable[str], path: str, handler: Handler,
            need: Need = Need.none) -> None: ...


@attrs.frozen
class ForwardedRoutes:
    """Registers every route (or, with ``only``, those paths) on ``table`` with ``forward``
    as its handler; any other path keeps its own handler (a module with local routes too)."""

    table: RouteTable
    forward: Handler
    only: frozenset[str] | None = None

    def add(self, methods: Iterable[str], path: str, handler: Handler,
            need: Need = Need.none) -> None:
        forwarded = self.only is None or path in self.only
        self.table.add(methods, path, self.forward if forwarded else handler, need)


@attrs.frozen
class Routes:
    router: RouteTable
    services: Services

    def add(self, methods: Iterable[str], path: str, handler: Endpoint,
            need: Need = Need.none) -> None:
        self.router.add(methods, path, functools.partial(handler, self.services), need)
