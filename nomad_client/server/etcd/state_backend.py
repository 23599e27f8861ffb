"""The state store's backend in cluster mode: the servers' shared state in etcd.

Layout, under the client's prefix:
* ``state/<table>/<key>``: one row, msgpack of its sealed disk form (what the embedded mode
  keeps in its file: RPC form, credential fields sealed; variables' items stay sealed);
* ``state-index``: the store index, ASCII decimal: advanced by exactly one per write;
* ``state-batch``: the id of the last batch (``Batch.id``), put with it.

A commit is one etcd transaction: if ``state-index`` still holds the index the batch was
computed against, put the new index and every row of the batch; else report the index etcd
is at (``WriteConflict``), and the store computes the batch again once it has caught up. So
two servers never both commit on top of one state, and each check-and-set the store runs
inside a write holds across servers.

Each etcd revision that puts ``state-index`` is one batch; every server watches the state
from the revision it loaded and replays the batches in revision order (its own come back
too, and are skipped by their index). A revision that changes rows without putting the
index is no server's write: it is ignored, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import msgpack

from nomad_client.server.etcd.client import (
    KV,
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    WatchEvent,
    absent,
    op_delete,
    op_get,
    op_put,
    value_equals,
)
from nomad_client.server.state_backends import (
    ApplyBatch,
    Batch,
    OutcomeUnknown,
    Resync,
    Snapshot,
    WriteConflict,
)

log = logging.getLogger(__name__)

# How long the follower waits before watching again after an error, at most.
_MAX_BACKOFF = 5.0


class CommitUnknown(EtcdUnavailable, OutcomeUnknown):
    """etcd was lost while a commit was under way: it may or may not have gone through."""


def _encode(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _decode(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _parse_index(value: bytes) -> int | None:
    try:
        return int(value)
    except ValueError:
        log.error("the state index in etcd is not a number")
        return None


def _index_of(kvs: Sequence[KV]) -> int:
    """The index an ``op_get`` of the index key found (0: none yet)."""
    return (_parse_index(kvs[0].value) or 0) if kvs else 0


class EtcdBackend:
    """Commits batches as guarded etcd transactions and follows everyone's (see the module
    doc). ``client`` stays its caller's: ``close`` only stops following."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        # Watched and loaded as one range: it holds the rows and the index key.
        self._root = client.key("state")
        self._rows = client.key("state", "")
        self._index_key = client.key("state-index")
        self._batch_key = client.key("state-batch")
        self._revision = 0  # the last etcd revision loaded or followed
        self._task: asyncio.Task[None] | None = None

    async def load(self, tables: Sequence[str] = ()) -> Snapshot:
        kvs, revision = await self._client.get_prefix(self._root)
        index = 0
        rows: dict[str, list[tuple[str, Any]]] = {}
        for kv in kvs:
            if kv.key == self._index_key:
                index = _parse_index(kv.value) or 0
                continue
            if kv.key == self._batch_key:
                continue
            row = self._row(kv)
            if row is not None:
                table, key, value = row
                rows.setdefault(table, []).append((key, value))
        self._revision = revision
        return Snapshot(index, rows)

    async def commit(self, expected: int, batch: Batch) -> None:
        index_key = self._index_key
        guard = (absent(index_key) if expected == 0
                 else value_equals(index_key, str(expected).encode()))
        ops = [op_put(index_key, str(batch.index).encode()),
               op_put(self._batch_key, batch.id.encode()),
               *(op_put(self._client.key("state", table, key), _encode(value))
                 for table, key, value in batch.puts),
               *(op_delete(self._client.key("state", table, key))
                 for table, key in batch.deletes)]
        try:
            result = await self._client.txn([guard], ops, [op_get(index_key)])
        except EtcdUnavailable as exc:
            raise CommitUnknown(str(exc)) from exc
        if not result.succeeded:
            raise WriteConflict(_index_of(result.responses[0]))

    def follow(self, apply: ApplyBatch, resync: Resync) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(apply, resync),
                                             name="etcd-state-follower")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, apply: ApplyBatch, resync: Resync) -> None:
        backoff = 0.1
        while True:
            try:
                # Closed on the way out, so a cancelled follower ends the etcd watch at once.
                watch = cast(AsyncGenerator[tuple[int, list[WatchEvent]], None],
                             self._client.watch_prefix(self._root, self._revision + 1))
                async with contextlib.aclosing(watch):
                    async for revision, events in watch:
                        self._revision = revision
                        batch = self._batch(revision, events)
                        if batch is not None:
                            await self._replay(apply, batch)
                        backoff = 0.1
                continue  # the watch ended (it should not): watch again
            except Compacted:
                # Too far behind for etcd's history: start again from the whole state.
                log.warning("state follower fell behind etcd's history at revision %d; "
                            "loading the whole state again", self._revision)
                try:
                    await resync(await self.load())
                    continue
                except EtcdError as exc:
                    log.warning("state follower cannot reload the state: %s", exc)
            except EtcdError as exc:  # messages never hold values
                log.warning("state follower lost etcd, watching again: %s", exc)
            except Exception:
                log.exception("state follower failed, watching again")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    @staticmethod
    async def _replay(apply: ApplyBatch, batch: Batch) -> None:
        try:
            await apply(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug replaying one batch must not stop the following ones.
            log.exception("state batch %d could not be applied", batch.index)

    def _batch(self, revision: int, events: Sequence[WatchEvent]) -> Batch | None:
        index: int | None = None
        batch_id = ""
        puts: list[tuple[str, str, Any]] = []
        deletes: list[tuple[str, str]] = []
        for event in events:
            kv = event.kv
            if kv.key == self._index_key:
                if event.kind == "put":
                    index = _parse_index(kv.value)
                continue
            if kv.key == self._batch_key:
                batch_id = kv.value.decode("ascii", "replace")
                continue
            if event.kind == "put":
                row = self._row(kv)
                if row is not None:
                    puts.append(row)
            else:
                name = self._name(kv.key)
                if name is not None:
                    deletes.append(name)
        if index is None:
            if puts or deletes:
                log.warning("state change at etcd revision %d puts no index: not a server's "
                            "write, ignored", revision)
            return None
        return Batch(index, puts, deletes, batch_id)

    def _name(self, key: bytes) -> tuple[str, str] | None:
        """(table, row key) of a row's etcd key; None (logged) for anything else."""
        if key.startswith(self._rows):
            table, sep, row_key = key[len(self._rows):].decode("utf-8", "replace").partition(
                "/")
            if sep and table:
                return table, row_key
        log.warning("unexpected key under the state prefix ignored")
        return None

    def _row(self, kv: KV) -> tuple[str, str, Any] | None:
        name = self._name(kv.key)
        if name is None:
            return None
        try:
            return (*name, _decode(kv.value))
        except (ValueError, msgpack.UnpackException):
            log.error("state row %s of %s is not valid msgpack: ignored", name[1], name[0])
            return None
