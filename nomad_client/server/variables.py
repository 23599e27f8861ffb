"""Nomad Variables on the server: validation, encryption at rest, check-and-set and locks.

Every write is one row update inside ``StateStore.write``: the CAS comparison, the lock
check and the new row are decided under the store's write lock against the latest row, so
two writers can never both win. A refused write raises out of the row update, and the
whole batch is dropped: a conflict changes nothing.

Items are JSON-encoded and sealed as one blob (associated data: namespace and path) before
the row is built; only ``Variable.data`` and its ``key_id`` are stored.

Locks follow Nomad's leader timers: a lock expires 2 x TTL after it was acquired or last
renewed, still blocks everyone for ``LockDelay`` after that, and is then released. When it
was last acquired or renewed is replicated state, a record of its own per locked variable
(``VARIABLE_LOCK_RENEWALS``) written with every acquire and renewal, so a renewal moves the
store's index but not the variable's ModifyIndex, and every server of a cluster computes
the same deadlines from it, whichever server the holder renews through. A lock past its
release time counts as released wherever it is looked at; the reaper task, run by the
leader alone (``lead``/``follow``), writes the release so blocking readers see it. A server
taking the lead gives every held lock a fresh full-length deadline, as a new Nomad leader
does; so does a restart of a server alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from nomad_client.server.sealing import row_context, sealed_key_id
from nomad_client.server.state import (
    DELETE,
    VARIABLE_LOCK_RENEWALS,
    VARIABLES,
    Change,
    RowUpdate,
    StateStore,
    variable_key,
)
from nomad_client.structs.models import Variable, VariableLock

log = logging.getLogger(__name__)

SECOND_NS = 1_000_000_000
MAX_VARIABLE_SIZE = 64 * 1024
DEFAULT_LOCK_TTL = 15 * SECOND_NS
DEFAULT_LOCK_DELAY = 15 * SECOND_NS
MIN_LOCK_TTL = 10 * SECOND_NS
MAX_LOCK_TTL = 24 * 3600 * SECOND_NS
WILDCARD_NAMESPACE = "*"

_VALID_PATH = re.compile(r"[a-zA-Z0-9\-_~/]{1,128}")
_RESERVED_ROOT = "nomad"
_JOB_TEMPLATES = "nomad/job-templates"


class Sealing(Protocol):
    """What variables need of the server's sealer (``sealing.Sealer`` or its keyring
    successor): seal and open one string bound to a context, and the current key's ID."""

    @property
    def key_id(self) -> str: ...

    def seal(self, plaintext: str, context: str) -> str: ...

    def unseal(self, sealed: str, context: str) -> str: ...


