"""Client-local endpoints: /v1/client/metadata, /v1/client/fs/{ls,stat,cat,logs}/:alloc,
/v1/client/allocation/:alloc/{restart,signal,stats} (this node's allocations only: another
is a 404) and /v1/client/stats (the host's resource usage).

Every file is opened with ``AllocDir.open_path`` (the one home of path confinement, which
never follows a symlink) and then served from that descriptor, never re-opened by name:
tasks can rewrite most of the alloc dir while a request runs. All file work, including the
encoding of log frames, runs in a worker thread so the event loop never blocks on it.

``cat`` and ``logs`` stream: a request holds one bounded piece of a file at a time and
waits for the client to take it before reading the next. A refusal found before the
response starts is a plain 4xx; a failure after that closes the connection, so the client
sees a truncated body rather than a complete-looking one.

Following, tails and offsets (``fs/stream``, ``fs/readat``, ``fs/logs?follow=``) are in
``fs_stream.py``, which registers the logs route and hands a plain read back to ``fs_logs``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import mimetypes
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiofiles
from aiohttp import web

from nomad_client.allocrunner.alloc_runner import UnknownAllocation
from nomad_client.allocrunner.taskrunner.task_runner import ControlRefused
from nomad_client.client.allocdir import (
    AllocDir,
    AllocPathError,
    HardLinkError,
    OpenedPath,
    PathEscapeError,
    PathNotFoundError,
    SecretReadError,
    SymlinkError,
)
from nomad_client.client.nodemeta import MetaLimitError, meta_key_problem, shown_key
from nomad_client.http.auth import ALL_NAMESPACES, Need, require
from nomad_client.http.bodyfields import object_fields, string_field
from nomad_client.http.endpoints.allocs import ALLOC_LIFECYCLE
from nomad_client.http.endpoints.jobs import READ_JOB
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request, found_or_404, not_found
from nomad_client.http.jsonbody import BadJSONBody, decode_json_body
from nomad_client.http.query import query_bool
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import LocalClient, Services
from nomad_client.structs.models import rfc3339

log = logging.getLogger(__name__)

# A streamed file is read this much at a time; the next read waits until the client has
# taken the previous piece, so this (plus the transport's small buffer) is all a request holds.
STREAM_CHUNK_BYTES = 128 * 1024
# Log reads stop after this many bytes in total (files in index order): a task decides how
# many log files there are and how large (sparse) they look.
MAX_LOG_BYTES = 16 * 1024 * 1024
# Largest data payload of one log frame, as Nomad's.
LOG_FRAME_BYTES = 64 * 1024
T = TypeVar("T")

READ_FS = Need.namespace("read-fs")
READ_LOGS = Need.namespace("read-logs", "read-fs")


def validate_meta_update(body: Any) -> dict[str, str | None]:
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    unknown = sorted(set(body) - {"Meta", "NodeID"})
    if unknown:
        raise bad_request(f"Unknown field(s) in request body: {', '.join(unknown)}")
    meta = body.get("Meta")
    if not meta or not isinstance(meta, dict):
        raise bad_request("missing required Meta object")
    for key, value in meta.items():
        problem = meta_key_problem(key)
        if problem:
            raise bad_request(problem)
        if value is not None and not isinstance(value, str):
            raise bad_request(f"metadata value for {shown_key(key)} must be a string or null")
    return meta


def _file_info(name: str, st: os.stat_result) -> dict[str, Any]:
    return {"Name": name, "IsDir": stat.S_ISDIR(st.st_mode), "Size": st.st_size,
            "FileMode": stat.filemode(st.st_mode), "ModTime": rfc3339(st.st_mtime)}


def _ls(adir: AllocDir, rel: str) -> list[dict[str, Any]]:
    with adir.open_path(rel, want="dir") as opened:
        found = []
        with os.scandir(opened.fd) as entries:
            for entry in entries:
                try:
                    # lstat semantics: a symlink shows as a link and is never followed.
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the directory was read: just not listed
                found.append(_file_info(entry.name, st))
    return sorted(found, key=lambda info: info["Name"])


def _stat(adir: AllocDir, rel: str) -> dict[str, Any]:
    with adir.open_path(rel, want="any") as opened:
        info = _file_info(opened.name, opened.st)
    if info["IsDir"]:
        info["ContentType"] = "application/octet-stream"
    else:
        info["ContentType"] = mimetypes.guess_type(opened.name)[0] or "application/octet-stream"
    return info


def log_file_names(adir: AllocDir, task: str, kind: str) -> list[str]:
    """The names of ``task``'s log files of ``kind`` (``<task>.<kind>.<n>``) in index order,
    read from ``alloc/logs`` without following links (blocking: run it in a worker thread).
    """
    pattern = re.compile(rf"\A{re.escape(task)}\.{kind}\.([0-9]+)\Z")  # `$`: "...0\n" too
    with adir.open_path("alloc/logs", want="dir", for_read=True) as logs, \
            os.scandir(logs.fd) as entries:
        found = [(int(m.group(1)), e.name) for e in entries if (m := pattern.match(e.name))]
    return [name for _, name in sorted(found)]


def open_file(adir: AllocDir, rel: str) -> OpenedPath:
    return adir.open_path(rel, want="file", for_read=True)


def open_log_file(adir: AllocDir, name: str) -> OpenedPath | None:
    try:
        return adir.open_path(f"alloc/logs/{name}", want="file", for_read=True)
    except PathNotFoundError:
        return None  # rotated away since the listing


def _close_unclaimed(done: asyncio.Future[Any]) -> None:
    """Close what an open finished with after the request that wanted it was cancelled."""
    if done.cancelled() or done.exception() is not None:
        return
    opened = done.result()
    if isinstance(opened, OpenedPath):
        opened.close()


class StreamedFile:
    """The descriptor a response streams from, and the one read of it that may be running.

    Reads run in worker threads, which a cancelled request (agent shutdown) cannot stop:
    ``close`` then leaves the descriptor open until that read ends, so the read never
    lands on a number that already names some other file.
    """

    def __init__(self, opened: OpenedPath) -> None:
        self.opened = opened
        self._reading: asyncio.Future[Any] | None = None

    async def read(self, op: Awaitable[T]) -> T:
        """Await ``op``, one read of the descriptor, tracked so ``close`` can wait for it."""
        self._reading = asyncio.ensure_future(op)
        return await asyncio.shield(self._reading)

    def close(self) -> None:
        # Closing a read-only descriptor does no I/O: fine on the loop.
        if self._reading is None or self._reading.done():
            self.opened.close()
        else:
            self._reading.add_done_callback(self._close_after_read)

    def _close_after_read(self, done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()  # nobody is left to want it
        self.opened.close()


class _Truncated(Exception):
    """A file ended before the length already promised to the client."""


def end_early(raw: web.BaseRequest, what: str, err: BaseException) -> None:
    """The response has started: close the connection so the body reads as cut short."""
    log.warning("%s ended early: %s", what, err)
    transport = raw.transport
    if transport is not None:
        transport.close()


async def _stream_cat(raw: web.BaseRequest, opened: OpenedPath) -> web.StreamResponse:
    """Send the file as long as it was when opened (``Content-Length``), piece by piece.

    No size cap, as in Nomad: a streamed body costs the agent no memory, and the client
    paces the transfer and can hang up at any time (a huge sparse file included).
    """
    resp = web.StreamResponse()
    resp.content_type = "application/octet-stream"
    resp.content_length = left = opened.st.st_size
    source = StreamedFile(opened)
    try:
        await resp.prepare(raw)
        # The descriptor that was checked, never the name; closefd=False: ``source`` owns it.
        file = await aiofiles.open(opened.fd, "rb", buffering=0, closefd=False)
        while left > 0:
            chunk = await source.read(file.read(min(STREAM_CHUNK_BYTES, left)))
            if not chunk:
                raise _Truncated("the file shrank while being sent")
            left -= len(chunk)
            await resp.write(chunk)  # waits while the client is behind
    except ConnectionError:
        pass  # the client hung up: no one to tell
    except Exception as err:  # after the headers, only the connection can say so
        end_early(raw, f"cat of {opened.rel!r}", err)
    finally:
        source.close()
    return resp


def encode_frame(file: str, offset: int, data: bytes, event: str = "") -> bytes:
    """Nomad's ``StreamFrame`` as JSON: ``Offset`` is the file offset just past ``data``
    (as Nomad's); ``FileEvent`` (``file truncated``, ``file deleted``) only when there is one.
    """
    frame: dict[str, Any] = {"Offset": offset, "Data": base64.b64encode(data).decode(),
                             "File": file}
    if event:
        frame["FileEvent"] = event
    return json.dumps(frame).encode()


def _log_piece(fd: int, want: int, offset: int, file: str, plain: bool) -> tuple[bytes, int]:
    """Read the next piece of a log and encode it for sending: (payload, bytes read).

    Frames carry at most ``LOG_FRAME_BYTES`` of data.
    """
    chunk = os.read(fd, want)
    if plain or not chunk:
        return chunk, len(chunk)
    return encode_frame(file, offset + len(chunk), chunk), len(chunk)


async def _send_log(resp: web.StreamResponse, source: StreamedFile, left: int,
                    plain: bool) -> int:
    """Send one log file, at most ``left`` bytes of it; return how many may still follow."""
    offset = 0
    while left > 0:
        # One worker-thread hop reads *and* frames a piece (rather than aiofiles for the
        # read and another hop for the base64 and JSON work, which must stay off the loop).
        payload, size = await source.read(asyncio.to_thread(
            _log_piece, source.opened.fd, min(LOG_FRAME_BYTES, left), offset,
            source.opened.rel, plain))
        if not size:
            break
        offset += size
        left -= size
        await resp.write(payload)
    return left


async def _stream_logs(raw: web.BaseRequest, first: OpenedPath, rest: list[str],
                       open_next: Callable[[str], Awaitable[OpenedPath | None]],
                       plain: bool) -> web.StreamResponse:
    """Send ``first`` then the ``rest`` of a task's logs in order, each as it is read, at
    most ``MAX_LOG_BYTES`` of file data in all (a task decides how many log files there
    are and how large, or sparse, they look)."""
    resp = web.StreamResponse()
    resp.content_type = "text/plain" if plain else "application/json"
    source: StreamedFile | None = StreamedFile(first)
    pending = iter(rest)
    left = MAX_LOG_BYTES
    try:
        await resp.prepare(raw)
        while source is not None and left > 0:
            left = await _send_log(resp, source, left, plain)
            source.close()
            source = None
            for name in pending:
                if (opened := await open_next(name)) is not None:
                    source = StreamedFile(opened)
                    break
    except ConnectionError:
        pass  # the client hung up: no one to tell
    except Exception as err:  # after the headers, only the connection can say so
        end_early(raw, "log read", err)
    finally:
        if source is not None:
            source.close()
    return resp


def _local_client(services: Services) -> LocalClient:
    if services.client is None:
        raise bad_request("No local Node and node_id not provided")
    return services.client


def _check_node(services: Services, req: ApiRequest, body_node: str = "") -> LocalClient:
    client = _local_client(services)
    node_id = req.query.get("node_id") or body_node
    if node_id and node_id != client.node_id:
        raise not_found(f"No path to node {node_id}")
    return client


async def read_metadata(services: Services, req: ApiRequest) -> Any:
    return _check_node(services, req).metadata()


async def apply_metadata(services: Services, req: ApiRequest) -> Any:
    body = await req.json()
    meta = validate_meta_update(body)
    client = _check_node(services, req, str(body.get("NodeID") or ""))
    try:
        return await client.apply_metadata(meta)
    except MetaLimitError as err:
        raise bad_request(str(err)) from None


def _local_alloc(services: Services, req: ApiRequest, need: Need
                 ) -> tuple[LocalClient, str, AllocDir]:
    """The local client, the ID of the allocation the path names and its directory, if
    this client has it (else 404) and the caller meets ``need`` in its namespace."""
    alloc_id = req.params.get("alloc_id", "")
    if not alloc_id:
        raise bad_request("must provide a valid alloc id")
    client = _local_client(services)
    adir = found_or_404(client.alloc_dir_for(alloc_id), f"Unknown allocation {alloc_id!r}")
    alloc = services.allocation(alloc_id)
    # What is left of an allocation the server has forgotten has no namespace to check in:
    # it counts as in every namespace, which only an allow-all caller may read.
    require(req, ALL_NAMESPACES if alloc is None else alloc.namespace, need)
    return client, alloc_id, adir


def checked_alloc_dir(services: Services, req: ApiRequest, need: Need) -> AllocDir:
    """The allocation's directory, if the caller meets ``need`` in its namespace."""
    return _local_alloc(services, req, need)[2]


def fs_path(req: ApiRequest, *, required: bool) -> str:
    rel = req.query.get("path", "")
    if required and not rel:
        raise bad_request("must provide a file name")
    return rel or "/"


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run file work in a worker thread; every refusal becomes a plain 4xx."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except SecretReadError as err:
        raise HTTPError(403, f"Reading secret file prohibited: {err}") from None
    except SymlinkError as err:
        raise HTTPError(403, str(err)) from None
    except HardLinkError as err:
        raise HTTPError(403, str(err)) from None
    except PathEscapeError as err:
        raise HTTPError(403, f"Path escapes the alloc directory: {err}") from None
    except PathNotFoundError as err:
        raise not_found(str(err)) from None
    except AllocPathError as err:
        raise bad_request(str(err)) from None
    except FileNotFoundError:
        raise not_found("no such file or directory") from None
    except OSError as err:
        raise bad_request(f"cannot access file: {err.strerror or err}") from None


async def open_for_stream(fn: Callable[..., T], *args: Any) -> T:
    """Open in a worker thread (refusals are 4xx); should the request be cancelled
    meanwhile, the descriptor is closed once the open finishes instead of leaking."""
    opening = asyncio.ensure_future(in_thread(fn, *args))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_unclaimed)
        raise


