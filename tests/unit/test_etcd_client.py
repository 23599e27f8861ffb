"""The etcd client against a real single-member etcd: KV, transactions, watches, leases and the
error contract (what is retried, what is raised, what messages may say)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from nomad_client.server.etcd import client as etcd_client
from nomad_client.server.etcd.client import (
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdSettings,
    EtcdUnavailable,
    LeaseExpired,
    WatchEvent,
    absent,
    mod_revision_equals,
    op_delete,
    op_get,
    op_put,
    prefix_end,
    value_equals,
)
from tests.integration.etcd_cluster import MAX_REQUEST_BYTES, EtcdCluster, _free_ports
from tests.unit.factories import wait_until


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    async with EtcdCluster(tmp_path, members=1) as cluster:
        yield cluster


@pytest.fixture
async def client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    c = await EtcdClient.connect(EtcdSettings(etcd.endpoints, prefix="/t/"))
    yield c
    await c.close()


async def _next(it: AsyncGenerator[tuple[int, list[WatchEvent]], None],
                timeout: float = 30.0) -> tuple[int, list[WatchEvent]]:
    return await asyncio.wait_for(anext(it), timeout)


def test_settings_normalise_endpoints_and_prefix() -> None:
    s = EtcdSettings(("http://10.0.0.1:2379/", "https://h:1", "bare", "[::1]"), prefix="/x")
    assert s.endpoints == ("10.0.0.1:2379", "h:1", "bare:2379", "[::1]:2379")
    assert s.prefix == "/x/"
    with pytest.raises(ValueError):
        EtcdSettings(())
    with pytest.raises(ValueError):
        EtcdSettings(("http://",))


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\x00"
    assert prefix_end(b"") == b"\x00"


def test_values_stay_out_of_reprs() -> None:
    secret = b"s3cr3t-value"
    for thing in (op_put(b"k", secret), value_equals(b"k", secret),
                  etcd_client.KV(b"k", secret, 1, 1, 0)):
        assert b"s3cr3t" not in repr(thing).encode()


async def test_key_joins_parts_under_the_prefix(client: EtcdClient) -> None:
    assert client.key("servers", "a") == b"/t/servers/a"
    assert client.key("jobs", "ns\x00id") == b"/t/jobs/ns\x00id"


async def test_put_get_delete(client: EtcdClient) -> None:
    k = client.key("a")
    assert await client.get(k) is None
    rev = await client.put(k, b"1")
    kv = await client.get(k)
    assert kv is not None and kv.value == b"1" and kv.mod_revision == rev == kv.create_revision
    rev2 = await client.put(k, b"2")
    kv = await client.get(k)
    assert kv is not None and kv.value == b"2" and kv.mod_revision == rev2 > rev
    assert kv.create_revision == rev
    rev3 = await client.delete(k)
    assert rev3 > rev2 and await client.get(k) is None


async def test_get_prefix_pages_at_one_revision(client: EtcdClient,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_client, "_PAGE", 3)
    for i in range(10):
        await client.put(client.key("p", f"{i:02}"), str(i).encode())
    await client.put(client.key("q"), b"outside")  # shares the text "/t/p"? no: not under p/
    await client.put(b"/t/p", b"not under the prefix /t/p/")
    rows, rev = await client.get_prefix(client.key("p", ""))
    assert [r.value for r in rows] == [str(i).encode() for i in range(10)]
    assert rev == max(r.mod_revision for r in rows) + 2
    assert await client.get_prefix(client.key("none", "")) == ([], rev)


async def test_txn_compares_and_branches(client: EtcdClient) -> None:
    k = client.key("leader")
    won = await client.txn([absent(k)], [op_put(k, b"me")], [op_get(k)])
    assert won.succeeded and won.responses == [[]]
    lost = await client.txn([absent(k)], [op_put(k, b"you")], [op_get(k)])
    assert not lost.succeeded
    assert [kv.value for kv in lost.responses[0]] == [b"me"]
    assert lost.responses[0][0].mod_revision == won.revision

    assert (await client.txn([value_equals(k, b"me")], [op_get(k)])).succeeded
    assert not (await client.txn([value_equals(k, b"you")], [op_get(k)])).succeeded
    assert not (await client.txn([mod_revision_equals(k, won.revision + 100)], [])).succeeded
    gone = await client.txn([mod_revision_equals(k, won.revision)], [op_delete(k)])
    assert gone.succeeded and await client.get(k) is None
    # A compare that can never hold (a fence of a server that is not the leader).
    assert not (await client.txn([mod_revision_equals(k, -1)], [op_put(k, b"x")])).succeeded


async def test_errors_name_the_operation_not_the_value(client: EtcdClient) -> None:
    secret = b"TOPSECRET" * (MAX_REQUEST_BYTES // 9 + 1)  # over etcd's request limit
    with pytest.raises(EtcdError) as err:
        await client.put(client.key("big"), secret)
    assert "TOPSECRET" not in str(err.value)
    assert str(err.value).startswith("etcd put")


async def test_watch_yields_each_revision_whole_and_in_order(client: EtcdClient) -> None:
    p = client.key("w", "")
    _, rev = await client.get_prefix(p)
    async with contextlib.aclosing(client.watch_prefix(p, rev + 1)) as it:
        r1 = await client.put(p + b"a", b"1")
        both = await client.txn([], [op_put(p + b"b", b"2"), op_put(p + b"c", b"3")])
        await client.put(client.key("elsewhere"), b"x")
        r3 = await client.delete(p + b"a")
        got = [await _next(it) for _ in range(3)]
    assert [g[0] for g in got] == [r1, both.revision, r3]
    assert [(e.kind, e.kv.key, e.kv.value) for e in got[1][1]] == [
        ("put", p + b"b", b"2"), ("put", p + b"c", b"3")]
    (deleted,) = got[2][1]
    assert deleted.kind == "delete" and deleted.kv.value == b"" and deleted.kv.mod_revision == r3


async def test_watch_replays_from_an_old_revision(client: EtcdClient) -> None:
    p = client.key("r", "")
    revs = [await client.put(p + str(i).encode(), b"v") for i in range(3)]
    async with contextlib.aclosing(client.watch_prefix(p, revs[1])) as it:
        assert [(await _next(it))[0] for _ in range(2)] == revs[1:]


async def test_watch_of_a_compacted_revision_raises(client: EtcdClient) -> None:
    import aetcd.rpc as rpc

    p = client.key("c", "")
    first = await client.put(p + b"a", b"1")
    last = await client.put(p + b"a", b"2")
    await client._call("compact", lambda ep, t: ep.kv.Compact(
        rpc.CompactionRequest(revision=last, physical=True), timeout=t), retry=True)
    with pytest.raises(Compacted):
        async with contextlib.aclosing(client.watch_prefix(p, first)) as it:
            await _next(it)


async def test_cancelling_a_watch_ends_its_stream(client: EtcdClient) -> None:
    p = client.key("x", "")
    got: list[int] = []
    started = asyncio.Event()

    async def consume() -> None:
        started.set()
        async for rev, _ in client.watch_prefix(p, 1):
            got.append(rev)

    task = asyncio.create_task(consume())
    await started.wait()
    rev = await client.put(p + b"k", b"v")
    await wait_until(lambda: got == [rev], timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_leases(client: EtcdClient) -> None:
    lease = await client.lease_grant(30)
    k = client.key("leased")
    await client.put(k, b"v", lease=lease)
    kv = await client.get(k)
    assert kv is not None and kv.lease == lease
    assert 0 < await client.lease_refresh(lease) <= 30
    await client.lease_revoke(lease)
    assert await client.get(k) is None
    with pytest.raises(LeaseExpired):
        await client.lease_refresh(lease)
    await client.lease_revoke(lease)  # already gone: fine
    with pytest.raises(EtcdError):
        await client.put(k, b"v", lease=lease)


async def test_a_lease_expires_without_refresh(client: EtcdClient) -> None:
    lease = await client.lease_grant(2)
    k = client.key("short")
    await client.put(k, b"v", lease=lease)
    await wait_until(lambda: _absent(client, k), timeout=30)
    with pytest.raises(LeaseExpired):
        await client.lease_refresh(lease)


async def test_connect_to_nothing_raises_unavailable_in_time() -> None:
    (port,) = _free_ports(1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(EtcdUnavailable):
        await EtcdClient.connect(EtcdSettings((f"127.0.0.1:{port}",), dial_timeout=1.0))
    assert loop.time() - t0 < 15


async def test_a_dead_endpoint_is_skipped(etcd: EtcdCluster) -> None:
    (port,) = _free_ports(1)
    c = await EtcdClient.connect(
        EtcdSettings((f"127.0.0.1:{port}", *etcd.endpoints), dial_timeout=2.0))
    try:
        await c.put(b"/t/k", b"v")
        assert (kv := await c.get(b"/t/k")) is not None and kv.value == b"v"
        assert c.current_endpoint == etcd.endpoints[0]
    finally:
        await c.close()


async def test_requests_after_etcd_died_raise_unavailable(etcd: EtcdCluster) -> None:
    c = await EtcdClient.connect(EtcdSettings(etcd.endpoints, request_timeout=2.0,
                                              dial_timeout=1.0))
    try:
        await etcd.kill(0)
        with pytest.raises(EtcdUnavailable):
            await c.get(b"/t/k")
        with pytest.raises(EtcdUnavailable):
            await c.put(b"/t/k", b"v")
        await etcd.restart(0)
        # The channel comes back to the restarted member by itself.
        await wait_until(lambda: _answers(c), timeout=30)
    finally:
        await c.close()


async def test_tls_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    settings = EtcdSettings(("127.0.0.1:1",), tls=etcd_client.EtcdTLS(
        ca_file=str(tmp_path / "missing-ca.pem")))
    with pytest.raises(EtcdError, match="missing-ca.pem"):
        await EtcdClient.connect(settings)


async def _absent(client: EtcdClient, key: bytes) -> bool:
    return await client.get(key) is None


async def _answers(client: EtcdClient) -> bool:
    try:
        await client.get(b"/t/k")
    except EtcdUnavailable:
        return False
    return True
