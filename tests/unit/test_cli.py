"""CLI parsing and output against the real agent API: a server, the router with every endpoint
and a client running mock tasks, in this process, served on a real TCP port (and a Unix
socket). The router also notes each request it is handed, so a test can check what the CLI
sent as well as what it printed.

``main()`` runs its own event loop, so the CLI runs in a worker thread while the agent runs on
the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from nomad_client.agent.client import Client
from nomad_client.cli import format as fmt
from nomad_client.cli import monitor
from nomad_client.cli.main import main
from nomad_client.client.drivers.base import TaskConfig, TaskHandle
from nomad_client.client.drivers.mock import MockDriver
from nomad_client.http.context import TCP_LISTENER, ListenerContext
from nomad_client.http.router import Router
from nomad_client.jobspec import canonicalize_job
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.structs.models import DriverInfo
from tests.unit.factories import (
    InProcessAgent,
    acl_token,
    job,
    make_alloc,
    node,
    seed,
    start_agent,
    unix_socket,
    wait_until,
)

EVAL_ID = "e1e1e1e1-0000-4000-8000-000000000001"
ALLOC_ID = "a1a1a1a1-0000-4000-8000-000000000001"
ALLOC2_ID = "a1a1b2b2-0000-4000-8000-000000000002"
NODE_ID = "f7f7f7f7-0000-4000-8000-000000000001"
NODE2_ID = "c3c3c3c3-0000-4000-8000-000000000002"
MODIFIED = "2026-01-02T03:04:05Z"


@attrs.define
class Seen:
    """One request as the router was handed it, and the index its answer carried."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    answer_index: str | None = None


class RecordingRouter(Router):
    """The agent's router, noting every request it dispatches."""

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self.seen: list[Seen] = []

    async def dispatch(self, request: web.BaseRequest, ctx: ListenerContext
                       ) -> web.StreamResponse:
        seen = Seen(request.method, request.path, dict(request.query), dict(request.headers))
        self.seen.append(seen)
        response = await super().dispatch(request, ctx)
        seen.answer_index = response.headers.get("X-Nomad-Index")
        return response


class GatedMockDriver(MockDriver):
    """The mock driver, whose task starts wait while ``gate`` is clear (it starts set)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def start_task(self, cfg: TaskConfig) -> TaskHandle:
        await self.gate.wait()
        return await super().start_task(cfg)


@attrs.define
class Nomad:
    """The agent the CLI talks to (its address is in $NOMAD_ADDR)."""

    agent: InProcessAgent
    driver: GatedMockDriver

    @property
    def server(self) -> Server:
        return self.agent.server

    @property
    def client(self) -> Client:
        assert self.agent.client is not None
        return self.agent.client

    @property
    def seen(self) -> list[Seen]:
        router = self.agent.api.router
        assert isinstance(router, RecordingRouter)
        return router.seen

    def paths(self, method: str | None = None) -> list[str]:
        return [s.path for s in self.seen if method is None or s.method == method]

    def queries(self, path: str, method: str = "GET") -> list[dict[str, str]]:
        return [s.query for s in self.seen if s.path == path and s.method == method]

    async def run_job(self, spec: Mapping[str, Any]) -> str:
        """Register ``spec`` as the API would; its evaluation's ID."""
        eval_id, _ = await self.server.register_job(canonicalize_job(dict(spec)))
        return eval_id

    def job_status(self, job_id: str) -> str:
        return self.server.job_status(stored_job(self, job_id))

    def alloc_status(self, alloc_id: str) -> str:
        alloc = self.server.store.get("allocs", alloc_id)
        return "" if alloc is None else str(alloc.client_status)


async def start_nomad(base: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch, *,
                      acl: bool = False) -> Nomad:
    driver = GatedMockDriver()
    agent = await start_agent(base, keyring, acl=acl, static_meta={"rack": "r1", "old": "x"},
                              drivers={"mock_driver": driver}, router_type=RecordingRouter)
    monkeypatch.delenv("NOMAD_TOKEN", raising=False)
    monkeypatch.setenv("NOMAD_ADDR", agent.api.url)
    monkeypatch.setattr(monitor, "POLL_PAUSE", 0.01)
    return Nomad(agent, driver)


