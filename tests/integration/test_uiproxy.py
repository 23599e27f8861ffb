"""The proxy case end to end: ``testdata/jobs/ui-proxy.nomad.hcl`` on a real agent with ACLs
serves the UI and API over HTTPS on its group port, forwarding to its own Task API socket
with the browser's token and never its own identity."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from yarl import URL

from tests.integration.harness import (
    AgentProcess,
    bootstrap_acls,
    eventually,
    raw_exec_job,
    start_ui_proxy,
    task_dir,
    wait_task_state,
)

pytestmark = pytest.mark.timeout(120)


def _insecure() -> ssl.SSLContext:
    # The proxy's certificate is self-signed: this test checks it by hand instead.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
async def proxied(agent_factory: Any) -> AsyncIterator[tuple[AgentProcess, str, str, str]]:
    """(agent, management token, proxy base URL, alloc ID) with the UI proxy running."""
    agent: AgentProcess = agent_factory(acl=True)
    await agent.start()
    token = await bootstrap_acls(agent)
    base, alloc_id = await start_ui_proxy(agent, token)
    try:
        yield agent, token, base, alloc_id
    finally:
        await agent.stop()


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                     connector=aiohttp.TCPConnector(ssl=_insecure())) as s:
        yield s


async def test_serves_the_ui_and_the_api_with_the_browsers_token_only(
        proxied: tuple[AgentProcess, str, str, str], browser: aiohttp.ClientSession) -> None:
    agent, token, base, alloc_id = proxied
    async with browser.get(f"{base}/", allow_redirects=False) as response:
        assert response.status == 307 and response.headers["Location"] == "/ui/"
    async with browser.get(f"{base}/ui/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    async with browser.get(f"{base}/ui/jobs/default/ui-proxy") as response:  # an SPA route
        assert response.status == 200 and response.content_type == "text/html"

    async with browser.get(f"{base}/v1/jobs", headers={"X-Nomad-Token": token}) as response:
        assert response.status == 200
        assert int(response.headers["X-Nomad-Index"]) > 0
        proxied_jobs = await response.json()
    async with agent.api(token) as api:
        direct = await api.request("GET", "/v1/jobs")
    assert [(j["ID"], j["Status"]) for j in proxied_jobs] == [
        (j["ID"], j["Status"]) for j in direct.json()]
    async with browser.get(f"{base}/v1/jobs", headers={
            "Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200

    # No token: the agent refuses. The proxy's task has an identity the agent would accept
    # for reads in its namespace; it is not used.
    for headers in ({}, {"X-Nomad-Token": "not-a-token"},
                    {"Authorization": f"Basic {token}"}):
        async with browser.get(f"{base}/v1/jobs", headers=headers) as response:
            assert response.status in (401, 403), (headers.keys(), response.status)
        async with browser.get(f"{base}/v1/job/ui-proxy", headers=headers) as response:
            assert response.status in (401, 403)

    # Its log: one line per request, never a token.
    logs = task_dir(agent, alloc_id, "proxy").parent / "alloc" / "logs"
    stderr = await eventually(lambda: _read(logs / "proxy.stderr.0"), timeout=10,
                              message="the proxy's request log")
    assert "GET /v1/jobs 200" in stderr and token not in stderr
    # The self-signed certificate's key was on the secrets tmpfs only while being loaded.
    secrets = task_dir(agent, alloc_id, "proxy") / "secrets"
    assert not [p for p in secrets.iterdir() if p.name.startswith("uiproxy-tls-")]


def _read(path: Any) -> str:
    try:
        text: str = path.read_text()
    except OSError:
        return ""
    return text if "GET /v1/jobs" in text else ""


async def test_the_event_stream_streams_through(
        proxied: tuple[AgentProcess, str, str, str], browser: aiohttp.ClientSession) -> None:
    agent, token, base, _ = proxied
    url = URL(f"{base}/v1/event/stream", encoded=True).with_query(topic="Job")
    async with browser.get(url, headers={"X-Nomad-Token": token},
                           timeout=aiohttp.ClientTimeout(total=None, sock_read=30)
                           ) as response:
        assert response.status == 200
        # A job registered after the stream opened shows up in it, while it stays open.
        async with agent.api(token) as api:
            await api.job_register(raw_exec_job("streamed", "sleep 300"))
        deadline = time.monotonic() + 30
        seen = False
        while not seen and time.monotonic() < deadline:
            line = await asyncio.wait_for(response.content.readline(), 30)
            assert line, "the stream ended"
            frame = json.loads(line) if line.strip() else {}
            seen = any(event.get("Key") == "streamed" for event in frame.get("Events") or ())
        assert seen


async def test_the_certificate_is_self_signed_for_localhost(
        proxied: tuple[AgentProcess, str, str, str]) -> None:
    _, _, base, _ = proxied
    port = URL(base).port
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_insecure(),
                                              server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    cert = x509.load_der_x509_certificate(der)
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    # and a client that verifies it as a CA for localhost accepts it
    pem = cert.public_bytes(serialization_pem())
    strict = ssl.create_default_context(cadata=pem.decode())
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=strict,
                                              server_hostname="localhost")
    writer.close()
    await writer.wait_closed()


def serialization_pem() -> Any:
    from cryptography.hazmat.primitives import serialization
    return serialization.Encoding.PEM


async def test_hostile_requests_do_not_crash_it(
        proxied: tuple[AgentProcess, str, str, str], browser: aiohttp.ClientSession) -> None:
    _, token, base, _ = proxied
    port = URL(base).port
    heads = [f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: {token}\r\n".encode()
             for target in ("/v1/../../etc/passwd", "/v1/%2e%2e/%2e%2e/etc/passwd",
                            "/v1/" + "a" * 20000, "/v1/jobs?" + "q=1&" * 5000)]
    heads += [b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: a\rInjected: b\r\n",
              b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: a\r\n folded: x\r\n",
              b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Nomad-Token: " + b"t" * 20000 + b"\r\n"]
    for head in heads:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_insecure())
        writer.write(head + b"Connection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        await writer.wait_closed()
        status = answer.split(b" ", 2)[1] if answer.count(b" ") >= 2 else answer
        assert status == b"400", (head[:60], answer[:300])
    async with browser.get(f"{base}/v1/jobs", headers={"X-Nomad-Token": token}) as response:
        assert response.status == 200  # still serving


async def test_stopping_the_job_ends_it_gracefully_even_with_a_stream_open(
        proxied: tuple[AgentProcess, str, str, str], browser: aiohttp.ClientSession) -> None:
    agent, token, base, alloc_id = proxied
    url = URL(f"{base}/v1/event/stream", encoded=True).with_query(topic="Node")
    async with browser.get(url, headers={"X-Nomad-Token": token},
                           timeout=aiohttp.ClientTimeout(total=None, sock_read=30)
                           ) as response:
        assert response.status == 200
        async with agent.api(token) as api:
            await api.job_deregister("ui-proxy")
            # SIGTERM: the proxy gives the open stream a short grace period, then exits
            # by itself, well within its kill timeout (10 s), so it is never killed.
            alloc = await wait_task_state(api, alloc_id, "proxy", "dead", timeout=30)
        # and the browser's stream ends with it (cleanly or cut off)
        deadline = time.monotonic() + 30
        with contextlib.suppress(aiohttp.ClientError):
            while await asyncio.wait_for(response.content.readline(), 30):
                assert time.monotonic() < deadline, "the stream outlived the proxy"
    state = alloc["TaskStates"]["proxy"]
    assert not state["Failed"], state["Events"]
    assert "Killed" in [e["Type"] for e in state["Events"]]
    logs = task_dir(agent, alloc_id, "proxy").parent / "alloc" / "logs"
    assert "shutting down" in (logs / "proxy.stderr.0").read_text()
