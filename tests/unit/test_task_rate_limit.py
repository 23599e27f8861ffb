"""The per-task rate limit of the Task API: the token bucket itself, and through real sockets
that a task over its limit gets a held 429 with ``Retry-After``, that a flood gets about one
answer per connection per second, and that other tasks and the TCP API do not notice."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import attrs
import pytest

from nomad_client.client.taskapi_config import RateLimitConfig, TaskAPIConfig
from nomad_client.http.ratelimit import MAX_HOLD, TokenBucket
from nomad_client.server.keyring import Keyring
from tests.unit.factories import (
    TASK_INFO,
    TaskAPIStack,
    call_http,
    call_unix,
    raw_exchange,
    request_bytes,
    task_api_stack,
    unix_socket,
    wait_until,
)


# ---- the bucket --------------------------------------------------------------------------
def test_a_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket()
    assert [bucket.take(100.0, 10, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0, 10, 3) == pytest.approx(0.1)  # one token in 1/10 s
    assert bucket.take(100.1, 10, 3) == 0.0
    assert bucket.take(200.0, 10, 3) == 0.0  # capped at the burst, however long it rested
    assert bucket.take(200.0, 10, 3) == 0.0
    assert bucket.take(200.0, 10, 3) == 0.0
    assert bucket.take(200.0, 10, 3) > 0


def test_a_refused_request_waits_behind_those_already_held() -> None:
    bucket = TokenBucket()
    assert bucket.take(0.0, 10, 1) == 0.0
    assert bucket.take(0.0, 10, 1) == pytest.approx(0.1)
    bucket.held = 4
    assert bucket.take(0.0, 10, 1) == pytest.approx(0.5)
    bucket.held = 1000
    assert bucket.take(0.0, 10, 1) == MAX_HOLD  # bounded


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    bucket = TokenBucket()
    bucket.take(0.0, 100, 1)
    assert bucket.retry_after(0.0, 100, 1) == 1
    slow = TokenBucket()
    slow.take(0.0, 0.25, 1)  # a token every 4 s
    assert slow.retry_after(0.0, 0.25, 1) == 4
    assert slow.retry_after(1.5, 0.25, 1) == 3  # 2.5 s left, rounded up


def test_a_lower_burst_applies_to_tokens_already_held() -> None:
    bucket = TokenBucket()
    bucket.take(0.0, 1, 100)
    # 99 tokens were held; now at most 2 are.
    assert [bucket.take(0.0, 1, 2) for _ in range(3)] == [0.0, 0.0, 1.0]


# ---- through real sockets ------------------------------------------------------------------
LIMITED = TaskAPIConfig(rate_limit=RateLimitConfig(requests_per_second=2, burst=2))


@pytest.fixture
async def stack(workdir: Path, keyring: Keyring) -> AsyncIterator[TaskAPIStack]:
    served = await task_api_stack(workdir, keyring, LIMITED)
    yield served
    await served.stop()


async def test_over_the_limit_is_a_held_429_with_retry_after(stack: TaskAPIStack) -> None:
    first = time.monotonic()  # the full bucket's next token is due half a second after
    for _ in range(2):
        assert (await stack.call("GET", "/v1/agent/health")).status == 200
    started = time.monotonic()
    refused = await stack.call("GET", "/v1/agent/health")
    answered = time.monotonic()
    assert refused.status == 429
    assert refused.body == ("Too many requests: this task's Task API allows 2 requests per "
                            "second (client.task_api.rate_limit)")
    assert refused.headers["Retry-After"] == "1"
    # Held until the bucket would have had a token for it (half a second after the first
    # request), not answered at once; never much past the longest hold.
    assert answered - first >= 0.45
    assert answered - started <= MAX_HOLD + 5
    # The token it waited for was not spent on it: the next request is served.
    assert (await stack.call("GET", "/v1/agent/health")).status == 200


async def test_a_refusal_with_a_body_still_sent_is_delivered(stack: TaskAPIStack) -> None:
    for _ in range(2):
        assert (await stack.call("GET", "/v1/agent/health")).status == 200
    answer = await raw_exchange(stack.sock, request_bytes(
        "POST", "/v1/client/metadata", stack.token, b'{"Meta": {"a": "b"}}' * 1000))
    assert answer.status == 429 and answer.headers["retry-after"] == "1"


async def test_unauthenticated_requests_count_too(stack: TaskAPIStack) -> None:
    # The bucket is the socket's, whoever sends: refusing costs nothing once over it.
    for _ in range(2):
        assert (await stack.call("GET", "/v1/agent/health", token="")).status == 401
    assert (await stack.call("GET", "/v1/agent/health")).status == 429


async def test_rate_zero_is_no_limit(stack: TaskAPIStack) -> None:
    await stack.configure(rate_limit={"requests_per_second": 0, "burst": 1})
    statuses = {(await stack.call("GET", "/v1/agent/health")).status for _ in range(50)}
    assert statuses == {200}


async def test_a_reload_changes_the_rate_for_the_next_request(stack: TaskAPIStack) -> None:
    await stack.configure(rate_limit={"requests_per_second": 0.1, "burst": 2})
    for _ in range(2):
        assert (await stack.call("GET", "/v1/agent/health")).status == 200
    await stack.configure(rate_limit={"requests_per_second": 1000, "burst": 1000})
    # The bucket refills at the new rate: a token is back within milliseconds, where the
    # old rate would have taken ten seconds.
    started = time.monotonic()
    await wait_until(lambda: health_status(stack, 200), "a token at the new rate")
    assert time.monotonic() - started < 5
    await stack.configure(rate_limit={"requests_per_second": 1, "burst": 1})
    # Tokens held are capped at the new burst of one: two requests in a row are not both
    # served.
    statuses = [(await stack.call("GET", "/v1/agent/health")).status for _ in range(2)]
    assert 429 in statuses, statuses


async def health_status(stack: TaskAPIStack, status: int) -> bool:
    return (await stack.call("GET", "/v1/agent/health")).status == status


async def test_each_task_has_its_own_bucket(stack: TaskAPIStack, workdir: Path) -> None:
    other = workdir / "other.sock"
    await stack.agent.api.serve_task(unix_socket(other), attrs.evolve(TASK_INFO, task="u"))
    for _ in range(2):
        assert (await stack.call("GET", "/v1/agent/health")).status == 200
    assert (await stack.call("GET", "/v1/agent/health")).status == 429
    for _ in range(2):
        assert (await call_unix(other, "GET", "/v1/agent/health",
                                token=stack.token)).status == 200


FLOOD_CONNECTIONS = 16
FLOOD_SECONDS = 2.5


async def test_a_flood_gets_about_one_answer_per_connection_per_second(
        stack: TaskAPIStack, workdir: Path) -> None:
    other = workdir / "quiet.sock"
    await stack.agent.api.serve_task(unix_socket(other), attrs.evolve(TASK_INFO, task="q"))
    answers: dict[int, int] = {}
    stop = asyncio.Event()

    async def flood() -> None:
        connector = aiohttp.UnixConnector(str(stack.sock), limit=FLOOD_CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one_connection() -> None:
                while not stop.is_set():
                    reply = await call_http(session, "http://localhost", "GET",
                                            "/v1/agent/health", token=stack.token)
                    answers[reply.status] = answers.get(reply.status, 0) + 1

            await asyncio.gather(*(one_connection() for _ in range(FLOOD_CONNECTIONS)))

    flooding = asyncio.create_task(flood())
    quiet_latencies, tcp_latencies = [], []
    started = last_quiet = time.monotonic()
    try:
        async with aiohttp.ClientSession() as tcp:
            while (now := time.monotonic()) - started < FLOOD_SECONDS:
                if now - last_quiet >= 0.5:  # the quiet task keeps within its own limit
                    last_quiet = now
                    assert (await call_unix(other, "GET", "/v1/agent/health",
                                            token=stack.token)).status == 200
                    quiet_latencies.append(time.monotonic() - now)
                now = time.monotonic()
                assert (await call_http(tcp, stack.agent.api.url, "GET",
                                        "/v1/agent/health")).status == 200
                tcp_latencies.append(time.monotonic() - now)
    finally:
        stop.set()
        await flooding
    elapsed = time.monotonic() - started
    served, refused = answers.get(200, 0), answers.get(429, 0)
    assert set(answers) <= {200, 429} and refused > 0, answers
    # Served: the burst plus the rate. Refused: about one per connection per second held,
    # plus the connections' last round; far from the thousands an unheld 429 would give.
    assert served <= LIMITED.rate_limit.burst + math.ceil(elapsed * 2) + 2, answers
    assert refused <= FLOOD_CONNECTIONS * (math.ceil(elapsed / MAX_HOLD) + 2), answers
    # Meanwhile another task's socket and the TCP API answer at once: typically well under
    # the hold a refused request gets (medians: one slow turn of a loaded machine is no
    # evidence either way; the benchmark measures the tail).
    assert len(quiet_latencies) >= 3 and statistics.median(quiet_latencies) < MAX_HOLD / 2, \
        quiet_latencies
    assert statistics.median(tcp_latencies) < MAX_HOLD / 2, sorted(tcp_latencies)[-5:]
