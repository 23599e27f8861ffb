"""The client's persistent state: a small bucket/key/value store in one sqlite file.

Values are msgpack-encoded. Every sqlite call runs on a single worker thread owned by the
:class:`StateDB` (so the event loop never blocks and calls are naturally serialized). This
module touches only the database file given to :meth:`StateDB.open`, its sqlite side files
(``-wal``, ``-shm``) and, when missing, the directory that holds it.

Round-trip notes: msgpack returns tuples as lists and bytes as bytes; map keys may be any
msgpack scalar.

:class:`CoalescingWriter` is group commit over a :class:`StateDB`: puts made while one
transaction is being written all go into the next one, and each caller returns once its value
is durable, so N task runners changing state at once cost a few transactions, not N.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgpack

__all__ = ["CoalescingWriter", "StateDB", "StateDBError"]

_T = TypeVar("_T")

_UPSERT = ("INSERT INTO kv (bucket, key, value) VALUES (?, ?, ?) "
           "ON CONFLICT (bucket, key) DO UPDATE SET value = excluded.value")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    bucket TEXT NOT NULL,
    key    TEXT NOT NULL,
    value  BLOB NOT NULL,
    PRIMARY KEY (bucket, key)
)
"""


class StateDBError(Exception):
    """The state database cannot be opened or read, or is already closed."""


