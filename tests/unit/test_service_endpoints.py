"""The service discovery routes through the real router on a real socket, ACLs on: Nomad's
shapes, ``tag``/``filter``/``choose``, deletes, blocking queries, the allocation's services
and checks, and who may read what (a workload identity reads its own namespace's
registrations without any policy, never another namespace's; a token needs ``read-job``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.cli.main import main
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Resource, Server
from nomad_client.server.state import job_key
from nomad_client.structs.models import ACLPolicy, ACLToken, Allocation
from nomad_client.structs.namespaces import Namespace
from nomad_client.structs.services import registration_id
from tests.unit.factories import (
    HttpAnswer,
    ServedAPI,
    call_http,
    identity_token,
    make_alloc,
    make_server,
    node,
    seed,
    serve_api,
    settle,
)

pytestmark = pytest.mark.timeout(60)

SECRET = "5d7c4c1e-0b9f-4a31-8e2a-7f0c2b9d6e11"
DENIED = (403, "Permission denied")


@attrs.define
class ChecksClient:
    """The local client as the checks route sees it: node "n1" and its check results."""

    node_id: str = "n1"
    checks: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def alloc_checks(self, alloc_id: str) -> dict[str, Any] | None:
        return self.checks.get(alloc_id)


@attrs.define
class World:
    """Registrations in two namespaces: web (2 allocs: web and cache services) in default,
    api in prod; tokens holding read-job, submit-job or list-jobs in default."""

    server: Server
    api: ServedAPI
    session: aiohttp.ClientSession
    keyring: Keyring
    web1: Allocation
    web2: Allocation
    prod: Allocation
    client: ChecksClient
    tokens: dict[str, str] = attrs.field(factory=dict)

    async def call(self, method: str, path: str, token: str = "") -> HttpAnswer:
        return await call_http(self.session, self.api.url, method, path,
                               token=token or self.tokens["management"])

    async def body(self, path: str, token: str = "") -> Any:
        answer = await self.call("GET", path, token)
        assert answer.status == 200, (path, answer)
        return answer.body

    def identity(self, alloc: Allocation) -> str:
        return identity_token(self.keyring, alloc)

    async def register(self, alloc: Allocation, name: str, port: int, tags: list[str]
                       ) -> int:
        return await self.server.upsert_services("n1", SECRET, alloc.id, [{
            "ID": registration_id(alloc.id, "group-g", name, "http"), "ServiceName": name,
            "Tags": tags, "Address": "10.0.0.1", "Port": port}])


async def _token(server: Server, name: str, rules: str) -> str:
    await server.acls.upsert_policy(ACLPolicy(name=name, rules=rules))
    token = await server.acls.upsert_token(ACLToken(accessor_id="", secret_id="", name=name,
                                                    type="client", policies=(name,)))
    return token.secret_id


@pytest.fixture
async def world(keyring: Keyring) -> AsyncIterator[World]:
    server = make_server(keyring, acl=True)
    await server.upsert_namespace(Namespace(name="prod"))
    await server.register_node(node("n1", secret_id=SECRET))
    web1 = make_alloc(node_id="n1", job_id="web", name="web.g[0]")
    web2 = make_alloc(node_id="n1", job_id="web", name="web.g[1]")
    prod = make_alloc(node_id="n1", job_id="api", namespace="prod", name="api.g[0]")
    await seed(server, allocs=(web1, web2, prod))
    await server.store.write({"jobs": [(job_key("default", "web"),
                                        {"ID": "web", "Namespace": "default"})]})
    client = ChecksClient()
    api = await serve_api(server, client=client)  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as session:
        w = World(server, api, session, keyring, web1, web2, prod, client)
        boot = await call_http(session, api.url, "POST", "/v1/acl/bootstrap")
        w.tokens["management"] = boot.body["SecretID"]
        for capability in ("read-job", "submit-job", "list-jobs"):
            w.tokens[capability] = await _token(
                server, capability, f'namespace "default" {{ capabilities = ["{capability}"] }}')
        await w.register(web1, "web", 20001, ["v1", "db"])
        await w.register(web1, "cache", 20003, [])
        await w.register(web2, "web", 20002, ["v2"])
        await w.register(prod, "api", 20004, ["internal"])
        yield w
    await api.close()
    await server.close()


def reg_id(alloc: Allocation, name: str) -> str:
    return registration_id(alloc.id, "group-g", name, "http")


async def test_services_are_listed_by_namespace_with_every_tag_used(world: World) -> None:
    answer = await world.call("GET", "/v1/services")
    assert answer.status == 200
    assert answer.body == [{"Namespace": "default", "Services": [
        {"ServiceName": "cache", "Tags": []},
        {"ServiceName": "web", "Tags": ["db", "v1", "v2"]}]}]
    assert answer.nomad_index == world.server.index_of(Resource.SERVICES)
    assert await world.body("/v1/services?namespace=prod") == [
        {"Namespace": "prod", "Services": [{"ServiceName": "api", "Tags": ["internal"]}]}]
    assert [n["Namespace"] for n in await world.body("/v1/services?namespace=*")] == [
        "default", "prod"]


async def test_a_service_s_registrations_in_nomad_s_shape(world: World) -> None:
    found = await world.body("/v1/service/web")
    assert [r["ID"] for r in found] == sorted([reg_id(world.web1, "web"),
                                               reg_id(world.web2, "web")])
    first = next(r for r in found if r["AllocID"] == world.web1.id)
    assert {k: v for k, v in first.items() if not k.endswith("Index")} == {
        "ID": reg_id(world.web1, "web"), "ServiceName": "web", "Namespace": "default",
        "NodeID": "n1", "Datacenter": "dc1", "JobID": "web", "AllocID": world.web1.id,
        "Tags": ["v1", "db"], "Address": "10.0.0.1", "Port": 20001}
    assert await world.body("/v1/service/nothing-here") == []
    assert await world.body("/v1/service/api") == []  # it lives in prod
    assert len(await world.body("/v1/service/api?namespace=prod")) == 1
    assert len(await world.body("/v1/service/web?namespace=*")) == 2


@pytest.mark.parametrize(("query", "ports"), [
    ("tag=v1", [20001]),
    ("tag=v1&tag=db", [20001]),
    ("tag=v1&tag=v2", []),
    ("tag=nope", []),
    ("filter=Port%20%3D%3D%2020002", [20002]),
    ("filter=%22db%22%20in%20Tags", [20001]),
    ("tag=v2&filter=Port%20%3D%3D%2020001", []),
])
async def test_tag_and_filter_narrow_the_registrations(world: World, query: str,
                                                       ports: list[int]) -> None:
    assert [r["Port"] for r in await world.body(f"/v1/service/web?{query}")] == ports


def reference_choice(registrations: list[dict[str, Any]], count: int, key: str
                     ) -> list[dict[str, Any]]:
    """Nomad's rendezvous choice, as its source does it."""
    def weight(r: dict[str, Any]) -> str:
        digest = hashlib.sha256(r["Port"].to_bytes(8, "big"))
        for part in (r["AllocID"], r["ID"], r["Namespace"], r["Address"], r["ServiceName"],
                     *r["Tags"], key):
            digest.update(part.encode())
        return digest.hexdigest()
    return sorted(registrations, key=weight)[:min(count, len(registrations))]


