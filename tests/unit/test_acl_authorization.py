"""Authorization with ACLs on, for every route we serve, over the TCP API and the Task API.

A real server and router, served on a real TCP port and a real task socket, with a local
client holding one allocation directory. Table-driven: every route against every kind of
caller (management, a client token per relevant policy, a client token whose policy does not
exist, workload identities with and without an attached policy, anonymous with and without
the ``anonymous`` policy), through both listeners. Then lists that filter, objects checked in
their own namespace, tokens that expire or are deleted, policies edited under a caller, and
resolution details (compiled once, unparseable rules fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.acl import PolicyError
from nomad_client.client.allocdir import AllocDir
from nomad_client.http.auth import Need
from nomad_client.jobspec import canonicalize_job
from nomad_client.server import acl_resolver
from nomad_client.server.acls import RoleLink
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import job_key
from nomad_client.structs.models import (
    TOKEN_CLIENT,
    ACLPolicy,
    ACLRole,
    ACLToken,
    Allocation,
    Evaluation,
    PolicyJobACL,
)
from nomad_client.structs.namespaces import Namespace
from tests.unit.factories import (
    OneAllocClient,
    ServedAPI,
    identity_token,
    job,
    make_alloc,
    make_server,
    node,
    seed,
    serve_api,
    wait_until,
)

WEB_ALLOC = "0a6f1b7e-3c2d-4e5f-8a9b-0c1d2e3f4a01"
OTHER_ALLOC = "0a6f1b7e-3c2d-4e5f-8a9b-0c1d2e3f4a02"
API_ALLOC = "0a6f1b7e-3c2d-4e5f-8a9b-0c1d2e3f4a03"
WEB_EVAL = "1b7e0a6f-3c2d-4e5f-8a9b-0c1d2e3f4a04"
API_EVAL = "1b7e0a6f-3c2d-4e5f-8a9b-0c1d2e3f4a05"
PROD = "prod"
ISSUER = "http://127.0.0.1:4646"
DENIED = (403, "Permission denied")
HCL_JOB = 'job "x" { group "g" { task "t" { driver = "raw_exec" } } }'
HELLO = "t/local/hello.txt"


def namespace_rules(*capabilities: str, namespace: str = "default") -> str:
    return f'namespace "{namespace}" {{ capabilities = {json.dumps(list(capabilities))} }}'


# One policy per grant a route may need; a client token holds exactly one of them.
NAMESPACE_CAPABILITIES = ("list-jobs", "read-job", "submit-job", "register-job", "parse-job",
                          "deregister-job", "purge-job", "read-fs", "read-logs")
POLICIES = {
    **{cap: namespace_rules(cap) for cap in NAMESPACE_CAPABILITIES},
    "node-read": 'node { policy = "read" }',
    "node-write": 'node { policy = "write" }',
    "agent-read": 'agent { policy = "read" }',
}
# Attached to job "web" by JobACL (and, in its test, held by anonymous): a coarse "read" of
# the default namespace and of the node, so the grants below.
READER_RULES = 'namespace "default" { policy = "read" }\nnode { policy = "read" }\n'
READER_GRANTS = frozenset({"list-jobs", "read-job", "parse-job", "node-read"})
EVERYTHING = None  # a caller's grants: management


def stored_job(job_id: str, namespace: str = "default") -> dict[str, Any]:
    return canonicalize_job(job(ID=job_id, Namespace=namespace)) | {"Version": 0, "Stop": False}


def alloc_of(alloc_id: str, job_id: str, namespace: str = "default") -> Allocation:
    return make_alloc(id=alloc_id, job_id=job_id, namespace=namespace, node_id="n1",
                      job={"ID": job_id, "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t"}]}]})


def evaluation(eval_id: str, job_id: str, namespace: str = "default") -> Evaluation:
    return Evaluation(id=eval_id, namespace=namespace, job_id=job_id, type="service",
                      triggered_by="job-register")


@attrs.define
class World:
    """The served API and the credentials a test sends."""

    server: Server
    api: ServedAPI
    tcp: aiohttp.ClientSession
    task: aiohttp.ClientSession
    management: str
    tokens: dict[str, str]  # policy name -> secret of a client token holding only it

    async def call(self, method: str, path: str, secret: str = "", *, task_api: bool = False,
                   body: Any = None) -> tuple[int, str]:
        session, base = (self.task, "http://localhost") if task_api else (self.tcp, self.api.url)
        headers = {"X-Nomad-Token": secret} if secret else {}
        async with session.request(method, base + path, headers=headers, json=body) as resp:
            return resp.status, await resp.text()

    def identity(self, alloc_id: str) -> str:
        alloc = self.server.allocation(alloc_id)
        assert alloc is not None
        return identity_token(self.server.keyring, alloc)

    async def token(self, *policies: str, roles: tuple[str, ...] = ()) -> ACLToken:
        return await self.server.acls.upsert_token(
            ACLToken(accessor_id="", secret_id="", name="t", type=TOKEN_CLIENT,
                     policies=policies),
            [RoleLink(id=role) for role in roles])

    async def policy(self, name: str, rules: str, job_id: str | None = None) -> None:
        attached = None if job_id is None else PolicyJobACL(namespace="default", job_id=job_id)
        await self.server.acls.upsert_policy(ACLPolicy(name=name, rules=rules,
                                                       job_acl=attached))

    async def reset(self) -> None:
        """Put back what a write route changed: the jobs, allocations and evaluations."""
        await self.server.store.write({
            "jobs": [(job_key("default", j), stored_job(j)) for j in ("web", "other")]
            + [(job_key(PROD, "api"), stored_job("api", PROD))],
            "allocs": [(a.id, a) for a in (alloc_of(WEB_ALLOC, "web"),
                                           alloc_of(OTHER_ALLOC, "other"),
                                           alloc_of(API_ALLOC, "api", PROD))],
            "evals": [(WEB_EVAL, evaluation(WEB_EVAL, "web")),
                      (API_EVAL, evaluation(API_EVAL, "api", PROD))],
            "nodes": [("n1", node("n1"))]})


@contextlib.asynccontextmanager
async def world(base: Path, keyring: Keyring, *, acl: bool = True,
                local_alloc: str = WEB_ALLOC) -> AsyncIterator[World]:
    """Jobs "web" and "other" in default, "api" in namespace prod, one running allocation
    each, an evaluation of web and of api; node n1; policy "reader" attached to job web; a client
    token per entry of ``POLICIES`` and one ("missing") whose policy does not exist. The
    local client holds the directory of ``local_alloc``, with a file and a log in task t."""
    signer = copy.copy(keyring)
    signer.issuer = ISSUER
    server = make_server(signer, acl=acl)
    adir = AllocDir(base / "alloc", local_alloc)
    adir.build()
    adir.build_task_dir("t", None)
    (adir.path / HELLO).write_text("hello\n")
    (adir.logs_dir / "t.stdout.0").write_text("logged\n")
    api = await serve_api(server, client=OneAllocClient(adir), task_sock=base / "api.sock")
    try:
        async with aiohttp.ClientSession() as tcp, aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(str(base / "api.sock"))) as task:
            management = await server.acls.bootstrap()
            await server.upsert_namespace(Namespace(name=PROD))
            w = World(server, api, tcp, task, management.secret_id, {})
            await w.reset()
            await w.policy("reader", READER_RULES, job_id="web")
            for name, rules in POLICIES.items():
                await w.policy(name, rules)
                w.tokens[name] = (await w.token(name)).secret_id
            w.tokens["missing"] = (await w.token("missing")).secret_id
            yield w
    finally:
        await api.close()


@pytest.fixture
async def acl_world(workdir: Path, keyring: Keyring) -> AsyncIterator[World]:
    async with world(workdir, keyring) as w:
        yield w


# ---- the table -------------------------------------------------------------------------
@attrs.frozen
class Route:
    method: str
    path: str
    grants: frozenset[str] | None  # the policies that allow it; None: open to any caller
    body: Any = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def needs(*policies: str) -> frozenset[str]:
    return frozenset(policies)


OPEN = None
READ_JOB = needs("read-job")
NODE_READ = needs("node-read", "node-write")
REGISTER_WEB = {"Job": job(ID="web")}
ROUTES = [
    Route("GET", "/v1/jobs", needs("list-jobs")),
    Route("PUT", "/v1/jobs", needs("submit-job", "register-job"), REGISTER_WEB),
    Route("POST", "/v1/job/web", needs("submit-job", "register-job"), REGISTER_WEB),
    Route("POST", "/v1/jobs/parse", needs("parse-job", "submit-job"), {"JobHCL": HCL_JOB}),
    Route("GET", "/v1/job/web", READ_JOB),
    Route("GET", "/v1/job/web/allocations", READ_JOB),
    Route("GET", "/v1/job/web/evaluations", READ_JOB),
    Route("DELETE", "/v1/job/web", needs("submit-job", "purge-job", "deregister-job")),
    Route("DELETE", "/v1/job/web?purge=true", needs("submit-job", "purge-job")),
    Route("GET", "/v1/allocations", READ_JOB),
    Route("GET", f"/v1/allocation/{WEB_ALLOC}", READ_JOB),
    Route("GET", f"/v1/evaluation/{WEB_EVAL}", READ_JOB),
    Route("GET", f"/v1/evaluation/{WEB_EVAL}/allocations", READ_JOB),
    Route("GET", "/v1/evaluations", READ_JOB),
    Route("GET", "/v1/job/web/summary", READ_JOB),
    Route("GET", "/v1/job/web/versions", READ_JOB),
    Route("POST", "/v1/job/web/evaluate", needs("submit-job", "evaluate-job")),
    Route("POST", "/v1/validate/job", READ_JOB, REGISTER_WEB),
    Route("POST", "/v1/job/web/plan", needs("submit-job"), REGISTER_WEB),
    Route("PUT", "/v1/system/gc", needs()),  # management only
    Route("GET", "/v1/agent/members", NODE_READ),
    Route("GET", "/v1/agent/servers", needs("agent-read")),
    Route("GET", "/v1/metrics", OPEN),
    Route("GET", "/v1/regions", OPEN),
    Route("GET", "/v1/status/peers", OPEN),
    Route("GET", f"/v1/client/fs/ls/{WEB_ALLOC}", needs("read-fs")),
    Route("GET", f"/v1/client/fs/stat/{WEB_ALLOC}?path={HELLO}", needs("read-fs")),
    Route("GET", f"/v1/client/fs/cat/{WEB_ALLOC}?path={HELLO}", needs("read-fs")),
    Route("GET", f"/v1/client/fs/logs/{WEB_ALLOC}?task=t&type=stdout&plain=true",
          needs("read-logs", "read-fs")),
    Route("GET", "/v1/client/metadata", NODE_READ),
    Route("POST", "/v1/client/metadata", needs("node-write"), {"Meta": {"k": "v"}}),
    Route("GET", "/v1/nodes", NODE_READ),
    Route("GET", "/v1/node/n1", NODE_READ),
    Route("GET", "/v1/node/n1/allocations", NODE_READ),
    Route("GET", "/v1/agent/self", needs("agent-read")),
    Route("GET", "/v1/agent/health", OPEN),
    Route("GET", "/v1/status/leader", OPEN),
    Route("GET", "/.well-known/jwks.json", OPEN),
    Route("GET", "/.well-known/openid-configuration", OPEN),
    Route("GET", "/v1/acl/policies", OPEN),  # filtered to what the caller holds
    Route("GET", "/v1/acl/tokens", needs()),  # management only
]


@attrs.frozen
class Caller:
    name: str
    grants: frozenset[str] | None  # EVERYTHING for management
    secret: Callable[[World], str]  # "" sends no token


def _token_holding(policy: str) -> Callable[[World], str]:
    return lambda w: w.tokens[policy]


CALLERS = [
    Caller("management", EVERYTHING, lambda w: w.management),
    *(Caller(f"client token holding {p}", needs(p), _token_holding(p)) for p in POLICIES),
    Caller("client token whose policy does not exist", needs(), _token_holding("missing")),
    Caller("workload identity, policy attached to its job", READER_GRANTS,
           lambda w: w.identity(WEB_ALLOC)),
    Caller("workload identity, the policy is another job's", needs(),
           lambda w: w.identity(OTHER_ALLOC)),
    Caller("anonymous, no anonymous policy", needs(), lambda w: ""),
]
ANONYMOUS_WITH_POLICY = Caller("anonymous, anonymous policy", READER_GRANTS, lambda w: "")


def expected(route: Route, caller: Caller) -> int:
    if caller.grants is EVERYTHING or route.grants is OPEN or route.grants & caller.grants:
        return 200
    return 403


async def outcome(w: World, route: Route, caller: Caller, task_api: bool) -> str | None:
    """None if ``caller`` gets what the table says on ``route``, else what went wrong."""
    await w.reset()
    secret = caller.secret(w)
    want = 401 if task_api and not secret else expected(route, caller)
    status, body = await w.call(route.method, route.path, secret, task_api=task_api,
                                body=route.body)
    if status == want and (want != 403 or body == DENIED[1]):
        return None
    where = "task API" if task_api else "TCP"
    return f"{route} as {caller.name} over the {where}: {status} {body[:80]!r}, want {want}"


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_every_route_for_every_kind_of_caller(acl_world: World, route: Route) -> None:
    wrong = [problem for caller in CALLERS for task_api in (False, True)
             if (problem := await outcome(acl_world, route, caller, task_api)) is not None]
    # The anonymous policy applies to tokenless TCP requests once it exists; never to the
    # Task API (401 there either way).
    await acl_world.policy("anonymous", READER_RULES)
    wrong += [problem for task_api in (False, True)
              if (problem := await outcome(acl_world, route, ANONYMOUS_WITH_POLICY,
                                           task_api)) is not None]
    assert not wrong, "\n".join(wrong)


# ---- lists and objects in other namespaces -----------------------------------------------
def ids(body: str, key: str = "ID") -> list[str]:
    return sorted(item[key] for item in json.loads(body))


async def test_lists_keep_only_what_the_caller_may_see(acl_world: World) -> None:
    w = acl_world
    await w.policy("list-anywhere", namespace_rules("list-jobs", namespace="*"))
    await w.policy("both-namespaces", namespace_rules("read-job")
                   + namespace_rules("read-job", namespace=PROD))
    anywhere, both = (await w.token("list-anywhere")).secret_id, \
        (await w.token("both-namespaces", "node-read")).secret_id
    lister, reader = w.tokens["list-jobs"], w.tokens["read-job"]
    default_only = (await w.token("read-job", "node-read")).secret_id

    # A list reads the namespace the request names (default: default); "*" reads them all.
    for path, anywhere_sees in (("/v1/jobs", ["other", "web"]),
                                ("/v1/jobs?namespace=*", ["api", "other", "web"]),
                                ("/v1/jobs?namespace=prod", ["api"])):
        status, body = await w.call("GET", path, anywhere)
        assert (status, ids(body)) == (200, anywhere_sees), path
    for path in ("/v1/jobs", "/v1/jobs?namespace=*"):
        status, body = await w.call("GET", path, lister)
        assert (status, ids(body)) == (200, ["other", "web"]), path
    assert await w.call("GET", "/v1/jobs?namespace=prod", lister) == DENIED
    # "*" is refused only when no rule grants the capability anywhere.
    assert await w.call("GET", "/v1/jobs?namespace=*", reader) == DENIED
    status, body = await w.call("GET", "/v1/jobs?namespace=*", w.identity(OTHER_ALLOC))
    assert (status, body) == DENIED  # a workload identity holding nothing

    for path in ("/v1/allocations?namespace=*", "/v1/node/n1/allocations"):
        status, body = await w.call("GET", path, default_only)
        assert (status, ids(body)) == (200, [WEB_ALLOC, OTHER_ALLOC]), path
        status, body = await w.call("GET", path, both)
        assert (status, ids(body)) == (200, [WEB_ALLOC, OTHER_ALLOC, API_ALLOC]), path
    status, body = await w.call("GET", "/v1/allocations", both)
    assert (status, ids(body)) == (200, [WEB_ALLOC, OTHER_ALLOC])
    status, body = await w.call("GET", "/v1/allocations?namespace=prod", both)
    assert (status, ids(body)) == (200, [API_ALLOC])
    # The node's allocations need only node read; without read-job none of them shows.
    assert await w.call("GET", "/v1/node/n1/allocations", w.tokens["node-read"]) == (200, "[]")

    # Evaluations: "*" lists those of the namespaces the caller may read, and no others.
    status, body = await w.call("GET", "/v1/evaluations?namespace=*", default_only)
    assert (status, ids(body)) == (200, [WEB_EVAL])
    status, body = await w.call("GET", "/v1/evaluations?namespace=*", both)
    assert (status, ids(body)) == (200, sorted([WEB_EVAL, API_EVAL]))
    assert await w.call("GET", "/v1/evaluations?namespace=prod", default_only) == DENIED


async def test_objects_are_checked_in_their_own_namespace(acl_world: World) -> None:
    w = acl_world
    await w.policy("prod-reader", namespace_rules("read-job", namespace=PROD))
    default_reader, prod_reader = w.tokens["read-job"], (await w.token("prod-reader")).secret_id
    # Found by their own ID: allowed in the namespace the request names, refused in the
    # object's own.
    for path in (f"/v1/allocation/{API_ALLOC}", f"/v1/evaluation/{API_EVAL}"):
        assert await w.call("GET", path, default_reader) == DENIED, path
        assert await w.call("GET", path + "?namespace=prod", default_reader) == DENIED, path
        assert (await w.call("GET", path + "?namespace=prod", prod_reader))[0] == 200, path
        assert await w.call("GET", path, prod_reader) == DENIED, path  # asks about default
        assert (await w.call("GET", path + "?namespace=*", prod_reader))[0] == 200, path
    # A job is found by its ID in the namespace the request names, so only there.
    for path, in_prod in (("/v1/job/api", '"ID":"api"'),
                          ("/v1/job/api/allocations", API_ALLOC),
                          ("/v1/job/api/evaluations", API_EVAL)):
        assert await w.call("GET", path + "?namespace=prod", default_reader) == DENIED, path
        status, body = await w.call("GET", path + "?namespace=prod", prod_reader)
        assert status == 200 and in_prod in body, path
        assert await w.call("GET", path, prod_reader) == DENIED, path  # asks about default
        for elsewhere in ("", "?namespace=*"):  # default (or "*") holds no job "api"
            status, body = await w.call("GET", path + elsewhere, w.management)
            assert (status, body) in ((404, "job not found"), (200, "[]")), path
            assert in_prod not in body, path

    submitter = w.tokens["submit-job"]
    assert await w.call("DELETE", "/v1/job/api?namespace=prod", submitter) == DENIED
    for planted in (job(ID="api", Namespace=PROD), job(ID="new", Namespace=PROD)):
        # a job of prod, new or not
        assert await w.call("PUT", "/v1/jobs", submitter, body={"Job": planted}) == DENIED
    assert w.server.job("new", PROD) is None
    # Job "api" of default is another job than prod's: replacing it leaves prod's alone.
    assert (await w.call("DELETE", "/v1/job/api", submitter))[0] == 200
    status, _ = await w.call("PUT", "/v1/jobs", submitter, body={"Job": job(ID="api")})
    assert status == 200 and w.server.job("api")["Namespace"] == "default"
    prods = w.server.job("api", PROD)
    assert prods is not None and not prods["Stop"] and prods["Namespace"] == PROD
    status, body = await w.call("PUT", "/v1/jobs", submitter,
                                body={"Job": job(ID="web", Namespace="*")})
    assert status == 400 and body.startswith("invalid namespace"), body
    # A job naming no namespace takes the request's.
    status, _ = await w.call("PUT", "/v1/jobs?namespace=prod", submitter,
                             body={"Job": job(ID="fresh")})
    assert status == 403
    await w.policy("prod-submit", namespace_rules("submit-job", namespace=PROD))
    prod_submitter = (await w.token("prod-submit")).secret_id
    status, body = await w.call("PUT", "/v1/jobs?namespace=prod", prod_submitter,
                                body={"Job": job(ID="fresh")})
    assert status == 200, body
    assert w.server.job("fresh", PROD)["Namespace"] == PROD
    assert w.server.job("fresh") is None


@pytest.mark.parametrize("local_alloc", [API_ALLOC, "0a6f1b7e-3c2d-4e5f-8a9b-0c1d2e3f4aff"],
                         ids=["prod allocation", "allocation the server does not know"])
async def test_fs_is_checked_in_the_allocations_namespace(workdir: Path, keyring: Keyring,
                                                          local_alloc: str) -> None:
    async with world(workdir, keyring, local_alloc=local_alloc) as w:
        await w.policy("prod-fs", namespace_rules("read-fs", namespace=PROD))
        prod_fs = (await w.token("prod-fs")).secret_id
        for kind, query in (("ls", "path=/"), ("stat", f"path={HELLO}"),
                            ("cat", f"path={HELLO}"), ("logs", "task=t&type=stdout")):
            path = f"/v1/client/fs/{kind}/{local_alloc}?{query}"
            assert (await w.call("GET", path, w.management))[0] == 200, kind
            assert await w.call("GET", path, w.tokens["read-fs"]) == DENIED, kind
            status, _ = await w.call("GET", path + "&namespace=prod", prod_fs)
            assert status == (200 if local_alloc == API_ALLOC else 403), kind


# ---- credentials that change under a caller ------------------------------------------------
async def test_expired_and_deleted_tokens_are_refused_on_their_next_request(
        acl_world: World) -> None:
    w = acl_world
    expiring = ACLToken(accessor_id="7c1f0e52-0000-4000-8000-000000000001",
                        secret_id="7c1f0e52-0000-4000-8000-000000000002", name="short",
                        type=TOKEN_CLIENT, policies=("node-read",),
                        expiration_time=int((time.time() + 1) * 1e9))
    await seed(w.server, tokens=(expiring,))
    deleted = await w.token("node-read")
    refusals = {False: (403, "ACL token not found"), True: (403, "Forbidden")}
    for task_api in refusals:
        for secret in (expiring.secret_id, deleted.secret_id):
            assert (await w.call("GET", "/v1/nodes", secret, task_api=task_api))[0] == 200

    await w.server.acls.delete_token(deleted.accessor_id)
    for task_api, refused in refusals.items():
        assert await w.call("GET", "/v1/nodes", deleted.secret_id, task_api=task_api) == refused

    async def expired() -> bool:
        return (await w.call("GET", "/v1/nodes", expiring.secret_id))[0] != 200
    await wait_until(expired, "the token to expire")
    for task_api, refused in refusals.items():
        assert await w.call("GET", "/v1/nodes", expiring.secret_id,
                            task_api=task_api) == refused


async def test_a_policy_edit_takes_effect_on_the_next_request(acl_world: World) -> None:
    w = acl_world
    await w.policy("editable", POLICIES["node-read"])
    role = await w.server.acls.upsert_role(ACLRole(id="", name="ops", policies=("editable",)))
    direct = (await w.token("editable")).secret_id
    by_role = (await w.token("missing", roles=(role.id,))).secret_id
    workload = w.identity(WEB_ALLOC)
    callers = {"token": direct, "role": by_role}
    for name, secret in callers.items():
        assert (got := await w.call("GET", "/v1/nodes", secret))[0] == 200, (name, got)

    await w.policy("editable", POLICIES["agent-read"])  # node read taken away
    for name, secret in callers.items():
        assert await w.call("GET", "/v1/nodes", secret) == DENIED, name
        assert (await w.call("GET", "/v1/agent/self", secret))[0] == 200, name
    await w.server.acls.delete_role(role.id)
    assert await w.call("GET", "/v1/agent/self", by_role) == DENIED

    # A workload's policies are remembered per workload: an edit still shows at once...
    assert (await w.call("GET", "/v1/jobs", workload, task_api=True))[0] == 200
    await w.policy("reader", POLICIES["node-read"], job_id="web")
    assert await w.call("GET", "/v1/jobs", workload, task_api=True) == DENIED
    assert (await w.call("GET", "/v1/nodes", workload, task_api=True))[0] == 200
    # ... and so do a new attachment and a deleted policy.
    await w.policy("more", POLICIES["agent-read"], job_id="web")
    assert (await w.call("GET", "/v1/agent/self", workload, task_api=True))[0] == 200
    await w.server.acls.delete_policy("more")
    assert await w.call("GET", "/v1/agent/self", workload, task_api=True) == DENIED


async def test_a_workload_identity_without_a_policy_holds_nothing(acl_world: World) -> None:
    # CVE-2023-1299: an identity with no policy must never be taken for management.
    w = acl_world
    workload = w.identity(OTHER_ALLOC)
    assert await w.call("GET", "/v1/acl/policy/self", workload, task_api=True) == (200, "null")
    for method, path, body in (
            ("PUT", "/v1/jobs", {"Job": job(ID="planted")}),
            ("POST", "/v1/job/other", {"Job": job(ID="other")}),
            ("GET", "/v1/jobs", None), ("GET", "/v1/job/other", None),
            ("GET", "/v1/job/web", None), ("GET", f"/v1/allocation/{OTHER_ALLOC}", None),
            ("POST", "/v1/client/metadata", {"Meta": {"planted": "yes"}}),
            ("GET", "/v1/acl/tokens", None)):
        for task_api in (False, True):
            got = await w.call(method, path, workload, task_api=task_api, body=body)
            assert got == DENIED, (method, path, task_api, got)
    assert w.server.job("planted") is None


async def test_with_acls_disabled_every_caller_may_do_everything(workdir: Path,
                                                                 keyring: Keyring) -> None:
    async with world(workdir, keyring, acl=False) as w:
        workload = w.identity(OTHER_ALLOC)
        for method, path, body in (("POST", "/v1/client/metadata", {"Meta": {"k": "v"}}),
                                   ("GET", "/v1/agent/self", None),
                                   ("GET", f"/v1/client/fs/ls/{WEB_ALLOC}", None),
                                   ("PUT", "/v1/jobs", {"Job": job(ID="new")})):
            assert (await w.call(method, path, body=body))[0] == 200, path
            got = await w.call(method, path, workload, task_api=True, body=body)
            assert got[0] == 200, (path, got)
        # The Task API still wants a credential.
        assert await w.call("GET", "/v1/agent/self", task_api=True) == (401, "Unauthorized")


# ---- resolution ------------------------------------------------------------------------------
async def test_policies_are_compiled_once_however_many_requests_wait(
        acl_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real_parse = acl_resolver.parse_policy

    def counting(rules: str, *, strict: bool) -> Any:
        parsed.append(rules)
        return real_parse(rules, strict=strict)

    monkeypatch.setattr(acl_resolver, "parse_policy", counting)
    w = acl_world
    await w.policy("fresh", POLICIES["node-read"] + "\n# new")
    secret = (await w.token("fresh")).secret_id
    answers = await asyncio.gather(*(w.call("GET", "/v1/nodes", secret) for _ in range(20)))
    assert [status for status, _ in answers] == [200] * 20
    assert len(parsed) == 1


async def test_rules_that_cannot_be_parsed_fail_closed(acl_world: World) -> None:
    w = acl_world
    # Stored without validation (as an older state file might hold it).
    await w.server.store.write({"acl_policies": [("broken", ACLPolicy(
        name="broken", rules='namespace "default" {', job_acl=PolicyJobACL(
            namespace="default", job_id="web")))]})
    with pytest.raises(PolicyError):
        acl_resolver.parse_policy('namespace "default" {', strict=False)
    holder = (await w.token("broken", "node-read")).secret_id
    # Every policy of the identity is void, not just the broken one (it could hold a deny).
    assert await w.call("GET", "/v1/nodes", holder) == DENIED
    assert await w.call("GET", "/v1/jobs", w.identity(WEB_ALLOC), task_api=True) == DENIED


def test_route_needs_name_real_capabilities() -> None:
    assert Need.namespace("read-job", "read-fs").name == "namespace:read-job|read-fs"
    for bad in ((), ("read-jobs",), ("read-job", "node")):
        with pytest.raises(ValueError, match="not namespace capabilities"):
            Need.namespace(*bad)
