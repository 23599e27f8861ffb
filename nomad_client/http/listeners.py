"""Listeners: sockets that feed requests into the router with their ``ListenerContext``.

Built on aiohttp's low-level server (one ``web.Server`` protocol factory per listener, no
per-listener application), so a task's socket costs one listening fd and two small objects.
Bounds on what a misbehaving client can hold: a connection that sends no complete request
head within ``IDLE_TIMEOUT`` is closed; bodies are bounded by the router; and each listener
caps its connections (``ConnectionLimits``; a task socket's cap comes from the live Task API
config, see ``http/taskapi.py``): a task opening connections in a loop cannot use up the
agent's file descriptors and so starve other tasks' sockets or the TCP API, and on the TCP
API one address cannot take every slot, while the last few slots are kept for addresses that
hold almost none (the operator's own requests still get through).

A Unix-socket connection reads its peer's credentials (``SO_PEERCRED``) once, when it is
admitted, and keeps them (``Connection.peer_cred``) for the Task API's peer check and audit.

Malformed requests (aiohttp's protocol errors) are answered with a fixed plain-text reason —
never an echo of the request, which may carry a token — and logged as one short line, at
most ``PROTOCOL_ERROR_LINES`` per listener per ``PROTOCOL_ERROR_WINDOW`` seconds; the rest
are counted and reported in one "suppressed" line, so nobody can grow the agent's log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

import attrs
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)

from nomad_client.http.context import ListenerContext
from nomad_client.http.peercred import PeerCred, read_peer_credentials
from nomad_client.http.router import Router

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 10.0
MAX_HEADER_LINE = 8190
MAX_HEADER_FIELD = 8190
PROTOCOL_ERROR_LINES = 5
PROTOCOL_ERROR_WINDOW = 10.0


@attrs.frozen
class ConnectionLimits:
    """How many connections a listener holds at once. ``per_peer``: per source address
    (TCP only). ``reserved``: the last slots of ``total``, given only to peers holding fewer
    than ``reserve_peer_max`` connections."""

    total: int
    per_peer: int | None = None
    reserved: int = 0
    reserve_peer_max: int = 0


# The TCP API's connection limits (the README's "Limits" paragraph describes them); a task
# socket's come from ``client.task_api.max_connections_per_task``.
TCP_LIMITS = ConnectionLimits(total=1024, per_peer=256, reserved=64, reserve_peer_max=4)

# Most specific first: what a refused malformed request is told (never the request itself).
_PROTOCOL_ERROR_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (LineTooLong, "Request line or header too long"),
    (BadHttpMethod, "Invalid request method"),
    (BadStatusLine, "Invalid request line"),
    (InvalidURLError, "Invalid request target"),
    (InvalidHeader, "Invalid request header"),
    (PayloadEncodingError, "Invalid request body encoding"),
    (BadHttpMessage, "Malformed request"),
)


def protocol_error_reason(status: int, exc: BaseException | None) -> str:
    for kind, reason in _PROTOCOL_ERROR_REASONS:
        if isinstance(exc, kind):
            return reason
    if status == 504:
        return "Request handler timed out"
    return "Internal server error" if status >= 500 else "Bad request"


class ErrorLog:
    """One listener's rate-limited log of refused requests and connections."""

    def __init__(self, where: str, lines: int = PROTOCOL_ERROR_LINES,
                 window: float = PROTOCOL_ERROR_WINDOW) -> None:
        self.where = where
        self._lines = lines
        self._window = window
        self._window_end = 0.0
        self._logged = 0
        self._suppressed = 0
        self._flush: asyncio.TimerHandle | None = None

    def report(self, text: str, *args: Any, exc_info: BaseException | None = None) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._window_end:
            self._report_suppressed()
            self._window_end, self._logged = now + self._window, 0
        if self._logged < self._lines:
            self._logged += 1
            log.warning("%s: " + text, self.where, *args, exc_info=exc_info)
            return
        self._suppressed += 1
        if self._flush is None:
            self._flush = loop.call_at(self._window_end, self._report_suppressed)

    def _report_suppressed(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._suppressed:
            log.warning("%s: suppressed %d more refused requests or connections",
                        self.where, self._suppressed)
            self._suppressed = 0

    def close(self) -> None:
        self._report_suppressed()


class _Protocol(web.RequestHandler):
    """aiohttp's request handler with our admission control and quiet protocol errors; one
    per connection (``request.protocol``)."""

    __slots__ = ("_listener", "_lost_callbacks", "_peer", "peer_cred", "peer_is_task")

    def __init__(self, manager: web.Server, listener: Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._peer: str | None = None  # set once admitted
        # Unix sockets: who connected (SO_PEERCRED), read once when admitted.
        self.peer_cred: PeerCred | None = None
        # The Task API's verdict on that peer, decided on the first request that asks.
        self.peer_is_task: bool | None = None
        # Told when the connection is lost (``on_lost``); None until someone asks.
        self._lost_callbacks: list[Callable[[], None]] | None = None

    @property
    def listener(self) -> Listener:
        return self._listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = self._listener.admit(transport)
        if peer is None:
            transport.close()
            return
        self._peer = peer
        if not self._listener.tcp:
            self.peer_cred = read_peer_credentials(transport.get_extra_info("socket"))
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._peer is None:
            return  # refused: aiohttp never saw this connection
        self._listener.release(self._peer)
        self._peer = None
        super().connection_lost(exc)
        callbacks, self._lost_callbacks = self._lost_callbacks or [], None
        for callback in callbacks:
            callback()

    def on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` once the connection is lost (at once if it is): for a response
        that waits on something other than its client (the event stream), which aiohttp
        does not cancel when the client goes. Returns what forgets the callback."""
        if self.transport is None:
            callback()
            return lambda: None
        if self._lost_callbacks is None:
            self._lost_callbacks = []
        callbacks = self._lost_callbacks
        callbacks.append(callback)

        def forget() -> None:
            if callback in callbacks:
                callbacks.remove(callback)
        return forget

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Replaces aiohttp's: one short line (no request head, no traceback) and a fixed
        reason, because the parser's message quotes the raw bytes, tokens included."""
        reason = protocol_error_reason(status, exc)
        # A bug (not bad input) keeps its traceback; bad input never gets one.
        bug = exc if status >= 500 and not isinstance(exc, HttpProcessingError) else None
        self._listener.errors.report("refused request%s: %d %s (%s)", _from(self._peer),
                                     status, reason, type(exc).__name__ if exc else "-",
                                     exc_info=bug)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        response = web.Response(status=status, text=reason, content_type="text/plain")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's other error reports (faults in serving, not bad input): rate-limited,
        and without aiohttp's message, which may quote the response."""
        exc = kwargs.get("exc_info")
        fault = exc if isinstance(exc, BaseException) else None
        self._listener.errors.report("error serving a connection%s: %s", _from(self._peer),
                                     type(fault).__name__ if fault else "no response",
                                     exc_info=fault)


# A request's connection, as handlers see it (``request.protocol``).
Connection = _Protocol


def _from(peer: str | None) -> str:
    return f" from {peer}" if peer else ""


class _ProtocolFactory(web.Server):
    """``web.Server`` making our ``_Protocol`` (with the same keyword settings)."""

    def __init__(self, handler: Any, listener: Listener, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._listener = listener
        self._protocol_kwargs = kwargs
        self._protocol_loop = asyncio.get_running_loop()

    def __call__(self) -> _Protocol:
        return _Protocol(self, self._listener, loop=self._protocol_loop,
                         **self._protocol_kwargs)


class _Refused(asyncio.Protocol):
    """Stands in for a request handler when a listener is full: closes the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Listener:
    """One serving socket. ``start`` begins accepting; ``close`` stops accepting and drops
    its open connections. A subclass may serve requests with another handler
    (``request_handler``) and take its limits from elsewhere (``limits``)."""

    def __init__(self, router: Router, ctx: ListenerContext, sock: socket.socket,
                 limits: ConnectionLimits | None = None) -> None:
        self.ctx = ctx
        self.sock = sock
        self._limits = limits or TCP_LIMITS
        self.errors = ErrorLog(_describe(ctx))
        self._router = router
        self._server: asyncio.Server | None = None
        self._protocol_factory: web.Server | None = None
        self._open = 0
        self._per_peer: dict[str, int] = {}
        self.tcp = sock.family != socket.AF_UNIX

    @property
    def limits(self) -> ConnectionLimits:
        return self._limits

    @property
    def open_connections(self) -> int:
        return self._open

    def request_handler(self) -> Any:
        # partial, not a wrapper coroutine: one frame less on every request.
        return functools.partial(self._router.dispatch, ctx=self.ctx)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._protocol_factory = _ProtocolFactory(
            self.request_handler(), self, keepalive_timeout=IDLE_TIMEOUT,
            max_line_size=MAX_HEADER_LINE, max_field_size=MAX_HEADER_FIELD, access_log=None,
            logger=log,
            # The router drains a refused body itself, bounded (see router.refuse_body);
            # aiohttp's own lingering has no byte bound.
            lingering_time=0)
        if not self.tcp:
            self._server = await loop.create_unix_server(self._new_protocol, sock=self.sock)
        else:
            self._server = await loop.create_server(self._new_protocol, sock=self.sock)

    def _new_protocol(self) -> asyncio.BaseProtocol:
        factory = self._protocol_factory
        assert factory is not None
        if self._open >= self.limits.total:
            # Cheap refusal before building a request handler; admit() decides exactly.
            self.errors.report("refused connection: listener full")
            return _Refused()
        return factory()

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Count a new connection in, or refuse it (None). O(1): two counters."""
        peer = _peer_address(transport) if self.tcp else ""
        held = self._per_peer.get(peer, 0)
        limits = self.limits
        refusal = None
        if self._open >= limits.total:
            refusal = "listener full"
        elif limits.per_peer is not None and held >= limits.per_peer:
            refusal = "per-address connection limit reached"
        elif self._open >= limits.total - limits.reserved and held >= limits.reserve_peer_max:
            refusal = "only reserved connections left"
        if refusal is not None:
            self.errors.report("refused connection%s: %s", _from(peer), refusal)
            return None
        self._per_peer[peer] = held + 1
        self._open += 1
        return peer

    def release(self, peer: str) -> None:
        self._open -= 1
        held = self._per_peer[peer] - 1
        if held:
            self._per_peer[peer] = held
        else:
            del self._per_peer[peer]

    async def close(self) -> None:
        self.errors.close()
        if self._server is None:
            self.sock.close()
            return
        server, factory = self._server, self._protocol_factory
        self._server = None
        server.close()
        if factory is not None:
            await factory.shutdown(1.0)
        await server.wait_closed()


def _peer_address(transport: asyncio.BaseTransport) -> str:
    peername = transport.get_extra_info("peername")
    return str(peername[0]) if isinstance(peername, tuple) and peername else "?"


def _describe(ctx: ListenerContext) -> str:
    if ctx.task_api:
        return f"Task API socket (alloc {(ctx.alloc_id or '?')[:8]}, task {ctx.task})"
    return "HTTP API"


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def when_lost(raw: web.BaseRequest, callback: Callable[[], None]) -> Callable[[], None]:
    """Have ``callback`` called when the request's connection is lost (``Connection.on_lost``)
    and return what cancels that: for a streamed response that waits on something other than
    its client, which aiohttp does not cancel when the client goes."""
    on_lost = getattr(raw.protocol, "on_lost", None)
    if on_lost is None:  # another server (none of ours): found out by the next write
        return lambda: None
    forget: Callable[[], None] = on_lost(callback)
    return forget
