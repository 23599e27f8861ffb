"""The cluster's routes (members, servers, regions, peers, leader) and the node pools,
through the real router on a real socket: Nomad's shapes and who may read them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from nomad_client.http.context import ACLS_DISABLED, TCP_LISTENER
from nomad_client.http.endpoints import cluster, register_all
from nomad_client.http.forward import HTTPForwarder
from nomad_client.http.router import ApiRequest, Router
from nomad_client.http.services import Services
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
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


# ---- a cluster of several servers (a ClusterView) ----------------------------------------
@attrs.define
class TwoServers:
    """Two servers; ``leading`` names the leader's index, None while there is none."""

    leading: int | None = 0

    def members(self) -> list[dict[str, Any]]:
        return [{"Name": f"s{i}.global", "Addr": f"10.0.0.{i}", "RPCAddr": f"10.0.0.{i}:4647",
                 "HTTPAddr": f"10.0.0.{i}:4646", "Region": "global", "Datacenter": f"dc{i}",
                 "Status": "alive"} for i in (1, 2)]

    def leader(self) -> dict[str, Any] | None:
        return None if self.leading is None else self.members()[self.leading]

    def known_servers(self) -> list[str]:
        return ["10.0.0.2:4647"]  # what a client learnt: not necessarily every server


def _cluster_services(server: Server | None, view: TwoServers) -> Services:
    forward = None if server is not None else HTTPForwarder(_NoTransport(), lambda: ("", ""))
    return Services(server=server, client=None, agent_config={}, cluster=view,
                    member={"Name": "s1.global", "Addr": "10.0.0.1",
                            "Tags": {"region": "global", "dc": "dc1"}},
                    forward=forward)


class _NoTransport:
    async def call(self, method: str, args: dict[str, Any], *,
                   timeout: float | None = None) -> Any:
        raise AssertionError("the cluster routes are answered locally")


def _request(path: str) -> ApiRequest:
    return ApiRequest(make_mocked_request("GET", path), TCP_LISTENER, ACLS_DISABLED, {})


async def test_members_list_every_server_with_its_rpc_port(keyring: Keyring) -> None:
    server = make_server(keyring)
    try:
        body = await cluster.members(_cluster_services(server, TwoServers()),
                                     _request("/v1/agent/members"))
    finally:
        await server.close()
    assert (body["ServerName"], body["ServerRegion"], body["ServerDC"]) == ("s1", "global",
                                                                           "dc1")
    assert [m["Name"] for m in body["Members"]] == ["s1.global", "s2.global"]
    second = body["Members"][1]
    assert second["Addr"] == "10.0.0.2" and second["Port"] == 4647
    assert second["Tags"]["rpc_addr"] == "10.0.0.2" and second["Tags"]["port"] == "4647"
    assert second["Tags"]["dc"] == "dc2" and second["Tags"]["role"] == "nomad"
    assert second["Tags"]["expect"] == "2" and second["Status"] == "alive"


async def test_servers_peers_and_leader_of_a_cluster(keyring: Keyring) -> None:
    view = TwoServers(leading=1)
    server = make_server(keyring)
    try:
        on_server = _cluster_services(server, view)
        assert await cluster.servers(on_server, _request("/")) == ["10.0.0.1:4647",
                                                                   "10.0.0.2:4647"]
        assert await cluster.peers(on_server, _request("/")) == ["10.0.0.1:4647",
                                                                 "10.0.0.2:4647"]
        assert await cluster.leader(on_server, _request("/")) == "10.0.0.2:4647"
    finally:
        await server.close()
    # A client-only agent names the servers it knows.
    on_client = _cluster_services(None, view)
    assert await cluster.servers(on_client, _request("/")) == ["10.0.0.2:4647"]
    assert await cluster.regions(on_client, _request("/")) == ["global"]
    assert await cluster.leader(on_client, _request("/")) == "10.0.0.2:4647"


async def test_no_leader_is_nomads_500(keyring: Keyring) -> None:
    server = make_server(keyring)
    router = Router(server)
    register_all(router, _cluster_services(server, TwoServers(leading=None)))
    try:
        answer = await router.dispatch(make_mocked_request("GET", "/v1/status/leader"),
                                       TCP_LISTENER)
    finally:
        await server.close()
    assert isinstance(answer, web.Response)
    assert (answer.status, answer.text) == (500, "No cluster leader")
