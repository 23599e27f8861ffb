"""The server's state store: tables of namespaces, jobs, evaluations, allocations, nodes and
the ACL records (tokens, policies, roles, the bootstrap marker), variables (items sealed by
``server.variables`` before they reach a row), a Raft-style index bumped by every
write, and blocking queries that wake on change.

The store is in memory and, when given a ``StateDB``, writes every change through to disk so a
restarted agent finds its jobs and allocations again. Only the server package touches it.
Credential fields are sealed on their way to disk and opened on the way back (``sealing``):
the file never holds a secret in the clear.

Read-modify-write callers pass *row updates* (``fn(current_row_or_None, index)``) rather than
whole rows they read earlier: the function runs under the write lock against the latest row,
so two writers changing different fields of one row never undo each other.

A few tables have unique secondary indexes (``SECONDARY_INDEXES``): an ACL token is found by
the SHA-256 digest of its secret, a role by its name, each with one dict lookup. They are
kept in step by every write and rebuilt on restore.

Some rows exist from the start (``SEED_ROWS``: the default namespace), and some tables key
a row by what it holds (``ROW_KEYS``: a job by its namespace and ID); a row an older
version stored under another key is moved to its key on restore.

Commit observers (``observe``) hear of every committed batch, with its index and each row's
before and after (the event stream's broker is one): called once per write, after the commit,
under the write lock, so they see batches in index order.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import attrs

from nomad_client.server.sealing import (
    SECRET_FIELDS,
    Sealer,
    row_context,
    seal_record,
    unseal_record,
)
from nomad_client.state_db import StateDB
from nomad_client.structs.codec import from_rpc, to_rpc
from nomad_client.structs.models import (
    ACLPolicy,
    ACLRole,
    ACLToken,
    Allocation,
    Evaluation,
    Node,
    Variable,
)
from nomad_client.structs.namespaces import (
    DEFAULT_NAMESPACE,
    DEFAULT_NAMESPACE_RECORD,
    Namespace,
    job_namespace,
)

log = logging.getLogger(__name__)

ACL_TOKENS = "acl_tokens"
ACL_POLICIES = "acl_policies"
ACL_ROLES = "acl_roles"
# Keyed by ``variable_key(namespace, path)``; items sealed in the record itself.
VARIABLES = "variables"
# Keyed by name.
NAMESPACES = "namespaces"
TABLE_TYPES: dict[str, type] = {
    "nodes": Node,
    "allocs": Allocation,
    "evals": Evaluation,
    ACL_TOKENS: ACLToken,
    ACL_POLICIES: ACLPolicy,
    ACL_ROLES: ACLRole,
    VARIABLES: Variable,
    NAMESPACES: Namespace,
}
# Keyed by ``job_key(namespace, ID)``: two namespaces may each hold a job of one ID.
JOBS = "jobs"
# One row, present once ACLs have been bootstrapped; its ModifyIndex is the reset index.
ACL_BOOTSTRAP = "acl_bootstrap"
# Nomad's ServiceRegistration dicts, keyed by their ID (``server.services``).
SERVICES = "services"
# Keyed by ``job_key``: a job's scaling events by group ({"ScalingEvents": {group: [...]}},
# newest first), and a periodic job's last launch ({"Launch": unix seconds}).
SCALING_EVENTS = "scaling_events"
PERIODIC_LAUNCHES = "periodic_launches"
# Keyed by ``job_key``: {"Versions": [job, ...], "Submissions": {"<version>": source}}, the
# job's kept versions, newest first, and the sources they were submitted as
# (``server.job_versions``); it goes with the job (purge, ``server.gc``).
JOB_VERSIONS = "job_versions"
PLAIN_TABLES = (JOBS, ACL_BOOTSTRAP, SERVICES,  # rows are plain dicts
                SCALING_EVENTS, PERIODIC_LAUNCHES, JOB_VERSIONS)
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


class Change(NamedTuple):
    """One row of a committed batch: as it was (None: new) and as it is (None: deleted)."""

    table: str
    key: str
    before: Any | None
    after: Any | None


# Told of each committed batch: (its index, its changes). Must not block or await.
CommitObserver = Callable[[int, Sequence[Change]], None]


def variable_key(namespace: str, path: str) -> str:
    """A variable's key in the ``variables`` table: sorts by namespace, then path."""
    return f"{namespace}\x00{path}"


