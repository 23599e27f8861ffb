"""Scaling: the group ``scaling`` block, the scale action and scale status, scaling events,
the scaling policy endpoints, who may do what, and the ``job scale`` / ``scaling policy``
commands."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nomad_client.jobspec import JobspecError, JobValidationError, canonicalize_job, parse_jobspec
from nomad_client.server.keyring import Keyring
from nomad_client.server.scaling import MAX_SCALING_EVENTS
from nomad_client.server.state import JOBS, job_key
from tests.unit.launching import batch_job, register, served
from tests.unit.test_cli import cli, mock_job, newest_eval, start_nomad
from tests.unit.test_namespace_endpoints import Api

SCALED = {"Min": 1, "Max": 5, "Policy": {"cooldown": "1m"}}
INVALID = "Task group scaling policy validation failed: Scaling policy invalid: "


def service_job(job_id: str = "web", count: int = 2, scaling: dict[str, Any] | None = None,
                **fields: Any) -> dict[str, Any]:
    """Service job ``job_id`` whose group "g" has ``scaling`` (default ``SCALED``; {}: no
    scaling block)."""
    group = {} if scaling == {} else {"Scaling": dict(SCALED if scaling is None else scaling)}
    return batch_job(job_id, count=count, group=group, **{"Type": "service", **fields})


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring) as api:
        yield api


@pytest.fixture
async def acl_api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring, acl=True) as api:
        yield api


def policy_of(api: Api, job_id: str = "web", group: str = "g") -> dict[str, Any]:
    job = api.server.job(job_id)
    assert job is not None
    return dict(next(g for g in job["TaskGroups"] if g["Name"] == group)["Scaling"])


# ---- the jobspec ----------------------------------------------------------------------------
def test_the_scaling_block_is_decoded_and_filled() -> None:
    job = parse_jobspec(textwrap.dedent("""\
        job "web" {
          group "g" {
            count = 3
            scaling {
              max = 10
              policy {
                cooldown = "1m"
                check "cpu" {
                  source = "prometheus"
                  strategy "target-value" {
                    target = 70
                  }
                }
              }
            }
            task "t" {
              driver = "raw_exec"
            }
          }
        }
        """), "web.nomad.hcl")
    scaling = canonicalize_job(job)["TaskGroups"][0]["Scaling"]
    assert scaling == {"Enabled": True, "Type": "horizontal", "Min": 3, "Max": 10, "Policy": {
        "cooldown": "1m",
        "check": [{"cpu": [{"source": "prometheus",
                            "strategy": [{"target-value": [{"target": 70}]}]}]}]}}


def test_a_scaling_block_takes_no_label() -> None:
    with pytest.raises(JobspecError, match="the scaling block takes no label"):
        parse_jobspec('job "j" {\n group "g" {\n  scaling "cpu" {\n   max = 1\n  }\n }\n}\n',
                      "j.hcl")


@pytest.mark.parametrize(("count", "scaling", "problem"), [
    (2, {"Min": 1}, INVALID + "maximum count must be specified and non-negative"),
    (2, {"Min": -1, "Max": 3}, INVALID + "minimum count must be specified and non-negative"),
    (2, {"Min": 4, "Max": 3}, INVALID + "maximum count must not be less than minimum count"),
    (6, {"Min": 1, "Max": 5},
     INVALID + "task group count must not be greater than maximum count in scaling policy"),
    (0, {"Min": 1, "Max": 5},
     INVALID + "task group count must not be less than minimum count in scaling policy"),
    (2, {"Max": 5, "Type": "vertical_cpu"},
     "scaling: unsupported policy type 'vertical_cpu' (only 'horizontal')"),
])
def test_bad_scaling_blocks_are_refused(count: int, scaling: dict[str, Any],
                                        problem: str) -> None:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(service_job(count=count, scaling=scaling))
    assert f"group 'g': {problem}" in info.value.problems


async def test_registering_outside_the_bounds_is_400(api: Api) -> None:
    answer = await api.call("PUT", "/v1/jobs", {"Job": service_job(count=9)})
    assert answer.status == 400
    assert "task group count must not be greater than maximum count" in answer.body
    system = service_job(Type="system")
    answer = await api.call("PUT", "/v1/jobs", {"Job": system})
    assert answer.status == 400
    assert "Task groups with job type system do not support scaling blocks" in answer.body
    assert api.server.jobs() == []


# ---- policies -------------------------------------------------------------------------------
async def test_policies_keep_their_ids_across_registrations(api: Api) -> None:
    await register(api, service_job())
    first = policy_of(api)
    assert first["Target"] == {"Namespace": "default", "Job": "web", "Group": "g"}
    job = api.server.job("web")
    assert job is not None and first["CreateIndex"] == first["ModifyIndex"] == job["ModifyIndex"]

    await register(api, service_job(count=3))  # the same policy, another count
    again = policy_of(api)
    assert (again["ID"], again["CreateIndex"], again["ModifyIndex"]) == (
        first["ID"], first["CreateIndex"], first["ModifyIndex"])

    await register(api, service_job(scaling={**SCALED, "Max": 8}))  # a changed policy
    changed = policy_of(api)
    assert (changed["ID"], changed["CreateIndex"]) == (first["ID"], first["CreateIndex"])
    assert changed["ModifyIndex"] > first["ModifyIndex"]

    await register(api, service_job(scaling={}))  # the block goes: so does the policy
    assert (await api.call("GET", "/v1/scaling/policies")).body == []
    await register(api, service_job())
    assert policy_of(api)["ID"] != first["ID"]


async def test_policy_endpoints(api: Api) -> None:
    await register(api, service_job())
    await register(api, service_job("api", count=1, scaling={"Max": 2}))
    await register(api, service_job("plain", scaling={}))
    web, other = policy_of(api), policy_of(api, "api")

    listed = await api.call("GET", "/v1/scaling/policies")
    assert listed.status == 200 and listed.nomad_index
    assert sorted(p["ID"] for p in listed.body) == sorted([web["ID"], other["ID"]])
    stub = next(p for p in listed.body if p["ID"] == web["ID"])
    assert stub == {"ID": web["ID"], "Enabled": True, "Type": "horizontal",
                    "Target": {"Namespace": "default", "Job": "web", "Group": "g"},
                    "CreateIndex": web["CreateIndex"], "ModifyIndex": web["ModifyIndex"]}
    for query, expected in (("job=web", [web["ID"]]), ("job=nope", []),
                            ("type=horiz", [web["ID"], other["ID"]]), ("type=vertical", []),
                            (f"prefix={other['ID'][:6]}", [other["ID"]]),
                            ("namespace=other", [])):
        found = (await api.call("GET", f"/v1/scaling/policies?{query}")).body
        assert sorted(p["ID"] for p in found) == sorted(expected), query

    got = await api.call("GET", f"/v1/scaling/policy/{web['ID']}")
    assert got.status == 200
    assert got.body == {"ID": web["ID"], "Type": "horizontal", "Target": web["Target"],
                        "Policy": {"cooldown": "1m"}, "Min": 1, "Max": 5, "Enabled": True,
                        "CreateIndex": web["CreateIndex"], "ModifyIndex": web["ModifyIndex"]}
    assert (await api.call("GET", "/v1/scaling/policy/nope"))[:2] == (404, "policy not found")
    assert (await api.call("PUT", f"/v1/scaling/policy/{web['ID']}", {})).status == 405
    assert (await api.call("POST", "/v1/scaling/policies", {})).status == 405


# ---- the scale action and status --------------------------------------------------------------
async def test_scaling_a_job_makes_a_new_version_evaluates_it_and_records_an_event(
        api: Api) -> None:
    await register(api, service_job())
    before = api.server.job("web")
    assert before is not None and len(api.server.job_allocs("web")) == 2

    answer = await api.call("POST", "/v1/job/web/scale", {
        "Count": 4, "Target": {"Group": "g"}, "Message": "more", "Meta": {"by": "test"}})
    assert answer.status == 200, answer
    after = api.server.job("web")
    assert after is not None
    assert after["TaskGroups"][0]["Count"] == 4 and after["Version"] == before["Version"] + 1
    assert answer.body["JobModifyIndex"] == after["ModifyIndex"]
    ev = api.server.evaluation(answer.body["EvalID"])
    assert ev is not None and ev.triggered_by == "job-scaling"
    assert answer.body["EvalCreateIndex"] < answer.body["Index"] == answer.nomad_index
    assert len(api.server.job_allocs("web")) == 4
    assert policy_of(api)["ID"] == before["TaskGroups"][0]["Scaling"]["ID"]

    status = await api.call("GET", "/v1/job/web/scale")
    assert status.status == 200
    group = status.body["TaskGroups"]["g"]
    event = group.pop("Events")[0]
    assert {k: v for k, v in status.body.items() if k != "TaskGroups"} == {
        "JobID": "web", "Namespace": "default", "JobCreateIndex": after["CreateIndex"],
        "JobModifyIndex": after["ModifyIndex"], "JobStopped": False}
    # Placed but not yet running (no client here); health comes from deployments.
    assert group == {"Desired": 4, "Placed": 4, "Running": 0, "Healthy": 0, "Unhealthy": 0}
    assert event["Time"] > 0
    assert {k: v for k, v in event.items() if k != "Time"} == {
        "Count": 4, "PreviousCount": 2, "Message": "more", "Error": False,
        "Meta": {"by": "test"}, "EvalID": answer.body["EvalID"],
        "CreateIndex": answer.body["Index"]}

    down = await api.call("PUT", "/v1/job/web/scale", {"Count": 1, "Target": {"Group": "g"}})
    assert down.status == 200
    live = [a for a in api.server.job_allocs("web") if a.desired_status == "run"]
    assert len(live) == 1


async def test_an_error_event_changes_nothing_else(api: Api) -> None:
    await register(api, service_job())
    before = api.server.job("web")
    answer = await api.call("POST", "/v1/job/web/scale", {
        "Target": {"Group": "g"}, "Error": True, "Message": "metrics source down"})
    assert answer.status == 200
    assert answer.body["EvalID"] == "" and answer.body["EvalCreateIndex"] == 0
    assert answer.body["JobModifyIndex"] == before["ModifyIndex"]  # type: ignore[index]
    assert api.server.job("web") == before
    events = (await api.call("GET", "/v1/job/web/scale")).body["TaskGroups"]["g"]["Events"]
    assert [(e["Count"], e["PreviousCount"], e["Error"], e["EvalID"]) for e in events] == [
        (None, 2, True, None)]


async def test_events_are_kept_newest_first_and_bounded(api: Api) -> None:
    await register(api, service_job())
    for n in range(MAX_SCALING_EVENTS + 5):
        answer = await api.call("POST", "/v1/job/web/scale",
                                {"Target": {"Group": "g"}, "Message": f"m{n}"})
        assert answer.status == 200
    events = (await api.call("GET", "/v1/job/web/scale")).body["TaskGroups"]["g"]["Events"]
    assert [e["Message"] for e in events] == [
        f"m{n}" for n in reversed(range(5, MAX_SCALING_EVENTS + 5))]


async def test_a_blocking_scale_status_answers_after_an_event(api: Api) -> None:
    await register(api, service_job())
    first = await api.call("GET", "/v1/job/web/scale")
    assert first.body["TaskGroups"]["g"]["Events"] is None
    waiting = asyncio.create_task(
        api.call("GET", f"/v1/job/web/scale?index={first.nomad_index}&wait=30s"))
    assert (await api.call("POST", "/v1/job/web/scale",
                           {"Target": {"Group": "g"}, "Message": "x"})).status == 200
    answer = await asyncio.wait_for(waiting, 10)
    assert [e["Message"] for e in answer.body["TaskGroups"]["g"]["Events"]] == ["x"]


@pytest.mark.parametrize(("path", "body", "status", "text"), [
    ("/v1/job/web/scale", {"Count": 1, "Target": {"Group": "g", "Job": "api"}}, 400,
     "job ID in payload did not match URL"),
    ("/v1/job/web/scale", {"Count": 1, "Target": {"Group": "g", "Namespace": "x"}}, 400,
     "namespace in payload did not match header"),
    ("/v1/job/web/scale", {"Count": 1}, 400, "missing task group name for scaling action"),
    ("/v1/job/web/scale", {"Count": -1, "Target": {"Group": "g"}}, 400,
     "scaling action count can't be negative"),
    ("/v1/job/web/scale", {"Count": 2, "Error": True, "Target": {"Group": "g"}}, 400,
     "scaling action should not contain count if error is true"),
    ("/v1/job/web/scale", {"Count": "2", "Target": {"Group": "g"}}, 400,
     "Count must be a whole number"),
    ("/v1/job/web/scale", {"Count": 2, "Target": {"Group": "nope"}}, 400,
     'task group "nope" specified for scaling does not exist in job'),
    ("/v1/job/web/scale", {"Count": 0, "Target": {"Group": "g"}}, 400,
     "group count was less than scaling policy minimum: 0 < 1"),
    ("/v1/job/web/scale", {"Count": 11, "Target": {"Group": "g"}}, 400,
     "group count was greater than scaling policy maximum: 11 > 5"),
    ("/v1/job/web/scale", {"Count": 3, "Target": {"Group": "g"}, "JobModifyIndex": 1}, 400,
     "Enforcing job modify index 1: job exists with conflicting job modify index"),
    ("/v1/job/nope/scale", {"Count": 1, "Target": {"Group": "g"}}, 404, 'job "nope" not found'),
    ("/v1/job/web/scale", {"Message": "x" * 20_000, "Target": {"Group": "g"}}, 400,
     "scaling event message and meta exceed"),
    ("/v1/job/web/scale", ["Count"], 400, "Request body must be a JSON object"),
])
async def test_bad_scale_requests(api: Api, path: str, body: Any, status: int,
                                  text: str) -> None:
    await register(api, service_job())
    before = api.server.job("web")
    answer = await api.call("POST", path, body)
    assert answer.status == status and answer.body.startswith(text), answer
    assert api.server.job("web") == before
    assert (await api.call("GET", "/v1/job/web/scale")).body["TaskGroups"]["g"]["Events"] is None


async def test_groups_without_a_scaling_block_and_parents_can_be_scaled(api: Api) -> None:
    await register(api, service_job("plain", scaling={}))
    answer = await api.call("POST", "/v1/job/plain/scale", {"Count": 7, "Target": {"Group": "g"}})
    assert answer.status == 200 and len(api.server.job_allocs("plain")) == 7
    # A parameterized parent gets the new count and no evaluation: it never runs itself.
    await register(api, batch_job("parent", ParameterizedJob={}))
    answer = await api.call("POST", "/v1/job/parent/scale",
                            {"Count": 3, "Target": {"Group": "g"}})
    assert answer.status == 200 and answer.body["EvalID"] == ""
    assert api.server.job("parent")["TaskGroups"][0]["Count"] == 3  # type: ignore[index]
    assert api.server.job_allocs("parent") == []
    assert (await api.call("GET", "/v1/job/nope/scale"))[:2] == (404, "job not found")


# ---- who may do what ----------------------------------------------------------------------
async def test_capabilities(acl_api: Api) -> None:
    api = acl_api
    await register(api, service_job())
    policy_id = policy_of(api)["ID"]
    scaler = await api.token_for('namespace "default" { policy = "scale" }')
    scale_only = await api.token_for('namespace "default" { capabilities = ["scale-job"] }')
    reader = await api.token_for('namespace "default" { policy = "read" }')
    submitter = await api.token_for('namespace "default" { capabilities = ["submit-job"] }')
    status_only = await api.token_for(
        'namespace "default" { capabilities = ["read-job-scaling"] }')
    lister = await api.token_for('namespace "default" { capabilities = ["list-jobs"] }')
    elsewhere = await api.token_for('namespace "other" { policy = "write" }')
    scale = {"Count": 3, "Target": {"Group": "g"}}

    def call(method: str, path: str, token: str, body: Any = None) -> Any:
        return api.call(method, path, body, token=token)

    for token, allowed in ((scaler, True), (scale_only, True), (submitter, True),
                           (reader, False), (status_only, False), (elsewhere, False)):
        answer = await call("POST", "/v1/job/web/scale", token, scale)
        assert answer.status == (200 if allowed else 403), (token, answer)
    for token, allowed in ((scaler, True), (reader, True), (status_only, True),
                           (scale_only, False), (elsewhere, False)):
        answer = await call("GET", "/v1/job/web/scale", token)
        assert answer.status == (200 if allowed else 403), answer
    # Policies: list-scaling-policies / read-scaling-policy, or list-jobs with read-job.
    for token, allowed in ((scaler, True), (reader, True), (lister, False),
                           (scale_only, False)):
        listed = await call("GET", "/v1/scaling/policies", token)
        assert listed.status == (200 if allowed else 403), listed
        one = await call("GET", f"/v1/scaling/policy/{policy_id}", token)
        assert one.status == (200 if allowed else 403), one
    # With every namespace asked for, the list keeps what the caller may see.
    assert (await call("GET", "/v1/scaling/policies?namespace=*", elsewhere)).body == []
    # A policy of a namespace the caller may not read is not found, whatever it asks in.
    answer = await call("GET", f"/v1/scaling/policy/{policy_id}?namespace=other", elsewhere)
    assert answer[:2] == (404, "policy not found")


# ---- the commands ---------------------------------------------------------------------------
async def test_job_scale_and_scaling_policy_commands(tmp_path: Path, keyring: Keyring,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    nomad = await start_nomad(tmp_path, keyring, monkeypatch)
    try:
        spec = mock_job(TaskGroups=[{**mock_job()["TaskGroups"][0], "Count": 1,
                                     "Scaling": {"Min": 1, "Max": 4}}])
        await nomad.server.register_job(canonicalize_job(spec))
        code, out, err = await cli(capsys, "job", "scale", "-detach", "web", "3")
        assert (code, err) == (0, "") and out.startswith("Job scale successful\n"), out
        assert out.split("Evaluation ID: ")[1].strip() == newest_eval(nomad, "web")
        assert nomad.server.job("web")["TaskGroups"][0]["Count"] == 3  # type: ignore[index]
        event = nomad.server.scaling.events("default", "web")["g"][0]
        assert event["Message"] == "submitted using the Nomad CLI"

        code, out, _ = await cli(capsys, "job", "scale", "web", "g", "2")
        assert code == 0 and 'Evaluation "' in out  # monitored
        code, _, err = await cli(capsys, "job", "scale", "web", "nope", "2")
        assert (code, err.strip()) == (1, "Group nope not found within job")
        code, _, err = await cli(capsys, "job", "scale", "web", "9")
        assert code == 1 and "group count was greater than scaling policy maximum: 9 > 4" in err

        policy_id = nomad.server.scaling.policies(nomad.server.jobs())[0]["ID"]
        code, out, _ = await cli(capsys, "scaling", "policy", "list")
        assert code == 0 and out.splitlines() == [
            "ID        Enabled  Type        Target",
            f"{policy_id[:8]}  true     horizontal  Namespace:default,Job:web,Group:g"]
        code, out, _ = await cli(capsys, "scaling", "policy", "info", policy_id[:6])
        assert code == 0 and f"ID      = {policy_id}" in out and "Max     = 4" in out
        code, _, err = await cli(capsys, "scaling", "policy", "frob")
        assert code == 1 and "unknown subcommand 'frob'" in err
    finally:
        await nomad.agent.stop()
        await nomad.server.close()


async def test_every_scaled_version_is_kept_in_the_jobs_history(api: Api) -> None:
    await register(api, service_job())
    for count in (3, 4):
        answer = await api.call("POST", "/v1/job/web/scale",
                                {"Count": count, "Target": {"Group": "g"}})
        assert answer.status == 200, answer
    kept = await api.call("GET", "/v1/job/web/versions")
    assert [(v["Version"], v["TaskGroups"][0]["Count"]) for v in kept.body["Versions"]] == [
        (2, 4), (1, 3), (0, 2)]


async def test_scaling_enforces_the_jobs_version_index_not_its_last_write(api: Api) -> None:
    await register(api, service_job())

    def touch(current: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
        return None if current is None else dict(current)

    # A write of the job that makes no new version moves its ModifyIndex only.
    await api.server.store.write(updates={JOBS: [(job_key("default", "web"), touch)]})
    job = api.server.job("web")
    assert job is not None and job["ModifyIndex"] > job["JobModifyIndex"]
    answer = await api.call("POST", "/v1/job/web/scale", {
        "Count": 3, "Target": {"Group": "g"}, "JobModifyIndex": job["JobModifyIndex"]})
    assert answer.status == 200, answer
    stale = await api.call("POST", "/v1/job/web/scale", {
        "Count": 4, "Target": {"Group": "g"}, "JobModifyIndex": job["JobModifyIndex"]})
    assert stale.status == 400 and "conflicting job modify index" in stale.body
