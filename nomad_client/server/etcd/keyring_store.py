"""The root keyring shared by a cluster's servers through etcd, its key material sealed with
the key-encryption key (KEK) every server reads from the same file.

Layout under the cluster's prefix:

- ``keyring/<key id>``: one row per root key, msgpack ``{meta..., "sealed": blob}``. The meta
  (ID, state, create time, algorithm, public key fingerprint) is in the clear; the blob is the
  KEK-sealed msgpack of the data key and the signing key's PEM, bound to the key's ID.
- ``keyring-init``: the ring's marker, msgpack ``{"active": id, "keys": [ids, oldest
  first]}``. Its presence says the ring exists (two servers starting together race on
  creating it, and one wins); its mod revision is the ring's version, which every change
  compares, so two servers rotating together cannot lose one another's key.

Every change is one transaction (rows put, rows of keys gone deleted, marker put). Each server
watches the prefix and takes over a ring another server stored, so all of them sign and verify
with the same keys and serve the same JWKS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

import msgpack

from nomad_client.server.etcd.client import (
    Compacted,
    EtcdClient,
    EtcdError,
    WatchEvent,
    absent,
    mod_revision_equals,
    op_delete,
    op_put,
)
from nomad_client.server.etcd.kek import KEK_BYTES, KEKError, open_, seal
from nomad_client.server.keyring import (
    DATA_KEY_ALGORITHM,
    DATA_KEY_BYTES,
    Keyring,
    KeyringConflict,
    KeyringError,
    KeyState,
    RootKey,
    load_signing_key,
    public_fingerprint,
    signing_key_pem,
)

__all__ = ["EtcdKeyStore"]

log = logging.getLogger(__name__)

# What a sealed blob is bound to besides its key's ID: a blob is never mistaken for another
# kind of KEK-sealed value.
_AAD_LABEL = b"nomad root key "
# Backoff of the watch after etcd failed it (the client already retries connection losses).
_RETRY_MIN, _RETRY_MAX = 0.5, 10.0


class EtcdKeyStore:
    """A ``KeyStore`` in etcd. ``watch(keyring)`` keeps ``keyring`` on the stored ring;
    ``close`` stops that."""

    def __init__(self, client: EtcdClient, kek: bytes, *,
                 kek_file: str = "the key-encryption key file") -> None:
        if len(kek) != KEK_BYTES:
            raise ValueError(f"a key-encryption key is {KEK_BYTES} bytes, got {len(kek)}")
        self._client = client
        self._kek = kek
        # Named in errors, so an operator knows which file to compare between servers.
        self._kek_file = kek_file
        self._prefix = client.key("keyring")
        self._rows = client.key("keyring", "")
        self._marker = client.key("keyring-init")
        # The marker's mod revision in the ring last returned or written (0: none yet), the IDs
        # it held (their rows are deleted when a change drops them), the newest revision seen.
        self._version = 0
        self._ids: tuple[str, ...] = ()
        self._seen = 0
        self._watch_task: asyncio.Task[None] | None = None
        self._delay = _RETRY_MIN
        # A reload by the watch never overlaps a save: it could read the ring from before the
        # save and install it after the keyring installed the saved one, or install a ring
        # newer than the save's just before the keyring replaces it with the saved one.
        self._exclusive = asyncio.Lock()

    # ------------------------------------------------------------------ KeyStore

    async def load(self) -> list[RootKey] | None:
        rows, revision = await self._client.get_prefix(self._prefix)
        marker = next((kv for kv in rows if kv.key == self._marker), None)
        self._seen = max(self._seen, revision)
        if marker is None:
            return None
        records = {kv.key[len(self._rows):]: kv.value for kv in rows
                   if kv.key.startswith(self._rows)}
        # A worker thread: opening the blobs and loading RSA keys is CPU work.
        keys = await asyncio.to_thread(self._decode_ring, marker.value, records)
        # The version the next save compares is the one of the ring returned last (even if a
        # newer one was seen meanwhile): a change built on an older ring then conflicts.
        self._version, self._ids = marker.mod_revision, tuple(k.key_id for k in keys)
        return keys

    async def save(self, keys: Sequence[RootKey], *, new_ring: bool) -> None:
        # Taken before the first await: ``keys`` were derived from the ring the keyring holds,
        # whose version this is (load and adopt, save and install, happen without an await
        # in between). Read later, a reload by the watch meanwhile could let a change built on
        # an older ring overwrite a newer one.
        version, stored_ids = self._version, self._ids
        if not new_ring and not version:
            raise KeyringError("cannot change a keyring that was never loaded")
        rows = await asyncio.to_thread(lambda: [(k.key_id, self._encode_key(k)) for k in keys])
        ids = tuple(key_id for key_id, _ in rows)
        active = next(k.key_id for k in keys if k.state is KeyState.ACTIVE)
        marker = msgpack.packb({"active": active, "keys": list(ids)})
        ops = [op_put(self._row(key_id), value) for key_id, value in rows]
        ops += [op_delete(self._row(key_id)) for key_id in stored_ids if key_id not in ids]
        ops.append(op_put(self._marker, marker))
        compare = (absent(self._marker) if new_ring
                   else mod_revision_equals(self._marker, version))
        async with self._exclusive:
            result = await self._client.txn([compare], ops, [])
            if not result.succeeded:
                raise KeyringConflict("another server created the keyring first" if new_ring
                                      else "another server changed the keyring first")
            self._version, self._ids = result.revision, ids
            self._seen = max(self._seen, result.revision)

    # ------------------------------------------------------------------ following others

    def watch(self, keyring: Keyring) -> None:
        """Keep ``keyring`` on the ring stored in etcd, from the revision last read on."""
        if self._watch_task is not None:
            raise RuntimeError("this keyring store is already watched")
        self._watch_task = asyncio.get_running_loop().create_task(
            self._follow(keyring), name="keyring-watch")

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # Ours unless the caller of close is itself being cancelled.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def refresh(self, keyring: Keyring) -> None:
        """Read the stored ring now and hold it: for a server that met a key ID it does not
        know yet (a value sealed elsewhere right after a rotation the watch has not brought)."""
        await self._reload(keyring)

    async def _follow(self, keyring: Keyring) -> None:
        while True:
            try:
                try:
                    await self._follow_from(keyring, self._seen + 1)
                except Compacted:
                    # Changes were missed: read the whole ring again, and watch on from there.
                    await self._reload(keyring)
                    continue
            except (EtcdError, KeyringError) as exc:
                log.warning("keyring: following the shared keyring failed, retrying in "
                            "%.1fs: %s", self._delay, exc)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, _RETRY_MAX)

    async def _follow_from(self, keyring: Keyring, start: int) -> None:
        # aclosing: the stream ends here even when cancelled while a reload runs.
        # (The client's stream is an async generator; its annotation only says iterator.)
        watch = cast(AsyncGenerator[tuple[int, list[WatchEvent]], None],
                     self._client.watch_prefix(self._prefix, start))
        async with contextlib.aclosing(watch) as stream:
            async for revision, events in stream:
                # Our own saves come back too: the marker's revision is then the one we wrote.
                if any(e.kind == "put" and e.kv.key == self._marker
                       and e.kv.mod_revision > self._version for e in events):
                    await self._reload(keyring)
                # Only now: a reload that failed is tried again from the same revision.
                self._seen = max(self._seen, revision)
                self._delay = _RETRY_MIN

    async def _reload(self, keyring: Keyring) -> None:
        async with self._exclusive:
            keys = await self.load()
            if keys is not None:
                keyring.adopt(keys)
            log.info("keyring: took over the keyring another server stored (active key %s)",
                     keyring.key_id)

    # ------------------------------------------------------------------ records

    def _row(self, key_id: str) -> bytes:
        return self._rows + key_id.encode("ascii")

    def _encode_key(self, key: RootKey) -> bytes:
        material = msgpack.packb({"data_key": key.data_key,
                                  "signing_key": signing_key_pem(key)})
        record: dict[str, Any] = {
            "id": key.key_id,
            "state": str(key.state),
            "create_time": key.create_time,
            "algorithm": DATA_KEY_ALGORITHM,
            "public_key_sha256": public_fingerprint(key.private_key.public_key()),
            "sealed": seal(self._kek, material, _aad(key.key_id)),
        }
        if key.legacy_data_key_id:
            record["legacy_data_key_id"] = key.legacy_data_key_id
        return msgpack.packb(record)

    def _decode_ring(self, marker: bytes, records: dict[bytes, bytes]) -> list[RootKey]:
        try:
            ring = _unpack(marker)
            ids = [str(uuid.UUID(i)) for i in ring["keys"]]
            active = str(uuid.UUID(ring["active"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyringError(f"keyring marker in etcd is corrupt ({type(exc).__name__})"
                               ) from None
        keys = []
        for key_id in ids:
            value = records.get(key_id.encode("ascii"))
            if value is None:
                raise KeyringError(f"keyring key {key_id} is listed but missing in etcd")
            keys.append(self._decode_key(key_id, value))
        if [k.key_id for k in keys if k.state is KeyState.ACTIVE] != [active]:
            raise KeyringError("keyring in etcd is corrupt: exactly one key, the one its "
                               "marker names, must be active")
        return keys

    def _decode_key(self, key_id: str, value: bytes) -> RootKey:
        try:
            record = _unpack(value)
            if record["id"] != key_id or record["algorithm"] != DATA_KEY_ALGORITHM:
                raise ValueError("wrong ID or algorithm")
            state = KeyState(record["state"])
            create_time = record["create_time"]
            if not isinstance(create_time, int | float) or isinstance(create_time, bool):
                raise TypeError("create time")
            sealed, fingerprint = record["sealed"], record["public_key_sha256"]
            legacy = record.get("legacy_data_key_id")
            legacy = str(uuid.UUID(legacy)) if legacy is not None else None
            if not isinstance(sealed, bytes) or not isinstance(fingerprint, str):
                raise TypeError("sealed or fingerprint")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The type only: a message could quote the record.
            raise KeyringError(f"keyring key {key_id} in etcd is corrupt "
                               f"({type(exc).__name__})") from None
        try:
            material = _unpack(open_(self._kek, sealed, _aad(key_id)))
        except KEKError:
            raise KeyringError(f"keyring key {key_id} cannot be opened with the "
                               f"key-encryption key in {self._kek_file}: is it the same file "
                               f"on every server?") from None
        except (ValueError, TypeError):
            raise KeyringError(f"keyring key {key_id} in etcd is corrupt (sealed material)"
                               ) from None
        data_key, pem = material.get("data_key"), material.get("signing_key")
        if not isinstance(data_key, bytes) or len(data_key) != DATA_KEY_BYTES or \
                not isinstance(pem, bytes):
            raise KeyringError(f"keyring key {key_id} in etcd is corrupt (sealed material)")
        private_key = load_signing_key(f"keyring key {key_id}", pem)
        if public_fingerprint(private_key.public_key()) != fingerprint:
            raise KeyringError(f"keyring key {key_id} in etcd does not match its recorded "
                               f"public key")
        return RootKey(key_id=key_id, create_time=float(create_time), state=state,
                       private_key=private_key, data_key=data_key,
                       legacy_data_key_id=legacy)


def _aad(key_id: str) -> bytes:
    return _AAD_LABEL + key_id.encode("ascii")


def _unpack(data: bytes) -> dict[str, Any]:
    """A msgpack map from etcd, bounded: the value is another process's writing."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            UnicodeDecodeError) as exc:
        raise ValueError(type(exc).__name__) from None
    if not isinstance(value, dict):
        raise TypeError("not a map")
    return value
