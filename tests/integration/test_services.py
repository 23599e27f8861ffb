"""Native service discovery end to end, ACLs on: job "backend" (a jobspec run by the CLI)
serves HTTP on its dynamic port with ``python -m http.server`` and registers a service with
an http check; job "frontend"'s task, through its own Task API socket with its workload
identity and no policy at all, reads ``/v1/service/backend`` until it finds the address,
connects to it and gets 200. The check shows ``success``; stopping backend removes its
registration.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_client.api import ApiClient
from tests.integration.harness import (
    NEEDS_CURL,
    AgentProcess,
    bootstrap_acls,
    eventually,
    raw_exec_job,
    run_job,
    wait_task_state,
)
from tests.integration.test_cli import cli

pytestmark = [
    pytest.mark.timeout(120),
    NEEDS_CURL,
]

BACKEND = """
job "backend" {
  group "web" {
    network {
      port "http" {}
    }
    service {
      name     = "backend"
      provider = "nomad"
      port     = "http"
      tags     = ["v1"]
      check {
        name     = "root"
        type     = "http"
        path     = "/"
        interval = "1s"
        timeout  = "1s"
      }
    }
    task "server" {
      driver = "raw_exec"
      config {
        command = "%(python)s"
        args    = ["-m", "http.server", "${NOMAD_PORT_http}", "--bind", "${NOMAD_IP_http}",
                   "--directory", "${NOMAD_TASK_DIR}"]
      }
    }
  }
}
"""

# The frontend's task: find backend through the Task API (its own socket, its own identity),
# call it, and say what came of each step on stdout; then stay up.
FRONTEND = r"""
api() { curl -s --unix-socket "$NOMAD_SECRETS_DIR/api.sock" -H "X-Nomad-Token: $NOMAD_TOKEN" \
  "$@"; }
echo "job read: $(api -o /dev/null -w '%%{http_code}' http://localhost/v1/job/backend)"
while :; do
  address=$(api http://localhost/v1/service/backend | %(python)s -c '
import json, sys
found = json.load(sys.stdin)
print("{Address}:{Port}".format(**found[0]) if found else "")' 2>/dev/null)
  if [ -n "$address" ]; then
    code=$(curl -s -o /dev/null -w '%%{http_code}' "http://$address/")
    echo "backend at $address answered $code"
    [ "$code" = 200 ] && break
  fi
  sleep 0.2
done
exec sleep 3600
"""


async def logs(api: ApiClient, alloc_id: str, task: str) -> str:
    return (await api.alloc_logs(alloc_id, task)).decode(errors="replace")


async def test_a_workload_finds_another_through_its_socket_without_a_policy(
        short_agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    agent = short_agent_factory(acl=True)
    await agent.start()
    token = await bootstrap_acls(agent)
    spec = tmp_path / "backend.nomad.hcl"
    spec.write_text(BACKEND % {"python": sys.executable})
    run = await cli(agent, "job", "run", "-detach", str(spec),
                    env_vars={"NOMAD_TOKEN": token})
    assert run.code == 0, run.output

    async with agent.api(token) as api:
        (backend,) = await eventually(lambda: api.job_allocations("backend"),
                                      message="backend's allocation")
        await wait_task_state(api, backend["ID"], "server", "running")
        (registration,) = await eventually(lambda: api.service_registrations("backend"),
                                           timeout=30, message="backend's registration")
        (port,) = (await api.allocation_get(backend["ID"]))["AllocatedResources"]["Shared"][
            "Ports"]
        assert (registration["Address"], registration["Port"]) == (port["HostIP"],
                                                                   port["Value"])
        assert (registration["JobID"], registration["Tags"]) == ("backend", ["v1"])

        async def check_passed() -> dict[str, Any] | None:
            checks = await api.alloc_checks(backend["ID"])
            return next((c for c in checks.values() if c["Status"] == "success"), None)
        check = await eventually(check_passed, timeout=30, message="the http check to pass")
        assert (check["CheckName"], check["ServiceName"], check["Output"]) == (
            "root", "backend", "nomad: http ok")

        (frontend,) = await run_job(api, raw_exec_job(
            "frontend", FRONTEND % {"python": sys.executable}, identity={"Env": True}))
        await wait_task_state(api, frontend["ID"], "t", "running")
        output = await eventually(
            lambda: _answered(api, frontend["ID"]), timeout=60,
            message="the frontend to reach backend")
        assert f"backend at {port['HostIP']}:{port['Value']} answered 200" in output
        # The same identity, without a policy, may not read the job itself.
        assert "job read: 403" in output

        await api.job_deregister("backend")
        await eventually(lambda: _gone(api), timeout=30,
                         message="backend's registration to go")


async def _answered(api: ApiClient, alloc_id: str) -> str | None:
    output = await logs(api, alloc_id, "t")
    return output if "answered 200" in output else None


async def _gone(api: ApiClient) -> bool:
    return await api.service_registrations("backend") == []
