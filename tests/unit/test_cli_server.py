"""``server members`` against a real router whose cluster view has two servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest

from nomad_client.cli.main import main
from nomad_client.http.context import TCP_LISTENER
from nomad_client.http.endpoints import register_all
from nomad_client.http.listeners import Listener, tcp_socket
from nomad_client.http.router import Router
from nomad_client.http.services import Services
from nomad_client.server.keyring import Keyring
from tests.unit.factories import make_server

pytestmark = pytest.mark.timeout(60)


@attrs.define
class TwoServers:
    leading: int | None = 1

    def members(self) -> list[dict[str, Any]]:
        # Listed out of order: the CLI sorts by region, datacenter and name.
        return [{"Name": f"s{i}.global", "Addr": f"10.0.0.{i}", "RPCAddr": f"10.0.0.{i}:4647",
                 "HTTPAddr": f"10.0.0.{i}:4646", "Region": "global", "Datacenter": "dc1",
                 "Status": "alive", "Build": "1.8.0"} for i in (2, 1)]

    def leader(self) -> dict[str, Any] | None:
        return None if self.leading is None else {"RPCAddr": f"10.0.0.{self.leading}:4647"}

    def known_servers(self) -> list[str]:
        return ["10.0.0.1:4647", "10.0.0.2:4647"]


@pytest.fixture
async def view(keyring: Keyring, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[TwoServers]:
    server = make_server(keyring)
    cluster = TwoServers()
    router = Router(server)
    register_all(router, Services(server=server, client=None, agent_config={}, cluster=cluster,
                                  member={"Name": "s1.global", "Addr": "10.0.0.1"}))
    sock = tcp_socket("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    listener = Listener(router, TCP_LISTENER, sock)
    try:
        await listener.start()
        monkeypatch.delenv("NOMAD_TOKEN", raising=False)
        monkeypatch.setenv("NOMAD_ADDR", f"http://{host}:{port}")
        yield cluster
    finally:
        await listener.close()
        await server.close()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    def run() -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    # Off the event loop: the router keeps serving while the CLI waits for it.
    return await asyncio.to_thread(run)


async def test_members_in_nomads_columns_with_the_leader_marked(
        capsys: pytest.CaptureFixture[str], view: TwoServers) -> None:
    code, out, err = await cli(capsys, "server", "members")
    assert (code, err) == (0, "")
    header, first, second = out.splitlines()
    assert header.split() == ["Name", "Address", "Port", "Status", "Leader", "Raft", "Version",
                              "Build", "Datacenter", "Region"]
    assert first.split() == ["s1.global", "10.0.0.1", "4647", "alive", "true", "3", "1.8.0",
                             "dc1", "global"]
    assert second.split()[:5] == ["s2.global", "10.0.0.2", "4647", "alive", "false"]


async def test_without_a_leader_no_member_leads(capsys: pytest.CaptureFixture[str],
                                                view: TwoServers) -> None:
    view.leading = None
    code, out, _ = await cli(capsys, "server", "members")
    assert code == 0
    assert [line.split()[4] for line in out.splitlines()[1:]] == ["false", "false"]


async def test_detailed_shows_tags_and_json_the_members(capsys: pytest.CaptureFixture[str],
                                                       view: TwoServers) -> None:
    code, out, _ = await cli(capsys, "server", "members", "-detailed")
    assert code == 0
    assert out.splitlines()[0].split() == ["Name", "Address", "Port", "Status", "Tags"]
    assert "rpc_addr=10.0.0.1" in out.splitlines()[1] and "role=nomad" in out
    code, out, _ = await cli(capsys, "server", "members", "-json")
    assert code == 0
    assert sorted(m["Name"] for m in json.loads(out)) == ["s1.global", "s2.global"]


def test_an_unreachable_agent_is_an_error(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tcp_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv("NOMAD_ADDR", f"http://127.0.0.1:{port}")
    assert main(["server", "members"]) == 1
    assert "Error querying servers" in capsys.readouterr().err
