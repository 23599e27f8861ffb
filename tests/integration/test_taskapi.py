"""The Task API socket's lifecycle against real agents running real raw_exec tasks: it is
there before the task's first instruction, outlives restarts, comes back when deleted or
after an agent crash, disappears when the task is dead for good, and works for many tasks,
long data dirs and a task user.

The helpers at the top are shared with the other Task API integration test modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from nomad_client.api.client import ApiClient, ApiConnectionError, ApiResponse
from nomad_client.client.allocdir import alloc_group
from tests.integration.harness import (
    AgentProcess,
    eventually,
    raw_exec_job,
    run_job,
    task_dir,
    wait_client_status,
    wait_task_state,
)

NS = 1_000_000_000
# Restart quickly, a few times, then give up (the interval must be at least 5 s).
FAST_RESTART = {"Attempts": 3, "Interval": 60 * NS, "Delay": int(0.2 * NS), "Mode": "fail"}
FILE_IDENTITY = {"File": True}
WAIT_FOR_GO = 'while [ ! -f "$NOMAD_TASK_DIR/go" ]; do sleep 0.05; done'


# ---------------------------------------------------------------------- shared helpers


def api_sock(agent: AgentProcess, alloc_id: str, task: str = "t") -> Path:
    return task_dir(agent, alloc_id, task) / "secrets" / "api.sock"


def local_dir(agent: AgentProcess, alloc_id: str, task: str = "t") -> Path:
    """The task's ``NOMAD_TASK_DIR`` (its ``local`` dir), where scripts leave markers."""
    return task_dir(agent, alloc_id, task) / "local"


def read_token(agent: AgentProcess, alloc_id: str, task: str = "t") -> str:
    """The task's workload identity, from its ``file = true`` token file."""
    return (task_dir(agent, alloc_id, task) / "secrets" / "nomad_token").read_text()


async def sock_request(path: Path, url: str = "/v1/agent/health", *, token: str | None = None,
                       bearer: str | None = None, method: str = "GET",
                       timeout: float = 5.0) -> ApiResponse:
    """One request on a fresh connection to a task socket (long paths are fine)."""
    headers: dict[str, str] = {}
    if token is not None:
        headers["X-Nomad-Token"] = token
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    async with ApiClient(f"unix://{path}", token="", timeout=timeout) as client:
        return await client.request(method, url, headers=headers)


async def answers(path: Path, token: str) -> bool:
    """Does the socket serve an authenticated health check right now?"""
    try:
        return (await sock_request(path, token=token)).status == 200
    except ApiConnectionError:
        return False


async def start_task(agent: AgentProcess, api: ApiClient, job: dict[str, Any],
                     tasks: tuple[str, ...] = ("t",)) -> str:
    """Run ``job`` and return its alloc id once every task runs and has its socket."""
    allocs = await run_job(api, job)
    alloc_id: str = allocs[0]["ID"]
    for task in tasks:
        await wait_task_state(api, alloc_id, task, "running")
        sock = api_sock(agent, alloc_id, task)
        await eventually(sock.exists, message=f"socket of task {task}")
    return alloc_id


async def restarts(api: ApiClient, alloc_id: str, task: str = "t") -> int:
    alloc = await api.allocation_get(alloc_id)
    state = (alloc.get("TaskStates") or {}).get(task) or {}
    return int(state.get("Restarts", 0))


def touch(path: Path) -> None:
    path.write_text("")


# ---------------------------------------------------------------------- lifecycle


async def test_socket_answers_before_the_tasks_first_instruction(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the task cannot call its socket")
    agent = short_agent_factory()
    await agent.start()
    script = ('curl -sf --unix-socket "$NOMAD_SECRETS_DIR/api.sock" '
              '-H "Authorization: Bearer $NOMAD_TOKEN" localhost/v1/agent/health '
              '> "$NOMAD_TASK_DIR/out" ; echo $? > "$NOMAD_TASK_DIR/rc" ; sleep 300')
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job("curl", script,
                                                             identity={"Env": True}))
        tdir = local_dir(agent, alloc_id)
        rc = await eventually(lambda: (tdir / "rc").exists() and (tdir / "rc").read_text(),
                              message="the task's curl to finish")
        assert rc.strip() == "0", f"curl from inside the task failed with exit code {rc!r}"
        health = json.loads((tdir / "out").read_text())
        assert health["server"]["ok"] is True
        assert health["client"]["ok"] is True

        # No task.user: any local user may connect; the token is the only gate.
        st = os.stat(api_sock(agent, alloc_id), follow_symlinks=False)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o666
        assert st.st_uid == os.geteuid()


