"""Real agents for integration tests: each runs as its own process (``python -m nomad_client
agent``) on a random port with its own data dir, and is stopped (or killed) by the test."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from multidict import CIMultiDict

from nomad_client.api.client import ApiClient, ApiResponse
from nomad_client.jobspec import canonicalize_job, parse_jobspec
from nomad_client.structs.network import allocated_ports

_STARTED = re.compile(r"HTTP API: (http://[0-9.]+:\d+)")
# A server agent says where its RPC listener is, before the started line.
_RPC = re.compile(r"==> RPC: ([0-9.]+:\d+)")
# The last line an agent logs for each SIGHUP, whatever came of it.
RELOAD_DONE = re.compile(r"config reload(: applied |: no change |.*keeping the current "
                         r"configuration|.*previous Task API config back)")
REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = REPO / "testdata" / "policies"


class AgentProcess:
    def __init__(self, data_dir: Path, *, acl: bool = False, meta: Mapping[str, str] | None = None,
                 extra_config: str = "", task_api: Mapping[str, Any] | None = None,
                 server: bool = True, client: bool = True, servers: Iterable[str] = (),
                 cluster: Mapping[str, Any] | None = None, node_name: str | None = None
                 ) -> None:
        """``servers``: RPC addresses for a client-only agent (``server=False``);
        ``cluster``: more top-level config merged in (e.g. the etcd store's server block)."""
        self.data_dir = data_dir
        self.server = server
        self.client = client
        self.servers = list(servers)
        self.cluster = dict(cluster or {})
        self.name = node_name
        self.rpc_address = ""
        self.acl = acl
        self.meta = dict(meta or {})
        self.extra_config = extra_config
        # The body of client { task_api { ... } } in the agent's config (JSON shape).
        self.task_api = dict(task_api or {})
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""
        self._output: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def config_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.agent.json"

    def write_config(self) -> None:
        config: dict[str, Any] = {
            "data_dir": str(self.data_dir), "bind_addr": "127.0.0.1", "log_level": "DEBUG",
            "ports": {"http": 0, "rpc": 0}, "server": {"enabled": self.server},
            "client": {"enabled": self.client, "meta": self.meta},
            "acl": {"enabled": self.acl},
        }
        if self.name:
            config["name"] = self.name
        if self.servers:
            config["client"]["servers"] = self.servers
        if self.task_api:
            config["client"]["task_api"] = self.task_api
        for key, value in self.cluster.items():
            config[key] = ({**config[key], **value} if isinstance(config.get(key), dict)
                           else value)
        self.config_path.write_text(json.dumps(config))

    async def start(self, timeout: float = 20.0) -> None:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nomad_client", "agent", "-config", str(self.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
            cwd=str(REPO))
        started = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_output(started))
        try:
            self.address = await asyncio.wait_for(started, timeout)
        except (TimeoutError, RuntimeError) as exc:
            await self.kill()
            raise RuntimeError("agent did not start:\n" + self.output) from exc

    async def _read_output(self, started: asyncio.Future[str]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self._output.append(line)
            rpc = _RPC.search(line)
            if rpc:
                self.rpc_address = rpc.group(1)
            match = _STARTED.search(line)
            if match and not started.done():
                started.set_result(match.group(1))
        if not started.done():
            started.set_exception(RuntimeError("agent exited"))

    @property
    def output(self) -> str:
        return "".join(self._output)

    def api(self, token: str | None = None) -> ApiClient:
        return ApiClient(self.address, token=token or "")

    async def reload(self, task_api: Mapping[str, Any] | None = None,
                     timeout: float = 20.0) -> list[str]:
        """SIGHUP the agent (after rewriting its config with ``task_api``, when given) and
        wait for the reload to finish; the lines it logged, the outcome last."""
        assert self.proc is not None, "the agent is not running"
        if task_api is not None:
            self.task_api = dict(task_api)
            self.write_config()
        start = len(self._output)
        self.proc.send_signal(signal.SIGHUP)

        def finished() -> list[str] | None:
            lines = self._output[start:]
            done = [i for i, line in enumerate(lines) if RELOAD_DONE.search(line)]
            return lines[:done[0] + 1] if done else None
        lines: list[str] = await eventually(finished, timeout=timeout,
                                            message="the reload's last log line")
        return lines

    async def stop(self) -> int:
        """SIGTERM and wait (tasks are left running in non-dev mode)."""
        return await self._end(signal.SIGTERM)

    async def kill(self) -> int:
        """SIGKILL: the agent dies without any cleanup."""
        return await self._end(signal.SIGKILL)

    async def _end(self, sig: int) -> int:
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        if proc.returncode is None:
            proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
                self._reader = None
        return code


def load_job(name: str, **variables: str) -> dict[str, Any]:
    path = REPO / "testdata" / "jobs" / name
    return canonicalize_job(parse_jobspec(path.read_text(), str(path), variables or None))


def raw_exec_job(job_id: str, script: str, *, job_type: str = "service", count: int = 1,
                 restart: Mapping[str, Any] | None = None, identity: Mapping[str, Any] | None
                 = None, user: str | None = None, tasks: int = 1, kill_timeout_s: float = 5,
                 extra_task: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A canonical job whose task(s) run ``/bin/sh -c script`` with raw_exec."""
    task_list = []
    for i in range(tasks):
        task: dict[str, Any] = {
            "Name": "t" if tasks == 1 else f"t{i}", "Driver": "raw_exec",
            "Config": {"command": "/bin/sh", "args": ["-c", script]},
            "KillTimeout": int(kill_timeout_s * 1e9),
        }
        if identity is not None:
            task["Identity"] = dict(identity)
        if user is not None:
            task["User"] = user
        task.update(extra_task or {})
        task_list.append(task)
    group: dict[str, Any] = {"Name": "g", "Count": count, "Tasks": task_list}
    if restart is not None:
        group["RestartPolicy"] = dict(restart)
    return canonicalize_job({"ID": job_id, "Type": job_type, "TaskGroups": [group]})


async def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1,
                     message: str = "condition") -> Any:
    """Poll an async or sync check until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}; last value: {last!r}")


async def run_job(api: ApiClient, job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Register a job and return its allocation stubs once they exist."""
    await api.job_register(dict(job))

    async def allocs() -> list[dict[str, Any]]:
        found = await api.job_allocations(job["ID"])
        return found if len(found) >= _count(job) else []
    return await eventually(allocs, message=f"allocations of {job['ID']}")


def _count(job: Mapping[str, Any]) -> int:
    return sum(int(g.get("Count", 1)) for g in job["TaskGroups"])


async def alloc_status(api: ApiClient, alloc_id: str) -> dict[str, Any]:
    return await api.allocation_get(alloc_id)


async def wait_task_state(api: ApiClient, alloc_id: str, task: str, state: str,
                          timeout: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        alloc = await api.allocation_get(alloc_id)
        ts = (alloc.get("TaskStates") or {}).get(task)
        return alloc if ts and ts["State"] == state else None
    return await eventually(check, timeout=timeout, message=f"task {task} {state}")


async def wait_client_status(api: ApiClient, alloc_id: str, *statuses: str,
                             timeout: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        alloc = await api.allocation_get(alloc_id)
        return alloc if alloc["ClientStatus"] in statuses else None
    return await eventually(check, timeout=timeout, message=f"alloc status in {statuses}")


# ---------------------------------------------------------------------- ACLs


async def bootstrap_acls(agent: AgentProcess) -> str:
    """Bootstrap ACLs on a started agent; the management token's secret."""
    async with agent.api() as api:
        token = await api.acl_bootstrap()
    return str(token["SecretID"])


async def apply_policy(api: ApiClient, name: str, rules_file: str) -> None:
    """Write the policy ``name`` with the rules of ``testdata/policies/<rules_file>.hcl``."""
    rules = (POLICY_DIR / f"{rules_file}.hcl").read_text()
    await api.acl_policy_apply({"Name": name, "Rules": rules})


async def client_token(api: ApiClient, name: str, *policies: str) -> dict[str, Any]:
    """A new client token holding ``policies`` (as the API answers: SecretID, AccessorID,
    ...)."""
    return await api.acl_token_create({"Name": name, "Type": "client",
                                       "Policies": list(policies)})


def task_dir(agent: AgentProcess, alloc_id: str, task: str) -> Path:
    return agent.data_dir / "alloc" / alloc_id / task


def sparse(path: Path, size: int, head: bytes = b"") -> None:
    """A file that looks ``size`` bytes long but costs the task no disk."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def fds_on(path: Path, pid: int | str = "self") -> int:
    """How many of a process's descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                count += 1
        except OSError:
            continue  # closed while we looked
    return count


def new_marker() -> str:
    """A unique word to put in a task's command line, to find its processes by."""
    return f"itest-{uuid.uuid4().hex}"


def procs_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info.get("cmdline") or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def is_alive(proc: psutil.Process) -> bool:
    # is_running() also compares the start time, so a reused pid does not count.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def event_types(alloc: Mapping[str, Any], task: str = "t") -> list[str]:
    return [e["Type"] for e in alloc["TaskStates"][task]["Events"]]


# Where a secret may legitimately rest under an agent's data dir: the alloc dirs (each task's
# secrets dir holds its own identity, and a task may print its token to its own logs) and
# the keyring (the signing key's home).
SECRET_SCAN_SKIPPED = ("alloc", "server/keyring")


async def assert_no_secrets(agent: AgentProcess, secrets: Iterable[str | bytes]) -> None:
    """Fail if any of ``secrets`` appears, as plain bytes, in the agent's captured output or
    in any file under its data dir other than ``SECRET_SCAN_SKIPPED``. Failure messages never
    show a secret in full."""
    wanted = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
    assert all(len(s) >= 8 for s in wanted), "a secret this short would match by chance"
    skipped = [agent.data_dir / p for p in SECRET_SCAN_SKIPPED]
    output = agent.output.encode()
    found = await asyncio.to_thread(_files_with_secrets, agent.data_dir, skipped, wanted)
    found += [("agent output", s) for s in wanted if s in output]
    assert not found, "secrets found: " + ", ".join(
        f"{s[:6].decode(errors='replace')}… in {where}" for where, s in found)


def _files_with_secrets(root: Path, skipped: list[Path], wanted: list[bytes]
                        ) -> list[tuple[str, bytes]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # never follows symlinks
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skipped]
        for name in filenames:
            path = here / name
            if path in skipped or not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue  # e.g. a file removed while we walk
            found += [(str(path.relative_to(root)), s) for s in wanted if s in data]
    return found


def parse_raw_response(data: bytes) -> ApiResponse:
    """An HTTP/1.x response read off a raw socket (status, headers, body up to its length)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    length = headers.get("Content-Length")
    return ApiResponse(int(status_line.split()[1]), headers,
                       body[:int(length)] if length is not None else body)


# ---------------------------------------------------------------------- Variables


async def rotate_keyring_full(api: ApiClient) -> dict[str, Any]:
    """``operator root keyring rotate -full`` through the API: a new active root key, and
    every variable re-encrypted with it."""
    resp = await api.request("PUT", "/v1/operator/keyring/rotate", params={"full": ""})
    assert resp.status == 200, (resp.status, resp.text())
    answer: dict[str, Any] = resp.json()
    return answer


def variable_job(job_id: str, script: str, *, job_type: str = "batch",
                 count: int = 1) -> dict[str, Any]:
    """A canonical job from a jobspec whose raw_exec task runs ``/bin/sh -c script`` with
    ``env { NOMAD_ADDR = "${NOMAD_UNIX_ADDR}" }`` and ``identity { env = true }``: the
    project's CLI in ``script`` talks to the agent over the task's socket as the task."""
    # JSON string escapes are valid HCL; `${` would be interpolated by the jobspec.
    assert "${" not in script
    text = f"""
job {json.dumps(job_id)} {{
  type = {json.dumps(job_type)}
  group "g" {{
    count = {count}
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    task "t" {{
      driver = "raw_exec"
      config {{
        command = "/bin/sh"
        args    = ["-c", {json.dumps(script)}]
      }}
      env {{
        NOMAD_ADDR = "${{NOMAD_UNIX_ADDR}}"
      }}
      identity {{
        env = true
      }}
    }}
  }}
}}
"""
    return canonicalize_job(parse_jobspec(text, f"{job_id}.nomad.hcl"))


# For tests whose tasks call their own sockets with curl (a test dependency of the machine,
# not of the project): skipped, saying why, where it is missing.
NEEDS_CURL = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="curl is not installed: tasks cannot call their sockets")


def kill_exec_leftovers(data_dir: Path) -> list[str]:
    """Kill the processes of every task cgroup of the (stopped or killed) agent whose data
    dir is ``data_dir``, remove those cgroups and the agent's parent, and detach every mount
    under ``data_dir``; the task cgroups' names.

    An ``exec`` task outlives a killed agent like any task, but sweeping processes by their
    cwd misses it: in its chroot its cwd reads ``/``. Its cgroup names all of it. Only the
    mounts the agent made in the host's namespace are left to detach: a chroot's live in
    the task's own mount namespace and go with its last process.
    """
    from nomad_client.client import tmpfs
    from nomad_client.client.cgroups import remove_agent_cgroups

    names = remove_agent_cgroups(data_dir)
    for mount in tmpfs.mounts_under(data_dir):
        tmpfs.unmount(mount.mount_point)
    return names


async def start_ui_proxy(agent: AgentProcess, token: str) -> tuple[str, str]:
    """Run ``ui-proxy.nomad.hcl`` on ``agent`` with this interpreter; (its HTTPS base URL,
    its allocation ID) once it answers. Its certificate is self-signed: not checked here."""
    async with agent.api(token) as api:
        (stub,) = await run_job(api, load_job("ui-proxy.nomad.hcl", python=sys.executable))
        alloc = await wait_task_state(api, stub["ID"], "proxy", "running", timeout=30)
    (port,) = allocated_ports(alloc["AllocatedResources"])
    base = f"https://127.0.0.1:{port.value}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def answers() -> bool:
            try:
                async with session.get(f"{base}/ui/", ssl=False) as response:
                    return response.status == 200
            except (aiohttp.ClientError, OSError):
                return False
        await eventually(answers, timeout=30, interval=0.2, message="the UI proxy answering")
    return base, str(stub["ID"])
