"""A hostile task against its own API socket, with real agents: malformed, oversized, stalled
and idle connections must not slow down other tasks' sockets or the TCP API, must be cut
off in bounded time, and a task replacing its socket with a symlink must not make the agent
touch the link's target. Malformed requests carrying a real token must not leave it in the
agent's log, state or answers, and must not grow the log with every request. Every test ends
by scanning the agent's output and data dir for the secrets it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import shlex
import socket
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from nomad_client.structs.models import ACLToken
from tests.integration.harness import (
    AgentProcess,
    assert_no_secrets,
    eventually,
    raw_exec_job,
    run_job,
    task_dir,
    wait_task_state,
)
from tests.integration.test_taskapi import (
    FAST_RESTART,
    FILE_IDENTITY,
    answers,
    api_sock,
    local_dir,
    read_token,
    restarts,
    sock_request,
    start_task,
    touch,
)
from tests.integration.test_taskapi_auth import seed_acl_tokens

MIB = 1024 * 1024
HUGE = 100 * MIB
IDLE_CLOSE_LIMIT = 15.0  # the agent drops idle connections after ~10 s
QUICK = 0.5  # a healthy request's latency budget while the attack goes on
READ_TIMEOUT = 5.0
CLIENT_ERROR = re.compile(rb"HTTP/1\.[01] 4\d\d ")


@contextlib.contextmanager
def short_alias(sock: Path) -> Iterator[str]:
    """A connectable name for ``sock`` whatever its length (``sun_path`` is 108 bytes)."""
    fd = os.open(sock.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{sock.name}"
    finally:
        os.close(fd)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the agent closes; a reset counts as a close."""
    chunks = []
    try:
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except ConnectionError:
        pass
    return b"".join(chunks)


async def send_once(path: str, payload: bytes) -> bytes:
    """Send ``payload`` on a new connection and return what comes back before the close."""
    return await _exchange(*await asyncio.open_unix_connection(path), payload)


