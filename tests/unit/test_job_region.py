"""A job submitted (registered or planned) is in the agent's region: without a region of its
own it takes the agent's, as Nomad's, and one for another region is refused, as a Nomad
agent with no path to that region refuses it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from tests.unit.factories import call_http, node, serve_api
from tests.unit.launching import batch_job

NO_PATH = (400, "No path to region")


@pytest.fixture
async def eu(keyring: Keyring) -> AsyncIterator[tuple[Server, str, aiohttp.ClientSession]]:
    server = Server(StateStore(), keyring, region="eu", acl_enabled=False)
    await server.register_node(node(datacenter="dc1"))
    api = await serve_api(server)
    try:
        async with aiohttp.ClientSession() as session:
            yield server, api.url, session
    finally:
        await api.close()
        await server.close()


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/job/web/plan"])
async def test_a_job_without_a_region_is_in_the_agents(
        eu: tuple[Server, str, aiohttp.ClientSession], path: str) -> None:
    server, url, session = eu
    answer = await call_http(session, url, "PUT", path, {"Job": batch_job("web")})
    assert answer.status == 200, answer
    if path == "/v1/jobs":
        stored = server.job("web")
        assert stored is not None and stored["Region"] == "eu"


@pytest.mark.parametrize("where", ["job", "body", "query"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/job/web/plan"])
async def test_a_job_for_another_region_is_refused(
        eu: tuple[Server, str, aiohttp.ClientSession], path: str, where: str) -> None:
    server, url, session = eu
    job = batch_job("web", **({"Region": "global"} if where == "job" else {}))
    body = {"Job": job, **({"Region": "global"} if where == "body" else {})}
    query = "?region=global" if where == "query" else ""
    answer = await call_http(session, url, "PUT", path + query, body)
    assert (answer.status, answer.body) == NO_PATH
    assert server.job("web") is None
