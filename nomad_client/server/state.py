"""The server's state store: tables of namespaces, jobs, evaluations, allocations, nodes and
the ACL records (tokens, policies, roles, the bootstrap marker), variables (items sealed by
``server.variables`` before they reach a row), a Raft-style index bumped by every
write, and blocking queries that wake on change.

The store is in memory, and every read is served from there. Given a backend
(``state_backends``), it writes every change through before applying it: a ``StateDB`` file so
a restarted agent finds its jobs and allocations again (the embedded mode), or etcd, shared by
the servers of a cluster (``from_etcd``), where each server holds the whole state in memory and
replays the batches the others commit, in commit order. Only the server package touches it.
Credential fields are sealed on their way to disk and opened on the way back (``sealing``):
what is at rest never holds a secret in the clear.

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
before and after (the event stream's broker is one): called once per batch, after the commit,
in index order, whether this server or another committed it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import attrs

from nomad_client.server.sealing import (
    SECRET_FIELDS,
    Sealer,
    SealError,
    row_context,
    seal_record,
    unseal_record,
)
from nomad_client.server.state_backends import (
    Batch,
    OutcomeUnknown,
    Snapshot,
    SqliteBackend,
    StateBackend,
    StateContention,
    WriteConflict,
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

if TYPE_CHECKING:
    from nomad_client.server.etcd.client import EtcdClient

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
# Keyed by ``variable_key``: when a held lock was last acquired or renewed
# ({"LockDigest": ..., "RenewedAt": unix seconds}, ``server.variables``), apart from the
# variable so a renewal moves no ModifyIndex of it.
VARIABLE_LOCK_RENEWALS = "variable_lock_renewals"
PLAIN_TABLES = (JOBS, ACL_BOOTSTRAP, SERVICES,  # rows are plain dicts
                SCALING_EVENTS, PERIODIC_LAUNCHES, JOB_VERSIONS, VARIABLE_LOCK_RENEWALS)
# The cap on how long any blocking query may wait, whatever wait the caller asked for; the
# HTTP layer's own default wait is only what it asks for when the request names none.
MAX_BLOCKING_WAIT = 300.0
# How often a write is computed again after losing to another server's, and how long it
# waits each time to have applied the winner's batch (a shared backend only).
WRITE_ATTEMPTS = 64
CATCH_UP_TIMEOUT = 30.0
# How often one batch is sent again while etcd cannot say whether it went through.
UNKNOWN_OUTCOME_ATTEMPTS = 3
# How many replayed batches' ids are remembered, to recognise a lost commit of ours.
_REPLAYED_IDS = 64


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
    def __init__(self, db: StateDB | None = None, sealer: Sealer | None = None, *,
                 backend: StateBackend | None = None) -> None:
        if db is not None:
            if backend is not None:
                raise ValueError("a store has one backend: a database or another")
            backend = SqliteBackend(db)
        if backend is not None and sealer is None:
            raise ValueError("a persisted store needs a sealer for its secrets")
        self._backend = backend
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
        # Done once the commit in flight (if any) is applied or refused: a follower waits
        # for it, so it can tell this server's own batch from another's.
        self._committing: asyncio.Future[None] | None = None
        # index -> id of the last batches replayed from other writers (and lost own ones).
        self._replayed: dict[int, str] = {}

    @classmethod
    async def restore(cls, db: StateDB, sealer: Sealer) -> StateStore:
        """The store of the embedded mode: loaded from, and written through to, ``db``."""
        return await cls._open(SqliteBackend(db), sealer)

    @classmethod
    async def from_etcd(cls, client: EtcdClient, sealer: Sealer) -> StateStore:
        """A store shared with other servers through etcd: loaded from one consistent read
        of the state, then following every batch any server commits (see
        ``server.etcd.state_backend``). Writes raise ``EtcdUnavailable`` (an ``EtcdError``)
        while etcd cannot be reached, and ``StateContention`` when they keep losing to other
        servers; reads go on serving the last state applied. ``close`` stops following;
        ``client`` stays its caller's to close."""
        # Imported here: only a server in etcd mode loads the etcd client (and grpc).
        from nomad_client.server.etcd.state_backend import EtcdBackend

        backend = EtcdBackend(client)
        store = await cls._open(backend, sealer)
        backend.follow(store._replay, store._resync)
        return store

    @classmethod
    async def _open(cls, backend: StateBackend, sealer: Sealer) -> StateStore:
        store = cls(sealer=sealer, backend=backend)
        snapshot = await backend.load(tuple(store._tables))
        store.index = snapshot.index
        # Rows an older version stored differently: secrets in the clear (sealed now), rows
        # under an older key (moved to theirs).
        rewrites: list[tuple[str, str, Any]] = []
        moved: list[tuple[str, str]] = []
        for table in store._tables:
            row_key = ROW_KEYS.get(table)
            for key, raw in snapshot.rows.get(table, ()):
                raw, rewrite = unseal_record(sealer, table, key, raw)  # True: in the clear
                cls_ = TABLE_TYPES.get(table)
                row = from_rpc(raw, cls_) if cls_ else raw
                if row_key is not None and row_key(row) != key:
                    moved.append((table, key))
                    key, rewrite = row_key(row), True
                if rewrite:
                    rewrites.append((table, key, seal_record(sealer, table, key, raw)))
                store._tables[table][key] = row
                store._index_row(table, key, None, row)
            store._table_index[table] = store.index
        if rewrites or moved:  # one transaction, as every write; no index moves
            try:
                await store._commit_surely(store.index, Batch(store.index, rewrites, moved))
            except WriteConflict:
                # Another server wrote meanwhile: the old forms still load, so the next
                # start rewrites them.
                log.warning("state rewrite at start left for later: the state moved on")
        return store

    async def close(self) -> None:
        """Stop following other servers' writes (nothing to do for a store of its own)."""
        if self._backend is not None:
            await self._backend.close()

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

        When another server committed first (a shared backend), the batch is computed again
        against the rows as they are after that server's writes: a row update may run more
        than once, and must be a pure function of its arguments. That is what makes a
        check-and-set inside one (an enforced index, a variable's cas, a lock, the ACL
        bootstrap) hold across servers.
        """
        async with self._write_lock:
            for _ in range(WRITE_ATTEMPTS):
                index = self.index + 1
                pending = self._stage(index, upserts, deletes, updates)
                if not pending:
                    return self.index
                if self._backend is None:
                    self._apply(index, pending)
                    return index
                batch = Batch(
                    index,
                    [(table, key, self._on_disk(table, key, v))
                     for table, rows in pending.items() for key, v in rows.items()
                     if v is not DELETE],
                    [(table, key) for table, rows in pending.items()
                     for key, v in rows.items() if v is DELETE],
                    secrets.token_hex(8))
                try:
                    await self._commit_surely(index - 1, batch,
                                              partial(self._apply, index, pending))
                except WriteConflict as conflict:
                    await self._catch_up(conflict.index)
                    continue
                return index
            raise StateContention(
                f"a write lost to other servers' writes {WRITE_ATTEMPTS} times in a row")

    def _stage(self, index: int, upserts: Mapping[str, Sequence[tuple[str, Any]]] | None,
               deletes: Mapping[str, Sequence[str]] | None,
               updates: Mapping[str, Sequence[tuple[str, RowUpdate]]] | None
               ) -> dict[str, dict[str, Any]]:
        """The rows ``write`` would commit at ``index``, against the rows as they are now."""
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
        for table, rows in pending.items():
            for key, value in rows.items():
                if value is not DELETE and (attrs.has(type(value)) or isinstance(value, dict)):
                    rows[key] = _stamp(value, self._tables[table].get(key), index)
        return pending

    async def _commit(self, expected: int, batch: Batch,
                      apply: Callable[[], Any] = lambda: None) -> None:
        """Commit ``batch`` to the backend and ``apply`` it to memory, marked as in flight
        throughout so a follower that sees it come back waits and then skips it."""
        assert self._backend is not None
        committing = asyncio.get_running_loop().create_future()
        self._committing = committing
        try:
            await self._backend.commit(expected, batch)
            apply()
        finally:
            self._committing = None
            committing.set_result(None)

    async def _commit_surely(self, expected: int, batch: Batch,
                             apply: Callable[[], Any] = lambda: None) -> None:
        """``_commit``, trying the same batch again while its outcome is unknown (etcd lost
        mid-commit, e.g. as its leader died). Safe: both tries are guarded by ``expected``,
        so at most one commits; when a retry meets a moved index, the batch that moved it is
        looked up by id, and if it was the lost try, the write is done (the follower applied
        it). Raises the last unknown outcome if etcd stays away."""
        for attempt in range(UNKNOWN_OUTCOME_ATTEMPTS):
            try:
                await self._commit(expected, batch, apply)
                return
            except OutcomeUnknown as exc:
                unknown = exc
                log.warning("state commit of index %d lost track of (%s); trying again",
                            batch.index, exc)
                await asyncio.sleep(0.2 * (attempt + 1))
            except WriteConflict as conflict:
                if attempt == 0 or batch.index == expected:
                    raise  # a plain conflict (a rewrite's try is idempotent anyway)
                await self._catch_up(conflict.index)
                if self._replayed.get(batch.index) == batch.id:
                    return  # the lost try went through
                raise
        raise unknown

    async def _catch_up(self, index: int) -> None:
        """After a lost commit: wait until the batches up to ``index`` are applied here."""
        if index <= self.index:
            # The state at rest is behind this store: it was replaced under the cluster
            # (restored from an older backup). Retrying cannot fix that; the retries end.
            log.error("the shared state is at index %d, behind this server's %d",
                      index, self.index)
            return
        if not await self.wait_until(index, CATCH_UP_TIMEOUT):
            raise StateContention(
                f"this server did not catch up with index {index} within "
                f"{CATCH_UP_TIMEOUT:g}s")

    async def wait_until(self, index: int, timeout: float) -> bool:
        """Wait until this store has applied ``index`` (a write of another server, say);
        False if ``timeout`` passed first."""
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                while self.index < index:
                    await self._changed.wait()
        except TimeoutError:
            return self.index >= index
        return True

    def _apply(self, index: int, pending: Mapping[str, Mapping[str, Any]]) -> None:
        """Make a committed batch current: rows, indexes, blocked readers, observers."""
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

    def _tell_observers(self, index: int, changes: Sequence[Change]) -> None:
        for observer in self._observers:
            try:
                observer(index, changes)
            except Exception:
                # The batch is committed whatever an observer makes of it.
                log.exception("commit observer failed at index %d", index)

    # ---- following other servers -------------------------------------------------------
    async def _replay(self, batch: Batch) -> None:
        """Apply a batch the backend saw committed, unless it is this server's own."""
        await self._settled()
        if batch.index <= self.index:
            return  # ours (applied when committed), or a re-seal that changed no content
        puts = await self._opened(batch.puts)
        await self._settled()
        if batch.index <= self.index:
            return
        if batch.index != self.index + 1:
            log.warning("state batch %d follows %d: batches between them were missed",
                        batch.index, self.index)
        pending: dict[str, dict[str, Any]] = {}
        for table, key, row in puts:
            pending.setdefault(table, {})[key] = row
        for table, key in batch.deletes:
            if table in self._tables:
                pending.setdefault(table, {})[key] = DELETE
        self._apply(batch.index, pending)
        self._replayed[batch.index] = batch.id
        if len(self._replayed) > _REPLAYED_IDS:
            del self._replayed[next(iter(self._replayed))]

    async def _resync(self, snapshot: Snapshot) -> None:
        """Catch up with a whole snapshot (the follower fell further behind than the backend
        keeps history): apply the difference as one batch at the snapshot's index."""
        opened = await self._opened(
            [(table, key, raw) for table, rows in snapshot.rows.items() for key, raw in rows])
        await self._settled()
        stored: dict[str, dict[str, Any]] = {}
        for table, key, row in opened:
            stored.setdefault(table, {})[key] = row
        pending: dict[str, dict[str, Any]] = {}
        for table, live in self._tables.items():
            rows = stored.get(table, {})
            changed = {key: row for key, row in rows.items() if live.get(key) != row}
            seeds = {seed for seed, _ in SEED_ROWS.get(table, ())}
            changed.update(dict.fromkeys(
                (key for key in live if key not in rows and key not in seeds), DELETE))
            if changed:
                pending[table] = changed
        if pending or snapshot.index > self.index:
            self._apply(max(snapshot.index, self.index), pending)

    async def _settled(self) -> None:
        """Return once no commit of this server is in flight."""
        while (committing := self._committing) is not None:
            # wait(), not await: a cancelled follower must not cancel the writer's future.
            await asyncio.wait([committing])

    async def _opened(self, puts: Iterable[tuple[str, str, Any]]
                      ) -> list[tuple[str, str, Any]]:
        """Replayed rows in their in-memory form, those that cannot be used left out
        (logged). A row sealed with a key this server does not hold yet (another server
        rotated the keyring a moment ago) is waited for, not dropped: the follower stops
        until the key arrives, as this store must not go on without the row."""
        delay = 0.1
        while True:
            try:
                return [(table, key, row) for table, key, raw in puts
                        if (row := self._decoded(table, key, raw)) is not None]
            except SealError as exc:
                log.warning("a replayed state row does not open yet (%s); waiting for the "
                            "keyring", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _decoded(self, table: str, key: str, raw: Any) -> Any | None:
        """A replayed row's in-memory form, or None (logged) when it cannot be used; raises
        ``SealError`` when it does not open with the keys held now."""
        if table not in self._tables:
            log.warning("state row of unknown table %r ignored", table)
            return None
        assert self._sealer is not None  # a store with a backend always has one
        try:
            raw, _ = unseal_record(self._sealer, table, key, raw)
            cls_ = TABLE_TYPES.get(table)
            return from_rpc(raw, cls_) if cls_ else raw
        except SealError:
            raise
        except Exception as exc:
            # Never the value in the message: it may hold a secret.
            log.error("state row %s of %s could not be loaded: %s", key, table,
                      type(exc).__name__)
            return None

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
        if self._backend is None:
            return index
        async with self._write_lock:
            for _ in range(WRITE_ATTEMPTS):
                batch = [(table, key, self._on_disk(table, key, row))
                         for table in SECRET_FIELDS for key, row in self._tables[table].items()]
                if not batch:
                    break
                try:
                    # Guarded by the index: a row another server changed meanwhile is not
                    # overwritten with its older form.
                    await self._commit_surely(self.index, Batch(self.index, batch, []))
                except WriteConflict as conflict:
                    await self._catch_up(conflict.index)
                    continue
                break
            else:
                raise StateContention(
                    f"re-sealing lost to other servers' writes {WRITE_ATTEMPTS} times")
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
