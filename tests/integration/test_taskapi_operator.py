"""The operator's Task API controls (``client { task_api { ... } }``) on real agents with real
raw_exec tasks: SIGHUP reloads that reach running tasks and open sockets, the audit log,
peer-credential checks, identities bound to their own socket, and the per-task connection
and rate limits.

Requests "from the task" are made by the task itself: its script runs each request file the
test drops into its ``local/`` dir with curl, so the connecting process is the task's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pwd
import re
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_client.api.client import ApiClient
from nomad_client.client.allocdir import alloc_group
from tests.integration.harness import (
    NEEDS_CURL,
    AgentProcess,
    assert_no_secrets,
    bootstrap_acls,
    eventually,
    raw_exec_job,
)
from tests.integration.test_taskapi import (
    FILE_IDENTITY,
    answers,
    api_sock,
    local_dir,
    read_token,
    sock_request,
    start_task,
)

pytestmark = [
    pytest.mark.timeout(120),
    NEEDS_CURL,
]

# The task's side: run each request file ``req.N`` the test drops in, leave its output in
# ``out.N`` (renamed into place, so the test never reads half of it).
SERVE_REQUESTS = """cd "$NOMAD_TASK_DIR"
while true; do
  for r in req.*; do
    if [ -f "$r" ]; then
      n="${r#req.}"
      sh "$r" > "part.$n" 2>&1
      mv "part.$n" "out.$n"
      rm -f "$r"
    fi
  done
  sleep 0.05
done"""
TASK_TOKEN = '$(cat "$NOMAD_SECRETS_DIR/nomad_token")'
AUDIT_LOG = Path("audit") / "task-api.log"
JWT_SHAPE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.")
_request_numbers = itertools.count()


def task_api(**settings: Any) -> dict[str, Any]:
    """A ``client { task_api { ... } }`` body. Secrets stay in a plain dir: these tests kill
    their agents at the end, which would leave tmpfs mounts behind."""
    return {"secrets_tmpfs": False, **settings}


def requester_job(job_id: str, *, user: str | None = None) -> dict[str, Any]:
    return raw_exec_job(job_id, SERVE_REQUESTS, identity=FILE_IDENTITY, user=user,
                        kill_timeout_s=1)


async def task_request(agent: AgentProcess, alloc_id: str, path: str, *,
                       method: str = "GET", token: str | None = TASK_TOKEN) -> int:
    """The status the task gets for one request on its own socket (000: no connection)."""
    number = next(_request_numbers)
    local = local_dir(agent, alloc_id)
    header = f'-H "X-Nomad-Token: {token}" ' if token is not None else ""
    staged = local / f".staged.{number}"
    staged.write_text(f'curl -s -o /dev/null -w "%{{http_code}}" -X {method} '
                      f'--unix-socket "$NOMAD_SECRETS_DIR/api.sock" {header}'
                      f'"http://localhost{path}"\n')
    staged.chmod(0o644)
    staged.rename(local / f"req.{number}")
    out = local / f"out.{number}"
    await eventually(out.exists, message=f"the task's answer to {method} {path}")
    return int(out.read_text().strip() or "0")


async def outside_request(sock: Path, token: str, user: str = "nobody"
                          ) -> tuple[int, str, int]:
    """(status, body, pid) of one request from a process that is not the task's: run as
    ``user`` with the allocation's group (so it can reach the socket, as the task can),
    holding the task's token (given on stdin, never on a command line)."""
    groups = [gid] if (gid := alloc_group(sock.parents[2])) is not None else []
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-w", "\n%{http_code}", "-H", "@-", "--unix-socket", str(sock),
        "http://localhost/v1/agent/health", user=user, extra_groups=groups, cwd="/",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(f"X-Nomad-Token: {token}\n".encode()), 15)
    body, _, status = out.decode().rpartition("\n")
    return int(status or "0"), body, proc.pid