async def fs_ls(services: Services, req: ApiRequest) -> Any:
    return await in_thread(_ls, checked_alloc_dir(services, req, READ_FS),
                            fs_path(req, required=False))


async def fs_stat(services: Services, req: ApiRequest) -> Any:
    return await in_thread(_stat, checked_alloc_dir(services, req, READ_FS),
                            fs_path(req, required=True))


async def open_to_stream(services: Services, req: ApiRequest) -> OpenedPath:
    """The file ``?path`` names, opened for cat, readat or stream. Nomad answers these (its
    ``FileSystem.Stream``) with 400 for a file it cannot find, ls and stat with 404; clients
    such as python-nomad rely on the difference."""
    adir = checked_alloc_dir(services, req, READ_FS)
    rel = fs_path(req, required=True)
    try:
        return await open_for_stream(open_file, adir, rel)
    except HTTPError as err:
        if err.status == 404:  # the allocation was found above: the file is what is missing
            raise bad_request(err.message) from None
        raise


async def fs_cat(services: Services, req: ApiRequest) -> web.StreamResponse:
    return await _stream_cat(req.raw, await open_to_stream(services, req))


def logs_request(services: Services, req: ApiRequest) -> tuple[AllocDir, str, str]:
    """The checked ``task`` and ``type`` of a logs request, and the alloc dir they are in."""
    task = req.query.get("task", "")
    kind = req.query.get("type", "")
    if not task:
        raise bad_request("must provide task name")
    if kind not in ("stdout", "stderr"):
        raise bad_request("must provide log type (stdout/stderr)")
    adir = checked_alloc_dir(services, req, READ_LOGS)
    alloc = services.allocation(req.params["alloc_id"])
    if alloc is not None and task not in {t["Name"] for g in alloc.job["TaskGroups"]
                                          if g["Name"] == alloc.task_group
                                          for t in g["Tasks"]}:
        raise bad_request(f"unknown task name {task!r}")
    return adir, task, kind


