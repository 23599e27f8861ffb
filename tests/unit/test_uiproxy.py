"""The UI proxy (``nomad_client.uiproxy``) against a fake agent on a Unix socket: header
allow-lists both ways, the browser's token and only it, streaming, the body cap, the UI's
files, hostile paths, its log lines and its self-signed certificate."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from yarl import URL

from nomad_client import uiproxy
from nomad_client.uiproxy import (
    Settings,
    forward_request_headers,
    forward_response_headers,
    loggable_path,
    parse_args,
    upstream_target,
)

TOKEN = "0b8e3f4a-5c6d-4e7f-8a9b-0c1d2e3f4a5b"
UI_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'",
              "X-Frame-Options": "DENY"}


# ---------------------------------------------------------------------- pure functions


def test_request_headers_keep_only_the_allow_list() -> None:
    sent = {"x-nomad-token": TOKEN, "Content-Type": "application/json",
            "Accept": "application/json", "Cookie": "a=b", "Host": "evil.example",
            "X-Forwarded-For": "10.0.0.1", "Accept-Encoding": "gzip", "Origin": "https://x",
            "X-Nomad-Something": "y", "Connection": "upgrade", "Upgrade": "websocket"}
    assert forward_request_headers(sent) == {
        "X-Nomad-Token": TOKEN, "Content-Type": "application/json",
        "Accept": "application/json", "Accept-Encoding": "identity"}


@pytest.mark.parametrize("value, forwarded", [
    (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), ("Basic dXNlcjpwYXNz", False),
    ("Bearer ", False), ("Bearer", False), (TOKEN, False), ("Token abc", False)])
def test_authorization_goes_on_only_as_a_bearer_token(value: str, forwarded: bool) -> None:
    out = forward_request_headers({"Authorization": value})
    assert ("Authorization" in out) is forwarded
    if forwarded:
        assert out["Authorization"] == value


def test_response_headers_keep_only_the_allow_list_and_add_ours() -> None:
    answer = {"Content-Type": "application/json", "X-Nomad-Index": "42",
              "X-Nomad-KnownLeader": "true", "Set-Cookie": "s=1", "Server": "agent",
              "Access-Control-Allow-Origin": "*", "X-Frame-Options": "ALLOWALL",
              "Content-Security-Policy": "default-src *", "Location": "http://evil/"}
    out = forward_response_headers(answer)
    assert out["X-Nomad-Index"] == "42" and out["Content-Type"] == "application/json"
    assert out["X-Nomad-KnownLeader"] == "true"
    for dropped in ("Set-Cookie", "Server", "Access-Control-Allow-Origin", "Location"):
        assert dropped not in out
    # the agent cannot loosen the proxy's own headers
    assert out.getall("X-Frame-Options") == ["DENY"]
    assert out.getall("Content-Security-Policy") == [
        "default-src 'none'; frame-ancestors 'none'"]
    assert out["X-Content-Type-Options"] == "nosniff"
    assert out["Strict-Transport-Security"].startswith("max-age=")


@pytest.mark.parametrize("raw, ok", [
    ("/v1/jobs", True), ("/v1/jobs?namespace=*&index=3&wait=30s", True),
    ("/v1/job/batch%2Fdispatch-1", True), ("/v1/var/a/b/c", True),
    ("/v1/../../etc/passwd", False), ("/v1/%2e%2e/agent/self", False),
    ("/v1/%2E./x", False), ("/v1/./jobs", False), ("//evil.example/v1/jobs", False),
    ("http://evil.example/v1/jobs", False), ("*", False), ("", False),
    ("/v1/jobs\r\nX-Nomad-Token: x", False), ("/v1/a b", False)])
def test_upstream_target_refuses_paths_that_could_route_elsewhere(raw: str, ok: bool) -> None:
    assert (upstream_target(raw) == raw) is ok


def test_loggable_path_drops_the_query_and_escapes() -> None:
    assert loggable_path(f"/v1/jobs?token={TOKEN}") == "/v1/jobs"
    assert loggable_path("/v1/\x1b[31m\u00e9") == "/v1/\\x1b[31m\\xe9"
    assert len(loggable_path("/" + "a" * 10000)) < 300


def test_arguments_default_to_the_task_environment() -> None:
    env = {"NOMAD_PORT_https": "28443", "NOMAD_SECRETS_DIR": "/secrets"}
    settings = parse_args([], env)
    assert (settings.host, settings.port) == ("0.0.0.0", 28443)
    assert settings.socket_path == "/secrets/api.sock"
    assert settings.names == ()
    settings = parse_args(["--listen", "127.0.0.1:0", "--socket", "/s", "--name", "ui.test"],
                          {})
    assert (settings.host, settings.port, settings.socket_path) == ("127.0.0.1", 0, "/s")
    assert settings.names == ("ui.test", "127.0.0.1")
    assert parse_args(["--listen", "[::1]:443", "--socket", "/s"], {}).host == "::1"


@pytest.mark.parametrize("argv", [
    [], ["--listen", "127.0.0.1:1"], ["--listen", "nope", "--socket", "/s"],
    ["--listen", "h:1", "--socket", "/s", "--cert", "c"],
    ["--listen", "h:1", "--socket", "/s", "--max-body", "0"]])
def test_bad_arguments_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]
                                   ) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, {})
    assert exc.value.code == 2
    capsys.readouterr()


def test_self_signed_certificate_names_localhost_and_the_given_names() -> None:
    cert_pem, key_pem = uiproxy.self_signed(["ui.example.test", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.issuer == cert.subject  # self-signed
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    assert cn[0].value == "localhost"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "ui.example.test"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")}
    assert b"PRIVATE KEY" in key_pem and b"PRIVATE KEY" not in cert_pem
    assert len(uiproxy.fingerprint(cert_pem).split(":")) == 32


# ---------------------------------------------------------------------- against a fake agent


class FakeAgent:
    """An aiohttp app on a Unix socket that tells what it received."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_route("*", "/v1/echo{tail:.*}", self.echo)
        app.router.add_get("/v1/jobs", self.jobs)
        app.router.add_get("/v1/stream", self.stream)
        self.runner = web.AppRunner(app, access_log=None)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append({"headers": dict(request.headers), "path": request.raw_path,
                          "method": request.method, "body": len(body)})
        return web.json_response(self.seen[-1], headers={
            "X-Nomad-Index": "7", "Set-Cookie": "session=1", "Server": "fake",
            "Access-Control-Allow-Origin": "*"})

    async def jobs(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Nomad-Token") != TOKEN:
            return web.Response(status=401, text="Unauthorized")
        return web.json_response([{"ID": "example"}], headers={"X-Nomad-Index": "9"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        await response.write(b'{"first":true}\n')
        await self.release.wait()
        await response.write(b'{"second":true}\n')
        await response.write_eof()
        return response


@pytest.fixture
async def fake_agent(tmp_path: Path) -> AsyncIterator[tuple[FakeAgent, Path]]:
    # A deep directory: the socket's path is longer than sun_path, as a task's often is.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "api.sock"
    agent = FakeAgent()
    await agent.runner.setup()
    await web.UnixSite(agent.runner, str(_short(path))).start()
    try:
        yield agent, path
    finally:
        agent.release.set()
        await agent.runner.cleanup()


def _short(path: Path) -> str:
    # Binding needs a short name too: go through the directory's /proc/self/fd entry.
    import os
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    _FDS.append(fd)
    return f"/proc/self/fd/{fd}/{path.name}"


_FDS: list[int] = []


@pytest.fixture(autouse=True)
def _close_fds() -> object:
    import os
    yield None
    while _FDS:
        os.close(_FDS.pop())


async def _fake_assets(name: str) -> tuple[bytes, str] | None:
    files = {"index.html": (b"<!doctype html><title>ui</title>", "text/html; charset=utf-8"),
             "app.js": (b"export {};", "text/javascript; charset=utf-8")}
    return files.get(name)


@pytest.fixture
async def proxy(fake_agent: tuple[FakeAgent, Path]) -> AsyncIterator[str]:
    """The proxy's app over plain HTTP (TLS has its own test): its base URL."""
    _, socket_path = fake_agent
    settings = Settings(host="127.0.0.1", port=0, socket_path=str(socket_path), max_body=1024)
    app = uiproxy.build_app(settings, assets=_fake_assets, ui_headers=lambda: UI_HEADERS)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def test_the_browsers_token_and_allowed_headers_reach_the_agent(
        proxy: str, fake_agent: tuple[FakeAgent, Path], session: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nomad_client.uiproxy")
    headers = {"X-Nomad-Token": TOKEN, "Cookie": "c=1", "X-Forwarded-For": "1.2.3.4",
               "Content-Type": "application/json"}
    target = f"/v1/echo/..%2Fjob%2Fb%2Fdispatch?namespace=a%2Fb&token={TOKEN}"
    async with session.put(URL(proxy + target, encoded=True),
                           headers=headers, data=b'{"a":1}') as response:
        assert response.status == 200
        seen = await response.json()
        assert response.headers["X-Nomad-Index"] == "7"
        for dropped in ("Set-Cookie", "Access-Control-Allow-Origin"):
            assert dropped not in response.headers
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert seen["method"] == "PUT" and seen["body"] == 7
    assert seen["path"] == target
    got = {k.lower(): v for k, v in seen["headers"].items()}
    assert got["x-nomad-token"] == TOKEN
    assert got["content-type"] == "application/json"
    assert "cookie" not in got and "x-forwarded-for" not in got
    # one line for the request, without its query or any header
    lines = [r.getMessage() for r in caplog.records if r.name == "nomad_client.uiproxy"]
    assert lines == [lines[0]] and lines[0].startswith("PUT /v1/echo/..%2Fjob%2Fb%2Fdispatch 200 ")
    assert TOKEN not in caplog.text and "namespace" not in caplog.text


async def test_no_token_reaches_the_agent_as_none(
        proxy: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{proxy}/v1/jobs") as response:
        assert response.status == 401
    async with session.get(f"{proxy}/v1/jobs", headers={"X-Nomad-Token": TOKEN}) as response:
        assert response.status == 200
        assert response.headers["X-Nomad-Index"] == "9"
        assert await response.json() == [{"ID": "example"}]


async def test_answers_stream_through(proxy: str, fake_agent: tuple[FakeAgent, Path],
                                      session: aiohttp.ClientSession) -> None:
    agent, _ = fake_agent
    async with session.get(f"{proxy}/v1/stream") as response:
        assert response.status == 200
        # The first line arrives while the agent still holds the rest back.
        first = await asyncio.wait_for(response.content.readline(), 10)
        assert first == b'{"first":true}\n'
        agent.release.set()
        assert await response.content.read() == b'{"second":true}\n'


async def test_request_bodies_over_the_cap_are_refused(
        proxy: str, fake_agent: tuple[FakeAgent, Path], session: aiohttp.ClientSession
        ) -> None:
    agent, _ = fake_agent
    async with session.put(f"{proxy}/v1/echo", data=b"x" * 2048) as response:
        assert response.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 512
    async with session.put(f"{proxy}/v1/echo", data=chunks()) as response:
        assert response.status == 413
    assert all(seen["body"] <= 1024 for seen in agent.seen)
    async with session.put(f"{proxy}/v1/echo", data=b"z" * 1000) as response:
        assert response.status == 200


async def test_ui_files_and_redirects(proxy: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{proxy}/", allow_redirects=False) as response:
        assert response.status == 307 and response.headers["Location"] == "/ui/"
    for path in ("/ui/", "/ui/jobs/default/x", "/ui/../../etc/passwd", "/ui/app.css"):
        async with session.get(URL(proxy + path, encoded=True),
                               allow_redirects=False) as response:
            assert response.status == 200, path
            assert response.content_type == "text/html"
            assert await response.read() == b"<!doctype html><title>ui</title>"
            assert response.headers["Content-Security-Policy"] == UI_HEADERS[
                "Content-Security-Policy"]
            assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    async with session.get(f"{proxy}/ui/app.js") as response:
        assert response.content_type == "text/javascript"
        assert await response.read() == b"export {};"
    async with session.post(f"{proxy}/ui/", data=b"x") as response:
        assert response.status == 405


async def test_hostile_requests_get_clear_errors(
        proxy: str, fake_agent: tuple[FakeAgent, Path], session: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    agent, _ = fake_agent
    port = int(proxy.rsplit(":", 1)[1])
    heads = [f"GET {target} HTTP/1.1\r\nHost: x\r\n".encode() for target in (
        "/v1/../../etc/passwd", "/v1/%2e%2e/agent/self", "/v1/./echo", "/" + "a" * 20000)]
    heads += [b"GET /v1/echo HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: a\rInjected: b\r\n",
              b"GET /v1/echo HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: a\r\n folded\r\n",
              b"GET /v1/echo HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: " + b"t" * 20000 + b"\r\n",
              b"GET /v1/echo HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: a\x00b\r\n",
              b"GET /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n"]
    for head in heads:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert answer[:16] in (b"HTTP/1.1 400 Bad", b"HTTP/1.0 400 Bad"), (head[:60], answer)
    # aiohttp logs each with a traceback quoting the request: the proxy drops those records
    quiet = uiproxy.QuietBadRequests()
    bad = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert bad and not any(quiet.filter(r) for r in bad)
    assert quiet.filter(logging.LogRecord("aiohttp.server", logging.ERROR, "", 0,
                                          "Error handling request", (), None))
    assert agent.seen == []  # none of them reached the agent
    async with session.get(f"{proxy}/v1/echo") as response:  # still serving
        assert response.status == 200


async def test_an_absent_socket_is_a_bad_gateway(tmp_path: Path,
                                                 session: aiohttp.ClientSession) -> None:
    settings = Settings(host="127.0.0.1", port=0, socket_path=str(tmp_path / "none.sock"))
    runner = web.AppRunner(uiproxy.build_app(settings, assets=_fake_assets), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        async with session.get(f"http://127.0.0.1:{port}/v1/jobs") as response:
            assert response.status == 502
            assert "socket" in await response.text()
    finally:
        await runner.cleanup()


async def test_serves_tls_with_a_self_signed_certificate_and_stops(
        fake_agent: tuple[FakeAgent, Path], session: aiohttp.ClientSession) -> None:
    _, socket_path = fake_agent
    settings = Settings(host="127.0.0.1", port=0, socket_path=str(socket_path))
    stop = asyncio.Event()
    ports: list[int] = []
    ready = asyncio.Event()

    def started(port: int) -> None:
        ports.append(port)
        ready.set()
    server = asyncio.create_task(uiproxy.serve(settings, stop, started=started))
    try:
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({server, waiting}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert ports, server.result() if server.done() else "not started in 20 s"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        async with session.get(f"https://127.0.0.1:{ports[0]}/v1/jobs", ssl=context,
                               headers={"X-Nomad-Token": TOKEN}) as response:
            assert response.status == 200
            assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        _, writer = await asyncio.open_connection("127.0.0.1", ports[0], ssl=context)
        cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        parsed = x509.load_der_x509_certificate(cert)
        assert parsed.issuer == parsed.subject
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
    finally:
        stop.set()
        await asyncio.wait_for(server, 20)