@pytest.fixture
async def acl_nomad(tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
                    ) -> AsyncIterator[Nomad]:
    started = await start_nomad(tmp_path, keyring, monkeypatch, acl=True)
    yield started
    await started.agent.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``run``, off the event loop: the agent keeps serving while the CLI waits for it."""
    return await asyncio.to_thread(run, capsys, *argv)


def mock_job(job_id: str = "web", *, tasks: tuple[str, ...] = ("t",), run_for: str = "1h",
             **fields: Any) -> dict[str, Any]:
    """A job for the client's mock driver: group "g", one copy of each of ``tasks``."""
    spec = job(driver="mock_driver", task={"Config": {"run_for": run_for}},
               **{"ID": job_id, "Name": job_id, "Datacenters": ["dc1"], **fields})
    group = spec["TaskGroups"][0]
    group["Tasks"] = [{**group["Tasks"][0], "Name": name} for name in tasks]
    return spec


def stored_job(nomad: Nomad, job_id: str = "web") -> dict[str, Any]:
    stored = nomad.server.job(job_id)
    assert stored is not None, f"job {job_id} was not registered"
    return dict(stored)


def newest_eval(nomad: Nomad, job_id: str) -> str:
    evals = [e for e in nomad.server.store.values("evals") if e.job_id == job_id]
    return str(max(evals, key=lambda e: e.create_index).id)


# ---------------------------------------------------------------------------------------
# Formatting helpers


def test_table_aligns_columns_and_fills_empty_cells() -> None:
    text = fmt.table(["ID", "Class", "Status"], [["abc", "", "ready"], ["a", "big", None]])
    assert text.splitlines() == [
        "ID   Class   Status",
        "abc  <none>  ready",
        "a    big     <none>",
    ]


def test_kv_aligns_equals() -> None:
    assert fmt.kv([("ID", "x"), ("Node Pool", ""), ("Drain", False)]).splitlines() == [
        "ID        = x", "Node Pool = <none>", "Drain     = false"]


def test_pretty_time_diff_and_sizes() -> None:
    now = 1_000_000.0
    assert fmt.pretty_time_diff(int((now - 133) * 1e9), now) == "2m13s ago"
    assert fmt.pretty_time_diff(int((now - 3603) * 1e9), now) == "1h ago"
    assert fmt.pretty_time_diff(int((now - 90061) * 1e9), now) == "1d1h ago"
    assert fmt.pretty_time_diff(0, now) == ""
    assert [fmt.ibytes(n) for n in (12, 4096, 12 * 1024 * 1024 + 5)] == [
        "12 B", "4.0 KiB", "12 MiB"]


def test_rfc3339_with_nanoseconds() -> None:
    dt = fmt.from_rfc3339("2026-01-02T03:04:05.123456789Z")
    assert dt is not None and dt.microsecond == 123456 and dt.utcoffset() is not None
    assert fmt.from_rfc3339("0001-01-01T00:00:00Z") is None


def test_placement_failure_lines() -> None:
    lines = monitor.placement_failure_lines("g", {
        "NodesEvaluated": 2, "ConstraintFiltered": {"missing drivers": 1},
        "NodesExhausted": 1, "DimensionExhausted": {"memory": 1}, "CoalescedFailures": 2})
    assert lines == [
        'Task Group "g" (failed to place 3 allocations):',
        '  * Constraint "missing drivers": 1 nodes excluded by filter',
        "  * Resources exhausted on 1 nodes",
        '  * Dimension "memory" exhausted on 1 nodes',
    ]


# ---------------------------------------------------------------------------------------
# Dispatch and usage


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "-help")
    assert code == 0 and "job run" in out
    code, _, err = run(capsys, "frobnicate")
    assert code == 1 and "unknown command 'frobnicate'" in err
    code, _, err = run(capsys, "job", "status", "-bogus")
    assert code == 1 and "unrecognized arguments: -bogus" in err
    code, _, err = run(capsys, "job", "run")
    assert code == 1 and "takes 1 argument" in err
    code, out, _ = run(capsys, "job", "run", "-h")
    assert code == 0 and "-var-file=FILE" in out and "-detach" in out
    assert "Traceback" not in err


