from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_client.client import tmpfs
from tests.integration.harness import AgentProcess, kill_exec_leftovers


@pytest.fixture
async def agent_factory(tmp_path: Path) -> AsyncIterator[Callable[..., AgentProcess]]:
    """Make agents whose processes (and tasks) are cleaned up after the test."""
    made: list[AgentProcess] = []

    def make(name: str = "agent", **kwargs: object) -> AgentProcess:
        agent = AgentProcess(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        made.append(agent)
        return agent

    yield make
    for agent in made:
        await agent.kill()
        kill_exec_leftovers(agent.data_dir)
    _kill_leftover_tasks(tmp_path)


def _kill_leftover_tasks(root: Path) -> None:
    """Tasks outlive a killed agent by design; end every process still working in root, and
    detach the secrets tmpfs mounts they kept (no agent is left to unmount them)."""
    import psutil

    for proc in psutil.process_iter(["cwd", "cmdline"]):
        try:
            cwd = proc.info.get("cwd") or ""
            cmdline = " ".join(proc.info.get("cmdline") or ())
            if cwd.startswith(str(root)) or str(root) in cmdline:
                proc.kill()
        except (psutil.Error, OSError):
            continue
    for mount in tmpfs.mounts_under(root):
        tmpfs.unmount(mount.mount_point)


@pytest.fixture
async def agent(agent_factory: Callable[..., AgentProcess]) -> AsyncIterator[AgentProcess]:
    a = agent_factory()
    await a.start()
    yield a
    await a.stop()


@pytest.fixture
async def short_agent_factory() -> AsyncIterator[Callable[..., AgentProcess]]:
    """Agents in a short, world-traversable temp dir: socket paths then fit ``sun_path``
    (so tools like curl can use them) and other users can reach the sockets."""
    root = Path(tempfile.mkdtemp(prefix="nc"))
    os.chmod(root, 0o755)
    made: list[AgentProcess] = []

    def make(name: str = "a", **kwargs: Any) -> AgentProcess:
        agent = AgentProcess(root / name, **kwargs)
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in made:
            await agent.kill()
            kill_exec_leftovers(agent.data_dir)
        _kill_leftover_tasks(root)
        shutil.rmtree(root, ignore_errors=True)
