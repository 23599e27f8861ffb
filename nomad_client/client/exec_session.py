"""``alloc exec`` sessions: one command run for a running task, its input and output carried
as Nomad's exec frames over a channel (the HTTP layer gives a websocket).

Frames (JSON objects, bytes base64): from the client ``{"stdin":{"data":...}}``,
``{"stdin":{"close":true}}``, ``{"tty_size":{"height":H,"width":W}}``; any other key is
ignored, as Nomad does. To the client ``{"stdout":{"data":...}}``, ``{"stderr":{...}}``,
``{"stdout":{"close":true}}`` and, last, ``{"exited":true,"result":{"exit_code":N}}``
(``"result":{}`` for 0, as Nomad's omitempty encoding).

The command is started by ``client/drivers/exec_helper.py`` (in the task's namespaces,
chroot and cgroup when the driver's ``ExecTarget`` names a process), with a pty allocated
here for ``tty`` (stdout and stderr then share it) or three pipes. Output is read without
blocking, 4 KiB per frame, and the next read waits until the channel took the frame, so a
session holds one frame per stream however slow its client is (the command then blocks on
a full pipe).

A session ends with the command: it is killed (its process group, and its session for a
tty) when the client goes away, when a frame is invalid, when the task stops and when the
agent shuts down (``ExecSessions.close``); every task a session starts is cancelled and
awaited by it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import fcntl
import json
import os
import signal
import struct
import sys
import termios
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import attrs
import psutil

from nomad_client.client.drivers.base import ExecTarget
from nomad_client.client.drivers.raw_exec import exchange_spec, executor_env

HELPER_MODULE = "nomad_client.client.drivers.exec_helper"
OUTPUT_FRAME_BYTES = 4096  # as Nomad's
START_TIMEOUT = 15.0
# After the command exits: how long output still held open by its leftovers is sent.
DRAIN_TIMEOUT = 2.0
KILL_WAIT = 5.0
# Bounds the rescans of /proc for a session's leftovers (each kills what it finds).
KILL_PASSES = 20
MAX_TTY_DIMENSION = 0xFFFF
EOT = b"\x04"  # a tty's end of input (what Ctrl-D sends)
T = TypeVar("T")


class FrameError(ValueError):
    """A client frame that is not one (bad JSON, bad base64, bad sizes)."""


class ExecStartError(Exception):
    """The command could not be started; ``str()`` says why, for the client."""


# ---- frames ----------------------------------------------------------------------------
@attrs.frozen
class ClientFrame:
    stdin_data: bytes = b""
    stdin_close: bool = False
    tty_size: tuple[int, int] | None = None  # (height, width)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FrameError(f"{what} must be a JSON object")
    return value


def _dimension(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TTY_DIMENSION:
        raise FrameError(f"tty_size {name} must be an integer from 0 to {MAX_TTY_DIMENSION}")
    return value


def decode_json_object(raw: str | bytes, what: str = "frame") -> Mapping[str, Any]:
    """A client frame's JSON object; ``FrameError`` for anything else, however hostile
    (a frame of deeply nested arrays exhausts the decoder's recursion, not the agent)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FrameError(f"{what} is not JSON: {exc}") from None
    return _object(value, what)


def decode_client_frame(raw: str | bytes) -> ClientFrame:
    """One frame from the client; keys other than ``stdin`` and ``tty_size`` are ignored."""
    frame = decode_json_object(raw)
    data, close, size = b"", False, None
    if (stdin := frame.get("stdin")) is not None:
        stdin = _object(stdin, "stdin")
        text = stdin.get("data")
        if text is not None:
            if not isinstance(text, str):
                raise FrameError("stdin data must be a base64 string")
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise FrameError("stdin data is not valid base64") from None
        close = stdin.get("close") is True
    if (tty := frame.get("tty_size")) is not None:
        tty = _object(tty, "tty_size")
        size = (_dimension(tty.get("height", 0), "height"),
                _dimension(tty.get("width", 0), "width"))
    return ClientFrame(data, close, size)


def output_frame(stream: str, data: bytes) -> str:
    return json.dumps({stream: {"data": base64.b64encode(data).decode()}})


def close_frame(stream: str) -> str:
    return json.dumps({stream: {"close": True}})


def exited_frame(exit_code: int) -> str:
    # Nomad's protobuf JSON omits zero values: a clean exit has an empty result.
    return json.dumps({"exited": True, "result": {"exit_code": exit_code} if exit_code else {}})


def encode_client_frames(*, data: bytes = b"", close: bool = False,
                         tty_size: tuple[int, int] | None = None) -> list[str]:
    """What a client sends (the CLI's side of the protocol)."""
    frames = []
    if tty_size is not None:
        frames.append(json.dumps({"tty_size": {"height": tty_size[0], "width": tty_size[1]}}))
    if data:
        frames.append(json.dumps({"stdin": {"data": base64.b64encode(data).decode()}}))
    if close:
        frames.append(json.dumps({"stdin": {"close": True}}))
    return frames


# ---- what a session needs ----------------------------------------------------------------
@attrs.frozen
class ExecRequest:
    command: tuple[str, ...]
    tty: bool = False


@attrs.frozen
class ExecTask:
    """A task of this node as ``alloc exec`` sees it (the client hands it out): ``target``
    says where its commands run (``ExecStartError`` when it is not running or its driver
    cannot exec); ``stopped`` returns once the task no longer runs."""

    target: Callable[[], Awaitable[ExecTarget]]
    stopped: Callable[[], Awaitable[None]]


class ExecChannel(Protocol):
    """The client's side: ``send`` one frame (waits until taken; ``ConnectionError`` when
    the client is gone); ``receive`` the next frame, None once the client has gone."""

    async def send(self, frame: str) -> None: ...

    async def receive(self) -> str | bytes | None: ...


@attrs.frozen
class SessionEnd:
    """How a session ended: the command's exit code (sent in the ``exited`` frame), or why
    it ended without one (``client_gone``, or an ``error`` to report as the close reason)."""

    exit_code: int | None = None
    error: str | None = None
    client_gone: bool = False


# ---- the command -----------------------------------------------------------------------
def _open_stdio(tty: bool) -> tuple[list[int], list[int]]:
    """(ours, the command's): a pty (master; slave three times) or three pipes (stdin's
    write end, stdout's and stderr's read ends; their other ends)."""
    if tty:
        master, slave = os.openpty()
        os.set_inheritable(slave, False)
        return [master], [slave, slave, slave]
    ours: list[int] = []
    theirs: list[int] = []
    try:
        for command_reads in (True, False, False):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            ours.append(write_end if command_reads else read_end)
            theirs.append(read_end if command_reads else write_end)
    except OSError:
        _close_fds(ours + theirs)
        raise
    return ours, theirs


def _close_fds(fds: list[int]) -> None:
    for fd in sorted(set(fds)):
        with contextlib.suppress(OSError):
            os.close(fd)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_sessions(sids: set[int]) -> None:
    """SIGKILL every process left in the sessions ``sids`` (the helper's, and a tty
    command's own), whatever process group it moved to: an interactive shell's background
    jobs, say. One pass misses a child forked after it listed /proc (by a process it then
    killed), so passes repeat until one finds nothing. Blocking (it reads /proc): a thread's
    work."""
    for _ in range(KILL_PASSES):
        if not _kill_session_members(sids):
            return


def _kill_session_members(sids: set[int]) -> bool:
    """One pass of ``_kill_sessions``; whether it found a live process to kill (a zombie
    is dead already: its parent or init reaps it)."""
    found = False
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) in sids:
                os.kill(proc.pid, signal.SIGKILL)
                found = True
    return found


