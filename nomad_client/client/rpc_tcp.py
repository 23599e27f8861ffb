"""The client's RPC transport over TCP (optionally mutual TLS) to the servers.

One connection at a time, to one server of the list (shuffled, so clients spread over the
servers); every call shares it, many in flight at once, matched to replies by ID. When a
server cannot be reached the transport moves on to the next one; a server that failed is
not tried again before its backoff (jittered, exponential, per server) runs out, and a call
that finds no server reachable in one pass over the list fails with NO_SERVER rather than
waiting: the caller's own retry loop decides when to try again.

A call in flight when its connection drops fails with UNAVAILABLE (the server may or may
not have acted on it, so it is not resent); the next call reconnects.

Deadlines: a call waits ``timeout`` if given, else ``args["MaxQueryTime"] + 10`` seconds
when the call is a long poll carrying one (``Node.GetClientAllocs``), else
``default_timeout``. The server is sent that deadline and enforces it (replying DEADLINE);
the client gives up on its own a little later, in case the reply itself is lost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import ssl
import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

from nomad_client.rpcwire.address import ServerAddress, parse_address
from nomad_client.rpcwire.errors import (
    DeadlineExceeded,
    NoServer,
    Unavailable,
    error_from_wire,
)
from nomad_client.rpcwire.framing import (
    HANDSHAKE,
    MAX_FRAME,
    FrameError,
    Reply,
    Request,
    close_writer,
    encode_frame,
    parse_reply,
    read_frame,
)

log = logging.getLogger(__name__)

# What a long poll waits beyond its MaxQueryTime: the server answers at MaxQueryTime.
LONG_POLL_MARGIN: Final = 10.0
# How much longer than the server's deadline the client waits for the DEADLINE reply.
CLIENT_GRACE: Final = 2.0


class RandomSource(Protocol):
    def shuffle(self, x: list[Any]) -> None: ...
    def uniform(self, a: float, b: float) -> float: ...


class _Health:
    """One server's record of failures: when it may be tried again, and why it failed."""

    def __init__(self) -> None:
        self.failures = 0
        self.not_before = 0.0
        self.last_error = ""

    def failed(self, reason: str, now: float, low: float, high: float,
               rng: RandomSource) -> None:
        self.failures += 1
        self.last_error = reason
        base = min(high, low * 2 ** min(self.failures - 1, 32))
        self.not_before = now + rng.uniform(base / 2, base)

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0
        self.last_error = ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