async def log_names(adir: AllocDir, task: str, kind: str) -> list[str]:
    """The task's log files of ``kind`` in index order; none yet is a 404."""
    names = await in_thread(log_file_names, adir, task, kind)
    if not names:
        raise not_found(f"task {task!r} not started yet. No logs available")
    return names


async def fs_logs(services: Services, req: ApiRequest) -> web.StreamResponse:
    """The logs as they are now, from the start (``fs_stream.stream_logs`` does the rest)."""
    adir, task, kind = logs_request(services, req)
    plain = query_bool(req.query, "plain")
    names = await log_names(adir, task, kind)

    async def open_log(name: str) -> OpenedPath | None:
        return await open_for_stream(open_log_file, adir, name)

    # The first log file is opened before the response starts, so refusing it (a
    # symlink, a FIFO) is still a plain 4xx; later files can only cut the stream short.
    for index, name in enumerate(names):
        if (first := await open_log(name)) is not None:
            return await _stream_logs(req.raw, first, names[index + 1:], open_log, plain)
    # Every file rotated away since the listing.
    return web.Response(body=b"", content_type="text/plain" if plain else "application/json")


# ---- allocation control and resource usage ---------------------------------------------
RESTART_FIELDS = ("TaskName", "AllTasks")
SIGNAL_FIELDS = ("Task", "Signal")
# Nomad answers both with an index of 0: nothing on the servers changed.
CONTROL_REPLY = {"Index": 0}


