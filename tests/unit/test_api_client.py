"""ApiClient against a real small aiohttp server on TCP and on Unix sockets."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from nomad_client.api import ApiClient, ApiConnectionError, ApiError, ApiResponse


@attrs.define
class Seen:
    method: str
    path: str  # raw path as sent, with escapes
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes


@attrs.define
class FakeAgent:
    """Records every request and answers from a small table of canned responses."""

    seen: list[Seen] = attrs.field(factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path.split("?")[0],
                              list(request.query.items()), dict(request.headers), body))
        path = request.path
        if path == "/v1/agent/self":
            return web.json_response({"config": {"Region": "global"}, "member": {},
                                      "stats": {}})
        if path == "/v1/job/missing":
            return web.Response(status=404, text="job not found")
        if path == "/v1/jobs" and request.method == "GET":
            return web.json_response([{"ID": "web"}], headers={"X-Nomad-Index": "7"})
        if path == "/v1/jobs" and request.method == "POST":
            return web.json_response({"EvalID": "e1", "Index": 9}, headers={"X-Nomad-Index": "9"})
        if path.startswith("/v1/job/") and request.method == "DELETE":
            return web.json_response({"EvalID": "e2"})
        if path.startswith("/v1/job/") and path.endswith("/allocations"):
            index = int(request.query.get("index", "0"))
            return web.json_response([], headers={"X-Nomad-Index": str(index + 5)})
        if path.startswith("/v1/client/fs/cat/"):
            return web.Response(body=b"\x00raw bytes\n", content_type="application/octet-stream")
        if path.startswith("/v1/client/fs/logs/"):
            return web.Response(text=f"log {request.query.get('type')}\n")
        if path == "/v1/client/metadata":
            doc = json.loads(body) if body else {}
            return web.json_response({"Meta": doc.get("Meta", {}), "Dynamic": {}, "Static": {}})
        if path == "/v1/status/leader":
            return web.json_response("127.0.0.1:4647")
        if path == "/v1/boom":
            return web.Response(status=500, text="Permission denied")
        return web.Response(status=404)


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    yield FakeAgent()


async def _start(agent: FakeAgent, site_factory: Any) -> web.AppRunner:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", agent.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await site_factory(runner).start()
    return runner


@pytest.fixture
async def tcp_address(agent: FakeAgent) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    runner = await _start(agent, lambda r: web.TCPSite(r, "127.0.0.1", port))
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def unix_address(agent: FakeAgent, tmp_path: Path) -> AsyncIterator[str]:
    path = tmp_path / "api.sock"
    runner = await _start(agent, lambda r: web.UnixSite(r, str(path)))
    yield f"unix://{path}"
    await runner.cleanup()


async def test_get_sends_token_and_decodes_json(agent: FakeAgent, tcp_address: str) -> None:
    async with ApiClient(tcp_address, token="secret-1") as c:
        body = await c.agent_self()
    assert body["config"]["Region"] == "global"
    assert agent.seen[0].headers["X-Nomad-Token"] == "secret-1"
    assert agent.seen[0].method == "GET"


async def test_address_and_token_from_environment(
    agent: FakeAgent, tcp_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOMAD_ADDR", tcp_address)
    monkeypatch.setenv("NOMAD_TOKEN", "env-token")
    async with ApiClient() as c:
        assert await c.status_leader() == "127.0.0.1:4647"
    assert agent.seen[0].headers["X-Nomad-Token"] == "env-token"


async def test_no_token_header_without_token(
    agent: FakeAgent, tcp_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOMAD_TOKEN", raising=False)
    async with ApiClient(tcp_address) as c:
        await c.agent_self()
    assert "X-Nomad-Token" not in agent.seen[0].headers


async def test_the_clients_namespace_goes_with_every_request_a_call_names_none(
        agent: FakeAgent, tcp_address: str) -> None:
    async with ApiClient(tcp_address, namespace="prod") as c:
        await c.jobs_list()
        await c.job_deregister("web", purge=True)
        await c.job_allocations("web", namespace="*")  # the call's own wins
        await c.status_leader()
    async with ApiClient(tcp_address) as c:
        await c.jobs_list(namespace="dev")
        await c.jobs_list()
    assert [s.query for s in agent.seen] == [
        [("namespace", "prod")], [("purge", "true"), ("namespace", "prod")],
        [("namespace", "*")], [("namespace", "prod")], [("namespace", "dev")], []]


async def test_default_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOMAD_ADDR", raising=False)
    assert ApiClient().address == "http://127.0.0.1:4646"


async def test_error_status_maps_to_api_error(tcp_address: str) -> None:
    async with ApiClient(tcp_address) as c:
        with pytest.raises(ApiError) as info:
            await c.job_get("missing")
        assert info.value.status == 404
        assert str(info.value) == "Unexpected response code: 404 (job not found)"
        with pytest.raises(ApiError, match=r"500 \(Permission denied\)"):
            await c.get("/v1/boom")
        # request() itself never raises for a status.
        resp = await c.request("GET", "/v1/job/missing")
        assert isinstance(resp, ApiResponse)
        assert (resp.status, resp.text()) == (404, "job not found")


async def test_register_deregister_and_params(agent: FakeAgent, tcp_address: str) -> None:
    async with ApiClient(tcp_address) as c:
        out = await c.job_register({"ID": "web", "Name": "web"})
        await c.job_deregister("web", purge=True)
        await c.job_deregister("web")
        await c.jobs_list(prefix="we")
    post, purge, plain, listing = agent.seen
    assert out["EvalID"] == "e1"
    assert (post.method, post.path) == ("POST", "/v1/jobs")
    assert json.loads(post.body) == {"Job": {"ID": "web", "Name": "web"}}
    assert post.headers["Content-Type"] == "application/json"
    assert (purge.method, purge.query) == ("DELETE", [("purge", "true")])
    assert plain.query == []
    assert listing.query == [("prefix", "we")]


async def test_ids_are_path_escaped(agent: FakeAgent, tcp_address: str) -> None:
    async with ApiClient(tcp_address) as c:
        with pytest.raises(ApiError):
            await c.job_get("a/b c")
    assert agent.seen[0].path == "/v1/job/a%2Fb%20c"


async def test_blocking_query_returns_index(agent: FakeAgent, tcp_address: str) -> None:
    async with ApiClient(tcp_address) as c:
        body, index = await c.get_blocking("/v1/job/web/allocations", 10, wait="2s")
    assert (body, index) == ([], 15)
    assert dict(agent.seen[0].query) == {"index": "10", "wait": "2s"}


async def test_bytes_endpoints(agent: FakeAgent, tcp_address: str) -> None:
    async with ApiClient(tcp_address) as c:
        assert await c.fs_cat("a1", "alloc/x") == b"\x00raw bytes\n"
        assert await c.alloc_logs("a1", "t", stderr=True) == b"log stderr\n"
    assert dict(agent.seen[1].query) == {"task": "t", "type": "stderr", "plain": "true"}


async def test_metadata_apply_sends_nulls(agent: FakeAgent, tcp_address: str) -> None:
    async with ApiClient(tcp_address) as c:
        out = await c.client_metadata_apply({"rack": "r2", "gone": None}, node_id="n1")
    assert out["Meta"] == {"rack": "r2", "gone": None}
    assert json.loads(agent.seen[0].body) == {"Meta": {"rack": "r2", "gone": None}}
    assert agent.seen[0].query == [("node_id", "n1")]


async def test_unix_socket(agent: FakeAgent, unix_address: str) -> None:
    async with ApiClient(unix_address, token="tok") as c:
        assert (await c.agent_self())["config"]["Region"] == "global"
    assert agent.seen[0].headers["Host"] == "localhost"
    assert agent.seen[0].headers["X-Nomad-Token"] == "tok"


async def test_unix_socket_path_longer_than_sun_path(agent: FakeAgent, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock_path = deep / "api.sock"
    assert len(str(sock_path)) > 108
    # The server cannot bind such a path directly either: bind via the directory fd.
    dir_fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"/proc/self/fd/{dir_fd}/api.sock")
    finally:
        os.close(dir_fd)
    runner = await _start(agent, lambda r: web.SockSite(r, listener))
    try:
        client = ApiClient(f"unix://{sock_path}")
        async with client:
            assert await client.status_leader() == "127.0.0.1:4647"
            held = client._dir_fd
            assert held is not None
            assert os.readlink(f"/proc/self/fd/{held}") == str(deep)
        assert client._dir_fd is None
        with pytest.raises(OSError):
            os.fstat(held)  # closed by close()
    finally:
        await runner.cleanup()


async def test_connection_refused_names_address(tcp_address: str) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with ApiClient(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(ApiConnectionError) as info:
            await c.agent_self()
    msg = str(info.value)
    assert f"dial tcp 127.0.0.1:{port}" in msg
    assert "connection refused" in msg
    assert msg.startswith(f'Get "http://127.0.0.1:{port}/v1/agent/self"')


async def test_missing_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "nope.sock"
    async with ApiClient(f"unix://{path}") as c:
        with pytest.raises(ApiConnectionError, match=f"dial unix {path}: connect: no such"):
            await c.agent_self()


def test_bad_addresses_rejected() -> None:
    with pytest.raises(ValueError, match="absolute"):
        ApiClient("unix://relative.sock")
    with pytest.raises(ValueError, match="unsupported"):
        ApiClient("ftp://x:1")
