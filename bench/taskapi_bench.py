"""Task API benchmark: what a task's ``api.sock`` costs, measured on this machine.

Not a test: it prints figures and the targets they are held against, and exits 0 whether the
targets are met or not (non-zero only when the benchmark itself could not run).

Part 1, request path. ``GET /v1/agent/health`` with a workload identity
(``Authorization: Bearer <jwt>``), driven by ``h2load`` (HTTP/1.1, 16 connections) against:
  (a) a real task's ``secrets/api.sock`` of a real agent process,
  (b) the same agent's TCP API,
  (c) a baseline: aiohttp's low-level ``web.Server`` (the same server class the agent's
      listeners use) on a Unix socket, answering a fixed JSON body, in its own process, on
      asyncio's own event loop,
  (d) the same baseline on uvloop, the event loop the agent runs on: a/d isolates what the
      agent's request path (router, authentication, endpoint) costs on top of the loop.
Runs alternate a, b, c, d, a, b, c, d, ... and medians are reported, because a shared
machine is noisy. Every request must come back 2xx, else the run is void and the script fails.

Part 2, socket churn, in a fresh child process so its memory figures start clean. An
in-process agent (server only) supplies the real ``Router``, served through the agent's
``TaskAPIServer`` (one listener per socket); one ``TaskAPIHook`` creates and removes the
sockets of ``--sockets`` tasks (1,000 by default) through ``task_starting`` /
``task_stopped``, one after the other; time, RSS and open fds are measured around it.

Part 3, what ACLs cost. ``GET /v1/client/metadata`` (it needs ``node`` read, unlike health)
over a task's socket of two agents whose state is the same (a policy granting
``node { policy = "read" }``, attached to the task's job and held by a client token) and whose
only difference is ``acl { enabled }``. Both are set up with ACLs on, then restarted (their
tasks are reattached), one with ACLs off, so that one holds a client token too:
  (e) ACLs on, the task's workload identity (authorized through the attached policy),
  (f) ACLs off, the same kind of identity,
  (g) ACLs on, the client token,
  (h) ACLs off, the same client token.
Runs alternate e, f, g, h; each "on" median is compared with its "off" median. Before the
runs, each credential is checked to be refused ``GET /v1/jobs`` with ACLs on (the policy
grants no namespace access) and allowed it with ACLs off, so "on" really evaluates policies.

May touch: a temp dir it creates (agent data dirs, baseline socket, h2load logs), processes
it starts (the agents, their tasks, the baseline server, h2load), 127.0.0.1 and Unix sockets
under that temp dir. It removes all of them before it exits.

Part 4, reading a variable. ``GET /v1/var/nomad/jobs/<job>`` over a task's socket with the
task's workload identity (ACLs on: the read is allowed by Nomad's implicit grant of a job's
own variable paths, and the items are decrypted on every request), against
``GET /v1/agent/health`` on the same socket in the same run:
  (v) health, (w) the variable. Runs alternate v, w; the ratio of the medians is reported.

Part 5, fairness and what the Task API controls cost. One agent with the default
``client { task_api }`` settings runs two tasks. ``GET /v1/agent/health`` is measured one
request at a time (a Python client: latency, not throughput) over the quiet task's socket and
over the TCP API, first with the agent idle, then while the other task floods its own socket
with ``h2load --h1 -c 64``; the p99 ratio flooded / idle is held against 2x. The same on an
agent with the rate limit off, for reference. Then three agents differing only in
``task_api`` — (x) plain (no rate limit, no peer check, no audit), (y) audit on, (z)
``peer_credentials = "enforce"`` — are driven alternately by h2load as in part 1; y/x and
z/x are reported, with the one-off per-connection cost of the peer check of a non-root task
process measured in-process on real processes.

Every agent but the fairness part's default one runs with ``rate_limit { requests_per_second
= 0 }``: h2load drives a task socket far past any per-task rate on purpose, and a 429 would
void the run.

Usage: python bench/taskapi_bench.py [--duration 5] [--rounds 3] [--sockets 1000]
                                     [--parts http,churn,acl,vars,fairness]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import logging
import os
import re
import resource
import shutil
import signal
import stat
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from nomad_client.client.secretsdir import DEFAULT_SOCKET_NAME

if TYPE_CHECKING:
    from nomad_client.api.client import ApiClient

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

HEALTH_PATH = "/v1/agent/health"
METADATA_PATH = "/v1/client/metadata"  # node read
JOBS_PATH = "/v1/jobs"  # namespace list-jobs: what the ACL part's policy does not grant
NODE_READ_POLICY = "bench-node-read"
NODE_READ_RULES_FILE = REPO / "testdata" / "policies" / "node-read.hcl"
PARTS = ("http", "churn", "acl", "vars", "fairness")
# Same shape and size as the agent's health reply, so only the serving path differs.
BASELINE_BODY = json.dumps({"client": {"message": "ok", "ok": True},
                            "server": {"message": "ok", "ok": True}}, separators=(",", ":"))
H2LOAD_CLIENTS = 16
SUN_PATH_MAX = 107  # h2load connects by path, so the kernel's sun_path limit applies
JOB_ID = "taskapi-bench"
TASK = "t"
# ``client { task_api }`` of the agents of every part but the fairness part: h2load drives
# one task's socket at thousands of requests per second, which any sensible per-task rate
# limit refuses (and a 429 voids the run).
UNLIMITED_TASK_API: dict[str, Any] = {"rate_limit": {"requests_per_second": 0}}

# Targets (see the summary table).
TARGET_RATIO = 0.80
TARGET_MS = 2.0
TARGET_KIB = 20.0
TARGET_FDS = 1
TARGET_ACL_OVERHEAD = 0.10  # ACLs on may cost less than 10 % over ACLs off

T = TypeVar("T")


class BenchError(Exception):
    """The benchmark could not run (or produced a void measurement)."""


# ------------------------------------------------------------------------------ h2load


@attrs.frozen
class LoadResult:
    """One h2load run against one target."""

    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    requests: int
    # CPU time (user + system, all threads) the serving process spent per request: steadier
    # than req/s on a shared machine, because other load does not inflate it much.
    server_cpu_us: float = 0.0


def ensure_h2load() -> str:
    found = shutil.which("h2load")
    if found:
        return found
    hint = "install it with: apt-get install -y nghttp2-client"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("h2load not found; installing it: apt-get install -y nghttp2-client", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        import subprocess  # only here: a one-off blocking install before any event loop runs

        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "nghttp2-client"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise BenchError(f"h2load is missing and `{' '.join(cmd)}` failed "
                                 f"(exit {done.returncode}): {done.stderr.strip()[-500:]}; "
                                 f"{hint}")
        found = shutil.which("h2load")
        if found:
            return found
    raise BenchError(f"h2load is missing (it ships in the Debian package nghttp2-client); {hint}")


_FINISHED = re.compile(r"finished in [0-9.]+\w*, ([0-9.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse_h2load(target: str, output: str, log_rows: Sequence[tuple[int, int]]) -> LoadResult:
    """Figures from h2load's summary and its per-request log (status, microseconds).

    Raises ``BenchError`` unless every request counted got a 2xx: a run full of 401s or
    resets would measure the error path, not the endpoint.
    """
    finished, counts, status = (_FINISHED.search(output), _REQUESTS.search(output),
                                _STATUS.search(output))
    if not (finished and counts and status):
        raise BenchError(f"{target}: cannot parse h2load output:\n{output}")
    total, _started, done, succeeded, failed, errored, timeout = map(int, counts.groups())
    s2xx, s3xx, s4xx, s5xx = map(int, status.groups())
    if done == 0 or s2xx != done or failed or errored or timeout or s3xx or s4xx or s5xx:
        raise BenchError(
            f"{target}: not every request got a 2xx (done={done} succeeded={succeeded} "
            f"failed={failed} errored={errored} timeout={timeout}; "
            f"2xx={s2xx} 3xx={s3xx} 4xx={s4xx} 5xx={s5xx}) - the measurement is void:\n"
            f"{output}")
    bad = [code for code, _ in log_rows if not 200 <= code < 300]
    if bad:
        raise BenchError(f"{target}: per-request log holds {len(bad)} non-2xx rows "
                         f"(first: {bad[0]})")
    if not log_rows:
        raise BenchError(f"{target}: h2load wrote an empty per-request log")
    latencies = sorted(us / 1000.0 for _, us in log_rows)
    return LoadResult(target=target, rps=float(finished.group(1)),
                      p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
                      mean_ms=statistics.fmean(latencies), requests=done)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, min(len(ordered), -(-len(ordered) * pct // 100)))
    return ordered[int(rank) - 1]


def read_h2load_log(path: Path) -> list[tuple[int, int]]:
    """(status, microseconds to end of response) per request, then remove the (large) log.
    Columns after the third are ignored."""
    rows = []
    try:
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                fields = line.split("\t")
                if len(fields) < 3:
                    raise BenchError(f"{path.name}:{lineno}: expected >= 3 tab-separated "
                                     "columns")
                rows.append((int(fields[1]), int(fields[2])))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return rows


async def run_h2load(h2load: str, target: str, url: str, unix_path: str | None, token: str,
                     duration: int, log_path: Path) -> LoadResult:
    args = [h2load, "--h1", "-c", str(H2LOAD_CLIENTS), "-D", str(duration),
            "-H", f"Authorization: Bearer {token}", f"--log-file={log_path}"]
    if unix_path is not None:
        args += ["-B", f"unix:{unix_path}"]
    proc = await asyncio.create_subprocess_exec(
        *args, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"{target}: h2load did not finish within {duration + 60:.0f}s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{target}: h2load exited {proc.returncode}:\n{text}")
    rows = await asyncio.to_thread(read_h2load_log, log_path)
    return parse_h2load(target, text, rows)


# ------------------------------------------------------------------------------ processes


@attrs.frozen
class TaskSocket:
    """A running bench task: its allocation, its Task API socket and its identity."""

    alloc_id: str
    socket_path: str
    token: str


class AgentUnderTest:
    """A real agent process (same command and config shape as the integration tests), one
    raw_exec service task with a workload identity, its token and its Task API socket.
    With ACLs on, ``setup_acls`` bootstraps them (API calls then use the management token)
    and gives the task's job, and a client token, the node-read policy. ``task_api`` is its
    ``client { task_api { ... } }`` block (by default the rate limit is off: every part but
    the fairness part drives a task socket far past any per-task rate on purpose)."""

    def __init__(self, root: Path, name: str = "agent", *, acl: bool = False,
                 task_api: dict[str, Any] | None = None) -> None:
        self.root = root
        self.name = name
        self.data_dir = root / name
        self.acl = acl
        self.task_api = UNLIMITED_TASK_API if task_api is None else task_api
        self.jobs: list[str] = []
        self.address = ""
        self.token = ""
        self.management_token = ""
        self.client_token = ""
        self.socket_path = ""
        self.alloc_id = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)

    @property
    def output(self) -> str:
        return "".join(self._output)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        config = {
            "data_dir": str(self.data_dir), "bind_addr": "127.0.0.1",
            # INFO, the default: DEBUG logging would cost every request, not just ours.
            "log_level": "INFO", "ports": {"http": 0}, "server": {"enabled": True},
            "client": {"enabled": True, "task_api": self.task_api},
            "acl": {"enabled": self.acl},
        }
        config_path = self.root / f"{self.name}.json"
        config_path.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
        env["PYTHONUNBUFFERED"] = "1"
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nomad_client", "agent", "-config", str(config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
            cwd=str(REPO))
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_output(started))
        try:
            self.address = await asyncio.wait_for(started, timeout)
        except (TimeoutError, RuntimeError) as exc:
            raise BenchError(f"agent did not start:\n{self.output}") from exc

    async def _read_output(self, started: asyncio.Future[str]) -> None:
        # Drained for the whole run: a full pipe would stall the agent mid-benchmark.
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            line = raw.decode(errors="replace")
            self._output.append(line)
            match = re.search(r"HTTP API: (http://[0-9.]+:\d+)", line)
            if match and not started.done():
                started.set_result(match.group(1))
        if not started.done():
            started.set_exception(RuntimeError("agent exited"))

    def api(self, timeout: float = 60.0) -> ApiClient:
        from nomad_client.api.client import ApiClient

        return ApiClient(self.address, token=self.management_token, timeout=timeout)

    async def setup_acls(self) -> None:
        """Bootstrap; write the node-read policy, attached to the bench job; make a client
        token holding it."""
        async with self.api() as api:
            self.management_token = str((await api.acl_bootstrap())["SecretID"])
        rules = await asyncio.to_thread(NODE_READ_RULES_FILE.read_text)
        async with self.api() as api:
            await api.acl_policy_apply({"Name": NODE_READ_POLICY, "Rules": rules,
                                        "JobACL": {"Namespace": "default", "JobID": JOB_ID}})
            token = await api.acl_token_create({"Name": "bench-client", "Type": "client",
                                                "Policies": [NODE_READ_POLICY]})
        self.client_token = str(token["SecretID"])

    async def restart(self, *, acl: bool, timeout: float = 30.0) -> None:
        """Stop the agent (its task runs on), start it again on the same data dir with ACLs
        ``acl``, and wait until the reattached task's socket serves the client token."""
        await self.stop()
        self.acl = acl
        await self.start()
        if not acl:
            self.management_token = ""  # ACLs off: the API takes no token
        assert self.socket_path

        async def serving() -> bool:
            import aiohttp

            try:
                status, _ = await request_status(f"http://localhost{METADATA_PATH}",
                                                 self.socket_path, self.client_token)
            except (aiohttp.ClientError, OSError):
                return False  # not listening again yet
            return status == 200

        await poll(serving, timeout, "the reattached task's socket")
        # A restored task gets a fresh identity at once: read the file it now holds.
        token_file = Path(self.socket_path).parent / "nomad_token"
        self.token = (await asyncio.to_thread(token_file.read_text)).strip()

    async def run_task(self, timeout: float = 30.0, job_id: str = JOB_ID) -> TaskSocket:
        """Run the bench job ``job_id``; its task becomes this agent's ``socket_path`` and
        ``token`` (and is returned)."""
        from nomad_client.jobspec import canonicalize_job

        # = job "taskapi-bench" { type = "service"; group "g" { task "t" {
        #     driver = "raw_exec"; config { command = "sleep"; args = ["3600"] }
        #     identity { env = true; file = true } } } }
        job = canonicalize_job({"ID": job_id, "Type": "service", "TaskGroups": [{
            "Name": "g", "Count": 1, "Tasks": [{
                "Name": TASK, "Driver": "raw_exec",
                "Config": {"command": "sleep", "args": ["3600"]},
                "Identity": {"Env": True, "File": True}}]}]})
        async with self.api() as api:
            await api.job_register(job)
            self.jobs.append(job_id)

            async def running_alloc() -> str | None:
                for stub in await api.job_allocations(job_id):
                    alloc = await api.allocation_get(stub["ID"])
                    state = (alloc.get("TaskStates") or {}).get(TASK) or {}
                    if state.get("State") == "running":
                        return str(alloc["ID"])
                return None

            self.alloc_id = await poll(running_alloc, timeout, "the bench task to run")
        secrets = self.data_dir / "alloc" / self.alloc_id / TASK / "secrets"
        token_file, sock = secrets / "nomad_token", secrets / "api.sock"

        def ready() -> bool:
            return token_file.is_file() and sock.is_socket()

        await poll(lambda: asyncio.to_thread(ready), timeout,
                   f"{token_file} and {sock}")
        self.token = (await asyncio.to_thread(token_file.read_text)).strip()
        self.socket_path = str(sock)
        if len(os.fsencode(self.socket_path)) > SUN_PATH_MAX:
            raise BenchError(f"task socket path too long for h2load to connect to: "
                             f"{self.socket_path}")
        return TaskSocket(self.alloc_id, self.socket_path, self.token)

    async def stop_task(self) -> None:
        """Deregister the jobs so the agent stops their tasks itself (best effort)."""
        if not self.address or self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            async with self.api(timeout=10) as api:
                for job_id in self.jobs:
                    await api.job_deregister(job_id)

                async def stopped() -> bool:
                    for job_id in self.jobs:
                        for stub in await api.job_allocations(job_id):
                            if stub.get("ClientStatus") not in ("complete", "failed", "lost"):
                                return False
                    return True

                await poll(stopped, 15.0, "the bench tasks to stop")

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await end_process(proc)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


