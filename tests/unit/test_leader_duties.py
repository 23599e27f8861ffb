"""Leader-only duties: a follower leaves evaluations pending for the leader to plan, periodic
launches and heartbeat tracking run only on the leader, and losing leadership stops them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from nomad_client.jobspec import canonicalize_job
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from tests.unit.factories import node, settle, wait_until
from tests.unit.launching import FakeClock, batch_job, child_ids


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(store: StateStore, keyring: Keyring, clock: FakeClock, *, leader: bool) -> Server:
    return Server(store, keyring, region="global", acl_enabled=False, clock=clock,
                  sleep=clock.sleep, heartbeat_clock=clock, heartbeat_sleep=clock.sleep,
                  leader=leader)


@pytest.fixture
async def follower(keyring: Keyring, clock: FakeClock) -> AsyncIterator[Server]:
    server = make(StateStore(), keyring, clock, leader=False)
    try:
        await server.register_node(node("n1", datacenter="dc1"))
        yield server
    finally:
        await server.close()


def web() -> dict[str, Any]:
    return canonicalize_job(batch_job("web"))


async def test_a_follower_leaves_a_pending_evaluation_which_the_new_leader_places(
        follower: Server) -> None:
    assert not follower.is_leader
    eval_id, _ = await follower.register_job(web())
    ev = follower.evaluation(eval_id)
    assert ev is not None and ev.status == "pending"
    assert follower.job_allocs("web") == []
    await follower.set_leader(True)
    assert follower.is_leader
    await wait_until(lambda: follower.job_allocs("web"), "the pending evaluation placed")
    ev = follower.evaluation(eval_id)
    assert ev is not None and ev.status == "complete"
    assert [a.eval_id for a in follower.job_allocs("web")] == [eval_id]


async def test_the_leader_places_what_another_server_registers(
        keyring: Keyring, clock: FakeClock) -> None:
    store = StateStore()
    leader = make(store, keyring, clock, leader=False)
    follower = make(store, keyring, clock, leader=False)
    try:
        await leader.set_leader(True)  # as the election says
        await follower.register_node(node("n1", datacenter="dc1"))
        eval_id, _ = await follower.register_job(web())
        await wait_until(lambda: (ev := leader.evaluation(eval_id)) is not None
                         and ev.status == "complete", "the leader to process it")
        assert len(leader.job_allocs("web")) == 1
    finally:
        await follower.close()
        await leader.close()


async def test_periodic_launches_happen_only_on_the_leader(follower: Server,
                                                           clock: FakeClock) -> None:
    await follower.register_job(canonicalize_job(batch_job("report",
                                                           Periodic={"Spec": "*/5 * * * *"})))
    clock.set(clock.now + 300)  # past a five-minute tick
    await settle()
    assert child_ids(follower, "report") == []
    await follower.set_leader(True)
    await settle()  # the launcher has read the schedules, from now on
    clock.set(clock.now + 300)
    await wait_until(lambda: len(child_ids(follower, "report")) == 1, "a launch as leader")
    await follower.set_leader(False)
    assert not follower.is_leader
    clock.set(clock.now + 600)
    await settle()
    assert len(child_ids(follower, "report")) == 1  # no more launches once a follower


async def test_losing_leadership_stops_every_duty(follower: Server, clock: FakeClock) -> None:
    await follower.set_leader(True)
    await follower.client_register(node("n2", datacenter="dc1"))
    assert follower.heartbeats.running and follower.heartbeats.deadline("n2") is not None
    await follower.set_leader(False)
    assert not follower.heartbeats.running
    # A node not heard from is never marked down by a follower.
    clock.set(clock.now + 3600)
    await settle()
    found = follower.node("n2")
    assert found is not None and found.status == "ready"
    # Evaluations stay pending until a leader takes them.
    eval_id, _ = await follower.register_job(web())
    await settle()
    ev = follower.evaluation(eval_id)
    assert ev is not None and ev.status == "pending"


async def test_a_new_leader_gives_known_nodes_a_full_ttl(follower: Server,
                                                         clock: FakeClock) -> None:
    await follower.client_register(node("n2", datacenter="dc1"))  # as follower: untracked
    clock.set(clock.now + 3600)
    await follower.set_leader(True)
    assert follower.heartbeats.deadline("n2") == clock.now + 10 + 10
    clock.set(clock.now + 21)
    await wait_until(lambda: (n := follower.node("n2")) is not None and n.status == "down",
                     "n2 to go down once its TTL has passed")
