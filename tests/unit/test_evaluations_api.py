"""GET /v1/evaluations (Nomad's query: prefix, namespace, filter, paging, reverse, blocking)
and GET /v1/evaluation/:id/allocations, through their handlers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from nomad_client.http.context import ACLS_DISABLED, TCP_LISTENER
from nomad_client.http.endpoints import evaluations
from nomad_client.http.errors import HTTPError
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.structs.models import EVAL_COMPLETE, Evaluation
from tests.unit.factories import make_alloc, make_server, seed, settle


def request(target: str, **params: str) -> ApiRequest:
    return ApiRequest(make_mocked_request("GET", target), TCP_LISTENER, ACLS_DISABLED, params)


def services(server: Server) -> Services:
    return Services(server=server, client=None, agent_config={}, member={})


def evaluation(eval_id: str, job_id: str = "web", namespace: str = "default",
               **changes: Any) -> Evaluation:
    return Evaluation(id=eval_id, namespace=namespace, job_id=job_id, type="service",
                      triggered_by="job-register", **changes)


async def write_evals(server: Server, *evals: Evaluation) -> list[int]:
    """Each in a write of its own, so each has its own CreateIndex."""
    return [await server.store.write({"evals": [(e.id, e)]}) for e in evals]


async def listed(server: Server, target: str) -> tuple[list[str], str]:
    """The IDs a list request answers and its X-Nomad-NextToken ("" when absent)."""
    response = await evaluations.list_evaluations(services(server), request(target))
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    return ([e["ID"] for e in json.loads(response.body)],
            response.headers.get("X-Nomad-NextToken", ""))


async def refused(server: Server, target: str) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        await evaluations.list_evaluations(services(server), request(target))
    return info.value


@pytest.fixture
async def server(keyring: Keyring) -> Server:
    server = make_server(keyring)
    # Creation order differs from ID order: paging without a prefix follows creation.
    await write_evals(server, evaluation("bb01"), evaluation("aa02", "api"),
                      evaluation("cc03", status=EVAL_COMPLETE), evaluation("ab04"))
    return server


async def test_evaluations_are_listed_in_creation_order_and_paged(server: Server) -> None:
    assert await listed(server, "/v1/evaluations") == (["bb01", "aa02", "cc03", "ab04"], "")
    first, token = await listed(server, "/v1/evaluations?per_page=3")
    assert first == ["bb01", "aa02", "cc03"]
    created = server.evaluation("ab04")
    assert created is not None and token == f"{created.create_index}.ab04"
    assert await listed(server, f"/v1/evaluations?per_page=3&next_token={token}") == (
        ["ab04"], "")


async def test_reverse_lists_newest_first_and_pages_backwards(server: Server) -> None:
    newest, token = await listed(server, "/v1/evaluations?reverse=true&per_page=2")
    assert newest == ["ab04", "cc03"]
    assert await listed(server, f"/v1/evaluations?reverse=true&per_page=2&next_token={token}"
                        ) == (["aa02", "bb01"], "")


async def test_a_prefix_lists_in_id_order_and_its_token_is_an_id(server: Server) -> None:
    assert await listed(server, "/v1/evaluations?prefix=a&per_page=1") == (["aa02"], "ab04")
    assert await listed(server, "/v1/evaluations?prefix=a&next_token=ab04") == (["ab04"], "")


async def test_filters_old_and_new_but_not_both(server: Server) -> None:
    assert (await listed(server, "/v1/evaluations?job=api"))[0] == ["aa02"]
    assert (await listed(server, "/v1/evaluations?status=complete"))[0] == ["cc03"]
    by_expression = '/v1/evaluations?filter=JobID == "web" and Status != "complete"'
    assert (await listed(server, by_expression))[0] == ["bb01", "ab04"]
    both = await refused(server, '/v1/evaluations?job=web&filter=Status == "pending"')
    assert both.status == 400 and "cannot be used with other filter" in both.message


async def test_a_namespace_lists_its_own_and_star_lists_all(server: Server) -> None:
    await write_evals(server, evaluation("dd05", namespace="prod"))
    assert (await listed(server, "/v1/evaluations"))[0] == ["bb01", "aa02", "cc03", "ab04"]
    assert (await listed(server, "/v1/evaluations?namespace=prod"))[0] == ["dd05"]
    assert (await listed(server, "/v1/evaluations?namespace=*"))[0][-1] == "dd05"


@pytest.mark.parametrize("query", ["per_page=many", "next_token=not-a-token"])
async def test_bad_paging_is_a_400(server: Server, query: str) -> None:
    assert (await refused(server, f"/v1/evaluations?{query}")).status == 400


async def test_a_blocking_list_answers_after_the_next_eval(server: Server) -> None:
    index = server.store.index
    waiting = asyncio.create_task(evaluations.list_evaluations(
        services(server), request(f"/v1/evaluations?index={index}&wait=60s")))
    await settle()
    assert not waiting.done()
    await write_evals(server, evaluation("ee06"))
    response = await asyncio.wait_for(waiting, 10)
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    assert json.loads(response.body)[-1]["ID"] == "ee06"
    assert int(response.headers["X-Nomad-Index"]) > index


async def test_an_evaluations_allocations_are_its_placements(server: Server) -> None:
    placed = make_alloc(eval_id="bb01", job_id="web")
    await seed(server, allocs=(placed, make_alloc(eval_id="cc03")))
    reply = await evaluations.evaluation_allocations(
        services(server), request("/v1/evaluation/bb01/allocations", eval_id="bb01"))
    assert [stub["ID"] for stub in reply.body] == [placed.id]
    assert "Job" not in reply.body[0] and reply.body[0]["EvalID"] == "bb01"
    none = await evaluations.evaluation_allocations(
        services(server), request("/v1/evaluation/zz/allocations", eval_id="zz"))
    assert none.body == []


async def test_an_evaluations_allocation_stubs_are_nomads_default_stubs(server: Server
                                                                        ) -> None:
    placed = make_alloc(eval_id="bb01", job_id="web")
    await seed(server, allocs=(placed,))
    reply = await evaluations.evaluation_allocations(
        services(server), request("/v1/evaluation/bb01/allocations", eval_id="bb01"))
    (stub,) = reply.body
    assert "AllocatedResources" not in stub and "TaskStates" in stub
