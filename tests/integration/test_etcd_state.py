"""The state store shared through a real 3-member etcd cluster: writes of one server seen by
the others (and waking their blocking queries), concurrent writes to one row losing nothing,
check-and-set across servers, secrets sealed at rest, loading at start and after a restart,
an etcd member's death, and etcd entirely gone."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from nomad_client.server.etcd.client import EtcdClient, EtcdSettings, EtcdUnavailable
from nomad_client.server.sealing import Sealer
from nomad_client.server.state import (
    ACL_TOKENS,
    JOBS,
    Change,
    StateStore,
    job_key,
    secret_digest,
)
from nomad_client.server.state_backends import Batch, OutcomeUnknown, Snapshot, WriteConflict
from nomad_client.server.variables import Conflict, Variables
from nomad_client.structs.models import ACLToken
from tests.integration.etcd_cluster import (
    EtcdCluster,
    etcd_cluster,  # noqa: F401  (fixture)
)
from tests.integration.harness import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEALER = Sealer("k1", bytes(range(32)))
# Generous for a shared 2-core machine, small enough that a dead etcd is noticed in a test.
SETTINGS: dict[str, Any] = {"dial_timeout": 2.0, "request_timeout": 5.0}

Opener = Callable[..., Any]


@pytest.fixture
async def open_store(etcd_cluster: EtcdCluster) -> AsyncIterator[Opener]:  # noqa: F811
    """Open stores on the cluster (each with its own client); all closed after the test."""
    opened: list[tuple[StateStore, EtcdClient]] = []

    async def make(endpoints: tuple[str, ...] | None = None, **settings: Any) -> StateStore:
        client = await EtcdClient.connect(EtcdSettings(
            endpoints=endpoints or etcd_cluster.endpoints, prefix="/test/",
            **{**SETTINGS, **settings}))
        try:
            store = await StateStore.from_etcd(client, SEALER)
        except BaseException:
            await client.close()
            raise
        opened.append((store, client))
        return store

    yield make
    for store, client in opened:
        await store.close()
        await client.close()


async def raw_client(cluster: EtcdCluster) -> EtcdClient:
    return await EtcdClient.connect(EtcdSettings(endpoints=cluster.endpoints, prefix="/test/"))


def job(job_id: str, **extra: Any) -> dict[str, Any]:
    return {"ID": job_id, "Namespace": "default", "Name": job_id, **extra}


def increment(current: Any | None, index: int) -> dict[str, Any]:
    base = current if current is not None else job("counter", N=0)
    return {**base, "N": base["N"] + 1}


async def test_a_write_on_one_server_is_seen_by_another_and_wakes_it(
        open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    # Another table first: an empty table reports index 1, which a first write would not pass.
    token = ACLToken(accessor_id="acc-0", secret_id="s", name="t", type="client")
    assert await b.wait_until(await a.write({ACL_TOKENS: [("acc-0", token)]}), 60)
    heard: list[tuple[int, list[Change]]] = []
    b.observe(lambda index, changes: heard.append((index, list(changes))))
    waiting = asyncio.create_task(b.wait_for_change((JOBS,), b.table_index(JOBS), 120))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # blocked until a job changes

    index = await a.write({JOBS: [(job_key("default", "web"), job("web"))]})

    # Well before the blocking query's own wait is up.
    assert await asyncio.wait_for(waiting, 60) == index == 2
    assert b.index == index
    row = b.get(JOBS, job_key("default", "web"))
    assert row == a.get(JOBS, job_key("default", "web"))
    assert row["ModifyIndex"] == row["CreateIndex"] == index
    assert [(i, [(c.table, c.key, c.before) for c in cs]) for i, cs in heard] == [
        (index, [(JOBS, job_key("default", "web"), None)])]

    # A deletion travels too, and the blocking query's index moves with it.
    deleted = await a.write(deletes={JOBS: [job_key("default", "web")]})
    assert await b.wait_until(deleted, 60)
    assert b.get(JOBS, job_key("default", "web")) is None
    assert b.table_index(JOBS) == deleted


async def test_concurrent_row_updates_from_two_servers_lose_nothing(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    key = job_key("default", "counter")

    async def bump(store: StateStore, times: int) -> list[int]:
        indexes = []
        for _ in range(times):
            indexes.append(await store.write(updates={JOBS: [(key, increment)]}))
            await asyncio.sleep(0)  # let the other server's writes interleave
        return indexes

    from_a, from_b = await asyncio.gather(bump(a, 50), bump(b, 50))

    # Every write got its own index, one after another.
    assert sorted(from_a + from_b) == list(range(1, 101))
    for store in (a, b):
        assert await store.wait_until(100, 60)
        assert store.get(JOBS, key)["N"] == 100
        assert store.index == 100


async def test_check_and_set_refuses_the_loser_across_servers(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    va, vb = Variables(a, SEALER), Variables(b, SEALER)
    try:
        first = await va.put("default", "app/config", {"password": "hunter2"})
        assert await b.wait_until(first.modify_index, 60)
        # B opens what A sealed: the items round-trip, still sealed in the row.
        seen = vb.get("default", "app/config")
        assert seen is not None and seen.modify_index == first.modify_index
        assert vb.items(seen) == {"password": "hunter2"}

        results = await asyncio.gather(
            va.put("default", "app/config", {"password": "from-a"}, cas=first.modify_index),
            vb.put("default", "app/config", {"password": "from-b"}, cas=first.modify_index),
            return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], Conflict)
        winner = won[0]
        for store, v in ((a, va), (b, vb)):
            assert await store.wait_until(winner.modify_index, 60)
            current = v.get("default", "app/config")
            assert current is not None
            assert v.items(current) == va.items(winner)
    finally:
        await va.close()
        await vb.close()


async def test_secrets_are_sealed_in_etcd(open_store: Opener, etcd_cluster: EtcdCluster  # noqa: F811
                                          ) -> None:
    a, b = await open_store(), await open_store()
    secret = secrets.token_hex(16)
    token = ACLToken(accessor_id="acc-1", secret_id=secret, name="ops", type="management")
    index = await a.write({ACL_TOKENS: [(token.accessor_id, token)]})
    variables = Variables(a, SEALER)
    try:
        await variables.put("default", "db", {"pw": "plain-text-password"})
    finally:
        await variables.close()

    raw = await raw_client(etcd_cluster)
    try:
        kvs, _ = await raw.get_prefix(raw.key(""))
    finally:
        await raw.close()
    blob = b"".join(kv.key + kv.value for kv in kvs)
    assert secret.encode() not in blob
    assert b"plain-text-password" not in blob
    assert any(kv.key == raw.key("state", ACL_TOKENS, "acc-1") for kv in kvs)

    # The other server found it opened, under its secondary index.
    assert await b.wait_until(index, 60)
    found = b.lookup(ACL_TOKENS, "secret", secret_digest(secret))
    assert found is not None and found.secret_id == secret


async def test_a_server_started_later_or_restarted_loads_everything(
        open_store: Opener) -> None:
    a = await open_store()
    for n in range(5):
        await a.write({JOBS: [(job_key("default", f"j{n}"), job(f"j{n}"))]})
    await a.write(deletes={JOBS: [job_key("default", "j0")]})
    token = ACLToken(accessor_id="acc", secret_id="s3cr3t", name="t", type="client")
    await a.write({ACL_TOKENS: [(token.accessor_id, token)]})

    late = await open_store()
    assert late.index == a.index == 7
    assert late.rows(JOBS) == a.rows(JOBS)
    assert late.get(ACL_TOKENS, "acc") == a.get(ACL_TOKENS, "acc")
    assert late.table_index(JOBS) == a.index  # a loaded table's index is the store's
    assert late.lookup(ACL_TOKENS, "secret", secret_digest("s3cr3t")) is not None

    # A restart (close, then open again) finds the same index and rows, and follows on.
    await a.close()
    again = await open_store()
    assert again.index == 7 and again.rows(JOBS) == late.rows(JOBS)
    index = await late.write({JOBS: [(job_key("default", "after"), job("after"))]})
    assert index == 8
    assert await again.wait_until(index, 60)
    assert again.get(JOBS, job_key("default", "after")) is not None


async def test_a_change_without_an_index_is_not_replayed(
        open_store: Opener, etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    a, b = await open_store(), await open_store()
    raw = await raw_client(etcd_cluster)
    try:
        await raw.put(raw.key("state", JOBS, "stray"), b"\x80")
    finally:
        await raw.close()
    index = await a.write({JOBS: [(job_key("default", "real"), job("real"))]})
    assert await b.wait_until(index, 60)
    assert b.get(JOBS, "stray") is None and a.get(JOBS, "stray") is None
    assert b.index == a.index == index == 1


async def test_writes_and_following_survive_an_etcd_member_dying(
        open_store: Opener, etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    # The raft leader dies, and it is the member A talks to: A's next commit is lost in the
    # leader change (its outcome unknown) and must be tried again exactly once.
    async def known_leader() -> list[int]:  # a list: member 0 is a leader too
        index = await etcd_cluster.leader_index()
        return [] if index is None else [index]

    [leader] = await eventually(known_leader, timeout=60, message="an etcd leader")
    endpoints = list(etcd_cluster.endpoints)
    first = endpoints.pop(leader)
    a = await open_store((first, *endpoints))
    b = await open_store((*endpoints, first))
    await a.write({JOBS: [(job_key("default", "before"), job("before"))]})

    await etcd_cluster.kill(leader)

    key = job_key("default", "counter")
    for store in (a, b, a, b):
        await store.write(updates={JOBS: [(key, increment)]})
    for store in (a, b):
        assert await store.wait_until(5, 60)
        assert store.get(JOBS, key)["N"] == 4
        assert store.index == 5
        assert store.get(JOBS, job_key("default", "before")) is not None


async def test_with_etcd_gone_writes_fail_clearly_and_reads_go_on(
        open_store: Opener, etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    a = await open_store(dial_timeout=1.0, request_timeout=2.0)
    index = await a.write({JOBS: [(job_key("default", "kept"), job("kept"))]})

    for member in range(len(etcd_cluster.members)):
        await etcd_cluster.kill(member)

    started = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        await a.write({JOBS: [(job_key("default", "lost"), job("lost"))]})
    # A few tries of the request timeout each, not a hang.
    assert time.monotonic() - started < 30
    # Reads are served from memory, as they were.
    assert a.get(JOBS, job_key("default", "kept")) is not None
    assert a.get(JOBS, job_key("default", "lost")) is None
    assert a.index == index
    assert await a.wait_for_change((JOBS,), index, 0.1) == index



class SwitchableKeys:
    """Two data keys, either one active: a keyring rotation as the sealer sees it."""

    def __init__(self) -> None:
        self.keys = {"k1": bytes(32), "k2": bytes(range(32))}
        self.active = "k1"

    def active_data_key(self) -> tuple[str, bytes]:
        return self.active, self.keys[self.active]

    def data_key(self, key_id: str) -> bytes | None:
        return self.keys.get(key_id)


async def test_reseal_goes_through_etcd(etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    keys = SwitchableKeys()
    sealer = Sealer.for_keyring(keys)
    clients = [await raw_client(etcd_cluster) for _ in range(2)]
    stores: list[StateStore] = []
    try:
        a, b = [await StateStore.from_etcd(client, sealer) for client in clients]
        stores += (a, b)
        token = ACLToken(accessor_id="acc", secret_id="the-secret", name="t", type="client")
        await a.write({ACL_TOKENS: [("acc", token)]})
        variables = Variables(a, sealer)
        try:
            before = await variables.put("default", "app", {"k": "v"})
        finally:
            await variables.close()

        keys.active = "k2"
        index = await a.reseal()

        assert index == before.modify_index + 1  # the variable's row moved; the token's not
        kvs, _ = await clients[0].get_prefix(clients[0].key("state", ""))
        sealed = {kv.key: kv.value for kv in kvs}
        assert b"sealed:v1:k2:" in sealed[clients[0].key("state", ACL_TOKENS, "acc")]
        assert b"sealed:v1:k1:" not in b"".join(sealed.values())
        assert await b.wait_until(index, 60)
        assert b.lookup(ACL_TOKENS, "secret", secret_digest("the-secret")) is not None
        moved = Variables(b, sealer)
        try:
            current = moved.get("default", "app")
            assert current is not None and current.key_id == "k2"
            assert moved.items(current) == {"k": "v"}
        finally:
            await moved.close()
    finally:
        for store in stores:
            await store.close()
        for client in clients:
            await client.close()


class LosesTrackOnce:
    """A backend standing in for etcd whose first commit goes through but whose answer is
    lost; the follower then replays it, as it would from the watch."""

    class Lost(OutcomeUnknown):
        pass

    def __init__(self, *, lose_first: bool = True) -> None:
        self.lose_first = lose_first
        self.index = 0
        self.commits: list[Batch] = []
        self.replay: Callable[[Batch], Any] | None = None
        self.replays: list[asyncio.Task[None]] = []

    async def load(self, tables: Any) -> Snapshot:
        return Snapshot(0, {})

    async def commit(self, expected: int, batch: Batch) -> None:
        if self.index != expected:
            raise WriteConflict(self.index)
        self.index = batch.index
        self.commits.append(batch)
        if len(self.commits) == 1 and self.lose_first:
            assert self.replay is not None
            self.replays.append(asyncio.create_task(self.replay(batch)))
            raise self.Lost("answer lost")

    def follow(self, apply: Any, resync: Any) -> None:
        self.replay = apply

    async def close(self) -> None:
        pass


async def test_a_commit_whose_answer_was_lost_is_applied_once() -> None:
    backend = LosesTrackOnce()
    store = StateStore(sealer=SEALER, backend=backend)
    backend.follow(store._replay, store._resync)
    key = job_key("default", "counter")

    index = await store.write(updates={JOBS: [(key, increment)]})

    assert index == 1 and store.index == 1
    assert len(backend.commits) == 1
    assert store.rows(JOBS) == [{**job("counter", N=1), "CreateIndex": 1, "ModifyIndex": 1}]
    assert await store.write(updates={JOBS: [(key, increment)]}) == 2
    assert [row["N"] for row in store.rows(JOBS)] == [2]
    await asyncio.gather(*backend.replays)


async def test_a_row_sealed_with_a_key_not_held_yet_waits_for_it(
        etcd_cluster: EtcdCluster) -> None:  # noqa: F811
    ahead, behind = SwitchableKeys(), SwitchableKeys()
    ahead.active = "k2"
    del behind.keys["k2"]  # B has not heard of the rotation yet
    clients = [await raw_client(etcd_cluster) for _ in range(2)]
    stores: list[StateStore] = []
    try:
        a = await StateStore.from_etcd(clients[0], Sealer.for_keyring(ahead))
        stores.append(a)
        b = await StateStore.from_etcd(clients[1], Sealer.for_keyring(behind))
        stores.append(b)
        token = ACLToken(accessor_id="acc", secret_id="new-secret", name="t", type="client")
        index = await a.write({ACL_TOKENS: [("acc", token)]})

        assert not await b.wait_until(index, 1.0)  # held back, not dropped
        behind.keys["k2"] = ahead.keys["k2"]
        assert await b.wait_until(index, 60)
        assert b.lookup(ACL_TOKENS, "secret", secret_digest("new-secret")) is not None
    finally:
        for store in stores:
            await store.close()
        for client in clients:
            await client.close()


async def test_a_resync_applies_the_difference_as_one_batch() -> None:
    store = StateStore(sealer=SEALER, backend=LosesTrackOnce(lose_first=False))
    await store.write({JOBS: [(job_key("default", "kept"), job("kept")),
                              (job_key("default", "gone"), job("gone"))]})
    heard: list[tuple[int, list[Change]]] = []
    store.observe(lambda index, changes: heard.append((index, list(changes))))
    kept = store.get(JOBS, job_key("default", "kept"))

    await store._resync(Snapshot(9, {JOBS: [
        (job_key("default", "kept"), kept),
        (job_key("default", "new"), {**job("new"), "CreateIndex": 9, "ModifyIndex": 9})]}))

    assert store.index == 9
    assert [row["ID"] for row in store.rows(JOBS)] == ["kept", "new"]
    assert store.get("namespaces", "default") is not None  # a seed row stays
    [(index, changes)] = heard
    assert index == 9
    assert sorted((c.key.split("\x00")[1], c.after is None) for c in changes) == [
        ("gone", True), ("new", False)]
