"""The keyring shared by servers through a real etcd, its key material sealed with the KEK."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgpack
import pytest

from nomad_client.server.etcd.client import EtcdClient, EtcdSettings
from nomad_client.server.etcd.kek import KEK_BYTES
from nomad_client.server.etcd.keyring_store import EtcdKeyStore
from nomad_client.server.keyring import (
    Keyring,
    KeyringError,
    KeyState,
    RootKey,
    signing_key_pem,
)
from tests.integration.etcd_cluster import EtcdCluster
from tests.unit.factories import wait_until

ALLOC = "5c63a1f0-0000-4000-8000-000000000001"

Server = tuple[Keyring, EtcdKeyStore]


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    # One member is enough here: failover is the client's business, tested with it.
    async with EtcdCluster(tmp_path, members=1) as cluster:
        yield cluster


@pytest.fixture
async def connect(etcd: EtcdCluster) -> AsyncIterator[Callable[[], Awaitable[EtcdClient]]]:
    clients: list[EtcdClient] = []

    async def make() -> EtcdClient:
        client = await EtcdClient.connect(EtcdSettings(endpoints=etcd.endpoints,
                                                       prefix="/keyring-test/"))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def start(connect: Callable[[], Awaitable[EtcdClient]]
                ) -> AsyncIterator[Callable[[bytes], Awaitable[Server]]]:
    """Start a server's keyring on the shared etcd: its own client, store and watch."""
    stores: list[EtcdKeyStore] = []

    async def make(kek: bytes) -> Server:
        store = EtcdKeyStore(await connect(), kek, kek_file="/etc/nomad/kek")
        stores.append(store)
        keyring = await Keyring.load_or_create_from(store)
        store.watch(keyring)
        return keyring, store

    yield make
    for store in stores:
        await store.close()


KEK = os.urandom(KEK_BYTES)


def sign(keyring: Keyring) -> str:
    return keyring.sign_identity(namespace="default", job_id="web", alloc_id=ALLOC, task="t",
                                 group="g", region="global", ttl_seconds=600)


def ids(keyring: Keyring) -> list[tuple[str, KeyState]]:
    return [(k.key_id, k.state) for k in keyring.keys()]


async def test_two_servers_share_one_ring(start: Callable[[bytes], Awaitable[Server]]) -> None:
    (a, _), (b, _) = await start(KEK), await start(KEK)
    assert ids(a) == ids(b) and len(ids(a)) == 1
    assert a.key_id == b.key_id
    assert a.active_data_key() == b.active_data_key()
    assert a.jwks() == b.jwks()
    assert b.verify(sign(a)).alloc_id == ALLOC
    assert a.verify(sign(b)).alloc_id == ALLOC


async def test_rotation_on_one_server_is_seen_by_the_other(
        start: Callable[[bytes], Awaitable[Server]]) -> None:
    (a, _), (b, _) = await start(KEK), await start(KEK)
    old_token = sign(b)
    new = await a.rotate()
    await wait_until(lambda: b.key_id == new.key_id, "B takes over A's new active key")
    assert ids(a) == ids(b) and a.jwks() == b.jwks()
    assert b.data_key(new.key_id) == new.data_key
    token = sign(b)
    assert a.verify(token).alloc_id == ALLOC
    assert a.verify(old_token).alloc_id == ALLOC and b.verify(old_token).alloc_id == ALLOC

    # A full rotation and its end travel the same way.
    newer = await b.rotate(full=True)
    await wait_until(lambda: a.key_id == newer.key_id and a.rekeying, "A sees B's full rotation")
    await a.finish_rekeying()
    await wait_until(lambda: not b.rekeying, "B sees the rekeying finished")
    assert ids(a) == ids(b)
    assert [state for _, state in ids(b)] == [KeyState.INACTIVE, KeyState.INACTIVE,
                                              KeyState.ACTIVE]


async def test_rotations_racing_on_two_servers_lose_no_key(
        start: Callable[[bytes], Awaitable[Server]]) -> None:
    (a, _), (b, _) = await start(KEK), await start(KEK)
    first = a.key_id
    # B rotates before it has heard of A's rotation: its change conflicts, is re-applied to
    # A's ring, and both new keys stay.
    made = await asyncio.gather(a.rotate(), b.rotate())
    expected = {first, *(k.key_id for k in made)}
    await wait_until(lambda: {k for k, _ in ids(a)} == expected == {k for k, _ in ids(b)},
                      "both servers hold all three keys")
    await wait_until(lambda: a.key_id == b.key_id, "both sign with the same key")
    assert len([k for k, s in ids(a) if s is KeyState.ACTIVE]) == 1
    assert a.jwks() == b.jwks()


