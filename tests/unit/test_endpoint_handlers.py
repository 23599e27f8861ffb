"""Endpoint handlers called alone: a ``Services`` and a small request, no router, no socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import make_mocked_request

from nomad_client.http.context import ACLS_DISABLED, TCP_LISTENER
from nomad_client.http.endpoints import agent, allocs, client, jobs, nodes
from nomad_client.http.errors import HTTPError
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import LocalClient, Services
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Resource, Server
from nomad_client.server.state import JOBS, job_key
from tests.unit.factories import job, make_alloc, make_server, seed, settle


@attrs.define
class HealthClient:
    """A local client that only reports its health."""

    ok: bool
    node_id: str = "n1"

    def metadata(self) -> dict[str, Any]:
        return {}

    async def apply_metadata(self, meta: dict[str, str | None]) -> dict[str, Any]:
        return {}

    def alloc_dir_for(self, alloc_id: str) -> Any:
        return None

    def healthy(self) -> tuple[bool, str]:
        return (True, "ok") if self.ok else (False, "no known servers")


def request(target: str, **params: str) -> ApiRequest:
    return ApiRequest(make_mocked_request("GET", target), TCP_LISTENER, ACLS_DISABLED, params)


def services(server: Server, local: LocalClient | None = None) -> Services:
    return Services(server=server, client=local, agent_config={},
                    member={"Addr": "10.0.0.1", "Port": 4648})


async def refusal(handler: Any, svc: Services, req: ApiRequest) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        await handler(svc, req)
    return info.value


async def test_health_reports_the_parts_this_agent_runs(keyring: Keyring) -> None:
    server = make_server(keyring)
    alone = await agent.health(services(server), request("/v1/agent/health"))
    assert alone.status == 200
    assert json.loads(alone.body) == {"server": {"message": "ok", "ok": True}}

    sick = services(server, HealthClient(ok=False))
    both = await agent.health(sick, request("/v1/agent/health"))
    assert both.status == 500
    assert json.loads(both.body) == {"client": {"message": "no known servers", "ok": False},
                                     "server": {"message": "ok", "ok": True}}
    again = await agent.health(sick, request("/v1/agent/health"))
    assert again is not both and again.body == both.body  # a response is sent only once

    server_only = await agent.health(sick, request("/v1/agent/health?type=server"))
    assert server_only.status == 200 and set(json.loads(server_only.body)) == {"server"}
    well = await agent.health(services(server, HealthClient(ok=True)),
                              request("/v1/agent/health?type=client"))
    assert well.status == 200
    assert json.loads(well.body) == {"client": {"message": "ok", "ok": True}}


async def test_get_job_reads_the_job_through_the_server(keyring: Keyring) -> None:
    server = make_server(keyring)
    svc = services(server)
    missing = await refusal(jobs.get_job, svc, request("/v1/job/web", job_id="web"))
    assert (missing.status, missing.message) == (404, "job not found")

    index = await server.store.write({JOBS: [(job_key("default", "web"), job())]})
    reply = await jobs.get_job(svc, request("/v1/job/web", job_id="web"))
    assert reply.body["ID"] == "web" and reply.body["Status"] == "pending"
    assert reply.index == index == server.index_of(Resource.JOBS)


async def test_a_blocking_get_job_answers_after_the_next_write(keyring: Keyring) -> None:
    server = make_server(keyring)
    first = await server.store.write({JOBS: [(job_key("default", "web"), job())]})
    waiting = asyncio.create_task(jobs.get_job(
        services(server), request(f"/v1/job/web?index={first}&wait=60s", job_id="web")))
    await settle()
    assert not waiting.done()  # blocked on the index it already has

    second = await server.store.write({JOBS: [(job_key("default", "web"), job(count=3))]})
    reply = await asyncio.wait_for(waiting, 10)
    assert reply.index == second > first
    assert reply.body["TaskGroups"][0]["Count"] == 3


async def test_allocations_are_read_by_id_and_by_node(keyring: Keyring) -> None:
    server = make_server(keyring)
    svc = services(server)
    here, there = make_alloc(node_id="n1"), make_alloc(node_id="n2")
    await seed(server, allocs=(here, there))

    reply = await allocs.get_alloc(svc, request(f"/v1/allocation/{here.id}", alloc_id=here.id))
    assert reply.body["ID"] == here.id and reply.body["NodeID"] == "n1"
    missing = await refusal(allocs.get_alloc, svc, request("/v1/allocation/x", alloc_id="x"))
    assert missing.status == 404

    on_n1 = await nodes.node_allocs(svc, request("/v1/node/n1/allocations", node_id="n1"))
    assert [stub["ID"] for stub in on_n1.body] == [here.id]
    assert on_n1.index == server.index_of(Resource.ALLOCATIONS)


async def test_client_endpoints_need_a_local_client(keyring: Keyring) -> None:
    server = make_server(keyring)
    err = await refusal(client.read_metadata, services(server), request("/v1/client/metadata"))
    assert (err.status, err.message) == (400, "No local Node and node_id not provided")

    elsewhere = request("/v1/client/metadata?node_id=other")
    err = await refusal(client.read_metadata, services(server, HealthClient(ok=True)), elsewhere)
    assert (err.status, err.message) == (404, "No path to node other")
