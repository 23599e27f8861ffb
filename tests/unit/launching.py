"""Shared by the scaling, dispatch and periodic tests: a server on real HTTP whose periodic
launcher runs on a fake clock, and the jobs those tests launch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import aiohttp

from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.structs.models import AllocUpdate
from tests.unit.factories import node, serve_api
from tests.unit.test_namespace_endpoints import Api

# 2026-01-01T00:00:00Z, a Thursday: a quarter past the hour is not a five-minute tick.
START = 1_767_225_600.0 + 15 * 60 + 7


class FakeClock:
    """Unix seconds that move only when a test says; ``sleep`` returns once they have moved
    far enough."""

    def __init__(self, now: float = START) -> None:
        self.now = now
        self._moved = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> Awaitable[None]:
        # The deadline is taken now, when the sleep is asked for (as a real one's is), not
        # when its coroutine first runs: the clock may have moved in between.
        return self._until(self.now + seconds)

    async def _until(self, deadline: float) -> None:
        while self.now < deadline:
            moved = self._moved
            await moved.wait()

    def set(self, now: float) -> None:
        self.now = now
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()


def batch_job(job_id: str = "report", *, count: int = 1, task: Mapping[str, Any] | None = None,
              group: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Batch job ``job_id`` for dc1: group "g" of ``count`` copies of raw_exec task "t"."""
    return {"ID": job_id, "Type": "batch", "Datacenters": ["dc1"],
            "TaskGroups": [{"Name": "g", "Count": count, **(group or {}),
                            "Tasks": [{"Name": "t", "Driver": "raw_exec",
                                       "Config": {"command": "/bin/true"}, **(task or {})}]}],
            **fields}


@contextlib.asynccontextmanager
async def served(keyring: Keyring, *, acl: bool = False, clock: FakeClock | None = None,
                 store: StateStore | None = None) -> AsyncIterator[Api]:
    """A server with one ready node, on real HTTP; with ``acl`` the API holds the
    management token. The server is closed afterwards (its periodic launcher with it)."""
    clock = clock or FakeClock()
    server = Server(store if store is not None else StateStore(), keyring, region="global",
                    acl_enabled=acl, clock=clock, sleep=clock.sleep)
    try:
        await server.register_node(node(datacenter="dc1"))
        api_served = await serve_api(server)
        try:
            async with aiohttp.ClientSession() as session:
                management = (await server.acls.bootstrap()).secret_id if acl else ""
                yield Api(server, api_served, session, management)
        finally:
            await api_served.close()
    finally:
        await server.close()


async def register(api: Api, job: Mapping[str, Any], namespace: str = "default"
                   ) -> dict[str, Any]:
    """Register ``job`` over HTTP, which must accept it; its answer."""
    answer = await api.call("PUT", f"/v1/jobs?namespace={namespace}", {"Job": job})
    assert answer.status == 200, answer
    body: dict[str, Any] = answer.body
    return body


def child_ids(server: Server, parent: str, namespace: str = "default") -> list[str]:
    return sorted(j["ID"] for j in server.jobs(namespace) if j.get("ParentID") == parent)


async def finish_allocs(server: Server, job_id: str, status: str = "complete") -> None:
    """Report every allocation of ``job_id`` as its client would once it ended."""
    await server.update_allocs_from_client(
        [AllocUpdate(a.id, status, "", {}) for a in server.job_allocs(job_id)])
