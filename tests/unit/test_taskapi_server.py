"""The HTTP layer's ``TaskSocketServer``: a served task socket leads into the agent's router as
that task's Task API listener (a credential always required), under the live Task API config
(a reload applies to the next request and connection), and a socket it cannot serve is
closed, never leaked."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import attrs
import pytest

from nomad_client.allocrunner.hooks import TaskSocketInfo
from nomad_client.client.taskapi_config import AuditConfig, LiveTaskAPIConfig, TaskAPIConfig
from nomad_client.http.endpoints import register_all
from nomad_client.http.listeners import Listener
from nomad_client.http.router import Router
from nomad_client.http.services import Services
from nomad_client.http.taskapi import INVALID_RULES, TaskAPIServer
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from tests.unit.factories import (
    NoProcesses,
    TaskAPIStack,
    call_http,
    task_api_server,
    task_api_stack,
    unix_socket,
    wait_until,
)

INFO = TaskSocketInfo(alloc_id="a1", task="web", namespace="prod", job_id="shop",
                      processes=NoProcesses())


@pytest.fixture
async def task_api(tmp_path: Path) -> AsyncIterator[TaskAPIServer]:
    keyring = await Keyring.load_or_create(tmp_path / "keyring")
    server = Server(StateStore(), keyring, region="global", acl_enabled=False)
    router = Router(server)
    register_all(router, Services(server=server, client=None, agent_config={},
                                  member={"Addr": "x", "Port": 1}))
    served = task_api_server(router, audit_dir=tmp_path / "audit")
    yield served
    await served.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    # A short directory of its own keeps the path under sun_path for binding.
    fd = os.open(tmp_path, os.O_PATH)
    yield Path(f"/proc/self/fd/{fd}/api.sock")
    os.close(fd)


@pytest.fixture
async def stack(workdir: Path, keyring: Keyring) -> AsyncIterator[TaskAPIStack]:
    served = await task_api_stack(workdir, keyring)
    yield served
    await served.stop()


async def status_over(path: Path) -> int:
    conn = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=conn) as session:
        async with session.get("http://localhost/v1/agent/health") as resp:
            return resp.status


async def test_a_served_socket_is_that_tasks_task_api(task_api: TaskAPIServer,
                                                      sock_path: Path) -> None:
    served = await task_api.serve(unix_socket(sock_path), INFO)
    try:
        assert isinstance(served, Listener)
        ctx = served.ctx
        assert ctx.task_api
        assert (ctx.alloc_id, ctx.task, ctx.namespace, ctx.job_id) == ("a1", "web", "prod",
                                                                      "shop")
        assert ctx.processes is INFO.processes and ctx.state is not None
        assert served.limits.total == TaskAPIConfig().max_connections_per_task
        assert await status_over(sock_path) == 401  # a credential is always required
    finally:
        await served.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await status_over(sock_path)  # closed: no longer served


async def test_each_socket_has_its_own_state(task_api: TaskAPIServer, tmp_path: Path) -> None:
    first = await task_api.serve(unix_socket(tmp_path / "1.sock"), INFO)
    second = await task_api.serve(unix_socket(tmp_path / "2.sock"), INFO)
    try:
        assert first.ctx.state is not second.ctx.state
    finally:
        await first.close()
        await second.close()


async def test_a_socket_that_cannot_be_served_is_closed(
        task_api: TaskAPIServer, sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_fds(self: Listener) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Listener, "start", no_fds)
    sock = unix_socket(sock_path)
    with pytest.raises(OSError, match="Too many open files"):
        await task_api.serve(sock, INFO)
    assert sock.fileno() == -1


async def test_an_audit_log_that_cannot_be_opened_fails_serving_and_closes_the_socket(
        tmp_path: Path, task_api: TaskAPIServer, sock_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    live = LiveTaskAPIConfig(TaskAPIConfig(audit=AuditConfig(
        enabled=True, path=str(blocker / "audit.log"))))
    served = TaskAPIServer(task_api.router, live, audit_path=tmp_path / "unused.log",
                           node_id=lambda: "n")
    sock = unix_socket(sock_path)
    with pytest.raises(OSError, match="Task API audit log .*not-a-dir"):
        await served.serve(sock, INFO)
    assert sock.fileno() == -1
    await served.close()


# ---- the live config: the next connection and request obey a reload ------------------------
async def test_connection_limit_follows_the_live_config(stack: TaskAPIStack) -> None:
    await stack.configure(max_connections_per_task=2)
    held = [await asyncio.open_unix_connection(str(stack.sock)) for _ in range(2)]
    listener = stack.agent.api.listeners[-1]
    await wait_until(lambda: listener.open_connections == 2, "two connections admitted")
    reader, writer = await asyncio.open_unix_connection(str(stack.sock))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # refused: closed at once
    writer.close()
    await stack.configure(max_connections_per_task=3)  # the next connection obeys
    assert (await stack.call("GET", "/v1/agent/health")).status == 200
    for _, w in held:
        w.close()
        await w.wait_closed()


async def test_rules_and_limits_follow_the_live_config(stack: TaskAPIStack) -> None:
    assert (await stack.call("GET", "/v1/agent/health")).status == 200
    await stack.configure(denied_endpoints=("GET /v1/agent/health",))
    refused = await stack.call("GET", "/v1/agent/health")
    assert refused.status == 403
    assert "client.task_api.denied_endpoints" in refused.body
    await stack.configure(denied_endpoints=())
    assert (await stack.call("GET", "/v1/agent/health")).status == 200


async def test_one_compiled_policy_per_config_object(stack: TaskAPIStack) -> None:
    policy = stack.task_api.policy()
    assert stack.task_api.policy() is policy  # cached while the config object is the same
    stack.live.replace(attrs.evolve(stack.live.current))  # equal, but a new object
    assert stack.task_api.policy() is not policy


async def test_invalid_rules_that_slip_past_the_parser_refuse_everything(
        stack: TaskAPIStack) -> None:
    await stack.configure(denied_endpoints=("nonsense",))
    reply = await stack.call("GET", "/v1/agent/health")
    assert (reply.status, reply.body) == (403, INVALID_RULES)


async def test_the_tcp_api_is_untouched_by_task_api_controls(stack: TaskAPIStack) -> None:
    await stack.configure(allowed_endpoints=("GET /v1/status/leader",),
                          denied_endpoints=("* /v1/agent/*",),
                          rate_limit={"requests_per_second": 1, "burst": 1},
                          peer_credentials="enforce", bind_identity_to_socket=True)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            reply = await call_http(session, stack.agent.api.url, "GET", "/v1/agent/health",
                                    token=stack.token)
            assert reply.status == 200, reply
    assert stack.agent.api.listeners[0].ctx.task_api is False


async def test_reconfigure_opens_and_closes_the_audit_log(stack: TaskAPIStack,
                                                          workdir: Path) -> None:
    path = workdir / "audit" / "a.log"
    await stack.configure(audit={"enabled": True, "path": str(path)})
    assert (await stack.call("GET", "/v1/agent/health")).status == 200
    audit = stack.task_api._audit
    assert audit is not None and audit.settings.path == path
    writer = audit._writer
    await stack.configure(audit={"enabled": False})
    assert stack.task_api._audit is None
    assert writer is not None and writer.done()  # the old log's writer was awaited
    assert path.read_text().count("\n") == 1  # flushed on close
    # A request now leaves no line.
    assert (await stack.call("GET", "/v1/agent/health")).status == 200
    assert path.read_text().count("\n") == 1
