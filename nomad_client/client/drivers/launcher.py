"""The launcher: one small process per driver that forks task executors on request.

Starting a Python interpreter for each task's executor costs about 80 ms of CPU (most of
it imports); a job of a few hundred tasks then queues for seconds behind its own start-up.
The launcher imports the executor once and forks a child per task instead, which costs
about a millisecond, and the child's memory is the launcher's until it writes to it (and
all of it goes once the child ``execve``s the compiled supervisor).

Agent side: ``Launcher``. Launcher side: ``main``, run as
``python -P -m nomad_client.client.drivers.launcher FD`` where FD is its end of a
``SOCK_SEQPACKET`` socket pair, the control socket:

  * once ready it sends ``ready``;
  * each launch is one message: the executor's working directory (the task's state dir) as
    the data, and two descriptors: the executor's end of a stream socket pair (its stdin
    and stdout: the executor's own protocol, see ``executor.py``) and its diagnostics file
    (its stderr);
  * it forks; the child starts a new session (so the agent's death or a signal to the
    agent's group never reaches the task), takes those descriptors and runs the executor;
  * it reaps its children (executors, later the supervisors they became) as they exit;
  * at EOF on the control socket (the agent closed it, or died) it exits. Its running
    children are then reparented and go on: the next agent finds them by pid.

The launcher is the parent of every executor it forks and nothing else, and never runs task
code itself; it keeps no state beyond its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import sys
import traceback
from pathlib import Path

from nomad_client.client.drivers import executor

LAUNCHER_MODULE = "nomad_client.client.drivers.launcher"
_READY = b"ready"
_MAX_MESSAGE = 1 << 16  # a state dir path; anything longer is not ours
_READY_TIMEOUT = 30.0
_EXIT_TIMEOUT = 5.0


class LauncherError(Exception):
    """The launcher could not be started or reached."""


# -- agent side ---------------------------------------------------------------------------


class Launcher:
    """The agent's handle on its launcher process: started on first use, restarted if it
    died, told to exit by ``close``."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._lock = asyncio.Lock()
        # One sender at a time: a full socket is waited on with the loop's writer callback,
        # and a descriptor has only one (a second waiter would replace the first's).
        self._sending = asyncio.Lock()

    async def launch(self, state_dir: Path, stderr_fd: int
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Fork an executor in ``state_dir`` writing its diagnostics to ``stderr_fd``; the
        agent's end of its stdin/stdout."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            message = os.fsencode(state_dir)
            fds = [theirs.fileno(), stderr_fd]
            try:
                await self._send(await self._running(), message, fds)
            except OSError:
                # It died since the last launch (killed, or out of memory): one new try.
                await self._discard()
                await self._send(await self._running(), message, fds)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return await asyncio.open_unix_connection(sock=ours)

    async def close(self) -> None:
        """Tell the launcher to exit (its children go on) and wait for it."""
        async with self._lock:
            await self._discard()

    async def _running(self) -> socket.socket:
        async with self._lock:
            if self._control is None or self._proc is None or self._proc.returncode is not None:
                await self._discard()
                self._proc, self._control = await self._start()
            return self._control

    async def _start(self) -> tuple[asyncio.subprocess.Process, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", LAUNCHER_MODULE, str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                cwd="/",
                env=self._env,
            )
        except OSError as exc:
            ours.close()
            raise LauncherError(f"cannot start the launcher: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        try:
            async with asyncio.timeout(_READY_TIMEOUT):
                ready = await asyncio.get_running_loop().sock_recv(ours, len(_READY))
        except BaseException as exc:
            ready = b""
            if not isinstance(exc, TimeoutError | OSError):
                await _stop(proc, ours)
                raise
        if ready != _READY:
            await _stop(proc, ours)
            raise LauncherError("the launcher did not become ready")
        return proc, ours

    async def _discard(self) -> None:
        proc, control = self._proc, self._control
        self._proc = self._control = None
        if proc is not None and control is not None:
            await _stop(proc, control)

    async def _send(self, control: socket.socket, message: bytes, fds: list[int]) -> None:
        async with self._sending:
            await _send_when_writable(control, message, fds)


async def _send_when_writable(control: socket.socket, message: bytes, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(control, [message], fds)
            return
        except BlockingIOError:
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(control, _settle, writable)
            try:
                await writable
            finally:
                loop.remove_writer(control)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _stop(proc: asyncio.subprocess.Process, control: socket.socket) -> None:
    control.close()  # EOF: the launcher exits
    try:
        async with asyncio.timeout(_EXIT_TIMEOUT):
            await asyncio.shield(proc.wait())
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# -- launcher side ------------------------------------------------------------------------


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass
    except ChildProcessError:
        pass


def _run_executor(state_dir: bytes, conn_fd: int, stderr_fd: int) -> int:
    """In the forked child: become the executor for one task."""
    os.setsid()
    os.chdir(state_dir)
    os.dup2(conn_fd, 0)
    os.dup2(conn_fd, 1)
    os.dup2(stderr_fd, 2)
    for fd in {conn_fd, stderr_fd} - {0, 1, 2}:
        os.close(fd)
    return executor.main()


def _fork_executor(state_dir: bytes, fds: list[int], keep_out: list[int]) -> None:
    conn_fd, stderr_fd = fds
    try:
        pid = os.fork()
    except OSError as exc:
        # The agent sees EOF on its end (closed below) and reports the start as failed.
        print(f"launcher: cannot fork: {exc}", file=sys.stderr, flush=True)
        pid = -1
    if pid == 0:  # pragma: no cover - the child never returns here
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in keep_out:
                os.close(fd)
            code = _run_executor(state_dir, conn_fd, stderr_fd)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
                sys.stderr.flush()
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)


def _serve(control: socket.socket) -> None:
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)
    # A handler only so that the wakeup fd hears of exits (SIG_IGN would reap by itself, but
    # survive into the executors and break their own waits).
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    control.sendall(_READY)
    while True:
        readable, _, _ = select.select([control.fileno(), wake_read], [], [])
        if wake_read in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_read, 512):
                    pass
            _reap()
        if control.fileno() not in readable:
            continue
        message, fds, _flags, _addr = socket.recv_fds(control, _MAX_MESSAGE, 2)
        if not message and not fds:
            return  # EOF: the agent is gone
        if len(fds) != 2 or not message:
            for fd in fds:
                os.close(fd)
            continue
        _fork_executor(message, fds, [control.fileno(), wake_read, wake_write])
        _reap()


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor but ``keep``: whatever the agent's process let slip through
    (an event loop's spare copies of its stdio, say) would otherwise reach every task."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            with contextlib.suppress(OSError):  # the listing's own descriptor, now closed
                os.close(int(name))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: launcher CONTROL_FD", file=sys.stderr)
        return 2
    _close_inherited({0, 1, 2, int(argv[1])})
    control = socket.socket(fileno=int(argv[1]))
    control.setblocking(True)
    _serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
