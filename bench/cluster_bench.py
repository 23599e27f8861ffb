"""Cluster mode, measured: a real cluster on loopback (3 etcd members, 2 server agents on
etcd, 3 client-only agents) beside an embedded agent, in one run.

1. Registration -> every allocation running, for a job of ``--count`` (default 100) spread
   over the 3 clients (``--rounds`` jobs, each a fresh ID; median and each round shown).
2. Task API latency on a client-only agent as a ratio to the embedded mode: sequential
   requests on a task's socket (one connection per request, as a task's tool would make),
   alternating between the two agents in blocks, for a route the client answers itself
   (``/v1/agent/health``, authenticated locally with the task's workload identity) and one
   only servers hold (``/v1/var/...``: forwarded over RPC on the client-only agent, served
   in process on the embedded one). p50/p99 of each, and the ratios of the medians.

May touch: a temp dir it creates (etcd and agent data dirs), processes it starts (etcd, the
agents, their tasks), 127.0.0.1 ports and the task sockets it made. Run as root, as the
tests do: ``make bench-cluster`` (``CLUSTER_ARGS="--count 100 --rounds 3"``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nomad_client.api.client import ApiClient  # noqa: E402
from nomad_client.jobspec import canonicalize_job  # noqa: E402
from tests.integration.conftest import _kill_leftover_tasks  # noqa: E402
from tests.integration.etcd_cluster import EtcdCluster  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    AgentProcess,
    eventually,
    task_dir,
)

SLEEPER = "exec sleep 3600"


def _job(job_id: str, count: int, *, identity: bool = False) -> dict[str, Any]:
    task: dict[str, Any] = {
        "Name": "t", "Driver": "raw_exec",
        "Config": {"command": "/bin/sh", "args": ["-c", SLEEPER]},
        "Resources": {"CPU": 20, "MemoryMB": 32}, "KillTimeout": int(2e9),
        # Within the small disk below, as Nomad requires: two 2 MB files per stream.
        "LogConfig": {"MaxFiles": 2, "MaxFileSizeMB": 2}}
    if identity:
        task["Identity"] = {"File": True}
    # Dense jobs must ask for little: Nomad's default 300 MB disk each would not fit.
    return canonicalize_job({"ID": job_id, "Type": "service", "TaskGroups": [{
        "Name": "g", "Count": count, "EphemeralDisk": {"SizeMB": 10}, "Tasks": [task]}]})


async def _running(api: ApiClient, job_id: str, count: int) -> list[dict[str, Any]]:
    allocs = await api.job_allocations(job_id)
    running = [a for a in allocs if a["ClientStatus"] == "running"]
    return running if len(running) >= count else []


async def _register_and_wait(api: ApiClient, job_id: str, count: int) -> float:
    """Seconds from registration to every allocation running; the job is purged after."""
    start = time.monotonic()
    await api.job_register(_job(job_id, count))
    await eventually(lambda: _running(api, job_id, count), timeout=600, interval=0.1,
                     message=f"{count} running")
    took = time.monotonic() - start
    await api.job_deregister(job_id, purge=True)
    return took


async def _sock_get(path: Path, url: str, token: str) -> float:
    start = time.perf_counter()
    async with ApiClient(f"unix://{path}", token="", timeout=30) as client:
        response = await client.request("GET", url, headers={"X-Nomad-Token": token})
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"{url} via {path}: {response.status} {response.body!r}")
    return elapsed


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ncb"))
    os.chmod(root, 0o755)
    agents: list[AgentProcess] = []

    def agent(name: str, **kwargs: Any) -> AgentProcess:
        made = AgentProcess(root / name, node_name=name, **kwargs)
        agents.append(made)
        return made

    try:
        async with EtcdCluster(root / "etcd", members=3) as etcd:
            kek = root / "kek"
            kek.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
            os.chmod(kek, 0o600)
            server_block = {"store": "etcd", "keyring_kek_file": str(kek),
                            "etcd": {"endpoints": list(etcd.endpoints)}}
            servers = [agent(f"s{i}", server=True, client=False,
                             cluster={"server": server_block}) for i in (1, 2)]
            for s in servers:
                await s.start(timeout=60)
            # The per-task rate limit (100/s by default) would measure itself, not latency.
            unlimited = {"rate_limit": {"requests_per_second": 0}}
            clients = [agent(f"c{i}", server=False, client=True, task_api=unlimited,
                             servers=[s.rpc_address for s in servers]) for i in (1, 2, 3)]
            for c in clients:
                await c.start(timeout=60)
            embedded = agent("embedded", task_api=unlimited)
            await embedded.start(timeout=60)

            async with servers[0].api() as api:
                async def ready() -> bool:
                    nodes = await api.nodes_list()
                    return sum(n["Status"] == "ready" for n in nodes) == 3
                await eventually(ready, timeout=60, message="3 client nodes")

                print(f"1. registration -> {args.count} allocations running: the cluster "
                      "(3 clients) and the embedded agent (1 node), alternating")
            took: dict[str, list[float]] = {"cluster": [], "embedded": []}
            for rnd in range(args.rounds):
                for key, target in (("cluster", servers[0]), ("embedded", embedded)):
                    async with target.api() as api:
                        took[key].append(await _register_and_wait(api, f"dense-{rnd}",
                                                                  args.count))
                    print(f"   round {rnd + 1} {key:<8}: {took[key][-1]:.2f} s", flush=True)
            medians = {k: statistics.median(v) for k, v in took.items()}
            ratio = medians["cluster"] / medians["embedded"]
            print(f"   median cluster {medians['cluster']:.2f} s, embedded "
                  f"{medians['embedded']:.2f} s, ratio {ratio:.2f}\n")
            async with servers[0].api() as api:

                await api.variable_write("nomad/jobs/probe", {"k": "v"})
                await api.job_register(_job("probe", 1, identity=True))
                (probe,) = await eventually(lambda: _running(api, "probe", 1), timeout=60)
            async with embedded.api() as api:
                await api.variable_write("nomad/jobs/probe", {"k": "v"})
                await api.job_register(_job("probe", 1, identity=True))
                (local,) = await eventually(lambda: _running(api, "probe", 1), timeout=60)

            (client,) = [c for c in clients if c.name == probe["NodeName"]]
            targets = {"client-only": (client, probe["ID"]), "embedded": (embedded, local["ID"])}
            socks = {}
            for key, (owner, alloc_id) in targets.items():
                secrets_dir = task_dir(owner, alloc_id, "t") / "secrets"
                await eventually(lambda d=secrets_dir: (d / "api.sock").exists(), timeout=30)
                socks[key] = (secrets_dir / "api.sock", (secrets_dir / "nomad_token").read_text())

            print(f"2. Task API latency, {args.requests} sequential requests per route and "
                  f"agent, alternating in blocks of {args.block}")
            for url in ("/v1/agent/health", "/v1/var/nomad/jobs/probe"):
                times: dict[str, list[float]] = {k: [] for k in socks}
                for sock, token in socks.values():  # untimed warm-up
                    for _ in range(20):
                        await _sock_get(sock, url, token)
                while len(times["embedded"]) < args.requests:
                    for key, (sock, token) in socks.items():
                        for _ in range(args.block):
                            times[key].append(await _sock_get(sock, url, token))
                p50 = {k: _pct(v, 0.5) for k, v in times.items()}
                for key, values in times.items():
                    print(f"   {url:<28} {key:<12} p50 {p50[key]:7.2f} ms   "
                          f"p99 {_pct(values, 0.99):7.2f} ms")
                print(f"   {url:<28} ratio client-only / embedded (p50): "
                      f"{p50['client-only'] / p50['embedded']:.2f}\n", flush=True)
    finally:
        for made in agents:
            await made.kill()
        _kill_leftover_tasks(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--block", type=int, default=50)
    asyncio.run(main(parser.parse_args()))