def job_key(namespace: str, job_id: str) -> str:
    """A job's key in the ``jobs`` table: sorts by namespace, then ID."""
    return f"{namespace}\x00{job_id}"


def _job_row_key(job: Mapping[str, Any]) -> str:
    return job_key(job_namespace(job), job["ID"])


# table -> the key a row belongs under. Restore moves a row stored under another key there
# (jobs were once keyed by ID alone).
ROW_KEYS: Mapping[str, Callable[[Any], str]] = {JOBS: _job_row_key}
# Rows a store holds from the start; one stored under the same key replaces its seed.
SEED_ROWS: Mapping[str, Sequence[tuple[str, Any]]] = {
    NAMESPACES: [(DEFAULT_NAMESPACE, DEFAULT_NAMESPACE_RECORD)],
}


def secret_digest(secret: str) -> bytes:
    """The key a secret is indexed under: its SHA-256 digest, so finding a token is one dict
    lookup whose timing says nothing about how much of a guess was right."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


# table -> index name -> the row's key in that unique index (None: not indexed).
SECONDARY_INDEXES: Mapping[str, Mapping[str, Callable[[Any], Hashable | None]]] = {
    ACL_TOKENS: {"secret": lambda t: secret_digest(t.secret_id) if t.secret_id else None},
    ACL_ROLES: {"name": lambda r: r.name},
}


class StateStore:
    def __init__(self, db: StateDB | None = None, sealer: Sealer | None = None) -> None:
        if db is not None and sealer is None:
            raise ValueError("a persisted store needs a sealer for its secrets")
        self._db = db
        self._sealer = sealer
        self._tables: dict[str, dict[str, Any]] = {
            name: {} for name in (*TABLE_TYPES, *PLAIN_TABLES)}
        # (table, index name) -> index key -> primary key
        self._indexes: dict[tuple[str, str], dict[Hashable, str]] = {
            (table, name): {} for table, named in SECONDARY_INDEXES.items() for name in named}
        for table, seeds in SEED_ROWS.items():
            self._tables[table].update(seeds)
        self._table_index: dict[str, int] = dict.fromkeys(self._tables, 0)
        self.index = 0
        self._changed = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._observers: list[CommitObserver] = []

    @classmethod
    async def restore(cls, db: StateDB, sealer: Sealer) -> StateStore:
        store = cls(db, sealer)
        meta = await db.get("server_meta", "index")
        store.index = int(meta or 0)
        # Rows an older version stored differently: secrets in the clear (sealed now), rows
        # under an older key (moved to theirs).
        rewrites: list[tuple[str, str, Any]] = []
        moved: list[tuple[str, str]] = []
        for table in store._tables:
            row_key = ROW_KEYS.get(table)
            for key, raw in await db.items(f"table/{table}"):
                raw, rewrite = unseal_record(sealer, table, key, raw)  # True: in the clear
                cls_ = TABLE_TYPES.get(table)
                row = from_rpc(raw, cls_) if cls_ else raw
                if row_key is not None and row_key(row) != key:
                    moved.append((f"table/{table}", key))
                    key, rewrite = row_key(row), True
                if rewrite:
                    rewrites.append((f"table/{table}", key, seal_record(sealer, table, key,
                                                                        raw)))
                store._tables[table][key] = row
                store._index_row(table, key, None, row)
            store._table_index[table] = store.index
        if rewrites or moved:  # one transaction, as every write
            await db.write_batch(rewrites, moved)
        return store

    def observe(self, observer: CommitObserver) -> None:
        """Tell ``observer`` of every batch committed from now on (see the module doc)."""
        self._observers.append(observer)

    @property
    def sealer(self) -> Sealer | None:
        """What seals this store's secrets on disk (None for a store kept only in memory)."""
        return self._sealer

    # ---- reads -------------------------------------------------------------------------
    def get(self, table: str, key: str) -> Any | None:
        return self._tables[table].get(key)

    def rows(self, table: str) -> list[Any]:
        """Every row, in key order (for listings)."""
        return [self._tables[table][k] for k in sorted(self._tables[table])]

    def values(self, table: str) -> list[Any]:
        """Every row in no particular order: for scans that need no order."""
        return list(self._tables[table].values())

    def lookup(self, table: str, index: str, value: Hashable) -> Any | None:
        """The row whose ``index`` key (see ``SECONDARY_INDEXES``) is ``value``, if any."""
        key = self._indexes[table, index].get(value)
        return None if key is None else self._tables[table].get(key)

    def table_index(self, *tables: str) -> int:
        if len(tables) == 1:  # the request path's case (ACL resolution): no generator
            return self._table_index[tables[0]] or 1
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
            changes: list[Change] = []
            for table, rows in pending.items():
                live = self._tables[table]
                for key, value in rows.items():
                    row = None if value is DELETE else value
                    previous = live.pop(key, None)
                    if row is not None:
                        live[key] = row
                    self._index_row(table, key, previous, row)
                    changes.append(Change(table, key, previous, row))
                self._table_index[table] = index
            self.index = index
            self._changed.set()
            self._changed = asyncio.Event()
            self._tell_observers(index, changes)
            return index

    def _tell_observers(self, index: int, changes: Sequence[Change]) -> None:
        for observer in self._observers:
            try:
                observer(index, changes)
            except Exception:
                # The batch is committed whatever an observer makes of it.
                log.exception("commit observer failed at index %d", index)

    async def reseal(self) -> int:
        """Seal every sealed value of the state again with the sealer's active key (a full
        keyring rotation); return the index after it. Nothing is lost on the way: each step
        is one transaction, and a value it misses still opens with its older key.

        Two kinds of sealed values, found generically:
        * credential fields (``SECRET_FIELDS``) are in the clear in memory and sealed on their
          way to disk, so their rows' disk form is written again; no index moves.
        * any other string value starting with ``SEALED_PREFIX`` at the top level of a stored
          record (RPC form) is sealed in memory too and bound to its row
          (``sealing.row_context``), e.g. a variable's items. Those rows are rewritten in one
          batch of row updates (so a concurrent write is never undone), bumping their
          ``ModifyIndex`` as Nomad's rekeying does, and a ``KeyID`` field in the record
          follows its value's new key.
        A store kept only in memory has nothing at rest: it returns at once.
        """
        sealer = self._sealer
        if sealer is None:
            return self.index
        updates = {
            table: [(key, self._resealed(table, key, sealer)) for key, row in rows.items()
                    if any(map(sealer.is_stale, _record(row).values()))]
            for table, rows in self._tables.items()
        }
        index = await self.write(updates={t: u for t, u in updates.items() if u})
        async with self._write_lock:
            batch = [(f"table/{table}", key, self._on_disk(table, key, row))
                     for table in SECRET_FIELDS for key, row in self._tables[table].items()]
            if batch and self._db is not None:
                await self._db.write_batch(batch, [])
        return index

    def _resealed(self, table: str, key: str, sealer: Sealer) -> RowUpdate:
        def apply(current: Any | None, index: int) -> Any:
            raw = _record(current)
            stale = [name for name, value in raw.items() if sealer.is_stale(value)]
            if current is None or not stale:
                return None
            raw = {**raw, **{name: sealer.reseal(raw[name], row_context(table, key))
                             for name in stale}}
            if "KeyID" in raw:
                raw["KeyID"] = sealer.key_id
            cls_ = TABLE_TYPES.get(table)
            return from_rpc(raw, cls_) if cls_ else raw
        return apply

    def _index_row(self, table: str, key: str, previous: Any | None, row: Any | None) -> None:
        """Move ``key``'s secondary index entries from ``previous`` to ``row``."""
        for name, index_key in SECONDARY_INDEXES.get(table, {}).items():
            entries = self._indexes[table, name]
            if previous is not None:
                old = index_key(previous)
                if old is not None and entries.get(old) == key:
                    del entries[old]
            if row is not None:
                new = index_key(row)
                if new is not None:
                    entries[new] = key

    def _on_disk(self, table: str, key: str, value: Any) -> Any:
        raw = to_rpc(value) if attrs.has(type(value)) else value
        assert self._sealer is not None  # a store with a db always has one
        return seal_record(self._sealer, table, key, raw)


def _record(row: Any) -> dict[str, Any]:
    """A row's RPC form (what is sealed and stored), or {} for no row."""
    if attrs.has(type(row)):
        raw: dict[str, Any] = to_rpc(row)
        return raw
    return row if isinstance(row, dict) else {}


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
