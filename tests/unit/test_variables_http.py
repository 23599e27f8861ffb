"""/v1/vars and /v1/var/:path through the real router on a real socket: Nomad's shapes and
codes, check-and-set and locks over HTTP, and who may see which variable (a workload identity
reads and lists exactly its four implicit paths, and nothing of another job)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from tests.unit.factories import (
    SEALER,
    HttpAnswer,
    call_http,
    identity_token,
    make_alloc,
    seed,
    serve_api,
)


@attrs.define
class VarAPI:
    server: Server
    url: str
    session: aiohttp.ClientSession
    token: str = ""

    async def call(self, method: str, path: str, body: Any = None, *,
                   token: str | None = None) -> HttpAnswer:
        return await call_http(self.session, self.url, method, path, body,
                               token=self.token if token is None else token)


@contextlib.asynccontextmanager
async def serving(keyring: Keyring, *, acl: bool) -> AsyncIterator[VarAPI]:
    server = Server(StateStore(), keyring, region="global", acl_enabled=acl, sealer=SEALER)
    api = await serve_api(server)
    try:
        async with aiohttp.ClientSession() as session:
            yield VarAPI(server, api.url, session)
    finally:
        await api.close()
        await server.close()


@pytest.fixture
async def open_api(keyring: Keyring) -> AsyncIterator[VarAPI]:
    async with serving(keyring, acl=False) as api:
        yield api


@pytest.fixture
async def acl_api(keyring: Keyring) -> AsyncIterator[VarAPI]:
    async with serving(keyring, acl=True) as api:
        boot = await api.call("POST", "/v1/acl/bootstrap")
        api.token = boot.body["SecretID"]
        yield api


async def test_put_get_list_delete_shapes(open_api: VarAPI) -> None:
    put = await open_api.call("PUT", "/v1/var/app/db", {"Items": {"user": "admin"}})
    assert put.status == 200
    assert set(put.body) == {"Namespace", "Path", "CreateIndex", "CreateTime", "ModifyIndex",
                             "ModifyTime", "Items"}
    assert put.body["Items"] == {"user": "admin"} and put.body["Path"] == "app/db"
    assert put.headers["X-Nomad-Index"] == str(put.body["ModifyIndex"])
    got = await open_api.call("GET", "/v1/var/app/db")
    assert got.status == 200 and got.body == put.body
    listed = await open_api.call("GET", "/v1/vars")
    assert listed.status == 200
    assert listed.body == [{k: v for k, v in put.body.items() if k != "Items"}]
    deleted = await open_api.call("DELETE", "/v1/var/app/db")
    assert (deleted.status, deleted.body) == (204, "")
    assert int(deleted.headers["X-Nomad-Index"]) > put.body["ModifyIndex"]
    missing = await open_api.call("GET", "/v1/var/app/db")
    assert (missing.status, missing.body) == (404, "variable not found")
    assert (await open_api.call("DELETE", "/v1/var/app/db")).status == 204


async def test_bad_input_is_400_with_nomad_texts(open_api: VarAPI) -> None:
    cases = [
        ("PUT", "/v1/var/a", {"Items": {}}, "variable missing required Items object"),
        ("PUT", "/v1/var/a", {}, "variable missing required Items object"),
        ("PUT", "/v1/var/a%20b", {"Items": {"k": "v"}}, 'RPC Error:: 400,invalid path "a b"'),
        ("PUT", "/v1/var/a", {"Items": {"k": 1}}, None),
        ("PUT", "/v1/var/a", {"Items": {"k": "v" * 65537}},
         "RPC Error:: 400,variables are limited to 64KiB in total size"),
        ("PUT", "/v1/var/a?namespace=*", {"Items": {"k": "v"}},
         'RPC Error:: 400,can not target wildcard ("*")namespace'),
        ("PUT", "/v1/var/a?cas=x", {"Items": {"k": "v"}}, None),
        ("PUT", "/v1/var/a?lock-acquire&lock-renew", {}, "multiple lock operations"),
        ("PUT", "/v1/var/a?lock-acquire&cas=1", {}, "CAS can't be used with lock operations"),
        ("PUT", "/v1/var/a", {"Items": {"k": "v"}, "Lock": {"TTL": "15s"}},
         "RPC Error:: 400,variable should not contain lock definition"),
        ("PATCH", "/v1/var/a", None, "Invalid method"),
        ("GET", "/v1/var/", None, "missing variable path"),
        ("GET", "/v1/vars?per_page=x", None,
         "Expect a number for `per_page` query string parameter"),
        ("GET", "/v1/vars?filter=Path%20%3D%3D", None, None),
    ]
    for method, path, body, text in cases:
        answer = await open_api.call(method, path, body)
        assert answer.status == 400, (path, answer)
        if text is not None:
            assert answer.body == text, (path, answer)
    assert (await open_api.call("GET", "/v1/vars")).body == []
    assert (await open_api.call("PUT", "/v1/vars")).status == 405


async def test_cas_conflict_is_409_with_the_current_variable(open_api: VarAPI) -> None:
    absent = await open_api.call("PUT", "/v1/var/a?cas=7", {"Items": {"k": "1"}})
    assert absent.status == 409
    assert absent.body == {"Namespace": "default", "Path": "a", "CreateIndex": 0,
                           "CreateTime": 0, "ModifyIndex": 0, "ModifyTime": 0}
    created = (await open_api.call("PUT", "/v1/var/a?cas=0", {"Items": {"k": "1"}})).body
    conflict = await open_api.call("PUT", "/v1/var/a?cas=0", {"Items": {"k": "2"}})
    assert (conflict.status, conflict.body) == (409, created)
    assert conflict.headers["X-Nomad-Index"] == str(created["ModifyIndex"])
    assert (await open_api.call("GET", "/v1/var/a")).body == created
    again = await open_api.call("DELETE", f"/v1/var/a?cas={created['ModifyIndex'] + 1}")
    assert again.status == 409
    ok = await open_api.call("PUT", f"/v1/var/a?cas={created['ModifyIndex']}",
                             {"Items": {"k": "2"}})
    assert ok.status == 200 and ok.body["Items"] == {"k": "2"}


async def test_locks_over_http(open_api: VarAPI) -> None:
    acquired = await open_api.call("PUT", "/v1/var/l?lock-acquire",
                                   {"Items": {"k": "v"}, "Lock": {"TTL": "30s"}})
    assert acquired.status == 200
    lock = acquired.body["Lock"]
    assert lock["TTL"] == "30s" and lock["LockDelay"] == "15s" and lock["ID"]
    blocked = await open_api.call("PUT", "/v1/var/l", {"Items": {"k": "x"}})
    assert blocked.status == 409 and "Items" not in blocked.body
    assert (await open_api.call("DELETE", "/v1/var/l")).status == 409
    other = await open_api.call("PUT", "/v1/var/l?lock-acquire", {})
    assert other.status == 409
    renewed = await open_api.call("PUT", "/v1/var/l?lock-renew", {"Lock": {"ID": lock["ID"]}})
    assert renewed.status == 200 and renewed.body["Lock"] == lock
    assert "X-Nomad-Index" not in renewed.headers
    wrong = await open_api.call("PUT", "/v1/var/l?lock-renew", {"Lock": {"ID": "nope"}})
    assert (wrong.status, wrong.body) == (409, "attempting to modify locked variable")
    items = await open_api.call("PUT", "/v1/var/l?lock-release",
                                {"Items": {}, "Lock": {"ID": lock["ID"]}})
    assert (items.status, items.body) == (400,
                                          "lock release operation doesn't take variable items")
    no_info = await open_api.call("PUT", "/v1/var/l?lock-release", {})
    assert (no_info.status, no_info.body) == (400, "missing lock information")
    released = await open_api.call("PUT", "/v1/var/l?lock-release", {"Lock": {"ID": lock["ID"]}})
    assert released.status == 200 and "Lock" not in released.body
    assert (await open_api.call("GET", "/v1/var/l")).body["Items"] == {"k": "v"}
    assert (await open_api.call("PUT", "/v1/var/l", {"Items": {"k": "x"}})).status == 200


async def test_blocking_get_wakes_on_change(open_api: VarAPI) -> None:
    created = (await open_api.call("PUT", "/v1/var/a", {"Items": {"k": "1"}})).body
    index = created["ModifyIndex"]
    waiter = asyncio.create_task(open_api.call("GET", f"/v1/var/a?index={index}&wait=10s"))
    listing = asyncio.create_task(open_api.call("GET", f"/v1/vars?index={index}&wait=10s"))
    await asyncio.sleep(0.05)
    assert not waiter.done() and not listing.done()
    await open_api.call("PUT", "/v1/var/a", {"Items": {"k": "2"}})
    got, listed = await asyncio.wait_for(asyncio.gather(waiter, listing), 5)
    assert got.body["Items"] == {"k": "2"}
    assert int(listed.headers["X-Nomad-Index"]) > index


async def test_list_prefix_namespace_filter_and_pages(open_api: VarAPI) -> None:
    for ns, path in (("default", "a/1"), ("default", "a/2"), ("default", "b"), ("prod", "a/3")):
        assert (await open_api.call("PUT", f"/v1/var/{path}?namespace={ns}",
                                    {"Items": {"k": "v"}})).status == 200

    async def paths(query: str) -> list[str]:
        answer = await open_api.call("GET", f"/v1/vars{query}")
        assert answer.status == 200, answer
        return [f"{m['Namespace']}:{m['Path']}" for m in answer.body]

    assert await paths("?prefix=a/") == ["default:a/1", "default:a/2"]
    assert await paths("?namespace=*") == ["default:a/1", "default:a/2", "default:b",
                                           "prod:a/3"]
    assert await paths('?namespace=*&filter=Path%20matches%20"3"') == ["prod:a/3"]
    first = await open_api.call("GET", "/v1/vars?namespace=*&per_page=3")
    assert len(first.body) == 3 and first.headers["X-Nomad-NextToken"] == "prod.a/3"
    assert await paths("?namespace=*&per_page=3&next_token=prod.a/3") == ["prod:a/3"]


# ---- authorization --------------------------------------------------------------------------
IMPLICIT = ("nomad/jobs", "nomad/jobs/j", "nomad/jobs/j/g", "nomad/jobs/j/g/t")
NOT_IMPLICIT = ("nomad/jobs/j/g/t/x", "nomad/jobs/other", "nomad/jobs/other/g",
                "nomad/jobs/jx", "app/db")


async def _workload(api: VarAPI, keyring: Keyring) -> str:
    alloc = make_alloc()
    await seed(api.server, allocs=(alloc,))
    return identity_token(keyring, alloc)


async def test_workload_identity_reads_and_lists_exactly_its_four_paths(
        acl_api: VarAPI, keyring: Keyring) -> None:
    for path in (*IMPLICIT, *NOT_IMPLICIT):
        assert (await acl_api.call("PUT", f"/v1/var/{path}", {"Items": {"k": path}})
                ).status == 200
    await acl_api.call("PUT", "/v1/var/nomad/jobs/j?namespace=other", {"Items": {"k": "v"}})
    wid = await _workload(acl_api, keyring)
    for path in IMPLICIT:
        got = await acl_api.call("GET", f"/v1/var/{path}", token=wid)
        assert got.status == 200 and got.body["Items"] == {"k": path}
        assert "Lock" not in got.body
    for path in NOT_IMPLICIT:
        refused = await acl_api.call("GET", f"/v1/var/{path}", token=wid)
        assert (refused.status, refused.body) == (403, "Permission denied"), path
    assert (await acl_api.call("GET", "/v1/var/nomad/jobs/j?namespace=other",
                               token=wid)).status == 403
    listed = await acl_api.call("GET", "/v1/vars?namespace=*", token=wid)
    assert listed.status == 200
    assert [(m["Namespace"], m["Path"]) for m in listed.body] == [
        ("default", p) for p in sorted(IMPLICIT)]
    # Never a write, a delete or a lock, not even on its own paths.
    for method, query in (("PUT", ""), ("DELETE", ""), ("PUT", "?lock-acquire")):
        answer = await acl_api.call(method, f"/v1/var/nomad/jobs/j{query}",
                                    {"Items": {"k": "x"}}, token=wid)
        assert answer.status == 403, (method, query)
    # A missing variable on another job's path is 403 too: permission comes first.
    assert (await acl_api.call("GET", "/v1/var/nomad/jobs/other/nope",
                               token=wid)).status == 403


async def test_an_exact_policy_rule_overrides_the_implicit_grant(acl_api: VarAPI,
                                                                 keyring: Keyring) -> None:
    rules = ('namespace "default" {\n  variables {\n    path "nomad/jobs/j" '
             '{ capabilities = ["deny"] }\n    path "app/*" { capabilities = ["read", "list", '
             '"write"] }\n  }\n}\n')
    assert (await acl_api.call("PUT", "/v1/acl/policy/vars",
                               {"Name": "vars", "Rules": rules,
                                "JobACL": {"Namespace": "default", "JobID": "j"}})
            ).status == 200
    for path in ("nomad/jobs/j", "nomad/jobs/j/g", "app/db"):
        await acl_api.call("PUT", f"/v1/var/{path}", {"Items": {"k": "v"}})
    wid = await _workload(acl_api, keyring)
    assert (await acl_api.call("GET", "/v1/var/nomad/jobs/j", token=wid)).status == 403
    assert (await acl_api.call("GET", "/v1/var/nomad/jobs/j/g", token=wid)).status == 200
    assert (await acl_api.call("PUT", "/v1/var/app/new", {"Items": {"k": "v"}},
                               token=wid)).status == 200
    listed = await acl_api.call("GET", "/v1/vars", token=wid)
    assert [m["Path"] for m in listed.body] == ["app/db", "app/new", "nomad/jobs/j/g"]


async def test_tokens_need_variables_rules_not_namespace_policy(acl_api: VarAPI) -> None:
    await acl_api.call("PUT", "/v1/acl/policy/ns", {
        "Name": "ns", "Rules": 'namespace "default" {\n  policy = "write"\n}\n'})
    await acl_api.call("PUT", "/v1/acl/policy/reader", {
        "Name": "reader", "Rules": 'namespace "default" {\n  variables {\n    path "app/*" '
                                   '{ capabilities = ["list"] }\n  }\n}\n'})
    writer = (await acl_api.call("POST", "/v1/acl/token",
                                 {"Type": "client", "Policies": ["ns"]})).body["SecretID"]
    lister = (await acl_api.call("POST", "/v1/acl/token",
                                 {"Type": "client", "Policies": ["reader"]})).body["SecretID"]
    await acl_api.call("PUT", "/v1/var/app/db", {"Items": {"k": "v"}})
    await acl_api.call("PUT", "/v1/var/other", {"Items": {"k": "v"}})
    assert (await acl_api.call("GET", "/v1/var/app/db", token=writer)).status == 403
    assert (await acl_api.call("PUT", "/v1/var/app/db", {"Items": {"k": "v"}},
                               token=writer)).status == 403
    assert (await acl_api.call("DELETE", "/v1/var/app/db", token=writer)).status == 403
    assert (await acl_api.call("GET", "/v1/vars", token=writer)).body == []
    assert [m["Path"] for m in (await acl_api.call("GET", "/v1/vars", token=lister)).body] \
        == ["app/db"]
    assert (await acl_api.call("GET", "/v1/var/app/db", token=lister)).status == 403


async def test_lock_id_is_shown_only_to_its_holder_and_management(acl_api: VarAPI) -> None:
    await acl_api.call("PUT", "/v1/acl/policy/rw", {
        "Name": "rw", "Rules": 'namespace "default" {\n  variables {\n    path "l" '
                               '{ capabilities = ["read", "list", "write"] }\n  }\n}\n'})
    user = (await acl_api.call("POST", "/v1/acl/token",
                               {"Type": "client", "Policies": ["rw"]})).body["SecretID"]
    acquired = await acl_api.call("PUT", "/v1/var/l?lock-acquire", {"Items": {"k": "v"}},
                                  token=user)
    assert acquired.status == 200 and acquired.body["Lock"]["ID"]
    got = await acl_api.call("GET", "/v1/var/l", token=user)
    assert "Lock" not in got.body
    listed = await acl_api.call("GET", "/v1/vars", token=user)
    assert "Lock" not in listed.body[0]
    conflict = await acl_api.call("PUT", f"/v1/var/l?cas={got.body['ModifyIndex'] + 5}",
                                  {"Items": {"k": "v"}}, token=user)
    assert conflict.status == 409 and "Lock" not in conflict.body
    management = await acl_api.call("GET", "/v1/var/l")
    assert management.body["Lock"] == acquired.body["Lock"]


async def test_acls_off_allows_everything(open_api: VarAPI, workdir: Path) -> None:
    assert (await open_api.call("PUT", "/v1/var/nomad/jobs/x/y/z/w",
                                {"Items": {"k": "v"}})).status == 200
    got = await open_api.call("GET", "/v1/var/nomad/jobs/x/y/z/w")
    assert got.status == 200