async def test_socket_is_removed_when_the_task_is_dead_for_good(agent: AgentProcess) -> None:
    async with agent.api() as api:
        # A batch task that exits 0 when told to.
        batch = raw_exec_job("batch", f"{WAIT_FOR_GO}; exit 0", job_type="batch",
                             identity=FILE_IDENTITY)
        batch_alloc = await start_task(agent, api, batch)
        batch_sock = api_sock(agent, batch_alloc)
        assert await answers(batch_sock, read_token(agent, batch_alloc))

        # A service task that only ends when its job is stopped.
        service = raw_exec_job("svc", "exec sleep 300", identity=FILE_IDENTITY,
                               kill_timeout_s=1)
        svc_alloc = await start_task(agent, api, service)
        svc_sock = api_sock(agent, svc_alloc)
        assert await answers(svc_sock, read_token(agent, svc_alloc))

        touch(local_dir(agent, batch_alloc) / "go")
        alloc = await wait_client_status(api, batch_alloc, "complete", "failed")
        assert alloc["ClientStatus"] == "complete"
        await eventually(lambda: not os.path.lexists(batch_sock), timeout=5,
                         message="batch task socket removed")

        await api.job_deregister("svc")
        await wait_client_status(api, svc_alloc, "complete", "failed")
        await eventually(lambda: not os.path.lexists(svc_sock), timeout=5,
                         message="stopped task socket removed")
        with pytest.raises(ApiConnectionError):
            await sock_request(svc_sock, token="anything")


async def test_socket_keeps_answering_across_a_restart(agent: AgentProcess) -> None:
    # First run: wait for the test, then fail; later runs: stay up.
    script = (f'if [ -f "$NOMAD_TASK_DIR/ran" ]; then exec sleep 300; fi; '
              f'touch "$NOMAD_TASK_DIR/ran"; {WAIT_FOR_GO}; exit 1')
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "restart", script, restart=FAST_RESTART, identity=FILE_IDENTITY))
        sock = api_sock(agent, alloc_id)
        token = read_token(agent, alloc_id)
        inode = os.stat(sock, follow_symlinks=False).st_ino

        failures: list[str] = []
        served = 0
        stop = asyncio.Event()

        async def poll() -> None:
            nonlocal served
            while not stop.is_set():
                try:
                    resp = await sock_request(sock, token=token, timeout=2)
                    if resp.status != 200:
                        failures.append(f"status {resp.status}: {resp.text()}")
                except ApiConnectionError as err:
                    failures.append(str(err))
                served += 1
                await asyncio.sleep(0.01)

        poller = asyncio.create_task(poll())
        try:
            touch(local_dir(agent, alloc_id) / "go")
            await eventually(lambda: restarts(api, alloc_id), message="a restart")
            await wait_task_state(api, alloc_id, "t", "running")
            before = served
            await eventually(lambda: served >= before + 5, message="polls after the restart")
        finally:
            stop.set()
            await poller
        assert failures == []
        assert served >= 10
        assert os.stat(sock, follow_symlinks=False).st_ino == inode


async def test_deleted_socket_is_put_back_on_the_next_start(agent: AgentProcess) -> None:
    script = ('if [ ! -f "$NOMAD_TASK_DIR/ran" ]; then touch "$NOMAD_TASK_DIR/ran"; '
              'rm "$NOMAD_SECRETS_DIR/api.sock"; echo $? > "$NOMAD_TASK_DIR/rm_rc"; exit 1; fi; '
              'exec sleep 300')
    async with agent.api() as api:
        allocs = await run_job(api, raw_exec_job("rm", script, restart=FAST_RESTART,
                                                 identity=FILE_IDENTITY))
        alloc_id = allocs[0]["ID"]
        await eventually(lambda: restarts(api, alloc_id), message="a restart")
        await wait_task_state(api, alloc_id, "t", "running")
        sock = api_sock(agent, alloc_id)
        await eventually(lambda: answers(sock, read_token(agent, alloc_id)), timeout=5,
                         message="the socket to be back")
        assert stat.S_ISSOCK(os.stat(sock, follow_symlinks=False).st_mode)
        # The first run really did delete a socket that was there.
        assert (local_dir(agent, alloc_id) / "rm_rc").read_text().strip() == "0"


async def test_socket_is_recreated_after_agent_crash(
        agent_factory: Callable[..., AgentProcess]) -> None:
    first = agent_factory("agent")
    await first.start()
    async with first.api() as api:
        alloc_id = await start_task(first, api, raw_exec_job(
            "crash", 'echo $$ > "$NOMAD_TASK_DIR/pid"; exec sleep 300',
            identity=FILE_IDENTITY))
    sock = api_sock(first, alloc_id)
    token = read_token(first, alloc_id)
    assert await answers(sock, token)
    old_inode = os.stat(sock, follow_symlinks=False).st_ino
    pid = int((local_dir(first, alloc_id) / "pid").read_text())

    await first.kill()
    # The file is left behind by the crash but nobody serves it any more.
    assert sock.is_socket()
    with pytest.raises(ApiConnectionError):
        await sock_request(sock, token=token)
    assert psutil.pid_exists(pid), "the task must outlive its agent"

    second = agent_factory("agent")
    await second.start()
    await eventually(lambda: answers(sock, token), message="socket recreated after restart")
    assert os.stat(sock, follow_symlinks=False).st_ino != old_inode
    assert psutil.pid_exists(pid), "the restarted agent must keep the task running"


