"""HTTP endpoints, one module per resource. ``register_all`` puts them on the router."""

from __future__ import annotations

from nomad_client.http.endpoints import (
    acl,
    agent,
    allocs,
    client,
    events,
    identity,
    jobs,
    namespaces,
    nodes,
    operator,
    parent_jobs,
    scaling,
    variables,
)
from nomad_client.http.endpoints import services as service_discovery
from nomad_client.http.router import Router
from nomad_client.http.services import Services


def register_all(router: Router, services: Services) -> None:
    for module in (agent, jobs, allocs, nodes, client, identity, acl, variables,
                   operator, namespaces, events, service_discovery, scaling, parent_jobs):
        module.register(router, services)