class BaselineServer:
    """The baseline: this script re-run as ``--serve-baseline PATH`` (same Python)."""

    def __init__(self, path: Path, loop: str = "asyncio") -> None:
        self.path = path
        self.loop = loop
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 15.0) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--serve-baseline", str(self.path),
            "--baseline-loop", self.loop,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

        async def accepting() -> bool:
            assert self._proc is not None
            if self._proc.returncode is not None:
                err = b"" if self._proc.stderr is None else await self._proc.stderr.read()
                raise BenchError(f"baseline server exited {self._proc.returncode}: "
                                 f"{err.decode(errors='replace')}")
            try:
                _reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                return False
            writer.close()
            await writer.wait_closed()
            return True

        await poll(accepting, timeout, "the baseline server")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await end_process(proc)


def serve_baseline(path: str, loop_kind: str = "asyncio") -> int:
    """Child process body: aiohttp low-level ``web.Server`` on a Unix socket."""
    from aiohttp import web

    body = BASELINE_BODY.encode()

    async def handle(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # Same settings as the agent's listeners, so the comparison isolates the agent's path.
        factory = web.Server(handle, keepalive_timeout=10.0, access_log=None)
        server = await loop.create_unix_server(factory, path=path, backlog=128)
        try:
            await stop.wait()
        finally:
            server.close()
            await factory.shutdown(1.0)
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    return 0


async def end_process(proc: asyncio.subprocess.Process, grace: float = 30.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def kill_leftovers(root: Path) -> int:
    """Kill processes still working under ``root`` (a task the agent left running), and in
    its agents' cgroups, and detach the secrets tmpfs mounts they kept (no agent is left to
    unmount them); the number killed by path."""
    import psutil

    from nomad_client.client import tmpfs
    from nomad_client.client.cgroups import remove_agent_cgroups

    # An exec task's cwd reads "/" in its chroot: its agent's cgroups find it (agents' data
    # dirs are root's children); they and the agent's parent cgroup are removed.
    for data_dir in (p for p in root.iterdir() if p.is_dir()):
        remove_agent_cgroups(data_dir)
    killed = 0
    inside = str(root) + os.sep  # with the separator: no sibling dir sharing the prefix
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        try:
            cwd = (proc.info.get("cwd") or "") + os.sep
            cmdline = " ".join(proc.info.get("cmdline") or ())
            if proc.pid != os.getpid() and (cwd.startswith(inside) or inside in cmdline):
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    for mount in tmpfs.mounts_under(root):
        tmpfs.unmount(mount.mount_point)
    return killed


async def poll(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """Await ``check`` every 0.1 s until it returns something truthy; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ part 1


@attrs.frozen
class Target:
    key: str
    label: str
    url: str
    unix_path: str | None
    pid: int  # the process serving it
    token: str  # sent as ``Authorization: Bearer``


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@attrs.frozen
class HttpResults:
    runs: dict[str, list[LoadResult]]
    targets: tuple[Target, ...]

    def median(self, key: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in self.runs[key])


async def request_status(url: str, unix_path: str | None, token: str | None
                         ) -> tuple[int, str]:
    """One GET (over ``unix_path`` if given), with ``token`` as a bearer token unless None:
    status and body."""
    import aiohttp

    connector: aiohttp.BaseConnector = (aiohttp.UnixConnector(path=unix_path)
                                        if unix_path else aiohttp.TCPConnector())
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url, headers=headers) as resp:
            return resp.status, await resp.text()


async def expect_status(target: Target, wanted: int, url: str | None = None,
                        token: str | None = "") -> None:
    """Fail unless GET ``url`` (default: the target's) with ``token`` (default: the
    target's; None: no token) answers ``wanted``: a misconfigured target is caught before a
    whole run is spent on it."""
    url = url or target.url
    status, body = await request_status(url, target.unix_path,
                                        target.token if token == "" else token)
    if status != wanted:
        sent = "without a token" if token is None else "with the token"
        raise BenchError(f"{target.label}: GET {url} {sent} answered {status}, expected "
                         f"{wanted}: {body[:300]}")


async def sanity_check(target: Target) -> None:
    """One request with and one without the token."""
    await expect_status(target, 200)
    if target.key == "a":
        await expect_status(target, 401, token=None)


async def alternate_runs(h2load: str, root: Path, targets: Sequence[Target], duration: int,
                         rounds: int) -> HttpResults:
    """Warm each target up, then run h2load against each in turn, ``rounds`` times."""
    for target in targets:
        # Untimed warm-up: first-request costs (imports, caches) are not the steady state.
        await run_h2load(h2load, target.key, target.url, target.unix_path, target.token,
                         1, root / "warmup.tsv")
    print(f"h2load --h1 -c {H2LOAD_CLIENTS} -D {duration}, {rounds} round(s), "
          f"order {','.join(t.key for t in targets)} per round\n", flush=True)
    print(f"{'round':>5} {'target':<25} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'mean ms':>8} {'requests':>9} {'srv CPU us/req':>14}")
    runs: dict[str, list[LoadResult]] = {t.key: [] for t in targets}
    for rnd in range(1, rounds + 1):
        for target in targets:
            cpu_before = cpu_seconds(target.pid)
            result = await run_h2load(h2load, f"{target.key}: {target.label}", target.url,
                                      target.unix_path, target.token, duration,
                                      root / f"h2load-{rnd}-{target.key}.tsv")
            cpu_used = cpu_seconds(target.pid) - cpu_before
            result = attrs.evolve(result, server_cpu_us=cpu_used * 1e6 / result.requests)
            runs[target.key].append(result)
            print(f"{rnd:>5} {target.key + ') ' + target.label:<25} {result.rps:>10.0f} "
                  f"{result.p50_ms:>8.2f} {result.p99_ms:>8.2f} {result.mean_ms:>8.2f} "
                  f"{result.requests:>9} {result.server_cpu_us:>14.1f}", flush=True)
    return HttpResults(runs=runs, targets=tuple(targets))


async def http_benchmark(h2load: str, root: Path, duration: int, rounds: int
                         ) -> HttpResults:
    agent = AgentUnderTest(root)
    baseline = BaselineServer(root / "baseline.sock")
    baseline_uv = BaselineServer(root / "baseline-uv.sock", loop="uvloop")
    try:
        print("starting agent, task and baseline server ...", flush=True)
        await agent.start()
        await agent.run_task()
        await baseline.start()
        await baseline_uv.start()
        host_port = agent.address.removeprefix("http://")
        health = f"http://localhost{HEALTH_PATH}"
        targets = (
            Target("a", "task socket (agent)", health, agent.socket_path, agent.pid,
                   agent.token),
            Target("b", "TCP API (agent)", f"http://{host_port}{HEALTH_PATH}", None, agent.pid,
                   agent.token),
            Target("c", "baseline web.Server", health, str(baseline.path), baseline.pid,
                   agent.token),
            Target("d", "baseline on uvloop", health, str(baseline_uv.path), baseline_uv.pid,
                   agent.token),
        )
        for target in targets:
            await sanity_check(target)
        print(f"agent {agent.address}, task socket {agent.socket_path}", flush=True)
        return await alternate_runs(h2load, root, targets, duration, rounds)
    except BenchError:
        if agent.output:
            print("---- agent output (last lines) ----\n" + agent.output, file=sys.stderr)
        raise
    finally:
        await agent.stop_task()
        await agent.stop()
        await baseline.stop()
        await baseline_uv.stop()
        await asyncio.to_thread(kill_leftovers, root)


def print_http_results(res: HttpResults) -> tuple[float, float]:
    """Print the medians; return (a/c throughput ratio, a/c server CPU per request)."""
    print("\nmedians over rounds:")
    print(f"{'target':<25} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU us/req':>14}")
    for t in res.targets:
        print(f"{t.key + ') ' + t.label:<25} {res.median(t.key, 'rps'):>10.0f} "
              f"{res.median(t.key, 'p50_ms'):>8.2f} {res.median(t.key, 'p99_ms'):>8.2f} "
              f"{res.median(t.key, 'server_cpu_us'):>14.1f}")
    base = res.median("c", "rps")
    ratio_a, ratio_b = res.median("a", "rps") / base, res.median("b", "rps") / base
    print(f"throughput ratio a/c = {ratio_a:.2f}, b/c = {ratio_b:.2f}")
    same_loop = res.median("a", "rps") / res.median("d", "rps")
    print(f"same event loop (uvloop): a/d = {same_loop:.2f}, "
          f"b/d = {res.median('b', 'rps') / res.median('d', 'rps'):.2f}")
    cpu_c = res.median("c", "server_cpu_us")
    cpu_a = res.median("a", "server_cpu_us") / cpu_c
    print(f"server CPU per request relative to baseline: a/c = {cpu_a:.2f}x, "
          f"b/c = {res.median('b', 'server_cpu_us') / cpu_c:.2f}x")
    print("(p50/p99 are nearest-rank percentiles of h2load's per-request --log-file timings; "
          "baseline = aiohttp low-level web.Server, not a web.Application)")
    return ratio_a, cpu_a


# ------------------------------------------------------------------------------ part 3


@attrs.frozen
class AclPair:
    """One credential's "ACLs on" target against its "ACLs off" twin."""

    label: str
    on: str  # target keys
    off: str


ACL_PAIRS = (AclPair("workload identity", "e", "f"), AclPair("client token", "g", "h"))


@attrs.frozen
class AclCost:
    label: str
    on: str
    off: str
    rps_on: float
    rps_off: float
    cpu_on: float  # server CPU us per request
    cpu_off: float

    @property
    def overhead(self) -> float:
        """Extra time per request with ACLs on, from throughput (0.05 = 5 % slower)."""
        return self.rps_off / self.rps_on - 1

    @property
    def cpu_overhead(self) -> float:
        return self.cpu_on / self.cpu_off - 1


async def acl_benchmark(h2load: str, root: Path, duration: int, rounds: int
                        ) -> list[AclCost]:
    # Both are set up alike with ACLs on, then restarted, one with them off: the two
    # processes differ in nothing else (not even in having been restarted).
    on, off = AgentUnderTest(root, "acl-on", acl=True), AgentUnderTest(root, "acl-off", acl=True)
    try:
        print("\nACL cost: starting two agents (ACLs on / off) and their tasks ...", flush=True)
        for agent in (on, off):
            await agent.start()
            await agent.setup_acls()
            await agent.run_task()
            await agent.restart(acl=agent is on)
        metadata = f"http://localhost{METADATA_PATH}"
        targets = (
            Target("e", "ACLs on, identity", metadata, on.socket_path, on.pid, on.token),
            Target("f", "ACLs off, identity", metadata, off.socket_path, off.pid, off.token),
            Target("g", "ACLs on, client token", metadata, on.socket_path, on.pid,
                   on.client_token),
            Target("h", "ACLs off, client token", metadata, off.socket_path, off.pid,
                   off.client_token),
        )
        jobs = f"http://localhost{JOBS_PATH}"
        for target in targets:
            acls_on = target.pid == on.pid
            await expect_status(target, 200)
            await expect_status(target, 401, token=None)
            # The policy grants node read only: with ACLs on a jobs list must be refused.
            await expect_status(target, 403 if acls_on else 200, url=jobs)
        print(f"GET {METADATA_PATH} over the task sockets of {on.address} (ACLs on) and "
              f"{off.address} (ACLs off)", flush=True)
        res = await alternate_runs(h2load, root, targets, duration, rounds)
    except BenchError:
        for agent in (on, off):
            if agent.output:
                print(f"---- {agent.name} output (last lines) ----\n{agent.output}",
                      file=sys.stderr)
        raise
    finally:
        for agent in (on, off):
            await agent.stop_task()
            await agent.stop()
        await asyncio.to_thread(kill_leftovers, root)
    return [AclCost(label=pair.label, on=pair.on, off=pair.off,
                    rps_on=res.median(pair.on, "rps"), rps_off=res.median(pair.off, "rps"),
                    cpu_on=res.median(pair.on, "server_cpu_us"),
                    cpu_off=res.median(pair.off, "server_cpu_us"))
            for pair in ACL_PAIRS]


def print_acl_results(costs: Sequence[AclCost]) -> None:
    print("\nmedians over rounds, ACLs on vs off (GET /v1/client/metadata, task socket):")
    print(f"{'credential':<23} {'req/s on':>9} {'req/s off':>9} {'on/off':>7} "
          f"{'CPU us/req on':>13} {'off':>6} {'cost (req/s)':>12} {'cost (CPU)':>10}")
    for c in costs:
        print(f"{c.label + f' ({c.on}/{c.off})':<23} {c.rps_on:>9.0f} {c.rps_off:>9.0f} "
              f"{c.rps_on / c.rps_off:>7.2f} {c.cpu_on:>13.1f} {c.cpu_off:>6.1f} "
              f"{c.overhead:>+12.1%} {c.cpu_overhead:>+10.1%}")
    print("(cost (req/s) = req/s off / req/s on - 1: extra time per request with ACLs on; "
          "cost (CPU) = server CPU per request on / off - 1)")


# ------------------------------------------------------------------------------ part 4

VARIABLE_PATH = f"/v1/var/nomad/jobs/{JOB_ID}"


@attrs.frozen
class VarsCost:
    rps_health: float
    rps_var: float
    cpu_health: float  # server CPU us per request
    cpu_var: float

    @property
    def ratio(self) -> float:
        return self.rps_var / self.rps_health


async def vars_benchmark(h2load: str, root: Path, duration: int, rounds: int) -> VarsCost:
    agent = AgentUnderTest(root, "vars", acl=True)
    try:
        print("\nvariables: starting an agent (ACLs on) and its task ...", flush=True)
        await agent.start()
        await agent.setup_acls()
        async with agent.api() as api:
            await api.variable_write(f"nomad/jobs/{JOB_ID}",
                                     {"user": "bench", "password": "x" * 32})
        await agent.run_task()
        targets = (
            Target("v", "health, task socket", f"http://localhost{HEALTH_PATH}",
                   agent.socket_path, agent.pid, agent.token),
            Target("w", "variable, task socket", f"http://localhost{VARIABLE_PATH}",
                   agent.socket_path, agent.pid, agent.token),
        )
        for target in targets:
            await expect_status(target, 200)
            await expect_status(target, 401, token=None)
        # the identity reads its own job's variable only: another path must be refused
        await expect_status(targets[1], 403, url="http://localhost/v1/var/nomad/jobs/other")
        print(f"GET {VARIABLE_PATH} vs {HEALTH_PATH} over {agent.socket_path}", flush=True)
        res = await alternate_runs(h2load, root, targets, duration, rounds)
    except BenchError:
        if agent.output:
            print(f"---- agent output (last lines) ----\n{agent.output}", file=sys.stderr)
        raise
    finally:
        await agent.stop_task()
        await agent.stop()
        await asyncio.to_thread(kill_leftovers, root)
    return VarsCost(rps_health=res.median("v", "rps"), rps_var=res.median("w", "rps"),
                    cpu_health=res.median("v", "server_cpu_us"),
                    cpu_var=res.median("w", "server_cpu_us"))


def print_vars_results(cost: VarsCost) -> None:
    print("\nmedians over rounds, variable read vs health (task socket, workload identity):")
    print(f"health {cost.rps_health:.0f} req/s ({cost.cpu_health:.1f} CPU us/req), "
          f"variable {cost.rps_var:.0f} req/s ({cost.cpu_var:.1f} CPU us/req)")
    print(f"throughput ratio w/v = {cost.ratio:.2f}; server CPU per request w/v = "
          f"{cost.cpu_var / cost.cpu_health:.2f}x")


def vars_rows(cost: VarsCost) -> list[SummaryRow]:
    return [("variable read vs health (w/v, req/s)", "-", f"{cost.ratio:.2f}", True)]


# ------------------------------------------------------------------------------ part 5

FLOOD_CLIENTS = 64
# The quiet task's pace (requests per second to its socket, and as many to the TCP API):
# well within the default rate limit, as a task that is not flooding would be.
QUIET_RATE = 50
FLOOD_JOB = "taskapi-flood"
QUIET_JOB = "taskapi-quiet"
TARGET_FLOOD_P99 = 2.0  # the quiet task's and the TCP API's p99 under a flood vs idle
# How the fairness agents differ: the defaults, and the same with the rate limit off (for
# reference: what the flood would do without it).
DEFAULT_TASK_API: dict[str, Any] = {}
COST_CONFIGS: dict[str, dict[str, Any]] = {
    # The plain Task API: nothing counted, checked or recorded per request.
    "x": {"rate_limit": {"requests_per_second": 0}, "peer_credentials": "off"},
    "y": {"rate_limit": {"requests_per_second": 0}, "peer_credentials": "off",
          "audit": {"enabled": True}},
    "z": {"rate_limit": {"requests_per_second": 0}, "peer_credentials": "enforce"},
}
COST_LABELS = {"x": "plain Task API", "y": "audit on", "z": "peer check enforce"}


@attrs.frozen
class Latencies:
    """p50 / p99 (ms) of one request at a time over the quiet task's socket and the TCP API."""

    quiet_p50: float
    quiet_p99: float
    tcp_p50: float
    tcp_p99: float


@attrs.frozen
class FloodOutcome:
    """What the flooding task's h2load got (answers per second)."""

    served: float
    refused: float
    other: float
    agent_cpu: float  # the agent's CPU time per wall second during the flood


@attrs.frozen
class FairnessRound:
    idle: Latencies
    flooded: Latencies
    flood: FloodOutcome


async def quiet_latencies(agent: AgentUnderTest, quiet: TaskSocket, seconds: float
                          ) -> Latencies:
    """``GET /v1/agent/health`` one request at a time for ``seconds``, alternating the quiet
    task's socket and the TCP API (one kept-alive connection each), ``QUIET_RATE`` pairs a
    second."""
    import aiohttp

    health = f"http://localhost{HEALTH_PATH}"
    headers = {"Authorization": f"Bearer {quiet.token}"}
    socket_times: list[float] = []
    tcp_times: list[float] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=quiet.socket_path),
                                     timeout=timeout) as unix, \
            aiohttp.ClientSession(timeout=timeout) as tcp:
        start = time.perf_counter()
        for slot in range(int(seconds * QUIET_RATE)):
            await asyncio.sleep(max(0.0, start + slot / QUIET_RATE - time.perf_counter()))
            for session, url, times in ((unix, health, socket_times),
                                        (tcp, agent.address + HEALTH_PATH, tcp_times)):
                t0 = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise BenchError(f"quiet request to {url} answered {resp.status}")
                times.append((time.perf_counter() - t0) * 1000)
    socket_times.sort()
    tcp_times.sort()
    return Latencies(percentile(socket_times, 50), percentile(socket_times, 99),
                     percentile(tcp_times, 50), percentile(tcp_times, 99))


async def run_flood(h2load: str, flood: TaskSocket, duration: int
                    ) -> tuple[dict[str, int], float]:
    """h2load --h1 -c 64 against the flooding task's socket for ``duration`` s: the count
    of answers by class (2xx, 4xx, other) and the seconds it ran. 429s are expected."""
    proc = await asyncio.create_subprocess_exec(
        h2load, "--h1", "-c", str(FLOOD_CLIENTS), "-D", str(duration),
        "-H", f"Authorization: Bearer {flood.token}", "-B", f"unix:{flood.socket_path}",
        f"http://localhost{HEALTH_PATH}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    started = time.monotonic()
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"flood: h2load did not finish within {duration + 60}s") from None
    elapsed = time.monotonic() - started
    text = out.decode(errors="replace")
    status = _STATUS.search(text)
    if proc.returncode != 0 or status is None:
        raise BenchError(f"flood: h2load exited {proc.returncode}:\n{text}")
    s2xx, s3xx, s4xx, s5xx = map(int, status.groups())
    return {"2xx": s2xx, "4xx": s4xx, "other": s3xx + s5xx}, elapsed


async def flood_in_effect(agent: AgentUnderTest, flood: TaskSocket, limited: bool) -> bool:
    """Whether the flood is on: with a rate limit, the flooding task's bucket is empty (a
    probe on its socket gets 429) or its connections are all taken (the probe's is closed);
    without one, the agent is busy serving it."""
    if limited:
        import aiohttp

        try:
            status, _ = await request_status(f"http://localhost{HEALTH_PATH}",
                                             flood.socket_path, flood.token)
        except (aiohttp.ClientConnectionError, OSError):
            return True  # the flood holds every connection the socket admits
        return status == 429
    before = cpu_seconds(agent.pid)
    await asyncio.sleep(0.2)
    return (cpu_seconds(agent.pid) - before) / 0.2 > 0.3


async def fairness_round(h2load: str, agent: AgentUnderTest, quiet: TaskSocket,
                         flood: TaskSocket, duration: int, limited: bool) -> FairnessRound:
    idle = await quiet_latencies(agent, quiet, duration)
    # The flood runs a little longer than the measurement, which starts once it is going.
    flooding = asyncio.create_task(run_flood(h2load, flood, duration + 3))
    try:
        await poll(lambda: flood_in_effect(agent, flood, limited), 10, "the flood to start")
        cpu_before, wall_before = cpu_seconds(agent.pid), time.monotonic()
        flooded = await quiet_latencies(agent, quiet, duration)
        cpu = (cpu_seconds(agent.pid) - cpu_before) / (time.monotonic() - wall_before)
    finally:
        counts, elapsed = await flooding
    return FairnessRound(idle, flooded, FloodOutcome(
        served=counts["2xx"] / elapsed, refused=counts["4xx"] / elapsed,
        other=counts["other"] / elapsed, agent_cpu=cpu))


@attrs.frozen
class FairnessResults:
    label: str
    rounds: tuple[FairnessRound, ...]

    def median(self, pick: Callable[[FairnessRound], float]) -> float:
        return statistics.median(pick(r) for r in self.rounds)

    @property
    def quiet_ratio(self) -> float:
        return self.median(lambda r: r.flooded.quiet_p99) / self.median(
            lambda r: r.idle.quiet_p99)

    @property
    def tcp_ratio(self) -> float:
        return self.median(lambda r: r.flooded.tcp_p99) / self.median(lambda r: r.idle.tcp_p99)


async def fairness_on(h2load: str, root: Path, name: str, task_api: dict[str, Any],
                      duration: int, rounds: int) -> FairnessResults:
    agent = AgentUnderTest(root, name, task_api=task_api)
    try:
        await agent.start()
        quiet = await agent.run_task(job_id=QUIET_JOB)
        flood = await agent.run_task(job_id=FLOOD_JOB)
        for task in (quiet, flood):
            status, body = await request_status(f"http://localhost{HEALTH_PATH}",
                                                task.socket_path, task.token)
            if status != 200:
                raise BenchError(f"{name}: task socket {task.socket_path} answered {status}: "
                                 f"{body[:200]}")
        done = []
        for rnd in range(1, rounds + 1):
            result = await fairness_round(h2load, agent, quiet, flood, duration,
                                          limited=task_api is not UNLIMITED_TASK_API)
            done.append(result)
            print(f"{rnd:>5} {name:<16} idle quiet p50/p99 {result.idle.quiet_p50:6.2f}/"
                  f"{result.idle.quiet_p99:6.2f} ms, TCP {result.idle.tcp_p50:6.2f}/"
                  f"{result.idle.tcp_p99:6.2f} | flooded quiet {result.flooded.quiet_p50:6.2f}/"
                  f"{result.flooded.quiet_p99:6.2f}, TCP {result.flooded.tcp_p50:6.2f}/"
                  f"{result.flooded.tcp_p99:6.2f} | flood got {result.flood.served:.0f} 2xx/s, "
                  f"{result.flood.refused:.0f} 429/s; agent CPU "
                  f"{result.flood.agent_cpu:.0%}", flush=True)
        return FairnessResults(name, tuple(done))
    except BenchError:
        if agent.output:
            print(f"---- {name} output (last lines) ----\n{agent.output}", file=sys.stderr)
        raise
    finally:
        await agent.stop_task()
        await agent.stop()
        await asyncio.to_thread(kill_leftovers, root)


@attrs.frozen
class ControlCost:
    runs: HttpResults
    peer_check_us: float  # one connection's peer check: a non-root task process


def peer_check_cost(samples: int = 2000) -> float:
    """Microseconds for ``peer_is_task`` on a non-root process that is the child of the
    task's root (what a task's own connection costs under ``log`` / ``enforce``, once per
    connection): the real check on real processes, run as nobody."""
    import pwd
    import subprocess

    import psutil

    from nomad_client.http.peercred import PeerCred, peer_is_task

    nobody = pwd.getpwnam("nobody")
    # In a process group of its own, so the shell and its child both go at the end.
    shell = subprocess.Popen(["sh", "-c", "sleep 60; true"], user=nobody.pw_uid,
                             group=nobody.pw_gid, extra_groups=[], cwd="/",
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(shell.pid).children():
            if time.monotonic() > deadline:
                raise BenchError("the peer-check helper started no child")
            time.sleep(0.01)
        child = psutil.Process(shell.pid).children()[0].pid
        root_proc = (shell.pid, psutil.Process(shell.pid).create_time())
        peer = PeerCred(child, nobody.pw_uid, nobody.pw_gid)
        t0 = time.perf_counter()
        for _ in range(samples):
            if not peer_is_task(peer, root_proc):
                raise BenchError("the peer check refused the task's own process")
        return (time.perf_counter() - t0) * 1e6 / samples
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


async def control_cost(h2load: str, root: Path, duration: int, rounds: int) -> ControlCost:
    agents = {key: AgentUnderTest(root, f"cost-{key}", task_api=config)
              for key, config in COST_CONFIGS.items()}
    try:
        print("\nTask API controls: starting three agents (plain, audit, enforce) ...",
              flush=True)
        targets = []
        for key, agent in agents.items():
            await agent.start()
            task = await agent.run_task()
            targets.append(Target(key, COST_LABELS[key], f"http://localhost{HEALTH_PATH}",
                                  task.socket_path, agent.pid, task.token))
        for target in targets:
            await expect_status(target, 200)
            await expect_status(target, 401, token=None)
        audit_log = agents["y"].data_dir / "audit" / "task-api.log"
        if not await asyncio.to_thread(audit_log.is_file):
            raise BenchError(f"audit on, but no audit log at {audit_log}")
        runs = await alternate_runs(h2load, root, targets, duration, rounds)
    except BenchError:
        for agent in agents.values():
            if agent.output:
                print(f"---- {agent.name} output (last lines) ----\n{agent.output}",
                      file=sys.stderr)
        raise
    finally:
        for agent in agents.values():
            await agent.stop_task()
            await agent.stop()
        await asyncio.to_thread(kill_leftovers, root)
    return ControlCost(runs, await asyncio.to_thread(peer_check_cost))


async def fairness_benchmark(h2load: str, root: Path, duration: int, rounds: int
                             ) -> tuple[list[FairnessResults], ControlCost]:
    print(f"\nfairness: two tasks on one agent; the quiet task's socket and the TCP API "
          f"measured one request at a time, idle and while the other task floods its socket "
          f"(h2load --h1 -c {FLOOD_CLIENTS}), {rounds} round(s) of {duration} s each",
          flush=True)
    results = [
        await fairness_on(h2load, root, "defaults", DEFAULT_TASK_API, duration, rounds),
        await fairness_on(h2load, root, "rate limit off", UNLIMITED_TASK_API, duration,
                          rounds),
    ]
    return results, await control_cost(h2load, root, duration, rounds)


def print_fairness_results(results: Sequence[FairnessResults], cost: ControlCost) -> None:
    print("\nmedians over rounds, p99 flooded / idle (one request at a time):")
    for res in results:
        print(f"  {res.label:<16} quiet task socket {res.quiet_ratio:.2f}x "
              f"({res.median(lambda r: r.idle.quiet_p99):.2f} -> "
              f"{res.median(lambda r: r.flooded.quiet_p99):.2f} ms), TCP API "
              f"{res.tcp_ratio:.2f}x ({res.median(lambda r: r.idle.tcp_p99):.2f} -> "
              f"{res.median(lambda r: r.flooded.tcp_p99):.2f} ms); the flood got "
              f"{res.median(lambda r: r.flood.served):.0f} 2xx/s and "
              f"{res.median(lambda r: r.flood.refused):.0f} 429/s, agent CPU "
              f"{res.median(lambda r: r.flood.agent_cpu):.0%}")
    runs = cost.runs
    print("\nmedians over rounds, Task API controls (GET /v1/agent/health, task socket):")
    for key in ("y", "z"):
        cpu = runs.median(key, "server_cpu_us") / runs.median("x", "server_cpu_us")
        print(f"  {COST_LABELS[key]} vs plain ({key}/x): req/s "
              f"{runs.median(key, 'rps') / runs.median('x', 'rps'):.2f}, server CPU per "
              f"request {cpu:.2f}x")
    print(f"  peer check of a non-root task process: {cost.peer_check_us:.0f} us, once per "
          "connection, inline on the event loop (h2load runs as root: its connections pass "
          "on uid 0 without the walk; every request then reads the connection's verdict)")


def fairness_rows(results: Sequence[FairnessResults], cost: ControlCost) -> list[SummaryRow]:
    defaults = results[0]
    runs = cost.runs
    rows: list[SummaryRow] = [
        ("flood: quiet socket p99 flooded/idle", f"<= {TARGET_FLOOD_P99:.0f}x",
         f"{defaults.quiet_ratio:.2f}x", defaults.quiet_ratio <= TARGET_FLOOD_P99),
        ("flood: TCP API p99 flooded/idle", f"<= {TARGET_FLOOD_P99:.0f}x",
         f"{defaults.tcp_ratio:.2f}x", defaults.tcp_ratio <= TARGET_FLOOD_P99),
    ]
    rows += [(f"{COST_LABELS[key]} vs plain ({key}/x, req/s)", "-",
              f"{runs.median(key, 'rps') / runs.median('x', 'rps'):.2f}", True)
             for key in ("y", "z")]
    return rows


# ------------------------------------------------------------------------------ part 2


@attrs.frozen
class ChurnResults:
    sockets: int
    create_ms: float
    remove_ms: float
    rss_before: int
    rss_live: int
    rss_after: int
    peak_rss_delta: int
    fds_before: int
    fds_live: int
    fds_after: int

    @property
    def kib_per_socket(self) -> float:
        return (self.rss_live - self.rss_before) / 1024 / self.sockets

    @property
    def fds_per_socket(self) -> float:
        return (self.fds_live - self.fds_before) / self.sockets


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def peak_rss() -> int:
    """VmHWM: the process's peak resident set, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); best effort.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


async def churn_benchmark(root: Path, count: int) -> ChurnResults:
    import psutil

    from nomad_client.agent.agent import Agent
    from nomad_client.agent.config import AgentConfig, ClientConfig, PortsConfig, ServerConfig
    from nomad_client.allocrunner.hooks import AllocHookDeps, TaskContext
    from nomad_client.allocrunner.taskapi_hook import TaskAPIHook
    from nomad_client.client.allocdir import AllocDir
    from nomad_client.client.taskapi_config import LiveTaskAPIConfig
    from nomad_client.client.taskenv import NodeView
    from nomad_client.http.taskapi import TaskAPIServer
    from nomad_client.structs.models import Allocation, TaskEvent

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != -1 and soft < count + 256:
        raise BenchError(f"open-file limit {soft} is too low for {count} sockets "
                         f"(raise it with `ulimit -n {count + 256}`; hard limit {hard})")

    # A server-only in-process agent: the real Server and Router, wired as the agent does.
    agent = Agent(AgentConfig(data_dir=str(root / "churn-agent"), log_level="WARN",
                              ports=PortsConfig(http=0), server=ServerConfig(enabled=True),
                              client=ClientConfig(enabled=False)))
    await agent.start()
    hook: TaskAPIHook | None = None
    try:
        assert agent.router is not None
        alloc_id = str(uuid.uuid4())
        tasks = [{"Name": f"t{i}", "Driver": "raw_exec"} for i in range(count)]
        job: dict[str, Any] = {"ID": "churn", "Type": "service",
                               "TaskGroups": [{"Name": "g", "Tasks": tasks}]}
        alloc = Allocation(id=alloc_id, namespace="default", eval_id=str(uuid.uuid4()),
                           name="churn.g[0]", node_id="bench-node", node_name="bench",
                           job_id="churn", job=job, task_group="g")
        alloc_dir = AllocDir(root / "churn-alloc", alloc_id)
        log = logging.getLogger("taskapi_bench")
        events: list[TaskEvent] = []
        node = NodeView(id="bench-node", name="bench", datacenter="dc1", region="global",
                        node_class="", pool="default", attributes={}, meta={})

        def build() -> list[TaskContext]:
            alloc_dir.build()
            return [TaskContext(alloc=alloc, task=task, alloc_dir=alloc_dir,
                                task_dir=alloc_dir.build_task_dir(task["Name"], None),
                                node=node, emit=events.append, log=log)
                    for task in job["TaskGroups"][0]["Tasks"]]

        contexts = await asyncio.to_thread(build)
        # The Task API server as the agent wires it, on the default config.
        live = LiveTaskAPIConfig()
        hook_server = TaskAPIServer(agent.router, live, audit_path=root / "churn-audit.log",
                                    node_id=lambda: "bench-node")
        hook = TaskAPIHook(AllocHookDeps(alloc=alloc, alloc_dir=alloc_dir,
                                         task_api=hook_server, log=log, task_api_config=live))
        # Warm-up on a few tasks so lazy one-time costs (worker threads, the private staging
        # dir, imports) are not billed to the measured sockets.
        for ctx in contexts[:10]:
            await hook.task_starting(ctx)
        for ctx in contexts[:10]:
            await hook.task_stopped(ctx)

        proc = psutil.Process()
        gc.collect()
        fds_before, rss_before = open_fds(), proc.memory_info().rss
        reset_peak_rss()
        peak_before = peak_rss()

        started = time.perf_counter()
        for ctx in contexts:
            await hook.task_starting(ctx)
        create_s = time.perf_counter() - started

        if events:
            raise BenchError(f"{len(events)} task(s) reported a Task API failure, first: "
                             f"{events[0].message}")
        missing = [c.name for c in contexts if not _is_socket(_socket_of(c))]
        if missing:
            raise BenchError(f"{len(missing)} task(s) got no socket, first: {missing[0]}")
        gc.collect()
        fds_live, rss_live = open_fds(), proc.memory_info().rss
        peak_delta = peak_rss() - peak_before
        # After measuring: the check's own connection must not count as a socket's cost.
        await check_live_socket(str(_socket_of(contexts[-1])))

        started = time.perf_counter()
        for ctx in contexts:
            await hook.task_stopped(ctx)
        remove_s = time.perf_counter() - started

        left = [c.name for c in contexts if (c.task_dir.secrets_dir / "api.sock").exists()]
        if left:
            raise BenchError(f"{len(left)} socket(s) still on disk after task_stopped, "
                             f"first: {left[0]}")
        gc.collect()
        return ChurnResults(
            sockets=count, create_ms=create_s * 1000 / count, remove_ms=remove_s * 1000 / count,
            rss_before=rss_before, rss_live=rss_live, rss_after=proc.memory_info().rss,
            peak_rss_delta=peak_delta, fds_before=fds_before, fds_live=fds_live,
            fds_after=open_fds())
    finally:
        if hook is not None:
            await hook.shutdown()
            await hook_server.close()
        await agent.stop()


async def churn_in_child(root: Path, count: int) -> ChurnResults:
    """Part 2 in a fresh process (this script as ``--churn-worker DIR``): memory that part 1
    freed would otherwise be reused and hide what the sockets cost."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--churn-worker", str(root), "--sockets", str(count),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(REPO))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 600)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError("socket churn did not finish within 600s") from None
    if proc.returncode != 0:
        raise BenchError(f"socket churn worker exited {proc.returncode}: "
                         f"{err.decode(errors='replace').strip()}")
    lines = out.decode().strip().splitlines()
    try:
        return ChurnResults(**json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError) as exc:
        raise BenchError(f"socket churn worker printed no result ({exc}): {out!r}") from None


def churn_worker(root: str, count: int) -> int:
    """Child process body for part 2: one JSON line of ``ChurnResults`` on stdout."""
    try:
        res = asyncio.run(churn_benchmark(Path(root), count))
    except BenchError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(attrs.asdict(res)))
    return 0