async def test_every_task_of_an_alloc_gets_its_own_socket(agent: AgentProcess) -> None:
    names = tuple(f"t{i}" for i in range(5))
    # t0 finishes when told to; the others keep running.
    script = (f'if [ "$NOMAD_TASK_NAME" = t0 ]; then {WAIT_FOR_GO}; exit 0; fi; '
              'exec sleep 300')
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "many", script, job_type="batch", tasks=5, identity=FILE_IDENTITY), names)
        socks = {n: api_sock(agent, alloc_id, n) for n in names}
        # (device, inode): each task's secrets dir may be a tmpfs of its own.
        inodes = {(st.st_dev, st.st_ino) for st in (os.stat(p, follow_symlinks=False)
                                                     for p in socks.values())}
        assert len(inodes) == 5
        for name, sock in socks.items():
            # Each socket is a Task API listener: no token, no service.
            assert (await sock_request(sock)).status == 401, name
            assert await answers(sock, read_token(agent, alloc_id, name)), name

        touch(local_dir(agent, alloc_id, "t0") / "go")
        await wait_task_state(api, alloc_id, "t0", "dead")
        await eventually(lambda: not os.path.lexists(socks["t0"]), timeout=5,
                         message="t0's socket removed")
        for name in names[1:]:
            assert await answers(socks[name], read_token(agent, alloc_id, name)), name


async def test_long_data_dir_still_gets_a_working_socket(
        agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    nested = Path(*(f"{i}" + "d" * 49 for i in range(6)))
    agent = agent_factory(str(nested / "agent"))
    agent.data_dir.parent.mkdir(parents=True)
    assert len(os.fsencode(agent.data_dir)) >= 300
    await agent.start()
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job("long", "exec sleep 300",
                                                             identity=FILE_IDENTITY))
    sock = api_sock(agent, alloc_id)
    assert len(os.fsencode(sock)) > 108
    token = read_token(agent, alloc_id)

    # Connect through a directory descriptor, as a long-path client must.
    fd = os.open(sock.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        short = Path(f"/proc/self/fd/{fd}/api.sock")
        assert (await sock_request(short, token=token)).status == 200
        assert (await sock_request(short)).status == 401
    finally:
        os.close(fd)
    # And through the project's own client, which does the same by itself.
    assert await answers(sock, token)


# ---------------------------------------------------------------------- task.user


async def _status_as(user: str, sock: Path) -> str:
    """The HTTP status ``user`` gets on the socket, or ``000`` if it cannot connect.

    curl rather than this interpreter: a virtualenv's python may sit where only the
    agent's user can read it. It runs with the allocation's group, as the task does (only
    members may enter the alloc dir), so the socket's own mode is what is tested.
    """
    groups = [gid] if (gid := alloc_group(sock.parents[2])) is not None else []
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed: cannot connect as another user")
    proc = await asyncio.create_subprocess_exec(
        curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(sock),
        "http://localhost/v1/agent/health", user=user, extra_groups=groups, cwd="/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    return out.decode().strip()


@contextlib.contextmanager
def _throwaway_user() -> Iterator[str]:
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if useradd is None or userdel is None:
        pytest.skip("useradd/userdel are not installed: cannot create a second user")
    name = f"nc-test-{os.urandom(4).hex()}"
    subprocess.run([useradd, "--system", "--no-create-home", name], check=True,
                   capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run([userdel, name], check=False, capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a socket to task.user needs root")
async def test_task_user_owns_its_socket(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    agent = short_agent_factory()
    await agent.start()
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "user", "exec sleep 300", user="nobody", identity=FILE_IDENTITY))
    sock = api_sock(agent, alloc_id)
    st = os.stat(sock, follow_symlinks=False)
    assert st.st_uid == pwd.getpwnam("nobody").pw_uid
    assert stat.S_IMODE(st.st_mode) == 0o600

    assert await answers(sock, read_token(agent, alloc_id)), "root must be able to connect"
    # A successful connection reaches the router, which asks for a token.
    assert await _status_as("nobody", sock) == "401"
    with _throwaway_user() as other:
        assert await _status_as(other, sock) == "000", f"{other} could use nobody's socket"
