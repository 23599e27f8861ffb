"""Roles without etcd: one server-only agent (its own store) and a client-only agent that
reaches it over TCP RPC; what an operator sees from either side."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.harness import AgentProcess, eventually, raw_exec_job

pytestmark = pytest.mark.integration


async def _running(agent: AgentProcess, job_id: str) -> list[dict[str, Any]]:
    async with agent.api() as api:
        allocs = await api.job_allocations(job_id)
    return [a for a in allocs if a["ClientStatus"] == "running"]


async def test_a_client_only_agent_runs_work_of_a_server_only_agent(
        agent_factory: Callable[..., AgentProcess]) -> None:
    server = agent_factory("server", server=True, client=False, node_name="srv")
    await server.start()
    assert server.rpc_address.startswith("127.0.0.1:")
    client = agent_factory("client", server=False, client=True, servers=[server.rpc_address],
                           node_name="cli")
    await client.start()

    async with client.api() as api:
        # Server routes answer through the client-only agent (forwarded over RPC).
        await api.job_register(raw_exec_job("roles", "exec sleep 3600"))
        assert (await api.get("/v1/agent/servers")) == [server.rpc_address]
        self_ = await api.agent_self()
        assert self_["config"]["Client"]["Servers"] == [server.rpc_address]
        assert self_["config"]["Server"]["Enabled"] is False
    (alloc,) = await eventually(lambda: _running(client, "roles"), timeout=30,
                                message="the job running on the client-only agent")
    assert alloc["NodeName"] == "cli"

    async with server.api() as api:
        assert await api.status_leader() == server.rpc_address
        members = await api.get("/v1/agent/members")
        assert [m["Name"] for m in members["Members"]] == ["srv.global"]
        nodes = await api.nodes_list()
        assert [n["Name"] for n in nodes] == ["cli"]

    # The CLI, pointed at the client-only agent, lists the server.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nomad_client", "server", "members",
        env={"NOMAD_ADDR": client.address, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert "srv.global" in out.decode() and "alive" in out.decode()
