"""The server's state store: tables of jobs, evaluations, allocations, nodes and ACL tokens,
a Raft-style index bumped by every write, and blocking queries that wake on change.

The store is in memory and, when given a ``StateDB``, writes every change through to disk so a
restarted agent finds its jobs and allocations again. Only the server package touches it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import attrs

from nomad_client.client.state_db import StateDB
from nomad_client.structs.codec import from_rpc, to_rpc
from nomad_client.structs.models import ACLToken, Allocation, Evaluation, Node

TABLE_TYPES: dict[str, type] = {
    "nodes": Node,
    "allocs": Allocation,
    "evals": Evaluation,
    "acl_tokens": ACLToken,
}
JOBS = "jobs"
MAX_BLOCKING_WAIT = 300.0


class StateStore:
    def __init__(self, db: StateDB | None = None) -> None:
        self._db = db
        self._tables: dict[str, dict[str, Any]] = {name: {} for name in (*TABLE_TYPES, JOBS)}
        self._table_index: dict[str, int] = dict.fromkeys(self._tables, 0)
        self.index = 0
        self._changed = asyncio.Event()
        self._write_lock = asyncio.Lock()

    @classmethod
    async def restore(cls, db: StateDB) -> StateStore:
        store = cls(db)
        meta = await db.get("server_meta", "index")
        store.index = int(meta or 0)
        for table in store._tables:
            for key, raw in await db.items(f"table/{table}"):
                cls_ = TABLE_TYPES.get(table)
                store._tables[table][key] = from_rpc(raw, cls_) if cls_ else raw
            store._table_index[table] = store.index
        return store

    # ---- reads -------------------------------------------------------------------------
    def get(self, table: str, key: str) -> Any | None:
        return self._tables[table].get(key)

    def rows(self, table: str) -> list[Any]:
        return [self._tables[table][k] for k in sorted(self._tables[table])]

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
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                break
        return self.table_index(*names)

    # ---- writes ------------------------------------------------------------------------
    async def write(self, upserts: dict[str, list[tuple[str, Any]]],
                    deletes: dict[str, list[str]] | None = None) -> int:
        """Apply one atomic batch of changes under a new index and wake blocked readers.

        Records that carry ``create_index``/``modify_index`` get them stamped here, so callers
        never pick indexes themselves.
        """
        async with self._write_lock:
            index = self.index + 1
            stamped: dict[str, list[tuple[str, Any]]] = {}
            for table, rows in upserts.items():
                out = []
                for key, value in rows:
                    if attrs.has(type(value)) or isinstance(value, dict):
                        value = _stamp(value, self._tables[table].get(key), index)
                    out.append((key, value))
                stamped[table] = out
            if self._db is not None:
                # One transaction: a crash never leaves half a batch or a stale index on disk.
                await self._db.write_batch(
                    [*((f"table/{table}", key, to_rpc(v) if attrs.has(type(v)) else v)
                       for table, rows in stamped.items() for key, v in rows),
                     ("server_meta", "index", index)],
                    [(f"table/{table}", key) for table, keys in (deletes or {}).items()
                     for key in keys])
            for table, rows in stamped.items():
                self._tables[table].update(rows)
                self._table_index[table] = index
            for table, keys in (deletes or {}).items():
                for key in keys:
                    self._tables[table].pop(key, None)
                self._table_index[table] = index
            self.index = index
            self._changed.set()
            self._changed = asyncio.Event()
            return index


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
