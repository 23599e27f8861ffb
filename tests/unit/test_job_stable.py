"""``POST /v1/job/:id/stable`` (Nomad's ``Job.Stable``): a kept version is marked stable or
not, in the job and in its versions, without becoming a new version; its refusals and ACL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nomad_client.server.job_versions import VersionNotFound
from nomad_client.server.keyring import Keyring
from nomad_client.structs.models import ACLPolicy
from tests.unit.factories import (
    HttpAnswer,
    ServedAPI,
    acl_token,
    call_http_once,
    job,
    make_server,
    seed,
    serving,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[ServedAPI]:
    server = make_server(keyring)
    await server.register_job(job(count=1))
    await server.register_job(job(count=2))  # version 1
    async with serving(server) as served:
        yield served


async def call(api: ServedAPI, method: str, path: str, body: object = None,
               token: str = "") -> HttpAnswer:
    return await call_http_once(api.url, method, path, body, token=token)


def stability(api: ServedAPI) -> dict[int, bool]:
    versions = api.server.job_versions("web")
    assert versions is not None
    return {v["Version"]: bool(v.get("Stable")) for v in versions}


async def test_marking_the_current_version_shows_in_the_job_and_its_versions(
        api: ServedAPI) -> None:
    before = api.server.job("web")
    assert before is not None and not before.get("Stable")
    answer = await call(api, "POST", "/v1/job/web/stable",
                        {"JobID": "web", "JobVersion": 1, "Stable": True})
    assert answer.status == 200, answer.body
    assert answer.body["Index"] > before["ModifyIndex"]
    assert answer.nomad_index == answer.body["Index"]

    shown = (await call(api, "GET", "/v1/job/web")).body
    assert shown["Stable"] is True and shown["Version"] == 1
    # Not a new version: only ModifyIndex moves.
    assert shown["JobModifyIndex"] == before["JobModifyIndex"]
    assert shown["ModifyIndex"] == answer.body["Index"]
    versions = (await call(api, "GET", "/v1/job/web/versions")).body["Versions"]
    # (The factory's job skips the jobspec's zeros: an unmarked version may lack the key.)
    assert [(v["Version"], v.get("Stable", False)) for v in versions] == [
        (1, True), (0, False)]

    unmark = await call(api, "PUT", "/v1/job/web/stable",
                        {"JobID": "web", "JobVersion": 1, "Stable": False})
    assert unmark.status == 200
    assert stability(api) == {1: False, 0: False}


async def test_an_older_version_is_marked_in_the_history_only(api: ServedAPI) -> None:
    answer = await call(api, "POST", "/v1/job/web/stable",
                        {"JobID": "web", "JobVersion": 0, "Stable": True})
    assert answer.status == 200, answer.body
    assert stability(api) == {1: False, 0: True}
    job_now = api.server.job("web")
    assert job_now is not None and not job_now.get("Stable")


async def test_marking_again_changes_nothing(api: ServedAPI) -> None:
    first = await call(api, "POST", "/v1/job/web/stable",
                       {"JobID": "web", "JobVersion": 1, "Stable": True})
    again = await call(api, "POST", "/v1/job/web/stable",
                       {"JobID": "web", "JobVersion": 1, "Stable": True})
    assert again.status == 200 and again.body["Index"] == first.body["Index"]


async def test_refusals_have_nomads_texts(api: ServedAPI) -> None:
    path = "/v1/job/web/stable"
    cases = [
        ({"JobVersion": 1, "Stable": True}, 400, "JobID must be specified"),
        ({"JobID": "other", "JobVersion": 1, "Stable": True}, 400, "Job ID does not match"),
        ({"JobID": "web", "JobVersion": -1, "Stable": True}, 400,
         "JobVersion must be a non-negative integer"),
        ({"JobID": "web", "JobVersion": 1, "Stable": "yes"}, 400, "Stable must be a boolean"),
        ({"JobID": "web", "JobVersion": 7, "Stable": True}, 404,
         'job "web" in namespace "default" at version 7 not found'),
    ]
    for body, status, text in cases:
        answer = await call(api, "POST", path, body)
        assert (answer.status, answer.body) == (status, text), body
    missing = await call(api, "POST", "/v1/job/nope/stable",
                         {"JobID": "nope", "JobVersion": 0, "Stable": True})
    assert (missing.status, missing.body) == (
        404, 'job "nope" in namespace "default" at version 0 not found')
    assert stability(api) == {1: False, 0: False}


async def test_server_refuses_a_version_it_does_not_keep(api: ServedAPI) -> None:
    with pytest.raises(VersionNotFound):
        await api.server.set_job_stability("web", 5, True)


@pytest.fixture
async def acl_api(keyring: Keyring) -> AsyncIterator[ServedAPI]:
    server = make_server(keyring, acl=True)
    await server.register_job(job(count=1))
    async with serving(server) as served:
        yield served


async def test_needs_submit_job_or_stable_job(acl_api: ServedAPI) -> None:
    server = acl_api.server
    token = acl_token("client")
    await seed(server, tokens=(token,))
    body = {"JobID": "web", "JobVersion": 0, "Stable": True}
    await server.acls.upsert_policy(ACLPolicy(
        name="p", rules='namespace "default" { capabilities = ["read-job"] }'))
    refused = await call(acl_api, "POST", "/v1/job/web/stable", body, token.secret_id)
    assert refused.status == 403
    for capability in ("submit-job", "stable-job"):
        await server.acls.upsert_policy(ACLPolicy(
            name="p", rules=f'namespace "default" {{ capabilities = ["{capability}"] }}'))
        allowed = await call(acl_api, "POST", "/v1/job/web/stable", body, token.secret_id)
        assert allowed.status == 200, (capability, allowed.body)
