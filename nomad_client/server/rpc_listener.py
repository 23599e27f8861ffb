"""The server's RPC listener: clients' calls over TCP (optionally mutual TLS).

Each connection carries many requests at once: every request runs as its own task (a
five-minute long poll must not hold up a heartbeat behind it), at most ``max_in_flight`` per
connection (then the listener stops reading from it until one finishes), each under the
deadline the caller sent. Replies are written as requests complete.

A peer breaking the protocol (wrong handshake byte, hostile length, undecodable frame, a
request nobody can be answered for) loses its connection, and only its connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

from nomad_client.rpcwire import errors
from nomad_client.rpcwire.errors import RPCError, UnknownMethod, error_to_wire
from nomad_client.rpcwire.framing import (
    HANDSHAKE,
    MAX_FRAME,
    FrameError,
    MalformedRequest,
    Reply,
    Request,
    close_writer,
    encode_frame,
    parse_request,
    read_frame,
)

log = logging.getLogger(__name__)

Dispatch = Callable[[str, dict[str, Any]], Awaitable[Any]]
S = TypeVar("S")

# A request without a Timeout gets this; no request gets more than MAX_TIMEOUT (the longest
# long poll plus its margin).
DEFAULT_TIMEOUT: Final = 30.0
MAX_TIMEOUT: Final = 15 * 60.0
# A connection must send its handshake byte this soon (TLS handshake included).
HANDSHAKE_TIMEOUT: Final = 10.0


def handlers_dispatch(handlers: Mapping[str, Callable[[S, dict[str, Any]], Awaitable[Any]]],
                      target: S) -> Dispatch:
    """A ``dispatch`` for ``RPCListener`` calling ``handlers[method](target, args)``."""
    async def dispatch(method: str, args: dict[str, Any]) -> Any:
        handler = handlers.get(method)
        if handler is None:
            raise UnknownMethod(f"unknown RPC method {method!r}")
        return await handler(target, args)
    return dispatch


def _is_local(peer: Any) -> bool:
    if not isinstance(peer, tuple):  # a Unix socket's peer: this machine
        return True
    try:
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class _WarnLimiter:
    """At most one warning a second: a peer hammering the listener with garbage must not
    flood the log (the count of those held back goes with the next one)."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._last = -interval
        self._held = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        suffix = f" ({held} similar warnings held back)" if held else ""
        log.warning(message + suffix, *args)


class RPCListener:
    def __init__(self, dispatch: Dispatch, sock: socket.socket, *,
                 ssl_context: ssl.SSLContext | None = None,
                 allow_plaintext_remote: bool = False, max_in_flight: int = 64,
                 max_frame: int = MAX_FRAME) -> None:
        """``sock`` is bound (listening or not); the listener owns it from ``start``."""
        self._dispatch = dispatch
        self._sock = sock
        self._ssl = ssl_context
        self._allow_plaintext_remote = allow_plaintext_remote
        self._max_in_flight = max_in_flight
        self._max_frame = max_frame
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._warnings = _WarnLimiter()
        self._closing = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, sock=self._sock, ssl=self._ssl,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self._ssl else None)

    async def close(self) -> None:
        """Stop accepting, cancel requests in flight, close every connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()  # never started: the socket is still ours to close
        for task in list(self._connections):
            task.cancel()
        while self._connections:
            await asyncio.gather(*list(self._connections), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # close() cancelled it: a normal end (asyncio reports a cancelled connection
            # task as an error). Any other cancellation goes on.
            if not self._closing:
                raise
        finally:
            self._connections.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if self._closing:
                return
            if self._ssl is None and not self._allow_plaintext_remote and not _is_local(peer):
                self._warnings.warn("RPC: refused plaintext connection from non-loopback %s "
                                    "(configure tls, or allow plaintext RPC from remote "
                                    "peers explicitly)", peer)
                return
            await _Connection(self, reader, writer, peer).serve()
        except Exception:
            log.exception("RPC: connection from %s failed", peer)
        finally:
            await close_writer(writer)


class _Connection:
    def __init__(self, listener: RPCListener, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: Any) -> None:
        self._listener = listener
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._slots = asyncio.Semaphore(listener._max_in_flight)
        self._write_lock = asyncio.Lock()
        self._requests: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        try:
            await self._read_requests()
        finally:
            for request in self._requests:
                request.cancel()
            await asyncio.gather(*self._requests, return_exceptions=True)

    async def _read_requests(self) -> None:
        warn = self._listener._warnings.warn
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                first = await self._reader.readexactly(1)
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            return
        if first != HANDSHAKE:
            warn("RPC: closed connection from %s: wrong handshake byte %r", self._peer, first)
            return
        while True:
            try:
                value = await read_frame(self._reader, max_frame=self._listener._max_frame)
                request = parse_request(value)
            except MalformedRequest as exc:
                if exc.request_id is None:
                    warn("RPC: closed connection from %s: %s", self._peer, exc)
                    return
                await self._slots.acquire()
                self._spawn(self._reply_error(exc.request_id, errors.BAD_REQUEST, str(exc)))
                continue
            except FrameError as exc:
                warn("RPC: closed connection from %s: %s", self._peer, exc)
                return
            except (EOFError, OSError):
                return
            # Stop reading while the connection has its fill of requests in flight.
            await self._slots.acquire()
            self._spawn(self._run(request))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._requests.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        self._slots.release()

    async def _run(self, request: Request) -> None:
        timeout = min(request.timeout or DEFAULT_TIMEOUT, MAX_TIMEOUT)
        try:
            async with asyncio.timeout(timeout):
                result = await self._listener._dispatch(request.method, request.args)
        except TimeoutError:
            await self._reply_error(request.id, errors.DEADLINE,
                                    f"{request.method}: deadline of {timeout:g}s exceeded")
            return
        except Exception as exc:
            await self._send(Reply(request.id, error=error_to_wire(exc)))
            return
        await self._send(Reply(request.id, result=result))

    async def _reply_error(self, request_id: int, code: str, message: str) -> None:
        await self._send(Reply(request_id, error={"Code": code, "Message": message}))

    async def _send(self, reply: Reply) -> None:
        try:
            frame = encode_frame(reply.to_wire(), max_frame=self._listener._max_frame)
        except (TypeError, ValueError, OverflowError) as exc:
            # The handler's result cannot travel: a server bug, reported as one.
            log.error("RPC: reply %d cannot be encoded: %s", reply.id, type(exc).__name__)
            frame = encode_frame(Reply(reply.id, error=error_to_wire(
                RPCError(errors.INTERNAL, "internal error: reply cannot be encoded"))).to_wire())
        try:
            async with self._write_lock:
                self._writer.write(frame)
                await self._writer.drain()
        except OSError:
            pass  # the reader side notices the loss and ends the connection