class FdStream:
    """One non-blocking descriptor of ours, read or written only when asked (the loop says
    when it is ready), so nothing is buffered here: what the command writes waits in the
    kernel's pipe or pty until the last frame was taken. Plain descriptors, not asyncio
    pipe transports: a pty master must work on every loop (uvloop's pipes lose its data)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.closed = False

    async def _ready(self, add: Callable[..., None], remove: Callable[[int], Any]) -> None:
        ready = asyncio.get_running_loop().create_future()
        add(self.fd, _wake, ready)
        try:
            await ready
        finally:
            remove(self.fd)

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" at the end (a pty reports its end as EIO)."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                await self._ready(loop.add_reader, loop.remove_reader)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise
        return b""

    async def write(self, data: bytes) -> None:
        """All of ``data``; ``BrokenPipeError`` once nobody reads."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and not self.closed:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._ready(loop.add_writer, loop.remove_writer)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class ExecProcess:
    """One started command: its helper process, the command's pid and our ends of its stdio.
    ``start`` it, then read ``outputs``, ``write``/``close_stdin``/``resize``, ``wait``;
    ``kill`` and ``close`` always."""

    def __init__(self, helper: asyncio.subprocess.Process, pid: int, tty: bool,
                 ours: list[int]) -> None:
        self.helper = helper
        self.pid = pid
        self.tty = tty
        streams = [FdStream(fd) for fd in ours]
        self._streams = streams
        if tty:  # one pty master: our input, its output (stdout and stderr merged)
            self._stdin = streams[0]
            self.outputs = {"stdout": streams[0]}
        else:
            self._stdin = streams[0]
            self.outputs = {"stdout": streams[1], "stderr": streams[2]}
        self._stdin_closed = False

    @classmethod
    async def start(cls, target: ExecTarget, request: ExecRequest) -> ExecProcess:
        # openpty may block on a busy devpts; never on the loop.
        ours, theirs = await asyncio.to_thread(_open_stdio, request.tty)
        try:
            helper = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", HELPER_MODULE, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                pass_fds=sorted(set(theirs)), start_new_session=True, cwd="/",
                env=executor_env())  # the command's env is in its spec
        except OSError as exc:
            _close_fds(ours + theirs)
            raise ExecStartError(f"cannot start the exec helper: {exc.strerror or exc}") from exc
        _close_fds(theirs)  # the helper and the command hold them now
        try:
            async with asyncio.timeout(START_TIMEOUT):
                pid = await _handshake(helper, _spec(target, request, theirs))
        except BaseException:
            _kill_group(helper.pid)
            _close_fds(ours)
            await asyncio.shield(helper.wait())
            raise
        return cls(helper, pid, request.tty, ours)

    async def write(self, data: bytes) -> None:
        if self._stdin_closed or not data:
            return
        try:
            await self._stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self._stdin_closed = True  # the command stopped reading: like Nomad, drop it

    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        if self.tty:
            await self.write(EOT)  # the pty stays: it is also the command's output
            return
        self._stdin_closed = True
        self._stdin.close()

    def resize(self, height: int, width: int) -> None:
        if self.tty and not self._stdin.closed:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._stdin.fd, termios.TIOCSWINSZ,
                            struct.pack("HHHH", height, width, 0, 0))

    async def wait(self) -> int:
        code = await self.helper.wait()
        return 128 - code if code < 0 else code  # the helper itself killed by signal N

    def kill(self) -> None:
        """SIGKILL the command: the helper's group (the command's too without a tty) and,
        with a tty, the command's own session group."""
        if self.helper.returncode is None:
            _kill_group(self.helper.pid)
        if self.tty:
            _kill_group(self.pid)

    async def close(self) -> None:
        self.kill()
        await asyncio.to_thread(_kill_sessions, {self.helper.pid, self.pid} if self.tty
                                else {self.helper.pid})
        # Leftovers of the command may hold its output open: stop reading it regardless.
        for stream in self._streams:
            stream.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT):
                await self.helper.wait()