async def test_racing_first_start_makes_one_ring(
        start: Callable[[bytes], Awaitable[Server]]) -> None:
    servers = await asyncio.gather(*(start(KEK) for _ in range(4)))
    rings = {tuple(ids(keyring)) for keyring, _ in servers}
    assert len(rings) == 1
    (ring,) = rings
    assert len(ring) == 1


async def test_a_server_with_another_kek_refuses_to_start(
        start: Callable[[bytes], Awaitable[Server]]) -> None:
    a, _ = await start(KEK)
    with pytest.raises(KeyringError) as info:
        await start(os.urandom(KEK_BYTES))
    message = str(info.value)
    assert message == (f"keyring key {a.key_id} cannot be opened with the key-encryption key "
                       f"in /etc/nomad/kek: is it the same file on every server?")
    for secret in secrets_of(a.keys()[0]):
        assert secret not in message.encode()
    # Nor in the chain a traceback would print.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def secrets_of(key: RootKey) -> list[bytes]:
    """Every spelling of a root key's material that could leak."""
    pem = signing_key_pem(key)
    body = b"".join(pem.splitlines()[1:-1])
    der = base64.b64decode(body)
    return [key.data_key, base64.b64encode(key.data_key), key.data_key.hex().encode(),
            body[:64], body[-64:], der[40:104], KEK, base64.b64encode(KEK)]


async def test_no_key_material_in_etcd(start: Callable[[bytes], Awaitable[Server]],
                                       connect: Callable[[], Awaitable[EtcdClient]]) -> None:
    a, _ = await start(KEK)
    await a.rotate()
    await a.rotate(full=True)
    client = await connect()
    rows, _ = await client.get_prefix(client.key(""))
    values = b"".join(kv.key + kv.value for kv in rows)
    assert len(rows) == 4  # three keys and the marker
    assert b"PRIVATE KEY" not in values
    for key in a.keys():
        for secret in secrets_of(key):
            assert secret not in values
        record = msgpack.unpackb(next(kv.value for kv in rows if kv.key.endswith(
            key.key_id.encode())))
        # The clear part is metadata only.
        assert set(record) == {"id", "state", "create_time", "algorithm", "public_key_sha256",
                               "sealed"}


async def test_a_corrupt_ring_is_a_clear_error_and_the_watch_keeps_the_old_ring(
        start: Callable[[bytes], Awaitable[Server]],
        connect: Callable[[], Awaitable[EtcdClient]],
        caplog: pytest.LogCaptureFixture) -> None:
    a, _ = await start(KEK)
    client = await connect()
    marker = client.key("keyring-init")
    good = await client.get(marker)
    assert good is not None
    caplog.set_level(logging.WARNING, logger="nomad_client.server.etcd.keyring_store")
    await client.put(marker, b"\xc1garbage")
    await wait_until(lambda: "keyring marker in etcd is corrupt" in caplog.text,
                      "the watch reports the corrupt marker")
    assert len(a.keys()) == 1 and a.verify(sign(a)).alloc_id == ALLOC
    with pytest.raises(KeyringError, match="keyring marker in etcd is corrupt"):
        await EtcdKeyStore(client, KEK).load()

    # Put right again, the ring is followed again.
    await client.put(marker, good.value)
    b = await Keyring.load_or_create_from(EtcdKeyStore(client, KEK))
    assert ids(b) == ids(a)
    rotated = await b.rotate()
    await wait_until(lambda: a.key_id == rotated.key_id, "A follows B's rotation")


def watches() -> int:
    return sum(t.get_name() == "keyring-watch" and not t.done() for t in asyncio.all_tasks())


async def test_close_stops_the_watch(start: Callable[[bytes], Awaitable[Server]]) -> None:
    (a, store), (b, _) = await start(KEK), await start(KEK)
    assert watches() == 2
    await store.close()
    await store.close()  # idempotent
    assert watches() == 1
    before = a.key_id
    rotated = await b.rotate()
    # A third server reads the rotation: it is in etcd, and A, no longer watching, kept its
    # ring.
    c, _ = await start(KEK)
    assert c.key_id == rotated.key_id and a.key_id == before


async def test_refresh_brings_a_new_key_at_once(
        start: Callable[[bytes], Awaitable[Server]],
        connect: Callable[[], Awaitable[EtcdClient]]) -> None:
    a, _ = await start(KEK)
    # B does not watch: only refresh can bring it A's rotation.
    store = EtcdKeyStore(await connect(), KEK)
    b = await Keyring.load_or_create_from(store)
    new = await a.rotate()
    assert b.data_key(new.key_id) is None
    await store.refresh(b)
    assert b.data_key(new.key_id) == new.data_key and ids(b) == ids(a)
