"""CLI parsing and output against a fake agent serving canned JSON in Nomad's shapes.

``main()`` runs its own event loop, so the fake agent runs on a loop in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from nomad_client.cli import format as fmt
from nomad_client.cli import monitor
from nomad_client.cli.main import main

JOB_SUBMIT_NS = 1_735_000_000_000_000_000

EVAL_ID = "e1e1e1e1-0000-4000-8000-000000000001"
ALLOC_ID = "a1a1a1a1-0000-4000-8000-000000000001"
ALLOC2_ID = "a1a1b2b2-0000-4000-8000-000000000002"
NODE_ID = "f7f7f7f7-0000-4000-8000-000000000001"
NODE2_ID = "c3c3c3c3-0000-4000-8000-000000000002"


def _alloc(alloc_id: str, status: str, tasks: list[str], group: str = "g") -> dict[str, Any]:
    now_ns = time.time_ns()
    return {
        "ID": alloc_id, "EvalID": EVAL_ID, "Name": f"web.{group}[0]", "Namespace": "default",
        "NodeID": NODE_ID, "NodeName": "client-1", "JobID": "web", "JobVersion": 0,
        "TaskGroup": group, "DesiredStatus": "run", "DesiredDescription": "",
        "ClientStatus": status, "ClientDescription": "Tasks are running",
        "CreateIndex": 10, "ModifyIndex": 12,
        "CreateTime": now_ns - 65 * 10**9, "ModifyTime": now_ns - 5 * 10**9,
        "Job": {"ID": "web", "Version": 0, "TaskGroups": [
            {"Name": group, "Tasks": [{"Name": t} for t in tasks]}]},
        "TaskStates": {t: {"State": "running", "Failed": False, "Restarts": 0, "Events": [
            {"Type": "Received", "Time": 1_735_000_001_000_000_000,
             "DisplayMessage": "Task received by client"},
            {"Type": "Started", "Time": 1_735_000_003_000_000_000,
             "DisplayMessage": "Task started by client"},
            {"Type": "Task Setup", "Time": 1_735_000_002_000_000_000,
             "DisplayMessage": "Building Task Directory", "Message": "Building Task Directory"},
        ]} for t in tasks},
    }


class FakeNomad:
    """Canned agent; records requests in ``seen`` as (method, path, query, headers, body)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], dict[str, str], Any]] = []
        self.failed_placement = False
        self.eval_polls = 0
        self.alloc_polls = 0
        self.allocs = {ALLOC_ID: _alloc(ALLOC_ID, "running", ["t"]),
                       ALLOC2_ID: _alloc(ALLOC2_ID, "running", ["a", "b"])}
        self.dynamic_meta: dict[str, str | None] = {}

    def paths(self, method: str | None = None) -> list[str]:
        return [s[1] for s in self.seen if method is None or s[0] == method]

    async def handle(self, req: web.Request) -> web.StreamResponse:
        raw = await req.read()
        body = json.loads(raw) if raw else None
        self.seen.append((req.method, req.path, dict(req.query), dict(req.headers), body))
        try:
            return self.route(req, body)
        except KeyError:
            return web.Response(status=404, text="resource not found")

    def route(self, req: web.Request, body: Any) -> web.StreamResponse:
        p, q, m = req.path, req.query, req.method
        if p == "/v1/jobs" and m == "POST":
            return web.json_response({"EvalID": EVAL_ID, "EvalCreateIndex": 57,
                                      "JobModifyIndex": 57, "Warnings": "", "Index": 57})
        if p == "/v1/jobs":
            jobs = [{"ID": "web", "Type": "service", "Priority": 50, "Status": "running",
                     "SubmitTime": JOB_SUBMIT_NS},
                    {"ID": "batch-1", "Type": "batch", "Priority": 70, "Status": "dead",
                     "SubmitTime": JOB_SUBMIT_NS}]
            return web.json_response([j for j in jobs if j["ID"].startswith(q.get("prefix", ""))])
        if p == "/v1/job/web" and m == "DELETE":
            return web.json_response({"EvalID": EVAL_ID, "EvalCreateIndex": 60})
        if p == "/v1/job/web":
            return web.json_response({
                "ID": "web", "Name": "web", "Type": "service", "Priority": 50,
                "Datacenters": ["dc1", "dc2"], "Namespace": "default", "NodePool": "default",
                "Status": "running", "SubmitTime": JOB_SUBMIT_NS, "Periodic": None,
                "ParameterizedJob": None})
        if p == "/v1/job/web/summary":
            return web.json_response({"JobID": "web", "Summary": {"g": {
                "Queued": 0, "Complete": 0, "Failed": 0, "Running": 1, "Starting": 0,
                "Lost": 0, "Unknown": 0}}})
        if p == "/v1/job/web/allocations":
            self.alloc_polls += 1
            allocs = [dict(self.allocs[ALLOC_ID])]
            # The alloc starts pending and is running from the third look on.
            if self.alloc_polls < 3:
                allocs[0]["ClientStatus"] = "pending"
            return web.json_response(allocs, headers={"X-Nomad-Index": str(100 + self.alloc_polls)})
        if p == f"/v1/evaluation/{EVAL_ID}":
            self.eval_polls += 1
            ev: dict[str, Any] = {"ID": EVAL_ID, "JobID": "web", "StatusDescription": "",
                                  "Status": "pending" if self.eval_polls < 2 else "complete"}
            if self.failed_placement and self.eval_polls >= 2:
                ev["FailedTGAllocs"] = {"g": {
                    "NodesEvaluated": 1, "NodesFiltered": 1, "NodesAvailable": {"dc1": 1},
                    "ConstraintFiltered": {"${meta.rack} = r9": 1}, "NodesExhausted": 0,
                    "CoalescedFailures": 0}}
                ev["BlockedEval"] = "b10cked0-0000-4000-8000-000000000000"
            return web.json_response(ev, headers={"X-Nomad-Index": str(50 + self.eval_polls)})
        if p == "/v1/job/missing":
            return web.Response(status=404, text="job not found")
        if p == "/v1/allocations":
            prefix = q.get("prefix", "")
            return web.json_response([a for i, a in sorted(self.allocs.items())
                                      if i.startswith(prefix)])
        if p.startswith("/v1/allocation/"):
            return web.json_response(self.allocs[p.rsplit("/", 1)[1]])
        if p.startswith("/v1/client/fs/logs/"):
            return web.Response(text=f"{q['type']} of {q['task']}\n")
        if p.startswith("/v1/client/fs/stat/"):
            is_dir = q["path"] in ("/", "alloc")
            return web.json_response({"Name": q["path"], "IsDir": is_dir, "Size": 4096,
                                      "FileMode": "drwxrwxrwx", "ModTime": "2026-01-02T03:04:05Z"})
        if p.startswith("/v1/client/fs/ls/"):
            return web.json_response([
                {"Name": "alloc", "IsDir": True, "Size": 4096, "FileMode": "drwxrwxrwx",
                 "ModTime": "2026-01-02T03:04:05.123456789Z"},
                {"Name": "out.txt", "IsDir": False, "Size": 12, "FileMode": "-rw-r--r--",
                 "ModTime": "2026-01-02T03:04:05Z"}])
        if p.startswith("/v1/client/fs/cat/"):
            return web.Response(body=b"file body\n\x00")
        if p == "/v1/nodes":
            nodes = [
                {"ID": NODE_ID, "Datacenter": "dc1", "Name": "client-1", "NodePool": "default",
                 "NodeClass": "", "Drain": False, "SchedulingEligibility": "eligible",
                 "Status": "ready"},
                {"ID": NODE2_ID, "Datacenter": "dc2", "Name": "client-two",
                 "NodePool": "gpu", "NodeClass": "big", "Drain": True,
                 "SchedulingEligibility": "ineligible", "Status": "down"}]
            return web.json_response([n for n in nodes if n["ID"].startswith(q.get("prefix", ""))])
        if p == f"/v1/node/{NODE_ID}":
            return web.json_response({
                "ID": NODE_ID, "Name": "client-1", "Datacenter": "dc1", "NodePool": "default",
                "NodeClass": "", "Drain": False, "DrainStrategy": None,
                "SchedulingEligibility": "eligible", "Status": "ready",
                "HTTPAddr": "127.0.0.1:4646", "Meta": {"rack": "r1", "zone": "z"},
                "Drivers": {"raw_exec": {"Detected": True, "Healthy": True},
                            "docker": {"Detected": False, "Healthy": False}},
                "Events": [{"Message": "Node registered", "Subsystem": "Cluster",
                            "Timestamp": "2026-01-02T03:04:05Z"}]})
        if p == "/v1/client/metadata" and m == "POST":
            self.dynamic_meta.update(body["Meta"])
            return web.json_response({"Meta": {}, "Dynamic": self.dynamic_meta, "Static": {}})
        if p == "/v1/client/metadata":
            return web.json_response({"Meta": {"rack": "r1", "tier": "gold"},
                                      "Dynamic": {"tier": "gold", "old": None},
                                      "Static": {"rack": "r1"}})
        raise KeyError(p)


