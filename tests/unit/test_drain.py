"""Node eligibility and drains (``server.drain``) and their routes: an ineligible or
draining node gets no new placements, a drain migrates allocations to another node and
completes when nothing is left on its node, with one node it completes at its deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import attrs
import pytest

from nomad_client.server.drain import DrainSpec
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.structs.models import ACLPolicy, Allocation, AllocUpdate
from tests.unit.factories import (
    HttpAnswer,
    ServedAPI,
    acl_token,
    call_http,
    call_http_once,
    job,
    make_server,
    node,
    seed,
    settle,
    wait_until,
)
from tests.unit.test_cli import Nomad, cli

pytestmark = pytest.mark.timeout(60)
SECOND_NS = 1_000_000_000


@pytest.fixture
async def server(keyring: Keyring) -> AsyncIterator[Server]:
    srv = make_server(keyring)
    yield srv
    await srv.close()


def live(server: Server) -> list[Allocation]:
    return [a for a in server.allocations() if a.desired_status == "run"]


async def report(server: Server, allocs: list[Allocation], status: str) -> None:
    await server.update_allocs_from_client([AllocUpdate(a.id, status, "", {}) for a in allocs])


async def test_an_ineligible_node_gets_no_placements_until_eligible(server: Server) -> None:
    await server.register_node(node("n1"))
    await server.drainer.set_eligibility("n1", "ineligible")
    await server.register_job(job(count=1))
    assert live(server) == []
    await server.drainer.set_eligibility("n1", "eligible")
    assert [a.node_id for a in live(server)] == ["n1"]


async def test_a_client_reregistering_keeps_the_servers_eligibility(server: Server) -> None:
    await server.register_node(node("n1"))
    await server.drainer.set_eligibility("n1", "ineligible")
    await server.register_node(node("n1", meta={"rack": "r2"}))
    registered = server.node("n1")
    assert registered is not None
    assert registered.scheduling_eligibility == "ineligible" and registered.meta["rack"] == "r2"


async def test_a_drain_migrates_to_another_node_and_completes(server: Server) -> None:
    await server.register_node(node("n1"))
    await server.register_job(job(count=1))
    [first] = live(server)
    await server.register_node(node("n2"))
    await server.drainer.update_drain(first.node_id, DrainSpec(deadline_ns=3600 * SECOND_NS),
                                      mark_eligible=False)
    drained = server.node(first.node_id)
    assert drained is not None and drained.drain
    assert drained.scheduling_eligibility == "ineligible"
    assert drained.drain_strategy is not None
    assert drained.drain_strategy["DrainSpec"] == {"Deadline": 3600 * SECOND_NS,
                                                   "IgnoreSystemJobs": False}
    # The allocation is stopped and replaced on the other node...
    await wait_until(lambda: [a.node_id for a in live(server)] == ["n2"], "the migration")
    old = server.allocation(first.id)
    assert old is not None and old.desired_description == "alloc is being migrated"
    # ...and the drain waits for the old one to stop.
    assert server.drainer.draining("n1")
    await report(server, [old], "complete")
    await wait_until(lambda: not server.drainer.draining("n1"), "the drain to complete")
    done = server.node("n1")
    assert done is not None and done.drain_strategy is None and not done.drain
    assert done.last_drain is not None and done.last_drain["Status"] == "complete"
    assert done.scheduling_eligibility == "ineligible"


async def test_with_one_node_the_drain_completes_at_its_deadline(server: Server) -> None:
    await server.register_node(node("n1"))
    await server.register_job(job(count=1))
    [alloc] = live(server)
    await server.drainer.update_drain("n1", DrainSpec(deadline_ns=SECOND_NS // 5),
                                      mark_eligible=False)
    assert server.drainer.draining("n1")
    await wait_until(lambda: not server.drainer.draining("n1"), "the deadline")
    assert [a.id for a in live(server)] == [alloc.id]  # nowhere to go: it stays
    done = server.node("n1")
    assert done is not None and done.drain_strategy is None
    assert done.last_drain is not None and done.last_drain["Status"] == "complete"


async def test_an_allocation_no_other_node_could_run_stays_until_the_deadline(
        server: Server) -> None:
    await server.register_node(node("n1"))
    await server.register_job(job(count=1))
    [alloc] = live(server)
    # n2 is ready and eligible but has no raw_exec: the job cannot move there.
    await server.register_node(node("n2", drivers={}))
    await server.drainer.update_drain("n1", DrainSpec(deadline_ns=SECOND_NS // 5),
                                      mark_eligible=False)
    await wait_until(lambda: not server.drainer.draining("n1"), "the deadline")
    assert [a.id for a in live(server)] == [alloc.id]  # never stopped for nothing
    done = server.node("n1")
    assert done is not None and done.last_drain is not None
    assert done.last_drain["Status"] == "complete"


async def test_a_batch_allocation_may_finish_its_work_until_the_deadline(
        server: Server) -> None:
    await server.register_node(node("n1"))
    await server.register_job(job(count=1, ID="work", Type="batch"))
    [alloc] = live(server)
    await server.register_node(node("n2"))
    await server.drainer.update_drain("n1", DrainSpec(deadline_ns=3600 * SECOND_NS),
                                      mark_eligible=False)
    await settle()
    assert [a.id for a in live(server)] == [alloc.id]  # not moved: its work is not redone
    assert server.drainer.draining("n1")
    await report(server, [alloc], "complete")
    await wait_until(lambda: not server.drainer.draining("n1"), "the drain to complete")
    assert [a.node_id for a in live(server)] == ["n1"]  # done work is not placed again
    # Forced (the deadline is now), a running batch allocation moves.
    await server.drainer.set_eligibility("n1", "eligible")
    await server.register_job(job(count=1, ID="more", Type="batch"))
    [more] = [a for a in live(server) if a.job_id == "more"]
    await server.drainer.update_drain(more.node_id, DrainSpec(deadline_ns=-1),
                                      mark_eligible=False)
    await wait_until(lambda: any(a.job_id == "more" and a.node_id != more.node_id
                                 for a in live(server)), "the forced migration")


async def test_a_drain_updated_mid_migration_still_places_the_replacements(
        server: Server) -> None:
    await server.register_node(node("n1"))
    await server.register_job(job(count=1))
    await server.register_node(node("n2"))
    # Hold the migration between stopping the allocation and evaluating its job.
    gate, entered = asyncio.Event(), asyncio.Event()
    evaluate = server.drainer._evaluate

    async def gated(job_id: str, triggered_by: str, namespace: str) -> tuple[str, int]:
        entered.set()
        await gate.wait()
        return await evaluate(job_id, triggered_by, namespace)

    server.drainer._evaluate = gated
    await server.drainer.update_drain("n1", DrainSpec(deadline_ns=3600 * SECOND_NS),
                                      mark_eligible=False)
    await wait_until(entered.is_set, "the migration's evaluation")
    await server.drainer.update_drain("n1", DrainSpec(deadline_ns=7200 * SECOND_NS),
                                      mark_eligible=False)
    gate.set()
    await wait_until(lambda: [a.node_id for a in live(server)] == ["n2"], "the replacement")


async def test_a_node_with_nothing_on_it_drains_at_once(server: Server) -> None:
    await server.register_node(node("n1"))
    await server.drainer.update_drain("n1", DrainSpec(), mark_eligible=False)
    await wait_until(lambda: not server.drainer.draining("n1"), "the drain to complete")
    done = server.node("n1")
    assert done is not None and done.drain_strategy is None


async def test_cancelling_a_drain_and_marking_eligible(server: Server) -> None:
    await server.register_node(node("n1"))
    await server.register_job(job(count=1))
    await server.drainer.update_drain("n1", DrainSpec(deadline_ns=0), mark_eligible=False)
    with pytest.raises(Exception, match="active drain strategy"):
        await server.drainer.set_eligibility("n1", "eligible")
    await server.drainer.update_drain("n1", None, mark_eligible=True)
    await wait_until(lambda: not server.drainer.draining("n1"), "the watcher to stop")
    done = server.node("n1")
    assert done is not None and done.scheduling_eligibility == "eligible"
    assert done.drain_strategy is None and not done.drain
    assert done.last_drain is not None and done.last_drain["Status"] == "canceled"


# ---- the routes ----------------------------------------------------------------------
async def post(api: ServedAPI, path: str, body: object, token: str) -> HttpAnswer:
    return await call_http_once(api.url, "POST", path, body, token=token)


async def token_with(api: ServedAPI, policy: str, rules: str) -> str:
    await api.server.acls.upsert_policy(ACLPolicy(name=policy, rules=rules))
    token = attrs.evolve(acl_token("client"), policies=(policy,))
    await seed(api.server, tokens=(token,))
    return token.secret_id


async def test_the_routes_shapes_refusals_and_acl(acl_node_api: ServedAPI) -> None:
    reader = await token_with(acl_node_api, "reader", 'node { policy = "read" }')
    for path in ("/v1/node/n1/eligibility", "/v1/node/n1/drain"):
        assert (await post(acl_node_api, path, {"Eligibility": "ineligible"}, reader)).status == 403
    token = await token_with(acl_node_api, "writer", 'node { policy = "write" }')

    answer = await post(acl_node_api, "/v1/node/n1/eligibility",
                        {"NodeID": "n1", "Eligibility": "ineligible"}, token)
    assert answer.status == 200 and answer.body["NodeModifyIndex"] > 0
    assert set(answer.body) >= {"EvalIDs", "EvalCreateIndex", "NodeModifyIndex", "Index"}
    n1 = acl_node_api.server.node("n1")
    assert n1 is not None and n1.scheduling_eligibility == "ineligible"

    bad = [({"Eligibility": "maybe"}, "invalid scheduling eligibility"),
           ({"Eligibility": 3}, "Eligibility must be a string"),
           ({"NodeID": "n2", "Eligibility": "eligible"}, "does not match")]
    for body, reason in bad:
        refused = await post(acl_node_api, "/v1/node/n1/eligibility", body, token)
        assert refused.status == 400 and reason in refused.body, body
    assert (await post(acl_node_api, "/v1/node/n9/eligibility", {"Eligibility": "eligible"},
                       token)).status == 404

    for body in (None, [], {"DrainSpec": {"Deadline": "1h"}}, {"DrainSpec": []},
                 {"DrainSpec": {"Deadline": 1}, "MarkEligible": "yes"}):
        assert (await post(acl_node_api, "/v1/node/n1/drain", body, token)).status == 400, body
    started = await post(acl_node_api, "/v1/node/n1/drain",
                         {"NodeID": "n1", "DrainSpec": {"Deadline": 3600 * SECOND_NS}}, token)
    assert started.status == 200
    async with aiohttp.ClientSession() as session:
        shown = await call_http(session, acl_node_api.url, "GET", "/v1/node/n1", token=token)
    # Nothing runs on n1, so the drain may already be over; it was recorded either way.
    assert "DrainStrategy" in shown.body and shown.body["LastDrain"]["Status"] in (
        "draining", "complete")
    await wait_until(lambda: not acl_node_api.server.drainer.draining("n1"),
                     "the empty node's drain")
    cancelled = await post(acl_node_api, "/v1/node/n1/drain",
                           {"DrainSpec": None, "MarkEligible": True}, token)
    assert cancelled.status == 200
    n1 = acl_node_api.server.node("n1")
    assert n1 is not None and n1.scheduling_eligibility == "eligible"


async def test_a_deadline_beyond_gos_duration_is_refused_and_changes_nothing(
        acl_node_api: ServedAPI) -> None:
    token = await token_with(acl_node_api, "writer", 'node { policy = "write" }')
    for deadline in (2**63, -(2**63) - 1, 10**30):
        refused = await post(acl_node_api, "/v1/node/n1/drain",
                             {"DrainSpec": {"Deadline": deadline}}, token)
        assert refused.status == 400 and "out of range" in refused.body, deadline
    n1 = acl_node_api.server.node("n1")
    assert n1 is not None and n1.drain_strategy is None and not n1.drain
    assert not acl_node_api.server.drainer.draining("n1")


# ---- the CLI ---------------------------------------------------------------------------
async def test_node_eligibility_and_drain_commands(capsys: pytest.CaptureFixture[str],
                                                   nomad: Nomad) -> None:
    node_id = nomad.client.node_id
    code, out, err = await cli(capsys, "node", "eligibility", "-disable", node_id[:8])
    assert code == 0, err
    assert out == f'Node "{node_id}" scheduling eligibility set: ineligible for scheduling\n'
    shown = nomad.server.node(node_id)
    assert shown is not None and shown.scheduling_eligibility == "ineligible"
    code, out, err = await cli(capsys, "node", "eligibility", "-enable", "-self")
    assert code == 0 and "eligible for scheduling" in out, err

    code, _, err = await cli(capsys, "node", "eligibility", node_id)
    assert code == 1 and "'-enable' or '-disable'" in err
    code, _, err = await cli(capsys, "node", "drain", "-enable", "-deadline", "soon", node_id)
    assert code == 1 and "Failed to parse deadline" in err

    # Nothing runs on the node: the drain is over at once, and the command waits for it.
    code, out, err = await cli(capsys, "node", "drain", "-enable", "-yes", node_id)
    assert code == 0, err
    assert out.startswith(f'Node "{node_id}" drain strategy set\n')
    assert f"Drain complete for node {node_id}" in out
    drained = nomad.server.node(node_id)
    assert drained is not None and drained.scheduling_eligibility == "ineligible"
    code, out, err = await cli(capsys, "node", "drain", "-disable", "-yes", node_id)
    assert code == 0 and out == f'Node "{node_id}" drain strategy unset\n', err
    back = nomad.server.node(node_id)
    assert back is not None and back.scheduling_eligibility == "eligible"


async def test_a_drain_resumes_when_the_server_starts_again(keyring: Keyring) -> None:
    first = make_server(keyring)
    await first.register_node(node("n1"))
    await first.register_job(job(count=1))
    await first.drainer.update_drain("n1", DrainSpec(deadline_ns=0), mark_eligible=False)
    await first.close()  # the watcher stops with it; the drain is still recorded
    stopped = first.node("n1")
    assert stopped is not None and stopped.drain_strategy is not None

    again = Server(first.store, keyring, region="global", acl_enabled=False)
    try:
        assert again.drainer.draining("n1")
        [alloc] = live(again)
        await report(again, [alloc], "complete")
        await wait_until(lambda: not again.drainer.draining("n1"), "the resumed drain")
        done = again.node("n1")
        assert done is not None and done.last_drain is not None
        assert done.last_drain["Status"] == "complete"
    finally:
        await again.close()
