"""The namespace routes and the namespaced job and allocation routes over real HTTP: Nomad's
shapes, codes and texts, who may see and change what, and one job ID in two namespaces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.structs.models import TOKEN_CLIENT, ACLPolicy, ACLToken
from nomad_client.structs.namespaces import Namespace, NamespaceCapabilities
from tests.unit.factories import (
    HttpAnswer,
    ServedAPI,
    call_http,
    job,
    make_server,
    node,
    serve_api,
    settle,
)

PROD = "prod"
DENIED = (403, "Permission denied")
PROD_SPEC = {"Name": PROD, "Description": "Production", "Meta": {"team": "payments"},
             "Capabilities": {"EnabledTaskDrivers": ["raw_exec", "exec"],
                              "DisabledTaskDrivers": ["docker"], "TaskAPI": "opt_in"}}


@attrs.define
class Api:
    server: Server
    served: ServedAPI
    session: aiohttp.ClientSession
    management: str = ""

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = None
                   ) -> HttpAnswer:
        return await call_http(self.session, self.served.url, method, path, body,
                               token=self.management if token is None else token)

    async def token_for(self, rules: str) -> str:
        """A client token holding one new policy with ``rules``."""
        name = f"p{len(self.server.acls.policies())}"
        await self.server.acls.upsert_policy(ACLPolicy(name=name, rules=rules))
        token = await self.server.acls.upsert_token(
            ACLToken(accessor_id="", secret_id="", name=name, type=TOKEN_CLIENT,
                     policies=(name,)), [])
        return token.secret_id


async def start(keyring: Keyring, *, acl: bool) -> tuple[Server, ServedAPI]:
    server = make_server(keyring, acl=acl)
    await server.register_node(node())
    return server, await serve_api(server)


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    server, served = await start(keyring, acl=False)
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(server, served, session)
    finally:
        await served.close()


@pytest.fixture
async def acl_api(keyring: Keyring) -> AsyncIterator[Api]:
    server, served = await start(keyring, acl=True)
    try:
        async with aiohttp.ClientSession() as session:
            management = await server.acls.bootstrap()
            yield Api(server, served, session, management.secret_id)
    finally:
        await served.close()


def names(answer: HttpAnswer, key: str = "Name") -> list[str]:
    assert answer.status == 200, answer
    return [item[key] for item in answer.body]


# ---- the namespace routes --------------------------------------------------------------------
async def test_namespaces_are_written_read_listed_and_deleted(api: Api) -> None:
    listed = await api.call("GET", "/v1/namespaces")
    assert listed.status == 200 and listed.nomad_index is not None
    assert listed.body == [{"Name": "default", "Description": "Default shared namespace",
                            "Quota": "", "Capabilities": None, "Meta": {},
                            "CreateIndex": 1, "ModifyIndex": 1}]

    written = await api.call("PUT", "/v1/namespace/prod", PROD_SPEC)
    assert (written.status, written.body) == (200, "")  # Nomad: an empty body and the index
    assert written.nomad_index == api.server.store.index
    read = await api.call("GET", "/v1/namespace/prod")
    assert read.status == 200 and read.nomad_index == written.nomad_index
    assert read.body == {**PROD_SPEC, "Quota": "", "CreateIndex": written.nomad_index,
                         "ModifyIndex": written.nomad_index}

    # Name from the body on the routes without one; keys matched as Go's decoder does.
    for path, name in (("/v1/namespace", "dev"), ("/v1/namespaces", "qa")):
        answer = await api.call("POST", path, {"name": name, "description": name.upper()})
        assert answer.status == 200, answer
    assert names(await api.call("GET", "/v1/namespaces")) == ["default", "dev", PROD, "qa"]
    assert names(await api.call("GET", "/v1/namespaces?prefix=d")) == ["default", "dev"]
    dev = await api.call("GET", "/v1/namespace/dev")
    assert dev.body["Description"] == "DEV"

    # An update replaces the whole object and keeps its CreateIndex.
    assert (await api.call("POST", "/v1/namespace/prod", {"Description": "p"})).status == 200
    updated = (await api.call("GET", "/v1/namespace/prod")).body
    assert (updated["Description"], updated["Capabilities"], updated["Meta"]) == ("p", None, {})
    assert updated["CreateIndex"] == read.body["CreateIndex"] < updated["ModifyIndex"]

    deleted = await api.call("DELETE", "/v1/namespace/dev")
    assert (deleted.status, deleted.body) == (200, "") and deleted.nomad_index
    assert (await api.call("GET", "/v1/namespace/dev"))[:2] == (404, "Namespace not found")
    assert (await api.call("DELETE", "/v1/namespace/dev"))[:2] == (404, "namespace not found")


@pytest.mark.parametrize(("method", "path", "body", "answer"), [
    ("PUT", "/v1/namespace/prod", {"Name": "other"},
     "Namespace name does not match request path"),
    ("PUT", "/v1/namespace/prod", {"Capabilities": {"TaskAPI": "always"}},
     'Invalid namespace "prod": 1 error occurred:\n\t* Capabilities.TaskAPI: invalid Task API '
     'mode "always": must be one of "enabled", "disabled", "opt_in", or "" (unset)\n\n'),
    ("PUT", "/v1/namespace/a_b", {}, 'Invalid namespace "a_b": 1 error occurred:\n\t* '
     'invalid name "a_b". Must match regex ^[a-zA-Z0-9-]{1,128}$\n\n'),
    ("PUT", "/v1/namespace", {"Description": "no name"}, 'Invalid namespace "": '),
    ("PUT", "/v1/namespace/prod", {"Capabilities": {"EnabledTaskDrivers": "exec"}},
     "EnabledTaskDrivers must be a list of strings"),
    ("PUT", "/v1/namespace/prod", {"Meta": {"n": 1}}, "Meta must be an object of strings"),
    ("PUT", "/v1/namespace/prod", {"Capabilities": ["exec"]},
     "Capabilities must be a JSON object"),
    ("PUT", "/v1/namespace/prod", ["prod"], "Request body must be a JSON object"),
    ("PUT", "/v1/namespace/prod", {"NodePoolConfiguration": {"Default": "x"}},
     "Node Pools Governance is unlicensed."),
    ("PUT", "/v1/namespace/prod", {"Quota": "q"},
     'namespace "prod" using non-existent quota "q"'),
    ("GET", "/v1/namespace/", None, "Missing Namespace Name"),
    ("DELETE", "/v1/namespace/default", None, "can not delete default namespace"),
], ids=["name mismatch", "task api mode", "bad name", "no name", "drivers type", "meta type",
        "capabilities type", "not an object", "node pools", "quota", "no name in path",
        "delete default"])
async def test_bad_namespace_requests_are_400_with_a_reason(
        api: Api, method: str, path: str, body: Any, answer: str) -> None:
    status, text, _ = await api.call(method, path, body)
    assert (status, text[:len(answer)]) == (400, answer)
    assert names(await api.call("GET", "/v1/namespaces")) == ["default"]


async def test_a_namespace_with_jobs_is_not_deleted(api: Api) -> None:
    assert (await api.call("PUT", "/v1/namespace/prod", {})).status == 200
    assert (await api.call("PUT", "/v1/jobs?namespace=prod", {"Job": job()})).status == 200
    status, text, _ = await api.call("DELETE", "/v1/namespace/prod")
    assert status == 400
    assert 'namespace "prod" has non-terminal jobs in regions: [global]' in text
    assert api.server.namespace(PROD) is not None


async def test_a_blocking_list_answers_after_the_next_write(api: Api) -> None:
    first = await api.call("GET", "/v1/namespaces")
    waiting = asyncio.create_task(api.call(
        "GET", f"/v1/namespaces?index={first.nomad_index}&wait=60s"))
    await settle()
    assert not waiting.done()  # blocked on the index it already has
    assert (await api.call("PUT", "/v1/namespace/prod", {})).status == 200
    answer = await asyncio.wait_for(waiting, 10)
    assert names(answer) == ["default", PROD]
    assert answer.nomad_index is not None and first.nomad_index is not None
    assert answer.nomad_index > first.nomad_index


# ---- who may see and change namespaces ---------------------------------------------------------
async def test_namespaces_are_shown_to_those_holding_a_capability_in_them(acl_api: Api
                                                                           ) -> None:
    api = acl_api
    for name in (PROD, "dev"):
        assert (await api.call("PUT", f"/v1/namespace/{name}", {})).status == 200
    assert names(await api.call("GET", "/v1/namespaces")) == ["default", "dev", PROD]

    prod_reader = await api.token_for('namespace "prod" { policy = "read" }')
    anywhere = await api.token_for('namespace "*" { capabilities = ["list-jobs"] }')
    denied_dev = await api.token_for('namespace "*" { policy = "read" }\n'
                                     'namespace "dev" { policy = "deny" }')
    # A block holding only variables rules grants no namespace capability.
    variables_only = await api.token_for(
        'namespace "prod" {\n variables {\n path "*" { capabilities = ["read"] }\n }\n}')
    nothing = await api.token_for('node { policy = "read" }')
    for token, visible in ((prod_reader, [PROD]), (anywhere, ["default", "dev", PROD]),
                           (denied_dev, ["default", PROD]), (variables_only, []),
                           (nothing, [])):
        assert names(await api.call("GET", "/v1/namespaces", token=token)) == visible
        for name in ("default", "dev", PROD):
            answer = await api.call("GET", f"/v1/namespace/{name}", token=token)
            assert (answer.status == 200) is (name in visible), (name, answer)
            if name not in visible:
                assert answer[:2] == DENIED
    # Refused before the lookup: a refused caller cannot tell a missing namespace.
    assert (await api.call("GET", "/v1/namespace/nope", token=prod_reader))[:2] == DENIED
    assert (await api.call("GET", "/v1/namespace/nope", token=anywhere))[:2] == (
        404, "Namespace not found")

    writer = await api.token_for('namespace "*" { policy = "write" }\noperator { policy = '
                                 '"write" }')
    for method, path, body in (("PUT", "/v1/namespace/qa", {}), ("POST", "/v1/namespace",
                                                                  {"Name": "qa"}),
                               ("PUT", "/v1/namespaces", {"Name": "qa"}),
                               ("DELETE", "/v1/namespace/dev", None)):
        for token in (writer, prod_reader, ""):
            assert (await api.call(method, path, body, token=token))[:2] == DENIED, path
    assert names(await api.call("GET", "/v1/namespaces")) == ["default", "dev", PROD]


# ---- jobs and allocations in namespaces --------------------------------------------------------
async def test_one_job_id_lives_in_two_namespaces(api: Api) -> None:
    assert (await api.call("PUT", "/v1/namespace/prod", {})).status == 200
    assert (await api.call("PUT", "/v1/jobs", {"Job": job(count=1)})).status == 200
    prod = await api.call("PUT", "/v1/job/web?namespace=prod", {"Job": job(count=2)})
    assert prod.status == 200 and prod.body["EvalID"]

    default_job = (await api.call("GET", "/v1/job/web")).body
    prod_job = (await api.call("GET", "/v1/job/web?namespace=prod")).body
    assert (default_job["Namespace"], prod_job["Namespace"]) == ("default", PROD)
    assert (default_job["TaskGroups"][0]["Count"], prod_job["TaskGroups"][0]["Count"]) == (1, 2)
    assert names(await api.call("GET", "/v1/jobs"), "ID") == ["web"]
    assert names(await api.call("GET", "/v1/jobs?namespace=*"), "Namespace") == [
        "default", PROD]
    assert names(await api.call("GET", "/v1/jobs?namespace=nope"), "ID") == []

    prod_allocs = (await api.call("GET", "/v1/job/web/allocations?namespace=prod")).body
    assert len(prod_allocs) == 2 and {a["Namespace"] for a in prod_allocs} == {PROD}
    assert len((await api.call("GET", "/v1/job/web/allocations")).body) == 1
    assert len((await api.call("GET", "/v1/allocations?namespace=*")).body) == 3
    assert names(await api.call("GET", "/v1/allocations?namespace=prod"), "ID") == sorted(
        a["ID"] for a in prod_allocs)
    [prod_eval] = (await api.call("GET", "/v1/job/web/evaluations?namespace=prod")).body
    assert prod_eval["ID"] == prod.body["EvalID"] and prod_eval["Namespace"] == PROD
    read_eval = await api.call("GET", f"/v1/evaluation/{prod_eval['ID']}?namespace=prod")
    assert read_eval.body["Namespace"] == PROD

    stopped = await api.call("DELETE", "/v1/job/web?namespace=prod&purge=true")
    assert stopped.status == 200 and stopped.body["EvalID"]
    assert (await api.call("GET", "/v1/job/web?namespace=prod"))[:2] == (404, "job not found")
    assert (await api.call("GET", "/v1/job/web")).body["Stop"] is False


async def test_a_job_goes_to_the_namespace_its_request_names(api: Api) -> None:
    """Nomad's precedence: ?namespace=, then the body's Namespace, then the job's own."""
    for name in (PROD, "dev", "qa"):
        assert (await api.call("PUT", f"/v1/namespace/{name}", {})).status == 200
    cases = [("/v1/jobs?namespace=prod", {"Job": job(ID="a", Namespace="dev")}, PROD),
             ("/v1/jobs", {"Job": job(ID="b", Namespace="dev"), "Namespace": "qa"}, "qa"),
             ("/v1/jobs", {"Job": job(ID="c", Namespace="dev")}, "dev"),
             ("/v1/jobs", {"Job": job(ID="d")}, "default")]
    for path, body, namespace in cases:
        assert (await api.call("PUT", path, body)).status == 200, body
        job_id = body["Job"]["ID"]
        stored = api.server.job(job_id, namespace)
        assert stored is not None and stored["Namespace"] == namespace, job_id
    assert len(api.server.jobs()) == len(cases)


