"""Variable locks across servers: a lock's last renewal is replicated state, so a renewal
through one server is seen by every other (none of them expires the lock early), the
variable's ModifyIndex stays put, and only the leader's reaper writes releases.

Two ``Variables`` over one ``StateStore`` stand for two servers sharing state: each keeps
its own bookkeeping and sees the other's commits as a follower would."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import VARIABLE_LOCK_RENEWALS, StateStore, variable_key
from nomad_client.server.variables import SECOND_NS, Conflict, VariableError, Variables
from tests.unit.factories import SEALER, ManualClock, settle, wait_until

KEY = variable_key("default", "l")
TTL = 10 * SECOND_NS  # expires 20 s after the last renewal...
DELAY = 5 * SECOND_NS  # ...and is released 5 s after that




@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store() -> StateStore:
    return StateStore()


@pytest.fixture
async def leader(store: StateStore, clock: ManualClock) -> AsyncIterator[Variables]:
    v = Variables(store, SEALER, clock=clock)
    try:
        yield v
    finally:
        await v.close()


@pytest.fixture
async def follower(store: StateStore, clock: ManualClock) -> AsyncIterator[Variables]:
    v = Variables(store, SEALER, clock=clock, leading=False)
    try:
        yield v
    finally:
        await v.close()


def renewed_at(store: StateStore) -> float | None:
    """When the lock on ``l`` was last renewed, as its replicated record says."""
    record = store.get(VARIABLE_LOCK_RENEWALS, KEY)
    return None if record is None else float(record["RenewedAt"])


def lock_id_of(v: Variables) -> str:
    current = v.get("default", "l")
    assert current is not None and current.lock is not None
    return current.lock.id


async def test_a_renewal_through_one_server_holds_on_every_other(
        store: StateStore, leader: Variables, follower: Variables, clock: ManualClock) -> None:
    locked = await follower.acquire("default", "l", {"k": "v"}, ttl=TTL, lock_delay=DELAY)
    lock_id = lock_id_of(follower)
    for _ in range(4):  # 60 s in all: well past the first deadline (25 s)
        clock.advance(15)
        before = store.index
        renewed = await follower.renew("default", "l", lock_id)
        # The variable's row is untouched (Nomad's renew writes no variable)...
        assert renewed.modify_index == locked.modify_index
        assert follower.get("default", "l") == locked
        # ...but the renewal is a write every server sees.
        assert store.index == before + 1
        leader.reschedule()
        await settle()
        assert leader.lock_held(locked)
        with pytest.raises(Conflict, match="variable is locked"):
            await leader.acquire("default", "l", None, ttl=TTL, lock_delay=DELAY)
        with pytest.raises(Conflict):
            await leader.put("default", "l", {"k": "other"})
    # The holder may renew through either server.
    clock.advance(15)
    await leader.renew("default", "l", lock_id)
    clock.advance(15)
    await follower.renew("default", "l", lock_id)
    assert leader.get("default", "l") == locked


async def test_the_leader_releases_a_lock_no_longer_renewed(
        store: StateStore, leader: Variables, follower: Variables, clock: ManualClock) -> None:
    locked = await follower.acquire("default", "l", {"k": "v"}, ttl=TTL, lock_delay=DELAY)
    assert store.get(VARIABLE_LOCK_RENEWALS, KEY) is not None
    clock.advance(20)  # expired: the holder may renew no more, nobody else may take it yet
    with pytest.raises(VariableError, match="attempting to modify locked variable"):
        await leader.renew("default", "l", lock_id_of(leader))
    with pytest.raises(Conflict):
        await leader.acquire("default", "l", None)
    clock.advance(5)
    leader.reschedule()
    released = await wait_until(
        lambda: (v := follower.get("default", "l")) is not None and v.lock is None and v,
        "the leader to release the lock", timeout=5)
    assert released.modify_index > locked.modify_index
    assert store.get(VARIABLE_LOCK_RENEWALS, KEY) is None
    again = await follower.acquire("default", "l", None, ttl=TTL, lock_delay=DELAY)
    assert again.lock is not None and again.lock.id != locked.lock.id  # type: ignore[union-attr]


async def test_only_the_leader_reaps(store: StateStore, follower: Variables,
                                     clock: ManualClock) -> None:
    locked = await follower.acquire("default", "l", None, ttl=TTL, lock_delay=0)
    assert follower._reaper is None
    clock.advance(20)
    follower.reschedule()
    await settle()
    # Released as far as any decision goes, but no release was written.
    assert not follower.lock_held(locked)
    assert follower.get("default", "l") == locked
    follower.lead()
    assert follower._reaper is not None
    # A new leader gives every held lock a fresh deadline first (as Nomad's does)...
    assert follower.lock_held(locked)
    await wait_until(lambda: store.index > locked.modify_index, "the fresh deadline written")
    assert follower.get("default", "l") == locked
    # ...and releases it once that has run out.
    clock.advance(20)
    follower.reschedule()
    await wait_until(lambda: (v := follower.get("default", "l")) is not None and v.lock is None,
                     "the new leader to release the lock", timeout=5)
    reaper = follower._reaper
    await follower.follow()
    assert follower._reaper is None and reaper.done()


async def test_a_lock_acquired_through_a_follower_wakes_the_leader(
        leader: Variables, follower: Variables, clock: ManualClock) -> None:
    assert leader._reaper is None  # nothing locked yet: nothing to run
    await follower.acquire("default", "l", None, ttl=TTL, lock_delay=0)
    assert leader._reaper is not None and follower._reaper is None


async def test_the_renewal_record_follows_the_lock(
        store: StateStore, leader: Variables, clock: ManualClock) -> None:
    await leader.acquire("default", "l", {"k": "v"}, ttl=TTL, lock_delay=DELAY)
    lock_id = lock_id_of(leader)
    assert renewed_at(store) == clock.now
    # The holder's proof of holding stays in the variable's row alone.
    assert lock_id not in repr(store.get(VARIABLE_LOCK_RENEWALS, KEY))
    clock.advance(5)
    await leader.put("default", "l", {"k": "mine"}, lock_id=lock_id)
    assert renewed_at(store) == clock.now - 5  # no renewal
    await leader.release("default", "l", lock_id)
    assert store.get(VARIABLE_LOCK_RENEWALS, KEY) is None
    # A lock lazily released is dropped with its record by the next write.
    await leader.acquire("default", "l", None, ttl=TTL, lock_delay=0)
    clock.advance(20)
    await leader.put("default", "l", {"k": "x"})
    assert store.get(VARIABLE_LOCK_RENEWALS, KEY) is None
    await leader.acquire("default", "l", None, ttl=TTL, lock_delay=0)
    clock.advance(20)
    await leader.delete("default", "l")
    assert store.get(VARIABLE_LOCK_RENEWALS, KEY) is None and store.values(
        VARIABLE_LOCK_RENEWALS) == []


async def test_a_record_that_does_not_read_is_no_crash(
        store: StateStore, leader: Variables, follower: Variables, clock: ManualClock) -> None:
    locked = await leader.acquire("default", "l", None, ttl=TTL, lock_delay=0)
    for bad in ({"LockDigest": "x", "RenewedAt": 1.0}, {"RenewedAt": "soon"}, ["not", "a", "dict"],
                {"LockDigest": None, "RenewedAt": float("nan")}):
        await store.write({VARIABLE_LOCK_RENEWALS: [(KEY, bad)]})
        # Counted from when the lock was first seen without a record it can read.
        assert follower.lock_held(locked)
    clock.advance(20)
    assert not follower.lock_held(locked)


async def test_a_restart_gives_held_locks_a_fresh_deadline(store: StateStore,
                                                           clock: ManualClock) -> None:
    first = Variables(store, SEALER, clock=clock)
    locked = await first.acquire("default", "l", None, ttl=TTL, lock_delay=DELAY)
    await first.close()
    clock.advance(3600)  # down for an hour
    again = Variables(store, SEALER, clock=clock)
    try:
        assert again.lock_held(locked)
        await wait_until(lambda: renewed_at(store) == clock.now,
                         "the fresh deadline written")
        clock.advance(24)
        assert again.lock_held(locked)
        clock.advance(1)
        assert not again.lock_held(locked)
    finally:
        await again.close()


async def test_the_servers_reaper_is_a_leader_duty(keyring: Keyring, clock: ManualClock) -> None:
    store = StateStore()
    follower = Server(store, keyring, region="global", acl_enabled=False, clock=clock,
                      leader=False)
    leader = Server(store, keyring, region="global", acl_enabled=False, clock=clock,
                    leader=False)
    try:
        locked = await follower.variables.acquire("default", "l", None, ttl=TTL, lock_delay=0)
        clock.advance(20)
        follower.variables.reschedule()
        await settle()
        assert follower.variables._reaper is None and leader.variables._reaper is None
        assert store.get("variables", KEY) == locked
        await leader.set_leader(True)
        await wait_until(lambda: renewed_at(store) == clock.now,
                         "the new leader's fresh deadline written")
        clock.advance(20)  # past that deadline
        leader.variables.reschedule()
        await wait_until(lambda: (v := store.get("variables", KEY)) is not None and v.lock is None,
                         "the leader to release the lock", timeout=5)
        reaper = leader.variables._reaper
        await leader.set_leader(False)
        assert leader.variables._reaper is None and reaper is not None and reaper.done()
    finally:
        await follower.close()
        await leader.close()
