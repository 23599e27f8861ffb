"""Streaming reads of an allocation's files: ``/v1/client/fs/readat/:alloc`` (a byte range,
plain), ``/v1/client/fs/stream/:alloc`` (one file, followed by default) and
``/v1/client/fs/logs/:alloc`` with ``follow``, ``origin`` or ``offset`` (a task's logs across
its rotated files; the plain read from the start stays in ``client.py``).

Framed responses are Nomad's ``StreamFrame`` JSON objects back to back (``Offset`` past the
frame's data, ``Data`` base64, ``File``, ``FileEvent``), with ``{}`` as a heartbeat while a
followed file is idle; ``plain=true`` sends the bytes alone. A followed file is polled for
growth every ``POLL_INTERVAL`` seconds; a file that shrank is read again from its start
after a ``file truncated`` event, and one unlinked ends the stream after ``file deleted``.

A stream ends when the client goes (the listener's ``on_lost``: aiohttp does not cancel a
handler whose client hung up), when a file is deleted, or, for logs, once the task is dead
and its last log file fully sent. Each stream holds one frame of data at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

import attrs
from aiohttp import web

from nomad_client.client.allocdir import AllocDir
from nomad_client.http.endpoints.client import (
    LOG_FRAME_BYTES,
    READ_FS,
    READ_LOGS,
    StreamedFile,
    encode_frame,
    end_early,
    fs_logs,
    in_thread,
    log_file_names,
    log_names,
    logs_request,
    open_for_stream,
    open_log_file,
    open_to_stream,
)
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import bad_request
from nomad_client.http.listeners import when_lost
from nomad_client.http.query import MAX_INT64, parse_int64, query_bool
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.structs.models import TASK_DEAD

# Seconds between looks at an idle followed file (tests shorten it).
POLL_INTERVAL = 0.2
# Seconds of silence after which a framed stream sends a ``{}`` heartbeat (as Nomad's).
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT = b"{}"
FILE_TRUNCATED = "file truncated"
FILE_DELETED = "file deleted"
ORIGINS = ("start", "end")


@attrs.frozen
class StreamQuery:
    offset: int
    origin: str
    follow: bool
    plain: bool


def _non_negative(req: ApiRequest, name: str) -> int:
    """A byte count or position: an int64 as Nomad parses it (absent: 0), never negative."""
    raw = req.query.get(name) or "0"
    try:
        value = parse_int64(name, raw)
    except ValueError as err:
        raise bad_request(str(err)) from None
    if value < 0:
        raise bad_request(f"error parsing {name}: {raw!r} is not a non-negative integer")
    return value


def parse_stream_query(req: ApiRequest, *, follow_default: bool) -> StreamQuery:
    origin = req.query.get("origin") or "start"
    if origin not in ORIGINS:
        raise bad_request("origin must be start or end")
    return StreamQuery(offset=_non_negative(req, "offset"), origin=origin,
                       follow=query_bool(req.query, "follow", follow_default),
                       plain=query_bool(req.query, "plain"))


def _read_piece(fd: int, offset: int, want: int, file: str, plain: bool
                ) -> tuple[bytes, int, os.stat_result | None]:
    """(payload, bytes read, None) for the data at ``offset``; at the end of the file,
    (b"", 0, its fstat) so the caller can tell growth, truncation and deletion apart."""
    # The kernel refuses a read whose end would pass the largest file offset (EINVAL);
    # no file reaches it, so that is simply the end.
    want = min(want, MAX_INT64 - offset)
    chunk = os.pread(fd, want, offset) if want > 0 else b""
    if not chunk:
        return b"", 0, os.fstat(fd)
    payload = chunk if plain else encode_frame(file, offset + len(chunk), chunk)
    return payload, len(chunk), None


class FrameStream:
    """One streamed response: its writes, its heartbeats and whether the client is gone."""

    def __init__(self, raw: web.BaseRequest, plain: bool) -> None:
        self.raw = raw
        self.plain = plain
        self.lost = asyncio.Event()
        self.response = web.StreamResponse()
        self.response.content_type = "text/plain" if plain else "application/json"
        self._last_write = 0.0

    async def start(self) -> None:
        await self.response.prepare(self.raw)
        self._last_write = asyncio.get_running_loop().time()

    async def write(self, payload: bytes) -> None:
        await self.response.write(payload)  # waits while the client is behind
        self._last_write = asyncio.get_running_loop().time()

    async def event(self, file: str, offset: int, event: str) -> None:
        if not self.plain:
            await self.write(encode_frame(file, offset, b"", event))

    async def idle(self) -> None:
        """Wait a poll interval (less if the client goes); keep a framed stream alive."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_INTERVAL):
                await self.lost.wait()
        loop = asyncio.get_running_loop()
        if (not self.plain and not self.lost.is_set()
                and loop.time() - self._last_write >= HEARTBEAT_INTERVAL):
            await self.write(HEARTBEAT)