async def task_api_shown(agent: AgentProcess) -> dict[str, Any]:
    async with agent.api() as api:
        config: dict[str, Any] = (await api.get("/v1/agent/self"))["config"]
    return config["Client"]["TaskAPI"]


async def task_events(agent: AgentProcess, alloc_id: str) -> list[dict[str, Any]]:
    async with agent.api() as api:
        alloc = await api.allocation_get(alloc_id)
    events: list[dict[str, Any]] = alloc["TaskStates"]["t"]["Events"]
    return events


def mentions_task_api(event: dict[str, Any]) -> bool:
    text = " ".join(str(event.get(k, "")) for k in ("Type", "DisplayMessage", "Message"))
    return "task api" in text.lower()


# ---------------------------------------------------------------------- SIGHUP reload


async def test_sighup_reaches_running_tasks_and_open_sockets(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    agent = short_agent_factory(task_api=task_api())
    await agent.start()
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, requester_job("reload"))
    sock, token = api_sock(agent, alloc_id), read_token(agent, alloc_id)
    assert await answers(sock, token)

    # Off: the running task's socket goes, with an event saying so.
    seen = len(await task_events(agent, alloc_id))
    lines = await agent.reload(task_api(enabled=False))
    assert "client.task_api.enabled: true -> false" in lines[-1]
    await eventually(lambda: not sock.exists(), message="the socket to go")
    new_events = (await task_events(agent, alloc_id))[seen:]
    assert any(mentions_task_api(e) for e in new_events), new_events
    assert (await task_api_shown(agent))["Enabled"] is False
    assert await task_request(agent, alloc_id, "/v1/agent/health") == 0

    # On again: a socket is back and answers, the task's own requests included.
    await agent.reload(task_api(enabled=True))
    await eventually(lambda: answers(sock, token), message="the socket to answer again")
    assert await task_request(agent, alloc_id, "/v1/agent/health") == 200

    # A rule added by a reload applies to the next request, on a connection already open.
    async with ApiClient(f"unix://{sock}", token=token) as client:
        assert (await client.request("GET", "/v1/agent/self")).status == 200
        await agent.reload(task_api(denied_endpoints=["GET /v1/agent/self"]))
        refused = await client.request("GET", "/v1/agent/self")
        assert refused.status == 403, refused.text()
        assert "denied_endpoints" in refused.text()
        assert (await client.request("GET", "/v1/agent/health")).status == 200
    assert await task_request(agent, alloc_id, "/v1/agent/self") == 403

    # A bad file: one error line naming file, line and key; nothing of it applied.
    before = await task_api_shown(agent)
    lines = await agent.reload(task_api(enabled=False, peer_credentials="always"))
    errors = [line for line in lines if "[ERROR]" in line]
    assert errors == [lines[-1]]
    assert f"{agent.config_path}:1: client.task_api.peer_credentials: unknown value " \
           "'always'" in errors[0]
    assert await task_api_shown(agent) == before
    assert sock.exists() and await answers(sock, token)
    assert (await sock_request(sock, "/v1/agent/self", token=token)).status == 403

    # Settings outside client.task_api keep their values, with one warning naming them.
    agent.meta = {"rack": "r2"}
    lines = await agent.reload(task_api())
    warnings = [line for line in lines if "[WARNING]" in line and "config reload" in line]
    assert len(warnings) == 1 and "client.meta" in warnings[0]
    async with agent.api() as api:
        assert (await api.get("/v1/agent/self"))["config"]["Client"]["Meta"] == {}
    assert (await sock_request(sock, "/v1/agent/self", token=token)).status == 200


# ---------------------------------------------------------------------- audit


def audit_files(agent: AgentProcess) -> list[Path]:
    log = agent.data_dir / AUDIT_LOG
    return sorted(log.parent.glob(f"{log.name}*"))


def audit_lines(agent: AgentProcess) -> list[dict[str, Any]]:
    """Every complete line of the audit log and its rotated files, parsed."""
    return [json.loads(line) for path in audit_files(agent)
            for line in path.read_text().split("\n")[:-1]]


