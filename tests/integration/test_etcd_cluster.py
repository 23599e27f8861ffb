"""The etcd client against a real 3-member cluster: a member killed (and restarted) changes
nothing a caller sees, and a watch carries on across it without a gap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from nomad_client.server.etcd.client import EtcdClient, EtcdSettings, WatchEvent
from tests.integration.etcd_cluster import EtcdCluster, etcd_cluster  # noqa: F401
from tests.unit.factories import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(etcd_cluster: EtcdCluster) -> AsyncIterator[EtcdClient]:  # noqa: F811
    c = await EtcdClient.connect(EtcdSettings(etcd_cluster.endpoints, prefix="/c/"))
    yield c
    await c.close()


async def test_the_cluster_has_one_leader_and_all_members_healthy(
        etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    assert len(etcd_cluster.endpoints) == 3
    assert await etcd_cluster.leader_index() in (0, 1, 2)
    assert [await etcd_cluster.member_health(i) for i in range(3)] == [True] * 3


async def test_calls_keep_working_when_the_member_in_use_dies(
        etcd_cluster: EtcdCluster, client: EtcdClient) -> None:  # noqa: F811
    await client.put(client.key("before"), b"1")
    victim = etcd_cluster.endpoints.index(client.current_endpoint)
    await etcd_cluster.kill(victim)
    # Reads move to another member by themselves.
    kv = await client.get(client.key("before"))
    assert kv is not None and kv.value == b"1"
    assert client.current_endpoint != etcd_cluster.endpoints[victim]
    rows, _ = await client.get_prefix(client.key(""))
    assert [r.key for r in rows] == [client.key("before")]
    lease = await client.lease_grant(30)
    await client.put(client.key("after"), b"2", lease=lease)
    assert await client.lease_refresh(lease) > 0
    # The member comes back and catches up.
    await etcd_cluster.restart(victim)
    only = await EtcdClient.connect(EtcdSettings((etcd_cluster.endpoints[victim],)))
    try:
        kv = await only.get(client.key("after"))
        assert kv is not None and kv.value == b"2"
    finally:
        await only.close()


async def test_losing_the_raft_leader_changes_nothing(
        etcd_cluster: EtcdCluster, client: EtcdClient) -> None:  # noqa: F811
    leader = await etcd_cluster.leader_index()
    assert leader is not None
    await etcd_cluster.kill(leader)
    # The two left elect a new leader; requests wait for it within their deadline (a member
    # without a leader refuses a request before proposing it, so even writes are retried).
    # A read first: a write sent into a dying connection would have an unknown outcome.
    assert await client.get(client.key("x")) is None
    for i in range(5):
        await client.put(client.key("k", str(i)), b"v")
    rows, _ = await client.get_prefix(client.key("k", ""))
    assert len(rows) == 5
    assert await etcd_cluster.leader_index() not in (None, leader)


async def test_a_watch_carries_on_across_a_killed_member(
        etcd_cluster: EtcdCluster, client: EtcdClient) -> None:  # noqa: F811
    writer = await EtcdClient.connect(EtcdSettings(etcd_cluster.endpoints, prefix="/c/"))
    p = client.key("w", "")
    _, rev = await client.get_prefix(p)
    got: list[tuple[int, list[WatchEvent]]] = []

    async def follow() -> None:
        async for item in client.watch_prefix(p, rev + 1):
            got.append(item)

    # The watch streams from a follower, the one killed; the writer uses the raft leader (a
    # write in flight when its leader dies has an unknown outcome, and raises so).
    leader = await etcd_cluster.leader_index()
    assert leader is not None
    watched = (leader + 1) % 3
    client._current = watched
    writer._current = leader
    task = asyncio.create_task(follow())
    try:
        revs = [await writer.put(p + f"{i:02}".encode(), b"v") for i in range(10)]
        await wait_until(lambda: len(got) == 10)
        await etcd_cluster.kill(watched)
        # Writes while the watch is reconnecting, and after.
        revs += [await writer.put(p + f"{i:02}".encode(), b"v") for i in range(10, 20)]
        await wait_until(lambda: len(got) == 20)
        assert [r for r, _ in got] == revs
        assert [e.kv.key for _, evs in got for e in evs] == [
            p + f"{i:02}".encode() for i in range(20)]
        assert client.current_endpoint != etcd_cluster.endpoints[watched]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.close()