async def test_choose_picks_a_stable_subset_as_nomad_does(world: World) -> None:
    everything = await world.body("/v1/service/web")
    for key in ("client-a", "client-b", "x|y"):
        for count in (0, 1, 2, 5):
            chosen = await world.body(f"/v1/service/web?choose={count}%7C{key}")
            assert chosen == reference_choice(everything, count, key), (count, key)
    bad = "failed to choose services: Parameter for choose must be in form '<number>|<key>'"
    for param in ("1", "1%7C", "x%7Ckey", "%201%7Ckey", "1_0%7Ckey"):
        answer = await world.call("GET", f"/v1/service/web?choose={param}")
        assert (answer.status, answer.body) == (400, bad), param
    assert (await world.call("GET", "/v1/service/web?choose=-1%7Ck")).status == 400
    assert (await world.call("GET", "/v1/service/web?filter=Port%20%3D%3D")).status == 400


async def test_deleting_a_registration_needs_submit_job_in_its_namespace(world: World
                                                                         ) -> None:
    target = reg_id(world.web2, "web")
    path = f"/v1/service/web/{target}"
    assert (await world.call("DELETE", path, world.tokens["read-job"]))[:2] == DENIED
    assert (await world.call("DELETE", path, world.identity(world.web1)))[:2] == DENIED
    elsewhere = await world.call("DELETE", path + "?namespace=prod")
    assert (elsewhere.status, elsewhere.body) == (404, "service registration not found")
    deleted = await world.call("DELETE", path, world.tokens["submit-job"])
    assert (deleted.status, deleted.body) == (200, "")
    assert deleted.nomad_index == world.server.store.index
    assert [r["Port"] for r in await world.body("/v1/service/web")] == [20001]
    again = await world.call("DELETE", path)
    assert (again.status, again.body) == (404, "service registration not found")
    assert (await world.call("GET", "/v1/service/")).status == 400