def test_agent_is_handed_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[list[str]] = []
    fake_run = types.ModuleType("nomad_client.agent.run")
    fake_run.run_agent_command = lambda argv: got.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nomad_client.agent.run", fake_run)
    assert main(["agent", "-dev", "-http-port=0"]) == 7
    assert got == [["-dev", "-http-port=0"]]


def test_python_dash_m(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nomad_client", "-help"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0 and "Usage: nomad-client" in proc.stdout


# ---------------------------------------------------------------------------------------
# job


@attrs.define
class StubJobspec:
    """Stands in for the jobspec parser (the real one is tested elsewhere): records its
    calls and returns ``job``."""

    job: dict[str, Any] = attrs.field(factory=mock_job)
    calls: list[tuple[Any, ...]] = attrs.field(factory=list)


@pytest.fixture
def jobspec(monkeypatch: pytest.MonkeyPatch) -> StubJobspec:
    stub = StubJobspec()

    class JobspecError(Exception):
        pass

    def parse_jobspec(text: str, filename: str, variables: Any,
                      var_files: Any = None) -> dict[str, Any]:
        stub.calls.append((text, filename, variables, var_files))
        if "broken" in text:
            raise JobspecError(f"{filename}:3: Unsupported argument")
        return stub.job

    def parse_var_assignments(pairs: list[str]) -> dict[str, str]:
        return dict(p.split("=", 1) for p in pairs)

    mod = types.ModuleType("nomad_client.jobspec")
    mod.parse_jobspec = parse_jobspec  # type: ignore[attr-defined]
    mod.JobspecError = JobspecError  # type: ignore[attr-defined]
    mod.parse_var_assignments = parse_var_assignments  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nomad_client.jobspec", mod)
    return stub


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)"


def without_stamps(out: str) -> list[str]:
    """Monitor lines with their timestamps checked and removed."""
    assert all(re.match(rf"^(==> |    ){STAMP}: ", line) for line in out.splitlines()), out
    return [re.sub(rf"^(==> |    ){STAMP}: ", r"\1", line) for line in out.splitlines()]


async def test_job_run_monitors_until_running(
    capsys: pytest.CaptureFixture[str], nomad: Nomad, tmp_path: Path, jobspec: StubJobspec,
) -> None:
    job_file = tmp_path / "web.nomad.hcl"
    job_file.write_text('job "web" {}\n')
    var_file = tmp_path / "vars.hcl"
    var_file.write_text('x = "1"\n')
    allocations = "/v1/job/web/allocations"

    def monitor_blocks_on_allocations() -> bool:
        return any(s.path == allocations and "index" in s.query for s in nomad.seen)

    nomad.driver.gate.clear()  # the allocation stays pending until the monitor waits on it
    running = asyncio.ensure_future(cli(capsys, "job", "run", "-var", "a=b", "--var=c=d",
                                        f"-var-file={var_file}", str(job_file)))
    await wait_until(monitor_blocks_on_allocations, "the monitor's blocking query")
    nomad.driver.gate.set()
    code, out, err = await running

    assert (code, err) == (0, "")
    assert jobspec.calls == [('job "web" {}\n', str(job_file), {"a": "b", "c": "d"},
                              [(str(var_file), 'x = "1"\n')])]
    assert nomad.paths("POST") == ["/v1/jobs"]
    assert canonicalize_job(jobspec.job).items() <= stored_job(nomad).items()
    (alloc,) = nomad.server.job_allocs("web")
    eval_id, node_id = alloc.eval_id, nomad.client.node_id
    assert without_stamps(out) == [
        f'==> Monitoring evaluation "{eval_id[:8]}"',
        '    Evaluation triggered by job "web"',
        f'    Allocation "{alloc.id[:8]}" created: node "{node_id[:8]}", group "g"',
        '    Evaluation status changed: "pending" -> "complete"',
        f'==> Evaluation "{eval_id[:8]}" finished with status "complete"',
        f'    Allocation "{alloc.id[:8]}" status changed: "pending" -> "running"',
    ]
    # Once the evaluation was done, the allocations were followed with blocking queries
    # carrying the last index seen.
    followed = [s for s in nomad.seen if s.path == allocations]
    first_blocking = next(i for i, s in enumerate(followed) if s.query)
    assert followed[first_blocking].query == {
        "index": followed[first_blocking - 1].answer_index, "wait": "5s"}