async def test_audit_log_records_every_request_and_no_secret(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    agent = short_agent_factory(acl=True, task_api=task_api(
        audit={"enabled": True}, denied_endpoints=["GET /v1/status/leader"]))
    await agent.start()
    management = await bootstrap_acls(agent)
    async with agent.api(management) as api:
        accessor = (await api.get("/v1/acl/token/self"))["AccessorID"]
        node_id = (await api.get("/v1/nodes"))[0]["ID"]
        alloc_id = await start_task(agent, api, requester_job("audited"))
    sock, token = api_sock(agent, alloc_id), read_token(agent, alloc_id)
    bogus = "not-a-token-" + os.urandom(12).hex()

    # The task, with its workload identity: allowed, refused by ACL, refused by a rule.
    assert await task_request(agent, alloc_id, "/v1/agent/health") == 200
    assert await task_request(agent, alloc_id, "/v1/agent/self") == 403
    assert await task_request(agent, alloc_id, "/v1/status/leader") == 403
    assert await task_request(agent, alloc_id, "/v1/agent/health", token=None) == 401
    assert await task_request(agent, alloc_id, "/v1/agent/health", token=bogus) == 403
    # An operator (root) on the same socket with the management token.
    assert (await sock_request(sock, "/v1/agent/self?pretty=1", token=management)).status \
        == 200

    lines = await eventually(lambda: (found := audit_lines(agent)) and len(found) >= 6
                             and found, message="six audit lines")
    assert len(lines) == 6, lines
    for line in lines:
        assert {"time", "node", "namespace", "job", "alloc", "task", "method", "path",
                "status", "latency_ms", "identity", "peer"} <= line.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", line["time"])
        assert (line["node"], line["namespace"], line["job"], line["alloc"], line["task"]) \
            == (node_id, "default", "audited", alloc_id, "t")
        assert isinstance(line["latency_ms"], int | float) and line["latency_ms"] >= 0
        assert {"pid", "uid", "gid"} <= line["peer"].keys()
    by_request = {(line["path"], line["status"], line["identity"]["kind"]): line
                  for line in lines}
    assert set(by_request) == {
        ("/v1/agent/health", 200, "workload"), ("/v1/agent/self", 403, "workload"),
        ("/v1/status/leader", 403, "workload"), ("/v1/agent/health", 401, "none"),
        ("/v1/agent/health", 403, "none"), ("/v1/agent/self", 200, "token")}
    assert by_request[("/v1/agent/self", 200, "token")]["identity"]["id"] == accessor
    assert "denied_endpoints" in by_request[("/v1/status/leader", 403, "workload")]["reason"]
    task_pid_line = by_request[("/v1/agent/health", 200, "workload")]
    assert task_pid_line["peer"]["uid"] == 0 and task_pid_line["peer"]["pid"] != os.getpid()
    assert by_request[("/v1/agent/self", 200, "token")]["peer"]["pid"] == os.getpid()

    log = agent.data_dir / AUDIT_LOG
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    secrets = [management, token, bogus]
    await assert_no_secrets(agent, secrets)
    for path in audit_files(agent):
        data = path.read_bytes()
        assert not JWT_SHAPE.search(data), f"a JWT-shaped string in {path.name}"
        assert not [s for s in secrets if s.encode() in data], f"a secret in {path.name}"


# ---------------------------------------------------------------------- peer credentials


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another user needs root")
async def test_peer_credentials_enforce_and_log(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    pwd.getpwnam("nobody")  # the task's user and the outsider's
    agent = short_agent_factory(task_api=task_api(peer_credentials="enforce"))
    await agent.start()
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, requester_job("peer", user="nobody"))
    sock, token = api_sock(agent, alloc_id), read_token(agent, alloc_id)

    # Same user, same group, the task's own token: but not one of the task's processes.
    status, body, _ = await outside_request(sock, token)
    assert (status, body.strip()) == (403, "Permission denied: the connecting process is "
                                           "not part of this task")
    assert await task_request(agent, alloc_id, "/v1/agent/health") == 200
    assert (await sock_request(sock, token=token)).status == 200  # root

    await agent.reload(task_api(peer_credentials="log"))
    seen = len(agent.output)
    status, _, pid = await outside_request(sock, token)
    assert status == 200
    logged = await eventually(
        lambda: [line for line in agent.output[seen:].splitlines() if f"pid {pid}," in line],
        message="a log line naming the outside process")
    assert len(logged) == 1 and "[WARNING]" in logged[0], logged
    assert "allowing connection from a process that is not part of the task" in logged[0]
    assert token not in agent.output
    await assert_no_secrets(agent, [token])


# ---------------------------------------------------------------------- identity binding


async def test_identity_bound_to_its_own_socket(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    agent = short_agent_factory(task_api=task_api(bind_identity_to_socket=True))
    await agent.start()
    async with agent.api() as api:
        alloc_a = await start_task(agent, api, requester_job("bind-a"))
        alloc_b = await start_task(agent, api, requester_job("bind-b"))
    sock_b, token_a = api_sock(agent, alloc_b), read_token(agent, alloc_a)
    assert (await sock_request(api_sock(agent, alloc_a), token=token_a)).status == 200
    assert (await sock_request(sock_b, token=read_token(agent, alloc_b))).status == 200
    refused = await sock_request(sock_b, token=token_a)
    assert refused.status == 403, refused.text()

    await agent.reload(task_api(bind_identity_to_socket=False))
    assert (await sock_request(sock_b, token=token_a)).status == 200


# ---------------------------------------------------------------------- limits


async def raw_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     token: str) -> int:
    """One keep-alive health check on an open connection; its status, or 0 if the agent
    closed the connection instead of answering."""
    writer.write(b"GET /v1/agent/health HTTP/1.1\r\nHost: x\r\n"
                 + f"X-Nomad-Token: {token}\r\n\r\n".encode())
    try:
        await writer.drain()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                return 0
            data += chunk
    except (ConnectionError, BrokenPipeError):
        return 0
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    assert length is not None, head
    while len(body) < int(length.group(1)):
        body += await asyncio.wait_for(reader.read(65536), 10)
    return int(head.split()[1])


@contextlib.asynccontextmanager
async def connection(sock: Path) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                        asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_connection_and_rate_limits_per_task(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    agent = short_agent_factory(task_api=task_api(max_connections_per_task=2))
    await agent.start()
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, requester_job("limits"))
    sock, token = api_sock(agent, alloc_id), read_token(agent, alloc_id)

    async with connection(sock) as first, connection(sock) as second:
        assert await raw_health(*first, token) == 200
        assert await raw_health(*second, token) == 200
        async with connection(sock) as third:  # over the cap: closed unanswered
            assert await raw_health(*third, token) == 0
        assert await raw_health(*first, token) == 200  # the two held ones still work
        assert await raw_health(*second, token) == 200
    # Both released: a new connection is served again.
    await eventually(lambda: answers(sock, token), message="a connection under the cap")

    # A small rate (a token per 100 s: no refill while the test runs, however slow the
    # machine): the requests beyond its burst get 429 with Retry-After, while
    # the TCP API is untouched.
    await agent.reload(task_api(rate_limit={"requests_per_second": 0.01, "burst": 2}))
    answered = []
    for _ in range(6):
        answered.append(await sock_request(sock, token=token))
        if answered[-1].status == 429:
            break
    statuses = [r.status for r in answered]
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert set(statuses) == {200, 429}, statuses
    retry_after = answered[-1].headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, answered[-1].headers
    assert answered[-1].text().strip(), "a 429 says why"
    async with agent.api() as api:
        assert (await api.request("GET", "/v1/agent/health")).status == 200
    assert await task_request(agent, alloc_id, "/v1/agent/health") == 429

    await agent.reload(task_api(rate_limit={"requests_per_second": 0}))
    for _ in range(5):
        assert (await sock_request(sock, token=token)).status == 200
