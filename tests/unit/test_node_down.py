"""Node liveness on a fake clock: a node that misses its heartbeats goes down and its
allocations are lost and placed elsewhere; ``disconnect { lost_after }`` keeps them unknown
for a while; a node that comes back keeps or gives up what was replaced as ``reconcile``
says; the client's RPC replies carry the TTL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from nomad_client.client.servers import ServerRPC, UnknownNode
from nomad_client.jobspec import canonicalize_job
from nomad_client.server.disconnect import LOST, RECONNECTED
from nomad_client.server.keyring import Keyring
from nomad_client.server.rpc import InProcessTransport
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.structs.models import Allocation, AllocUpdate, TaskState
from tests.unit.factories import node, settle, wait_until
from tests.unit.launching import FakeClock

MINUTE_NS = 60 * 1_000_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
async def server(keyring: Keyring, clock: FakeClock) -> AsyncIterator[Server]:
    server = Server(StateStore(), keyring, region="global", acl_enabled=False, clock=clock,
                    sleep=clock.sleep, heartbeat_clock=clock, heartbeat_sleep=clock.sleep)
    try:
        for node_id in ("n1", "n2"):
            await server.client_register(node(node_id))
        yield server
    finally:
        await server.close()


def service_job(job_type: str = "service", disconnect: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    group: dict[str, Any] = {"Name": "g", "Count": 1, "Tasks": [
        {"Name": "t", "Driver": "raw_exec", "Config": {"command": "/bin/sleep"}}]}
    if disconnect is not None:
        group["Disconnect"] = disconnect
    return canonicalize_job({"ID": "web", "Type": job_type, "Datacenters": ["dc1"],
                             "TaskGroups": [group]})


async def place_on_n1(server: Server, job: dict[str, Any]) -> Allocation:
    """Register ``job`` (its allocation lands on n1, the emptier node first by ID), and
    report it running."""
    await server.register_job(job)
    (alloc,) = server.job_allocs("web")
    assert alloc.node_id == "n1"
    await server.update_allocs_from_client([AllocUpdate(
        alloc.id, "running", "", {"t": TaskState(state="running")})])
    return alloc


async def pass_time(server: Server, clock: FakeClock, seconds: float,
                    alive: Iterable[str] = ("n2",)) -> None:
    """Move the clock on in steps of 5s; the ``alive`` nodes heartbeat at each."""
    end = clock.now + seconds
    while clock.now < end:
        clock.set(min(clock.now + 5, end))
        for node_id in alive:
            await server.client_heartbeat(node_id, "ready")
        await settle()


def live(server: Server) -> list[Allocation]:
    return [a for a in server.job_allocs("web")
            if a.desired_status == "run" and not a.client_terminal()]


def status(server: Server, node_id: str) -> str:
    found = server.node(node_id)
    assert found is not None
    return found.status


def alloc(server: Server, alloc_id: str) -> Allocation:
    found = server.allocation(alloc_id)
    assert found is not None
    return found


async def test_a_silent_node_goes_down_and_its_allocation_is_replaced_elsewhere(
        server: Server, clock: FakeClock) -> None:
    original = await place_on_n1(server, service_job())
    await pass_time(server, clock, 15)
    assert status(server, "n1") == "ready"  # within TTL + grace
    await pass_time(server, clock, 30)  # TTL is at most 20s, grace 10s
    await wait_until(lambda: status(server, "n1") == "down", "n1 to go down")
    lost = alloc(server, original.id)
    assert (lost.client_status, lost.desired_status, lost.desired_description) == \
        ("lost", "stop", LOST)
    (replacement,) = live(server)
    assert replacement.node_id == "n2" and replacement.previous_allocation == original.id
    assert lost.next_allocation == replacement.id
    assert status(server, "n2") == "ready"  # heartbeats kept it alive all along


async def test_the_node_coming_back_stops_what_was_replaced(server: Server,
                                                            clock: FakeClock) -> None:
    original = await place_on_n1(server, service_job())
    await pass_time(server, clock, 45)
    await wait_until(lambda: status(server, "n1") == "down", "n1 to go down")
    await server.client_heartbeat("n1", "ready")
    assert status(server, "n1") == "ready"
    assert alloc(server, original.id).desired_status == "stop"  # its client stops it
    (replacement,) = live(server)
    assert replacement.node_id == "n2"  # kept; nothing more is placed on n1


async def test_lost_after_keeps_the_allocation_unknown_then_lost(server: Server,
                                                                 clock: FakeClock) -> None:
    original = await place_on_n1(server, service_job(
        disconnect={"LostAfter": 2 * MINUTE_NS, "Replace": False}))
    await pass_time(server, clock, 45)
    await wait_until(lambda: status(server, "n1") == "disconnected", "n1 to disconnect")
    assert alloc(server, original.id).client_status == "unknown"
    assert [a.id for a in live(server)] == [original.id]  # replace = false: no replacement
    await pass_time(server, clock, 60)
    assert alloc(server, original.id).client_status == "unknown"  # still within 2 minutes
    await pass_time(server, clock, 65)
    await wait_until(lambda: status(server, "n1") == "down", "n1 to go down")
    assert alloc(server, original.id).client_status == "lost"
    (replacement,) = live(server)
    assert replacement.node_id == "n2"


async def test_replace_false_keeps_the_original_when_its_node_returns(
        server: Server, clock: FakeClock) -> None:
    original = await place_on_n1(server, service_job(
        disconnect={"LostAfter": 10 * MINUTE_NS, "Replace": False}))
    await pass_time(server, clock, 45)
    await wait_until(lambda: status(server, "n1") == "disconnected", "n1 to disconnect")
    await server.client_heartbeat("n1", "ready")
    back = alloc(server, original.id)
    assert (status(server, "n1"), back.client_status, back.desired_status) == \
        ("ready", "running", "run")
    assert [a.id for a in live(server)] == [original.id]


@pytest.mark.parametrize("reconcile", ["best_score", "keep_original", "longest_running"])
async def test_a_returning_original_is_kept_and_its_replacement_stopped(
        server: Server, clock: FakeClock, reconcile: str) -> None:
    original = await place_on_n1(server, service_job(
        disconnect={"LostAfter": 10 * MINUTE_NS, "Reconcile": reconcile}))
    await pass_time(server, clock, 45)
    await wait_until(lambda: status(server, "n1") == "disconnected", "n1 to disconnect")
    assert alloc(server, original.id).client_status == "unknown"
    replacement = await wait_until(lambda: [a for a in live(server) if a.node_id == "n2"],
                                   "a replacement on n2")
    assert replacement[0].previous_allocation == original.id
    await server.client_heartbeat("n1", "ready")
    stopped = alloc(server, replacement[0].id)
    assert (stopped.desired_status, stopped.desired_description) == ("stop", RECONNECTED)
    assert [a.id for a in live(server)] == [original.id]
    assert alloc(server, original.id).client_status == "running"


async def test_keep_replacement_stops_the_returning_original(server: Server,
                                                             clock: FakeClock) -> None:
    original = await place_on_n1(server, service_job(
        disconnect={"LostAfter": 10 * MINUTE_NS, "Reconcile": "keep_replacement"}))
    await pass_time(server, clock, 45)
    await wait_until(lambda: [a for a in live(server) if a.node_id == "n2"], "a replacement")
    await server.client_heartbeat("n1", "ready")
    assert alloc(server, original.id).desired_status == "stop"
    assert [a.node_id for a in live(server)] == ["n2"]


async def test_lost_batch_allocations_are_rescheduled_and_system_ones_are_not(
        server: Server, clock: FakeClock) -> None:
    await place_on_n1(server, service_job("batch"))
    await pass_time(server, clock, 45)
    await wait_until(lambda: status(server, "n1") == "down", "n1 to go down")
    assert [a.node_id for a in live(server)] == ["n2"]


async def test_system_allocations_of_a_down_node_are_not_placed_elsewhere(
        server: Server, clock: FakeClock) -> None:
    original = await place_on_n1(server, service_job("system"))
    await pass_time(server, clock, 45)
    await wait_until(lambda: status(server, "n1") == "down", "n1 to go down")
    assert alloc(server, original.id).client_status == "lost"
    assert live(server) == []


async def test_an_operator_marking_a_node_down_loses_its_allocations_at_once(
        server: Server) -> None:
    original = await place_on_n1(server, service_job(
        disconnect={"LostAfter": 10 * MINUTE_NS}))
    await server.update_node_status("n1", "down")
    assert status(server, "n1") == "down"
    assert alloc(server, original.id).client_status == "lost"
    assert [a.node_id for a in live(server)] == ["n2"]


async def test_rpc_replies_carry_the_ttl_and_an_unknown_node_is_told_so(
        server: Server) -> None:
    rpc = ServerRPC(InProcessTransport(server))
    registered = await rpc.node_register(node("n3"))
    assert 10 <= registered.heartbeat_ttl < 20
    beat = await rpc.node_update_status("n3", "ready")
    assert 10 <= beat.heartbeat_ttl < 20
    with pytest.raises(UnknownNode):
        await rpc.node_update_status("nobody", "ready")
    with pytest.raises(ValueError, match="invalid status"):
        await rpc.node_update_status("n3", "exploded")
