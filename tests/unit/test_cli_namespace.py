"""The ``namespace`` commands and the global ``-namespace`` flag (and ``$NOMAD_NAMESPACE``)
against the real agent API in this process (see ``test_cli`` for the set-up): what each
command prints and what it sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.structs.namespaces import Namespace, NamespaceCapabilities
from tests.unit.factories import write_file
from tests.unit.test_cli import Nomad, cli, mock_job, start_nomad

PROD = "prod"
WILDCARD_REFUSED = 'The wildcard namespace ("*") is not valid for this command.\n'
PROD_HCL = '''\
name        = "prod"
description = "Production"

meta {
  team = "payments"
}

capabilities {
  enabled_task_drivers  = ["mock_driver", "exec"]
  disabled_task_drivers = ["docker"]
  task_api              = "opt_in"
}
'''
PROD_RECORD = Namespace(
    name=PROD, description="Production", meta={"team": "payments"},
    capabilities=NamespaceCapabilities(enabled_task_drivers=("mock_driver", "exec"),
                                       disabled_task_drivers=("docker",), task_api="opt_in"))


@pytest.fixture
async def nomad(tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[Nomad]:
    monkeypatch.delenv("NOMAD_NAMESPACE", raising=False)
    started = await start_nomad(tmp_path, keyring, monkeypatch)
    yield started
    await started.agent.stop()


def unindexed(namespace: Namespace) -> Namespace:
    return attrs.evolve(namespace, create_index=0, modify_index=0)


def stored(nomad: Nomad, name: str) -> Namespace:
    namespace = nomad.server.namespace(name)
    assert namespace is not None, name
    return unindexed(namespace)


# ---- namespace apply -------------------------------------------------------------------------
async def test_apply_by_name_keeps_what_it_does_not_set(
        capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    code, out, err = await cli(capsys, "namespace", "apply", "-description", "Production",
                               PROD)
    assert (code, out, err) == (0, 'Successfully applied namespace "prod"!\n', "")
    assert stored(nomad, PROD) == Namespace(name=PROD, description="Production")

    await nomad.server.upsert_namespace(PROD_RECORD)
    code, out, _ = await cli(capsys, "namespace", "apply", "-description", "Prod", PROD)
    assert code == 0
    assert stored(nomad, PROD) == attrs.evolve(PROD_RECORD, description="Prod")
    code, _, _ = await cli(capsys, "namespace", "apply", PROD)  # no flag: nothing changes
    assert code == 0 and stored(nomad, PROD).description == "Prod"


async def test_apply_a_specification_file(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                          tmp_path: Path) -> None:
    spec = write_file(tmp_path, "prod.hcl", PROD_HCL)
    code, out, err = await cli(capsys, "namespace", "apply", "-description", "ignored",
                               str(spec))
    assert (code, out) == (0, 'Successfully applied namespace "prod"!\n')
    assert err == "Flags are ignored when a file is specified!\n"
    assert stored(nomad, PROD) == PROD_RECORD

    as_json = write_file(tmp_path, "dev.json", '{"Name": "dev", "Capabilities": '
                                               '{"TaskAPI": "disabled"}}')
    assert (await cli(capsys, "namespace", "apply", str(as_json)))[0] == 0
    assert nomad.server.namespace_task_api_mode("dev") == "disabled"
    flagged = write_file(tmp_path, "qa.spec", '{"name": "qa", "description": "QA"}')
    assert (await cli(capsys, "namespace", "apply", "-json", str(flagged)))[0] == 0
    assert stored(nomad, "qa").description == "QA"


@pytest.mark.parametrize(("text", "message"), [
    ('name = "x"\nquota_x = "q"\n', "x.hcl:2: quota_x: unknown key"),
    ('name = "x"\ncapabilities {\n  task_api = "sometimes"\n}\n',
     'x.hcl:3: capabilities.task_api: invalid Task API mode "sometimes": must be one of '
     '"enabled", "disabled", "opt_in", or "" (unset)'),
    ('name = "x"\ncapabilities {\n  enabled_task_drivers = "exec"\n}\n',
     "x.hcl:3: capabilities.enabled_task_drivers: expected a list of strings, got string"),
    ('name = "x"\nmeta {\n  n = 1\n}\n', "x.hcl:3: meta.n: expected a string, got number"),
    ('name = "x"\ncapabilities {\n  network = ["host"]\n}\n',
     "x.hcl:3: capabilities.network: unknown key"),
    ('name = \n', "x.hcl:1: "),
], ids=["unknown key", "task api mode", "drivers type", "meta type", "unknown capability",
        "syntax"])
async def test_a_bad_specification_names_its_file_and_line(
        capsys: pytest.CaptureFixture[str], nomad: Nomad, tmp_path: Path, text: str,
        message: str) -> None:
    spec = write_file(tmp_path, "x.hcl", text)
    code, out, err = await cli(capsys, "namespace", "apply", str(spec))
    assert (code, out) == (1, "")
    assert err.startswith(f"Error parsing namespace specification: {tmp_path}/{message}"), err
    assert [n.name for n in nomad.server.namespaces()] == ["default"]


async def test_apply_reports_what_the_agent_refused(capsys: pytest.CaptureFixture[str],
                                                    nomad: Nomad) -> None:
    code, out, err = await cli(capsys, "namespace", "apply", "a_b")
    assert (code, out) == (1, "")
    assert err.startswith("Error applying namespace specification: Unexpected response code: "
                          '400 (Invalid namespace "a_b": 1 error occurred:'), err


# ---- list, status, delete ------------------------------------------------------------------
async def test_list_status_and_delete(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await nomad.server.upsert_namespace(PROD_RECORD)
    await nomad.server.upsert_namespace(Namespace(name="prod-eu"))
    code, out, _ = await cli(capsys, "namespace", "list")
    assert code == 0
    assert out.splitlines() == ["Name     Description",
                                "default  Default shared namespace",
                                "prod     Production",
                                "prod-eu  <none>"]

    code, out, _ = await cli(capsys, "namespace", "status", PROD)
    assert code == 0
    assert out.splitlines() == ["Name             = prod",
                                "Description      = Production",
                                "Quota            = <none>",
                                "Enabled Drivers  = mock_driver,exec",
                                "Disabled Drivers = docker",
                                "Task API         = opt_in",
                                "",
                                "Metadata",
                                "team = payments"]
    code, out, _ = await cli(capsys, "namespace", "status", "def")  # a prefix
    assert code == 0 and "Enabled Drivers  = *" in out and "Task API         = <agent " \
        "default>" in out
    code, _, err = await cli(capsys, "namespace", "status", "pr")
    assert code == 1 and err.startswith("Prefix matched multiple namespaces\n\nName"), err
    code, _, err = await cli(capsys, "namespace", "status", "nope")
    assert (code, err) == (1, 'No namespace(s) with prefix or id "nope" found\n')

    code, out, _ = await cli(capsys, "namespace", "delete", "prod-eu")
    assert (code, out) == (0, 'Successfully deleted namespace "prod-eu"!\n')
    assert nomad.server.namespace("prod-eu") is None
    code, _, err = await cli(capsys, "namespace", "delete", "default")
    assert (code, err) == (1, "Error deleting namespace: Unexpected response code: 400 "
                              "(can not delete default namespace)\n")


# ---- the -namespace flag ---------------------------------------------------------------------
async def test_the_namespace_flag_wins_over_the_environment(
        capsys: pytest.CaptureFixture[str], nomad: Nomad, monkeypatch: pytest.MonkeyPatch
) -> None:
    await nomad.server.upsert_namespace(Namespace(name=PROD))
    await nomad.run_job(mock_job(Namespace=PROD))
    await nomad.run_job(mock_job("other"))
    code, out, _ = await cli(capsys, "job", "status", "-namespace", PROD)
    assert code == 0 and out.splitlines()[1].startswith("web ")
    assert nomad.queries("/v1/jobs")[-1] == {"namespace": PROD}

    monkeypatch.setenv("NOMAD_NAMESPACE", PROD)
    code, out, _ = await cli(capsys, "job", "status", "web")
    assert code == 0 and "Namespace     = prod" in out
    assert {q.get("namespace") for q in nomad.queries("/v1/job/web")} == {PROD}
    code, out, _ = await cli(capsys, "job", "status", "-namespace=default")
    assert code == 0 and out.splitlines()[1].startswith("other ")
    assert nomad.queries("/v1/jobs")[-1] == {"namespace": "default"}

    code, _, _ = await cli(capsys, "var", "list", "-namespace", "default")
    assert nomad.queries("/v1/vars")[-1] == {"namespace": "default"}
    code, _, _ = await cli(capsys, "var", "list")
    assert nomad.queries("/v1/vars")[-1] == {"namespace": PROD}


async def test_one_job_id_in_two_namespaces_through_the_cli(
        capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await nomad.server.upsert_namespace(Namespace(name=PROD))
    await nomad.run_job(mock_job())
    await nomad.run_job(mock_job(Namespace=PROD))
    code, out, _ = await cli(capsys, "job", "status", "-namespace", "*")
    rows = [line.split()[:2] for line in out.splitlines()]
    assert code == 0 and rows == [["ID", "Namespace"], ["web", "default"], ["web", PROD]]
    code, _, err = await cli(capsys, "job", "stop", "-namespace", "*", "web")
    assert code == 1 and err.startswith("Prefix matched multiple jobs\n\nID   Namespace"), err

    code, _, _ = await cli(capsys, "job", "stop", "-detach", "-namespace", PROD, "web")
    assert code == 0
    assert nomad.server.job("web", PROD)["Stop"] is True  # type: ignore[index]
    assert nomad.server.job("web")["Stop"] is False  # type: ignore[index]
    code, out, _ = await cli(capsys, "alloc", "status", "-namespace", PROD,
                             nomad.server.job_allocs("web", PROD)[0].id[:8])
    assert code == 0 and "Job ID              = web" in out
    assert nomad.queries("/v1/allocations")[-1]["namespace"] == PROD


async def test_job_run_submits_into_the_jobs_own_namespace(
        capsys: pytest.CaptureFixture[str], nomad: Nomad, tmp_path: Path) -> None:
    await nomad.server.upsert_namespace(Namespace(name=PROD))
    job_file = write_file(tmp_path, "web.hcl", '''\
job "web" {
  namespace   = "prod"
  datacenters = ["dc1"]
  group "g" {
    task "t" {
      driver = "mock_driver"
      config { run_for = "1h" }
    }
  }
}
''')
    code, out, err = await cli(capsys, "job", "run", "-namespace", "default", str(job_file))
    assert (code, err) == (0, ""), out
    assert nomad.server.job("web", PROD) is not None and nomad.server.job("web") is None
    assert {q.get("namespace") for q in nomad.queries("/v1/jobs", "POST")} == {PROD}
    assert all(s.query.get("namespace") == PROD for s in nomad.seen)  # the monitor too

    code, _, err = await cli(capsys, "job", "run", "-namespace", "*", str(job_file))
    assert (code, err) == (1, WILDCARD_REFUSED)
