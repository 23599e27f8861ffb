"""The Task API hook on its own: when sockets appear, stay, come back and go, and how a
failure is reported. No server, router or keyring: a fake ``TaskSocketServer`` serves each
socket by answering every connection with the alloc and task it was served for (the real one,
``http/taskapi.py``, is tested in ``test_taskapi_server.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nomad_client.allocrunner import taskapi_hook
from nomad_client.allocrunner.hooks import AllocHookDeps, TaskContext
from nomad_client.allocrunner.taskapi_hook import TaskAPIHook
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.secretsdir import SecretsDirError
from nomad_client.client.taskenv import NodeView
from nomad_client.structs.models import Allocation, TaskEvent

NODE = NodeView(id="n", name="n", datacenter="dc1", region="global", node_class="",
                pool="default", attributes={}, meta={})


class FakeServed:
    def __init__(self, server: asyncio.Server, task: str, closed: list[str]) -> None:
        self._server = server
        self._task = task
        self._closed = closed

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()
        self._closed.append(self._task)


class FakeTaskAPI:
    """A ``TaskSocketServer`` that records what it serves and closes; ``fail`` makes the
    next ``serve`` fail as a real one must (the socket closed, ``OSError`` raised)."""

    def __init__(self) -> None:
        self.served: list[tuple[str, str]] = []
        self.closed: list[str] = []
        self.fail: OSError | None = None

    async def serve(self, sock: socket.socket, alloc_id: str, task: str) -> FakeServed:
        if self.fail is not None:
            sock.close()
            raise self.fail

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(f"{alloc_id}/{task}".encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(answer, sock=sock)
        self.served.append((alloc_id, task))
        return FakeServed(server, task, self.closed)


Setup = tuple[TaskAPIHook, FakeTaskAPI, list[TaskContext], list[TaskEvent]]


def contexts_for(tmp_path: Path, events: list[TaskEvent]) -> tuple[AllocDir, list[TaskContext]]:
    alloc = Allocation(id="a1", namespace="default", eval_id="e", name="j.g[0]", node_id="n",
                       node_name="n", job_id="j", job={}, task_group="g")
    adir = AllocDir(tmp_path / "alloc", alloc.id)
    adir.build()
    contexts = [TaskContext(alloc=alloc, task={"Name": name}, alloc_dir=adir,
                            task_dir=adir.build_task_dir(name, None), node=NODE,
                            emit=events.append, log=logging.getLogger("test"))
                for name in ("web", "side")]
    return adir, contexts


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    events: list[TaskEvent] = []
    adir, contexts = contexts_for(tmp_path, events)
    fake = FakeTaskAPI()
    hook = TaskAPIHook(AllocHookDeps(alloc=contexts[0].alloc, alloc_dir=adir, task_api=fake,
                                     log=logging.getLogger("test")))
    yield hook, fake, contexts, events
    await hook.destroy()


def sock_of(ctx: TaskContext) -> Path:
    return ctx.task_dir.secrets_dir / "api.sock"


async def who_answers(path: Path) -> str:
    """What the server behind the socket at ``path`` says it serves."""
    # Connect through the directory's descriptor: pytest's temp paths can exceed sun_path.
    fd = os.open(path.parent, os.O_PATH)
    try:
        reader, writer = await asyncio.open_unix_connection(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)
    try:
        return (await reader.read()).decode()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_socket_per_task_kept_across_restarts_and_removed_when_stopped(
        setup: Setup) -> None:
    hook, fake, (web, side), events = setup
    await hook.task_starting(web)
    await hook.task_starting(side)
    first = os.stat(sock_of(web))
    assert stat.S_ISSOCK(first.st_mode) and stat.S_IMODE(first.st_mode) == 0o666
    assert os.stat(sock_of(side)).st_ino != first.st_ino
    assert await who_answers(sock_of(web)) == "a1/web"
    await hook.task_starting(web)  # a restart: same socket, same inode, still served, no gap
    assert os.stat(sock_of(web)).st_ino == first.st_ino
    assert fake.served == [("a1", "web"), ("a1", "side")] and fake.closed == []
    await hook.task_stopped(web)
    assert not sock_of(web).exists()
    assert fake.closed == ["web"]
    assert await who_answers(sock_of(side)) == "a1/side"  # the sibling is untouched
    assert events == []


async def test_deleted_socket_is_put_back_on_next_start(setup: Setup) -> None:
    hook, fake, (web, _), _ = setup
    await hook.task_starting(web)
    sock_of(web).unlink()
    await hook.task_starting(web)
    assert fake.closed == ["web"]  # the old socket is no longer served
    assert await who_answers(sock_of(web)) == "a1/web"


async def test_replaced_socket_is_put_back_and_the_planted_file_left_alone(
        setup: Setup, tmp_path: Path) -> None:
    hook, _, (web, _), _ = setup
    await hook.task_starting(web)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    sock_of(web).unlink()
    sock_of(web).symlink_to(outside)
    await hook.task_starting(web)
    assert stat.S_ISSOCK(os.lstat(sock_of(web)).st_mode)
    await hook.task_stopped(web)
    assert outside.read_text() == "keep me"


async def test_failure_is_an_event_not_a_task_failure(
        setup: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    hook, _, (web, side), events = setup

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
    assert await who_answers(sock_of(side)) == "a1/side"


async def test_a_socket_that_cannot_be_served_is_removed_and_reported(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    hook, fake, (web, side), events = setup
    fake.fail = OSError(24, "Too many open files")
    with caplog.at_level(logging.WARNING):
        await hook.task_starting(web)  # must not raise
    assert not os.path.lexists(sock_of(web))
    assert [e.message for e in events] == ["Task API unavailable: [Errno 24] Too many open files"]
    assert not events[0].fails_task
    assert str(sock_of(web)) in caplog.text
    fake.fail = None
    await hook.task_starting(web)  # the next start tries again
    assert await who_answers(sock_of(web)) == "a1/web"


async def test_user_that_cannot_be_given_the_socket_gets_no_socket(setup: Setup) -> None:
    hook, fake, (web, _), events = setup
    web.task = {"Name": "web", "User": "no-such-user-here"}
    await hook.task_starting(web)
    assert not sock_of(web).exists()  # never a 0666 fallback
    assert len(events) == 1 and events[0].message.startswith("Task API unavailable:")
    assert "no-such-user-here" in events[0].message
    assert fake.served == []


async def test_shutdown_stops_serving_every_socket(setup: Setup) -> None:
    hook, fake, (web, side), _ = setup
    await hook.task_starting(web)
    await hook.task_starting(side)
    await hook.shutdown()
    assert sorted(fake.closed) == ["side", "web"]
    assert not sock_of(web).exists() and not sock_of(side).exists()


async def test_without_a_task_api_server_tasks_get_no_socket(tmp_path: Path) -> None:
    events: list[TaskEvent] = []
    adir, (web, _) = contexts_for(tmp_path, events)
    hook = TaskAPIHook(AllocHookDeps(alloc=web.alloc, alloc_dir=adir, task_api=None,
                                     log=logging.getLogger("test")))
    await hook.task_starting(web)
    assert not os.path.lexists(sock_of(web))
    assert events == []
    await hook.task_stopped(web)
