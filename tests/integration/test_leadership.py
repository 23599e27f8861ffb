"""Leader election and server membership on a real etcd cluster: one leader at a time, a handover
when the leader resigns or dies, fencing before a takeover, and an etcd member lost in between
changing nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from nomad_client.server.etcd.client import EtcdClient, EtcdSettings, op_put
from nomad_client.server.etcd.leadership import Leadership
from tests.integration.etcd_cluster import EtcdCluster, etcd_cluster  # noqa: F401
from tests.unit.factories import wait_until as shared_wait_until

pytestmark = pytest.mark.integration

TTL = 3
MARGIN = 1.0  # what Leadership uses for this TTL
DEADLINE = 60.0


class Server:
    """One server's view: its client, its Leadership and the hooks' calls, timestamped."""

    def __init__(self, client: EtcdClient, server_id: str) -> None:
        self.client = client
        self.id = server_id
        self.calls: list[tuple[str, float]] = []
        self.leadership = Leadership(client, server_id=server_id,
                                     info={"id": server_id, "addr": f"{server_id}:4647"},
                                     ttl=TTL, on_gain=self._gain, on_loss=self._loss)

    async def _gain(self) -> None:
        assert not self.calls or self.calls[-1][0] == "loss"
        self.calls.append(("gain", time.monotonic()))

    async def _loss(self) -> None:
        assert self.calls and self.calls[-1][0] == "gain"
        self.calls.append(("loss", time.monotonic()))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]

    def time_of(self, kind: str, nth: int = 0) -> float:
        return [t for k, t in self.calls if k == kind][nth]


@pytest.fixture
async def servers(etcd_cluster: EtcdCluster  # noqa: F811
                  ) -> AsyncIterator[Callable[[str], Awaitable[Server]]]:
    made: list[Server] = []

    async def make(server_id: str) -> Server:
        client = await EtcdClient.connect(EtcdSettings(etcd_cluster.endpoints, prefix="/l/"))
        s = Server(client, server_id)
        made.append(s)
        await s.leadership.start()
        return s

    yield make
    for s in made:
        await s.leadership.close()
        await s.client.close()


async def wait_until(cond: Callable[[], bool]) -> float:
    """Poll until cond() holds (the shared helper, this file's deadline); the monotonic time
    it was seen to."""
    await shared_wait_until(cond, timeout=DEADLINE)
    return time.monotonic()


def leaders(*servers: Server) -> list[str]:
    return [s.id for s in servers if s.leadership.is_leader]


async def test_exactly_one_leader_and_everyone_sees_everyone(
        servers: Callable[[str], Awaitable[Server]]) -> None:
    a = await servers("a")
    b = await servers("b")
    await wait_until(lambda: len(leaders(a, b)) == 1)
    (winner,) = leaders(a, b)
    for s in (a, b):
        await wait_until(lambda s=s: s.leadership.member_ids() == ["a", "b"])  # type: ignore[misc]
        assert s.leadership.leader_id == winner
        assert s.leadership.leader() == {"id": winner, "addr": f"{winner}:4647"}
    # It stays that way: no flapping over several lease periods.
    await asyncio.sleep(2 * TTL)
    assert leaders(a, b) == [winner]
    assert a.kinds() + b.kinds() == ["gain"]


async def test_the_fence_lets_only_the_leader_write(
        servers: Callable[[str], Awaitable[Server]]) -> None:
    a = await servers("a")
    await wait_until(lambda: a.leadership.is_leader)
    b = await servers("b")
    key = a.client.key("fenced")
    ok = await a.client.txn([a.leadership.fence()], [op_put(key, b"a")])
    assert ok.succeeded
    no = await b.client.txn([b.leadership.fence()], [op_put(key, b"b")])
    assert not no.succeeded
    kv = await a.client.get(key)
    assert kv is not None and kv.value == b"a"


async def test_closing_the_leader_hands_over(
        servers: Callable[[str], Awaitable[Server]]) -> None:
    a = await servers("a")
    await wait_until(lambda: a.leadership.is_leader)
    b = await servers("b")
    closed = time.monotonic()
    await a.leadership.close()
    assert a.kinds() == ["gain", "loss"]
    took_over = await wait_until(lambda: b.leadership.is_leader)
    # Resigning revokes the lease: no need to wait for it to run out.
    assert took_over - closed < TTL + MARGIN
    assert b.time_of("gain") > a.time_of("loss")
    await wait_until(lambda: b.leadership.member_ids() == ["b"])


async def test_a_leader_that_stops_refreshing_steps_down_before_the_takeover(
        servers: Callable[[str], Awaitable[Server]]) -> None:
    a = await servers("a")
    await wait_until(lambda: a.leadership.is_leader)
    b = await servers("b")
    await wait_until(lambda: b.leadership.member_ids() == ["a", "b"])
    # As if a's process froze or lost etcd: its lease refreshes stop, nothing is revoked.
    for task in a.leadership._tasks:
        task.cancel()
    stopped = time.monotonic()
    await wait_until(lambda: b.leadership.is_leader)
    assert a.kinds() == ["gain", "loss"]
    assert b.kinds() == ["gain"]
    assert a.time_of("loss") < b.time_of("gain")
    # a stepped down within the fencing window, not when etcd expired its lease.
    assert a.time_of("loss") - stopped < TTL - MARGIN + 0.5
    assert not a.leadership.is_leader
    # Its registration ran out with its lease.
    await wait_until(lambda: b.leadership.member_ids() == ["b"])
    assert b.leadership.leader() == {"id": "b", "addr": "b:4647"}


async def test_a_lost_etcd_member_changes_nothing(
        etcd_cluster: EtcdCluster,  # noqa: F811
        servers: Callable[[str], Awaitable[Server]]) -> None:
    a = await servers("a")
    await wait_until(lambda: a.leadership.is_leader)
    b = await servers("b")
    await wait_until(lambda: b.leadership.member_ids() == ["a", "b"])
    # The member the leader talks to goes away.
    victim = etcd_cluster.endpoints.index(a.client.current_endpoint)
    await etcd_cluster.kill(victim)
    # Over several lease periods: still the same leader, no hook called, calls work. Reads
    # move to another member by themselves; a write sent into the dying connection would
    # have an unknown outcome (and raise so), hence a read first.
    assert await a.client.get(a.client.key("k", "none")) is None
    for i in range(3 * TTL):
        await a.client.put(a.client.key("k", str(i)), b"v")
        kv = await b.client.get(a.client.key("k", str(i)))
        assert kv is not None and kv.value == b"v"
        await asyncio.sleep(1)
    assert leaders(a, b) == ["a"]
    assert a.kinds() == ["gain"] and b.kinds() == []
    assert a.client.current_endpoint != etcd_cluster.endpoints[victim]
    # The member comes back; still nothing changes.
    await etcd_cluster.restart(victim)
    await a.client.put(a.client.key("after"), b"v")
    assert leaders(a, b) == ["a"] and a.kinds() == ["gain"]


async def test_losing_etcd_entirely_fences_the_leader(tmp_path: Path) -> None:
    async with EtcdCluster(tmp_path, members=1) as etcd:
        client = await EtcdClient.connect(EtcdSettings(etcd.endpoints, prefix="/l/",
                                                       request_timeout=2.0, dial_timeout=1.0))
        a = Server(client, "a")
        try:
            await a.leadership.start()
            await wait_until(lambda: a.leadership.is_leader)
            await etcd.kill(0)
            killed = time.monotonic()
            await wait_until(lambda: a.kinds() == ["gain", "loss"])
            assert a.time_of("loss") - killed < TTL - MARGIN + 0.5
            assert not a.leadership.is_leader
            # etcd back: the server registers (if its lease ran out) and leads again.
            await etcd.restart(0)
            await wait_until(lambda: a.kinds() == ["gain", "loss", "gain"])
            assert a.leadership.is_leader and a.leadership.member_ids() == ["a"]
        finally:
            await a.leadership.close()
            await client.close()
        assert a.kinds() == ["gain", "loss", "gain", "loss"]


async def test_a_server_whose_lease_ended_registers_again(
        servers: Callable[[str], Awaitable[Server]]) -> None:
    a = await servers("a")
    await wait_until(lambda: a.leadership.is_leader)
    b = await servers("b")
    await wait_until(lambda: b.leadership.member_ids() == ["a", "b"])
    # a's lease ends under it (as after a long pause): its keys go and it steps down.
    lease = a.leadership._lease
    assert lease is not None
    revoked_at = time.monotonic()
    await b.client.lease_revoke(lease)
    await wait_until(lambda: a.kinds()[:2] == ["gain", "loss"])
    # Not a fencing case (the lease ended at once): a hears of it from its watch or refresh.
    assert a.time_of("loss") < revoked_at + TTL
    # a registers again on a new lease; whoever campaigned first leads (b, usually: a needs
    # a new lease first), and both agree on it.
    await wait_until(lambda: a.leadership._lease not in (None, lease))
    for s in (a, b):
        await wait_until(lambda s=s: s.leadership.member_ids() == ["a", "b"])  # type: ignore[misc]
    await wait_until(lambda: len(leaders(a, b)) == 1)
    (leader,) = leaders(a, b)
    await wait_until(lambda: a.leadership.leader_id == b.leadership.leader_id == leader)