class VariableError(Exception):
    """A variable operation the caller got wrong; ``status`` is the HTTP status it maps to.
    ``validation`` marks the server's own checks, which Nomad reports with a doubled
    ``RPC Error:: 400,`` prefix."""

    def __init__(self, status: int, message: str, *, validation: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.validation = validation


class Conflict(VariableError):
    """A 409: a CAS mismatch or a lock held by someone else. ``current`` is the stored
    variable (None: the zero value, only namespace and path)."""

    def __init__(self, namespace: str, path: str, current: Variable | None,
                 message: str = "cas conflict") -> None:
        super().__init__(409, message)
        self.namespace = namespace
        self.path = path
        self.current = current


def invalid(message: str) -> VariableError:
    return VariableError(400, message, validation=True)


# ---- validation (Nomad's ValidatePath and item rules, with its messages) ---------------
def validate_path(path: str) -> None:
    if not path:
        raise invalid("variable requires path")
    if not _VALID_PATH.fullmatch(path):
        raise invalid(f'invalid path "{path}"')
    if path == _RESERVED_ROOT:
        raise invalid('"nomad" is a reserved top-level directory path, but you may write '
                      'variables to "nomad/jobs", "nomad/job-templates", "nomad/sentinel", '
                      'or below')
    if not path.startswith("nomad/"):
        return
    if path == "nomad/jobs" or path.startswith("nomad/jobs/") \
            or path == "nomad/sentinel" or path.startswith("nomad/sentinel/"):
        return
    if path == _JOB_TEMPLATES or path.startswith(_JOB_TEMPLATES + "/"):
        below = path[len(_JOB_TEMPLATES) + 1:]
        if not below or "/" in below:
            raise invalid('"nomad/job-templates" is a reserved directory path, but you may '
                          'write variables at the level below it, for example, '
                          '"nomad/job-templates/template-name"')
        return
    raise invalid('only paths at "nomad/jobs" or "nomad/job-templates" and below are valid '
                  'paths under the top-level "nomad" directory')


def validate_namespace(namespace: str) -> None:
    if namespace == WILDCARD_NAMESPACE:
        raise invalid('can not target wildcard ("*")namespace')


def items_size(items: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in items.items())


def validate_items(items: Mapping[str, str]) -> None:
    if not items:
        raise invalid("empty variables are invalid")
    if items_size(items) > MAX_VARIABLE_SIZE:
        raise invalid("variables are limited to 64KiB in total size")


def validate_lock_times(ttl: int, lock_delay: int) -> None:
    if ttl < 0 or lock_delay < 0:
        raise invalid("Lock delay and TTL must be positive")
    if not MIN_LOCK_TTL <= ttl <= MAX_LOCK_TTL:
        raise invalid("TTL must be between 10 seconds and 24 hours")


def sealing_context(namespace: str, path: str) -> str:
    """The associated data a variable's items are sealed with: its row, so a blob moved to
    another variable does not open there (and ``StateStore.reseal`` can re-seal it)."""
    return row_context(VARIABLES, variable_key(namespace, path))


# A renewal record's fields (the ``VARIABLE_LOCK_RENEWALS`` table).
_DIGEST = "LockDigest"
_RENEWED_AT = "RenewedAt"
# How long the reaper waits after a failed pass (the state unreachable) before the next.
REAP_RETRY = 1.0


def _lock_digest(lock_id: str) -> str:
    """What a renewal record names its lock by: the ID is the holder's proof of holding, so
    it stays in the variable's row alone."""
    return hashlib.sha256(lock_id.encode("utf-8", "surrogatepass")).hexdigest()


def _recorded_renewal(record: Any, lock: VariableLock) -> float | None:
    """When ``record`` says ``lock`` was last acquired or renewed (unix seconds); None when it
    is about another lock, or not a record this version can read."""
    if not isinstance(record, dict) or record.get(_DIGEST) != _lock_digest(lock.id):
        return None
    at = record.get(_RENEWED_AT)
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        return None
    return float(at)


@attrs.frozen
class _Deadlines:
    """When a held lock expires (renew no more) and when it is released (unix seconds)."""

    expires_at: float
    release_at: float


# Given the variable a lock write leaves (holding a lock) and the lock's renewal record as
# it is: the record to write (None: keep it).
_RenewalRule = Callable[[Variable, Any], Any]
# table -> row updates, as ``StateStore.write`` takes them.
_Updates = dict[str, list[tuple[str, RowUpdate]]]


class Variables:
    """The variables table: reads, CAS writes, locks. ``clock`` (unix seconds) is
    injectable so lock expiry can be tested without waiting. ``leading``: whether this
    server runs the reaper from the start (a server alone does; in a cluster the leader's
    duties call ``lead`` and ``follow``)."""

    def __init__(self, store: StateStore, sealer: Sealing, *,
                 clock: Callable[[], float] = time.time, leading: bool = True) -> None:
        self._store = store
        self._sealer = sealer
        self._clock = clock
        # Keys of the variables holding a lock (held, or in its delay): what the reaper
        # looks at, kept up to date from every commit, this server's or another's.
        self._locked: set[str] = {variable_key(v.namespace, v.path)
                                  for v in store.values(VARIABLES) if v.lock is not None}
        # key -> (lock digest, first seen here): locks without a renewal record (a version
        # that kept none wrote them) until the leader gives them one.
        self._unrecorded: dict[str, tuple[str, float]] = {}
        self._leading = False
        # While leading and the reaper has not yet given every held lock a fresh deadline:
        # when this server took the lead (no deadline here counts from before it).
        self._lead_since: float | None = None
        self._adopted = True
        self._reaper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        store.observe(self._observe)
        if leading:
            self.lead()

    # ---- reads -------------------------------------------------------------------------
    def get(self, namespace: str, path: str) -> Variable | None:
        return self._store.get(VARIABLES, variable_key(namespace, path))

    def items(self, variable: Variable) -> dict[str, str]:
        """The variable's items, opened."""
        items: dict[str, str] = json.loads(self._sealer.unseal(
            variable.data, sealing_context(variable.namespace, variable.path)))
        return items

    def list(self, namespace: str, prefix: str = "") -> list[Variable]:
        """Variables of ``namespace`` (``*``: all) whose path starts with ``prefix``,
        ordered by namespace, then path."""
        rows: list[Variable] = self._store.rows(VARIABLES)
        return [v for v in rows if (namespace == WILDCARD_NAMESPACE or v.namespace == namespace)
                and v.path.startswith(prefix)]

    def index(self) -> int:
        return self._store.table_index(VARIABLES)

    async def wait_for(self, namespace: str, path: str, min_index: int, wait: float
                       ) -> tuple[Variable | None, int]:
        """Block until the variable's index (its ModifyIndex, or the table's while it does
        not exist) passes ``min_index`` or ``wait`` seconds pass; the variable and index."""
        deadline = time.monotonic() + wait
        while True:
            current = self.get(namespace, path)
            index = current.modify_index if current is not None else self.index()
            remaining = deadline - time.monotonic()
            if index > min_index or remaining <= 0:
                return current, index
            await self._store.wait_for_change((VARIABLES,), self.index(), remaining)

    def lock_held(self, variable: Variable) -> bool:
        """Whether ``variable``'s lock still stands (held, or expired but in its delay)."""
        return self._live_lock(variable) is not None

    # ---- writes ------------------------------------------------------------------------
    async def put(self, namespace: str, path: str, items: Mapping[str, str], *,
                  cas: int | None = None, lock_id: str | None = None) -> Variable:
        """Create or replace the variable. ``cas``: only if its ModifyIndex is that (0: only
        if absent). While locked, only a caller naming the lock's ID may write."""
        validate_namespace(namespace)
        validate_path(path)
        validate_items(items)
        record = self._sealed(namespace, path, items)
        now = time.time_ns()

        def apply(current: Variable | None, index: int) -> Variable:
            _check_cas(namespace, path, current, cas)
            lock = self._live_lock(current) if current is not None else None
            if lock is not None:
                if lock_id is None or lock_id != lock.id:
                    raise Conflict(namespace, path, None, "variable is locked")
                # [quirk] as Nomad: the holder's write resets the lock to the defaults.
                lock = VariableLock(lock.id, DEFAULT_LOCK_TTL, DEFAULT_LOCK_DELAY)
            return self._replacing(current, record, now, lock)

        def keep(new: Variable, renewal: Any) -> Any:
            # The holder's write is no renewal; only a lock without a record gets one.
            assert new.lock is not None
            return None if _recorded_renewal(renewal, new.lock) is not None \
                else self._renewal(new.lock)

        return await self._write(namespace, path, apply, keep)

    async def delete(self, namespace: str, path: str, *, cas: int | None = None) -> int:
        """Delete the variable (a missing one is no error); a locked one cannot be."""
        def apply(current: Variable | None, index: int) -> Any:
            _check_cas(namespace, path, current, cas)
            if current is None:
                return None
            if self._live_lock(current) is not None:
                raise Conflict(namespace, path, None, "variable is locked")
            return DELETE

        key = variable_key(namespace, path)
        return await self._store.write(updates=self._lock_updates(key, apply, _unreachable))

    async def acquire(self, namespace: str, path: str, items: Mapping[str, str] | None, *,
                      ttl: int = DEFAULT_LOCK_TTL, lock_delay: int = DEFAULT_LOCK_DELAY,
                      lock_id: str | None = None) -> Variable:
        """Lock the variable (creating it if missing) and set its items to ``items``
        [quirk: replacing any it had]. Re-acquiring with the holder's ID succeeds (and
        restarts the TTL)."""
        validate_namespace(namespace)
        validate_path(path)
        validate_lock_times(ttl, lock_delay)
        if items and items_size(items) > MAX_VARIABLE_SIZE:
            raise invalid("variables are limited to 64KiB in total size")
        record = self._sealed(namespace, path, items or {})
        lock = VariableLock(lock_id or str(uuid.uuid4()), ttl, lock_delay)
        now = time.time_ns()

        def apply(current: Variable | None, index: int) -> Variable:
            held = self._live_lock(current) if current is not None else None
            if held is not None and held.id != lock.id:
                raise Conflict(namespace, path, None, "variable is locked")
            return self._replacing(current, record, now, lock)

        return await self._write(namespace, path, apply,
                                 lambda new, renewal: self._renewal(lock))

    async def renew(self, namespace: str, path: str, lock_id: str) -> Variable:
        """Restart the lock's TTL. Writes only the lock's renewal record: the store's index
        moves, the variable's row and ModifyIndex do not (as in Nomad). Decided under the
        write lock against the latest variable, so it cannot race a release."""
        key = variable_key(namespace, path)
        renewed: Variable | None = None

        def apply(renewal: Any | None, index: int) -> Any:
            nonlocal renewed
            current: Variable | None = self._store.get(VARIABLES, key)
            if current is None:
                raise VariableError(404, "variable doesn't exist")
            if current.lock is None or self._released(key, current.lock):
                raise VariableError(409, "variable doesn't hold a lock")
            if current.lock.id != lock_id \
                    or self._clock() >= self._deadlines(key, current.lock).expires_at:
                raise VariableError(409, "attempting to modify locked variable")
            renewed = current
            return self._renewal(current.lock)

        await self._store.write(updates={VARIABLE_LOCK_RENEWALS: [(key, apply)]})
        assert renewed is not None
        return renewed

    async def release(self, namespace: str, path: str, lock_id: str) -> Variable:
        """Give up the lock; the items stay."""
        validate_namespace(namespace)
        validate_path(path)

        def apply(current: Variable | None, index: int) -> Variable:
            if current is None:
                raise VariableError(404, "variable doesn't exist")
            lock = self._live_lock(current)
            if lock is None:
                raise VariableError(409, "variable doesn't hold a lock")
            if lock.id != lock_id:
                raise Conflict(namespace, path, None, "variable is locked")
            return attrs.evolve(current, lock=None)

        return await self._write(namespace, path, apply, _unreachable)

    # ---- lock expiry -------------------------------------------------------------------
    async def expire_locks(self) -> int:
        """Release, in one write, every lock whose delay after expiry has passed; the index
        of that write (the current index if none was due). The reaper calls it; any server
        may, as each release is decided again under the write lock."""
        now = self._clock()
        due = [key for key in sorted(self._locked)
               if (d := self._deadlines_of(key)) is not None and now >= d.release_at]
        if not due:
            return self._store.index

        def clear(key: str) -> RowUpdate:
            def apply(current: Variable | None, index: int) -> Variable | None:
                # Only if still due: a lock acquired again (or renewed through another
                # server) meanwhile keeps its own deadline (unlike Nomad, see §8).
                if current is None or current.lock is None \
                        or not self._released(key, current.lock):
                    return None
                return attrs.evolve(current, lock=None)
            return apply

        updates: _Updates = {}
        for key in due:
            for table, rows in self._lock_updates(key, clear(key), _unreachable).items():
                updates.setdefault(table, []).extend(rows)
        return await self._store.write(updates=updates)

    def reschedule(self) -> None:
        """Let the reaper look at the deadlines again (after they changed, or the clock
        was moved)."""
        self._wake.set()

    def lead(self) -> None:
        """Run the reaper here (this server leads). Every held lock gets a fresh full-length
        deadline from now, as a new Nomad leader gives it: the reaper's first pass writes
        it, and until then this server counts no deadline from earlier. Idempotent; without
        a running event loop the reaper starts with the first lock change seen."""
        if self._leading or self._closed:
            return
        self._leading = True
        self._adopted = not self._locked
        self._lead_since = None if self._adopted else self._clock()
        self._ensure_reaper()

    async def follow(self) -> None:
        """Stop the reaper (another server leads, or none). A lock past its release time
        still counts as released wherever it is looked at here."""
        self._leading = False
        self._lead_since = None
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)

    async def close(self) -> None:
        """Stop the reaper for good; locks left held are released by the next leader."""
        self._closed = True
        await self.follow()

    def _ensure_reaper(self) -> None:
        if not self._leading or self._closed:
            return
        self._wake.set()
        if (self._reaper is None or self._reaper.done()) and self._locked:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._reaper = loop.create_task(self._reap(), name="variable-lock-reaper")

    async def _reap(self) -> None:
        while True:
            self._wake.clear()
            nap: float | None
            try:
                if not self._adopted:
                    await self._adopt()
                await self.expire_locks()
                nap = self._next_release()
            except Exception:
                # Tried again a little later; meanwhile a lock past its release time counts
                # as released wherever it is looked at.
                log.exception("releasing expired variable locks failed")
                nap = REAP_RETRY
            try:
                async with asyncio.timeout(nap):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _adopt(self) -> None:
        """Write a fresh renewal for every held lock (this server just took the lead)."""
        def restamp(key: str) -> RowUpdate:
            def apply(renewal: Any | None, index: int) -> Any:
                current: Variable | None = self._store.get(VARIABLES, key)
                if current is None or current.lock is None:
                    return None
                return self._renewal(current.lock)
            return apply

        await self._store.write(updates={
            VARIABLE_LOCK_RENEWALS: [(key, restamp(key)) for key in sorted(self._locked)]})
        self._adopted = True
        self._lead_since = None

    def _observe(self, index: int, changes: Sequence[Change]) -> None:
        """Follow which variables hold locks, and wake the reaper when a lock or its
        renewal changed (through this server or another)."""
        wake = False
        for change in changes:
            if change.table == VARIABLES:
                before = change.before.lock if change.before is not None else None
                after = change.after.lock if change.after is not None else None
                if after is None:
                    self._locked.discard(change.key)
                    self._unrecorded.pop(change.key, None)
                else:
                    self._locked.add(change.key)
                wake = wake or before != after
            elif change.table == VARIABLE_LOCK_RENEWALS:
                self._unrecorded.pop(change.key, None)
                wake = True
        if wake:
            self._ensure_reaper()

    def _next_release(self) -> float | None:
        """Seconds until the next lock is due for release (None: no lock held)."""
        releases = [d.release_at for key in self._locked
                    if (d := self._deadlines_of(key)) is not None]
        return max(min(releases) - self._clock(), 0.0) if releases else None

    def _renewal(self, lock: VariableLock) -> dict[str, Any]:
        """A renewal record for ``lock``, renewed now."""
        return {_DIGEST: _lock_digest(lock.id), _RENEWED_AT: self._clock()}

    def _renewed_at(self, key: str, lock: VariableLock) -> float:
        """When ``lock`` was last acquired or renewed, as every server reads it from the
        replicated record (a lock without one: when this server first saw it)."""
        at = _recorded_renewal(self._store.get(VARIABLE_LOCK_RENEWALS, key), lock)
        if at is None:
            digest = _lock_digest(lock.id)
            seen = self._unrecorded.get(key)
            if seen is None or seen[0] != digest:
                seen = self._unrecorded[key] = (digest, self._clock())
            at = seen[1]
        if self._lead_since is not None:
            at = max(at, self._lead_since)
        return at

    def _deadlines(self, key: str, lock: VariableLock) -> _Deadlines:
        expires_at = self._renewed_at(key, lock) + 2 * lock.ttl / SECOND_NS
        return _Deadlines(expires_at, expires_at + lock.lock_delay / SECOND_NS)

    def _deadlines_of(self, key: str) -> _Deadlines | None:
        current: Variable | None = self._store.get(VARIABLES, key)
        if current is None or current.lock is None:
            return None
        return self._deadlines(key, current.lock)

    def _released(self, key: str, lock: VariableLock) -> bool:
        return self._clock() >= self._deadlines(key, lock).release_at

    def _live_lock(self, variable: Variable | None) -> VariableLock | None:
        """The variable's lock unless it has run past its delay (then: released)."""
        if variable is None or variable.lock is None:
            return None
        key = variable_key(variable.namespace, variable.path)
        return None if self._released(key, variable.lock) else variable.lock

    def _lock_updates(self, key: str, apply: RowUpdate, rule: _RenewalRule) -> _Updates:
        """Row updates writing ``apply``'s variable and, in the same batch, its lock's
        renewal record: ``rule``'s for a variable left holding a lock, none otherwise.
        The record's update reads what the variable's decided: ``StateStore.write`` runs
        the tables' updates in the order given, and both again on a retry."""
        outcome: list[Any] = [None]

        def variable(current: Variable | None, index: int) -> Any:
            outcome[0] = None
            outcome[0] = apply(current, index)
            return outcome[0]

        def renewal(current: Any | None, index: int) -> Any:
            new = outcome[0]
            if new is None:
                return None
            if new is DELETE or new.lock is None:
                return DELETE if current is not None else None
            return rule(new, current)

        return {VARIABLES: [(key, variable)], VARIABLE_LOCK_RENEWALS: [(key, renewal)]}

    # ---- helpers -----------------------------------------------------------------------
    def _sealed(self, namespace: str, path: str, items: Mapping[str, str]) -> Variable:
        """A new record holding ``items`` sealed (indexes and times are set on write)."""
        sealed = self._sealer.seal(json.dumps(dict(items), separators=(",", ":")),
                                   sealing_context(namespace, path))
        return Variable(namespace=namespace, path=path, data=sealed,
                        # Read from the blob, so record and blob never disagree mid-rotation.
                        key_id=sealed_key_id(sealed))

    @staticmethod
    def _replacing(current: Variable | None, record: Variable, now: int,
                   lock: VariableLock | None) -> Variable:
        create_time = current.create_time if current is not None else now
        return attrs.evolve(record, create_time=create_time, modify_time=now, lock=lock)

    async def _write(self, namespace: str, path: str,
                     apply: Callable[[Variable | None, int], Variable],
                     rule: _RenewalRule) -> Variable:
        key = variable_key(namespace, path)
        await self._store.write(updates=self._lock_updates(key, apply, rule))
        written = self._store.get(VARIABLES, key)
        assert written is not None
        return written


def _unreachable(new: Variable, renewal: Any) -> Any:
    """The renewal rule of writes that never leave a lock held."""
    raise AssertionError("this write leaves no lock held")


def _check_cas(namespace: str, path: str, current: Variable | None, cas: int | None) -> None:
    """Raise ``Conflict`` unless the stored state is what ``cas`` expects: 0 = absent,
    N = present with ModifyIndex N, None = anything."""
    if cas is None:
        return
    if current is None:
        if cas != 0:
            raise Conflict(namespace, path, None)
        return
    if current.modify_index != cas:
        raise Conflict(namespace, path, current)
