"""The router and its authentication rules, through real listeners on real sockets:
a Task API listener (task_api=True) and a TCP-style listener, over one router."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.client.taskapi_config import TaskAPIConfig
from nomad_client.http.auth import IDENTITY_NOT_BOUND, request_token
from nomad_client.server.keyring import Keyring
from tests.unit.factories import (
    InProcessAgent,
    acl_token,
    call_http,
    identity_token,
    make_alloc,
    seed,
    start_agent,
    task_api_stack,
    wait_until,
)


@pytest.fixture
async def stack(tmp_path: Path, keyring: Keyring) -> AsyncIterator[InProcessAgent]:
    agent = await start_agent(tmp_path, keyring, with_client=False,
                              task_sock=tmp_path / "api.sock")
    yield agent
    await agent.stop()


@pytest.fixture
async def acl_stack(tmp_path: Path, keyring: Keyring) -> AsyncIterator[InProcessAgent]:
    agent = await start_agent(tmp_path, keyring, acl=True, with_client=False,
                              task_sock=tmp_path / "api.sock")
    yield agent
    await agent.stop()


def task_sock(stack: InProcessAgent) -> Path:
    assert stack.api.task_sock is not None
    return stack.api.task_sock


async def over_socket(stack: InProcessAgent, path: str, headers: dict[str, str] | None = None,
                      method: str = "GET", data: bytes | None = None) -> tuple[int, str]:
    connector = aiohttp.UnixConnector(str(task_sock(stack)))
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.request(method, f"http://localhost{path}", headers=headers or {},
                             data=data) as r:
            return r.status, await r.text()


async def over_tcp(stack: InProcessAgent, path: str, headers: dict[str, str] | None = None,
                   method: str = "GET", data: Any = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, stack.api.url + path, headers=headers or {},
                             data=data) as r:
            return r.status, await r.text()


# ---- token extraction ------------------------------------------------------------------
@pytest.mark.parametrize(("headers", "expected"), [
    ({}, ""),
    ({"X-Nomad-Token": "  abc  "}, "abc"),
    ({"Authorization": "Bearer abc"}, "abc"),
    ({"Authorization": "bearer abc def"}, "abc"),
    ({"Authorization": "Basic abc"}, ""),
    ({"Authorization": "Bearer"}, ""),
    ({"X-Nomad-Token": "x", "Authorization": "Bearer y"}, "x"),
    ({"X-Nomad-Token": "   ", "Authorization": "Bearer y"}, ""),  # as Nomad: header wins
    ({"Authorization": " Bearer x"}, ""),
    ({"Authorization": "Bearer \tx\ty"}, "x"),
])
def test_request_token(headers: dict[str, str], expected: str) -> None:
    assert request_token(headers) == expected


# ---- Task API: always authenticated ----------------------------------------------------
async def test_task_api_without_token_is_401_even_for_unknown_paths(stack: InProcessAgent) -> None:
    assert await over_socket(stack, "/v1/agent/health") == (401, "Unauthorized")
    assert await over_socket(stack, "/no/such/path") == (401, "Unauthorized")


@pytest.mark.parametrize("token", [
    "x", str(uuid.uuid4()), "a.b.c", "eyJhbGciOiJub25lIn0.eyJ4IjoxfQ.",
    "Bearer", "\u00e9\u00e9\u00e9",
])
async def test_task_api_rejects_anything_that_is_not_a_credential(stack: InProcessAgent,
                                                                  token: str) -> None:
    # Nomad with ACLs disabled lets any non-empty string through; we do not.
    status, body = await over_socket(stack, "/v1/agent/health",
                                     {"X-Nomad-Token": token.encode().decode("latin-1")})
    assert (status, body) == (403, "Forbidden")


async def test_task_api_accepts_live_workload_identity(stack: InProcessAgent) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    token = identity_token(stack.server.keyring, alloc)
    for headers in ({"Authorization": f"Bearer {token}"}, {"X-Nomad-Token": token}):
        status, body = await over_socket(stack, "/v1/agent/health", headers)
        assert status == 200, body
    # Once authenticated, an unknown path is a plain 404.
    assert (await over_socket(stack, "/v1/nope", {"X-Nomad-Token": token}))[0] == 404


async def test_task_api_refuses_identity_of_finished_or_unknown_alloc(
        stack: InProcessAgent) -> None:
    done = make_alloc(client_status="complete")
    stopped = make_alloc(desired_status="stop")
    await seed(stack.server, allocs=(done, stopped))
    unknown = make_alloc()
    for alloc in (done, stopped, unknown):
        headers = {"X-Nomad-Token": identity_token(stack.server.keyring, alloc)}
        assert await over_socket(stack, "/v1/agent/health", headers) == (403, "Forbidden")


async def test_task_api_identity_stops_working_when_alloc_finishes(stack: InProcessAgent) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    headers = {"X-Nomad-Token": identity_token(stack.server.keyring, alloc)}
    assert (await over_socket(stack, "/v1/agent/health", headers))[0] == 200  # now cached
    await seed(stack.server, allocs=(attrs.evolve(alloc, client_status="failed"),))
    assert await over_socket(stack, "/v1/agent/health", headers) == (403, "Forbidden")


async def test_task_api_refuses_expired_identity(stack: InProcessAgent) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    expired = identity_token(stack.server.keyring, alloc, ttl_seconds=60, now=time.time() - 3600)
    assert await over_socket(stack, "/v1/agent/health",
                             {"X-Nomad-Token": expired}) == (403, "Forbidden")


async def test_task_api_refuses_identity_signed_by_another_key(
        stack: InProcessAgent, other_keyring: Keyring) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    forged = identity_token(other_keyring, alloc)
    assert await over_socket(stack, "/v1/agent/health",
                             {"X-Nomad-Token": forged}) == (403, "Forbidden")


async def test_task_api_accepts_existing_acl_token_and_refuses_expired(
        stack: InProcessAgent) -> None:
    good, old = acl_token(), acl_token(expires=time.time() - 10)
    await seed(stack.server, tokens=(good, old))
    assert (await over_socket(stack, "/v1/agent/self",
                              {"X-Nomad-Token": good.secret_id}))[0] == 200
    assert await over_socket(stack, "/v1/agent/self",
                             {"X-Nomad-Token": old.secret_id}) == (403, "Forbidden")


# ---- TCP API -------------------------------------------------------------------------
async def test_tcp_with_acls_disabled_needs_no_token(stack: InProcessAgent) -> None:
    assert (await over_tcp(stack, "/v1/agent/self"))[0] == 200


async def test_acls_enabled_fail_closed_except_management(acl_stack: InProcessAgent) -> None:
    mgmt, client = acl_token(), acl_token("client")
    alloc = make_alloc()
    await seed(acl_stack.server, tokens=(mgmt, client), allocs=(alloc,))
    # anonymous on TCP: authenticated as anonymous, denied by authorization
    assert await over_tcp(acl_stack, "/v1/agent/self") == (403, "Permission denied")
    assert (await over_tcp(acl_stack, "/v1/agent/health"))[0] == 200
    # anonymous is never available on the Task API
    assert await over_socket(acl_stack, "/v1/agent/health") == (401, "Unauthorized")
    assert await over_tcp(acl_stack, "/v1/agent/self",
                          {"X-Nomad-Token": "nope"}) == (403, "ACL token not found")
    for send in (over_tcp, over_socket):
        assert (await send(acl_stack, "/v1/agent/self",
                           {"X-Nomad-Token": mgmt.secret_id}))[0] == 200
        assert await send(acl_stack, "/v1/agent/self",
                          {"X-Nomad-Token": client.secret_id}) == (403, "Permission denied")
    wid = {"X-Nomad-Token": identity_token(acl_stack.server.keyring, alloc)}
    assert (await over_socket(acl_stack, "/v1/agent/health", wid))[0] == 200
    assert await over_socket(acl_stack, "/v1/agent/self", wid) == (403, "Permission denied")


# ---- routing and bodies --------------------------------------------------------------
async def test_wrong_method_unknown_path_and_bad_bodies(stack: InProcessAgent) -> None:
    assert await over_tcp(stack, "/v1/agent/health", method="DELETE") == (405, "Invalid method")
    assert (await over_tcp(stack, "/v1/nothing"))[0] == 404
    status, body = await over_tcp(stack, "/v1/jobs", method="POST", data=b"{nope")
    assert status == 400 and body.startswith("Failed to decode request body")
    assert await over_tcp(stack, "/v1/jobs", method="POST", data=b"") == \
        (400, "Request body is empty")
    status, body = await over_tcp(stack, "/v1/jobs", method="POST", data=b'{"Jobb": {}}')
    # As Nomad's decoder: a key the request does not know is ignored, so "Job" is missing.
    assert (status, body) == (400, "Job must be specified")
    assert await over_tcp(stack, "/v1/job/x") == (404, "job not found")
    assert (await over_tcp(stack, "/v1/jobs?index=abc"))[:2] == (400, "Invalid index")


async def test_oversized_body_is_refused_without_reading_it(stack: InProcessAgent) -> None:
    status, body = await over_tcp(stack, "/v1/jobs", method="POST",
                                  data=io.BytesIO(b"x" * (9 * 1024 * 1024)))
    assert status == 413 and "too large" in body


async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Send one request on an open connection and read the whole answer; its status line.
    An answer proves the listener admitted the connection (a refused one is just closed)."""
    writer.write(b"GET /v1/agent/health HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None, head
    await asyncio.wait_for(reader.readexactly(int(length.group(1))), 10)
    return head.partition(b"\r\n")[0]


async def test_task_socket_caps_concurrent_connections(stack: InProcessAgent) -> None:
    path = str(task_sock(stack))
    limit = TaskAPIConfig().max_connections_per_task  # the stack runs the defaults
    held = [await asyncio.open_unix_connection(path) for _ in range(limit)]
    for reader, writer in held:  # each one admitted, then held open (kept alive, idle)
        assert await answered(reader, writer) == b"HTTP/1.1 401 Unauthorized"
    reader, writer = await asyncio.open_unix_connection(path)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # refused: closed at once
    writer.close()
    for _, w in held[:4]:
        w.close()
        await w.wait_closed()

    async def health() -> int | None:
        try:
            return (await over_socket(stack, "/v1/agent/health"))[0]
        except aiohttp.ClientConnectionError:
            return None  # refused: the listener has not seen the closes yet

    # Room again once the listener has seen those connections go.
    assert await wait_until(health, "room on the task socket") == 401
    # the TCP listener is a different listener with its own budget
    assert (await over_tcp(stack, "/v1/agent/health"))[0] == 200
    for _, w in held[4:]:
        w.close()
        await w.wait_closed()


async def test_oversized_jobspec_is_refused_before_parsing(stack: InProcessAgent) -> None:
    big = json.dumps({"JobHCL": 'job "x" {\n' + "#" * (300 * 1024) + "\n}"}).encode()
    status, body = await over_tcp(stack, "/v1/jobs/parse", method="POST", data=big)
    assert status == 400 and "too large" in body


# ---- bad input is a 4xx, never a 500 -------------------------------------------------
async def raw_over_socket(path: Path | str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request with header bytes exactly as given (aiohttp's client would refuse or
    re-encode them); the status and body of the reply."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                     + body)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), rest.partition(b"\r\n\r\n")[2]


BAD_TOKEN_HEADERS = [
    b"X-Nomad-Token: \xff\xfe",                 # not UTF-8 at all
    b"X-Nomad-Token: eyJ\x80.eyJ\x80.x",        # JWT-looking, then bytes that are not UTF-8
    b"Authorization: Bearer \xc3\x28",          # invalid UTF-8 sequence
    b"Authorization: Bearer \xed\xa0\x80",      # an encoded surrogate
    b"X-Nomad-Token: \xc3\xa9t\xc3\xa9",        # valid UTF-8, but no credential is non-ASCII
    b"X-Nomad-Token: a\tb",                     # a control character inside the token
]


def health_request(header: bytes, path: bytes = b"/v1/agent/health") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"


@pytest.mark.parametrize("header", BAD_TOKEN_HEADERS)
async def test_task_api_refuses_undecodable_or_unprintable_token(stack: InProcessAgent,
                                                                 header: bytes) -> None:
    assert await raw_over_socket(task_sock(stack), health_request(header)) == (403, b"Forbidden")


@pytest.mark.parametrize("header", BAD_TOKEN_HEADERS)
async def test_acl_api_refuses_undecodable_or_unprintable_token(acl_stack: InProcessAgent,
                                                                header: bytes) -> None:
    assert await raw_over_socket(task_sock(acl_stack), health_request(header)) == \
        (403, b"Forbidden")
    # The TCP API with ACLs on: the same refusal as for any unknown token.
    reader, writer = await asyncio.open_connection(*acl_stack.api.tcp)
    try:
        writer.write(health_request(header, b"/v1/agent/self") + b"Connection: close\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert reply.startswith(b"HTTP/1.1 403 ") and reply.endswith(b"ACL token not found"), reply


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply (limit 64 levels)"),
    (b'{"Job": ' + b'{"a": ' * 64 + b"1" + b"}" * 64 + b"}", "nested too deeply"),
    (b'{"Job": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"\\ud800": 1}', "unpaired UTF-16 surrogate"),
    (b'{"Job": {"ID": "x\\udc00", "Name": "x"}}', "unpaired UTF-16 surrogate"),
    (b'{"Job": {"ID": "\xed\xa0\x80"}}', "not valid UTF-8"),
    (b'{"Job": {"ID": "\xff"}}', "not valid UTF-8"),
])
async def test_json_body_nested_too_deeply_or_not_encodable_is_400(
        stack: InProcessAgent, body: bytes, reason: str) -> None:
    status, text = await over_tcp(stack, "/v1/jobs", method="POST", data=body)
    assert status == 400 and reason in text, (status, text)


async def test_json_body_at_the_depth_limit_and_paired_surrogates_are_fine(
        stack: InProcessAgent) -> None:
    # 64 levels in all: the outer object and 63 below it reach the handler.
    body = b'{"Job": ' + b'{"a": ' * 62 + b"1" + b"}" * 62 + b"}"
    assert await over_tcp(stack, "/v1/jobs", method="POST", data=body) == \
        (400, "Job ID hasn't been provided")
    # Brackets inside strings (escaped quotes too) do not count as nesting.
    body = b'{"Job": {"Name": "\\"' + b"[{" * 200 + b'", "ID": ""}}'
    assert await over_tcp(stack, "/v1/jobs", method="POST", data=body) == \
        (400, "Job ID hasn't been provided")
    assert await over_tcp(stack, "/v1/jobs", method="POST",
                          data=b'{"\\ud83d\\ude00": 1}') == \
        (400, "Job must be specified")  # decoded: the unknown key is then ignored


# ---- bind_identity_to_socket -----------------------------------------------------------
@pytest.mark.parametrize("bind", [False, True])
async def test_identity_bound_to_its_socket(workdir: Path, keyring: Keyring, bind: bool) -> None:
    stack = await task_api_stack(workdir, keyring,
                                 TaskAPIConfig(bind_identity_to_socket=bind))
    try:
        other = make_alloc()
        await seed(stack.agent.server, allocs=(other,))
        mgmt = acl_token()
        await seed(stack.agent.server, tokens=(mgmt,))
        sibling = identity_token(keyring, stack.alloc, task="sidecar")
        # The socket's own allocation: any of its tasks' identities, and ACL tokens, pass.
        for token in (stack.token, sibling, mgmt.secret_id):
            assert (await stack.call("GET", "/v1/agent/health", token=token)).status == 200
        foreign = await stack.call("GET", "/v1/agent/health",
                                   token=identity_token(keyring, other))
        if bind:
            assert (foreign.status, foreign.body) == (403, IDENTITY_NOT_BOUND)
        else:
            assert foreign.status == 200
        # The TCP API never binds an identity to anything.
        async with aiohttp.ClientSession() as session:
            tcp = await call_http(session, stack.agent.api.url, "GET", "/v1/agent/health",
                                  token=identity_token(keyring, other))
        assert tcp.status == 200
    finally:
        await stack.stop()
