"""The server's state store: tables of jobs, evaluations, allocations, nodes and ACL tokens,
a Raft-style index bumped by every write, and blocking queries that wake on change.

The store is in memory and, when given a ``StateDB``, writes every change through to disk so a
restarted agent finds its jobs and allocations again. Only the server package touches it.
Credential fields are sealed on their way to disk and opened on the way back (``sealing``):
the file never holds a secret in the clear.

Read-modify-write callers pass *row updates* (``fn(current_row_or_None, index)``) rather than
whole rows they read earlier: the function runs under the write lock against the latest row,
so two writers changing different fields of one row never undo each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from nomad_client.server.sealing import Sealer, seal_record, unseal_record
from nomad_client.state_db import StateDB
from nomad_client.structs.codec import from_rpc, to_rpc
from nomad_client.structs.models import ACLToken, Allocation, Evaluation, Node

TABLE_TYPES: dict[str, type] = {
    "nodes": Node,
    "allocs": Allocation,
    "evals": Evaluation,
    "acl_tokens": ACLToken,
}
JOBS = "jobs"
# The cap on how long any blocking query may wait, whatever wait the caller asked for; the
# HTTP layer's own default wait is only what it asks for when the request names none.
MAX_BLOCKING_WAIT = 300.0


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


# A row update returns this to delete its row.
DELETE: Final = _Delete()

# fn(current row or None, index of this write) -> new row, DELETE, or None for "no change".
RowUpdate = Callable[[Any | None, int], Any]


class StateStore:
    def __init__(self, db: StateDB | None = None, sealer: Sealer | None = None) -> None:
        if db is not None and sealer is None:
            raise ValueError("a persisted store needs a sealer for its secrets")
        self._db = db
        self._sealer = sealer
        self._tables: dict[str, dict[str, Any]] = {name: {} for name in (*TABLE_TYPES, JOBS)}
        self._table_index: dict[str, int] = dict.fromkeys(self._tables, 0)
        self.index = 0
        self._changed = asyncio.Event()
        self._write_lock = asyncio.Lock()

    @classmethod
    async def restore(cls, db: StateDB, sealer: Sealer) -> StateStore:
        store = cls(db, sealer)
        meta = await db.get("server_meta", "index")
        store.index = int(meta or 0)
        in_the_clear: list[tuple[str, str, Any]] = []
        for table in store._tables:
            for key, raw in await db.items(f"table/{table}"):
                raw, plain = unseal_record(sealer, table, key, raw)
                if plain:
                    in_the_clear.append((f"table/{table}", key, seal_record(sealer, table, key,
                                                                            raw)))
                cls_ = TABLE_TYPES.get(table)
                store._tables[table][key] = from_rpc(raw, cls_) if cls_ else raw
            store._table_index[table] = store.index
        if in_the_clear:  # written before secrets were sealed: seal them now
            await db.write_batch(in_the_clear, [])
        return store

    # ---- reads -------------------------------------------------------------------------
    def get(self, table: str, key: str) -> Any | None:
        return self._tables[table].get(key)

    def rows(self, table: str) -> list[Any]:
        """Every row, in key order (for listings)."""
        return [self._tables[table][k] for k in sorted(self._tables[table])]

    def values(self, table: str) -> list[Any]:
        """Every row in no particular order: for scans that need no order."""
        return list(self._tables[table].values())

    def table_index(self, *tables: str) -> int:
        return max(self._table_index[t] for t in tables) or 1

    async def wait_for_change(self, tables: Iterable[str], min_index: int, wait: float) -> int:
        """Block until one of ``tables`` has an index above ``min_index`` or ``wait`` passes;
        return the tables' current index either way (as Nomad's blocking queries do)."""
        names = tuple(tables)
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_BLOCKING_WAIT)
        while self.table_index(*names) <= min_index:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            changed = self._changed
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
                # races the event, leaving a cancelled watcher looping on.
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                break
        return self.table_index(*names)

    # ---- writes ------------------------------------------------------------------------
    async def write(self, upserts: Mapping[str, Sequence[tuple[str, Any]]] | None = None,
                    deletes: Mapping[str, Sequence[str]] | None = None, *,
                    updates: Mapping[str, Sequence[tuple[str, RowUpdate]]] | None = None
                    ) -> int:
        """Apply one atomic batch of changes under a new index and wake blocked readers.

        ``upserts`` replace rows, ``deletes`` remove them, and each of ``updates`` is called
        under the write lock with the row as it is now (after this batch's upserts and
        deletes) and the new index. Records that carry ``create_index``/``modify_index`` get
        them stamped here, so callers never pick indexes themselves. A batch that names no
        table in ``upserts``/``deletes`` and whose updates all return None changes nothing
        and returns the current index.
        """
        async with self._write_lock:
            index = self.index + 1
            # table -> key -> new row or DELETE; later entries for a key win.
            pending: dict[str, dict[str, Any]] = {}
            for table, new_rows in (upserts or {}).items():
                pending.setdefault(table, {}).update(new_rows)
            for table, keys in (deletes or {}).items():
                pending.setdefault(table, {}).update(dict.fromkeys(keys, DELETE))
            for table, fns in (updates or {}).items():
                for key, fn in fns:
                    staged = pending.get(table, {})
                    current = staged[key] if key in staged else self._tables[table].get(key)
                    result = fn(None if current is DELETE else current, index)
                    if result is not None:
                        pending.setdefault(table, {})[key] = result
            if not pending:
                return self.index
            for table, rows in pending.items():
                for key, value in rows.items():
                    if value is not DELETE and (attrs.has(type(value))
                                                or isinstance(value, dict)):
                        rows[key] = _stamp(value, self._tables[table].get(key), index)
            if self._db is not None:
                # One transaction: a crash never leaves half a batch or a stale index on disk.
                await self._db.write_batch(
                    [*((f"table/{table}", key, self._on_disk(table, key, v))
                       for table, rows in pending.items() for key, v in rows.items()
                       if v is not DELETE),
                     ("server_meta", "index", index)],
                    [(f"table/{table}", key) for table, rows in pending.items()
                     for key, v in rows.items() if v is DELETE])
            for table, rows in pending.items():
                live = self._tables[table]
                for key, value in rows.items():
                    if value is DELETE:
                        live.pop(key, None)
                    else:
                        live[key] = value
                self._table_index[table] = index
            self.index = index
            self._changed.set()
            self._changed = asyncio.Event()
            return index

    def _on_disk(self, table: str, key: str, value: Any) -> Any:
        raw = to_rpc(value) if attrs.has(type(value)) else value
        assert self._sealer is not None  # a store with a db always has one
        return seal_record(self._sealer, table, key, raw)


def _stamp(value: Any, previous: Any | None, index: int) -> Any:
    if isinstance(value, dict):  # jobs are stored as their API dict
        create = previous.get("CreateIndex", index) if isinstance(previous, dict) else index
        return {**value, "CreateIndex": create, "ModifyIndex": index}
    changes: dict[str, Any] = {}
    fields = attrs.fields_dict(type(value))
    if "modify_index" in fields:
        changes["modify_index"] = index
    if "create_index" in fields:
        changes["create_index"] = previous.create_index if previous is not None else index
    return attrs.evolve(value, **changes)
