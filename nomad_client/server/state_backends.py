"""Where the state store keeps its rows at rest: the small interface ``StateStore`` writes
through, and its single-file implementation (``SqliteBackend``, the embedded mode's).

The store keeps every row in memory and serves every read from there; a backend only makes
each committed batch durable (``commit``), hands back everything at start (``load``) and, when
other servers write to the same state, replays their batches into the store (``follow``:
``server.etcd.state_backend``). Rows cross this interface in their sealed disk form (RPC
form, credential fields sealed), keyed by table and row key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from nomad_client.state_db import StateDB

# The sqlite buckets: one per table, and the index.
_META_BUCKET = "server_meta"
_INDEX_KEY = "index"


def table_bucket(table: str) -> str:
    return f"table/{table}"


@attrs.frozen
class Batch:
    """One committed write: the index it made current, the rows it put (table, key, disk
    form) and the rows it deleted (table, key). A batch whose index is already current only
    rewrites disk forms (a re-seal); it changes no row's content. ``id`` names one write
    (random): a writer that lost track of its commit finds out whether it went through."""

    index: int
    puts: Sequence[tuple[str, str, Any]]
    deletes: Sequence[tuple[str, str]]
    id: str = ""


@attrs.frozen
class Snapshot:
    """Everything at rest at one moment: the index and each table's rows (disk form)."""

    index: int
    rows: Mapping[str, Sequence[tuple[str, Any]]]


class WriteConflict(Exception):
    """Another server committed first: the state at rest is at ``index``, not the index the
    batch was computed against. The store catches up to it and computes the batch again."""

    def __init__(self, index: int) -> None:
        super().__init__(f"the state moved on to index {index}")
        self.index = index


class OutcomeUnknown(Exception):
    """Mixed into a backend's error when a commit may or may not have gone through (the
    connection was lost while it was under way). The store tries the same batch again:
    its guard makes that safe, and the batch's id tells a second try apart from the first."""


class StateContention(RuntimeError):
    """A write lost to other servers' writes too many times in a row, or this server could not
    catch up with them in time: nothing of it was applied. Worth retrying later (the HTTP
    layer answers it as unavailable)."""


# Replays one batch another server committed (``StateBackend.follow``).
ApplyBatch = Callable[[Batch], Awaitable[None]]
# Replaces the whole state with a fresh snapshot (a follower that fell too far behind).
Resync = Callable[[Snapshot], Awaitable[None]]


class StateBackend(Protocol):
    async def load(self, tables: Sequence[str]) -> Snapshot:
        """Every stored row of ``tables`` and the index, read consistently."""
        ...

    async def commit(self, expected: int, batch: Batch) -> None:
        """Make ``batch`` durable as one transaction, provided the state at rest is still at
        index ``expected``; raise ``WriteConflict`` (nothing written) otherwise. Any other
        error leaves the outcome unknown to the caller."""
        ...

    def follow(self, apply: ApplyBatch, resync: Resync) -> None:
        """Start replaying other writers' batches in commit order (no-op with one writer)."""
        ...

    async def close(self) -> None:
        """Stop following. What the backend was given (a database, a client) stays open:
        its owner closes it."""
        ...


class SqliteBackend:
    """The embedded mode's backend: one ``StateDB`` written by this process alone, so a
    commit never conflicts and there is nobody to follow."""

    def __init__(self, db: StateDB) -> None:
        self._db = db

    async def load(self, tables: Sequence[str]) -> Snapshot:
        meta = await self._db.get(_META_BUCKET, _INDEX_KEY)
        rows = {table: await self._db.items(table_bucket(table)) for table in tables}
        return Snapshot(int(meta or 0), rows)

    async def commit(self, expected: int, batch: Batch) -> None:
        # One transaction: a crash never leaves half a batch or a stale index on disk.
        await self._db.write_batch(
            [*((table_bucket(table), key, value) for table, key, value in batch.puts),
             (_META_BUCKET, _INDEX_KEY, batch.index)],
            [(table_bucket(table), key) for table, key in batch.deletes])

    def follow(self, apply: ApplyBatch, resync: Resync) -> None:
        pass

    async def close(self) -> None:
        pass