async def send_once_tcp(address: str, payload: bytes) -> bytes:
    """``send_once`` to an ``http://host:port`` address."""
    host, _, port = address.removeprefix("http://").rpartition(":")
    return await _exchange(*await asyncio.open_connection(host, int(port)), payload)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    payload: bytes) -> bytes:
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()
        return await asyncio.wait_for(_read_all(reader), READ_TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def push_huge_body(path: str, token: str | None,
                         url: str = "/v1/client/metadata") -> tuple[bytes, int, float]:
    """Announce a 100 MiB body and stream it for as long as the agent lets us.

    A raw socket, because asyncio's stream writer silently drops writes once the peer has
    hung up, which would hide whether the agent is still reading. Returns the reply's
    first bytes (empty if the agent just closed), the body bytes the agent accepted and the
    seconds the whole exchange took.
    """
    loop = asyncio.get_running_loop()
    auth = f"X-Nomad-Token: {token}\r\n" if token else ""
    head = (f"POST {url} HTTP/1.1\r\nHost: localhost\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n").encode()
    chunk = b" " * (64 * 1024)
    sent = 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    reply_task: asyncio.Task[bytes] | None = None
    try:
        await loop.sock_connect(sock, path)
        started = time.monotonic()
        await loop.sock_sendall(sock, head)
        reply_task = asyncio.create_task(loop.sock_recv(sock, 256))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < HUGE:
                await loop.sock_sendall(sock, chunk)
                sent += len(chunk)
        try:
            reply = await asyncio.wait_for(reply_task, READ_TIMEOUT)
        except ConnectionError:
            reply = b""
        return reply, sent, time.monotonic() - started
    finally:
        if reply_task is not None:
            reply_task.cancel()
            await asyncio.gather(reply_task, return_exceptions=True)
        sock.close()


async def closed_within(reader: asyncio.StreamReader, opened_at: float) -> float:
    """Seconds from ``opened_at`` until the agent closes this connection."""
    remaining = IDLE_CLOSE_LIMIT - (time.monotonic() - opened_at)
    data = await asyncio.wait_for(_read_all(reader), max(remaining, 0.1))
    # A half-sent request may be answered with an error before the close, never served.
    assert not data or CLIENT_ERROR.match(data), data[:200]
    return time.monotonic() - opened_at


async def latencies(request: Callable[[], Awaitable[int]], count: int = 20) -> list[float]:
    """Run ``request`` (returning an HTTP status) ``count`` times, one after another, timed."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        status = await request()
        times.append(time.monotonic() - started)
        assert status == 200
        await asyncio.sleep(0.02)
    return times


async def test_hostile_connections_do_not_disturb_other_listeners(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "hostile", "exec sleep 300", tasks=2, identity=FILE_IDENTITY), ("t0", "t1"))
        victim, bystander = api_sock(agent, alloc_id, "t0"), api_sock(agent, alloc_id, "t1")
        victim_token = read_token(agent, alloc_id, "t0")
        bystander_token = read_token(agent, alloc_id, "t1")

        with short_alias(victim) as path:
            # Held open for the whole attack: one silent, one stuck mid-headers.
            idle_r, idle_w = await asyncio.open_unix_connection(path)
            half_r, half_w = await asyncio.open_unix_connection(path)
            half_w.write(b"GET /v1/agent/health HTTP/1.1\r\nHost: localhost\r\n"
                         b"X-Nomad-Token: " + victim_token.encode() + b"\r\n")
            await half_w.drain()
            opened_at = time.monotonic()
            try:
                garbage = os.urandom(4096) + b"\r\n\r\n"
                big_header = (b"GET /v1/agent/health HTTP/1.1\r\nHost: localhost\r\nX-Big: "
                              + b"a" * MIB + b"\r\n\r\n")

                async def via_bystander() -> int:
                    return (await sock_request(bystander, token=bystander_token)).status

                async def via_tcp() -> int:
                    return (await api.request("GET", "/v1/agent/health")).status

                attack = asyncio.gather(send_once(path, garbage), send_once(path, big_header),
                                        push_huge_body(path, victim_token))
                socket_times = await latencies(via_bystander)
                tcp_times = await latencies(via_tcp)
                garbage_reply, big_reply, (huge_reply, _, reacted) = await attack

                assert max(socket_times) < QUICK, socket_times
                assert max(tcp_times) < QUICK, tcp_times

                for name, reply in (("garbage", garbage_reply), ("1 MiB header", big_reply)):
                    assert not reply or CLIENT_ERROR.match(reply), (name, reply[:200])
                    assert b"Traceback" not in reply, (name, reply)
                assert not huge_reply or re.match(rb"HTTP/1\.[01] 413 ", huge_reply), huge_reply
                assert reacted < READ_TIMEOUT

                idle_after = await closed_within(idle_r, opened_at)
                half_after = await closed_within(half_r, opened_at)
                assert idle_after <= IDLE_CLOSE_LIMIT and half_after <= IDLE_CLOSE_LIMIT
            finally:
                for writer in (idle_w, half_w):
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()

        # The attacked socket itself still serves its task.
        assert await answers(victim, victim_token)
    await assert_no_secrets(agent, [victim_token, bystander_token])


async def test_oversized_body_is_refused_without_being_read(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "huge", "exec sleep 300", identity=FILE_IDENTITY))
    sock, token = api_sock(agent, alloc_id), read_token(agent, alloc_id)
    with short_alias(sock) as path:
        # An endpoint that reads bodies, with a valid credential: refused for its size.
        reply, sent, took = await push_huge_body(path, token)
        assert not reply or re.match(rb"HTTP/1\.[01] 413 ", reply), reply
        assert took < READ_TIMEOUT
        assert sent < HUGE, (f"the agent swallowed the whole {HUGE // MIB} MiB body "
                             f"after answering {reply[:40]!r}")
        # Without a credential: refused before any handler, and the body is not drained.
        reply, sent, took = await push_huge_body(path, None)
        assert not reply or re.match(rb"HTTP/1\.[01] 4(01|13) ", reply), reply
        assert took < READ_TIMEOUT
        assert sent < HUGE, (f"the agent swallowed the whole {HUGE // MIB} MiB body "
                             f"after answering {reply[:40]!r}")
    assert await answers(sock, token)
    await assert_no_secrets(agent, [token])


def _fingerprint(path: Path) -> tuple[int, int, int, int, str]:
    st = os.stat(path, follow_symlinks=False)
    assert stat.S_ISREG(st.st_mode)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, digest


async def test_symlinked_socket_never_leads_the_agent_outside(agent: AgentProcess,
                                                              tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("the agent must leave this file alone\n")
    os.chmod(victim, 0o640)
    before = _fingerprint(victim)

    # Every run swaps api.sock for a link to the victim; the first run then fails on cue
    # (so the agent restarts it), the second stays up until the job is stopped.
    script = (
        'n=$(cat "$NOMAD_TASK_DIR/runs" 2>/dev/null || echo 0); n=$((n + 1)); '
        'echo $n > "$NOMAD_TASK_DIR/runs"; '
        'while [ ! -f "$NOMAD_TASK_DIR/go$n" ]; do sleep 0.05; done; '
        f'rm -f "$NOMAD_SECRETS_DIR/api.sock"; ln -s {shlex.quote(str(victim))} '
        '"$NOMAD_SECRETS_DIR/api.sock"; touch "$NOMAD_TASK_DIR/planted$n"; '
        'if [ $n = 1 ]; then exit 1; fi; exec sleep 300')
    async with agent.api() as api:
        allocs = await run_job(api, raw_exec_job("link", script, restart=FAST_RESTART,
                                                 identity=FILE_IDENTITY, kill_timeout_s=1))
        alloc_id = allocs[0]["ID"]
        local, sock = local_dir(agent, alloc_id), api_sock(agent, alloc_id)
        await wait_task_state(api, alloc_id, "t", "running")

        touch(local / "go1")
        await eventually(lambda: restarts(api, alloc_id), message="a restart")
        await eventually(lambda: (local / "runs").read_text().strip() == "2",
                         message="the second run")
        # The restart put a real socket back in place of the link.
        assert stat.S_ISSOCK(os.stat(sock, follow_symlinks=False).st_mode)
        token = read_token(agent, alloc_id)
        assert await answers(sock, token)
        assert _fingerprint(victim) == before

        touch(local / "go2")
        await eventually(lambda: (local / "planted2").exists(), message="the second link")
        assert os.readlink(sock) == str(victim)
        # Purged, the allocation is destroyed once its task is dead, and only after the
        # task's stop hooks and the Task API's cleanup (which finds the planted link): its
        # directory going away proves the agent is done with the link.
        await api.job_deregister("link", purge=True)
        alloc_dir = task_dir(agent, alloc_id, "t").parent
        await eventually(lambda: not alloc_dir.exists(), message="the allocation destroyed")
    assert _fingerprint(victim) == before
    assert victim.read_text() == "the agent must leave this file alone\n"
    await assert_no_secrets(agent, [token])


def malformed_requests(token: str) -> dict[str, bytes]:
    """Requests the HTTP parser refuses, each with ``token`` where the parser's error
    message (or a careless log line) would quote it."""
    t = token.encode()
    host = b"Host: localhost\r\n"
    health = b"GET /v1/agent/health HTTP/1.1\r\n" + host
    return {
        "bad request line": b"GET /v1/agent/health?token=" + t + b" HTTP/9.9\r\n" + host
                            + b"\r\n",
        "bad method": b"G\x01T /v1/agent/health?token=" + t + b" HTTP/1.1\r\n" + host
                      + b"\r\n",
        "request line too long": b"GET /" + t + b"x" * 9000 + b" HTTP/1.1\r\n" + host
                                 + b"\r\n",
        "invalid token header byte": health + b"X-Nomad-Token: " + t + b"\x01\r\n\r\n",
        "invalid bearer header byte": health + b"Authorization: Bearer " + t
                                      + b"\x7f\r\n\r\n",
        "invalid header name": health + b"X-Nomad-Token: " + t + b"\r\nBad\x01: "
                               + t + b"\r\n\r\n",
        "huge header": health + b"X-Nomad-Token: " + t + b"A" * 9000 + b"\r\n\r\n",
        "bad content-length": b"POST /v1/client/metadata HTTP/1.1\r\n" + host
                              + b"X-Nomad-Token: " + t + b"\r\nContent-Length: " + t
                              + b"\r\n\r\n{}",
        "bad chunked encoding": b"POST /v1/client/metadata HTTP/1.1\r\n" + host
                                + b"X-Nomad-Token: " + t
                                + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
                                + t + b"\r\n",
        "http/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + t,
        "tls client hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + t,
    }


async def _acl_agent(agent_factory: Callable[..., AgentProcess]) -> tuple[AgentProcess, str]:
    """A started agent with ACLs on and a management token seeded into its state."""
    management = ACLToken(accessor_id=str(uuid.uuid4()), secret_id=str(uuid.uuid4()),
                          name="ops", type="management")
    agent = agent_factory(acl=True)
    await seed_acl_tokens(agent.data_dir, management)
    await agent.start()
    return agent, management.secret_id


async def test_malformed_requests_carrying_tokens_leave_no_trace(
        agent_factory: Callable[..., AgentProcess]) -> None:
    agent, management = await _acl_agent(agent_factory)
    async with agent.api(token=management) as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "leaky", "exec sleep 300", identity=FILE_IDENTITY))
    sock, identity = api_sock(agent, alloc_id), read_token(agent, alloc_id)
    assert identity.startswith("eyJ") and identity.count(".") == 2

    with short_alias(sock) as path:
        for token in (identity, management):
            for name, payload in malformed_requests(token).items():
                for where, reply in (("socket", await send_once(path, payload)),
                                     ("tcp", await send_once_tcp(agent.address, payload))):
                    assert not reply or CLIENT_ERROR.match(reply), (name, where, reply[:200])
                    assert token.encode() not in reply, (name, where, "token echoed")
                    assert b"X-Nomad-Token" not in reply and b"Bearer" not in reply, (
                        name, where, reply[:300])

    assert await answers(sock, identity)
    assert await answers(sock, management)
    await assert_no_secrets(agent, [identity, management])


FLOOD = 500
FLOOD_CONCURRENCY = 25
# Per listener: a handful of lines per 10 s window plus one "suppressed" summary; far
# fewer than one per request (aiohttp's own reporting wrote ~25 lines per request).
FLOOD_LOG_LINES_MAX = 40


async def _flood(send: Callable[[bytes], Awaitable[bytes]], payloads: list[bytes]) -> None:
    """Send ``FLOOD`` malformed requests, ``FLOOD_CONCURRENCY`` at a time; each is refused."""
    pending = [payloads[i % len(payloads)] for i in range(FLOOD)]
    while pending:
        batch, pending = pending[:FLOOD_CONCURRENCY], pending[FLOOD_CONCURRENCY:]
        for reply in await asyncio.gather(*(send(p) for p in batch)):
            assert not reply or CLIENT_ERROR.match(reply), reply[:200]


HANG_UPS = 40  # per listener; below the task socket's connection cap


async def _hang_up_mid_body(connect: Callable[[], Awaitable[tuple[asyncio.StreamReader,
                                                                  asyncio.StreamWriter]]],
                            payload: bytes, sync: Callable[[], Awaitable[object]]) -> None:
    """Start ``HANG_UPS`` requests whose bodies never finish, and hang up on all of them
    while the agent is reading those bodies."""
    writers = [(await connect())[1] for _ in range(HANG_UPS)]
    try:
        for writer in writers:
            writer.write(payload)
        await asyncio.gather(*(w.drain() for w in writers))
        await sync()  # answered after those heads arrived: their handlers are reading now
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    await sync()  # answered after the agent saw the hang-ups


async def test_malformed_request_flood_does_not_flood_the_log(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "flood", "exec sleep 300", identity=FILE_IDENTITY))
    sock, token = api_sock(agent, alloc_id), read_token(agent, alloc_id)
    payloads = list(malformed_requests(token).values())
    truncated = (f"POST /v1/client/metadata HTTP/1.1\r\nHost: localhost\r\n"
                 f"X-Nomad-Token: {token}\r\nContent-Length: 1000\r\n\r\n{{\"Meta\":"
                 ).encode()
    host, _, port = agent.address.removeprefix("http://").rpartition(":")
    lines_before = agent.output.count("\n")
    started = time.monotonic()
    async with agent.api() as api:
        with short_alias(sock) as path:
            await _hang_up_mid_body(functools.partial(asyncio.open_unix_connection, path),
                                    truncated, functools.partial(answers, sock, token))
            await _flood(functools.partial(send_once, path), payloads)
        await _hang_up_mid_body(functools.partial(asyncio.open_connection, host, int(port)),
                                truncated, functools.partial(api.agent_health))
        await _flood(functools.partial(send_once_tcp, agent.address), payloads)
        # Each refusal is logged (if at all) before it is answered, and the agent blocks
        # once the pipe to us is full, so at most a pipe's worth of its lines is unread here.
        grown = agent.output.count("\n") - lines_before
        assert grown <= FLOOD_LOG_LINES_MAX, (
            f"{grown} log lines for {2 * (FLOOD + HANG_UPS)} bad requests in "
            f"{time.monotonic() - started:.1f}s:\n" + agent.output[-3000:])
        assert await answers(sock, token)
        assert (await api.request("GET", "/v1/agent/health")).status == 200
    await assert_no_secrets(agent, [token])