@pytest.mark.parametrize(("path", "body", "answer"), [
    ("/v1/jobs?namespace=nope", {"Job": job()}, 'job "web" is in nonexistent namespace "nope"'),
    ("/v1/jobs?namespace=prod", {"Job": job(driver="docker")},
     'used task driver "docker" is not allowed in namespace "prod"'),
    ("/v1/jobs?namespace=*", {"Job": job()}, "invalid namespace"),
    ("/v1/jobs", {"Job": job(), "Namespace": 7}, "Namespace must be a string"),
], ids=["nonexistent namespace", "refused driver", "wildcard", "namespace type"])
async def test_a_job_its_namespace_refuses_is_400(api: Api, path: str, body: Any,
                                                  answer: str) -> None:
    caps = NamespaceCapabilities(disabled_task_drivers=("docker",))
    await api.server.upsert_namespace(Namespace(name=PROD, capabilities=caps))
    status, text, _ = await api.call("PUT", path, body)
    assert status == 400 and answer in text, text
    assert api.server.jobs() == []


async def test_lists_of_every_namespace_keep_what_the_caller_may_see(acl_api: Api) -> None:
    api = acl_api
    for name in (PROD, "dev"):
        await api.server.upsert_namespace(Namespace(name=name))
        assert (await api.call("PUT", f"/v1/jobs?namespace={name}", {"Job": job()})).status \
            == 200
    assert (await api.call("PUT", "/v1/jobs", {"Job": job(ID="api")})).status == 200
    prod_only = await api.token_for('namespace "prod" { policy = "read" }')
    for route, key in (("/v1/jobs", "Namespace"), ("/v1/allocations", "Namespace")):
        everything = await api.call("GET", f"{route}?namespace=*")
        assert sorted(names(everything, key)) == ["default", "dev", PROD], route
        assert names(await api.call("GET", f"{route}?namespace=*", token=prod_only),
                     key) == [PROD], route
        assert (await api.call("GET", f"{route}?namespace=dev", token=prod_only))[:2] == DENIED
    assert (await api.call("GET", "/v1/job/web?namespace=prod", token=prod_only)).status == 200
    assert (await api.call("GET", "/v1/job/web", token=prod_only))[:2] == DENIED
    # Submitting into prod needs submit-job there; reading it is not enough.
    assert (await api.call("PUT", "/v1/jobs?namespace=prod", {"Job": job(ID="x")},
                           token=prod_only))[:2] == DENIED
    # A caller without the right is told nothing about a namespace that does not exist.
    assert (await api.call("PUT", "/v1/jobs?namespace=nope", {"Job": job(ID="x")},
                           token=prod_only))[:2] == DENIED
    assert api.server.job("x", PROD) is None