async def test_job_run_placement_failure_exits_2(
    capsys: pytest.CaptureFixture[str], nomad: Nomad, tmp_path: Path, jobspec: StubJobspec,
) -> None:
    jobspec.job = mock_job(Constraints=[{"LTarget": "${meta.rack}", "RTarget": "r9",
                                         "Operand": "="}])
    job_file = tmp_path / "web.hcl"
    job_file.write_text("job {}")
    code, out, _ = await cli(capsys, "job", "run", str(job_file))
    assert code == 2
    assert 'finished with status "complete" but failed to place all allocations:' in out
    assert 'Task Group "g" (failed to place 1 allocation):' in out
    assert ('      * Constraint "constraint "${meta.rack} = r9" not met": 1 nodes excluded '
            "by filter") in out.splitlines()
    # Our server has no blocked evaluations: nothing waits for capacity.
    assert "waiting for additional capacity" not in out
    assert nomad.server.job_allocs("web") == []


async def test_job_run_detach(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                              tmp_path: Path, jobspec: StubJobspec) -> None:
    job_file = tmp_path / "web.hcl"
    job_file.write_text("job {}")
    code, out, _ = await cli(capsys, "job", "run", "-detach", str(job_file))
    assert code == 0
    assert out == f"Job registration successful\nEvaluation ID: {newest_eval(nomad, 'web')}\n"
    assert nomad.paths() == ["/v1/jobs"]


async def test_job_run_bad_input(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                 tmp_path: Path, jobspec: StubJobspec) -> None:
    code, _, err = await cli(capsys, "job", "run", str(tmp_path / "nope.hcl"))
    assert code == 1
    assert f'Error reading job file "{tmp_path / "nope.hcl"}": no such file' in err
    broken = tmp_path / "broken.hcl"
    broken.write_text("broken")
    code, _, err = await cli(capsys, "job", "run", str(broken))
    assert code == 1
    assert err.strip() == f"Error getting job struct: {broken}:3: Unsupported argument"
    assert nomad.seen == []


async def test_job_run_with_real_jobspec(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                         tmp_path: Path) -> None:
    job_file = tmp_path / "web.hcl"
    job_file.write_text('job "web" {\n  group "g" {\n    task "t" {\n      driver = "raw_exec"\n'
                        '      config {\n        command = "/bin/sleep"\n      }\n    }\n  }\n}\n')
    code, _, err = await cli(capsys, "job", "run", "-detach", str(job_file))
    assert (code, err) == (0, "")
    job = stored_job(nomad)  # the client has no raw_exec driver: nothing runs
    assert job["ID"] == "web" and job["TaskGroups"][0]["Tasks"][0]["Driver"] == "raw_exec"


VARS_JOB = ('variable "cmd" {}\nvariable "arg" { default = "1" }\n'
            'job "web" {\n  group "g" {\n    task "t" {\n      driver = "raw_exec"\n'
            '      config {\n        command = var.cmd\n        args = [var.arg]\n      }\n'
            '    }\n  }\n}\n')


async def test_job_run_later_var_file_wins(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                           tmp_path: Path) -> None:
    job_file = tmp_path / "web.hcl"
    job_file.write_text(VARS_JOB)
    first, second = tmp_path / "a.hcl", tmp_path / "b.hcl"
    first.write_text('cmd = "/bin/true"\narg = "from-a"\n')
    second.write_text('cmd = "/bin/sleep"\n')
    code, _, err = await cli(capsys, "job", "run", "-detach", f"-var-file={first}",
                             f"-var-file={second}", str(job_file))
    assert (code, err) == (0, "")
    config = stored_job(nomad)["TaskGroups"][0]["Tasks"][0]["Config"]
    assert config == {"command": "/bin/sleep", "args": ["from-a"]}