class _Connection:
    """One connection to one server, with the calls waiting on it."""

    def __init__(self, transport: TcpTransport, server: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.retiring = False
        self.lost = False
        self.had_reply = False
        self.close_reason = f"connection to {server} closed by the server"
        self._transport = transport
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self.task = asyncio.create_task(self._read_replies(),
                                        name=f"rpc-replies-{server}")

    @property
    def usable(self) -> bool:
        return not (self.lost or self.retiring)

    async def call(self, method: str, args: dict[str, Any], wait: float) -> Reply:
        request_id = next(self._ids)
        frame = encode_frame(Request(request_id, method, args, wait).to_wire(),
                             max_frame=self._transport._max_frame)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            if self.lost:  # ended after it was picked: nothing would ever answer
                raise Unavailable(self.close_reason)
            try:
                async with self._write_lock:
                    self._writer.write(frame)
                    await self._writer.drain()
            except OSError as exc:
                raise Unavailable(f"{method}: sending to {self.server} failed: "
                                  f"{_reason(exc)}") from None
            try:
                async with asyncio.timeout(wait + CLIENT_GRACE):
                    return await future
            except TimeoutError:
                raise DeadlineExceeded(f"{method}: no reply from {self.server} within "
                                       f"{wait + CLIENT_GRACE:g}s") from None
        finally:
            self._pending.pop(request_id, None)
            if self.retiring and not self._pending:
                self.task.cancel()

    def retire(self) -> None:
        """Take no new calls; close once the calls in flight have their replies."""
        self.retiring = True
        if not self._pending:
            self.close_reason = f"connection to {self.server} retired"
            self.task.cancel()

    async def _read_replies(self) -> None:
        try:
            while True:
                reply = parse_reply(await read_frame(self._reader,
                                                     max_frame=self._transport._max_frame))
                self.had_reply = True
                self._transport._last_contact = time.monotonic()
                future = self._pending.get(reply.id)
                if future is not None and not future.done():
                    future.set_result(reply)
        except EOFError:
            pass
        except FrameError as exc:
            self.close_reason = f"protocol error from {self.server}: {exc}"
            log.warning("RPC: %s", self.close_reason)
        except OSError as exc:
            self.close_reason = f"connection to {self.server} lost: {_reason(exc)}"
        finally:
            self.lost = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(Unavailable(self.close_reason))
            self._transport._connection_ended(self)
            await close_writer(self._writer)


class TcpTransport:
    """``RPCTransport`` over TCP to a list of servers (``host:port``, default port 4647).

    ``server_hostname`` (with ``ssl_context``) is the name the servers' certificates are
    checked against, ``tls.expected_server_name(region)`` with ``verify_server_hostname``.
    """

    def __init__(self, servers: Sequence[str], *, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 5.0,
                 default_timeout: float = 30.0, backoff_min: float = 0.25,
                 backoff_max: float = 5.0, rng: RandomSource = random,
                 max_frame: int = MAX_FRAME) -> None:
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._default_timeout = default_timeout
        self._backoff = (backoff_min, backoff_max)
        self._rng = rng
        self._max_frame = max_frame
        self._order: list[str] = []
        self._addresses: dict[str, ServerAddress] = {}
        self._health: dict[str, _Health] = {}
        self._next = 0
        self._conn: _Connection | None = None
        self._connections: set[_Connection] = set()
        self._connect_lock = asyncio.Lock()
        self._last_contact: float | None = None
        self._closed = False
        self.set_servers(servers)

    @property
    def servers(self) -> list[str]:
        return list(self._order)

    @property
    def current_server(self) -> str | None:
        conn = self._conn
        return conn.server if conn is not None and conn.usable else None

    @property
    def last_contact(self) -> float | None:
        """``time.monotonic()`` of the last reply from any server."""
        return self._last_contact

    def set_servers(self, servers: Sequence[str]) -> None:
        """Replace the list (``ValueError`` naming a bad address, leaving the list as it
        was). The current connection is kept if its server is still listed; otherwise it
        takes no new calls and closes once its calls in flight are answered."""
        addresses = {str(address): address for address in map(parse_address, servers)}
        order = list(addresses)
        self._rng.shuffle(order)
        self._order, self._addresses, self._next = order, addresses, 0
        self._health = {name: self._health.get(name) or _Health() for name in order}
        conn = self._conn
        if conn is not None and conn.server not in addresses:
            conn.retire()
            self._conn = None
        elif conn is not None:
            self._next = order.index(conn.server)

    async def call(self, method: str, args: dict[str, Any], *,
                   timeout: float | None = None) -> Any:
        wait = self._timeout_for(args, timeout)
        conn = await self._connection()
        reply = await conn.call(method, args, wait)
        if reply.error is not None:
            raise error_from_wire(reply.error)
        return reply.result

    async def close(self) -> None:
        self._closed = True
        self._conn = None
        for conn in list(self._connections):
            conn.close_reason = "RPC transport closed"
            conn.task.cancel()
        while self._connections:
            await asyncio.gather(*(c.task for c in list(self._connections)),
                                 return_exceptions=True)

    def _timeout_for(self, args: dict[str, Any], timeout: float | None) -> float:
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"RPC timeout must be positive, not {timeout!r}")
            return float(timeout)
        max_query = args.get("MaxQueryTime")
        if isinstance(max_query, int | float) and not isinstance(max_query, bool) \
                and max_query > 0:
            return float(max_query) + LONG_POLL_MARGIN
        return self._default_timeout

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        async with self._connect_lock:
            if self._closed:
                raise Unavailable("RPC transport closed")
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            return await self._connect_pass()

    async def _connect_pass(self) -> _Connection:
        if not self._order:
            raise NoServer("no servers reachable: no servers configured")
        failures = []
        count = len(self._order)
        for step in range(count):
            position = (self._next + step) % count
            name = self._order[position]
            health = self._health[name]
            now = time.monotonic()
            if health.not_before > now:
                failures.append(f"{name} (backing off {health.not_before - now:.1f}s after: "
                                f"{health.last_error})")
                continue
            try:
                conn = await self._open(name)
            except (OSError, TimeoutError) as exc:
                reason = _reason(exc)
                health.failed(reason, time.monotonic(), *self._backoff, self._rng)
                log.debug("RPC: cannot reach server %s: %s", name, reason)
                failures.append(f"{name} ({reason})")
                continue
            health.succeeded()
            self._next = position
            self._conn = conn
            log.debug("RPC: connected to server %s", name)
            return conn
        raise NoServer("no servers reachable: " + "; ".join(failures))

    async def _open(self, name: str) -> _Connection:
        address = self._addresses[name]
        server_hostname = None
        if self._ssl is not None:
            server_hostname = self._server_hostname or address.host
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(
                address.host, address.port, ssl=self._ssl, server_hostname=server_hostname)
        writer.write(HANDSHAKE)
        conn = _Connection(self, name, reader, writer)
        self._connections.add(conn)
        return conn

    def _connection_ended(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if self._conn is not conn:
            return
        self._conn = None
        if self._closed or conn.server not in self._health:
            return
        if not conn.had_reply:
            # Accepted, then dropped before answering anything (TLS refused, not a server):
            # as good as unreachable.
            self._health[conn.server].failed(conn.close_reason, time.monotonic(),
                                             *self._backoff, self._rng)
        # Move on, so a server that went away is not the first one tried again.
        if conn.server in self._order:
            self._next = (self._order.index(conn.server) + 1) % len(self._order)
