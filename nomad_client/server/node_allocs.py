"""What each node's client watches (``Node.GetClientAllocs``): its allocations' IDs and
``AllocModifyIndex``, and a per-node index that moves only when one of those changes.

A client's status report rewrites its allocation rows but never their ``AllocModifyIndex``,
so it changes nothing a client watches. Waking every watcher on every write to the
allocations table (and sending each the whole list again) made each report cost O(N) on a
node with N allocations: O(N^2) for a start storm. Here a report costs O(rows it changed),
and a watcher wakes only when the server changed one of its node's allocations (placed,
stopped, updated or deleted).

Kept in step by a commit observer of the store (called under its write lock, in index order)
and built once from the store at start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from nomad_client.server.state import MAX_BLOCKING_WAIT, Change, StateStore
from nomad_client.structs.models import Allocation

ALLOCS = "allocs"


class NodeAllocIndex:
    def __init__(self, store: StateStore) -> None:
        # Every index starts at the store's: a watcher that saw an older one gets one answer.
        self._base = max(store.index, 1)
        self._allocs: dict[str, dict[str, int]] = {}  # node ID -> alloc ID -> modify index
        self._index: dict[str, int] = {}  # node ID -> index of its last watched change
        self._changed: dict[str, asyncio.Event] = {}  # node ID -> set on its next change
        for alloc in store.values(ALLOCS):
            self._allocs.setdefault(alloc.node_id, {})[alloc.id] = alloc.alloc_modify_index
        store.observe(self._committed)

    def index(self, node_id: str) -> int:
        return self._index.get(node_id, self._base)

    def allocs(self, node_id: str) -> dict[str, int]:
        """The node's allocations: alloc ID -> ``AllocModifyIndex`` (a copy)."""
        return dict(self._allocs.get(node_id, {}))

    async def wait(self, node_id: str, min_index: int, wait: float) -> int:
        """Block until the node's index is above ``min_index`` or ``wait`` seconds (capped
        as every blocking query) pass; its index either way."""
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_BLOCKING_WAIT)
        while self.index(node_id) <= min_index:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            changed = self._changed.setdefault(node_id, asyncio.Event())
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                break
        return self.index(node_id)

    def _committed(self, index: int, changes: Sequence[Change]) -> None:
        touched: set[str] = set()
        for change in changes:
            if change.table != ALLOCS:
                continue
            before: Allocation | None = change.before
            after: Allocation | None = change.after
            if after is not None:
                if before is None or before.alloc_modify_index != after.alloc_modify_index:
                    self._allocs.setdefault(after.node_id, {})[after.id] = \
                        after.alloc_modify_index
                    touched.add(after.node_id)
            elif before is not None:
                self._forget(before)
                touched.add(before.node_id)
        for node_id in touched:
            self._index[node_id] = index
            event = self._changed.pop(node_id, None)
            if event is not None:
                event.set()

    def _forget(self, alloc: Allocation) -> None:
        allocs = self._allocs.get(alloc.node_id)
        if allocs is None:
            return
        allocs.pop(alloc.id, None)
        if not allocs:
            del self._allocs[alloc.node_id]