def _socket_of(ctx: Any) -> Path:
    return Path(ctx.task_dir.secrets_dir) / DEFAULT_SOCKET_NAME


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


async def check_live_socket(path: str | None) -> None:
    """A created socket really serves the router: no token must get the Task API's 401."""
    import aiohttp

    assert path is not None
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path),
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://localhost{HEALTH_PATH}") as resp:
            if resp.status != 401:
                raise BenchError(f"socket {path} answered {resp.status} without a token, "
                                 "expected 401")


def print_churn_results(res: ChurnResults) -> None:
    mib = 1024 * 1024
    print(f"\nsocket churn ({res.sockets} task sockets, one TaskAPIHook, sequential awaits):")
    print(f"  create: {res.create_ms:.3f} ms/socket    remove: {res.remove_ms:.3f} ms/socket")
    print(f"  RSS: before {res.rss_before / mib:.1f} MiB, all live {res.rss_live / mib:.1f} MiB, "
          f"after removal {res.rss_after / mib:.1f} MiB; peak rise {res.peak_rss_delta / 1024:.0f}"
          f" KiB  => {res.kib_per_socket:.2f} KiB per live socket")
    print(f"  open fds: before {res.fds_before}, all live {res.fds_live}, after removal "
          f"{res.fds_after}  => {res.fds_per_socket:.3f} fd per live socket")


