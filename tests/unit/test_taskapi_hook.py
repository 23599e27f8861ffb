"""The Task API hook on its own: when sockets appear, stay, come back and go, and how a
failure is reported — with a real router behind real sockets."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from nomad_client.allocrunner import taskapi_hook
from nomad_client.allocrunner.hooks import AllocHookDeps, TaskContext
from nomad_client.allocrunner.taskapi_hook import TaskAPIHook
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.secretsdir import SecretsDirError
from nomad_client.client.taskenv import NodeView
from nomad_client.http.endpoints import register_all
from nomad_client.http.router import Router
from nomad_client.http.services import Services
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.structs.models import Allocation, TaskEvent

NODE = NodeView(id="n", name="n", datacenter="dc1", region="global", node_class="",
                pool="default", attributes={}, meta={})


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[TaskAPIHook, list[TaskContext],
                                                      list[TaskEvent]]]:
    keyring = await Keyring.load_or_create(tmp_path / "keyring")
    server = Server(StateStore(), keyring, region="global", acl_enabled=False)
    router = Router(server)
    register_all(router, Services(server=server, client=None, agent_config={},
                                  member={"Addr": "x", "Port": 1}))
    # A short root keeps the socket path under sun_path, so plain clients can connect.
    alloc = Allocation(id="a1", namespace="default", eval_id="e", name="j.g[0]", node_id="n",
                       node_name="n", job_id="j", job={}, task_group="g")
    adir = AllocDir(tmp_path / "alloc", alloc.id)
    adir.build()
    events: list[TaskEvent] = []
    contexts = []
    for name in ("web", "side"):
        td = adir.build_task_dir(name, None)
        contexts.append(TaskContext(alloc=alloc, task={"Name": name}, alloc_dir=adir,
                                    task_dir=td, node=NODE, emit=events.append,
                                    log=logging.getLogger("test")))
    hook = TaskAPIHook(AllocHookDeps(alloc=alloc, alloc_dir=adir, router=router,
                                     log=logging.getLogger("test")))
    yield hook, contexts, events
    await hook.destroy()


def sock_of(ctx: TaskContext) -> Path:
    return ctx.task_dir.secrets_dir / "api.sock"


async def status_over(path: Path) -> int:
    # Connect through the directory's descriptor: pytest's temp paths can exceed sun_path.
    fd = os.open(path.parent, os.O_PATH)
    try:
        conn = aiohttp.UnixConnector(path=f"/proc/self/fd/{fd}/{path.name}")
        async with aiohttp.ClientSession(connector=conn) as session:
            async with session.get("http://localhost/v1/agent/health") as resp:
                return resp.status
    finally:
        os.close(fd)


async def test_socket_per_task_kept_across_restarts_and_removed_when_stopped(setup) -> None:
    hook, (web, side), events = setup
    await hook.task_starting(web)
    await hook.task_starting(side)
    first = os.stat(sock_of(web))
    assert stat.S_ISSOCK(first.st_mode) and stat.S_IMODE(first.st_mode) == 0o666
    assert os.stat(sock_of(side)).st_ino != first.st_ino
    assert await status_over(sock_of(web)) == 401  # a credential is always required
    await hook.task_starting(web)  # a restart: same listener, same inode, no gap
    assert os.stat(sock_of(web)).st_ino == first.st_ino
    await hook.task_stopped(web)
    assert not sock_of(web).exists()
    assert await status_over(sock_of(side)) == 401  # the sibling is untouched
    assert events == []


async def test_deleted_socket_is_put_back_on_next_start(setup) -> None:
    hook, (web, _), _ = setup
    await hook.task_starting(web)
    sock_of(web).unlink()
    await hook.task_starting(web)
    assert await status_over(sock_of(web)) == 401


async def test_replaced_socket_is_put_back_and_the_planted_file_left_alone(
        setup, tmp_path: Path) -> None:
    hook, (web, _), _ = setup
    await hook.task_starting(web)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    sock_of(web).unlink()
    sock_of(web).symlink_to(outside)
    await hook.task_starting(web)
    assert stat.S_ISSOCK(os.lstat(sock_of(web)).st_mode)
    await hook.task_stopped(web)
    assert outside.read_text() == "keep me"


async def test_failure_is_an_event_not_a_task_failure(setup, monkeypatch, caplog) -> None:
    hook, (web, side), events = setup

    def broken(*args: object, **kwargs: object) -> None:
        raise SecretsDirError("secrets dir is a symlink")

    monkeypatch.setattr(taskapi_hook, "create_task_socket", broken)
    with caplog.at_level(logging.WARNING):
        await hook.task_starting(web)  # must not raise
    assert [e.message for e in events] == ["Task API unavailable: secrets dir is a symlink"]
    assert not events[0].fails_task
    assert str(sock_of(web)) in caplog.text
    monkeypatch.undo()
    await hook.task_starting(side)  # siblings are unaffected
    assert await status_over(sock_of(side)) == 401


async def test_user_that_cannot_be_given_the_socket_gets_no_socket(setup) -> None:
    hook, (web, _), events = setup
    web.task = {"Name": "web", "User": "no-such-user-here"}
    await hook.task_starting(web)
    assert not sock_of(web).exists()  # never a 0666 fallback
    assert len(events) == 1 and events[0].message.startswith("Task API unavailable:")
    assert "no-such-user-here" in events[0].message
