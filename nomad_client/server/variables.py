"""Nomad Variables on the server: validation, encryption at rest, check-and-set and locks.

Every write is one row update inside ``StateStore.write``: the CAS comparison, the lock
check and the new row are decided under the store's write lock against the latest row, so
two writers can never both win. A refused write raises out of the row update, and the
whole batch is dropped: a conflict changes nothing.

Items are JSON-encoded and sealed as one blob (associated data: namespace and path) before
the row is built; only ``Variable.data`` and its ``key_id`` are stored.

Locks follow Nomad's leader timers: a lock expires 2 x TTL after it was acquired or last
renewed, still blocks everyone for ``LockDelay`` after that, and is then released. The
deadlines are kept here in memory (a renewal writes nothing, so it moves no index); after a
restart every held lock gets a fresh full-length deadline, as a new Nomad leader gives it.
A lock past its release time counts as released wherever it is looked at, and the reaper
task (owned here, stopped by ``close``) writes the release so blocking readers see it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs

from nomad_client.server.sealing import row_context, sealed_key_id
from nomad_client.server.state import DELETE, VARIABLES, StateStore, variable_key
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


@attrs.define
class _LockTimer:
    """When a held lock expires (renew no more) and when it is released (seconds, on the
    ``Variables`` clock)."""

    lock_id: str = attrs.field(repr=False)
    expires_at: float
    release_at: float


class Variables:
    """The variables table: reads, CAS writes, locks. ``clock`` (unix seconds) is
    injectable so lock expiry can be tested without waiting."""

    def __init__(self, store: StateStore, sealer: Sealing, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._sealer = sealer
        self._clock = clock
        # variable key -> its lock's deadlines; changed only under the store's write lock.
        self._timers: dict[str, _LockTimer] = {}
        self._adopted = False
        self._reaper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

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

        return await self._write(namespace, path, apply)

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
        index = await self._store.write(updates={VARIABLES: [(key, apply)]})
        self._timers.pop(key, None)
        return index

    async def acquire(self, namespace: str, path: str, items: Mapping[str, str] | None, *,
                      ttl: int = DEFAULT_LOCK_TTL, lock_delay: int = DEFAULT_LOCK_DELAY,
                      lock_id: str | None = None) -> Variable:
        """Lock the variable (creating it if missing) and set its items to ``items``
        [quirk: replacing any it had]. Re-acquiring with the holder's ID succeeds."""
        validate_namespace(namespace)
        validate_path(path)
        validate_lock_times(ttl, lock_delay)
        if items and items_size(items) > MAX_VARIABLE_SIZE:
            raise invalid("variables are limited to 64KiB in total size")
        record = self._sealed(namespace, path, items or {})
        lock = VariableLock(lock_id or str(uuid.uuid4()), ttl, lock_delay)
        key = variable_key(namespace, path)
        now = time.time_ns()

        def apply(current: Variable | None, index: int) -> Variable:
            held = self._live_lock(current) if current is not None else None
            if held is not None and held.id != lock.id:
                raise Conflict(namespace, path, None, "variable is locked")
            self._start_timer(key, lock)
            return self._replacing(current, record, now, lock)

        written = await self._write(namespace, path, apply)
        self._ensure_reaper()
        return written

    async def renew(self, namespace: str, path: str, lock_id: str) -> Variable:
        """Restart the lock's TTL. Writes nothing (no index moves), but is decided under
        the write lock so it cannot race a release."""
        key = variable_key(namespace, path)
        renewed: Variable | None = None

        def apply(current: Variable | None, index: int) -> None:
            nonlocal renewed
            if current is None:
                raise VariableError(404, "variable doesn't exist")
            if current.lock is None or self._released(key, current):
                raise VariableError(409, "variable doesn't hold a lock")
            timer = self._timer(key, current.lock)
            if current.lock.id != lock_id or self._clock() >= timer.expires_at:
                raise VariableError(409, "attempting to modify locked variable")
            self._start_timer(key, current.lock)
            renewed = current
            return None

        await self._store.write(updates={VARIABLES: [(key, apply)]})
        assert renewed is not None
        self._ensure_reaper()
        return renewed

    async def release(self, namespace: str, path: str, lock_id: str) -> Variable:
        """Give up the lock; the items stay."""
        validate_namespace(namespace)
        validate_path(path)
        key = variable_key(namespace, path)

        def apply(current: Variable | None, index: int) -> Variable:
            if current is None:
                raise VariableError(404, "variable doesn't exist")
            lock = self._live_lock(current)
            if lock is None:
                raise VariableError(409, "variable doesn't hold a lock")
            if lock.id != lock_id:
                raise Conflict(namespace, path, None, "variable is locked")
            return attrs.evolve(current, lock=None)

        written = await self._write(namespace, path, apply)
        self._timers.pop(key, None)
        self._wake.set()
        return written

    # ---- lock expiry -------------------------------------------------------------------
    async def expire_locks(self) -> int:
        """Release, in one write, every lock whose delay after expiry has passed; the index
        of that write (the current index if none was due)."""
        self._adopt_restored_locks()
        now = self._clock()
        due = [key for key, timer in self._timers.items() if now >= timer.release_at]
        if not due:
            return self._store.index

        def clear(key: str) -> Callable[[Variable | None, int], Variable | None]:
            def apply(current: Variable | None, index: int) -> Variable | None:
                timer = self._timers.get(key)
                # Only the lock this timer was for, and only if it is still due: a lock
                # acquired again meanwhile keeps its own deadline (unlike Nomad, see §8).
                if current is None or current.lock is None or timer is None \
                        or timer.lock_id != current.lock.id or self._clock() < timer.release_at:
                    return None
                del self._timers[key]
                return attrs.evolve(current, lock=None)
            return apply

        index = await self._store.write(updates={VARIABLES: [(k, clear(k)) for k in due]})
        for key in due:  # a timer whose variable went away meanwhile
            timer = self._timers.get(key)
            if timer is not None and self._store.get(VARIABLES, key) is None:
                del self._timers[key]
        return index

    def reschedule(self) -> None:
        """Let the reaper look at the deadlines again (after they changed, or the clock
        was moved)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop the reaper; locks left held are released by the next start's deadlines."""
        self._closed = True
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            try:
                await reaper
            except asyncio.CancelledError:
                pass

    def _ensure_reaper(self) -> None:
        self._wake.set()
        if self._reaper is None and not self._closed:
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap(), name="variable-lock-reaper")

    async def _reap(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.expire_locks()
            except Exception:
                # A failed release is retried at the next wake; the lock counts as released
                # wherever it is looked at meanwhile.
                log.exception("releasing expired variable locks failed")
            pending = [t.release_at for t in self._timers.values()]
            nap = max(min(pending) - self._clock(), 0.0) if pending else None
            try:
                async with asyncio.timeout(nap):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _adopt_restored_locks(self) -> None:
        """Give every lock found in the store (a restart) a fresh full-length deadline."""
        if self._adopted:
            return
        self._adopted = True
        for variable in self._store.values(VARIABLES):
            if variable.lock is not None:
                self._timer(variable_key(variable.namespace, variable.path), variable.lock)

    def _start_timer(self, key: str, lock: VariableLock) -> _LockTimer:
        expires_at = self._clock() + 2 * lock.ttl / SECOND_NS
        timer = _LockTimer(lock.id, expires_at, expires_at + lock.lock_delay / SECOND_NS)
        self._timers[key] = timer
        return timer

    def _timer(self, key: str, lock: VariableLock) -> _LockTimer:
        timer = self._timers.get(key)
        if timer is None or timer.lock_id != lock.id:
            timer = self._start_timer(key, lock)
        return timer

    def _released(self, key: str, variable: Variable) -> bool:
        assert variable.lock is not None
        return self._clock() >= self._timer(key, variable.lock).release_at

    def _live_lock(self, variable: Variable | None) -> VariableLock | None:
        """The variable's lock unless it has run past its delay (then: released)."""
        if variable is None or variable.lock is None:
            return None
        key = variable_key(variable.namespace, variable.path)
        return None if self._released(key, variable) else variable.lock

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
                     apply: Callable[[Variable | None, int], Variable]) -> Variable:
        key = variable_key(namespace, path)
        await self._store.write(updates={VARIABLES: [(key, apply)]})
        written = self._store.get(VARIABLES, key)
        assert written is not None
        return written


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
