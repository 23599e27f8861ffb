"""Nomad's list query, read the same way by every list endpoint: ``prefix``, ``filter``,
``namespace`` (``*``), ``region``, ``per_page``/``next_token`` (``X-Nomad-NextToken``),
``reverse`` and blocking ``index``/``wait``; then each list's own switches (``meta``,
``resources``, ``os``, ``task_states``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest

from nomad_client.jobspec import canonicalize_job
from nomad_client.server.keyring import Keyring
from nomad_client.structs.models import TOKEN_CLIENT, ACLPolicy, ACLRole, ACLToken
from nomad_client.structs.namespaces import Namespace
from nomad_client.structs.services import alloc_registration_prefix
from tests.unit.factories import HttpAnswer, node
from tests.unit.launching import batch_job, served
from tests.unit.test_namespace_endpoints import Api

SCALED = {"Min": 1, "Max": 5, "Policy": {}}
OTHER_NS = "prod"


@attrs.frozen
class ListRoute:
    path: str
    id_field: str  # the field ``prefix`` and paging go by
    prefix: str  # a prefix some but not all items have
    query: str = ""  # asked with every request


ROUTES = [
    ListRoute("/v1/jobs", "ID", "web"),
    ListRoute("/v1/allocations", "ID", ""),
    ListRoute("/v1/nodes", "ID", "node-a"),
    ListRoute("/v1/vars", "Path", "app/"),
    ListRoute("/v1/acl/policies", "Name", "read"),
    ListRoute("/v1/acl/tokens", "AccessorID", ""),
    ListRoute("/v1/acl/roles", "ID", ""),
    ListRoute("/v1/namespaces", "Name", "de"),
    ListRoute("/v1/scaling/policies", "ID", ""),
    # One item per namespace, and no prefix (as Nomad's)
    ListRoute("/v1/services", "Namespace", "", query="namespace=*"),
]
IDS = [route.path for route in ROUTES]


async def _seed(api: Api) -> None:
    server = api.server
    await server.upsert_namespace(Namespace(name=OTHER_NS))
    for node_id in ("node-a1", "node-a2", "node-b1"):
        await server.register_node(node(node_id, datacenter="dc1"))
    for job_id, namespace in (("web-1", "default"), ("web-2", "default"), ("api", "default"),
                              ("web-1", OTHER_NS)):
        job = batch_job(job_id, group={"Scaling": SCALED}, Type="service",
                        Namespace=namespace)
        await server.register_job(canonicalize_job(job))
    for path in ("app/one", "app/two", "other/three"):
        await server.variables.put("default", path, {"k": "v"})
    await server.variables.put(OTHER_NS, "app/prod", {"k": "v"})
    for name in ("read-a", "read-b", "write"):
        await server.acls.upsert_policy(ACLPolicy(name=name, rules='namespace "*" {}'))
    for role_id in ("role-a", "role-b", "role-c"):
        await server.acls.upsert_role(ACLRole(id="", name=role_id, policies=("read-a",)))
    for alloc in server.allocations(None):
        if alloc.job_id == "web-1":  # one service in each namespace
            await server.services.upsert(server.node(alloc.node_id), alloc.id, [{
                "ID": f"{alloc_registration_prefix(alloc.id)}-web", "ServiceName": "web",
                "Tags": [], "Address": "127.0.0.1", "Port": 80}])
    for name in ("one", "two"):
        await server.acls.upsert_token(ACLToken(accessor_id="", secret_id="", name=name,
                                                type=TOKEN_CLIENT, policies=("read-a",)))


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring, acl=True) as api:
        await _seed(api)
        yield api


async def _list(api: Api, route: ListRoute, query: str = "") -> HttpAnswer:
    answer = await api.call("GET", f"{route.path}?{route.query}&{query}")
    assert answer.status == 200, (route.path, query, answer.body)
    assert isinstance(answer.body, list)
    return answer


def _ids(route: ListRoute, answer: HttpAnswer) -> list[str]:
    return [item[route.id_field] for item in answer.body]


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_each_list_takes_nomads_list_query(api: Api, route: ListRoute) -> None:
    everything = _ids(route, await _list(api, route))
    assert len(everything) >= 2, everything

    # prefix
    if route.prefix:
        chosen = _ids(route, await _list(api, route, f"prefix={route.prefix}"))
        assert chosen and all(i.startswith(route.prefix) for i in chosen), chosen
        assert len(chosen) < len(everything)

    # filter: a bexpr on the item; a broken one is a 400 with Nomad's reason
    first = everything[0]
    matched = _ids(route, await _list(api, route, f'filter={route.id_field} == "{first}"'))
    assert matched == [first]
    bad = await api.call("GET", f"{route.path}?{route.query}&filter={route.id_field} ==")
    assert bad.status == 400 and "failed to read filter expression" in bad.body, bad

    # reverse
    backwards = _ids(route, await _list(api, route, "reverse=true"))
    assert backwards == list(reversed(everything))

    # per_page + next_token: the pages, walked, are the whole list in order
    walked: list[str] = []
    token = ""
    for _ in range(len(everything) + 1):
        query = "per_page=1" + (f"&next_token={token}" if token else "")
        page = await _list(api, route, query)
        assert len(page.body) == 1
        walked += _ids(route, page)
        token = page.headers.get("X-Nomad-NextToken", "")
        if not token:
            break
    assert walked == everything
    bad = await api.call("GET", f"{route.path}?{route.query}&per_page=many")
    assert bad == (400, "Expect a number for `per_page` query string parameter", bad.headers)

    # region: only the agent's own
    assert len(_ids(route, await _list(api, route, "region=global"))) == len(everything)
    elsewhere = await api.call("GET", f"{route.path}?{route.query}&region=mars")
    assert (elsewhere.status, elsewhere.body) == (400, "No path to region")

    # blocking: a query at the current index waits its time out, then answers
    now = (await _list(api, route)).nomad_index
    assert now is not None
    blocked = await _list(api, route, f"index={now}&wait=50ms")
    assert blocked.nomad_index == now and _ids(route, blocked) == everything
    bad = await api.call("GET", f"{route.path}?{route.query}&index=-1")
    assert (bad.status, bad.body) == (400, "Invalid index")


NAMESPACED = [ListRoute("/v1/jobs", "ID", ""), ListRoute("/v1/allocations", "ID", ""),
              ListRoute("/v1/vars", "Path", ""), ListRoute("/v1/scaling/policies", "ID", "")]


@pytest.mark.parametrize("route", NAMESPACED, ids=[r.path for r in NAMESPACED])
async def test_namespace_and_all_namespaces(api: Api, route: ListRoute) -> None:
    def namespaces(answer: HttpAnswer) -> set[str]:
        return {item.get("Namespace") or item["Target"]["Namespace"] for item in answer.body}

    assert namespaces(await _list(api, route)) == {"default"}
    assert namespaces(await _list(api, route, f"namespace={OTHER_NS}")) == {OTHER_NS}
    assert namespaces(await _list(api, route, "namespace=*")) == {"default", OTHER_NS}


async def test_jobs_meta(api: Api) -> None:
    job = batch_job("with-meta", Meta={"team": "a"})
    await api.server.register_job(canonicalize_job(job))
    plain = (await _list(api, ROUTES[0], "prefix=with-meta")).body
    assert "Meta" not in plain[0]
    (stub,) = (await _list(api, ROUTES[0], "prefix=with-meta&meta=true")).body
    assert stub["Meta"] == {"team": "a"}


async def test_nodes_resources_and_os(api: Api) -> None:
    nodes = ROUTES[2]
    (plain,) = (await _list(api, nodes, "prefix=node-b")).body
    assert not {"NodeResources", "ReservedResources", "Attributes"} & set(plain)
    (stub,) = (await _list(api, nodes, "prefix=node-b&resources=true&os=true")).body
    assert isinstance(stub["NodeResources"], dict)
    assert stub["ReservedResources"]["Cpu"] == {"CpuShares": 0}
    assert set(stub["Attributes"]) == {"os.name"}


async def test_allocations_task_states_and_resources(api: Api) -> None:
    allocs = ROUTES[1]
    plain = (await _list(api, allocs)).body
    assert all("TaskStates" in a and "AllocatedResources" not in a for a in plain)
    lean = (await _list(api, allocs, "task_states=false&resources=true")).body
    assert all("TaskStates" not in a and isinstance(a["AllocatedResources"], dict)
               for a in lean)


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
async def test_each_list_is_indented_with_pretty(api: Api, route: ListRoute) -> None:
    plain = await _list(api, route, "per_page=1")
    pretty = await api.call("GET", f"{route.path}?{route.query}&per_page=1&pretty=1")
    raw = await api.session.get(f"{api.served.url}{route.path}?{route.query}&per_page=1&pretty=1",
                                headers={"X-Nomad-Token": api.management})
    async with raw:
        assert (await raw.text()).startswith("[\n    {")
    assert pretty.body == plain.body
    assert pretty.headers["X-Nomad-NextToken"] == plain.headers["X-Nomad-NextToken"]