# ------------------------------------------------------------------------------ summary


SummaryRow = tuple[str, str, str, bool]  # measure, target, measured, met


def http_rows(ratio_a: float) -> list[SummaryRow]:
    return [("throughput a/c (task socket vs baseline)", f">= {TARGET_RATIO:.2f}",
             f"{ratio_a:.2f}", ratio_a >= TARGET_RATIO)]


def churn_rows(churn: ChurnResults) -> list[SummaryRow]:
    return [
        ("avg create per socket", f"<= {TARGET_MS:.1f} ms", f"{churn.create_ms:.3f} ms",
         churn.create_ms <= TARGET_MS),
        ("avg remove per socket", f"<= {TARGET_MS:.1f} ms", f"{churn.remove_ms:.3f} ms",
         churn.remove_ms <= TARGET_MS),
        ("RSS per idle socket", f"<= {TARGET_KIB:.0f} KiB", f"{churn.kib_per_socket:.2f} KiB",
         churn.kib_per_socket <= TARGET_KIB),
        ("fds per idle socket", f"== {TARGET_FDS}", f"{churn.fds_per_socket:.3f}",
         churn.fds_live - churn.fds_before == TARGET_FDS * churn.sockets),
    ]


def acl_rows(costs: Sequence[AclCost]) -> list[SummaryRow]:
    return [(f"ACLs on vs off, {c.label} ({c.on}/{c.off})", f"< {TARGET_ACL_OVERHEAD:.0%}",
             f"{c.overhead:+.1%}", c.overhead < TARGET_ACL_OVERHEAD) for c in costs]


