"""Peer credentials on Task API connections: ``SO_PEERCRED``, the parent-chain walk that says
whether a process is the task's (pid *and* start time, so a recycled pid never counts), and
``peer_credentials = "off" | "log" | "enforce"`` through a real socket, with real processes
run as another user connecting to it."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import psutil
import pytest

from nomad_client.http.peercred import (
    PeerCred,
    belongs_to,
    parent_pid,
    peer_is_task,
    read_peer_credentials,
)
from nomad_client.http.taskapi import NOT_THE_TASK
from nomad_client.server.keyring import Keyring
from tests.unit.factories import (
    TASK_INFO,
    TaskAPIStack,
    task_api_stack,
    unix_socket,
    wait_until,
)

CURL = shutil.which("curl")


def started(proc: subprocess.Popen[bytes] | psutil.Process | int) -> tuple[int, float]:
    pid = proc if isinstance(proc, int) else proc.pid
    return pid, psutil.Process(pid).create_time()


@pytest.fixture
def shell_and_child() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A shell of ours and its child (our grandchild), in a process group of their own so
    both go at the end."""
    shell = subprocess.Popen(["sh", "-c", "sleep 60; true"], start_new_session=True)
    try:
        yield shell, _wait_for_child(shell.pid)
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that does nothing: stands for some task's root."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


# ---- the pieces ------------------------------------------------------------------------
def test_peer_credentials_of_a_unix_connection() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert read_peer_credentials(left) == PeerCred(os.getpid(), os.getuid(), os.getgid())
    assert read_peer_credentials(None) is None
    tcp = socket.socket()
    with tcp:  # not a Unix socket: it cannot tell
        assert read_peer_credentials(tcp) is None


def test_parent_pid(tmp_path: Path) -> None:
    assert parent_pid(os.getpid()) == os.getppid()
    # A command name with spaces and parentheses cannot confuse the parse.
    odd = tmp_path / "a) b (c"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "60"])
    try:
        assert parent_pid(proc.pid) == os.getpid()
    finally:
        proc.kill()
        proc.wait()
    assert parent_pid(proc.pid) is None  # gone (reaped)


def test_a_process_belongs_to_its_own_tree_only(
        sleeper: subprocess.Popen[bytes],
        shell_and_child: tuple[subprocess.Popen[bytes], int]) -> None:
    shell, grandchild = shell_and_child
    assert belongs_to(grandchild, started(os.getpid()))
    assert belongs_to(grandchild, started(shell))
    assert belongs_to(shell.pid, started(shell))  # the root itself
    assert not belongs_to(grandchild, started(sleeper))  # a sibling's tree
    assert not belongs_to(os.getpid(), started(shell))  # an ancestor is not a descendant


def test_a_recycled_pid_never_counts(sleeper: subprocess.Popen[bytes]) -> None:
    pid, created = started(sleeper)
    assert belongs_to(pid, (pid, created))
    # The same pid with another start time: the root it names is gone, whoever has its pid.
    assert not belongs_to(pid, (pid, created - 5.0))
    assert not belongs_to(pid, None)  # the task is not running
    assert not belongs_to(0, (pid, created))


def test_root_peers_always_pass_and_unknown_peers_never() -> None:
    assert peer_is_task(PeerCred(12345678, 0, 0), None)
    assert not peer_is_task(PeerCred(os.getpid(), 65534, 65534), None)
    assert not peer_is_task(None, (os.getpid(), 0.0))