# At the end of a followed file: whether nothing more will come (checked once more after
# saying so, so data written just before the end is still sent).
Finished = Callable[[], Awaitable[bool]]


async def _never() -> bool:
    return False


async def pump_file(stream: FrameStream, source: StreamedFile, offset: int, *,
                    follow: bool, limit: int | None = None,
                    finished: Finished = _never) -> None:
    """Send ``source`` from ``offset``: to its end, ``limit`` bytes, or (``follow``) as it
    grows until the client goes, the file is deleted or ``finished`` says so."""
    file = source.opened.rel
    left = limit
    ending = False
    while not stream.lost.is_set():
        want = LOG_FRAME_BYTES if left is None else min(LOG_FRAME_BYTES, left)
        if want <= 0:
            return
        payload, size, st = await source.read(asyncio.to_thread(
            _read_piece, source.opened.fd, offset, want, file, stream.plain))
        if size:
            offset += size
            left = None if left is None else left - size
            await stream.write(payload)
            continue
        if not follow or ending:
            return
        assert st is not None
        if st.st_nlink == 0:
            await stream.event(file, offset, FILE_DELETED)
            return
        if st.st_size < offset:
            offset = 0
            await stream.event(file, offset, FILE_TRUNCATED)
            continue
        if await finished():
            ending = True  # one more read: what came before the end
            continue
        await stream.idle()


async def _serve(stream: FrameStream, what: str, send: Callable[[], Awaitable[None]]
                 ) -> web.StreamResponse:
    """Start ``stream`` and run ``send``; after the headers a failure can only cut the
    connection short."""
    forget = when_lost(stream.raw, stream.lost.set)
    try:
        await stream.start()
        await send()
    except ConnectionError:
        pass  # the client hung up: no one to tell
    except Exception as err:  # after the headers, only the connection can say so
        end_early(stream.raw, what, err)
    finally:
        forget()
    return stream.response


def _start_offset(size: int, query: StreamQuery) -> int:
    if query.origin == "end":
        return max(size - query.offset, 0)
    return min(query.offset, size)


async def fs_stream(services: Services, req: ApiRequest) -> web.StreamResponse:
    query = parse_stream_query(req, follow_default=True)
    opened = await open_to_stream(services, req)
    source = StreamedFile(opened)
    stream = FrameStream(req.raw, query.plain)
    try:
        return await _serve(stream, f"stream of {opened.rel!r}", lambda: pump_file(
            stream, source, _start_offset(opened.st.st_size, query), follow=query.follow))
    finally:
        source.close()


async def fs_readat(services: Services, req: ApiRequest) -> web.StreamResponse:
    offset = _non_negative(req, "offset")
    limit = _non_negative(req, "limit") or None  # 0 or none: to the end
    opened = await open_to_stream(services, req)
    source = StreamedFile(opened)
    stream = FrameStream(req.raw, plain=True)
    stream.response.content_type = "application/octet-stream"
    try:
        return await _serve(stream, f"read of {opened.rel!r}", lambda: pump_file(
            stream, source, offset, follow=False, limit=limit))
    finally:
        source.close()