async def test_job_run_var_file_error_names_its_file_and_line(
    capsys: pytest.CaptureFixture[str], nomad: Nomad, tmp_path: Path,
) -> None:
    job_file = tmp_path / "web.hcl"
    job_file.write_text(VARS_JOB)
    first, second = tmp_path / "a.hcl", tmp_path / "b.hcl"
    first.write_text('cmd = "/bin/true"\n')
    second.write_text('cmd = "/bin/sleep"\n\nmystery = 1\n')
    code, _, err = await cli(capsys, "job", "run", "-detach", f"-var-file={first}",
                             f"-var-file={second}", str(job_file))
    assert code == 1
    assert err.startswith(f"Error getting job struct: {second}:3: ")
    assert "mystery" in err
    assert nomad.seen == []


async def test_job_status_list(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await nomad.run_job(mock_job("web"))
    await nomad.run_job(mock_job("batch-1", run_for="0s", Type="batch", Priority=70))
    await wait_until(lambda: nomad.job_status("web") == "running"
                     and nomad.job_status("batch-1") == "dead", "the jobs to settle")
    code, out, _ = await cli(capsys, "job", "status")

    def submitted(job_id: str) -> str:
        return fmt.format_unix_nanos(stored_job(nomad, job_id)["SubmitTime"])

    assert code == 0
    assert out.splitlines() == [
        "ID       Type     Priority  Status   Submit Date",
        f"batch-1  batch    70        dead     {submitted('batch-1')}",
        f"web      service  50        running  {submitted('web')}",
    ]


async def test_job_status_one(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    # A job no node can run, and an allocation of it as the test wants it: on another node,
    # pending, created 65 s and modified 5 s ago.
    spec = mock_job(Datacenters=["dc1", "dc2"])
    spec["TaskGroups"][0]["Tasks"][0]["Driver"] = "docker"
    await nomad.run_job(spec)
    now_ns = time.time_ns()
    await seed(nomad.server, allocs=(make_alloc(
        id=ALLOC_ID, eval_id=EVAL_ID, name="web.g[0]", node_id=NODE_ID, node_name="client-9",
        job_id="web", job=stored_job(nomad), client_status="pending",
        create_time=now_ns - 65 * 10**9, modify_time=now_ns - 5 * 10**9),))
    code, out, _ = await cli(capsys, "job", "status", "we")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "ID            = web"
    assert "Datacenters   = dc1,dc2" in lines
    assert "Periodic      = false" in lines
    # The summary counts the pending allocation as starting and what could not be placed.
    s = lines.index("Summary")
    assert lines[s + 1].split() == ["Task", "Group", "Queued", "Starting", "Running", "Failed",
                                    "Complete", "Lost", "Unknown"]
    assert lines[s + 2].split() == ["g", "1", "1", "0", "0", "0", "0", "0"]
    j = lines.index("Allocations")
    assert lines[j + 1] == ("ID        Node ID   Task Group  Version  Desired  Status   "
                            "Created   Modified")
    assert lines[j + 2].split()[:6] == ["a1a1a1a1", "f7f7f7f7", "g", "0", "run", "pending"]
    # Created 65 s and modified 5 s before the allocation was stored (plus test run time).
    assert re.fullmatch(r"1m[5-9]s ago  +[5-9]s ago", lines[j + 2].split("pending")[1].strip())


async def test_job_status_errors(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    code, _, err = await cli(capsys, "job", "status", "zzz")
    assert code == 1 and err == 'No job(s) with prefix or id "zzz" found\n'


async def test_job_stop_purge_detach(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await nomad.run_job(mock_job())
    code, out, _ = await cli(capsys, "job", "stop", "-purge", "-detach", "web")
    assert (code, out) == (0, f"{newest_eval(nomad, 'web')}\n")
    deletes = [(s.path, s.query) for s in nomad.seen if s.method == "DELETE"]
    assert deletes == [("/v1/job/web", {"purge": "true"})]
    assert nomad.server.job("web") is None and nomad.server.jobs() == []


async def test_job_stop_monitors(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await nomad.run_job(mock_job())
    code, out, _ = await cli(capsys, "job", "stop", "web")
    assert code == 0
    assert 'finished with status "complete"' in out
    assert nomad.queries("/v1/job/web", "DELETE") == [{}]
    assert stored_job(nomad)["Stop"] is True


# ---------------------------------------------------------------------------------------
# alloc


@pytest.fixture
async def allocs(nomad: Nomad) -> Nomad:
    """Two allocations running on the agent's client: ALLOC_ID (task t) and ALLOC2_ID
    (tasks a and b), of evaluation EVAL_ID."""
    for alloc_id, tasks in ((ALLOC_ID, ("t",)), (ALLOC2_ID, ("a", "b"))):
        await seed(nomad.server, allocs=(make_alloc(
            id=alloc_id, eval_id=EVAL_ID, name="web.g[0]", node_id=nomad.client.node_id,
            node_name="client-1", job_id="web", job=canonicalize_job(mock_job(tasks=tasks)),
            client_status="pending"),))
    await wait_until(lambda: all(nomad.alloc_status(a) == "running"
                                 for a in (ALLOC_ID, ALLOC2_ID)), "the allocations to run")
    return nomad


async def test_alloc_status_by_prefix(capsys: pytest.CaptureFixture[str], allocs: Nomad) -> None:
    code, out, _ = await cli(capsys, "alloc", "status", "a1a1a1")
    assert code == 0
    lines = out.splitlines()
    assert lines[:5] == ["ID                  = a1a1a1a1", "Eval ID             = e1e1e1e1",
                         "Name                = web.g[0]",
                         f"Node ID             = {allocs.client.node_id[:8]}",
                         "Node Name           = client-1"]
    assert "Desired Description = <none>" in lines
    i = lines.index('Task "t" is "running"')
    assert lines[i + 1] == "Recent Events:"
    assert lines[i + 2].split() == ["Time", "Type", "Description"]
    # Newest first: the task's events as the client recorded them, in reverse.
    alloc = allocs.server.store.get("allocs", ALLOC_ID)
    assert alloc is not None
    events = alloc.task_states["t"].events
    types_in_order = [re.split(r"\s{2,}", line)[1] for line in lines[i + 3:i + 3 + len(events)]]
    assert types_in_order == [e.type for e in reversed(events)]
    assert types_in_order[0] == "Started" and types_in_order[-1] == "Received"
    assert allocs.seen[0].query == {"prefix": "a1a1a1"}
    assert allocs.paths()[1] == f"/v1/allocation/{ALLOC_ID}"


async def test_alloc_status_ambiguous_prefix(capsys: pytest.CaptureFixture[str],
                                             allocs: Nomad) -> None:
    code, out, err = await cli(capsys, "alloc", "status", "a1a1")
    assert code == 1 and out == ""
    assert err.startswith("Prefix matched multiple allocations\n\nID        Eval ID")
    assert "a1a1b2b2" in err


def alloc_dir(nomad: Nomad, alloc_id: str) -> Path:
    adir = nomad.client.alloc_dir_for(alloc_id)
    assert adir is not None
    return adir.path


async def test_alloc_logs(capsys: pytest.CaptureFixture[str], allocs: Nomad) -> None:
    # What the tasks wrote (the mock driver writes nothing itself).
    (alloc_dir(allocs, ALLOC_ID) / "alloc" / "logs" / "t.stdout.0").write_text("stdout of t\n")
    (alloc_dir(allocs, ALLOC2_ID) / "alloc" / "logs" / "b.stderr.0").write_text("stderr of b\n")
    code, out, _ = await cli(capsys, "alloc", "logs", ALLOC_ID)
    assert (code, out) == (0, "stdout of t\n")
    code, out, _ = await cli(capsys, "alloc", "logs", "-stderr", ALLOC2_ID, "b")
    assert (code, out) == (0, "stderr of b\n")
    code, out, err = await cli(capsys, "alloc", "logs", ALLOC2_ID)
    assert code == 1 and "running the following tasks:\n  * a\n  * b" in err
    log_queries = [s.query for s in allocs.seen if "/fs/logs/" in s.path]
    assert log_queries == [{"task": "t", "type": "stdout", "plain": "true"},
                           {"task": "b", "type": "stderr", "plain": "true"}]


async def test_alloc_fs(capsys: pytest.CaptureFixture[str], allocs: Nomad) -> None:
    shared = alloc_dir(allocs, ALLOC_ID) / "alloc"
    (shared / "out.txt").write_bytes(b"file body\n\x00")
    (shared / "out.txt").chmod(0o644)
    stamp = datetime.fromisoformat(MODIFIED).timestamp()
    for path in (shared / "data", shared / "out.txt"):
        os.utime(path, (stamp, stamp))
    modified = fmt.format_time(fmt.from_rfc3339(MODIFIED))

    code, out, _ = await cli(capsys, "alloc", "fs", ALLOC_ID)
    assert code == 0
    listed = [line.split()[-1] for line in out.splitlines()[1:]]
    assert "alloc/" in listed and "t/" in listed

    code, out, _ = await cli(capsys, "alloc", "fs", ALLOC_ID, "alloc")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["Mode", "Size", "Modified", "Time", "Name"]
    data = os.lstat(shared / "data")
    assert lines[1].split() == [stat.filemode(data.st_mode), *fmt.ibytes(data.st_size).split(),
                                modified, "data/"]
    assert lines[3].split() == ["-rw-r--r--", "11", "B", modified, "out.txt"]
    code, out, _ = await cli(capsys, "alloc", "fs", ALLOC_ID, "alloc/out.txt")
    assert code == 0 and out.startswith("file body\n")


# ---------------------------------------------------------------------------------------
# node


async def register_other_nodes(nomad: Nomad) -> None:
    """Beside the client's own node: NODE2_ID (down, draining, another pool and class) and
    a node with another rack."""
    await nomad.server.register_node(node(
        NODE2_ID, name="client-two", datacenter="dc2", node_pool="gpu", node_class="big",
        drain=True, scheduling_eligibility="ineligible"))
    await nomad.server.update_node_status(NODE2_ID, "down")
    await nomad.server.register_node(node("d4d4d4d4-0000-4000-8000-000000000003",
                                          name="elsewhere", meta={"rack": "r9"}))


async def test_node_status_list_with_filter(capsys: pytest.CaptureFixture[str],
                                            nomad: Nomad) -> None:
    await register_other_nodes(nomad)
    code, out, _ = await cli(capsys, "node", "status", "-filter", 'Meta.rack == "r1"')
    assert code == 0
    own = nomad.client.node_id
    rows = sorted([  # listed in ID order
        (own, f"{own[:8]}  default    dc1  client-1    <none>  false  eligible     ready"),
        (NODE2_ID, "c3c3c3c3  gpu        dc2  client-two  big     true   ineligible   down")])
    assert out.splitlines() == [
        "ID        Node Pool  DC   Name        Class   Drain  Eligibility  Status",
        *(row for _, row in rows)]
    assert nomad.seen[0].query == {"filter": 'Meta.rack == "r1"'}


async def test_node_status_one_shows_meta(capsys: pytest.CaptureFixture[str],
                                          nomad: Nomad) -> None:
    drivers = {"raw_exec": DriverInfo(detected=True, healthy=True),
               "docker": DriverInfo(detected=False, healthy=False)}
    await nomad.server.register_node(node(NODE_ID, name="client-9", drivers=drivers,
                                          meta={"rack": "r1", "zone": "z"}))
    code, out, _ = await cli(capsys, "node", "status", "-verbose", "f7f7f7")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"ID            = {NODE_ID}"
    assert "Driver Status = raw_exec" in lines
    i = lines.index("Meta")
    assert lines[i + 1:i + 3] == ["rack = r1", "zone = z"]


async def test_node_meta_read(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await nomad.client.apply_metadata({"tier": "gold", "old": None})  # "old" is static
    code, out, _ = await cli(capsys, "node", "meta", "read")
    assert code == 0
    assert out.split("\n\n")[1].splitlines() == ["Dynamic Meta", "old  = <unset>",
                                                 "tier = gold"]
    code, out, _ = await cli(capsys, "node", "meta", "read", "-json", "-node-id",
                             nomad.client.node_id)
    assert code == 0 and json.loads(out)["Static"] == {"rack": "r1", "old": "x"}


async def test_node_meta_apply(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    node_id = nomad.client.node_id
    code, out, err = await cli(capsys, "node", "meta", "apply", f"-node-id={node_id}",
                               "tier=gold", "-unset=rack,zone")
    assert (code, out, err) == (0, "", "")
    (seen,) = nomad.seen
    assert (seen.method, seen.path, seen.query) == ("POST", "/v1/client/metadata",
                                                    {"node_id": node_id})
    # rack is static, so unsetting it is remembered; zone was never set.
    assert nomad.client.metadata()["Dynamic"] == {"tier": "gold", "rack": None}
    code, _, err = await cli(capsys, "node", "meta", "apply", "novalue")
    assert code == 1 and '"novalue" is not a key=value pair' in err
    code, _, err = await cli(capsys, "node", "meta", "apply")
    assert code == 1 and "at least one" in err


# ---------------------------------------------------------------------------------------
# addresses, tokens, errors


async def test_token_flag_and_env(capsys: pytest.CaptureFixture[str], acl_nomad: Nomad,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    flag, env = acl_token(), acl_token()
    await seed(acl_nomad.server, tokens=(flag, env))
    assert await cli(capsys, "job", "status") == (
        1, "", "Error querying jobs: Unexpected response code: 403 (Permission denied)\n")
    assert (await cli(capsys, "job", "status", "-token", flag.secret_id))[0] == 0
    monkeypatch.setenv("NOMAD_TOKEN", env.secret_id)
    assert (await cli(capsys, "job", "status"))[0] == 0
    assert [s.headers.get("X-Nomad-Token") for s in acl_nomad.seen] == [
        None, flag.secret_id, env.secret_id]


async def test_address_flag_overrides_env(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    address = nomad.agent.api.url
    monkeypatch.setenv("NOMAD_ADDR", "http://127.0.0.1:1")
    code, _, _ = await cli(capsys, "job", "status", f"--address={address}")
    assert code == 0 and nomad.paths() == ["/v1/jobs"]


async def test_unix_address_from_env(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "api.sock"
    await nomad.agent.api.listen(TCP_LISTENER, unix_socket(path))
    monkeypatch.setenv("NOMAD_ADDR", f"unix://{path}")
    code, out, _ = await cli(capsys, "node", "status")
    assert code == 0 and "client-1" in out
    assert nomad.seen[0].headers["Host"] == "localhost"


async def test_api_error_message(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    code, out, err = await cli(capsys, "node", "status", "-filter", "Meta.rack ==")
    assert (code, out) == (1, "")
    assert re.fullmatch(r"Error querying node status: Unexpected response code: 400 "
                        r"\(failed to read filter expression: .+\)\n", err), err


def test_unreachable_agent(capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.setenv("NOMAD_ADDR", f"http://127.0.0.1:{port}")
    code, out, err = run(capsys, "node", "status")
    assert (code, out) == (1, "")
    assert err.strip() == (f'Error querying node status: Get "http://127.0.0.1:{port}/v1/nodes":'
                           f" dial tcp 127.0.0.1:{port}: connect: connection refused")


def test_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "job", "status", "-address", "unix://relative")
    assert code == 1 and "Error initializing client" in err and "absolute" in err


def test_closed_output_pipe_ends_quietly() -> None:
    import subprocess
    import sys

    # `nomad-client ... | head -1`: the reader leaves early; no traceback, no error text.
    script = (
        "import sys\n"
        "import nomad_client.cli.main as m\n"
        "def chatty(argv):\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "m._dispatch = chatty\n"
        "sys.exit(m.main([]))\n"
    )
    proc = subprocess.run(f"{sys.executable} -c \"$SCRIPT\" | head -1", shell=True,
                          env={"SCRIPT": script, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert proc.stdout == "line 0\n"
    assert proc.stderr == ""
