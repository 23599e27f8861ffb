"""Hostile input on the list and job routes: every bad query parameter or body is a 4xx with
a plain-text reason, never a 500 (and never a traceback in the answer)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nomad_client.jobspec import canonicalize_job
from nomad_client.server.keyring import Keyring
from tests.unit.factories import call_http
from tests.unit.launching import batch_job, served
from tests.unit.test_namespace_endpoints import Api

# More digits than Python's int() will read from a string.
HUGE = "9" * 5000
HOSTILE_QUERIES = [
    "per_page=-5", f"per_page={HUGE}", "per_page=1e3", "next_token=%C2%B2.x",
    f"next_token={HUGE}.x", "next_token=18446744073709551616.x", "next_token=%FF%FE",
    "filter=%FF", "filter=((((", "filter=ID%20matches%20%22(%22", "reverse=maybe",
    f"index={HUGE}", "wait=forever", "version=-1", f"version={HUGE}", "version=%C2%B2",
    "version=1.5", "version=18446744073709551616", "namespace=%FF", "prefix=%FF",
    "region=%FF", "job=%FF", "status=x", "meta=maybe", "resources=maybe",
    "task_states=maybe", "format=%FF", "node_id=%FF", "cas=%D9%A1",
    "namespace=*&per_page=1&next_token=zz"]
LIST_AND_READ_ROUTES = [
    "/v1/evaluations", "/v1/evaluation/x", "/v1/evaluation/x/allocations", "/v1/jobs",
    "/v1/job/web", "/v1/allocations", "/v1/namespaces", "/v1/vars", "/v1/var/app",
    "/v1/acl/policies", "/v1/acl/tokens", "/v1/acl/roles", "/v1/scaling/policies",
    "/v1/services", "/v1/metrics", "/v1/agent/members", "/v1/agent/servers", "/v1/regions",
    "/v1/status/peers", "/v1/status/leader", "/v1/client/gc"]
HOSTILE_BODIES = [
    b"", b"null", b"[]", b"1", b'"s"', b"\xff\xfe", b"{", b'{"Job": 1}', b'{"Job": []}',
    b'{"Job": {"ID": 1}}', b'{"Job": {"ID": "web"}, "Diff": "yes"}',
    b'{"Job": {"ID": "web"}, "EnforceIndex": 1}',
    b'{"Job": {"ID": "web"}, "JobModifyIndex": -1}',
    b'{"Job": {"ID": "web"}, "JobModifyIndex": 1e400}',
    b'{"Job": {"ID": "web"}, "Submission": {"Source": 5}}',
    b'{"Job": {"ID": "web"}, "Submission": []}', b'{"Job": {"ID": "web"}, "Namespace": 5}',
    b'{"Job": {"ID": "web", "Namespace": ["x"]}}', b'{"Job": {"ID": "web"}, "PolicyOverride": 1}',
    b'{"Job": {"ID": "web\\u0000"}}', b'{"Job": {"ID": "web", "TaskGroups": 5}}',
    b'{"Job": {"ID": "web", "TaskGroups": [5]}}']
WRITE_ROUTES = [("PUT", "/v1/jobs"), ("POST", "/v1/job/web"), ("PUT", "/v1/job/web/plan"),
                ("PUT", "/v1/system/gc"), ("PUT", "/v1/client/gc")]


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring, acl=True) as api:
        await api.server.register_job(canonicalize_job(batch_job("web")))
        yield api


def _plain_refusal(status: int, body: object) -> bool:
    return status < 500 and "Traceback" not in str(body)


@pytest.mark.parametrize("path", LIST_AND_READ_ROUTES)
async def test_hostile_query_parameters_are_never_a_500(api: Api, path: str) -> None:
    failures = []
    for query in HOSTILE_QUERIES:
        answer = await api.call("GET", f"{path}?{query}")
        if not _plain_refusal(answer.status, answer.body):
            failures.append((query[:40], answer.status, str(answer.body)[:120]))
    assert not failures


@pytest.mark.parametrize(("method", "path"), WRITE_ROUTES)
async def test_hostile_bodies_are_never_a_500(api: Api, method: str, path: str) -> None:
    failures = []
    for body in HOSTILE_BODIES:
        answer = await call_http(api.session, api.served.url, method, path,
                                 token=api.management, data=body)
        if not _plain_refusal(answer.status, answer.body):
            failures.append((body[:40], answer.status, str(answer.body)[:120]))
    assert not failures


@pytest.mark.parametrize("token", ["%C2%B2.x", f"{HUGE}.x", "18446744073709551616.x"])
@pytest.mark.parametrize("path", ["/v1/evaluations", "/v1/acl/tokens"])
async def test_a_create_index_token_that_is_no_uint64_is_a_400(api: Api, path: str,
                                                                token: str) -> None:
    answer = await api.call("GET", f"{path}?next_token={token}")
    assert answer.status == 400 and "invalid next_token" in answer.body


@pytest.mark.parametrize("version", ["%C2%B2", HUGE, "18446744073709551616", "-1"])
async def test_a_job_version_that_is_no_uint64_is_a_400(api: Api, version: str) -> None:
    answer = await api.call("GET", f"/v1/job/web?version={version}")
    assert (answer.status, answer.body) == (400, "Unable to parse job version parameter")
