"""HTTP endpoints, one module per resource. ``register_all`` puts them on the router."""

from __future__ import annotations

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
    variables,
)
from nomad_client.http.endpoints import services as service_discovery
from nomad_client.http.router import Router
from nomad_client.http.services import Services


def register_all(router: Router, services: Services) -> None:
    for module in (agent, jobs, job_history, evaluations, allocs, nodes, client, identity, acl,
                   variables, operator, namespaces, events, service_discovery, scaling, parent_jobs,
                   cluster, plan, fs_stream, gc,
                   metrics, alloc_exec):
        module.register(router, services)
