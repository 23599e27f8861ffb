"""Namespaces on a real agent: applied with the real CLI, one job ID running in two
namespaces (chosen with ``-namespace`` and with ``NOMAD_NAMESPACE``), listed with
``-namespace '*'``; and python-nomad's namespace calls, unmodified.

Touches only the agents the fixtures start, the CLI processes it runs, and their output.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nomad
import nomad.api.exceptions as nomad_errors
import pytest

from tests.integration.harness import AgentProcess, wait_client_status
from tests.integration.test_cli import cli

pytestmark = pytest.mark.timeout(90)

SLEEPER = '''\
job "sleeper" {
  datacenters = ["*"]
  group "g" {
    task "t" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["3600"]
      }
      kill_timeout = "1s"
    }
  }
}
'''
PROD_SPEC = '''\
name        = "prod"
description = "Production"
meta {
  team = "payments"
}
capabilities {
  enabled_task_drivers = ["raw_exec"]
  task_api             = "opt_in"
}
'''


async def test_one_job_id_runs_in_two_namespaces(agent: AgentProcess, tmp_path: Path) -> None:
    spec = tmp_path / "prod.hcl"
    spec.write_text(PROD_SPEC)
    applied = await cli(agent, "namespace", "apply", str(spec))
    assert (applied.code, applied.stdout) == (0, 'Successfully applied namespace "prod"!\n'), \
        applied.output
    applied = await cli(agent, "namespace", "apply", "-description", "Development", "dev")
    assert applied.code == 0, applied.output
    listed = await cli(agent, "namespace", "list")
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        "Name", "default", "dev", "prod"], listed.output

    job_file = tmp_path / "sleeper.nomad.hcl"
    job_file.write_text(SLEEPER)
    by_flag = await cli(agent, "job", "run", "-namespace", "prod", str(job_file))
    assert by_flag.code == 0, by_flag.output
    by_env = await cli(agent, "job", "run", str(job_file), env_vars={"NOMAD_NAMESPACE": "dev"})
    assert by_env.code == 0, by_env.output

    everywhere = await cli(agent, "job", "status", "-namespace", "*")
    rows = sorted(line.split()[:2] for line in everywhere.stdout.splitlines()[1:])
    assert rows == [["sleeper", "dev"], ["sleeper", "prod"]], everywhere.output
    alone = await cli(agent, "job", "status")  # the default namespace holds none
    assert alone.stdout == "No running jobs\n", alone.output

    async with agent.api() as api:
        for namespace in ("prod", "dev"):
            [stub] = await api.job_allocations("sleeper", namespace)
            assert stub["Namespace"] == namespace
            alloc = await wait_client_status(api, stub["ID"], "running")
            assert alloc["Job"]["Namespace"] == namespace
        status = await cli(agent, "job", "status", "-namespace", "prod", "sleeper")
        assert "Namespace     = prod" in status.stdout, status.output

        # One stops; the other runs on.
        stopped = await cli(agent, "job", "stop", "-namespace", "dev", "sleeper")
        assert stopped.code == 0, stopped.output
        [dev_alloc] = await api.job_allocations("sleeper", "dev")
        await wait_client_status(api, dev_alloc["ID"], "complete")
        [prod_alloc] = await api.job_allocations("sleeper", "prod")
        assert (await api.allocation_get(prod_alloc["ID"]))["ClientStatus"] == "running"

    refused = await cli(agent, "namespace", "delete", "prod")
    assert refused.code == 1 and "has non-terminal jobs" in refused.stderr, refused.output
    deleted = await cli(agent, "job", "stop", "-purge", "-namespace", "prod", "sleeper")
    assert deleted.code == 0, deleted.output


# ---- python-nomad ----------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_nomad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-nomad reads NOMAD_NAMESPACE and more from the environment whenever an argument
    is left out: none may leak into these tests."""
    for name in [n for n in os.environ if n.startswith("NOMAD_")]:
        monkeypatch.delenv(name)


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """One python-nomad call, off the event loop."""
    return await asyncio.to_thread(fn, *args)


async def test_python_nomad_namespace_calls(agent: AgentProcess) -> None:
    client = nomad.Nomad(address=agent.address, timeout=15)
    created = await call(client.namespace.create_namespace,
                         {"Name": "team-a", "Description": "Team A", "Meta": {"k": "v"}})
    assert created.status_code == 200
    listed = await call(client.namespaces.get_namespaces)
    assert [n["Name"] for n in listed] == ["default", "team-a"]
    assert await call(client.namespaces.__contains__, "team-a")
    one = await call(client.namespace.get_namespace, "team-a")
    assert (one["Name"], one["Description"], one["Meta"]) == ("team-a", "Team A", {"k": "v"})

    updated = await call(client.namespace.update_namespace, "team-a",
                         {"Name": "team-a", "Description": "A team"})
    assert updated.status_code == 200
    assert (await call(client.namespace.get_namespace, "team-a"))["Description"] == "A team"
    assert [n["Name"] for n in await call(client.namespaces.get_namespaces, "te")] == ["team-a"]

    # python-nomad's namespace= goes with its job calls: none in team-a yet.
    in_team = nomad.Nomad(address=agent.address, timeout=15, namespace="team-a")
    assert await call(in_team.jobs.get_jobs) == []

    await call(client.namespace.delete_namespace, "team-a")
    with pytest.raises(nomad_errors.URLNotFoundNomadException):
        await call(client.namespace.get_namespace, "team-a")
    with pytest.raises(nomad_errors.BaseNomadException) as refused:
        await call(client.namespace.delete_namespace, "default")
    answer = refused.value.nomad_resp  # type: ignore[attr-defined]
    assert answer.text == "can not delete default namespace"
