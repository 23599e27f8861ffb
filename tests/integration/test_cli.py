"""The real command line (``python -m nomad_client ...``) against a real agent: run a job and
read its logs and status, list nodes, refuse a missing file, report a job that cannot be
placed, and apply and read dynamic node metadata.

Touches only the agents the fixtures start, the CLI processes it runs, and their output.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Mapping

import attrs

from tests.integration.harness import REPO, AgentProcess, wait_client_status

CLI_TIMEOUT = 30.0


@attrs.frozen
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


async def cli(agent: AgentProcess, *args: str, env_vars: Mapping[str, str] | None = None
              ) -> CliResult:
    """Run one CLI command against ``agent`` (through NOMAD_ADDR, plus ``env_vars``) and
    collect its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    env["NOMAD_ADDR"] = agent.address
    env.update(env_vars or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nomad_client", *args, cwd=str(REPO), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"CLI {args} did not finish within {CLI_TIMEOUT}s") from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


async def test_job_run_logs_and_status(agent: AgentProcess) -> None:
    run = await cli(agent, "job", "run", "testdata/jobs/hello.nomad.hcl")
    assert run.code == 0, run.output
    assert "Monitoring evaluation" in run.stdout

    async with agent.api() as api:
        [stub] = await api.job_allocations("hello")
        alloc = await wait_client_status(api, stub["ID"], "complete", "failed")
        assert alloc["ClientStatus"] == "complete"
        [node] = await api.nodes_list()
    short = alloc["ID"][:8]
    assert f'Allocation "{short}" created' in run.stdout

    logs = await cli(agent, "alloc", "logs", short)
    assert logs.code == 0, logs.output
    assert logs.stdout == "hello from hello\n"

    status = await cli(agent, "job", "status", "hello")
    assert status.code == 0, status.output
    assert re.search(r"^ID\s+= hello$", status.stdout, re.M), status.stdout
    rows = [line for line in status.stdout.splitlines() if line.startswith(short)]
    assert len(rows) == 1, status.stdout
    assert "complete" in rows[0] and "hello" in rows[0]

    nodes = await cli(agent, "node", "status")
    assert nodes.code == 0, nodes.output
    rows = [line for line in nodes.stdout.splitlines() if line.startswith(node["ID"][:8])]
    assert len(rows) == 1, nodes.stdout
    assert "ready" in rows[0] and node["Name"] in rows[0]


async def test_job_run_missing_file_fails(agent: AgentProcess) -> None:
    path = "testdata/jobs/no-such-job.nomad.hcl"
    result = await cli(agent, "job", "run", path)
    assert result.code == 1, result.output
    assert path in result.stderr
    assert "no such file" in result.stderr
    assert result.stdout == ""
    async with agent.api() as api:
        assert await api.jobs_list() == []


async def test_job_run_reports_missing_driver(agent: AgentProcess) -> None:
    result = await cli(agent, "job", "run", "testdata/jobs/taskapi-example.docker.nomad.hcl")
    assert result.code == 2, result.output
    assert "failed to place" in result.output
    assert "missing driver docker" in result.output
    async with agent.api() as api:
        assert await api.job_allocations("taskapi-example") == []


async def test_node_meta_apply_then_read(agent: AgentProcess) -> None:
    before = await cli(agent, "node", "meta", "read")
    assert before.code == 0, before.output
    assert not re.search(r"^a\s+= b$", before.stdout, re.M)

    applied = await cli(agent, "node", "meta", "apply", "a=b")
    assert applied.code == 0, applied.output

    read = await cli(agent, "node", "meta", "read")
    assert read.code == 0, read.output
    all_meta, _, rest = read.stdout.partition("Dynamic Meta")
    assert re.search(r"^a\s+= b$", all_meta, re.M), read.stdout
    assert re.search(r"^a\s+= b$", rest.partition("Static Meta")[0], re.M), read.stdout
    async with agent.api() as api:
        assert (await api.client_metadata_read())["Meta"]["a"] == "b"
