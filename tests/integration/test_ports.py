"""Group network ports end to end: a jobspec with a dynamic port, run by the CLI on a real
agent; each allocation's raw_exec task serves HTTP on the port it was given
(``$NOMAD_IP_http:$NOMAD_PORT_http``), and ``alloc status`` shows the address."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nomad_client.structs.network import allocated_ports
from tests.integration.harness import AgentProcess, eventually, wait_task_state
from tests.integration.test_cli import cli

pytestmark = pytest.mark.timeout(90)

# Each allocation writes its ID where its server can show it, then serves its task dir on
# the address the agent gave it.
JOBSPEC = """
job "ports" {
  group "web" {
    count = 2
    network {
      port "http" {}
    }
    task "server" {
      driver = "raw_exec"
      config {
        command = "/bin/sh"
        args = ["-c", <<-EOT
          echo "$NOMAD_ALLOC_ID $NOMAD_ADDR_http" > "$NOMAD_TASK_DIR/who"
          exec %(python)s -m http.server "$NOMAD_PORT_http" --bind "$NOMAD_IP_http" \\
            --directory "$NOMAD_TASK_DIR"
        EOT
        ]
      }
    }
  }
}
"""


async def fetch(session: aiohttp.ClientSession, port: int) -> str | None:
    """``/who`` from the server on 127.0.0.1:``port``; None while it does not answer."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/who") as response:
            return await response.text() if response.status == 200 else None
    except aiohttp.ClientError:
        return None


async def test_each_allocation_serves_on_its_own_dynamic_port(
        agent: AgentProcess, tmp_path: Path) -> None:
    spec = tmp_path / "ports.nomad.hcl"
    spec.write_text(JOBSPEC % {"python": sys.executable})
    run = await cli(agent, "job", "run", str(spec))
    assert run.code == 0, run.output

    async with agent.api() as api:
        stubs = await eventually(lambda: _two(api), message="two allocations")
        allocs: list[dict[str, Any]] = [
            await wait_task_state(api, stub["ID"], "server", "running") for stub in stubs]
    ports = {a["ID"]: allocated_ports(a["AllocatedResources"]) for a in allocs}
    values = [port.value for (port,) in ports.values()]
    assert len(set(values)) == 2, ports
    for (port,) in ports.values():
        assert port.label == "http" and port.host_ip == "127.0.0.1"  # the agent's bind
        assert 20000 <= port.value <= 32000

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for alloc_id, (port,) in ports.items():
            answer = await eventually(functools.partial(fetch, session, port.value),
                                      timeout=30,
                                      message=f"the server of {alloc_id} on {port.value}")
            assert answer.split() == [alloc_id, f"127.0.0.1:{port.value}"]

    alloc_id, (port,) = next(iter(ports.items()))
    status = await cli(agent, "alloc", "status", alloc_id[:8])
    assert status.code == 0, status.output
    assert 'Allocation Addresses (mode = "host"):' in status.stdout
    assert f"127.0.0.1:{port.value}" in status.stdout

    stop = await cli(agent, "job", "stop", "ports")
    assert stop.code == 0, stop.output


async def _two(api: Any) -> list[dict[str, Any]]:
    found = await api.job_allocations("ports")
    return found if len(found) == 2 else []
