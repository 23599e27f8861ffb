"""``PUT /v1/node/:id/evaluate`` (Nomad's ``Node.Evaluate``): which jobs are evaluated for a
node, the evaluations made (always new, naming the node), the answer's shape and its ACL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.server.node_evaluate import jobs_to_evaluate
from nomad_client.structs.models import ACLPolicy, Allocation
from tests.unit.factories import (
    HttpAnswer,
    ServedAPI,
    acl_token,
    call_http_once,
    job,
    make_alloc,
    make_server,
    node,
    seed,
    serving,
)

pytestmark = pytest.mark.timeout(60)


def alloc_of(job_id: str, kind: str, **changes: Any) -> Allocation:
    return make_alloc(job_id=job_id, node_id="n1", job={"ID": job_id, "Type": kind},
                      **changes)


def test_the_jobs_a_node_evaluation_covers() -> None:
    n1 = node("n1")
    allocs = [
        alloc_of("web", "service"),
        alloc_of("web", "service"),  # each job once
        alloc_of("gone", "service", desired_status="stop", client_status="complete"),
        alloc_of("stopping", "service", desired_status="stop"),  # still running: evaluated
        alloc_of("done", "batch", client_status="complete"),
        alloc_of("work", "batch"),
        alloc_of("sweep", "sysbatch"),  # never by a node update
        alloc_of("agent", "system"),  # the system pass's
        make_alloc(job_id="elsewhere", node_id="n2", job={"ID": "elsewhere"}),
    ]
    jobs = [
        {"ID": "agent", "Type": "system", "Datacenters": ["dc*"]},
        {"ID": "other-dc", "Type": "system", "Datacenters": ["dc2"]},
        {"ID": "gpu-only", "Type": "system", "NodePool": "gpu"},
        {"ID": "everywhere", "Type": "system", "NodePool": "all", "Namespace": "ops"},
        {"ID": "stopped", "Type": "system", "Stop": True},
        {"ID": "web", "Type": "service"},
    ]
    assert jobs_to_evaluate(n1, allocs, jobs) == [
        ("default", "web"), ("default", "stopping"), ("default", "work"),
        ("default", "agent"), ("ops", "everywhere")]
    assert jobs_to_evaluate(n1, [], []) == []


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[ServedAPI]:
    server = make_server(keyring)
    await server.register_node(node("n1"))
    await server.register_job(job(count=1))  # "web", placed on n1
    await server.register_node(node("n2"))
    await server.register_job(job(count=1, ID="elsewhere", Datacenters=["dc9"]))
    async with serving(server) as served:
        yield served


async def evaluate(api: ServedAPI, node_id: str, token: str = "") -> HttpAnswer:
    return await call_http_once(api.url, "PUT", f"/v1/node/{node_id}/evaluate", token=token)


async def test_evaluating_a_node_makes_new_evaluations_that_name_it(api: ServedAPI) -> None:
    server = api.server
    n1 = server.node("n1")
    assert n1 is not None
    before = {e.id for e in server.job_evaluations("web")}

    answer = await evaluate(api, "n1")
    assert answer.status == 200, answer.body
    [eval_id] = answer.body["EvalIDs"]
    assert eval_id not in before
    evaluation = server.evaluation(eval_id)
    assert evaluation is not None
    assert (evaluation.job_id, evaluation.triggered_by) == ("web", "node-update")
    assert (evaluation.node_id, evaluation.node_modify_index) == ("n1", n1.modify_index)
    body = answer.body
    assert body["EvalCreateIndex"] == body["Index"] == answer.nomad_index
    assert body["EvalCreateIndex"] >= evaluation.create_index > 0
    assert body["NodeModifyIndex"] == n1.modify_index
    assert body["SchedulingEligibility"] == "eligible" and body["NumNodes"] == 2
    assert body["LeaderRPCAddr"] == "127.0.0.1:4647"

    # Nothing changed, but the user asked: a new evaluation again (as Nomad).
    again = await evaluate(api, "n1")
    assert again.body["EvalIDs"] and again.body["EvalIDs"] != [eval_id]


async def test_a_node_with_nothing_to_evaluate(api: ServedAPI) -> None:
    answer = await evaluate(api, "n2")
    assert answer.status == 200
    assert answer.body["EvalIDs"] == [] and answer.body["EvalCreateIndex"] == 0
    assert answer.body["Index"] > 0


async def test_unknown_node_is_404(api: ServedAPI) -> None:
    answer = await evaluate(api, "nope")
    assert (answer.status, answer.body) == (404, "node not found")


async def test_needs_node_write(acl_node_api: ServedAPI) -> None:
    server = acl_node_api.server
    token = acl_token("client")
    await seed(server, tokens=(token,))
    await server.acls.upsert_policy(ACLPolicy(name="p", rules='node { policy = "read" }'))
    assert (await evaluate(acl_node_api, "n1")).status == 403
    assert (await evaluate(acl_node_api, "n1", token.secret_id)).status == 403
    await server.acls.upsert_policy(ACLPolicy(name="p", rules='node { policy = "write" }'))
    assert (await evaluate(acl_node_api, "n1", token.secret_id)).status == 200
