"""What fs/cat and fs/logs cost a real agent's memory: many clients reading files larger than
the agent could sensibly buffer, all at once. The agent streams them, so its peak memory
hardly moves; and a client that hangs up mid-file releases the file at once.

Touches only the agent the fixture starts and the task it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import attrs
import pytest

from tests.integration.harness import (
    AgentProcess,
    eventually,
    fds_on,
    raw_exec_job,
    run_job,
    sparse,
    task_dir,
    wait_task_state,
)

MIB = 1024 * 1024
READERS = 16
# Past the 64 MiB the agent used to buffer per cat before refusing the file.
BIG_FILE = 80 * MIB
# Sixteen readers of a streamed file need a few MiB in all; buffering one whole body per
# reader (the old way) needs hundreds.
MAX_GROWTH = 64 * MIB


@attrs.frozen
class Running:
    agent: AgentProcess
    alloc_id: str

    @property
    def pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    @property
    def local(self) -> Path:
        return task_dir(self.agent, self.alloc_id, "t") / "local"

    @property
    def logs(self) -> Path:
        return self.agent.data_dir / "alloc" / self.alloc_id / "alloc" / "logs"

    def url(self, kind: str) -> str:
        return f"{self.agent.address}/v1/client/fs/{kind}/{self.alloc_id}"


@pytest.fixture
async def running(agent: AgentProcess) -> AsyncIterator[Running]:
    async with agent.api() as api:
        [alloc] = await run_job(api, raw_exec_job("fsmem", "sleep 300", kill_timeout_s=1))
        await wait_task_state(api, alloc["ID"], "t", "running")
        yield Running(agent, alloc["ID"])


class PeakMemory:
    """A process's peak resident memory over a stretch of time, from the kernel's own
    high-water mark (``VmHWM``), so no short spike between samples is missed."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for pid {self.pid}")

    def start(self) -> None:
        # "5" resets the high-water mark to the current resident size.
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self.base = self._status_kib("VmHWM") * 1024

    def growth(self) -> int:
        return self._status_kib("VmHWM") * 1024 - self.base


async def read_all(session: aiohttp.ClientSession, url: str, params: dict[str, str]
                   ) -> tuple[int, int, str]:
    """Status, length and sha256 of a body, read piece by piece (the test keeps none)."""
    digest = hashlib.sha256()
    size = 0
    async with session.get(url, params=params) as resp:
        async for chunk in resp.content.iter_chunked(MIB):
            digest.update(chunk)
            size += len(chunk)
        return resp.status, size, digest.hexdigest()


async def many_readers(url: str, params: dict[str, str]) -> list[tuple[int, int, str]]:
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=READERS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        return await asyncio.gather(*(read_all(session, url, params) for _ in range(READERS)))


async def test_concurrent_cats_of_a_large_file_keep_memory_bounded(running: Running) -> None:
    big = running.local / "big"
    sparse(big, BIG_FILE, b"start")
    zeros = hashlib.sha256(b"start" + bytes(BIG_FILE - 5)).hexdigest()
    peak = PeakMemory(running.pid)
    peak.start()
    results = await many_readers(running.url("cat"), {"path": "t/local/big"})
    growth = peak.growth()
    assert growth < MAX_GROWTH, f"agent peak memory grew by {growth / MIB:.0f} MiB"
    assert [status for status, _, _ in results] == [200] * READERS, results[:2]
    assert all(size == BIG_FILE and digest == zeros for _, size, digest in results)


async def test_concurrent_log_reads_keep_memory_bounded(running: Running) -> None:
    # Larger than the 16 MiB a log read returns, so every reader gets the full amount.
    sparse(running.logs / "t.stderr.0", 20 * MIB, b"first line\n")
    peak = PeakMemory(running.pid)
    peak.start()
    results = await many_readers(running.url("logs"), {"task": "t", "type": "stderr"})
    growth = peak.growth()
    assert growth < MAX_GROWTH, f"agent peak memory grew by {growth / MIB:.0f} MiB"
    assert [status for status, _, _ in results] == [200] * READERS, results[:2]
    assert len({digest for _, _, digest in results}) == 1  # all got the same frames
    # 16 MiB of data as base64 in JSON frames.
    assert all(size > 16 * MIB * 4 // 3 for _, size, _ in results)


async def test_cat_streams_content_byte_exact(running: Running) -> None:
    data = os.urandom(5 * MIB + 3)
    (running.local / "random").write_bytes(data)
    async with aiohttp.ClientSession() as session:
        status, size, digest = await read_all(session, running.url("cat"),
                                              {"path": "t/local/random"})
    assert (status, size) == (200, len(data))
    assert digest == hashlib.sha256(data).hexdigest()


async def test_a_client_hanging_up_mid_cat_releases_the_file(running: Running) -> None:
    big = running.local / "big"
    sparse(big, BIG_FILE)
    async with aiohttp.ClientSession() as session:
        resp = await session.get(running.url("cat"), params={"path": "t/local/big"})
        assert resp.status == 200
        await resp.content.readexactly(MIB)
        # The reader has stopped reading: the agent waits, holding the file open.
        assert fds_on(big, running.pid) == 1
        resp.close()  # hang up mid-body
        await eventually(lambda: fds_on(big, running.pid) == 0, message="the file closed")
    # And the agent serves on.
    async with aiohttp.ClientSession() as session:
        status, size, _ = await read_all(session, running.url("cat"),
                                         {"path": "t/local/big"})
    assert (status, size) == (200, BIG_FILE)