async def test_a_workload_identity_reads_its_own_namespace_without_a_policy(world: World
                                                                            ) -> None:
    own, prod = world.identity(world.web1), world.identity(world.prod)
    assert len(await world.body("/v1/service/web", own)) == 2
    assert [n["Namespace"] for n in await world.body("/v1/services", own)] == ["default"]
    assert [n["Namespace"] for n in await world.body("/v1/services?namespace=*", own)] == [
        "default"]
    assert (await world.call("GET", "/v1/service/api?namespace=prod", own))[:2] == DENIED
    assert (await world.call("GET", "/v1/services?namespace=prod", own))[:2] == DENIED
    # The identity of a prod workload: the other way round.
    assert len(await world.body("/v1/service/api?namespace=prod", prod)) == 1
    assert (await world.call("GET", "/v1/service/web", prod))[:2] == DENIED
    assert await world.body("/v1/service/web?namespace=*", prod) == []
    # Reading its own job or allocation still takes a policy.
    assert (await world.call("GET", f"/v1/allocation/{world.web1.id}/services",
                             own))[:2] == DENIED


async def test_tokens_need_read_job_in_the_namespace(world: World) -> None:
    reader = world.tokens["read-job"]
    assert len(await world.body("/v1/service/web", reader)) == 2
    assert (await world.call("GET", "/v1/service/api?namespace=prod", reader))[:2] == DENIED
    assert [n["Namespace"] for n in await world.body("/v1/services?namespace=*", reader)] == [
        "default"]
    for token in (world.tokens["list-jobs"], world.tokens["submit-job"]):
        assert (await world.call("GET", "/v1/services", token))[:2] == DENIED
    anonymous = await call_http(world.session, world.api.url, "GET", "/v1/service/web")
    assert (anonymous.status, anonymous.body) == DENIED


async def test_an_allocation_s_and_a_job_s_registrations(world: World) -> None:
    found = await world.body(f"/v1/allocation/{world.web1.id}/services")
    assert sorted(r["ServiceName"] for r in found) == ["cache", "web"]
    assert len(await world.body(f"/v1/allocation/{world.prod.id}/services?namespace=prod")) == 1
    for path in (f"/v1/allocation/{world.prod.id}/services",  # asked in default
                 "/v1/allocation/no-such-alloc/services"):
        answer = await world.call("GET", path)
        assert (answer.status, answer.body) == (404, "allocation not found")
    assert len(await world.body("/v1/job/web/services")) == 3
    assert (await world.call("GET", "/v1/job/nope/services")).status == 404


