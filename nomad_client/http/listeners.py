"""Listeners: sockets that feed requests into the router with their ``ListenerContext``.

Built on aiohttp's low-level server (one ``web.Server`` protocol factory per listener, no
per-listener application), so a task's socket costs one listening fd and two small objects.
Bounds on what a misbehaving client can hold: a connection that sends no complete request
head within ``IDLE_TIMEOUT`` is closed; bodies are bounded by the router; and each listener
accepts at most ``max_connections`` at once (a task opening connections in a loop cannot
use up the agent's file descriptors and so starve other tasks' sockets or the TCP API).
"""

from __future__ import annotations

import asyncio
import functools
import socket

from aiohttp import web

from nomad_client.http.context import ListenerContext
from nomad_client.http.router import Router

IDLE_TIMEOUT = 10.0
MAX_HEADER_LINE = 8190
MAX_HEADER_FIELD = 8190
TASK_SOCKET_MAX_CONNECTIONS = 64
TCP_MAX_CONNECTIONS = 1024


class _Refused(asyncio.Protocol):
    """Stands in for a request handler when a listener is full: closes the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Listener:
    """One serving socket. ``start`` begins accepting; ``close`` stops accepting and drops
    its open connections."""

    def __init__(self, router: Router, ctx: ListenerContext, sock: socket.socket,
                 max_connections: int | None = None) -> None:
        self.ctx = ctx
        self.sock = sock
        self.max_connections = max_connections or (
            TASK_SOCKET_MAX_CONNECTIONS if ctx.task_api else TCP_MAX_CONNECTIONS)
        self._router = router
        self._server: asyncio.Server | None = None
        self._protocol_factory: web.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # partial, not a wrapper coroutine: one frame less on every request.
        handler = functools.partial(self._router.dispatch, ctx=self.ctx)
        self._protocol_factory = web.Server(
            handler, keepalive_timeout=IDLE_TIMEOUT, max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_FIELD, access_log=None,
            # Never drain a body we refused (413/408): close at once instead.
            lingering_time=0)
        if self.sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(self._new_protocol, sock=self.sock)
        else:
            self._server = await loop.create_server(self._new_protocol, sock=self.sock)

    def _new_protocol(self) -> asyncio.BaseProtocol:
        factory = self._protocol_factory
        assert factory is not None
        if len(factory.connections) >= self.max_connections:
            return _Refused()
        return factory()

    async def close(self) -> None:
        if self._server is None:
            self.sock.close()
            return
        server, factory = self._server, self._protocol_factory
        self._server = None
        server.close()
        if factory is not None:
            await factory.shutdown(1.0)
        await server.wait_closed()


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