@contextlib.contextmanager
def _control_refusals() -> Iterator[None]:
    """A request the client cannot carry out is the caller's 400; an allocation it no
    longer runs (gone since the request was checked) a 404."""
    try:
        yield
    except UnknownAllocation as err:
        raise not_found(str(err.args[0])) from None
    except ControlRefused as err:
        raise bad_request(str(err)) from None


async def _optional_body(req: ApiRequest) -> Any:
    """The JSON body; an empty body is an empty object."""
    data = await req.body()
    if not data.strip():
        return {}
    try:
        return decode_json_body(data)
    except BadJSONBody as err:
        raise bad_request(str(err)) from None


async def restart_alloc(services: Services, req: ApiRequest) -> Any:
    client, alloc_id, _ = _local_alloc(services, req, ALLOC_LIFECYCLE)
    fields = object_fields(await _optional_body(req), RESTART_FIELDS)
    task = string_field(fields, "TaskName")
    all_tasks = fields.get("AllTasks", False)
    if not isinstance(all_tasks, bool):
        raise bad_request("AllTasks must be a boolean")
    with _control_refusals():
        await client.restart_alloc(alloc_id, task or None, all_tasks)
    return dict(CONTROL_REPLY)


async def signal_alloc(services: Services, req: ApiRequest) -> Any:
    client, alloc_id, _ = _local_alloc(services, req, ALLOC_LIFECYCLE)
    fields = object_fields(await req.json(), SIGNAL_FIELDS)
    signal = string_field(fields, "Signal")
    if not signal:
        raise bad_request("Signal must be given (e.g. \"SIGUSR1\")")
    task = string_field(fields, "Task")
    with _control_refusals():
        await client.signal_alloc(alloc_id, signal, task or None)
    return dict(CONTROL_REPLY)


