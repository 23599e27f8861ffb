"""GET /v1/job/:id/summary: Nomad's JobSummary, counted from the job's allocations."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from nomad_client.http.context import ACLS_DISABLED, TCP_LISTENER
from nomad_client.http.endpoints import job_history
from nomad_client.http.errors import HTTPError
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import JOBS, job_key
from nomad_client.structs.models import Evaluation
from tests.unit.factories import job, make_alloc, make_server, seed

ZERO = {"Queued": 0, "Complete": 0, "Failed": 0, "Running": 0, "Starting": 0, "Lost": 0,
        "Unknown": 0}


def services(server: Server) -> Services:
    return Services(server=server, client=None, agent_config={}, member={})


async def summary(server: Server, job_id: str, query: str = "") -> dict[str, Any]:
    req = ApiRequest(make_mocked_request("GET", f"/v1/job/{job_id}/summary{query}"),
                     TCP_LISTENER, ACLS_DISABLED, {"job_id": job_id})
    reply = await job_history.job_summary(services(server), req)
    assert reply.index is not None and reply.index > 0
    body: dict[str, Any] = reply.body
    return body


async def write_job(server: Server, spec: dict[str, Any], namespace: str = "default") -> None:
    await server.store.write({JOBS: [(job_key(namespace, spec["ID"]),
                                      {**spec, "Namespace": namespace})]})


async def test_each_allocation_counts_once_under_its_client_status(keyring: Keyring) -> None:
    server = make_server(keyring)
    await write_job(server, job(count=5))
    web = {"job_id": "web", "task_group": "g"}
    await seed(server, allocs=tuple(make_alloc(client_status=status, **web) for status in (
        "running", "running", "pending", "failed", "complete", "lost")))
    await server.store.write({"evals": [("e1", Evaluation(
        id="e1", namespace="default", job_id="web", type="service",
        triggered_by="job-register", queued_allocations={"g": 2}))]})

    body = await summary(server, "web")
    assert body["JobID"] == "web" and body["Namespace"] == "default"
    assert body["Summary"] == {"g": {**ZERO, "Queued": 2, "Running": 2, "Starting": 1,
                                     "Failed": 1, "Complete": 1, "Lost": 1}}
    assert body["Children"] == {"Pending": 0, "Running": 0, "Dead": 0}
    created = server.job("web")
    assert created is not None and body["CreateIndex"] == created["CreateIndex"]
    assert body["ModifyIndex"] >= created["ModifyIndex"]


async def test_a_group_without_allocations_shows_zeros(keyring: Keyring) -> None:
    server = make_server(keyring)
    await write_job(server, job())
    await seed(server, allocs=(make_alloc(job_id="web", namespace="prod"),))  # not this job
    assert (await summary(server, "web"))["Summary"] == {"g": ZERO}


async def test_a_parent_counts_its_children_by_status(keyring: Keyring) -> None:
    server = make_server(keyring)
    await write_job(server, job(ID="batch", Type="batch",
                                Periodic={"Enabled": False, "Spec": "@daily"}))
    for n, child_status in enumerate(("running", "pending", "complete")):
        child = job(ID=f"batch/periodic-{n}", Type="batch", ParentID="batch")
        await write_job(server, child)
        await seed(server, allocs=(make_alloc(job_id=child["ID"], client_status=child_status),))
    assert (await summary(server, "batch"))["Children"] == {"Pending": 1, "Running": 1,
                                                            "Dead": 1}


async def test_jobs_are_found_in_the_namespace_asked_for(keyring: Keyring) -> None:
    server = make_server(keyring)
    await write_job(server, job(), namespace="prod")
    with pytest.raises(HTTPError) as missing:
        await summary(server, "web")
    assert (missing.value.status, missing.value.message) == (404, "job not found")
    assert (await summary(server, "web", "?namespace=prod"))["Namespace"] == "prod"
