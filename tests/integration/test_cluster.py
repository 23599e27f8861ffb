"""A real cluster on loopback: 3 etcd members, 2 server agents keeping their state in etcd,
3 client-only agents reaching the servers over TCP RPC. Each step checks what an operator
would: jobs spread over the clients, tasks' sockets answer with their identities, the
scheduling server's death moves scheduling to the other within its lease, an etcd member's
death changes nothing visible, a dead client's node goes down and its allocation is replaced
(and stopped on it when it comes back), and a client cut off from every server keeps its
tasks and their sockets."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest

from nomad_client.api.client import ApiClient
from tests.integration.etcd_cluster import EtcdCluster
from tests.integration.harness import (
    AgentProcess,
    eventually,
    raw_exec_job,
    task_dir,
)
from tests.integration.test_taskapi import answers, sock_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

LEASE_TTL = 3
# Small heartbeat settings so a dead node is noticed in seconds, not Nomad's 10 s + 10 s.
HEARTBEAT = {"min_heartbeat_ttl": "2s", "heartbeat_grace": "2s"}
SLEEPER = "echo started; exec sleep 3600"


@attrs.define
class Cluster:
    etcd: EtcdCluster
    servers: list[AgentProcess]
    clients: list[AgentProcess]
    make: Callable[..., AgentProcess]
    token: str = ""

    def api(self, agent: AgentProcess) -> ApiClient:
        return agent.api(self.token)

    def live_servers(self) -> list[AgentProcess]:
        return [s for s in self.servers if s.proc is not None]

    async def leader(self) -> AgentProcess | None:
        """The server agent every live server names as leader, if they agree."""
        named = set()
        for server in self.live_servers():
            async with self.api(server) as api:
                response = await api.request("GET", "/v1/status/leader")
            if response.status != 200:
                return None
            named.add(response.json())
        if len(named) != 1:
            return None
        (address,) = named
        return next((s for s in self.live_servers() if s.rpc_address == address), None)


def _kek_file(root: Path) -> Path:
    path = root / "kek"
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
async def cluster(tmp_path: Path, agent_factory: Callable[..., AgentProcess]
                  ) -> AsyncIterator[Cluster]:
    async with EtcdCluster(tmp_path / "etcd", members=3) as etcd:
        kek = _kek_file(tmp_path)
        server_block = {"store": "etcd", "keyring_kek_file": str(kek),
                        "leader_lease_ttl": f"{LEASE_TTL}s", **HEARTBEAT,
                        "etcd": {"endpoints": list(etcd.endpoints), "prefix": "/nomad-test/"}}
        servers = [agent_factory(f"s{i}", node_name=f"s{i}", acl=True, server=True, client=False,
                                 cluster={"server": server_block}) for i in (1, 2)]
        for server in servers:
            await server.start(timeout=60)
        addresses = [s.rpc_address for s in servers]
        assert all(addresses), [s.output for s in servers]
        clients = [agent_factory(f"c{i}", node_name=f"c{i}", acl=True, server=False, client=True,
                                 servers=addresses) for i in (1, 2, 3)]
        for client in clients:
            await client.start(timeout=60)
        made = Cluster(etcd, servers, clients, agent_factory)
        async with servers[0].api() as api:
            made.token = str((await api.acl_bootstrap())["SecretID"])
        yield made


async def _nodes_ready(cluster: Cluster, count: int) -> list[dict[str, Any]]:
    async with cluster.api(cluster.servers[0]) as api:
        nodes = await api.nodes_list()
    ready = [n for n in nodes if n["Status"] == "ready"]
    return ready if len(ready) == count else []


async def _running_allocs(api: ApiClient, job_id: str, count: int) -> list[dict[str, Any]]:
    allocs = await api.job_allocations(job_id)
    running = [a for a in allocs if a["ClientStatus"] == "running"]
    return running if len(running) == count else []


def _client_of(cluster: Cluster, alloc: dict[str, Any]) -> AgentProcess:
    (agent,) = [c for c in cluster.clients if c.name == alloc["NodeName"]]
    return agent


def _sock(agent: AgentProcess, alloc_id: str) -> Path:
    return task_dir(agent, alloc_id, "t") / "secrets" / "api.sock"


def _identity(agent: AgentProcess, alloc_id: str) -> str:
    return (task_dir(agent, alloc_id, "t") / "secrets" / "nomad_token").read_text()


async def test_a_cluster_on_etcd_survives_its_failures(cluster: Cluster) -> None:
    await eventually(lambda: _nodes_ready(cluster, 3), timeout=60, message="3 ready nodes")
    s1 = cluster.servers[0]
    async with cluster.api(s1) as api:
        await api.variable_write("nomad/jobs/web", {"greeting": "hello"})
        await api.acl_policy_apply({"Name": "readonly", "Rules": 'namespace "default" '
                                    '{ policy = "read" }'})
        reader = await api.acl_token_create({"Name": "reader", "Type": "client",
                                             "Policies": ["readonly"]})
        await api.job_register(raw_exec_job("web", SLEEPER, count=3,
                                            identity={"File": True}))
        running = await eventually(lambda: _running_allocs(api, "web", 3), timeout=60,
                                   message="3 running allocations of web")
    # Spread: one allocation on each client.
    assert sorted(a["NodeName"] for a in running) == ["c1", "c2", "c3"]

    # Each task's socket answers with its identity, also for what only servers hold.
    for alloc in running:
        agent = _client_of(cluster, alloc)
        sock, token = _sock(agent, alloc["ID"]), _identity(agent, alloc["ID"])
        await eventually(lambda s=sock, t=token: answers(s, t), timeout=30,  # type: ignore[misc]
                         message="the task's socket")
        read = await sock_request(sock, "/v1/var/nomad/jobs/web", token=token)
        assert read.status == 200, read.text
        assert read.json()["Items"] == {"greeting": "hello"}
        assert (await sock_request(sock, "/v1/var/nomad/jobs/web")).status in (401, 403)

    # The scheduling server dies: the other takes over within its lease.
    leader = await eventually(cluster.leader, timeout=30, message="a leader")
    # Exactly the elected server runs the leader's duties.
    await eventually(lambda: _leads_alone(cluster, leader), timeout=30,
                     message="the elected server alone leading")
    other = next(s for s in cluster.servers if s is not leader)
    killed_at = time.monotonic()
    await leader.kill()
    await eventually(lambda: _names_itself(cluster, other), timeout=LEASE_TTL + 20,
                     interval=0.2, message="the other server leading")
    await eventually(lambda: _leads_alone(cluster, other), timeout=30,
                     message="the new leader alone leading")
    # The lease runs out, the survivor's watch sees the key go and it campaigns at once.
    takeover = time.monotonic() - killed_at
    assert takeover < LEASE_TTL + 10, takeover
    async with cluster.api(other) as api:
        assert len(await _running_allocs(api, "web", 3)) == 3
        assert (await api.variable_read("nomad/jobs/web"))["Items"] == {"greeting": "hello"}
        assert (await api.acl_policy("readonly"))["Name"] == "readonly"
        tokens = {t["AccessorID"] for t in await api.acl_tokens()}
        assert reader["AccessorID"] in tokens
        # Scheduling works on the new leader.
        await api.job_register(raw_exec_job("after-failover", SLEEPER, count=1))
        await eventually(lambda: _running_allocs(api, "after-failover", 1), timeout=60,
                         message="a job scheduled by the new leader")
    await leader.start(timeout=60)  # back as a follower

    # One etcd member dies: nothing visible changes.
    await cluster.etcd.kill(2)
    async with cluster.api(other) as api:
        await api.variable_write("nomad/jobs/web", {"greeting": "still here"})
        assert (await api.variable_read("nomad/jobs/web"))["Items"] == {
            "greeting": "still here"}
        await api.job_register(raw_exec_job("one-etcd-down", SLEEPER, count=1))
        await eventually(lambda: _running_allocs(api, "one-etcd-down", 1), timeout=60,
                         message="scheduling with one etcd member down")
    await cluster.etcd.restart(2)

    # A client is SIGKILLed: its node goes down, its allocation is replaced elsewhere.
    async with cluster.api(other) as api:
        web = await _running_allocs(api, "web", 3)
    victim_alloc = web[0]
    victim = _client_of(cluster, victim_alloc)
    task_pids = [p.pid for p in psutil.process_iter(["cwd"])
                 if (p.info.get("cwd") or "").startswith(str(task_dir(
                     victim, victim_alloc["ID"], "t")))]
    await victim.kill()

    async def node_down() -> bool:
        async with cluster.api(other) as api:
            node = await api.node_get(victim_alloc["NodeID"])
        return node["Status"] == "down"
    await eventually(node_down, timeout=60, message="the dead client's node down")

    async def replaced() -> list[dict[str, Any]]:
        async with cluster.api(other) as api:
            allocs = await api.job_allocations("web")
        lost = [a for a in allocs if a["ID"] == victim_alloc["ID"]
                and a["ClientStatus"] == "lost"]
        elsewhere = [a for a in allocs if a["ClientStatus"] == "running"
                     and a["NodeID"] != victim_alloc["NodeID"]]
        return elsewhere if lost and len(elsewhere) == 3 else []
    await eventually(replaced, timeout=60, message="the lost allocation replaced")

    # It comes back: the replaced allocation is stopped on it.
    await victim.start(timeout=60)

    async def stopped_on_victim() -> bool:
        async with cluster.api(other) as api:
            alloc = await api.allocation_get(victim_alloc["ID"])
        gone = not any(psutil.pid_exists(pid) for pid in task_pids)
        return alloc["DesiredStatus"] == "stop" and gone
    await eventually(stopped_on_victim, timeout=60,
                     message="the replaced allocation stopped on the returning client")

    # Every server gone for 30 s: a client keeps its tasks and their sockets.
    async with cluster.api(other) as api:
        web = await _running_allocs(api, "web", 3)
    alloc = web[0]
    agent = _client_of(cluster, alloc)
    sock, token = _sock(agent, alloc["ID"]), _identity(agent, alloc["ID"])
    stats = f"/v1/client/allocation/{alloc['ID']}/stats"
    async with agent.api(cluster.token) as api:  # the token is now in the client's cache
        assert (await api.request("GET", stats)).status == 200
    for server in cluster.live_servers():
        await server.kill()
    cut_at = time.monotonic()
    while time.monotonic() - cut_at < 30:
        assert await answers(sock, token), "the socket stopped answering without servers"
        async with agent.api() as api:
            health = await api.request("GET", "/v1/agent/health")
            assert health.status == 200, health.text
            # A token known before the cut still works; one never seen is refused.
            assert (await api.request("GET", stats, headers={
                "X-Nomad-Token": cluster.token})).status == 200
            assert (await api.request("GET", stats, headers={
                "X-Nomad-Token": str(uuid.uuid4())})).status == 403
        await _pause(1.0)
    assert (await sock_request(sock, "/v1/agent/health")).status in (401, 403)
    for server in cluster.servers:
        await server.start(timeout=60)
    async with cluster.api(cluster.servers[0]) as api:
        await eventually(lambda: _running_allocs(api, "web", 3), timeout=60,
                         message="web still running after the servers' return")


async def _leading(cluster: Cluster) -> list[AgentProcess]:
    """The live servers that say they lead (agent/self's stats.nomad.leader)."""
    leading = []
    for server in cluster.live_servers():
        async with cluster.api(server) as api:
            stats = (await api.agent_self())["stats"]["nomad"]
        if stats["leader"] == "true":
            leading.append(server)
    return leading


async def _leads_alone(cluster: Cluster, server: AgentProcess) -> bool:
    return await _leading(cluster) == [server]


async def _names_itself(cluster: Cluster, server: AgentProcess) -> bool:
    async with cluster.api(server) as api:
        response = await api.request("GET", "/v1/status/leader")
    return response.status == 200 and response.json() == server.rpc_address


async def _pause(seconds: float) -> None:
    # A pacing interval between probes of a steady state, not a wait for a condition.
    await asyncio.sleep(seconds)
