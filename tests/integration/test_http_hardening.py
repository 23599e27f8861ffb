"""The HTTP listeners against clients that hold too much or send too much, with a real agent:
one source address cannot take every TCP connection (a per-address limit, plus a reserve
for addresses that hold almost none), and a client still sending a body the agent refused
gets the answer and a clean close instead of a connection reset.

All of 127.0.0.0/8 is loopback on Linux: the tests bind their client sockets to different
127.x addresses to act as different peers of the agent's 127.0.0.1 listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from nomad_client.http.listeners import TCP_LIMITS
from nomad_client.http.router import LINGER_MAX_BYTES, MAX_BODY_BYTES
from tests.integration.harness import (
    AgentProcess,
    parse_raw_response,
    raw_exec_job,
)
from tests.integration.test_taskapi import FILE_IDENTITY, api_sock, read_token, start_task
from tests.integration.test_taskapi_hostile import short_alias

HEALTH = b"GET /v1/agent/health HTTP/1.1\r\nHost: localhost\r\n\r\n"
OPEN_BATCH = 64  # connections opened at once (the agent's listen backlog is 512)
ANSWER_TIMEOUT = 10.0
# Over the body limit, yet within what the agent drains after refusing it.
OVERSIZED = MAX_BODY_BYTES + 4 * 1024 * 1024
CHUNK = 256 * 1024


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> Iterator[None]:
    """The flood tests hold over a thousand sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * TCP_LIMITS.total
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"open-file hard limit {hard} is below {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _host_port(agent: AgentProcess) -> tuple[str, int]:
    host, _, port = agent.address.removeprefix("http://").rpartition(":")
    return host, int(port)


class Held:
    """Connections this test holds open; closed on exit."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        self.writers.clear()


@contextlib.asynccontextmanager
async def holding() -> AsyncIterator[Held]:
    held = Held()
    try:
        yield held
    finally:
        await held.close()


async def health_from(agent: AgentProcess, source: str, held: Held | None = None) -> bool:
    """One health check on a new connection from ``source``: answered 200, or refused
    (closed or reset without an answer). With ``held``, an answered connection is kept open
    (idle, as a flooding client would keep it) instead of closed."""
    host, port = _host_port(agent)
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    keep = False
    try:
        writer.write(HEALTH)
        try:
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT)
        except ConnectionError:
            return False
        if not status:
            return False
        assert status.startswith(b"HTTP/1.1 200 "), status
        keep = held is not None
        return True
    finally:
        if keep:
            assert held is not None
            held.writers.append(writer)
        else:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def flood(agent: AgentProcess, source: str, count: int, held: Held) -> int:
    """Open ``count`` connections from ``source``, each answering one health check and then
    held idle; returns how many the agent admitted (the rest it closed at once)."""
    admitted = 0
    for start in range(0, count, OPEN_BATCH):
        batch = min(OPEN_BATCH, count - start)
        results = await asyncio.gather(*(health_from(agent, source, held)
                                         for _ in range(batch)))
        admitted += sum(results)
    return admitted


async def test_one_address_cannot_take_every_tcp_connection(agent: AgentProcess) -> None:
    # More than the listener's whole cap, from one address, held idle.
    started = time.monotonic()
    async with holding() as held:
        admitted = await flood(agent, "127.0.0.1", TCP_LIMITS.total + 26, held)
        assert admitted == TCP_LIMITS.per_peer, admitted
        # Another local address (the operator's health check) still gets in...
        assert await health_from(agent, "127.0.0.2")
        # ...while the flooding address is refused (its connections are all still open:
        # the idle timeout is longer than this test).
        assert not await health_from(agent, "127.0.0.1")
        assert time.monotonic() - started < 9, "too slow to prove the flood was still held"
        assert len(held.writers) == admitted
    # Once it lets go, the flooding address is served again.
    assert await health_from(agent, "127.0.0.1")


async def test_last_connections_are_reserved_for_light_users(agent: AgentProcess) -> None:
    # Enough addresses, each at its own per-address limit, to fill the whole cap.
    floods = -(-TCP_LIMITS.total // TCP_LIMITS.per_peer)
    started = time.monotonic()
    async with holding() as held:
        admitted = 0
        for i in range(floods):
            admitted += await flood(agent, f"127.0.0.{10 + i}", TCP_LIMITS.per_peer, held)
        assert admitted == TCP_LIMITS.total - TCP_LIMITS.reserved, admitted
        # An address holding nothing gets one of the reserved connections.
        assert await health_from(agent, "127.0.0.2")
        assert time.monotonic() - started < 9, "too slow to prove the flood was still held"


async def _send_all_then_read(connect: socket.socket, address: str | tuple[str, int],
                              url: str, token: str | None = None
                              ) -> tuple[OSError | None, bytes, OSError | None]:
    """Send a request whose announced body is over the limit, the whole body, before reading
    anything (as a simple client does); then read to the end. Returns the send error, the
    bytes read and the read error."""
    loop = asyncio.get_running_loop()
    auth = f"X-Nomad-Token: {token}\r\n" if token else ""
    head = (f"POST {url} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json"
            f"\r\nContent-Length: {OVERSIZED}\r\n\r\n").encode()
    chunk = b" " * CHUNK
    sock = connect
    sock.setblocking(False)
    send_error = read_error = None
    received = bytearray()
    try:
        await loop.sock_connect(sock, address)
        try:
            await loop.sock_sendall(sock, head)
            for _ in range(OVERSIZED // CHUNK):
                await loop.sock_sendall(sock, chunk)
        except OSError as exc:
            send_error = exc
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                while data := await loop.sock_recv(sock, 65536):
                    received += data
        except OSError as exc:
            read_error = exc
    finally:
        sock.close()
    return send_error, bytes(received), read_error


def _assert_refused_cleanly(result: tuple[OSError | None, bytes, OSError | None]) -> None:
    send_error, received, read_error = result
    assert send_error is None, f"the agent reset the connection under the upload: {send_error!r}"
    assert read_error is None, f"the answer was cut off: {read_error!r} after {received[:80]!r}"
    response = parse_raw_response(received)
    assert response.status == 413, received[:300]
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "Request body too large" in response.text()


async def test_client_still_sending_gets_413_and_a_clean_close_over_tcp(
        agent: AgentProcess) -> None:
    assert MAX_BODY_BYTES < OVERSIZED <= LINGER_MAX_BYTES
    result = await _send_all_then_read(socket.socket(socket.AF_INET, socket.SOCK_STREAM),
                                       _host_port(agent), "/v1/jobs")
    _assert_refused_cleanly(result)


async def test_client_still_sending_gets_413_and_a_clean_close_on_a_task_socket(
        agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "upload", "exec sleep 300", identity=FILE_IDENTITY))
    sock, token = api_sock(agent, alloc_id), read_token(agent, alloc_id)
    with short_alias(sock) as path:
        result = await _send_all_then_read(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
                                           path, "/v1/client/metadata", token)
    _assert_refused_cleanly(result)
