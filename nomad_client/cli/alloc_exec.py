"""``alloc exec``: run a command in a running task over the exec websocket and exit with its
status.

``alloc exec [-task T] [-job] [-i] [-t] [-e ESC] <alloc | job> <command> [<args>...]``:
``-i`` (default true) forwards stdin, ``-i=false`` closes it at once; ``-t`` (default: stdin
is a terminal) asks for a pty, puts the local terminal in raw mode (restored on every way
out) and sends window sizes (at start and on SIGWINCH); ``-e`` is the escape character of a
tty session (default ``~``, ``none`` for none): at the start of a line ``~.`` disconnects and
``~~`` sends one ``~``. Flags stop at the first argument that is not one, so the command's
own flags are its own (``alloc exec a1 ls -la``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import sys
import termios
import tty as ttymode
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp

from nomad_client.api import ApiClient
from nomad_client.cli.alloc import alloc_task, target_alloc
from nomad_client.cli.common import CommandError, CommandParser, reporting, run_with_client
from nomad_client.client.exec_session import encode_client_frames

USAGE = "alloc exec [options] <allocation> <command> [<args>...]"
NO_ESCAPE = "none"
STDIN_CHUNK = 4096
# Flags that take a value as the next word (when not written ``-flag=value``).
_VALUED_FLAGS = frozenset({"task", "e", "address", "token", "region", "namespace"})


class EscapeFilter:
    """Nomad's escapes on a tty session's input: at the start of a line, the escape character
    then ``.`` disconnects, twice sends it once, followed by anything else sends both."""

    def __init__(self, escape: bytes | None) -> None:
        self._escape = escape
        self._line_start = True
        self._pending = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """What to send of ``data``, and whether the user asked to disconnect."""
        if self._escape is None:
            return data, False
        out = bytearray()
        for value in data:
            byte = bytes((value,))
            if self._pending:
                self._pending = False
                if byte == b".":
                    return bytes(out), True
                out += self._escape
                if byte == self._escape:
                    self._line_start = False
                    continue
            elif self._line_start and byte == self._escape:
                self._pending = True
                continue
            out += byte
            self._line_start = byte in (b"\r", b"\n")
        return bytes(out), False


def split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(flags, positionals): flags end at the first word that is not one (or ``--``), as
    Go's flag package reads them; ``-it``/``-ti`` mean ``-i -t``."""
    flags: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            index += 1
            break
        if not word.startswith("-") or word == "-":
            break
        if word in ("-it", "-ti"):
            flags += ["-i", "-t"]
        else:
            flags.append(word)
            name = word.lstrip("-")
            if "=" not in name and name in _VALUED_FLAGS and index + 1 < len(argv):
                index += 1
                flags.append(argv[index])
        index += 1
    return flags, list(argv[index:])


def _escape_byte(text: str) -> bytes | None:
    if text == NO_ESCAPE:
        return None
    data = text.encode()
    if len(text) != 1 or len(data) != 1:
        raise CommandError("-e requires 'none' or a single character")
    return data


def exec_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("alloc exec", USAGE,
                      "Run a command in a running task of an allocation (or, with -job, of "
                      "a random running allocation of the job); exits with its status.",
                      namespaced=True)
    p.add_flag("task", metavar="TASK", help="the task to run the command in")
    p.add_bool_flag("job", help="the first argument is a job ID: use a random running "
                                "allocation of it")
    p.add_bool_flag("i", default=True, help="forward stdin (default true)")
    p.add_bool_flag("t", default=None, help="allocate a pty (default: stdin is a terminal)")
    p.add_flag("e", metavar="ESC", default="~",
               help="escape character of a tty session ('none': none; default ~)")
    flags, positionals = split_arguments(argv)
    ns = p.parse(flags)
    if len(positionals) < 2:
        raise CommandError(f"This command takes at least 2 arguments: {USAGE}")
    use_tty = sys.stdin.isatty() if ns.t is None else bool(ns.t)
    if use_tty and not ns.i:
        raise CommandError("-i must be enabled if running with tty")
    escape = _escape_byte(ns.e)
    ident, command = positionals[0], positionals[1:]

    async def body(client: ApiClient) -> int:
        alloc = await target_alloc(client, ident, ns.job)
        task = alloc_task(alloc, ns.task, [])
        session = _Session(use_tty, ns.i, EscapeFilter(escape if use_tty else None))
        with reporting("failed to exec into task"):
            async with client.alloc_exec(alloc["ID"], task, command, tty=use_tty,
                                         namespace=alloc.get("Namespace")) as ws:
                return await session.run(ws)

    return run_with_client(ns, body)


