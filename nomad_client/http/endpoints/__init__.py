"""HTTP endpoints, one module per resource. ``register_all`` puts them on the router.

Modules are server modules (only a server can answer them), local ones (this agent
answers: its client, its own state, its view of the cluster), or mixed (``_SERVER_PATHS``).
A client-only agent registers the server routes as forwarding ones (``ForwardedRoutes``).
"""

from __future__ import annotations

from types import ModuleType

from nomad_client.http.endpoints import (
    acl,
    agent,
    alloc_exec,
    allocs,
    client,
    cluster,
    evaluations,
    events,
    fs_stream,
    gc,
    identity,
    job_history,
    jobs,
    metrics,
    namespaces,
    nodes,
    operator,
    parent_jobs,
    plan,
    scaling,
    ui,
    variables,
)
from nomad_client.http.endpoints import services as service_discovery
from nomad_client.http.endpoints.routes import ForwardedRoutes, RouteTable
from nomad_client.http.router import Router
from nomad_client.http.services import Services

# In registration order: dynamic routes are tried in it.
MODULES: tuple[ModuleType, ...] = (
    agent, jobs, job_history, evaluations, allocs, nodes, client, identity, acl, variables,
    operator, namespaces, events, service_discovery, scaling, parent_jobs, cluster, plan,
    fs_stream, gc, metrics, alloc_exec, ui)
LOCAL_MODULES: frozenset[ModuleType] = frozenset({
    agent, client, fs_stream, metrics, alloc_exec, ui})
# A module with local routes too: the paths only a server answers.
_SERVER_PATHS: dict[ModuleType, frozenset[str]] = {
    gc: frozenset({"/v1/system/gc"}),
    # Who the servers are and who leads is the servers' answer; the servers this agent
    # knows (agent/servers) and its region are its own.
    cluster: frozenset({"/v1/agent/members", "/v1/status/peers", "/v1/status/leader"}),
}


def register_all(router: Router, services: Services) -> None:
    forward = services.forward
    if services.server is None and forward is None:
        raise ValueError("an agent without a server needs a forwarder to the servers")
    for module in MODULES:
        table: RouteTable = router
        if services.server is None and module not in LOCAL_MODULES:
            assert forward is not None
            table = ForwardedRoutes(router, forward.forward, _SERVER_PATHS.get(module))
        module.register(table, services)