async def alloc_stats(services: Services, req: ApiRequest) -> Any:
    client, alloc_id, _ = _local_alloc(services, req, READ_JOB)
    with _control_refusals():
        return await client.alloc_stats(alloc_id, req.query.get("task") or None)


async def host_stats(services: Services, req: ApiRequest) -> Any:
    return await _check_node(services, req).host_stats()


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/client/metadata", read_metadata, Need.node_read)
    routes.add(("POST",), "/v1/client/metadata", apply_metadata, Need.node_write)
    routes.add(("GET",), "/v1/client/fs/ls/{alloc_id}", fs_ls, READ_FS)
    routes.add(("GET",), "/v1/client/fs/stat/{alloc_id}", fs_stat, READ_FS)
    routes.add(("GET",), "/v1/client/fs/cat/{alloc_id}", fs_cat, READ_FS)
    routes.add(("PUT", "POST"), "/v1/client/allocation/{alloc_id}/restart", restart_alloc,
               ALLOC_LIFECYCLE)
    routes.add(("PUT", "POST"), "/v1/client/allocation/{alloc_id}/signal", signal_alloc,
               ALLOC_LIFECYCLE)
    routes.add(("GET",), "/v1/client/allocation/{alloc_id}/stats", alloc_stats, READ_JOB)
    routes.add(("GET",), "/v1/client/stats", host_stats, Need.node_read)