class _Session:
    """The terminal's side of one session: stdin (through the escape filter) and window
    sizes out, output in, the exit status at the end."""

    def __init__(self, use_tty: bool, forward_stdin: bool, escapes: EscapeFilter) -> None:
        self._tty = use_tty
        self._forward_stdin = forward_stdin
        self._escapes = escapes
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._disconnect = asyncio.Event()

    async def run(self, ws: aiohttp.ClientWebSocketResponse) -> int:
        loop = asyncio.get_running_loop()
        with _raw_terminal(self._tty):
            if self._tty:
                self._queue_window_size()
                loop.add_signal_handler(signal.SIGWINCH, self._queue_window_size)
            sender = asyncio.ensure_future(self._send_all(ws))
            stdin = asyncio.ensure_future(self._read_stdin() if self._forward_stdin
                                          else self._close_stdin())
            receiver = asyncio.ensure_future(_receive(ws))
            disconnect = asyncio.ensure_future(self._disconnect.wait())
            try:
                await asyncio.wait({receiver, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if self._tty:
                    loop.remove_signal_handler(signal.SIGWINCH)
                for task in (sender, stdin, receiver, disconnect):
                    task.cancel()
                await asyncio.gather(sender, stdin, receiver, disconnect,
                                     return_exceptions=True)
        if not receiver.done() or receiver.cancelled():
            print("\r\nConnection closed", file=sys.stderr)
            return 0
        code: int = receiver.result()
        return code

    def _queue(self, **frame: Any) -> None:
        for text in encode_client_frames(**frame):
            self._outbox.put_nowait(text)

    def _queue_window_size(self) -> None:
        size = shutil.get_terminal_size()
        self._queue(tty_size=(size.lines, size.columns))

    async def _send_all(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await ws.send_str(await self._outbox.get())

    async def _close_stdin(self) -> None:
        self._queue(close=True)

    async def _read_stdin(self) -> None:
        fd = sys.stdin.fileno()
        while True:
            data = await _read(fd)
            if not data:
                self._queue(close=True)
                return
            data, disconnect = self._escapes.feed(data)
            self._queue(data=data)
            if disconnect:
                self._disconnect.set()
                return


async def _read(fd: int) -> bytes:
    """Up to ``STDIN_CHUNK`` bytes once ``fd`` has some, without blocking the loop (a
    regular file, which cannot be polled, never blocks: it is read in a thread)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    try:
        loop.add_reader(fd, ready.set_result, None)
    except PermissionError:
        return await asyncio.to_thread(os.read, fd, STDIN_CHUNK)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return os.read(fd, STDIN_CHUNK)


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> int:
    """Write the command's output; its exit status once it has exited."""
    while True:
        msg = await ws.receive()
        if msg.type == aiohttp.WSMsgType.CLOSE:
            raise CommandError(f"failed to exec into task: {msg.extra or msg.data}")
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.ERROR):
            raise CommandError(f"failed to exec into task: {ws.exception() or 'connection lost'}")
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        frame = json.loads(msg.data)
        for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            data = (frame.get(stream) or {}).get("data")
            if data:
                out.buffer.write(base64.b64decode(data))
                out.buffer.flush()
        if frame.get("exited"):
            return int((frame.get("result") or {}).get("exit_code") or 0)


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """The local terminal in raw mode while a tty session runs; put back whatever ends it."""
    fd = sys.stdin.fileno()
    if not enabled or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    ttymode.setraw(fd, termios.TCSANOW)  # keep what was typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


COMMANDS = {"exec": exec_cmd}
