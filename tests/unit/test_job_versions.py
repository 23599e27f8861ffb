"""Job versions: a changed registration bumps ``Version``, an unchanged one does not; the
newest ``tracked_versions`` are kept; revert; ``EnforceIndex`` with Nomad's texts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nomad_client.agent.config import build_agent_config, parse_agent_args
from nomad_client.server.job_versions import VersionConflict, VersionNotFound
from nomad_client.server.keyring import Keyring
from nomad_client.server.scaling import ScaleRequest
from nomad_client.server.server import NotEvaluable, NotFound, Server
from nomad_client.server.state import JOB_VERSIONS, StateStore, job_key
from tests.unit.factories import (
    HttpAnswer,
    call_http,
    job,
    make_alloc,
    seed,
    serve_api,
    write_file,
)


def make(keyring: Keyring, tracked: int = 6) -> Server:
    return Server(StateStore(), keyring, region="global", acl_enabled=False,
                  tracked_versions=tracked)


def current(server: Server, job_id: str = "web") -> dict[str, Any]:
    found = server.job(job_id)
    assert found is not None
    return found


async def test_a_changed_job_is_a_new_version_and_an_unchanged_one_is_not(
        keyring: Keyring) -> None:
    server = make(keyring)
    first_eval, _ = await server.register_job(job())
    first = current(server)
    assert first["Version"] == 0 and first["JobModifyIndex"] == first["ModifyIndex"]

    again_eval, _ = await server.register_job(job())
    assert again_eval and again_eval != first_eval  # evaluated again...
    assert current(server) == first  # ...but the job is as it was

    await server.register_job(job(count=3))
    second = current(server)
    assert second["Version"] == 1 and second["JobModifyIndex"] > first["JobModifyIndex"]
    assert second["CreateIndex"] == first["CreateIndex"]
    versions = server.job_versions("web")
    assert versions is not None
    assert [(v["Version"], v["TaskGroups"][0]["Count"]) for v in versions] == [(1, 3), (0, 1)]


async def test_only_the_tracked_number_of_versions_is_kept(keyring: Keyring) -> None:
    server = make(keyring, tracked=3)
    for count in range(1, 6):
        await server.register_job(job(count=count))
    versions = server.job_versions("web")
    assert versions is not None and [v["Version"] for v in versions] == [4, 3, 2]
    stored = server.store.get(JOB_VERSIONS, job_key("default", "web"))
    assert stored is not None and len(stored["Versions"]) == 3
    assert server.job_versions("nope") is None


async def test_enforce_index_has_nomads_texts(keyring: Keyring) -> None:
    server = make(keyring)
    with pytest.raises(VersionConflict, match="^Enforcing job modify index 5: job does not "
                                              "exist$"):
        await server.register_job(job(), enforce_index=5)
    await server.register_job(job(), enforce_index=0)
    index = current(server)["JobModifyIndex"]
    with pytest.raises(VersionConflict, match="^Enforcing job modify index 0: job already "
                                              "exists$"):
        await server.register_job(job(count=2), enforce_index=0)
    with pytest.raises(VersionConflict, match=f"^Enforcing job modify index {index + 7}: job "
                                              f"exists with conflicting job modify index: "
                                              f"{index}$"):
        await server.register_job(job(count=2), enforce_index=index + 7)
    assert current(server)["Version"] == 0  # nothing refused was written
    await server.register_job(job(count=2), enforce_index=index)
    assert current(server)["Version"] == 1


async def test_revert_registers_an_old_version_as_the_next(keyring: Keyring) -> None:
    server = make(keyring)
    await server.register_job(job(count=1))
    await server.register_job(job(count=2))
    eval_id, _ = await server.revert_job("web", 0)
    reverted = current(server)
    assert eval_id and reverted["Version"] == 2 and reverted["TaskGroups"][0]["Count"] == 1


async def test_revert_refusals_have_nomads_texts(keyring: Keyring) -> None:
    server = make(keyring)
    with pytest.raises(VersionNotFound, match='^job "web" not found$'):
        await server.revert_job("web", 0)
    await server.register_job(job(count=1))
    await server.register_job(job(count=2))
    with pytest.raises(VersionConflict, match="^can't revert to current version$"):
        await server.revert_job("web", 1)
    with pytest.raises(VersionNotFound, match='^job "web" in namespace "default" at version 7 '
                                              'not found$'):
        await server.revert_job("web", 7)
    with pytest.raises(VersionConflict, match="^Current job has version 1; enforcing version "
                                              "0$"):
        await server.revert_job("web", 0, enforce_prior_version=0)
    await server.revert_job("web", 0, enforce_prior_version=1)
    assert current(server)["Version"] == 2


async def test_purge_forgets_the_versions(keyring: Keyring) -> None:
    server = make(keyring)
    await server.register_job(job(count=1))
    await server.register_job(job(count=2))
    await server.deregister_job("web", purge=True)
    assert server.store.get(JOB_VERSIONS, job_key("default", "web")) is None
    await server.register_job(job(count=1))
    assert current(server)["Version"] == 0


# ---- over HTTP --------------------------------------------------------------------------
@pytest.fixture
async def http(keyring: Keyring) -> AsyncIterator[Callable[..., Awaitable[HttpAnswer]]]:
    api = await serve_api(make(keyring))
    try:
        async with aiohttp.ClientSession() as session:
            async def call(method: str, path: str, body: Any = None, **kw: Any) -> HttpAnswer:
                return await call_http(session, api.url, method, path, body, **kw)
            yield call
    finally:
        await api.close()


async def test_register_answers_the_jobs_modify_index_and_enforces_it(
        http: Callable[..., Awaitable[HttpAnswer]]) -> None:
    first = await http("PUT", "/v1/jobs", {"Job": job(), "Submission": {
        "Source": 'job "web" {}', "Format": "hcl2", "VariableFlags": {"a": "1"}}})
    assert first.status == 200, first.body
    again = await http("PUT", "/v1/jobs", {"Job": job()})
    assert again.body["JobModifyIndex"] == first.body["JobModifyIndex"]
    assert again.body["EvalID"] != first.body["EvalID"]

    wrong_index = first.body["JobModifyIndex"] + 100
    stale = await http("PUT", "/v1/jobs", {"Job": job(count=2), "EnforceIndex": True,
                                           "JobModifyIndex": wrong_index})
    assert (stale.status, stale.body) == (400, (
        f"Enforcing job modify index {wrong_index}: job exists with conflicting job modify "
        f"index: {first.body['JobModifyIndex']}"))
    fresh = await http("PUT", "/v1/jobs", {"Job": job(count=2), "EnforceIndex": True,
                                           "JobModifyIndex": first.body["JobModifyIndex"]})
    assert fresh.status == 200 and fresh.body["JobModifyIndex"] > first.body["JobModifyIndex"]

    source = await http("GET", "/v1/job/web/submission?version=0")
    assert source.body == {"Source": 'job "web" {}', "Format": "hcl2",
                           "VariableFlags": {"a": "1"}, "Variables": ""}
    assert (await http("GET", "/v1/job/web/submission?version=1")).status == 404
    assert (await http("GET", "/v1/job/web/submission")).status == 400


async def test_register_ignores_unknown_keys_and_refuses_unimplemented_ones(
        http: Callable[..., Awaitable[HttpAnswer]]) -> None:
    ignored = await http("PUT", "/v1/jobs", {"Job": job(), "SomethingNew": {"x": 1}})
    assert ignored.status == 200, ignored.body
    refused = await http("PUT", "/v1/jobs", {"Job": job(), "PreserveCounts": True})
    assert (refused.status, refused.body) == (400, "PreserveCounts is not supported by this "
                                                   "agent")
    zero = await http("PUT", "/v1/jobs", {"Job": job(), "PolicyOverride": False})
    assert zero.status == 200


async def test_versions_inspect_and_revert(http: Callable[..., Awaitable[HttpAnswer]]) -> None:
    assert (await http("GET", "/v1/job/web/versions")).status == 404
    await http("PUT", "/v1/jobs", {"Job": job(count=1)})
    await http("PUT", "/v1/jobs", {"Job": job(count=2)})
    listed = await http("GET", "/v1/job/web/versions")
    assert listed.body["Diffs"] is None
    assert [v["Version"] for v in listed.body["Versions"]] == [1, 0]

    old = await http("GET", "/v1/job/web?version=0")
    assert old.body["Version"] == 0 and old.body["TaskGroups"][0]["Count"] == 1
    assert (await http("GET", "/v1/job/web?version=9")).status == 404
    assert (await http("GET", "/v1/job/web?version=x")).status == 400

    current = await http("POST", "/v1/job/web/revert", {"JobID": "web", "JobVersion": 1})
    assert (current.status, current.body) == (400, "can't revert to current version")
    wrong = await http("POST", "/v1/job/web/revert", {"JobID": "api", "JobVersion": 0})
    assert (wrong.status, wrong.body) == (400, "Job ID does not match")
    reverted = await http("POST", "/v1/job/web/revert", {"JobID": "web", "JobVersion": 0,
                                                          "EnforcePriorVersion": 1})
    assert reverted.status == 200 and reverted.body["EvalID"]
    now = await http("GET", "/v1/job/web")
    assert now.body["Version"] == 2 and now.body["TaskGroups"][0]["Count"] == 1


async def test_evaluate_and_validate(http: Callable[..., Awaitable[HttpAnswer]]) -> None:
    missing = await http("POST", "/v1/job/web/evaluate")
    assert (missing.status, missing.body) == (404, "job not found")
    await http("PUT", "/v1/jobs", {"Job": job()})
    bare = await http("POST", "/v1/job/web/evaluate")
    forced = await http("POST", "/v1/job/web/evaluate", {
        "JobID": "web", "EvalOptions": {"ForceReschedule": True}})
    assert bare.status == forced.status == 200
    assert bare.body["EvalID"] and forced.body["EvalID"] != bare.body["EvalID"]
    evals = await http("GET", "/v1/job/web/evaluations")
    assert {e["TriggeredBy"] for e in evals.body} >= {"job-eval"}

    good = await http("POST", "/v1/validate/job", {"Job": job()})
    assert good.body == {"DriverConfigValidated": True, "ValidationErrors": [], "Error": "",
                         "Warnings": ""}
    bad = await http("POST", "/v1/validate/job", {"Job": job(Type="nonsense")})
    assert bad.status == 200 and bad.body["ValidationErrors"] and bad.body["Error"]
    assert (await http("POST", "/v1/validate/job", {})).status == 400


def test_the_agent_config_sets_how_many_versions_are_kept(tmp_path: Path) -> None:
    config = write_file(tmp_path, "agent.hcl", f'data_dir = "{tmp_path}"\n'
                        "server {\n  enabled = true\n  job_tracked_versions = 3\n}\n")
    assert build_agent_config([config], parse_agent_args([])).server.job_tracked_versions == 3
    default = write_file(tmp_path, "plain.hcl", f'data_dir = "{tmp_path}"\n'
                         "server {\n  enabled = true\n}\n")
    assert build_agent_config([default], parse_agent_args([])).server.job_tracked_versions == 6


async def test_a_stop_is_a_version_that_can_be_reverted(keyring: Keyring) -> None:
    server = make(keyring)
    assert await server.deregister_job("web", purge=False) == ("", 0)  # unknown: as Nomad
    await server.register_job(job())
    await server.deregister_job("web", purge=False)
    stopped = current(server)
    assert stopped["Stop"] is True and stopped["Version"] == 1
    await server.deregister_job("web", purge=False)  # stopping it again is no new version
    assert current(server)["Version"] == 1
    await server.revert_job("web", 0)
    assert current(server)["Stop"] is False and current(server)["Version"] == 2
    versions = server.job_versions("web")
    assert versions is not None and [v["Stop"] for v in versions] == [False, True, False]


async def test_evaluate_forces_the_reschedule_of_failed_allocations(keyring: Keyring) -> None:
    server = make(keyring)
    await server.register_job(job())
    failed, running = (make_alloc(job_id="web", client_status=status)
                       for status in ("failed", "running"))
    await seed(server, allocs=(failed, running))
    eval_id, _ = await server.evaluate_job("web", force_reschedule=True)
    ev = server.evaluation(eval_id)
    assert ev is not None and ev.triggered_by == "job-eval"
    marked = {a.id: a.desired_transition.force_reschedule for a in server.job_allocs("web")
              if a.id in (failed.id, running.id)}
    assert marked == {failed.id: True, running.id: False}
    with pytest.raises(NotFound):
        await server.evaluate_job("nope")
    await server.register_job(job(ID="cron", Type="batch",
                                  Periodic={"Enabled": False, "Spec": "@daily"}))
    with pytest.raises(NotEvaluable, match="^can't evaluate periodic job$"):
        await server.evaluate_job("cron")


async def test_a_scaled_version_is_kept_in_the_history(keyring: Keyring) -> None:
    server = make(keyring)
    await server.register_job(job(count=1))
    await server.scaling.scale("default", "web", ScaleRequest(group="g", count=4))
    scaled = current(server)
    assert scaled["Version"] == 1 and scaled["JobModifyIndex"] == scaled["ModifyIndex"]
    await server.register_job(job(count=2))
    versions = server.job_versions("web")
    assert versions is not None
    assert [(v["Version"], v["TaskGroups"][0]["Count"]) for v in versions] == [
        (2, 2), (1, 4), (0, 1)]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/v1/job/web/revert", {"JobID": "web", "JobVersion": "one"}),
    ("POST", "/v1/job/web/revert", {"JobID": "web", "JobVersion": 0,
                                    "EnforcePriorVersion": -1}),
    ("POST", "/v1/job/web/revert", {"JobVersion": 0}),
    ("POST", "/v1/job/web/revert", ["web"]),
    ("POST", "/v1/job/web/evaluate", {"JobID": "web", "EvalOptions": []}),
    ("POST", "/v1/job/web/evaluate", {"JobID": "web", "EvalOptions": {"ForceReschedule": 1}}),
    ("POST", "/v1/job/web/evaluate", {"JobID": "api"}),
    ("POST", "/v1/validate/job", {"Job": "web"}),
    ("GET", "/v1/job/web/submission?version=-1", None),
    ("GET", "/v1/job/web/versions?index=x", None),
    ("PUT", "/v1/jobs", {"Job": {"ID": "web"}, "EnforceIndex": "yes"}),
    ("PUT", "/v1/jobs", {"Job": {"ID": "web"}, "JobModifyIndex": -3, "EnforceIndex": True}),
    ("PUT", "/v1/jobs", {"Job": {"ID": "web"}, "Submission": {"Source": 7}}),
])
async def test_bad_input_is_a_400(http: Callable[..., Awaitable[HttpAnswer]], method: str,
                                  path: str, body: Any) -> None:
    await http("PUT", "/v1/jobs", {"Job": job()})
    answer = await http(method, path, body)
    assert answer.status == 400, answer.body