def print_summary(rows: Sequence[SummaryRow], cpu_a: float | None,
                  costs: Sequence[AclCost]) -> None:
    print("\nsummary")
    print(f"{'measure':<42} {'target':<10} {'measured':<12} result")
    for name, target, measured, met in rows:
        print(f"{name:<42} {target:<10} {measured:<12} {'met' if met else 'NOT met'}")
    # CPU per request barely moves with other load on the machine; req/s does.
    if cpu_a is not None:
        print(f"(for reference: a/c from server CPU per request would be {1 / cpu_a:.2f} "
              "when serving is CPU-bound)")
    for c in costs:
        print(f"(for reference: ACLs on vs off, {c.label}, from server CPU per request: "
              f"{c.cpu_overhead:+.1%})")


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the Task API (see module docstring).")
    # Whole seconds: h2load's -D takes no fractions.
    p.add_argument("--duration", type=int, default=5, help="seconds per h2load run")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of a,b,c,d runs (and of e,f,g,h for the acl part)")
    p.add_argument("--sockets", type=int, default=1000, help="task sockets for the churn part")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    p.add_argument("--serve-baseline", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--baseline-loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help=argparse.SUPPRESS)
    p.add_argument("--churn-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_baseline is None and args.churn_worker is None:
        if not 1 <= args.duration <= 600:
            p.error(f"--duration must be within 1..600 seconds, got {args.duration}")
        if not 1 <= args.rounds <= 50:
            p.error(f"--rounds must be within 1..50, got {args.rounds}")
        if not 11 <= args.sockets <= 10000:
            p.error(f"--sockets must be within 11..10000, got {args.sockets}")
        args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
        unknown = sorted(set(args.parts) - set(PARTS))
        if unknown or not args.parts:
            p.error(f"--parts takes some of {','.join(PARTS)}, got {','.join(unknown) or 'none'}")
    return args


async def run(args: argparse.Namespace, h2load: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="taskapi-bench-"))
    rows: list[SummaryRow] = []
    cpu_a: float | None = None
    costs: list[AclCost] = []
    try:
        if "http" in args.parts:
            http = await http_benchmark(h2load, root, args.duration, args.rounds)
            ratio_a, cpu_a = print_http_results(http)
            rows += http_rows(ratio_a)
        if "churn" in args.parts:
            churn = await churn_in_child(root, args.sockets)
            print_churn_results(churn)
            rows += churn_rows(churn)
        if "acl" in args.parts:
            costs = await acl_benchmark(h2load, root, args.duration, args.rounds)
            print_acl_results(costs)
            rows += acl_rows(costs)
        if "vars" in args.parts:
            cost = await vars_benchmark(h2load, root, args.duration, args.rounds)
            print_vars_results(cost)
            rows += vars_rows(cost)
        if "fairness" in args.parts:
            fairness, controls = await fairness_benchmark(h2load, root, args.duration,
                                                          args.rounds)
            print_fairness_results(fairness, controls)
            rows += fairness_rows(fairness, controls)
        print_summary(rows, cpu_a, costs)
    finally:
        await asyncio.to_thread(kill_leftovers, root)
        await asyncio.to_thread(shutil.rmtree, root, True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_baseline is not None:
        return serve_baseline(args.serve_baseline, args.baseline_loop)
    if args.churn_worker is not None:
        return churn_worker(args.churn_worker, args.sockets)
    try:
        h2load = ensure_h2load()
        asyncio.run(run(args, h2load))
    except BenchError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
