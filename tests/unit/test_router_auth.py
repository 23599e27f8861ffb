"""The router and its authentication rules, through real listeners on real sockets:
a Task API listener (task_api=True) and a TCP-style listener, over one router."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.http.auth import request_token
from nomad_client.http.context import ListenerContext
from nomad_client.http.endpoints import register_all
from nomad_client.http.listeners import Listener, tcp_socket
from nomad_client.http.router import Router
from nomad_client.http.services import Services
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.structs.models import ACLToken, Allocation

_KEYRINGS: dict[str, Keyring] = {}


async def keyring(tmp_path_factory: pytest.TempPathFactory, name: str = "main") -> Keyring:
    # RSA key generation is slow; one keyring per test session is plenty.
    if name not in _KEYRINGS:
        _KEYRINGS[name] = await Keyring.load_or_create(tmp_path_factory.mktemp(name))
    return _KEYRINGS[name]


@attrs.define
class Stack:
    server: Server
    task_sock: Path
    tcp_url: str
    listeners: list[Listener]

    def alloc_token(self, alloc: Allocation, task: str = "t", **kw: Any) -> str:
        return self.server.keyring.sign_identity(
            namespace=alloc.namespace, job_id=alloc.job_id, alloc_id=alloc.id, task=task,
            group=alloc.task_group, region="global", **kw)


def make_alloc(**changes: Any) -> Allocation:
    base = Allocation(id=str(uuid.uuid4()), namespace="default", eval_id="e", name="j.g[0]",
                      node_id="n", node_name="n", job_id="j",
                      job={"ID": "j", "TaskGroups": [{"Name": "g", "Tasks": []}]},
                      task_group="g", client_status="running")
    return attrs.evolve(base, **changes)


async def build_stack(tmp_path: Path, kr: Keyring, *, acl: bool) -> Stack:
    server = Server(StateStore(), kr, region="global", acl_enabled=acl)
    router = Router(server)
    register_all(router, Services(server=server, client=None, agent_config={},
                                  member={"Addr": "127.0.0.1", "Port": 0}))
    sock_path = tmp_path / "api.sock"
    import socket as socket_mod

    usock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    usock.bind(str(sock_path))
    usock.listen(16)
    usock.setblocking(False)
    task_listener = Listener(router, ListenerContext("task-api", task_api=True, alloc_id="a",
                                                     task="t"), usock)
    tsock = tcp_socket("127.0.0.1", 0)
    port = tsock.getsockname()[1]
    tcp_listener = Listener(router, ListenerContext("http"), tsock)
    for listener in (task_listener, tcp_listener):
        await listener.start()
    return Stack(server, sock_path, f"http://127.0.0.1:{port}", [task_listener, tcp_listener])


@pytest.fixture
async def stack(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    s = await build_stack(tmp_path, await keyring(tmp_path_factory), acl=False)
    yield s
    for listener in s.listeners:
        await listener.close()


@pytest.fixture
async def acl_stack(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> AsyncIterator[Stack]:
    s = await build_stack(tmp_path, await keyring(tmp_path_factory), acl=True)
    yield s
    for listener in s.listeners:
        await listener.close()


async def over_socket(stack: Stack, path: str, headers: dict[str, str] | None = None,
                      method: str = "GET", data: bytes | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(stack.task_sock))) as s:
        async with s.request(method, f"http://localhost{path}", headers=headers or {},
                             data=data) as r:
            return r.status, await r.text()


async def over_tcp(stack: Stack, path: str, headers: dict[str, str] | None = None,
                   method: str = "GET", data: Any = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, stack.tcp_url + path, headers=headers or {},
                             data=data) as r:
            return r.status, await r.text()


async def seed(server: Server, *, tokens: tuple[ACLToken, ...] = (),
               allocs: tuple[Allocation, ...] = ()) -> None:
    await server.store.write({"acl_tokens": [(t.accessor_id, t) for t in tokens],
                              "allocs": [(a.id, a) for a in allocs]})


def acl_token(kind: str = "management", expires: float | None = None) -> ACLToken:
    return ACLToken(accessor_id=str(uuid.uuid4()), secret_id=str(uuid.uuid4()), name="t",
                    type=kind, policies=() if kind == "management" else ("p",),
                    expiration_time=expires)


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
async def test_task_api_without_token_is_401_even_for_unknown_paths(stack: Stack) -> None:
    assert await over_socket(stack, "/v1/agent/health") == (401, "Unauthorized")
    assert await over_socket(stack, "/no/such/path") == (401, "Unauthorized")


@pytest.mark.parametrize("token", [
    "x", str(uuid.uuid4()), "a.b.c", "eyJhbGciOiJub25lIn0.eyJ4IjoxfQ.",
    "Bearer", "\u00e9\u00e9\u00e9",
])
async def test_task_api_rejects_anything_that_is_not_a_credential(stack: Stack,
                                                                  token: str) -> None:
    # Nomad with ACLs disabled lets any non-empty string through; we do not.
    status, body = await over_socket(stack, "/v1/agent/health",
                                     {"X-Nomad-Token": token.encode().decode("latin-1")})
    assert (status, body) == (403, "Forbidden")


async def test_task_api_accepts_live_workload_identity(stack: Stack) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    token = stack.alloc_token(alloc)
    for headers in ({"Authorization": f"Bearer {token}"}, {"X-Nomad-Token": token}):
        status, body = await over_socket(stack, "/v1/agent/health", headers)
        assert status == 200, body
    # Once authenticated, an unknown path is a plain 404.
    assert (await over_socket(stack, "/v1/nope", {"X-Nomad-Token": token}))[0] == 404


async def test_task_api_refuses_identity_of_finished_or_unknown_alloc(stack: Stack) -> None:
    done = make_alloc(client_status="complete")
    stopped = make_alloc(desired_status="stop")
    await seed(stack.server, allocs=(done, stopped))
    unknown = make_alloc()
    for alloc in (done, stopped, unknown):
        headers = {"X-Nomad-Token": stack.alloc_token(alloc)}
        assert await over_socket(stack, "/v1/agent/health", headers) == (403, "Forbidden")


async def test_task_api_identity_stops_working_when_alloc_finishes(stack: Stack) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    headers = {"X-Nomad-Token": stack.alloc_token(alloc)}
    assert (await over_socket(stack, "/v1/agent/health", headers))[0] == 200  # now cached
    await seed(stack.server, allocs=(attrs.evolve(alloc, client_status="failed"),))
    assert await over_socket(stack, "/v1/agent/health", headers) == (403, "Forbidden")


async def test_task_api_refuses_expired_identity(stack: Stack) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    expired = stack.alloc_token(alloc, ttl_seconds=60, now=time.time() - 3600)
    assert await over_socket(stack, "/v1/agent/health",
                             {"X-Nomad-Token": expired}) == (403, "Forbidden")


async def test_task_api_refuses_identity_signed_by_another_key(
        stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    alloc = make_alloc()
    await seed(stack.server, allocs=(alloc,))
    other = await keyring(tmp_path_factory, "other")
    forged = other.sign_identity(namespace="default", job_id="j", alloc_id=alloc.id, task="t",
                                 group="g", region="global")
    assert await over_socket(stack, "/v1/agent/health",
                             {"X-Nomad-Token": forged}) == (403, "Forbidden")


async def test_task_api_accepts_existing_acl_token_and_refuses_expired(stack: Stack) -> None:
    good, old = acl_token(), acl_token(expires=time.time() - 10)
    await seed(stack.server, tokens=(good, old))
    assert (await over_socket(stack, "/v1/agent/self",
                              {"X-Nomad-Token": good.secret_id}))[0] == 200
    assert await over_socket(stack, "/v1/agent/self",
                             {"X-Nomad-Token": old.secret_id}) == (403, "Forbidden")


# ---- TCP API -------------------------------------------------------------------------
async def test_tcp_with_acls_disabled_needs_no_token(stack: Stack) -> None:
    assert (await over_tcp(stack, "/v1/agent/self"))[0] == 200


async def test_acls_enabled_fail_closed_except_management(acl_stack: Stack) -> None:
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
    wid = {"X-Nomad-Token": acl_stack.alloc_token(alloc)}
    assert (await over_socket(acl_stack, "/v1/agent/health", wid))[0] == 200
    assert await over_socket(acl_stack, "/v1/agent/self", wid) == (403, "Permission denied")


# ---- routing and bodies --------------------------------------------------------------
async def test_wrong_method_unknown_path_and_bad_bodies(stack: Stack) -> None:
    assert await over_tcp(stack, "/v1/agent/health", method="DELETE") == (405, "Invalid method")
    assert (await over_tcp(stack, "/v1/nothing"))[0] == 404
    status, body = await over_tcp(stack, "/v1/jobs", method="POST", data=b"{nope")
    assert status == 400 and body.startswith("Failed to decode request body")
    assert await over_tcp(stack, "/v1/jobs", method="POST", data=b"") == \
        (400, "Request body is empty")
    status, body = await over_tcp(stack, "/v1/jobs", method="POST", data=b'{"Jobb": {}}')
    assert (status, body) == (400, "Unknown field(s) in request body: Jobb")
    assert await over_tcp(stack, "/v1/job/x") == (404, "job not found")
    assert (await over_tcp(stack, "/v1/jobs?index=abc"))[:2] == (400, "Invalid index")


async def test_oversized_body_is_refused_without_reading_it(stack: Stack) -> None:
    status, body = await over_tcp(stack, "/v1/jobs", method="POST",
                                  data=io.BytesIO(b"x" * (9 * 1024 * 1024)))
    assert status == 413 and "too large" in body


async def test_task_socket_caps_concurrent_connections(stack: Stack) -> None:
    import asyncio

    from nomad_client.http.listeners import TASK_SOCKET_MAX_CONNECTIONS

    held = [await asyncio.open_unix_connection(str(stack.task_sock))
            for _ in range(TASK_SOCKET_MAX_CONNECTIONS)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_unix_connection(str(stack.task_sock))
    assert await asyncio.wait_for(reader.read(), 2) == b""  # refused: closed at once
    writer.close()
    for _, w in held[:4]:
        w.close()
        await w.wait_closed()
    await asyncio.sleep(0.05)
    assert (await over_socket(stack, "/v1/agent/health"))[0] == 401  # room again
    # the TCP listener is a different listener with its own budget
    assert (await over_tcp(stack, "/v1/agent/health"))[0] == 200
    for _, w in held[4:]:
        w.close()
        await w.wait_closed()


async def test_oversized_jobspec_is_refused_before_parsing(stack: Stack) -> None:
    import json as json_mod

    big = json_mod.dumps({"JobHCL": 'job "x" {\n' + "#" * (300 * 1024) + "\n}"}).encode()
    status, body = await over_tcp(stack, "/v1/jobs/parse", method="POST", data=big)
    assert status == 400 and "too large" in body


# ---- bad input is a 4xx, never a 500 -------------------------------------------------
async def raw_over_socket(path: Path | str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request with header bytes exactly as given (aiohttp's client would refuse or
    re-encode them); the status and body of the reply."""
    import asyncio

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
async def test_task_api_refuses_undecodable_or_unprintable_token(stack: Stack,
                                                                 header: bytes) -> None:
    assert await raw_over_socket(stack.task_sock, health_request(header)) == (403, b"Forbidden")


@pytest.mark.parametrize("header", BAD_TOKEN_HEADERS)
async def test_acl_api_refuses_undecodable_or_unprintable_token(acl_stack: Stack,
                                                                header: bytes) -> None:
    import asyncio

    assert await raw_over_socket(acl_stack.task_sock, health_request(header)) == \
        (403, b"Forbidden")
    # The TCP API with ACLs on: the same refusal as for any unknown token.
    host, port = acl_stack.tcp_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
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
        stack: Stack, body: bytes, reason: str) -> None:
    status, text = await over_tcp(stack, "/v1/jobs", method="POST", data=body)
    assert status == 400 and reason in text, (status, text)


async def test_json_body_at_the_depth_limit_and_paired_surrogates_are_fine(
        stack: Stack) -> None:
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
        (400, "Unknown field(s) in request body: \U0001F600")
