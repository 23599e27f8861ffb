"""The cluster's routes (members, servers, regions, peers, leader) and the node pools,
through the real router on a real socket: Nomad's shapes and who may read them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.structs.models import ACLPolicy, AllocUpdate
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
    serving,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[ServedAPI]:
    server = make_server(keyring)
    await server.register_node(node("n1"))
    await server.register_node(node("n2", node_pool="gpu"))
    async with serving(server) as served:
        yield served


async def get(api: ServedAPI, path: str, token: str = "") -> HttpAnswer:
    return await call_http_once(api.url, "GET", path, token=token)


async def test_leader_peers_and_servers_name_the_rpc_address(api: ServedAPI) -> None:
    assert (await get(api, "/v1/status/leader")).body == "127.0.0.1:4647"
    assert (await get(api, "/v1/status/peers")).body == ["127.0.0.1:4647"]
    assert (await get(api, "/v1/agent/servers")).body == ["127.0.0.1:4647"]
    assert (await get(api, "/v1/regions")).body == ["global"]


async def test_members_in_nomads_shape(api: ServedAPI) -> None:
    answer = await get(api, "/v1/agent/members")
    assert answer.status == 200
    body = answer.body
    assert body["ServerRegion"] == "global" and body["ServerName"] == "unit"
    assert body["ServerDC"] == "dc1"
    [member] = body["Members"]
    assert member["Name"] == "unit" and member["Addr"] == "127.0.0.1"
    assert member["Status"] == "alive" and member["Port"] == 4648
    assert member["Tags"]["role"] == "nomad" and member["Tags"]["port"] == "4647"
    for key in ("ProtocolMin", "ProtocolMax", "ProtocolCur", "DelegateMin", "DelegateMax",
                "DelegateCur"):
        assert isinstance(member[key], int)


async def test_node_pools_is_not_taken_for_a_node_id(api: ServedAPI) -> None:
    answer = await get(api, "/v1/node/pools")
    assert answer.status == 200
    assert [p["Name"] for p in answer.body] == ["all", "default", "gpu"]
    default = next(p for p in answer.body if p["Name"] == "default")
    assert default["Description"] == "Default node pool."
    assert set(default) >= {"Name", "Description", "Meta", "SchedulerConfiguration",
                            "CreateIndex", "ModifyIndex"}
    assert [p["Name"] for p in (await get(api, "/v1/node/pools?prefix=d")).body] == ["default"]


async def test_one_pool_and_its_nodes(api: ServedAPI) -> None:
    pool = await get(api, "/v1/node/pool/all")
    assert pool.status == 200
    assert pool.body["Description"] == "Node pool with all nodes in the cluster."
    assert [n["ID"] for n in (await get(api, "/v1/node/pool/all/nodes")).body] == ["n1", "n2"]
    assert [n["ID"] for n in (await get(api, "/v1/node/pool/default/nodes")).body] == ["n1"]
    gpu = (await get(api, "/v1/node/pool/gpu/nodes")).body
    assert [n["ID"] for n in gpu] == ["n2"] and gpu[0]["NodePool"] == "gpu"
    missing = await get(api, "/v1/node/pool/nope")
    assert (missing.status, missing.body) == (404, "node pool not found")
    assert (await get(api, "/v1/node/pool/nope/nodes")).status == 404


async def _token_with(server_api: ServedAPI, rules: str) -> str:
    server = server_api.server
    await server.acls.upsert_policy(ACLPolicy(name="p", rules=rules))
    token = acl_token("client")
    await seed(server, tokens=(token,))
    return token.secret_id


async def test_what_each_route_needs_with_acls(acl_node_api: ServedAPI) -> None:
    # No credential: the open routes answer, the others refuse.
    for open_path in ("/v1/status/leader", "/v1/status/peers", "/v1/regions"):
        assert (await get(acl_node_api, open_path)).status == 200, open_path
    for closed in ("/v1/agent/members", "/v1/agent/servers", "/v1/node/pool/default",
                   "/v1/node/pool/default/nodes"):
        assert (await get(acl_node_api, closed)).status == 403, closed
    assert (await get(acl_node_api, "/v1/node/pools")).body == []

    # members needs node read (not agent read); a pool's nodes need node and pool read.
    token = await _token_with(acl_node_api, 'node { policy = "read" }\n'
                                       'node_pool "default" { policy = "read" }')
    assert (await get(acl_node_api, "/v1/agent/members", token)).status == 200
    assert (await get(acl_node_api, "/v1/agent/servers", token)).status == 403
    assert [p["Name"] for p in (await get(acl_node_api, "/v1/node/pools", token)).body] == [
        "default"]
    assert (await get(acl_node_api, "/v1/node/pool/default/nodes", token)).status == 200
    assert (await get(acl_node_api, "/v1/node/pool/all/nodes", token)).status == 403


# ---- garbage collection ------------------------------------------------------------------
async def test_system_gc_drops_dead_jobs_and_finished_allocations(api: ServedAPI) -> None:
    server = api.server
    await server.register_job(job(count=1))  # "web", a service job: stopped below
    await server.register_job(job(count=1, ID="batch", Type="batch"))
    for alloc in server.allocations():
        await server.update_allocs_from_client([AllocUpdate(alloc.id, "complete", "", {})])
    await server.deregister_job("web", purge=False)
    assert server.job("web") is not None
    batch_alloc = next(a for a in server.allocations() if a.job_id == "batch")

    async with aiohttp.ClientSession() as session:
        answer = await call_http(session, api.url, "PUT", "/v1/system/gc")
    assert answer.status == 200
    # The batch job is dead too (its work is done): both go, with everything of theirs.
    assert server.job("web") is None and server.job("batch") is None
    assert server.allocations() == [] and server.job_evaluations("web") == []
    assert server.allocation(batch_alloc.id) is None


async def test_system_gc_keeps_what_a_live_job_still_needs(api: ServedAPI) -> None:
    server = api.server
    await server.register_job(job(count=1))
    [first] = server.allocations()
    await server.update_allocs_from_client([AllocUpdate(first.id, "failed", "", {})])
    await server.register_job(job(count=1))  # a replacement for the failed one
    async with aiohttp.ClientSession() as session:
        assert (await call_http(session, api.url, "PUT", "/v1/system/gc")).status == 200
    assert server.job("web") is not None
    assert server.allocation(first.id) is None  # failed and replaced: gone
    assert [a.client_status for a in server.allocations()] == ["pending"]
    assert len(server.job_evaluations("web")) == 1  # the newest stays


async def test_gc_routes_need_management_and_node_write(acl_node_api: ServedAPI) -> None:
    token = await _token_with(acl_node_api, 'node { policy = "write" }')
    async with aiohttp.ClientSession() as session:
        gc = await call_http(session, acl_node_api.url, "PUT", "/v1/system/gc", token=token)
        assert gc.status == 403
        # node write passes; this API has no local client to collect for.
        client_gc = await call_http(session, acl_node_api.url, "PUT", "/v1/client/gc", token=token)
        assert client_gc.status == 400
        anonymous = await call_http(session, acl_node_api.url, "PUT", "/v1/client/gc")
        assert anonymous.status == 403


# ---- gossip writes: join and force-leave -------------------------------------------------
async def test_join_is_refused_in_nomads_shape_never_pretended(api: ServedAPI) -> None:
    async with aiohttp.ClientSession() as session:
        answer = await call_http(session, api.url, "PUT",
                                 "/v1/agent/join?address=10.0.0.9&address=nope")
        assert answer.status == 200
        assert answer.body["num_joined"] == 0
        assert "no gossip pool" in answer.body["error"]
        assert "10.0.0.9" in answer.body["error"] and "nope" in answer.body["error"]
        missing = await call_http(session, api.url, "POST", "/v1/agent/join")
        assert (missing.status, missing.body) == (400, "missing address to join")


async def test_force_leave_of_a_member_that_is_not_failed_is_a_no_op(api: ServedAPI) -> None:
    async with aiohttp.ClientSession() as session:
        left = await call_http(session, api.url, "POST", "/v1/agent/force-leave?node=nope")
        assert left.status == 200
        pruned = await call_http(session, api.url, "PUT",
                                 "/v1/agent/force-leave?node=nope&prune=true")
        assert pruned.status == 200
        bad_prune = await call_http(session, api.url, "PUT",
                                    "/v1/agent/force-leave?node=nope&prune=maybe")
        assert (bad_prune.status, bad_prune.body) == (400, "invalid prune value")
        missing = await call_http(session, api.url, "PUT", "/v1/agent/force-leave")
        assert (missing.status, missing.body) == (400, "missing node to force leave")
    assert [m["Name"] for m in (await get(api, "/v1/agent/members")).body["Members"]] == [
        "unit"]


async def test_join_and_force_leave_need_agent_write(acl_node_api: ServedAPI) -> None:
    read_only = await _token_with(acl_node_api, 'agent { policy = "read" }')
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/agent/join?address=x", "/v1/agent/force-leave?node=x"):
            assert (await call_http(session, acl_node_api.url, "PUT", path)).status == 403, path
            refused = await call_http(session, acl_node_api.url, "PUT", path, token=read_only)
            assert refused.status == 403, path
        await acl_node_api.server.acls.upsert_policy(ACLPolicy(name="p",
                                                          rules='agent { policy = "write" }'))
        for path in ("/v1/agent/join?address=x", "/v1/agent/force-leave?node=x"):
            allowed = await call_http(session, acl_node_api.url, "PUT", path, token=read_only)
            assert allowed.status == 200, path


async def test_system_gc_drops_a_dead_jobs_versions_with_it(api: ServedAPI) -> None:
    server = api.server
    await server.register_job(job(count=1))
    await server.register_job(job(count=2))  # version 1
    for alloc in server.allocations():
        await server.update_allocs_from_client([AllocUpdate(alloc.id, "complete", "", {})])
    await server.deregister_job("web", purge=False)  # version 2
    async with aiohttp.ClientSession() as session:
        assert (await call_http(session, api.url, "PUT", "/v1/system/gc")).status == 200
    assert server.job("web") is None
    # The same ID registered again is a new job: none of the collected one's versions.
    await server.register_job(job(count=1))
    assert [v["Version"] for v in server.job_versions("web") or []] == [0]


async def test_system_gc_keeps_the_evaluation_of_an_allocation_it_keeps(api: ServedAPI
                                                                        ) -> None:
    server = api.server
    await server.register_job(job(count=1))
    [alloc] = server.allocations()
    await server.evaluate_job("web")  # a newer evaluation that places nothing
    async with aiohttp.ClientSession() as session:
        assert (await call_http(session, api.url, "PUT", "/v1/system/gc")).status == 200
        # As in Nomad, the running allocation's EvalID still resolves.
        placed_by = await call_http(session, api.url, "GET", f"/v1/evaluation/{alloc.eval_id}")
    assert placed_by.status == 200 and placed_by.body["ID"] == alloc.eval_id
