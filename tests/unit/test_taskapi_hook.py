"""The Task API hook on its own: which tasks get a socket (agent, namespace, task), when
sockets appear, stay, come back and go (also on a config reload), and how a failure is
reported. No server, router or keyring: a fake ``TaskSocketServer`` serves each socket by
answering every connection with the alloc and task it was served for (the real one,
``http/taskapi.py``, is tested in ``test_taskapi_server.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from nomad_client.allocrunner import taskapi_hook
from nomad_client.allocrunner.hooks import (
    AllocHookDeps,
    TaskContext,
    TaskHandleView,
    TaskSocketInfo,
)
from nomad_client.allocrunner.taskapi_hook import TaskAPIHook
from nomad_client.allocrunner.taskrunner.identity_hook import IdentityHook
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.drivers.base import ExitResult, TaskHandle
from nomad_client.client.secretsdir import SecretsDirError
from nomad_client.client.taskapi_config import LiveTaskAPIConfig, TaskAPIConfig
from nomad_client.client.taskenv import NodeView
from nomad_client.structs.models import Allocation, TaskEvent
from tests.unit.factories import wait_until

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
        self.infos: list[TaskSocketInfo] = []
        self.closed: list[str] = []
        self.fail: OSError | None = None
        self.gate: asyncio.Event | None = None  # when given, serve waits for it
        self.waiting = False

    async def serve(self, sock: socket.socket, info: TaskSocketInfo) -> FakeServed:
        if self.gate is not None:
            self.waiting = True
            await self.gate.wait()
        if self.fail is not None:
            sock.close()
            raise self.fail
        alloc_id, task = info.alloc_id, info.task

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(f"{alloc_id}/{task}".encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(answer, sock=sock)
        self.served.append((alloc_id, task))
        self.infos.append(info)
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


# ---- who gets a socket -------------------------------------------------------------------
class Namespaces:
    """``NamespaceTaskAPIModes`` answering from a dict (a missing namespace has no say);
    ``fail`` makes every lookup raise."""

    def __init__(self, modes: dict[str, str] | None = None) -> None:
        self.modes = dict(modes or {})
        self.fail: Exception | None = None
        self.asked = 0

    async def namespace_task_api_mode(self, namespace: str) -> str | None:
        self.asked += 1
        if self.fail is not None:
            raise self.fail
        return self.modes.get(namespace)


@attrs.define
class Running:
    """What a task runner gives its context: the current driver handle (None: not running)."""

    handle: TaskHandleView = attrs.field(factory=TaskHandleView)

    def start(self, pid: int = 4242, create_time: float = 1234.5) -> None:
        self.handle.set(TaskHandle(driver="mock_driver", alloc_id="a1", task="web", pid=pid,
                                   create_time=create_time, started_at=0.0))


@attrs.define
class Decided:
    hook: TaskAPIHook
    fake: FakeTaskAPI
    live: LiveTaskAPIConfig
    namespaces: Namespaces
    web: TaskContext
    running: Running
    events: list[TaskEvent]


def decided_setup(tmp_path: Path, *, config: TaskAPIConfig | None = None,
                  namespace_mode: str | None = None, task_api: dict[str, Any] | None = None
                  ) -> Decided:
    events: list[TaskEvent] = []
    adir, (web, _) = contexts_for(tmp_path, events)
    running = Running()
    web.task = {"Name": "web", **({"TaskAPI": task_api} if task_api is not None else {})}
    web.handle = running.handle
    live = LiveTaskAPIConfig(config or TaskAPIConfig())
    namespaces = Namespaces({"default": namespace_mode} if namespace_mode else {})
    fake = FakeTaskAPI()
    hook = TaskAPIHook(AllocHookDeps(alloc=web.alloc, alloc_dir=adir, task_api=fake,
                                     log=logging.getLogger("test"), task_api_config=live,
                                     namespaces=namespaces))
    return Decided(hook, fake, live, namespaces, web, running, events)


@pytest.fixture
async def decided(tmp_path: Path) -> AsyncIterator[Decided]:
    """A hook on an agent with default config, a namespace without a say, and task "web"."""
    d = decided_setup(tmp_path)
    yield d
    await d.hook.destroy()


async def start(d: Decided) -> None:
    """One start of "web" as its runner does it: prepare, (prestart), starting, running."""
    await d.hook.task_preparing(d.web)
    await d.hook.task_starting(d.web)
    d.running.start()


async def exit_(d: Decided) -> None:
    d.running.handle.set(None)
    await d.hook.task_exited(d.web, ExitResult(exit_code=0), True)


def messages(events: list[TaskEvent], kind: str) -> list[str]:
    return [e.message for e in events if e.type == kind]


DISABLED = taskapi_hook.EVENT_TASK_API_DISABLED
ENABLED = taskapi_hook.EVENT_TASK_API_ENABLED


@pytest.mark.parametrize(
    ("config", "namespace_mode", "task_api", "reason"),
    [
        (TaskAPIConfig(enabled=False), "enabled", {"Enabled": True},
         "Task API is disabled on this node"),
        (TaskAPIConfig(), "disabled", {"Enabled": True},
         "Task API is disabled in this namespace"),
        (TaskAPIConfig(), None, {"Enabled": False}, "Task API is disabled by the task"),
        (TaskAPIConfig(default_mode="opt_in"), None, None,
         "Task API is opt-in on this node and the task did not ask for it"),
        (TaskAPIConfig(), "opt_in", None,
         "Task API is opt-in in this namespace and the task did not ask for it"),
    ],
)
async def test_a_task_without_a_socket_is_told_why_once(
        tmp_path: Path, config: TaskAPIConfig, namespace_mode: str | None,
        task_api: dict[str, Any] | None, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    d = decided_setup(tmp_path, config=config, namespace_mode=namespace_mode, task_api=task_api)
    with caplog.at_level(logging.INFO):
        for _ in range(3):  # the first start and two restarts
            await start(d)
            assert not os.path.lexists(sock_of(d.web))
            assert d.web.task_api is not None and not d.web.has_task_api_socket
            await exit_(d)
    assert messages(d.events, DISABLED) == [reason]
    assert not d.events[0].fails_task
    assert d.fake.served == []
    assert caplog.text == ""  # the node's policy is no warning: nothing above debug
    await d.hook.task_stopped(d.web)


@pytest.mark.parametrize(
    ("config", "namespace_mode", "task_api"),
    [
        (TaskAPIConfig(default_mode="opt_in"), None, {"Enabled": True}),
        (TaskAPIConfig(), "opt_in", {"Enabled": True}),
        (TaskAPIConfig(default_mode="opt_in"), "enabled", None),
        (TaskAPIConfig(), None, None),
    ],
)
async def test_a_task_the_node_and_namespace_allow_gets_its_socket(
        tmp_path: Path, config: TaskAPIConfig, namespace_mode: str | None,
        task_api: dict[str, Any] | None) -> None:
    d = decided_setup(tmp_path, config=config, namespace_mode=namespace_mode, task_api=task_api)
    await start(d)
    assert await who_answers(sock_of(d.web)) == "a1/web"
    assert d.web.has_task_api_socket and d.events == []
    await d.hook.task_stopped(d.web)


async def test_the_socket_serves_the_tasks_info_and_its_processes(decided: Decided) -> None:
    await start(decided)
    [info] = decided.fake.infos
    assert (info.alloc_id, info.task, info.namespace, info.job_id) == ("a1", "web", "default",
                                                                        "j")
    assert info.processes.root() == (4242, 1234.5)  # the runner's current handle
    await exit_(decided)
    assert info.processes.root() is None  # not running
    decided.running.start(pid=77, create_time=9.0)  # its restart: a new process
    assert info.processes.root() == (77, 9.0)


async def test_each_start_decides_again(decided: Decided) -> None:
    await start(decided)
    assert os.path.lexists(sock_of(decided.web))
    await exit_(decided)
    decided.namespaces.modes["default"] = "disabled"  # the namespace changed meanwhile
    await start(decided)
    assert not os.path.lexists(sock_of(decided.web))
    assert decided.fake.closed == ["web"]
    assert messages(decided.events, DISABLED) == ["Task API is disabled in this namespace"]
    await exit_(decided)
    decided.namespaces.modes.clear()
    await start(decided)
    assert await who_answers(sock_of(decided.web)) == "a1/web"


async def test_the_agents_enabled_false_asks_no_namespace(tmp_path: Path) -> None:
    d = decided_setup(tmp_path, config=TaskAPIConfig(enabled=False))
    await start(d)
    assert d.namespaces.asked == 0
    await d.hook.destroy()


async def test_a_namespace_that_cannot_be_read_gives_no_socket(
        decided: Decided, caplog: pytest.LogCaptureFixture) -> None:
    decided.namespaces.fail = ConnectionError("no servers")
    with caplog.at_level(logging.WARNING):
        await start(decided)
    assert not os.path.lexists(sock_of(decided.web))
    assert messages(decided.events, DISABLED) == [taskapi_hook.NAMESPACE_UNREADABLE]
    assert "no servers" in caplog.text


@pytest.mark.parametrize("with_socket", [True, False])
async def test_nomad_unix_addr_only_for_a_task_with_a_socket(tmp_path: Path,
                                                             with_socket: bool) -> None:
    d = decided_setup(tmp_path, task_api={"Enabled": with_socket})
    d.web.task = {**d.web.task, "Identity": {"Env": True}}
    d.web.identities = OneToken()
    await d.hook.task_preparing(d.web)
    env = await IdentityHook().prestart(d.web)  # the env is built before task_starting
    await d.hook.task_starting(d.web)
    assert env["NOMAD_TOKEN"] == "jwt"
    assert ("NOMAD_UNIX_ADDR" in env) is with_socket
    if with_socket:
        assert env["NOMAD_UNIX_ADDR"] == f"unix://{sock_of(d.web)}"
        assert os.path.lexists(sock_of(d.web))
    await d.hook.destroy()


class OneToken:
    """``WorkloadIdentities`` with one fixed token."""

    async def token(self, alloc_id: str, task: str) -> str:
        return "jwt"

    def watch(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("an env token is never renewed")

    def forget(self, alloc_id: str, task: str) -> None:
        pass


# ---- a reload ----------------------------------------------------------------------------
async def test_a_reload_takes_the_socket_of_a_running_task_away_and_gives_it_back(
        decided: Decided) -> None:
    await start(decided)
    decided.live.replace(TaskAPIConfig(enabled=False))
    await decided.hook.config_reloaded()
    assert not os.path.lexists(sock_of(decided.web))
    assert decided.fake.closed == ["web"]
    assert messages(decided.events, DISABLED) == [
        "Task API disabled by agent configuration reload: Task API is disabled on this node"]
    assert not decided.web.has_task_api_socket
    decided.live.replace(TaskAPIConfig())
    await decided.hook.config_reloaded()
    assert await who_answers(sock_of(decided.web)) == "a1/web"
    assert messages(decided.events, ENABLED) == [
        "Task API enabled by agent configuration reload"]
    assert decided.web.has_task_api_socket
    await decided.hook.config_reloaded()  # no change: nothing happens
    assert len(decided.events) == 2 and len(decided.fake.served) == 2
    await exit_(decided)
    await start(decided)  # a restart after the reload: no new event either
    assert len(decided.events) == 2


async def test_a_reload_leaves_tasks_that_are_not_running_alone(decided: Decided) -> None:
    decided.live.replace(TaskAPIConfig(default_mode="opt_in"))
    await start(decided)
    await exit_(decided)  # waiting to restart
    decided.live.replace(TaskAPIConfig())
    await decided.hook.config_reloaded()
    assert not os.path.lexists(sock_of(decided.web)) and decided.fake.served == []
    assert messages(decided.events, ENABLED) == []
    await start(decided)  # its next start follows the new config
    assert await who_answers(sock_of(decided.web)) == "a1/web"
    await decided.hook.task_stopped(decided.web)
    await decided.hook.config_reloaded()  # a task dead for good is forgotten
    assert not os.path.lexists(sock_of(decided.web))


async def test_a_reload_waits_for_a_start_in_progress(decided: Decided) -> None:
    decided.fake.gate = asyncio.Event()
    await decided.hook.task_preparing(decided.web)
    starting = asyncio.create_task(decided.hook.task_starting(decided.web))
    await wait_until(lambda: decided.fake.waiting, "the start to be serving its socket")
    decided.live.replace(TaskAPIConfig(enabled=False))
    reload = asyncio.create_task(decided.hook.config_reloaded())
    try:
        await asyncio.sleep(0)
        assert not reload.done()  # serialized behind the start
    finally:
        decided.fake.gate.set()
        await asyncio.gather(starting, reload)
    # The start created its socket, then the reload removed it: never both half-done.
    assert decided.fake.served == [("a1", "web")] and decided.fake.closed == ["web"]
    assert not os.path.lexists(sock_of(decided.web))