async def test_checks_come_from_the_client_running_the_allocation(world: World) -> None:
    results = {"c1": {"ID": "c1", "Status": "success"}}
    world.client.checks[world.web1.id] = results
    assert await world.body(f"/v1/allocation/{world.web1.id}/checks") == results
    assert await world.body(f"/v1/allocation/{world.web2.id}/checks") is None  # none run
    elsewhere = attrs.evolve(world.web2, id="0b1f0000-0000-4000-8000-000000000009",
                             node_id="n2")
    await seed(world.server, allocs=(elsewhere,))
    answer = await world.call("GET", f"/v1/allocation/{elsewhere.id}/checks")
    assert answer.status == 404
    assert (await world.call("GET", f"/v1/allocation/{world.web1.id}/checks",
                             world.tokens["list-jobs"]))[:2] == DENIED


async def test_a_blocking_query_returns_once_the_registrations_change(world: World) -> None:
    index = (await world.call("GET", "/v1/service/web")).nomad_index
    waiting = asyncio.create_task(world.call("GET", f"/v1/service/web?index={index}&wait=10s"))
    await settle()
    assert not waiting.done()
    new_index = await world.register(world.web2, "web", 20002, ["v3"])
    answer = await asyncio.wait_for(waiting, 10)
    assert answer.nomad_index == new_index
    assert sorted(tag for r in answer.body for tag in r["Tags"]) == ["db", "v1", "v3"]


# ---- the CLI -----------------------------------------------------------------------------------
async def cli(world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
              *argv: str) -> tuple[int, str, str]:
    """``nomad-client <argv>`` against the world's agent with its management token, off the
    event loop (the CLI runs its own)."""
    monkeypatch.setenv("NOMAD_ADDR", world.api.url)
    monkeypatch.setenv("NOMAD_TOKEN", world.tokens["management"])
    monkeypatch.delenv("NOMAD_NAMESPACE", raising=False)
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_service_list_and_info(world: World, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*argv: str) -> Any:
        return cli(world, capsys, monkeypatch, *argv)

    assert await run("service", "list") == (0, "Service Name  Tags\ncache         []\n"
                                               "web           [db,v1,v2]\n", "")
    code, out, _ = await run("service", "list", "-namespace=*")
    assert code == 0 and out.splitlines() == [
        "Service Name  Namespace  Tags", "cache         default    []",
        "web           default    [db,v1,v2]", "api           prod       [internal]"]
    code, out, _ = await run("service", "list", "-json")
    assert json.loads(out) == await world.body("/v1/services")

    code, out, _ = await run("service", "info", "-tag", "v2", "web")
    assert code == 0 and out.splitlines() == [
        "Job ID  Address         Tags  Node ID  Alloc ID",
        f"web     10.0.0.1:20002  [v2]  n1       {world.web2.id[:8]}"]
    code, out, _ = await run("service", "info", "-verbose", "-filter", "Port == 20001", "web")
    assert code == 0 and f"ID           = {reg_id(world.web1, 'web')}" in out
    assert "Address      = 10.0.0.1:20001" in out and "Tags         = [v1,db]" in out
    code, out, _ = await run("service", "info", "-json", "-namespace", "prod", "api")
    assert code == 0 and [r["ServiceName"] for r in json.loads(out)] == ["api"]
    assert await run("service", "info", "nothing") == (0, "No service registrations found\n",
                                                       "")


async def test_service_delete(world: World, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = reg_id(world.web2, "web")
    assert await cli(world, capsys, monkeypatch, "service", "delete", "web", target) == (
        0, "Successfully deleted service registration\n", "")
    assert [r["Port"] for r in await world.body("/v1/service/web")] == [20001]
    code, _, err = await cli(world, capsys, monkeypatch, "service", "delete", "web", target)
    assert (code, err) == (1, "Error deleting service registration: Unexpected response "
                              "code: 404 (service registration not found)\n")
    code, _, err = await cli(world, capsys, monkeypatch, "service", "delete", "web")
    assert code == 1 and "takes 2 argument(s)" in err