def _spec(target: ExecTarget, request: ExecRequest, stdio: list[int]) -> dict[str, Any]:
    return {"command": list(request.command), "tty": request.tty, "stdio": stdio,
            "cwd": target.cwd, "env": dict(target.env), "uid": target.uid, "gid": target.gid,
            "groups": list(target.groups), "pid": target.pid,
            "pid_create_time": target.pid_create_time,
            "cgroup_procs": list(target.cgroup_procs)}


async def _handshake(helper: asyncio.subprocess.Process, spec: dict[str, Any]) -> int:
    reply = await exchange_spec(helper, spec)
    if not reply.get("ok"):
        raise ExecStartError(str(reply.get("error") or "the exec helper exited without reporting"))
    return int(reply["pid"])


# ---- the session -----------------------------------------------------------------------
class ExecSession:
    """Carries one command's frames between ``channel`` and ``process`` until it ends.
    Once ``task_stopped()`` returns the command is killed."""

    def __init__(self, process: ExecProcess, channel: ExecChannel,
                 task_stopped: Callable[[], Awaitable[None]]) -> None:
        self._process = process
        self._channel = channel
        self._task_stopped = task_stopped
        self._send_lock = asyncio.Lock()

    async def run(self) -> SessionEnd:
        process = self._process
        output = asyncio.ensure_future(self._pump_output())
        inputs = asyncio.ensure_future(self._pump_input())
        watch = asyncio.ensure_future(self._task_stopped())
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({exited, inputs, watch}, return_when=asyncio.FIRST_COMPLETED)
            if inputs.done() and not exited.done():
                process.kill()
                error = inputs.exception()
                if isinstance(error, FrameError):
                    return SessionEnd(error=f"invalid frame: {error}")
                if error is not None:
                    raise error
                return SessionEnd(client_gone=True)
            if watch.done():
                process.kill()  # its exit, as any other, is then reported below
            code = await exited
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await asyncio.shield(output)
            except TimeoutError:
                process.kill()  # leftovers hold the output open
            try:
                await self._send_closing(code)
            except ConnectionError:
                return SessionEnd(client_gone=True)
            return SessionEnd(exit_code=code)
        finally:
            for task in (output, inputs, watch, exited):
                task.cancel()
            await asyncio.gather(output, inputs, watch, exited, return_exceptions=True)
            await process.close()

    async def _send(self, frame: str) -> None:
        async with self._send_lock:
            await self._channel.send(frame)

    async def _send_closing(self, code: int) -> None:
        for stream in self._process.outputs:
            await self._send(close_frame(stream))
        await self._send(exited_frame(code))

    async def _pump_output(self) -> None:
        await asyncio.gather(*(self._pump_stream(name, reader)
                               for name, reader in self._process.outputs.items()))

    async def _pump_stream(self, name: str, reader: FdStream) -> None:
        while data := await reader.read(OUTPUT_FRAME_BYTES):
            await self._send(output_frame(name, data))

    async def _pump_input(self) -> None:
        process = self._process
        while (raw := await self._channel.receive()) is not None:
            frame = decode_client_frame(raw)
            if frame.tty_size is not None:
                process.resize(*frame.tty_size)
            await process.write(frame.stdin_data)
            if frame.stdin_close:
                await process.close_stdin()


