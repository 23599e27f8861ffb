"""Variable locks across two servers sharing their state through a real etcd: a lock renewed
through one server past its first deadline is never released nor taken through the other;
once no longer renewed, the leader releases it after 2 x TTL and the lock delay, and it can
be taken again. Lock time comes from one fake clock shared by both servers (the deadlines
are replicated state; nothing here waits for them in real time)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nomad_client.server.etcd.client import EtcdClient, EtcdSettings
from nomad_client.server.sealing import Sealer
from nomad_client.server.state import StateStore
from nomad_client.server.variables import SECOND_NS, Conflict, VariableError, Variables
from tests.integration.etcd_cluster import EtcdCluster
from tests.integration.harness import eventually
from tests.unit.factories import ManualClock

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEALER = Sealer("k1", bytes(range(32)))
TTL = 10 * SECOND_NS  # expires 20 s after the last renewal...
DELAY = 5 * SECOND_NS  # ...and is released 5 s after that
# Generous: CI is a shared 2-core machine.
CATCH_UP = 60.0




class TwoServers:
    """A (a follower) and B (the leader): each its own etcd client, store and variables."""

    def __init__(self) -> None:
        self.clients: list[EtcdClient] = []
        self.stores: list[StateStore] = []
        self.variables: list[Variables] = []

    async def open(self, endpoints: tuple[str, ...], clock: ManualClock) -> None:
        for leading in (False, True):
            client = await EtcdClient.connect(EtcdSettings(
                endpoints=endpoints, prefix="/locks/", dial_timeout=2.0, request_timeout=5.0))
            self.clients.append(client)
            store = await StateStore.from_etcd(client, SEALER)
            self.stores.append(store)
            self.variables.append(Variables(store, SEALER, clock=clock, leading=leading))

    async def close(self) -> None:
        for v in self.variables:
            await v.close()
        for store in self.stores:
            await store.close()
        for client in self.clients:
            await client.close()


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[tuple[TwoServers, ManualClock]]:
    clock = ManualClock()
    async with EtcdCluster(tmp_path, members=1) as cluster:
        two = TwoServers()
        try:
            await two.open(cluster.endpoints, clock)
            yield two, clock
        finally:
            await two.close()


async def test_a_lock_renewed_through_one_server_holds_on_the_other_until_released(
        servers: tuple[TwoServers, ManualClock]) -> None:
    two, clock = servers
    (a, b), (va, vb) = two.stores, two.variables

    async def b_has_caught_up() -> None:
        assert await b.wait_until(a.index, CATCH_UP)

    locked = await va.acquire("default", "l", {"k": "v"}, ttl=TTL, lock_delay=DELAY)
    assert locked.lock is not None
    lock_id = locked.lock.id
    await b_has_caught_up()
    assert vb.get("default", "l") == locked

    for _ in range(4):  # 60 s in all: well past the first deadline (25 s)
        clock.advance(15)
        renewed = await va.renew("default", "l", lock_id)
        assert renewed.modify_index == locked.modify_index  # the variable is untouched
        await b_has_caught_up()
        # The leader finds nothing due, and writes nothing.
        index = b.index
        assert await vb.expire_locks() == index and b.index == index
        assert vb.lock_held(locked)
        with pytest.raises(Conflict, match="variable is locked"):
            await vb.acquire("default", "l", None, ttl=TTL, lock_delay=DELAY)
    assert va._reaper is None  # the follower never reaps

    # No more renewals: expired after 2 x TTL, released by the leader after the delay.
    clock.advance(20)
    with pytest.raises(VariableError, match="attempting to modify locked variable"):
        await va.renew("default", "l", lock_id)
    with pytest.raises(Conflict):
        await vb.acquire("default", "l", None, ttl=TTL, lock_delay=DELAY)
    clock.advance(5)
    vb.reschedule()
    released = await eventually(
        lambda: (v := va.get("default", "l")) is not None and v.lock is None and v,
        timeout=CATCH_UP, message="the leader's release to reach the follower")
    assert released.modify_index > locked.modify_index
    with pytest.raises(VariableError, match="doesn't hold a lock"):
        await va.renew("default", "l", lock_id)

    again = await vb.acquire("default", "l", None, ttl=TTL, lock_delay=DELAY)
    assert again.lock is not None and again.lock.id != lock_id
    assert await a.wait_until(b.index, CATCH_UP)
    assert va.get("default", "l") == again
    with pytest.raises(Conflict):
        await va.acquire("default", "l", None, lock_id=lock_id)
