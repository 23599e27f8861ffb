"""Tests for the client's sqlite + msgpack state store."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from nomad_client.state_db import StateDB, StateDBError


@pytest.fixture
async def db(tmp_path: Path) -> Any:
    store = await StateDB.open(tmp_path / "state" / "client.db")
    yield store
    await store.close()


NESTED: dict[str, Any] = {
    "ID": "alloc-1",
    "Count": 3,
    "Big": 2**63 - 1,
    "Negative": -(2**63),
    "Ratio": 0.25,
    "Flags": [True, False, None],
    "Nested": {"Tasks": [{"Name": "web", "Env": {"A": "1"}}], "Empty": {}},
    "Bytes": b"\x00\xffraw",
    "Unicode": "héllo ✓",
    "IntKeys": {1: "one", 2: "two"},
}


async def test_round_trip_of_nested_values(db: StateDB) -> None:
    await db.put("allocs", "alloc-1", NESTED)
    assert await db.get("allocs", "alloc-1") == NESTED
    scalars: list[Any] = [0, "", None, [], {}, 1.5, False, "x" * 100_000]
    for scalar in scalars:
        await db.put("scalars", "k", scalar)
        assert await db.get("scalars", "k") == scalar


async def test_tuples_come_back_as_lists(db: StateDB) -> None:
    await db.put("b", "k", (1, (2, 3)))
    assert await db.get("b", "k") == [1, [2, 3]]


async def test_missing_key_and_overwrite(db: StateDB) -> None:
    assert await db.get("allocs", "nope") is None
    await db.put("allocs", "a", 1)
    await db.put("allocs", "a", {"v": 2})
    assert await db.get("allocs", "a") == {"v": 2}
    assert await db.items("allocs") == [("a", {"v": 2})]


async def test_buckets_are_separate(db: StateDB) -> None:
    await db.put("one", "k", 1)
    await db.put("two", "k", 2)
    assert await db.get("one", "k") == 1
    assert await db.get("two", "k") == 2
    await db.delete("one", "k")
    assert await db.get("one", "k") is None
    assert await db.get("two", "k") == 2


async def test_persistence_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "state.db"
    first = await StateDB.open(path)
    await first.put("allocs", "a1", {"State": "running"})
    await first.put("meta", "node", ["x"])
    await first.close()

    second = await StateDB.open(path)
    try:
        assert await second.get("allocs", "a1") == {"State": "running"}
        assert await second.items("meta") == [("node", ["x"])]
    finally:
        await second.close()


async def test_items_are_ordered_by_key(db: StateDB) -> None:
    keys = ["b", "a", "c/2", "c/10", "B", "é", "a0"]
    for i, key in enumerate(keys):
        await db.put("bucket", key, i)
    await db.put("other", "zzz", 0)
    got = await db.items("bucket")
    assert [k for k, _ in got] == sorted(keys)
    assert dict(got) == {k: i for i, k in enumerate(keys)}
    assert await db.items("empty") == []


async def test_delete_and_delete_prefix(db: StateDB) -> None:
    for key in ("alloc/1/task/a", "alloc/1/task/b", "alloc/10/task/a", "alloc/2", "al%c/1"):
        await db.put("b", key, key)
    await db.put("other", "alloc/1/task/a", "kept")

    await db.delete("b", "alloc/2")
    await db.delete("b", "never-existed")  # deleting a missing key is fine
    await db.delete_prefix("b", "alloc/1/")
    assert [k for k, _ in await db.items("b")] == ["al%c/1", "alloc/10/task/a"]
    assert await db.get("other", "alloc/1/task/a") == "kept"

    # Prefixes are literal: LIKE wildcards in them match nothing special.
    await db.delete_prefix("b", "al%")
    assert [k for k, _ in await db.items("b")] == ["alloc/10/task/a"]
    await db.delete_prefix("b", "a_")
    assert [k for k, _ in await db.items("b")] == ["alloc/10/task/a"]

    await db.delete_prefix("b", "")
    assert await db.items("b") == []
    assert await db.items("other") == [("alloc/1/task/a", "kept")]


async def test_concurrent_puts_from_many_tasks(db: StateDB) -> None:
    async def writer(n: int) -> None:
        for i in range(20):
            await db.put("load", f"{n:03d}/{i:03d}", {"n": n, "i": i})

    await asyncio.gather(*(writer(n) for n in range(25)))
    items = await db.items("load")
    assert len(items) == 25 * 20
    assert all(v == {"n": int(k[:3]), "i": int(k[4:])} for k, v in items)


async def test_sqlite_runs_on_one_worker_thread(
    db: StateDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[int] = set()
    original = db._run  # noqa: SLF001 - observing where the work runs

    async def spy(fn: Any) -> Any:
        def wrapped(conn: Any) -> Any:
            threads.add(threading.get_ident())
            return fn(conn)

        return await original(wrapped)

    monkeypatch.setattr(db, "_run", spy)
    await asyncio.gather(*(db.put("t", str(i), i) for i in range(10)), db.items("t"))
    assert len(threads) == 1
    assert threading.get_ident() not in threads


async def test_unencodable_value_raises_type_error_and_writes_nothing(db: StateDB) -> None:
    await db.put("b", "k", "old")
    for bad in (object(), {"nested": {1, 2}}, 2**70):
        with pytest.raises(TypeError, match="b/k"):
            await db.put("b", "k", bad)
    assert await db.get("b", "k") == "old"
    with pytest.raises(TypeError, match="b/new"):
        await db.put("b", "new", [object()])
    assert await db.get("b", "new") is None


async def test_names_must_be_strings(db: StateDB) -> None:
    with pytest.raises(TypeError, match="bucket"):
        await db.put(1, "k", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        await db.get("b", b"k")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key_prefix"):
        await db.delete_prefix("b", None)  # type: ignore[arg-type]


async def test_corrupt_file_is_reported_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    junk = b"this is not an sqlite database at all\n" * 200
    path.write_bytes(junk)
    with pytest.raises(StateDBError, match="state.db") as info:
        await StateDB.open(path)
    assert "corrupt or not an sqlite database" in str(info.value)
    assert path.read_bytes() == junk


async def test_directory_at_path_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.mkdir()
    with pytest.raises(StateDBError, match="state.db"):
        await StateDB.open(path)


async def test_corrupt_value_is_reported(db: StateDB) -> None:
    await db.put("b", "k", 1)
    await db._run(  # noqa: SLF001 - simulate on-disk damage to one value
        lambda conn: conn.execute("UPDATE kv SET value = ? WHERE key = 'k'", (b"\xc1",))
    )
    with pytest.raises(StateDBError, match="b/k"):
        await db.get("b", "k")


async def test_file_and_directory_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "new" / "dir" / "client.db"
        store = await StateDB.open(path)
        await store.put("b", "k", 1)
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            for side in path.parent.glob("client.db-*"):  # WAL side files inherit the mode
                assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0, side
        finally:
            await store.close()
    finally:
        os.umask(old_umask)


async def test_existing_file_mode_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "client.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    store = await StateDB.open(path)
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_close_is_idempotent_and_later_calls_fail(tmp_path: Path) -> None:
    store = await StateDB.open(tmp_path / "s.db")
    await store.put("b", "k", 1)
    await store.close()
    await store.close()
    with pytest.raises(StateDBError, match="closed"):
        await store.get("b", "k")
    with pytest.raises(StateDBError, match="closed"):
        await store.put("b", "k", 2)


async def test_close_waits_for_queued_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await StateDB.open(path)
    writes = [asyncio.create_task(store.put("b", str(i), i)) for i in range(50)]
    await asyncio.sleep(0)  # let every write reach the worker queue
    await store.close()
    await asyncio.gather(*writes)
    reopened = await StateDB.open(path)
    try:
        assert len(await reopened.items("b")) == 50
    finally:
        await reopened.close()


async def test_async_context_manager(tmp_path: Path) -> None:
    async with await StateDB.open(tmp_path / "s.db") as store:
        await store.put("b", "k", "v")
        assert store.path == tmp_path / "s.db"
    with pytest.raises(StateDBError):
        await store.get("b", "k")


async def test_write_batch_is_all_or_nothing(tmp_path: Path) -> None:
    db = await StateDB.open(tmp_path / "batch.db")
    try:
        await db.put("b", "keep", 1)
        await db.write_batch([("b", "x", 1), ("b", "y", [2])], [("b", "keep")])
        assert await db.items("b") == [("x", 1), ("y", [2])]
        with pytest.raises(TypeError):  # an unencodable value: nothing at all is written
            await db.write_batch([("b", "z", 3), ("b", "bad", object())], [("b", "x")])
        assert await db.items("b") == [("x", 1), ("y", [2])]
    finally:
        await db.close()