async def run_session(target: ExecTarget, request: ExecRequest, channel: ExecChannel,
                      task_stopped: Callable[[], Awaitable[None]]) -> SessionEnd:
    """Start the command and carry its session to the end. ``ExecStartError`` when it
    cannot be started."""
    process = await ExecProcess.start(target, request)
    return await ExecSession(process, channel, task_stopped).run()


class ChangeSignal:
    """Wakes those waiting on a key (an allocation) each time the key is notified (its
    state changed), so a session learns at once that its task stopped. Costs a dict lookup
    per notification while nobody waits."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    async def wait_until(self, key: str, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._events.setdefault(key, asyncio.Event()).wait()


class ExecSessions:
    """The agent's running sessions: each runs as a task owned here, so agent shutdown
    (``close``) ends them all, their commands killed, and waits for that."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._running)

    async def run(self, session: Awaitable[T]) -> T:
        """Run ``session`` to its end; a caller that is cancelled cancels it (and waits)."""
        if self._closed:
            if asyncio.iscoroutine(session):
                session.close()
            raise ExecStartError("the agent is shutting down")
        task = asyncio.ensure_future(session)
        self._running.add(task)
        try:
            return await task
        finally:
            self._running.discard(task)

    async def close(self) -> None:
        self._closed = True
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
