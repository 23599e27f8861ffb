"""The Task API audit log: one JSON line per request over a task's socket
(``client { task_api { audit { enabled, path, max_size, max_files } } }``).

A line: ``time`` (RFC 3339, UTC), ``node``, ``namespace``, ``job``, ``alloc``, ``task``,
``method``, ``path`` (without the query string), ``status``, ``latency_ms``, ``identity``
(``kind`` token | workload | none, and ``id``: an ACL token's AccessorID or an identity's
subject, never a secret), ``peer`` (``pid``, ``uid``, ``gid``, or null) and, for a request
refused by an endpoint rule, the rate limit, the peer check or the identity binding,
``reason``. Secret-shaped text in the path is redacted like the agent's log.

The request path only encodes the line and appends it to a buffer. One background task owned
by the log hands full buffers to a worker thread, which appends them to the file (0600, in a
directory made 0700) and rotates it by size: ``path``, ``path.1`` ... ``path.<max_files-1>``.
Memory stays bounded when the disk is slow: past ``MAX_PENDING_BYTES`` lines are dropped and
counted, and the count is logged once when the writer catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from pathlib import Path

import attrs

from nomad_client.http.context import Identity
from nomad_client.logredact import redact

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 4 * 1024 * 1024
# Lines wait this long to be written with others: one write per interval under load, rather
# than a thread hand-off per request.
FLUSH_INTERVAL = 0.05
FILE_MODE = 0o600
DIR_MODE = 0o700
# ASCII output: whatever a path decoded to (lone surrogates included) encodes.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_string = json.encoder.encode_basestring_ascii  # a JSON string literal, in C


@attrs.frozen
class AuditSettings:
    """Where and how big; a change of any of them reopens the log."""

    path: Path
    max_size: int
    max_files: int


def identity_fields(identity: Identity | None) -> tuple[str, str]:
    """``identity`` as an audit line names it (kind, id): never its secret."""
    if identity is not None:
        if identity.token is not None:
            return "token", identity.token.accessor_id
        if identity.claims is not None:
            return "workload", identity.claims.subject
    return "none", ""


_second_cache: tuple[int, str] = (-1, "")


def rfc3339(epoch: float) -> str:
    global _second_cache
    seconds = int(epoch)
    cached, prefix = _second_cache
    if cached != seconds:  # formatted once a second, not once a line
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second_cache = (seconds, prefix)
    return f"{prefix}.{int((epoch - seconds) * 1_000_000):06d}Z"


class AuditLog:
    """An open audit log. ``open`` it, ``record`` lines, ``close`` it (flushes)."""

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.dropped = 0  # lines dropped since the last report
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # The write in a worker thread, if one is running: close waits for it, because a
        # cancelled ``to_thread`` leaves its thread running.
        self._inflight: asyncio.Future[None] | None = None
        self._fd = -1
        self._size = 0
        self._closed = False

    async def open(self) -> None:
        await asyncio.to_thread(self._open_file)
        self._writer = asyncio.create_task(self._write_loop(), name="task-api-audit")

    def record(self, data: bytes) -> None:
        """Queue one line (``audit_line``); never blocks, never raises for a full buffer
        (it drops)."""
        if self._closed:
            return
        if self._pending_bytes + len(data) > MAX_PENDING_BYTES:
            self.dropped += 1
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if not self._wake.is_set():
            self._wake.set()

    async def close(self) -> None:
        """Stop the writer (cancelled and awaited), write what is queued, close the file."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if self._inflight is not None:
            with contextlib.suppress(OSError):  # the writer would have logged it
                await self._inflight
        try:
            await self._flush()
        finally:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                await asyncio.to_thread(os.close, fd)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_INTERVAL)
            self._wake.clear()
            try:
                await self._flush()
            except OSError as err:
                log.warning("Task API audit log %s: write failed: %s", self.settings.path, err)

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if self.dropped:
            log.warning("Task API audit log %s: dropped %d lines (the disk was slower than "
                        "the requests)", self.settings.path, self.dropped)
            self.dropped = 0
        self._inflight = asyncio.ensure_future(asyncio.to_thread(self._write, batch))
        try:
            # Shielded: cancelling the writer must not cut a write short (the thread would
            # run on while close starts another).
            await asyncio.shield(self._inflight)
        finally:
            if self._inflight.done():
                self._inflight = None

    # ---- file work (worker thread) -------------------------------------------------------
    def _open_file(self) -> None:
        path = self.settings.path
        directory = path.parent
        if not directory.exists():
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(directory, DIR_MODE)  # whatever the umask left
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # an existing file keeps no wider mode
            self._size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _write(self, batch: list[bytes]) -> None:
        if self._fd < 0:  # a failed rotation left no file open: try again
            self._open_file()
        # One write per file: the lines up to where the next would pass max_size.
        chunk: list[bytes] = []
        size = self._size
        for data in batch:
            if size and size + len(data) > self.settings.max_size:
                self._append(chunk)
                chunk = []
                self._rotate()
                size = self._size
            chunk.append(data)
            size += len(data)
        self._append(chunk)

    def _append(self, chunk: list[bytes]) -> None:
        data = b"".join(chunk)
        _write_all(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        path, keep = self.settings.path, self.settings.max_files
        os.close(self._fd)
        self._fd = -1
        # path.<keep-2> -> path.<keep-1>, ..., path -> path.1; with keep == 1 the old file goes.
        if keep <= 1:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for index in range(keep - 1, 0, -1):
            older = path if index == 1 else path.with_name(f"{path.name}.{index - 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(older, path.with_name(f"{path.name}.{index}"))
        self._open_file()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def socket_fields(*, node: str, namespace: str | None, job: str | None, alloc: str | None,
                  task: str | None) -> str:
    """The fields every line of one task's socket shares, encoded once (JSON members)."""
    return _encode({"node": node, "namespace": namespace or "", "job": job or "",
                    "alloc": alloc or "", "task": task or ""})[1:-1]


def audit_line(*, socket: str, method: str, path: str, status: int, latency: float,
               identity: Identity | None, peer: tuple[int, int, int] | None,
               reason: str | None) -> bytes:
    """One request's line: ``socket`` from ``socket_fields``, ``latency`` in seconds,
    ``peer`` as (pid, uid, gid). Built by hand from JSON-encoded parts (the request path
    pays for it); ``tests/unit/test_audit_log.py`` parses every kind of line."""
    kind, ident = identity_fields(identity)
    tail = "}\n" if reason is None else f',"reason":{_string(reason)}}}\n'
    return (f'{{"time":"{rfc3339(time.time())}",{socket},"method":{_string(method)},'
            f'"path":{_string(redact(path))},"status":{status:d},'
            f'"latency_ms":{latency * 1000:.3f},'
            f'"identity":{{"kind":"{kind}","id":{_string(ident)}}},"peer":{_peer_json(peer)}'
            + tail).encode()


@functools.lru_cache(maxsize=1024)
def _peer_json(peer: tuple[int, int, int] | None) -> str:
    # A connection's peer is the same on every line it gets.
    if peer is None:
        return "null"
    return f'{{"pid":{peer[0]:d},"uid":{peer[1]:d},"gid":{peer[2]:d}}}'