# ---- logs ------------------------------------------------------------------------------
def _log_start(adir: AllocDir, names: list[str], query: StreamQuery) -> tuple[int, int]:
    """(index into ``names``, offset in that file) where ``origin``/``offset`` point, the
    offset counted across the files (from the end: a tail of all of them)."""
    sizes = []
    for name in names:
        opened = open_log_file(adir, name)
        sizes.append(0 if opened is None else opened.st.st_size)
        if opened is not None:
            opened.close()
    left = query.offset
    order = range(len(names) - 1, -1, -1) if query.origin == "end" else range(len(names))
    for index in order:
        if left <= sizes[index]:
            return index, sizes[index] - left if query.origin == "end" else left
        left -= sizes[index]
    return (0, 0) if query.origin == "end" else (len(names) - 1, sizes[-1])


def _log_index(name: str) -> int:
    """``web.stdout.3`` -> 3 (names come from ``log_file_names``: the suffix is digits)."""
    return int(name.rsplit(".", 1)[1])


def task_finished(services: Services, alloc_id: str, task: str) -> bool:
    """Whether the task will write no more logs: dead, or its allocation forgotten."""
    alloc = services.allocation(alloc_id)
    if alloc is None:
        return True
    state = alloc.task_states.get(task)
    return (state is not None and state.state == TASK_DEAD) or alloc.client_terminal()


class _LogFollower:
    """Sends a task's log files in index order from a start point, moving to the next file
    once it exists and the current one is read, following the last while the task lives."""

    def __init__(self, services: Services, req: ApiRequest, adir: AllocDir, task: str,
                 kind: str, stream: FrameStream, follow: bool) -> None:
        self._services = services
        self._alloc_id = req.params["alloc_id"]
        self._adir = adir
        self._task = task
        self._kind = kind
        self._stream = stream
        self._follow = follow
        self._current = ""

    async def run(self, names: list[str], index: int, offset: int) -> None:
        name: str | None = names[index]
        while name is not None and not self._stream.lost.is_set():
            self._current = name
            opened = await open_for_stream(open_log_file, self._adir, name)
            if opened is not None:
                source = StreamedFile(opened)
                try:
                    await pump_file(self._stream, source, offset, follow=self._follow,
                                    finished=self._file_done)
                finally:
                    source.close()
            offset = 0
            name = await self._next_name(name)

    async def _later_names(self, current: str) -> list[str]:
        """The log files after ``current`` in index order (``current`` may be gone: a
        rotation removed it)."""
        names = await in_thread(log_file_names, self._adir, self._task, self._kind)
        return [name for name in names if _log_index(name) > _log_index(current)]

    async def _next_name(self, current: str) -> str | None:
        later = await self._later_names(current)
        return later[0] if later else None

    async def _file_done(self) -> bool:
        """At the end of the current file: done if a later file exists or the task ended."""
        if await self._later_names(self._current):
            return True
        return task_finished(self._services, self._alloc_id, self._task)


async def stream_logs(services: Services, req: ApiRequest) -> web.StreamResponse:
    """A task's logs: the plain read from the start in ``client.fs_logs``; a tail, an
    offset or following here."""
    query = parse_stream_query(req, follow_default=False)
    if not query.follow and query.origin == "start" and not query.offset:
        return await fs_logs(services, req)
    adir, task, kind = logs_request(services, req)
    names = await log_names(adir, task, kind)
    index, offset = await in_thread(_log_start, adir, names, query)
    stream = FrameStream(req.raw, query.plain)
    follower = _LogFollower(services, req, adir, task, kind, stream, query.follow)
    return await _serve(stream, "log stream", lambda: follower.run(names, index, offset))


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/client/fs/readat/{alloc_id}", fs_readat, READ_FS)
    routes.add(("GET",), "/v1/client/fs/stream/{alloc_id}", fs_stream, READ_FS)
    routes.add(("GET",), "/v1/client/fs/logs/{alloc_id}", stream_logs, READ_LOGS)