def _encode(bucket: str, key: str, value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot store value at {bucket}/{key}: {exc}") from None


def _decode(bucket: str, key: str, blob: bytes) -> Any:
    try:
        return msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise StateDBError(f"stored value at {bucket}/{key} is not valid msgpack: {exc}") from None


def _check_names(bucket: str, key: str, what: str = "key") -> None:
    if not isinstance(bucket, str):
        raise TypeError(f"bucket must be a str, not {type(bucket).__name__}")
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a str, not {type(key).__name__}")


def _connect(path: Path) -> sqlite3.Connection:
    """Create the directory and file with private modes, then open and prepare the schema."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StateDBError(f"cannot open state database {path}: {exc}") from exc

    # Autocommit mode: each statement is its own durable transaction.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Overwritten and deleted records are zeroed, not left in free pages.
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(kv)")}
        if not {"bucket", "key", "value"} <= columns:
            raise StateDBError(f"state database {path} has an unexpected kv table layout")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StateDBError(
            f"state database {path} is corrupt or not an sqlite database: {exc}"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


class StateDB:
    """Async facade over one sqlite file; create it with :meth:`open`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._path = path
        self._conn = conn
        self._executor = executor
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    @classmethod
    async def open(cls, path: Path) -> StateDB:
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-db")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, conn, executor)

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StateDBError(f"state database {self._path} is closed")
        conn = self._conn
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)
        except sqlite3.Error as exc:
            raise StateDBError(f"state database {self._path}: {exc}") from exc

    async def put(self, bucket: str, key: str, value: Any) -> None:
        _check_names(bucket, key)
        blob = _encode(bucket, key, value)  # before any I/O so a bad value writes nothing
        await self._run(lambda conn: conn.execute(_UPSERT, (bucket, key, blob)))

    async def write_batch(self, puts: Sequence[tuple[str, str, Any]],
                          deletes: Sequence[tuple[str, str]] = ()) -> None:
        """Apply puts ``(bucket, key, value)`` and deletes ``(bucket, key)`` as ONE durable
        transaction: after a crash either all of them are on disk or none is."""
        rows = []
        for bucket, key, value in puts:
            _check_names(bucket, key)
            rows.append((bucket, key, _encode(bucket, key, value)))  # encode before any I/O
        for bucket, key in deletes:
            _check_names(bucket, key)
        await self._write_encoded(rows, list(deletes))

    async def _write_encoded(self, rows: Sequence[tuple[str, str, bytes]],
                             deletes: Sequence[tuple[str, str]]) -> None:
        """One transaction of already checked and encoded rows, and deletes."""
        def apply(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT, rows)
                conn.executemany("DELETE FROM kv WHERE bucket = ? AND key = ?", deletes)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(apply)

    async def get(self, bucket: str, key: str) -> Any | None:
        _check_names(bucket, key)
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT value FROM kv WHERE bucket = ? AND key = ?", (bucket, key)
            ).fetchone()
        )
        return None if row is None else _decode(bucket, key, row[0])

    async def delete(self, bucket: str, key: str) -> None:
        _check_names(bucket, key)
        await self._run(
            lambda conn: conn.execute("DELETE FROM kv WHERE bucket = ? AND key = ?", (bucket, key))
        )

    async def delete_prefix(self, bucket: str, key_prefix: str) -> None:
        _check_names(bucket, key_prefix, "key_prefix")
        # substr() rather than LIKE so that '%' and '_' in keys are not wildcards.
        await self._run(
            lambda conn: conn.execute(
                "DELETE FROM kv WHERE bucket = ? AND substr(key, 1, ?) = ?",
                (bucket, len(key_prefix), key_prefix),
            )
        )

    async def items(self, bucket: str) -> list[tuple[str, Any]]:
        _check_names(bucket, "")
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT key, value FROM kv WHERE bucket = ? ORDER BY key", (bucket,)
            ).fetchall()
        )
        return [(key, _decode(bucket, key, blob)) for key, blob in rows]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            # Queued behind any calls already submitted, so they finish first.
            await loop.run_in_executor(self._executor, self._conn.close)
        finally:
            # The worker is idle now; joining it off-loop keeps the event loop free.
            await asyncio.to_thread(self._executor.shutdown, True)

    async def __aenter__(self) -> StateDB:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class CoalescingWriter:
    """Group commit of puts to one :class:`StateDB`.

    :meth:`put` returns once its value is on disk, as ``StateDB.put`` does, but every put
    that arrives while a transaction is being written waits for the next one, which holds
    them all (the latest value of a key wins). So the cost is a transaction per burst, not
    per put, and nothing is acknowledged before it is durable. Deletes made directly on the
    database must :meth:`flush` first, so a put queued earlier cannot land after them.
    """

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self._pending: dict[tuple[str, str], bytes] = {}
        self._next_commit: asyncio.Future[None] | None = None  # what pending puts wait for
        self._flusher: asyncio.Task[None] | None = None
        self.transactions = 0  # how many have been written (for tests and metrics)

    async def put(self, bucket: str, key: str, value: Any) -> None:
        _check_names(bucket, key)
        # Encoded now: a bad value fails its own caller only, and later changes to the
        # caller's object cannot leak into the write.
        self._pending[bucket, key] = _encode(bucket, key, value)
        commit = self._commit_for_pending()
        # Shielded: a caller cancelled while waiting must not cancel the others' commit.
        await asyncio.shield(commit)

    async def flush(self) -> None:
        """Return once everything put so far is on disk (or its write has failed)."""
        flusher = self._flusher
        if flusher is not None:
            await asyncio.shield(flusher)

    async def close(self) -> None:
        """Write everything pending (the database stays open: its owner closes it)."""
        await self.flush()

    def _commit_for_pending(self) -> asyncio.Future[None]:
        if self._next_commit is None:
            self._next_commit = asyncio.get_running_loop().create_future()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="state-db-writes")
        return self._next_commit

    async def _flush_all(self) -> None:
        # Runs while there is something to write, then ends; it is owned through
        # self._flusher and awaited by flush/close.
        while self._pending:
            rows = [(bucket, key, blob) for (bucket, key), blob in self._pending.items()]
            commit, self._pending, self._next_commit = self._next_commit, {}, None
            assert commit is not None
            try:
                await self._db._write_encoded(rows, [])
            except Exception as exc:
                _fail(commit, exc)
                continue
            except BaseException:
                # Cancelled (the loop is going away): no later write will come either, so
                # every caller still waiting is told rather than left hanging.
                cancelled = StateDBError(f"state database {self._db.path}: write cancelled")
                for waiting in (commit, self._next_commit):
                    if waiting is not None:
                        _fail(waiting, cancelled)
                self._pending, self._next_commit = {}, None
                raise
            self.transactions += 1
            commit.set_result(None)


def _fail(future: asyncio.Future[None], exc: Exception) -> None:
    future.set_exception(exc)
    future.exception()  # its callers see it; never "exception was never retrieved"
