"""Job plans: the diff of two job versions, the scheduler's dry run over HTTP (which writes
nothing), its refusals and capability, and the ``job plan`` command's output and exit codes."""

from __future__ import annotations

import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nomad_client.cli.plan import format_job_diff
from nomad_client.http.endpoints import plan as plan_endpoint
from nomad_client.jobspec import canonicalize_job, parse_jobspec
from nomad_client.server.keyring import Keyring
from nomad_client.server.plan import dry_run, job_diff
from tests.unit.factories import make_alloc, node
from tests.unit.launching import batch_job, register, served
from tests.unit.test_cli import cli
from tests.unit.test_namespace_endpoints import Api


def service_job(count: int = 1, **task: Any) -> dict[str, Any]:
    return batch_job("web", count=count, task=task or None, Type="service")


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring) as api:
        yield api


async def plan(api: Api, job: dict[str, Any], *, token: str | None = None,
               **body: Any) -> Any:
    answer = await api.call("POST", f"/v1/job/{job['ID']}/plan",
                            {"Job": job, "Diff": True, **body}, token=token)
    assert answer.status == 200, answer
    return answer.body


# ---- the diff -------------------------------------------------------------------------------
def test_a_new_job_is_added_and_an_unchanged_one_is_none() -> None:
    job = service_job()
    added = job_diff(None, job)
    assert (added["Type"], added["ID"]) == ("Added", "web")
    assert added["TaskGroups"][0]["Type"] == "Added"
    same = job_diff(job, dict(job))
    assert same["Type"] == "None" and same["Fields"] == [] and same["Objects"] == []
    assert [(g["Type"], [t["Type"] for t in g["Tasks"]]) for g in same["TaskGroups"]] == [
        ("None", ["None"])]


def test_edits_are_fields_objects_and_tasks_in_nomads_shape() -> None:
    old = {**service_job(1, Env={"A": "1"}), "Datacenters": ["dc1"], "Priority": 50}
    new = {**service_job(3, Env={"A": "2", "B": "x"}), "Datacenters": ["dc1", "dc2"],
           "Priority": 50, "ModifyIndex": 99}
    diff = job_diff(old, new)
    assert diff["Type"] == "Edited" and diff["Fields"] == []  # bookkeeping is no change
    assert diff["Objects"] == [{"Type": "Edited", "Name": "Datacenters", "Objects": [],
                                "Fields": [{"Type": "Added", "Name": "Datacenters",
                                            "Old": "", "New": "dc2", "Annotations": None}]}]
    group = diff["TaskGroups"][0]
    assert group["Type"] == "Edited" and group["Fields"] == [
        {"Type": "Edited", "Name": "Count", "Old": "1", "New": "3", "Annotations": None}]
    task = group["Tasks"][0]
    assert task["Type"] == "Edited" and task["Name"] == "t"
    env = task["Objects"][0]
    assert (env["Type"], env["Name"]) == ("Edited", "Env")
    assert [(f["Type"], f["Name"], f["Old"], f["New"]) for f in env["Fields"]] == [
        ("Edited", "A", "1", "2"), ("Added", "B", "", "x")]


def test_the_cli_lays_a_diff_out_as_nomad_does() -> None:
    diff = job_diff(service_job(1), service_job(2))
    diff["TaskGroups"][0]["Updates"] = {"create": 1, "ignore": 1}
    assert format_job_diff(diff).strip() == textwrap.dedent('''\
        +/- Job: "web"
        +/- Task Group: "g" (1 create, 1 ignore)
          +/- Count: "1" => "2"
              Task: "t"''')


# ---- the endpoint ---------------------------------------------------------------------------
async def test_a_plan_counts_placements_and_writes_nothing(api: Api) -> None:
    index = api.server.store.index
    body = await plan(api, service_job(2))
    assert api.server.store.index == index and api.server.job("web") is None
    assert api.server.allocations() == [] and api.server.store.values("evals") == []
    assert body["Index"] == index and body["JobModifyIndex"] == 0
    assert body["CreatedEvals"] is None and body["FailedTGAllocs"] is None
    assert body["Warnings"] == "" and body["Diff"]["Type"] == "Added"
    updates = body["Annotations"]["DesiredTGUpdates"]["g"]
    assert (updates["Place"], updates["Ignore"], updates["Stop"]) == (2, 0, 0)
    assert body["Diff"]["TaskGroups"][0]["Updates"] == {"create": 2}
    assert (await plan(api, service_job(2), Diff=False))["Diff"] is None


async def test_the_schedulers_dry_run_runs_off_the_event_loop(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its cost grows with the job's counts: a big count must not stall every other request.
    threads: list[int] = []
    real = plan_endpoint.dry_run

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_endpoint, "dry_run", recording)
    await plan(api, service_job(2))
    assert threads and threading.main_thread().ident not in threads


async def test_a_plan_of_a_registered_job_compares_with_it(api: Api) -> None:
    await register(api, service_job(2))
    stored = api.server.job("web")
    assert stored is not None
    same = await plan(api, service_job(2))
    assert same["JobModifyIndex"] == stored["ModifyIndex"]
    assert same["Diff"]["Type"] == "None"
    assert same["Annotations"]["DesiredTGUpdates"]["g"]["Ignore"] == 2
    more = await plan(api, service_job(3))
    assert more["Annotations"]["DesiredTGUpdates"]["g"]["Place"] == 1
    fewer = await plan(api, service_job(1))
    assert fewer["Annotations"]["DesiredTGUpdates"]["g"]["Stop"] == 1
    assert len(api.server.job_allocs("web")) == 2  # still: nothing was written


