"""The HTTP layer's ``TaskSocketServer``: a served task socket leads into the agent's router as
that task's Task API listener (a credential always required), and a socket it cannot serve is
closed, never leaked."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from nomad_client.http.endpoints import register_all
from nomad_client.http.listeners import TASK_SOCKET_LIMITS, Listener
from nomad_client.http.router import Router
from nomad_client.http.services import Services
from nomad_client.http.taskapi import TaskAPIServer
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore


@pytest.fixture
async def task_api(tmp_path: Path) -> TaskAPIServer:
    keyring = await Keyring.load_or_create(tmp_path / "keyring")
    server = Server(StateStore(), keyring, region="global", acl_enabled=False)
    router = Router(server)
    register_all(router, Services(server=server, client=None, agent_config={},
                                  member={"Addr": "x", "Port": 1}))
    return TaskAPIServer(router)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    # A short directory of its own keeps the path under sun_path for binding.
    fd = os.open(tmp_path, os.O_PATH)
    yield Path(f"/proc/self/fd/{fd}/api.sock")
    os.close(fd)


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def status_over(path: Path) -> int:
    conn = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=conn) as session:
        async with session.get("http://localhost/v1/agent/health") as resp:
            return resp.status


async def test_a_served_socket_is_that_tasks_task_api(task_api: TaskAPIServer,
                                                      sock_path: Path) -> None:
    served = await task_api.serve(listening_socket(sock_path), "a1", "web")
    try:
        assert isinstance(served, Listener)
        assert served.ctx.task_api and (served.ctx.alloc_id, served.ctx.task) == ("a1", "web")
        assert served.limits == TASK_SOCKET_LIMITS
        assert await status_over(sock_path) == 401  # a credential is always required
    finally:
        await served.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await status_over(sock_path)  # closed: no longer served


async def test_a_socket_that_cannot_be_served_is_closed(
        task_api: TaskAPIServer, sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_fds(self: Listener) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Listener, "start", no_fds)
    sock = listening_socket(sock_path)
    with pytest.raises(OSError, match="Too many open files"):
        await task_api.serve(sock, "a1", "web")
    assert sock.fileno() == -1
