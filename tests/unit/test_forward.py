"""A client-only agent's HTTP API: server endpoints forwarded over ``Agent.HTTP`` to a real
server's router, through real listeners (TCP and a task socket).

The client-only router authenticates with the same state the server holds (in the agent,
its credential source answers from the servers): what matters here is that it refuses
before anything is forwarded, and that the server checks everything again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from nomad_client.cli.main import main
from nomad_client.http.context import TCP_LISTENER
from nomad_client.http.endpoints import register_all
from nomad_client.http.forward import BLOCKING_MARGIN, HTTPForwarder, forwarded_dispatch
from nomad_client.http.listeners import tcp_socket
from nomad_client.http.router import Router
from nomad_client.http.services import Services
from nomad_client.rpcwire.errors import NoServer
from nomad_client.server.keyring import Keyring
from nomad_client.server.rpc_http import make_http_handler, streaming_endpoint
from nomad_client.server.server import Server
from nomad_client.structs.codec import msgpack_roundtrip
from tests.unit.factories import (
    ServedAPI,
    acl_token,
    call_http_once,
    call_unix,
    job,
    make_server,
    node,
    seed,
    task_api_server,
    unix_socket,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

NODE_SECRET = "5e0c2a51-0000-4000-8000-00000000abcd"
MEMBER = {"Name": "client.global", "Addr": "127.0.0.1", "Port": 0,
          "Tags": {"region": "global", "dc": "dc1"}, "Status": "alive"}


@attrs.define
class FakeTransport:
    """The client's RPC transport, wired to the server's ``Agent.HTTP`` handler in process
    (through msgpack, as over the wire); it can be made unreachable."""

    server: Server
    handler: Any
    calls: list[tuple[str, dict[str, Any], float | None]] = attrs.field(factory=list)
    unreachable: bool = False

    async def call(self, method: str, args: dict[str, Any], *,
                   timeout: float | None = None) -> Any:
        self.calls.append((method, args, timeout))
        if self.unreachable:
            raise NoServer("no servers reachable: 127.0.0.1:4647")
        assert method == "Agent.HTTP"
        return msgpack_roundtrip(await self.handler(self.server, msgpack_roundtrip(args)))


@attrs.frozen
class NoCluster:
    def members(self) -> list[dict[str, Any]]:
        return []

    def leader(self) -> dict[str, Any] | None:
        return None

    def known_servers(self) -> list[str]:
        return ["127.0.0.1:4647"]


@attrs.define
class Stack:
    server: Server
    transport: FakeTransport
    api: ServedAPI
    token: str

    @property
    def url(self) -> str:
        return self.api.url


@pytest.fixture
async def stack(keyring: Keyring, tmp_path: Path) -> AsyncIterator[Stack]:
    server = make_server(keyring, acl=True)
    server_router = Router(server)
    register_all(server_router, Services(server=server, client=None, agent_config={},
                                         member=MEMBER))
    await server.register_node(node("n1", secret_id=NODE_SECRET))
    management = acl_token()
    await seed(server, tokens=(management,))
    transport = FakeTransport(server, make_http_handler(forwarded_dispatch(server_router)))

    client_router = Router(server)  # its credential source: the same state as the server's
    forwarder = HTTPForwarder(transport, lambda: ("n1", NODE_SECRET))
    register_all(client_router, Services(server=None, client=None, agent_config={},
                                         member=MEMBER, cluster=NoCluster(),
                                         forward=forwarder))
    tsock = tcp_socket("127.0.0.1", 0)
    api = ServedAPI(server, client_router, tsock.getsockname()[:2], tmp_path / "api.sock",
                    task_api=task_api_server(client_router, audit_dir=tmp_path))
    try:
        await api.listen(TCP_LISTENER, tsock)
        assert api.task_sock is not None
        await api.serve_task(unix_socket(api.task_sock))
        yield Stack(server, transport, api, management.secret_id)
    finally:
        await api.close()
        await server.close()


async def test_a_job_list_is_forwarded_with_its_index(stack: Stack) -> None:
    await stack.server.register_job(job(count=1))
    answer = await call_http_once(stack.url, "GET", "/v1/jobs", token=stack.token)
    assert answer.status == 200
    assert [j["ID"] for j in answer.body] == ["web"]
    assert answer.nomad_index is not None and answer.nomad_index > 0
    [(method, args, timeout)] = stack.transport.calls
    assert method == "Agent.HTTP" and args["Path"] == "/v1/jobs" and args["TaskAPI"] is False
    assert args["NodeID"] == "n1" and timeout is not None
    # Only the allow-listed headers travel.
    assert set(args["Headers"]) <= {"X-Nomad-Token", "Authorization", "Content-Type", "Accept"}


async def test_a_write_with_a_body_is_forwarded(stack: Stack) -> None:
    written = await call_http_once(stack.url, "PUT", "/v1/namespace/team",
                                   {"Name": "team", "Description": "the team"},
                                   token=stack.token)
    assert written.status == 200, written.body
    namespace = stack.server.namespace("team")
    assert namespace is not None and namespace.description == "the team"
    read = await call_http_once(stack.url, "GET", "/v1/namespace/team", token=stack.token)
    assert read.status == 200 and read.body["Description"] == "the team"
    assert stack.transport.calls[0][1]["Body"].startswith(b"{")


async def test_a_blocking_query_waits_on_the_server_and_keeps_its_headers(stack: Stack
                                                                          ) -> None:
    first = await call_http_once(stack.url, "GET", "/v1/jobs", token=stack.token)
    index = first.nomad_index
    assert index is not None
    blocked = asyncio.create_task(call_http_once(
        stack.url, "GET", f"/v1/jobs?index={index}&wait=30s", token=stack.token))
    try:
        await wait_until(lambda: len(stack.transport.calls) == 2, "the blocking query forwarded")
        assert not blocked.done()
        await stack.server.register_job(job(count=1))
        answer = await asyncio.wait_for(blocked, 20)
    finally:
        blocked.cancel()
        await asyncio.gather(blocked, return_exceptions=True)
    assert answer.status == 200 and [j["ID"] for j in answer.body] == ["web"]
    assert answer.nomad_index is not None and answer.nomad_index > index
    assert answer.headers["X-Nomad-KnownLeader"] == "true"
    assert "X-Nomad-LastContact" in answer.headers
    timeout = stack.transport.calls[1][2]
    assert timeout is not None and timeout >= 30 + BLOCKING_MARGIN


async def test_callers_the_local_router_refuses_cause_no_rpc(stack: Stack) -> None:
    anonymous = await call_http_once(stack.url, "GET", "/v1/jobs")
    assert anonymous.status == 403
    unknown = await call_http_once(stack.url, "GET", "/v1/jobs", token="not-a-token")
    assert (unknown.status, unknown.body) == (403, "ACL token not found")
    assert stack.transport.calls == []
    # What is wrong with a request the caller may make is the server's to say.
    bad_index = await call_http_once(stack.url, "GET", "/v1/jobs?index=x", token=stack.token)
    assert (bad_index.status, bad_index.body) == (400, "Invalid index")


async def test_task_api_anonymous_is_refused_on_both_sides(stack: Stack) -> None:
    assert stack.api.task_sock is not None
    refused = await call_unix(stack.api.task_sock, "GET", "/v1/jobs")
    assert refused.status == 401
    assert stack.transport.calls == []
    # With a credential, the request travels marked as a Task API one.
    allowed = await call_unix(stack.api.task_sock, "GET", "/v1/jobs", token=stack.token)
    assert allowed.status == 200
    assert stack.transport.calls[0][1]["TaskAPI"] is True
    # A node that forwards a Task API request without a credential is refused by the
    # server too, whatever the server's anonymous policy.
    handler = stack.transport.handler
    reply = await handler(stack.server, {"NodeID": "n1", "SecretID": NODE_SECRET,
                                         "Method": "GET", "Path": "/v1/jobs", "Headers": {},
                                         "Body": b"", "TaskAPI": True})
    assert reply["Status"] == 401


async def test_unreachable_servers_are_a_503(stack: Stack) -> None:
    stack.transport.unreachable = True
    answer = await call_http_once(stack.url, "GET", "/v1/jobs", token=stack.token)
    assert answer.status == 503 and "No server reachable" in answer.body


async def test_streaming_endpoints_are_not_forwarded(stack: Stack) -> None:
    answer = await call_http_once(stack.url, "GET", "/v1/event/stream", token=stack.token)
    assert answer.status == 501 and "server agent" in answer.body
    assert stack.transport.calls == []
    for path in ("/v1/event/stream?topic=Job", "/v1/event/%73tream", "//v1/event/stream/",
                 "/v1/client/fs/logs/a?follow=true", "/v1/client/allocation/a%2Fb/exec"):
        assert streaming_endpoint(path) is not None, path
    assert streaming_endpoint("/v1/jobs") is None
    assert streaming_endpoint("/v1/client/fs/cat/a") is None


def _args(**changes: Any) -> dict[str, Any]:
    return {"NodeID": "n1", "SecretID": NODE_SECRET, "Method": "GET", "Path": "/v1/jobs",
            "Headers": {}, "Body": b"", "TaskAPI": False} | changes


async def test_the_server_side_checks_the_node_and_the_request(stack: Stack) -> None:
    handler, server = stack.transport.handler, stack.server
    with pytest.raises(PermissionError):
        await handler(server, _args(SecretID="wrong"))
    with pytest.raises(PermissionError):
        await handler(server, _args(NodeID="nope"))
    with pytest.raises(PermissionError):
        await handler(server, _args(SecretID=None))
    for bad in (_args(Method="BREW"), _args(Path="v1/jobs"), _args(Path="/v1/jobs\r\nX: y"),
                _args(Path=7), _args(Headers=[]), _args(Body="text"),
                _args(Headers={"X-Nomad-Token": "a\nb"})):
        with pytest.raises(ValueError):
            await handler(server, bad)
    streamed = await handler(server, _args(Path="/v1/event/%73tream",
                                           Headers={"X-Nomad-Token": stack.token}))
    assert streamed["Status"] == 501
    # Headers beyond the allow-list are dropped: a Host header never reaches the router.
    listed = await handler(server, _args(Headers={"X-Nomad-Token": stack.token,
                                                  "Host": "evil.example"}))
    assert listed["Status"] == 200 and json.loads(listed["Body"]) == []


async def test_a_refused_write_with_an_unread_body_is_answered(stack: Stack) -> None:
    handler, server = stack.transport.handler, stack.server
    body = json.dumps({"Name": "team"}).encode() * 1000
    reply = await handler(server, _args(Method="PUT", Path="/v1/namespace/team", Body=body))
    assert reply["Status"] == 403
    assert server.namespace("team") is None


async def test_a_client_only_agent_needs_a_forwarder(keyring: Keyring) -> None:
    server = make_server(keyring)
    try:
        with pytest.raises(ValueError, match="forwarder"):
            register_all(Router(server), Services(server=None, client=None, agent_config={},
                                                  member=MEMBER))
    finally:
        await server.close()


async def test_node_status_lists_every_clients_node_through_a_client_only_agent(
        stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    await stack.server.register_node(node("n2", name="other-client"))
    monkeypatch.setenv("NOMAD_ADDR", stack.url)
    monkeypatch.setenv("NOMAD_TOKEN", stack.token)

    def run() -> tuple[int, str, str]:
        code = main(["node", "status"])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = await asyncio.to_thread(run)  # the agent keeps serving meanwhile
    assert (code, err) == (0, "")
    names = {line.split()[3] for line in out.splitlines()[1:]}
    assert {"n1", "other-client"} <= names, out
    assert all(call[1]["Path"].startswith("/v1/nodes") for call in stack.transport.calls)
