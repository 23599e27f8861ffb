"""Secrets at rest: the credential fields of server records (ACL token and node secret IDs)
are sealed with AES-256-GCM under the server's data key before they reach the state file,
and unsealed when the state is loaded. The in-memory store keeps them in the clear, so the
request path pays nothing.

The data key lives beside the signing key in the keyring directory (0700, a 0600 file). A
sealed value names the key that sealed it and is bound to its row (table and key are the
associated data), so a sealed secret copied into another row does not open there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import secrets
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nomad_client import safefs
from nomad_client.server.keyring import KeyringError

DATA_KEY_FILE = "data_key.json"
SEALED_PREFIX = "sealed:v1:"
_NONCE_BYTES = 12

# table -> the fields of its records (RPC form) that are credentials.
SECRET_FIELDS: Mapping[str, tuple[str, ...]] = {
    "acl_tokens": ("SecretID",),
    "nodes": ("SecretID",),
}


class SealError(KeyringError):
    """A sealed value could not be opened (wrong key, tampered, or not ours): the agent
    refuses to start on such a state rather than drop the record."""


class Sealer:
    """Seals and opens short secrets under one AES-256-GCM data key."""

    def __init__(self, key_id: str, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the data key must be 32 bytes")
        self.key_id = key_id
        self._aead = AESGCM(key)

    @classmethod
    async def load_or_create(cls, keyring_dir: Path) -> Sealer:
        return await asyncio.to_thread(cls._load_or_create_sync, Path(keyring_dir))

    @classmethod
    def _load_or_create_sync(cls, keyring_dir: Path) -> Sealer:
        path = keyring_dir / DATA_KEY_FILE
        try:
            safefs.ensure_private_dir(keyring_dir)
            if not os.path.lexists(path):
                key_id, key = str(uuid.uuid4()), AESGCM.generate_key(bit_length=256)
                record = {"key_id": key_id, "key": base64.b64encode(key).decode()}
                safefs.write_private_file_in(keyring_dir, DATA_KEY_FILE,
                                             json.dumps(record).encode())
                return cls(key_id, key)
            raw = safefs.read_private_file(path)
        except OSError as exc:  # refused (a symlink, a mode others can read) or failed
            raise KeyringError(f"{exc.filename or path}: {exc.strerror or exc}") from None
        try:
            record = json.loads(raw)
            return cls(str(uuid.UUID(record["key_id"])),
                       base64.b64decode(record["key"], validate=True))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise KeyringError(f"{path}: corrupt data key ({type(exc).__name__})") from None

    def seal(self, plaintext: str, context: str) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{SEALED_PREFIX}{self.key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def unseal(self, value: str, context: str) -> str:
        if not is_sealed(value):
            raise SealError("value is not sealed")
        key_id, _, blob = value[len(SEALED_PREFIX):].partition(":")
        if key_id != self.key_id:
            raise SealError(f"sealed with unknown data key {key_id!r}")
        try:
            raw = base64.b64decode(blob, validate=True)
            return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:],
                                      context.encode()).decode()
        except (binascii.Error, InvalidTag, ValueError):
            raise SealError("sealed value does not open with the data key") from None


def is_sealed(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def seal_record(sealer: Sealer, table: str, key: str, record: Any) -> Any:
    """``record`` (RPC form) as it may be written to disk."""
    fields = SECRET_FIELDS.get(table)
    if not fields or not isinstance(record, dict):
        return record
    out = dict(record)
    for name in fields:
        value = out.get(name)
        if isinstance(value, str) and value and not is_sealed(value):
            out[name] = sealer.seal(value, f"{table}/{key}/{name}")
    return out


def unseal_record(sealer: Sealer, table: str, key: str, record: Any) -> tuple[Any, bool]:
    """``record`` as read from disk, opened; and whether it held a secret in the clear (a
    state file written before sealing existed: the caller rewrites it sealed)."""
    fields = SECRET_FIELDS.get(table)
    if not fields or not isinstance(record, dict):
        return record, False
    out = dict(record)
    plain = False
    for name in fields:
        value = out.get(name)
        if is_sealed(value):
            out[name] = sealer.unseal(value, f"{table}/{key}/{name}")
        elif isinstance(value, str) and value:
            plain = True
    return out, plain
