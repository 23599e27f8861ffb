"""``PUT /v1/client/gc`` on a client: finished allocations are destroyed here (runner and
directory), running ones are left alone, and a collection racing the alloc watcher's own
clean-up of the same allocation is not an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from nomad_client.jobspec import canonicalize_job
from nomad_client.server.keyring import Keyring
from tests.unit.factories import InProcessAgent, call_http, fresh_dir, start_agent, wait_until
from tests.unit.test_cli import mock_job

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def agent(keyring: Keyring) -> AsyncIterator[InProcessAgent]:
    with fresh_dir("gc-") as base:
        agent = await start_agent(base, keyring)
        try:
            yield agent
        finally:
            await agent.stop()


async def _finished_and_running(agent: InProcessAgent) -> tuple[str, str]:
    client = agent.client
    assert client is not None
    server = agent.server
    await server.register_job(canonicalize_job(mock_job("done", run_for="0s", Type="batch")))
    await server.register_job(canonicalize_job(mock_job("busy", run_for="1h")))
    done = server.job_allocs("done")[0].id
    busy = server.job_allocs("busy")[0].id
    await wait_until(lambda: done in client.runners and client.runners[done].done,
                     "the batch allocation to finish")
    await wait_until(lambda: busy in client.runners, "the service allocation to start")
    return done, busy


async def test_client_gc_destroys_finished_allocations_only(agent: InProcessAgent) -> None:
    client = agent.client
    assert client is not None
    done, busy = await _finished_and_running(agent)
    alloc_dir = Path(client.settings.alloc_dir) / done
    assert alloc_dir.exists()
    async with aiohttp.ClientSession() as session:
        answer = await call_http(session, agent.api.url, "PUT", "/v1/client/gc")
    assert answer.status == 200, answer
    assert done not in client.runners and busy in client.runners
    assert not alloc_dir.exists()


async def test_a_collection_racing_the_watchers_clean_up_is_no_error(
        agent: InProcessAgent) -> None:
    client = agent.client
    assert client is not None
    done, _ = await _finished_and_running(agent)
    runner = client.runners[done]
    release = asyncio.Event()
    destroy = runner.destroy

    async def slow_destroy() -> None:
        await release.wait()
        await destroy()

    runner.destroy = slow_destroy  # type: ignore[method-assign]
    collecting = asyncio.create_task(client.collect_garbage())
    await wait_until(lambda: done not in client.runners, "the collection to take the runner")
    # The watcher saw the allocation gone before the collection took it: its clean-up of
    # the same allocation comes second and finds nothing left to do.
    await client._gc(done)
    release.set()
    assert await collecting == [done]
