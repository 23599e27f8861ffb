"""Variables on the server (``server.variables``): validation with Nomad's messages, the size
cap, check-and-set, locks with an injected clock, encryption at rest and blocking reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from nomad_client.server.state import VARIABLES, StateStore
from nomad_client.server.variables import (
    DEFAULT_LOCK_DELAY,
    DEFAULT_LOCK_TTL,
    SECOND_NS,
    Conflict,
    VariableError,
    Variables,
    validate_path,
)
from nomad_client.state_db import StateDB
from tests.unit.factories import SEALER, ManualClock, wait_until


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def variables(clock: ManualClock) -> AsyncIterator[Variables]:
    v = Variables(StateStore(), SEALER, clock=clock)
    try:
        yield v
    finally:
        await v.close()


ONLY_NOMAD_JOBS = ('only paths at "nomad/jobs" or "nomad/job-templates" and below are valid '
                   'paths under the top-level "nomad" directory')
TEMPLATES = ('"nomad/job-templates" is a reserved directory path, but you may write variables '
             'at the level below it, for example, "nomad/job-templates/template-name"')


@pytest.mark.parametrize(("path", "error"), [
    ("", "variable requires path"),
    ("a b", 'invalid path "a b"'),
    ("x" * 129, f'invalid path "{"x" * 129}"'),
    ("a.b", 'invalid path "a.b"'),
    ("nomad", '"nomad" is a reserved top-level directory path, but you may write variables '
              'to "nomad/jobs", "nomad/job-templates", "nomad/sentinel", or below'),
    ("nomad/", ONLY_NOMAD_JOBS),
    ("nomad/other", ONLY_NOMAD_JOBS),
    ("nomad/jobsx", ONLY_NOMAD_JOBS),
    ("nomad/job-templates", TEMPLATES),
    ("nomad/job-templates/a/b", TEMPLATES),
    ("nomad/jobs", None), ("nomad/jobs/web/g/t/x", None), ("nomad/sentinel/p", None),
    ("nomad/job-templates/one", None), ("a/", None), ("x" * 128, None), ("A-z_0~9/", None),
])
def test_path_validation(path: str, error: str | None) -> None:
    if error is None:
        validate_path(path)
        return
    with pytest.raises(VariableError) as caught:
        validate_path(path)
    assert (caught.value.status, caught.value.message) == (400, error)
    assert caught.value.validation


async def test_wildcard_namespace_and_empty_items_are_refused(variables: Variables) -> None:
    with pytest.raises(VariableError, match=r'can not target wildcard \("\*"\)namespace'):
        await variables.put("*", "a", {"k": "v"})
    with pytest.raises(VariableError, match="empty variables are invalid"):
        await variables.put("default", "a", {})
    assert variables.get("default", "a") is None


async def test_size_cap_is_64_kib_of_keys_and_values(variables: Variables) -> None:
    await variables.put("default", "a", {"k": "v" * (65536 - 1)})  # exactly the cap
    with pytest.raises(VariableError, match="limited to 64KiB"):
        await variables.put("default", "b", {"k": "v" * 65536})
    with pytest.raises(VariableError, match="limited to 64KiB"):
        await variables.put("default", "b", {"k": "é" * 32768})  # counted in UTF-8 bytes
    assert variables.get("default", "b") is None


async def test_put_keeps_create_fields_and_bumps_modify(variables: Variables) -> None:
    first = await variables.put("default", "a", {"k": "1"})
    second = await variables.put("default", "a", {"k": "1"})
    assert second.create_index == first.create_index
    assert second.create_time == first.create_time
    assert second.modify_index > first.modify_index
    assert second.data != first.data  # a fresh nonce each time
    assert variables.items(second) == {"k": "1"}
    assert second.key_id == SEALER.key_id


async def test_cas_conflict_leaves_the_variable_unchanged(variables: Variables) -> None:
    with pytest.raises(Conflict) as absent:
        await variables.put("default", "a", {"k": "1"}, cas=5)
    assert absent.value.current is None
    created = await variables.put("default", "a", {"k": "1"}, cas=0)
    index = variables.index()
    for cas in (0, created.modify_index + 1):
        with pytest.raises(Conflict) as caught:
            await variables.put("default", "a", {"k": "2"}, cas=cas)
        assert caught.value.current == created
    assert variables.get("default", "a") == created
    assert variables.index() == index  # nothing was written
    updated = await variables.put("default", "a", {"k": "2"}, cas=created.modify_index)
    assert variables.items(updated) == {"k": "2"}


async def test_delete_cas(variables: Variables) -> None:
    await variables.delete("default", "missing")  # no error
    await variables.delete("default", "missing", cas=0)  # [quirk] "only if absent"
    with pytest.raises(Conflict):
        await variables.delete("default", "missing", cas=3)
    created = await variables.put("default", "a", {"k": "1"})
    with pytest.raises(Conflict):
        await variables.delete("default", "a", cas=0)
    with pytest.raises(Conflict):
        await variables.delete("default", "a", cas=created.modify_index + 1)
    assert variables.get("default", "a") == created
    await variables.delete("default", "a", cas=created.modify_index)
    assert variables.get("default", "a") is None


async def test_concurrent_cas_creates_have_one_winner(variables: Variables) -> None:
    results = await asyncio.gather(
        *(variables.put("default", "a", {"n": str(i)}, cas=0) for i in range(10)),
        return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 9


# ---- locks -------------------------------------------------------------------------------
async def test_acquire_renew_release(variables: Variables, clock: ManualClock) -> None:
    locked = await variables.acquire("default", "l", {"k": "v"})
    assert locked.lock is not None
    assert (locked.lock.ttl, locked.lock.lock_delay) == (DEFAULT_LOCK_TTL, DEFAULT_LOCK_DELAY)
    lock_id = locked.lock.id
    clock.advance(25)  # within 2 x TTL
    renewed = await variables.renew("default", "l", lock_id)
    assert renewed.modify_index == locked.modify_index  # renewing writes nothing
    clock.advance(25)  # 50 s after acquiring, but 25 s after renewing
    await variables.renew("default", "l", lock_id)
    with pytest.raises(VariableError, match="attempting to modify locked variable"):
        await variables.renew("default", "l", "not-the-holder")
    released = await variables.release("default", "l", lock_id)
    assert released.lock is None
    assert variables.items(released) == {"k": "v"}
    with pytest.raises(VariableError, match="doesn't hold a lock"):
        await variables.renew("default", "l", lock_id)
    with pytest.raises(VariableError, match="doesn't exist"):
        await variables.renew("default", "nope", lock_id)


async def test_a_held_lock_refuses_other_writers(variables: Variables) -> None:
    locked = await variables.acquire("default", "l", {"k": "v"}, ttl=10 * SECOND_NS)
    assert locked.lock is not None
    with pytest.raises(Conflict) as put:
        await variables.put("default", "l", {"k": "other"})
    assert put.value.current is None  # the zero value: nothing about the lock leaks
    with pytest.raises(Conflict):
        await variables.acquire("default", "l", None)
    with pytest.raises(Conflict):
        await variables.delete("default", "l")
    with pytest.raises(Conflict):
        await variables.release("default", "l", "someone-else")
    assert variables.get("default", "l") == locked
    # The holder may write (its lock is reset to the defaults) and re-acquire.
    written = await variables.put("default", "l", {"k": "mine"}, lock_id=locked.lock.id)
    assert written.lock is not None and written.lock.id == locked.lock.id
    assert written.lock.ttl == DEFAULT_LOCK_TTL
    again = await variables.acquire("default", "l", None, lock_id=locked.lock.id)
    assert variables.items(again) == {}  # [quirk] acquire replaces the items


async def test_lock_bounds(variables: Variables) -> None:
    with pytest.raises(VariableError, match="TTL must be between 10 seconds and 24 hours"):
        await variables.acquire("default", "l", None, ttl=9 * SECOND_NS)
    with pytest.raises(VariableError, match="TTL must be between"):
        await variables.acquire("default", "l", None, ttl=24 * 3600 * SECOND_NS + 1)
    with pytest.raises(VariableError, match="Lock delay and TTL must be positive"):
        await variables.acquire("default", "l", None, lock_delay=-1)
    assert variables.get("default", "l") is None


async def test_ttl_expiry_then_lock_delay_then_release(variables: Variables,
                                                       clock: ManualClock) -> None:
    locked = await variables.acquire("default", "l", {"k": "v"}, ttl=10 * SECOND_NS,
                                     lock_delay=5 * SECOND_NS)
    assert locked.lock is not None
    clock.advance(20)  # 2 x TTL: expired, but inside the lock delay
    with pytest.raises(VariableError, match="attempting to modify locked variable"):
        await variables.renew("default", "l", locked.lock.id)
    with pytest.raises(Conflict):
        await variables.put("default", "l", {"k": "x"})
    assert await variables.expire_locks() == variables.index()  # nothing due yet
    assert variables.get("default", "l") == locked
    clock.advance(5)  # the delay is over: released
    await variables.put("default", "l", {"k": "x"})  # lazily: no longer blocks
    current = variables.get("default", "l")
    assert current is not None and current.lock is None


async def test_reaper_writes_the_release(variables: Variables, clock: ManualClock) -> None:
    locked = await variables.acquire("default", "l", {"k": "v"}, ttl=10 * SECOND_NS,
                                     lock_delay=0)
    clock.advance(20)
    variables.reschedule()
    current = await wait_until(
        lambda: (v := variables.get("default", "l")) is not None and v.lock is None and v,
        "the reaper to release the lock", timeout=2)
    assert current.modify_index > locked.modify_index


async def test_close_stops_the_reaper(clock: ManualClock) -> None:
    v = Variables(StateStore(), SEALER, clock=clock)
    await v.acquire("default", "l", None)
    reaper = v._reaper
    assert reaper is not None and not reaper.done()
    await v.close()
    assert reaper.done()


# ---- at rest, blocking ---------------------------------------------------------------------
async def test_items_never_reach_the_state_file_in_the_clear(workdir: Path,
                                                             clock: ManualClock) -> None:
    db_path = workdir / "server" / "state.db"
    db = await StateDB.open(db_path)
    store = StateStore(db, SEALER)
    v = Variables(store, SEALER, clock=clock)
    await v.put("default", "nomad/jobs/web", {"password": "hunter2-very-secret"})
    await db.close()
    await v.close()
    on_disk = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.is_file())
    assert b"nomad/jobs/web" in on_disk  # the record is there...
    assert b"hunter2-very-secret" not in on_disk  # ...its items are not
    assert b"password" not in on_disk
    db = await StateDB.open(db_path)
    try:
        restored = Variables(await StateStore.restore(db, SEALER), SEALER)
        variable = restored.get("default", "nomad/jobs/web")
        assert variable is not None
        assert restored.items(variable) == {"password": "hunter2-very-secret"}
    finally:
        await db.close()


async def test_sealed_items_are_bound_to_their_path(variables: Variables) -> None:
    a = await variables.put("default", "a", {"k": "v"})
    moved = await variables.put("default", "b", {"k": "other"})
    with pytest.raises(Exception, match="does not open"):
        variables.items(attrs.evolve(moved, data=a.data))


async def test_blocking_read_wakes_on_change(variables: Variables) -> None:
    created = await variables.put("default", "a", {"k": "1"})
    waiter = asyncio.create_task(
        variables.wait_for("default", "a", created.modify_index, 10))
    await asyncio.sleep(0)
    await variables.put("default", "other", {"k": "1"})  # another variable: keeps waiting
    await asyncio.sleep(0)
    assert not waiter.done()
    updated = await variables.put("default", "a", {"k": "2"})
    current, index = await asyncio.wait_for(waiter, 5)
    assert current == updated and index == updated.modify_index


async def test_blocking_read_of_a_missing_variable_times_out(variables: Variables) -> None:
    current, index = await variables.wait_for("default", "nope", variables.index(), 0.01)
    assert current is None and index == variables.index()
    assert VARIABLES == "variables"