async def test_a_plan_reports_what_could_not_be_placed(api: Api) -> None:
    job = batch_job("web", Type="service")
    job["TaskGroups"][0]["Tasks"][0]["Driver"] = "docker"
    body = await plan(api, job)
    failed = body["FailedTGAllocs"]["g"]
    assert failed["ConstraintFiltered"] == {"missing driver docker": 1}
    assert body["Annotations"]["DesiredTGUpdates"]["g"]["Place"] == 1


@pytest.mark.parametrize(("path", "body", "reason"), [
    ("/v1/job/web/plan", {}, "Job must be specified"),
    ("/v1/job/web/plan", {"Job": {"Type": "service"}}, "Job ID hasn't been provided"),
    ("/v1/job/other/plan", {"Job": service_job()}, "Job ID does not match name"),
    ("/v1/job/web/plan", {"Job": service_job(), "Diff": "yes"}, "Diff must be true or false"),
    ("/v1/job/web/plan", [], "Request body must be a JSON object"),
    ("/v1/job/web/plan?namespace=nope", {"Job": service_job()}, "nonexistent namespace"),
    ("/v1/job/web/plan", {"Job": {**service_job(), "Update": {"Canary": 2}}},
     "canary deployments are not supported"),
])
async def test_bad_plans_are_400(api: Api, path: str, body: Any, reason: str) -> None:
    answer = await api.call("POST", path, body)
    assert answer.status == 400 and reason in answer.body, answer


async def test_a_plan_needs_submit_job(keyring: Keyring) -> None:
    async with served(keyring, acl=True) as api:
        submitter = await api.token_for('namespace "default" { capabilities = ["submit-job"] }')
        reader = await api.token_for('namespace "default" { policy = "read" }')
        assert (await api.call("POST", "/v1/job/web/plan", {"Job": service_job()},
                               token=submitter)).status == 200
        answer = await api.call("POST", "/v1/job/web/plan", {"Job": service_job()},
                                token=reader)
        assert answer.status == 403, answer
        # As Nomad's: plan-job alone suffices; register-job (a registration right) does not.
        planner = await api.token_for('namespace "default" { capabilities = ["plan-job"] }')
        registrar = await api.token_for(
            'namespace "default" { capabilities = ["register-job"] }')
        for token, status in ((planner, 200), (registrar, 403)):
            answer = await api.call("POST", "/v1/job/web/plan", {"Job": service_job()},
                                    token=token)
            assert answer.status == status, answer


# ---- the command ----------------------------------------------------------------------------
JOBSPEC = """\
job "web" {
  datacenters = ["dc1"]
  group "g" {
    count = %d
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
      }
    }
  }
}
"""


async def test_job_plan_command(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NOMAD_ADDR", api.served.url)
    monkeypatch.delenv("NOMAD_TOKEN", raising=False)
    spec = tmp_path / "web.nomad.hcl"
    spec.write_text(JOBSPEC % 2)
    code, out, err = await cli(capsys, "job", "plan", str(spec))
    assert (code, err) == (1, ""), (out, err)
    assert out.startswith('+ Job: "web"\n+ Task Group: "g" (2 create)\n  + Task: "t"\n'), out
    assert "Scheduler dry-run:\n- All tasks successfully allocated.\n" in out
    assert out.rstrip().endswith(
        f"Job Modify Index: 0\nTo submit the job only if nobody has changed it since this "
        f"plan, run:\n\nnomad-client job run -check-index 0 {spec}"), out

    await register(api, parse_jobspec(spec.read_text(), str(spec)))
    code, out, _ = await cli(capsys, "job", "plan", str(spec))
    assert code == 0 and out.startswith('Job: "web"\nTask Group: "g" (2 ignore)\n'), out

    code, out, err = await cli(capsys, "job", "plan", str(tmp_path / "missing.hcl"))
    assert code == 255 and "Error reading job file" in err
    monkeypatch.setenv("NOMAD_ADDR", "http://127.0.0.1:1")
    code, out, err = await cli(capsys, "job", "plan", str(spec))
    assert code == 255 and err.startswith("Error during plan:"), err


def test_a_replacement_that_cannot_be_placed_is_one_destructive_update() -> None:
    def web(env: str) -> dict[str, Any]:
        return canonicalize_job({"ID": "j", "Type": "service", "Datacenters": ["dc1"],
                                 "TaskGroups": [{"Name": "g", "EphemeralDisk": {"SizeMB": 300},
                                                 "Tasks": [{"Name": "t", "Driver": "raw_exec",
                                                            "Env": {"V": env}}]}]})

    # Too little disk for the new version's allocation: it is wanted but unplaceable.
    full = node("n", datacenter="dc1", attributes={"kernel.name": "linux",
                                                   "unique.storage.bytesfree": str(200 * 2**20)})
    old = web("1")
    running = make_alloc(job=old, node_id="n")
    planned = dry_run(web("2"), old, [full], [running], [running], with_diff=False)
    assert planned.annotations is not None and "g" in planned.failed_groups
    counts = planned.annotations["g"]
    assert (counts["DestructiveUpdate"], counts["Place"]) == (1, 0)