class _Server:
    def __init__(self, fake: FakeNomad, unix_path: str | None = None) -> None:
        self.fake = fake
        self.unix_path = unix_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.fake.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        if self.unix_path:
            await web.UnixSite(self.runner, self.unix_path).start()
            self.address = f"unix://{self.unix_path}"
        else:
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port = self.runner.addresses[0][1]
            self.address = f"http://127.0.0.1:{port}"

    def __enter__(self) -> _Server:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fake() -> FakeNomad:
    return FakeNomad()


@pytest.fixture
def addr(fake: FakeNomad, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("NOMAD_TOKEN", raising=False)
    monkeypatch.setattr(monitor, "POLL_PAUSE", 0.01)
    with _Server(fake) as server:
        monkeypatch.setenv("NOMAD_ADDR", server.address)
        yield server.address


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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


@pytest.fixture
def jobspec(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """A stand-in jobspec parser recording its calls (the real one is tested elsewhere)."""
    calls: list[tuple[Any, ...]] = []

    class JobspecError(Exception):
        pass

    def parse_jobspec(text: str, filename: str, variables: Any,
                      var_files: Any = None) -> dict[str, Any]:
        calls.append((text, filename, variables, var_files))
        if "broken" in text:
            raise JobspecError(f"{filename}:3: Unsupported argument")
        return {"ID": "web", "Name": "web", "TaskGroups": [{"Name": "g"}]}

    def parse_var_assignments(pairs: list[str]) -> dict[str, str]:
        return dict(p.split("=", 1) for p in pairs)

    mod = types.ModuleType("nomad_client.jobspec")
    mod.parse_jobspec = parse_jobspec  # type: ignore[attr-defined]
    mod.JobspecError = JobspecError  # type: ignore[attr-defined]
    mod.parse_var_assignments = parse_var_assignments  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nomad_client.jobspec", mod)
    return calls


def test_job_run_monitors_until_running(
    capsys: pytest.CaptureFixture[str], fake: FakeNomad, addr: str, tmp_path: Path,
    jobspec: list[tuple[Any, ...]],
) -> None:
    job_file = tmp_path / "web.nomad.hcl"
    job_file.write_text('job "web" {}\n')
    var_file = tmp_path / "vars.hcl"
    var_file.write_text('x = "1"\n')
    code, out, err = run(capsys, "job", "run", "-var", "a=b", "--var=c=d",
                         f"-var-file={var_file}", str(job_file))
    assert (code, err) == (0, "")
    assert jobspec == [('job "web" {}\n', str(job_file), {"a": "b", "c": "d"},
                        [(str(var_file), 'x = "1"\n')])]
    posts = [s for s in fake.seen if s[0] == "POST"]
    assert posts[0][1] == "/v1/jobs"
    assert posts[0][4] == {"Job": {"ID": "web", "Name": "web", "TaskGroups": [{"Name": "g"}]}}
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)"
    assert all(re.match(rf"^(==> |    ){stamp}: ", line) for line in out.splitlines())
    lines = [re.sub(rf"^(==> |    ){stamp}: ", r"\1", line) for line in out.splitlines()]
    assert lines == [
        '==> Monitoring evaluation "e1e1e1e1"',
        '    Evaluation triggered by job "web"',
        '    Allocation "a1a1a1a1" created: node "f7f7f7f7", group "g"',
        '    Evaluation status changed: "pending" -> "complete"',
        '==> Evaluation "e1e1e1e1" finished with status "complete"',
        '    Allocation "a1a1a1a1" status changed: "pending" -> "running" (Tasks are running)',
    ]
    # The later polls were blocking queries carrying the last index seen.
    eval_queries = [s[2] for s in fake.seen if s[1] == f"/v1/evaluation/{EVAL_ID}"]
    assert eval_queries[0] == {} and eval_queries[1] == {"index": "51", "wait": "5s"}


def test_job_run_placement_failure_exits_2(
    capsys: pytest.CaptureFixture[str], fake: FakeNomad, addr: str, tmp_path: Path,
    jobspec: list[tuple[Any, ...]],
) -> None:
    fake.failed_placement = True
    job_file = tmp_path / "web.hcl"
    job_file.write_text("job {}")
    code, out, _ = run(capsys, "job", "run", str(job_file))
    assert code == 2
    assert 'finished with status "complete" but failed to place all allocations:' in out
    assert 'Task Group "g" (failed to place 1 allocation):' in out
    assert '      * Constraint "${meta.rack} = r9": 1 nodes excluded by filter' in out.splitlines()
    assert 'Evaluation "b10cked0" waiting for additional capacity' in out


def test_job_run_detach(capsys: pytest.CaptureFixture[str], fake: FakeNomad, addr: str,
                        tmp_path: Path, jobspec: list[tuple[Any, ...]]) -> None:
    job_file = tmp_path / "web.hcl"
    job_file.write_text("job {}")
    code, out, _ = run(capsys, "job", "run", "-detach", str(job_file))
    assert code == 0
    assert out == f"Job registration successful\nEvaluation ID: {EVAL_ID}\n"
    assert fake.paths() == ["/v1/jobs"]


def test_job_run_bad_input(capsys: pytest.CaptureFixture[str], fake: FakeNomad, addr: str,
                           tmp_path: Path, jobspec: list[tuple[Any, ...]]) -> None:
    code, _, err = run(capsys, "job", "run", str(tmp_path / "nope.hcl"))
    assert code == 1
    assert f'Error reading job file "{tmp_path / "nope.hcl"}": no such file' in err
    broken = tmp_path / "broken.hcl"
    broken.write_text("broken")
    code, _, err = run(capsys, "job", "run", str(broken))
    assert code == 1
    assert err.strip() == f"Error getting job struct: {broken}:3: Unsupported argument"
    assert fake.seen == []


def test_job_run_with_real_jobspec(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                                   addr: str, tmp_path: Path) -> None:
    pytest.importorskip("nomad_client.jobspec")
    job_file = tmp_path / "web.hcl"
    job_file.write_text('job "web" {\n  group "g" {\n    task "t" {\n      driver = "raw_exec"\n'
                        '      config {\n        command = "/bin/sleep"\n      }\n    }\n  }\n}\n')
    code, _, err = run(capsys, "job", "run", "-detach", str(job_file))
    assert (code, err) == (0, "")
    job = [s for s in fake.seen if s[0] == "POST"][0][4]["Job"]
    assert job["ID"] == "web" and job["TaskGroups"][0]["Tasks"][0]["Driver"] == "raw_exec"


VARS_JOB = ('variable "cmd" {}\nvariable "arg" { default = "1" }\n'
            'job "web" {\n  group "g" {\n    task "t" {\n      driver = "raw_exec"\n'
            '      config {\n        command = var.cmd\n        args = [var.arg]\n      }\n'
            '    }\n  }\n}\n')


def test_job_run_later_var_file_wins(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                                     addr: str, tmp_path: Path) -> None:
    pytest.importorskip("nomad_client.jobspec")
    job_file = tmp_path / "web.hcl"
    job_file.write_text(VARS_JOB)
    first, second = tmp_path / "a.hcl", tmp_path / "b.hcl"
    first.write_text('cmd = "/bin/true"\narg = "from-a"\n')
    second.write_text('cmd = "/bin/sleep"\n')
    code, _, err = run(capsys, "job", "run", "-detach", f"-var-file={first}",
                       f"-var-file={second}", str(job_file))
    assert (code, err) == (0, "")
    job = [s for s in fake.seen if s[0] == "POST"][0][4]["Job"]
    config = job["TaskGroups"][0]["Tasks"][0]["Config"]
    assert config == {"command": "/bin/sleep", "args": ["from-a"]}


def test_job_run_var_file_error_names_its_file_and_line(
    capsys: pytest.CaptureFixture[str], fake: FakeNomad, addr: str, tmp_path: Path,
) -> None:
    pytest.importorskip("nomad_client.jobspec")
    job_file = tmp_path / "web.hcl"
    job_file.write_text(VARS_JOB)
    first, second = tmp_path / "a.hcl", tmp_path / "b.hcl"
    first.write_text('cmd = "/bin/true"\n')
    second.write_text('cmd = "/bin/sleep"\n\nmystery = 1\n')
    code, _, err = run(capsys, "job", "run", "-detach", f"-var-file={first}",
                       f"-var-file={second}", str(job_file))
    assert code == 1
    assert err.startswith(f"Error getting job struct: {second}:3: ")
    assert "mystery" in err
    assert fake.seen == []


def test_job_status_list(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, out, _ = run(capsys, "job", "status")
    submit = fmt.format_time(datetime.fromtimestamp(JOB_SUBMIT_NS / 1e9))
    assert code == 0
    assert out.splitlines() == [
        "ID       Type     Priority  Status   Submit Date",
        f"web      service  50        running  {submit}",
        f"batch-1  batch    70        dead     {submit}",
    ]


def test_job_status_one(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, out, _ = run(capsys, "job", "status", "we")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "ID            = web"
    assert "Datacenters   = dc1,dc2" in lines
    assert "Periodic      = false" in lines
    i = lines.index("Summary")
    assert lines[i + 1].split() == ["Task", "Group", "Queued", "Starting", "Running", "Failed",
                                    "Complete", "Lost", "Unknown"]
    assert lines[i + 2].split() == ["g", "0", "0", "1", "0", "0", "0", "0"]
    j = lines.index("Allocations")
    assert lines[j + 1] == ("ID        Node ID   Task Group  Version  Desired  Status   "
                            "Created   Modified")
    assert lines[j + 2].split()[:6] == ["a1a1a1a1", "f7f7f7f7", "g", "0", "run", "pending"]
    # Created 65 s and modified 5 s before the fake was built (plus test run time).
    assert re.fullmatch(r"1m[5-9]s ago  +[5-9]s ago", lines[j + 2].split("pending")[1].strip())


def test_job_status_errors(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, _, err = run(capsys, "job", "status", "zzz")
    assert code == 1 and err == 'No job(s) with prefix or id "zzz" found\n'


def test_job_stop_purge_detach(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                               addr: str) -> None:
    code, out, _ = run(capsys, "job", "stop", "-purge", "-detach", "web")
    assert (code, out) == (0, f"{EVAL_ID}\n")
    deletes = [s for s in fake.seen if s[0] == "DELETE"]
    assert [(d[1], d[2]) for d in deletes] == [("/v1/job/web", {"purge": "true"})]


def test_job_stop_monitors(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                           addr: str) -> None:
    code, out, _ = run(capsys, "job", "stop", "web")
    assert code == 0
    assert 'finished with status "complete"' in out
    assert [s[2] for s in fake.seen if s[0] == "DELETE"] == [{}]


# ---------------------------------------------------------------------------------------
# alloc


def test_alloc_status_by_prefix(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                                addr: str) -> None:
    code, out, _ = run(capsys, "alloc", "status", "a1a1a1")
    assert code == 0
    lines = out.splitlines()
    assert lines[:5] == ["ID                  = a1a1a1a1", "Eval ID             = e1e1e1e1",
                         "Name                = web.g[0]", "Node ID             = f7f7f7f7",
                         "Node Name           = client-1"]
    assert "Desired Description = <none>" in lines
    i = lines.index('Task "t" is "running"')
    assert lines[i + 1] == "Recent Events:"
    assert lines[i + 2].split() == ["Time", "Type", "Description"]
    types_in_order = [re.split(r"\s{2,}", line)[1] for line in lines[i + 3:i + 6]]
    assert types_in_order == ["Started", "Task Setup", "Received"]
    assert fake.seen[0][2] == {"prefix": "a1a1a1"}
    assert fake.paths()[1] == f"/v1/allocation/{ALLOC_ID}"


def test_alloc_status_ambiguous_prefix(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, out, err = run(capsys, "alloc", "status", "a1a1")
    assert code == 1 and out == ""
    assert err.startswith("Prefix matched multiple allocations\n\nID        Eval ID")
    assert "a1a1b2b2" in err


def test_alloc_logs(capsys: pytest.CaptureFixture[str], fake: FakeNomad, addr: str) -> None:
    code, out, _ = run(capsys, "alloc", "logs", ALLOC_ID)
    assert (code, out) == (0, "stdout of t\n")
    code, out, _ = run(capsys, "alloc", "logs", "-stderr", ALLOC2_ID, "b")
    assert (code, out) == (0, "stderr of b\n")
    code, out, err = run(capsys, "alloc", "logs", ALLOC2_ID)
    assert code == 1 and "running the following tasks:\n  * a\n  * b" in err
    log_queries = [s[2] for s in fake.seen if "/fs/logs/" in s[1]]
    assert log_queries == [{"task": "t", "type": "stdout", "plain": "true"},
                           {"task": "b", "type": "stderr", "plain": "true"}]


def test_alloc_fs(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, out, _ = run(capsys, "alloc", "fs", ALLOC_ID)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["Mode", "Size", "Modified", "Time", "Name"]
    assert lines[1].split()[:2] == ["drwxrwxrwx", "4.0"] and lines[1].endswith("alloc/")
    assert lines[2].split()[:3] == ["-rw-r--r--", "12", "B"] and lines[2].endswith("out.txt")
    modified = fmt.format_time(fmt.from_rfc3339("2026-01-02T03:04:05Z"))
    assert modified in lines[1]
    capsysbinary_out = run(capsys, "alloc", "fs", ALLOC_ID, "alloc/out.txt")
    assert capsysbinary_out[0] == 0 and capsysbinary_out[1].startswith("file body\n")


# ---------------------------------------------------------------------------------------
# node


def test_node_status_list_with_filter(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                                      addr: str) -> None:
    code, out, _ = run(capsys, "node", "status", "-filter", 'Meta.rack == "r1"')
    assert code == 0
    assert out.splitlines() == [
        "ID        Node Pool  DC   Name        Class   Drain  Eligibility  Status",
        "f7f7f7f7  default    dc1  client-1    <none>  false  eligible     ready",
        "c3c3c3c3  gpu        dc2  client-two  big     true   ineligible   down",
    ]
    assert fake.seen[0][2] == {"filter": 'Meta.rack == "r1"'}


def test_node_status_one_shows_meta(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, out, _ = run(capsys, "node", "status", "-verbose", "f7")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"ID            = {NODE_ID}"
    assert "Driver Status = raw_exec" in lines
    i = lines.index("Meta")
    assert lines[i + 1:i + 3] == ["rack = r1", "zone = z"]


def test_node_meta_read(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    code, out, _ = run(capsys, "node", "meta", "read")
    assert code == 0
    assert out.split("\n\n")[1].splitlines() == ["Dynamic Meta", "old  = <unset>",
                                                 "tier = gold"]
    code, out, _ = run(capsys, "node", "meta", "read", "-json", "-node-id", NODE_ID)
    assert code == 0 and json.loads(out)["Static"] == {"rack": "r1"}


def test_node_meta_apply(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                         addr: str) -> None:
    code, out, err = run(capsys, "node", "meta", "apply", "-node-id=n1", "tier=gold",
                         "-unset=rack,zone")
    assert (code, out, err) == (0, "", "")
    method, path, query, _, body = fake.seen[0]
    assert (method, path, query) == ("POST", "/v1/client/metadata", {"node_id": "n1"})
    assert body == {"Meta": {"tier": "gold", "rack": None, "zone": None}}
    code, _, err = run(capsys, "node", "meta", "apply", "novalue")
    assert code == 1 and '"novalue" is not a key=value pair' in err
    code, _, err = run(capsys, "node", "meta", "apply")
    assert code == 1 and "at least one" in err


# ---------------------------------------------------------------------------------------
# addresses, tokens, errors


def test_token_flag_and_env(capsys: pytest.CaptureFixture[str], fake: FakeNomad, addr: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(capsys, "job", "status", "-token", "flag-tok")[0] == 0
    monkeypatch.setenv("NOMAD_TOKEN", "env-tok")
    assert run(capsys, "job", "status")[0] == 0
    assert [s[3].get("X-Nomad-Token") for s in fake.seen] == ["flag-tok", "env-tok"]


def test_address_flag_overrides_env(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                                    addr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOMAD_ADDR", "http://127.0.0.1:1")
    code, _, _ = run(capsys, "job", "status", f"--address={addr}")
    assert code == 0 and fake.paths() == ["/v1/jobs"]


def test_unix_address_from_env(capsys: pytest.CaptureFixture[str], fake: FakeNomad,
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _Server(fake, str(tmp_path / "api.sock")) as server:
        monkeypatch.setenv("NOMAD_ADDR", server.address)
        code, out, _ = run(capsys, "node", "status")
    assert code == 0 and "client-two" in out
    assert fake.seen[0][3]["Host"] == "localhost"


def test_api_error_message(capsys: pytest.CaptureFixture[str], addr: str) -> None:
    # The fake lists node c3c3… but has no detail for it: GET /v1/node/<id> answers 404.
    code, out, err = run(capsys, "node", "status", "c3")
    assert (code, out) == (1, "")
    assert err == ("Error querying node info: Unexpected response code: 404 "
                   "(resource not found)\n")


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