def _wait_for_child(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children()
        if children:
            return children[0].pid
        time.sleep(0.01)
    raise AssertionError(f"process {pid} started no child")


# ---- through a real socket, with processes of another user -------------------------------
@attrs.define
class Processes:
    """The task's processes as a test sets them: a root (pid, start time) or none."""

    current: tuple[int, float] | None = None
    # True: the task is starting, ``started`` waits until the test names its root.
    starting: bool = False
    waiting: int = 0
    _named: asyncio.Event = attrs.field(factory=asyncio.Event)

    def root(self) -> tuple[int, float] | None:
        return self.current

    def name_root(self, root: tuple[int, float]) -> None:
        self.current = root
        self._named.set()

    async def started(self) -> None:
        if self.starting:
            self.waiting += 1
            await self._named.wait()


@pytest.fixture
async def stack(workdir: Path, keyring: Keyring) -> AsyncIterator[TaskAPIStack]:
    served = await task_api_stack(workdir, keyring)
    yield served
    await served.stop()


@pytest.fixture
async def task_sock(stack: TaskAPIStack, workdir: Path) -> tuple[Path, Processes]:
    """A socket of a task whose processes the test sets, that any user may connect to."""
    processes = Processes()
    path = workdir / "peer.sock"
    await stack.agent.api.serve_task(unix_socket(path),
                                     attrs.evolve(TASK_INFO, processes=processes))
    path.chmod(0o666)
    return path, processes


async def curl_as_nobody(path: Path, token: str, *, via_shell: bool,
                         processes: Processes | None = None) -> int:
    """GET /v1/agent/health over ``path`` from curl run as nobody: straight, or as the
    child of a shell (which, with ``processes``, is made the task's root before curl runs).
    The status it got."""
    if CURL is None or os.geteuid() != 0:
        pytest.skip("needs curl and root (to run a process as another user)")
    nobody = pwd.getpwnam("nobody")
    curl = (f'{CURL} -s -o /dev/null -w "%{{http_code}}" --unix-socket {path} '
            f'-H "X-Nomad-Token: {token}" http://localhost/v1/agent/health')
    # "read" first: the shell waits until the test has recorded it as the task's root.
    command = ["sh", "-c", f"read go; {curl}; true"] if via_shell else ["sh", "-c", curl]
    proc = await asyncio.create_subprocess_exec(
        *command, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd="/")
    if processes is not None:
        processes.current = started(proc.pid)
    out, _ = await asyncio.wait_for(proc.communicate(b"go\n"), 30)
    return int(out.decode() or 0)


@pytest.mark.parametrize(("mode", "status"), [("off", 200), ("log", 200), ("enforce", 403)])
async def test_a_process_outside_the_task(stack: TaskAPIStack,
                                          task_sock: tuple[Path, Processes],
                                          sleeper: subprocess.Popen[bytes],
                                          caplog: pytest.LogCaptureFixture, mode: str,
                                          status: int) -> None:
    path, processes = task_sock
    processes.current = started(sleeper)  # the task is some other process tree
    await stack.configure(peer_credentials=mode)
    with caplog.at_level(logging.WARNING, logger="nomad_client.http.listeners"):
        assert await curl_as_nobody(path, stack.token, via_shell=False) == status
    warned = [r.getMessage() for r in caplog.records
              if "not part of the task" in r.getMessage()]
    if mode == "off":
        assert warned == []
    else:
        assert len(warned) == 1, warned
        assert f"uid {pwd.getpwnam('nobody').pw_uid}" in warned[0]
        assert ("refusing" if mode == "enforce" else "allowing") in warned[0]
        assert stack.token not in warned[0]


async def test_enforce_refuses_with_a_plain_reason(stack: TaskAPIStack,
                                                   task_sock: tuple[Path, Processes]) -> None:
    path, _ = task_sock  # no task process at all
    await stack.configure(peer_credentials="enforce")
    if CURL is None or os.geteuid() != 0:
        pytest.skip("needs curl and root")
    nobody = pwd.getpwnam("nobody")
    proc = await asyncio.create_subprocess_exec(
        CURL, "-s", "--unix-socket", str(path), "-H", f"X-Nomad-Token: {stack.token}",
        "http://localhost/v1/agent/health", user=nobody.pw_uid, group=nobody.pw_gid,
        extra_groups=[], stdout=asyncio.subprocess.PIPE, cwd="/")
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert out.decode() == NOT_THE_TASK


async def test_enforce_lets_the_tasks_own_processes_through(
        stack: TaskAPIStack, task_sock: tuple[Path, Processes]) -> None:
    path, processes = task_sock
    await stack.configure(peer_credentials="enforce")
    # curl is the shell's child, and the shell is the task's root.
    assert await curl_as_nobody(path, stack.token, via_shell=True, processes=processes) == 200


async def test_a_task_connecting_while_it_starts_waits_for_its_process(
        stack: TaskAPIStack, task_sock: tuple[Path, Processes]) -> None:
    """The socket exists before the driver has started the task: a task that connects at
    once is judged when its process is known, not refused for being early."""
    path, processes = task_sock
    processes.starting = True
    await stack.configure(peer_credentials="enforce")
    if CURL is None or os.geteuid() != 0:
        pytest.skip("needs curl and root (to run a process as another user)")
    nobody = pwd.getpwnam("nobody")
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", f'{CURL} -s -o /dev/null -w "%{{http_code}}" --unix-socket {path} '
                    f'-H "X-Nomad-Token: {stack.token}" http://localhost/v1/agent/health',
        user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        stdout=asyncio.subprocess.PIPE, cwd="/")
    try:
        # The request is in, the task not yet started.
        await wait_until(lambda: processes.waiting, "the request to wait for the task")
        processes.name_root(started(proc.pid))
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out.decode() == "200"


async def test_log_mode_never_holds_a_request_while_the_task_starts(
        stack: TaskAPIStack, task_sock: tuple[Path, Processes],
        caplog: pytest.LogCaptureFixture) -> None:
    path, processes = task_sock
    processes.starting = True  # its process is not known yet
    await stack.configure(peer_credentials="log")
    with caplog.at_level(logging.WARNING, logger="nomad_client.http.listeners"):
        assert await curl_as_nobody(path, stack.token, via_shell=False) == 200
    assert processes.waiting == 0  # served at once, not held for the start
    assert not [r for r in caplog.records if "not part of the task" in r.getMessage()]


async def test_enforce_lets_root_through(stack: TaskAPIStack,
                                         task_sock: tuple[Path, Processes]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the test process is not root")
    await stack.configure(peer_credentials="enforce")
    assert (await stack.call("GET", "/v1/agent/health")).status == 200  # this process


async def test_the_verdict_is_kept_per_connection(stack: TaskAPIStack, task_sock: tuple[
        Path, Processes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = task_sock
    await stack.configure(peer_credentials="log")
    calls = []
    import nomad_client.http.taskapi as taskapi

    def counting(peer: PeerCred | None, root: tuple[int, float] | None) -> bool:
        calls.append(peer)
        return True

    monkeypatch.setattr(taskapi, "peer_is_task", counting)
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        for _ in range(3):
            writer.write(f"GET /v1/agent/health HTTP/1.1\r\nHost: x\r\n"
                         f"X-Nomad-Token: {stack.token}\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    assert calls == [PeerCred(os.getpid(), os.getuid(), os.getgid())]  # once, 3 requests
