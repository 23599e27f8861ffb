"""The heartbeat tracker on a fake clock: TTLs scale with the number of nodes as Nomad's do,
a node not heard from within TTL plus grace expires, a heartbeat moves its deadline, and a
new leader gives every node a full TTL first."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from nomad_client.server.heartbeats import HeartbeatTracker, scaled_ttl
from tests.unit.factories import settle, wait_until
from tests.unit.launching import FakeClock


class Expiries:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, node_id: str) -> None:
        self.seen.append(node_id)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
async def expired() -> Expiries:
    return Expiries()


@pytest.fixture
async def tracker(clock: FakeClock, expired: Expiries) -> AsyncIterator[HeartbeatTracker]:
    tracker = HeartbeatTracker(expired, min_ttl=10, max_per_second=50, grace=10,
                               clock=clock, sleep=clock.sleep, rng=random.Random(7))
    yield tracker
    await tracker.stop()


def test_ttl_scales_with_the_number_of_nodes() -> None:
    assert scaled_ttl(0, 10, 50) == 10
    assert scaled_ttl(500, 10, 50) == 10  # 500 nodes / 50 per second: exactly the minimum
    assert scaled_ttl(5000, 10, 50) == 100
    assert scaled_ttl(5000, 10, 0) == 10  # no rate: never below the minimum, never scaled


async def test_a_reset_ttl_is_staggered_up_to_twice_the_scaled_one(
        tracker: HeartbeatTracker) -> None:
    tracker.start([])
    for i in range(1000):
        tracker.reset(f"n{i}")
    ttls = [tracker.reset("probe") for _ in range(200)]
    assert all(20 <= t < 40 for t in ttls)  # 1000 nodes / 50 per second = 20s, plus stagger
    assert max(ttls) - min(ttls) > 5  # staggered, not one fixed period


async def test_a_node_not_heard_from_expires_after_ttl_plus_grace(
        tracker: HeartbeatTracker, clock: FakeClock, expired: Expiries) -> None:
    tracker.start([])
    ttl = tracker.reset("n1")
    clock.set(1000 + ttl + 9.9)
    await settle()
    assert expired.seen == []  # within the grace
    clock.set(1000 + ttl + 10)
    await wait_until(lambda: expired.seen == ["n1"], "n1 to expire")
    assert tracker.deadline("n1") is None and len(tracker) == 0


async def test_heartbeats_move_the_deadline(tracker: HeartbeatTracker, clock: FakeClock,
                                            expired: Expiries) -> None:
    tracker.start([])
    tracker.reset("n1")
    for step in range(1, 6):  # each heartbeat well within the TTL: never expires
        clock.set(1000 + step * 9)
        tracker.reset("n1")
        await settle()
    assert expired.seen == []
    deadline = tracker.deadline("n1")
    assert deadline is not None
    clock.set(deadline)
    await wait_until(lambda: expired.seen == ["n1"], "n1 to expire")


async def test_an_earlier_deadline_wakes_the_sleeping_loop(
        tracker: HeartbeatTracker, clock: FakeClock, expired: Expiries) -> None:
    tracker.start([])
    tracker.schedule("late", 100)
    await settle()  # the loop sleeps toward 1100
    tracker.schedule("soon", 5)
    clock.set(1005)
    await wait_until(lambda: expired.seen == ["soon"], "the earlier deadline")


async def test_forgotten_nodes_never_expire(tracker: HeartbeatTracker, clock: FakeClock,
                                            expired: Expiries) -> None:
    tracker.start([])
    tracker.reset("n1")
    tracker.forget("n1")
    clock.set(5000)
    await settle()
    assert expired.seen == []


async def test_a_new_leader_gives_known_nodes_a_full_ttl_first(
        tracker: HeartbeatTracker, clock: FakeClock, expired: Expiries) -> None:
    tracker.start(["n1", "n2"])
    assert tracker.deadline("n1") == 1000 + 10 + 10
    clock.set(1019)
    await settle()
    assert expired.seen == []
    clock.set(1020)
    await wait_until(lambda: sorted(expired.seen) == ["n1", "n2"], "both to expire")


async def test_nothing_is_tracked_while_stopped(tracker: HeartbeatTracker, clock: FakeClock,
                                                expired: Expiries) -> None:
    assert tracker.reset("n1") >= 10  # a follower still answers with a TTL
    assert tracker.deadline("n1") is None
    tracker.start([])
    tracker.reset("n2")
    await tracker.stop()
    clock.set(5000)
    await settle()
    assert expired.seen == [] and not tracker.running


async def test_a_failing_handler_does_not_end_tracking(clock: FakeClock) -> None:
    seen: list[str] = []

    async def on_expire(node_id: str) -> None:
        seen.append(node_id)
        if node_id == "bad":
            raise RuntimeError("boom")

    tracker = HeartbeatTracker(on_expire, clock=clock, sleep=clock.sleep)
    try:
        tracker.start([])
        tracker.schedule("bad", 1)
        tracker.schedule("good", 2)
        clock.set(1002)
        await wait_until(lambda: seen == ["bad", "good"], "both handled")
    finally:
        await tracker.stop()
