"""Secrets at rest: the credential fields of server records (ACL token and node secret IDs)
are sealed with AES-256-GCM under the active root key's data key before they reach the state
file, and unsealed when the state is loaded. The in-memory store keeps them in the clear, so
the request path pays nothing. Other values may be sealed in memory too (variables' items).

The data keys are the keyring's (``Keyring``: one per root key, kept with the signing keys).
A sealed value names the key that sealed it, so it opens with any key still held, and is
bound to a context (its row, see ``field_context``/``row_context``), so a sealed secret
copied into another row does not open there.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nomad_client.server.keyring import DATA_KEY_BYTES, KEY_FILE, Keyring, KeyringError

# The data keys are held with the signing keys: one file of key pairs.
DATA_KEY_FILE = KEY_FILE
SEALED_PREFIX = "sealed:v1:"
_NONCE_BYTES = 12

# table -> the fields of its records (RPC form) that are credentials.
SECRET_FIELDS: Mapping[str, tuple[str, ...]] = {
    "acl_tokens": ("SecretID",),
    "nodes": ("SecretID",),
}


class SealError(KeyringError):
    """A sealed value could not be opened (unknown key, tampered, or not ours): the agent
    refuses to start on such a state rather than drop the record."""


class DataKeys(Protocol):
    """Where a sealer finds its keys (``Keyring``): the active one, and any by ID."""

    def active_data_key(self) -> tuple[str, bytes]: ...

    def data_key(self, key_id: str) -> bytes | None: ...


@attrs.frozen
class _OneKey:
    key_id: str
    key: bytes = attrs.field(repr=False)

    def active_data_key(self) -> tuple[str, bytes]:
        return self.key_id, self.key

    def data_key(self, key_id: str) -> bytes | None:
        return self.key if key_id == self.key_id else None


def field_context(table: str, key: str, field: str) -> str:
    """What a credential field is bound to: its table, row and field."""
    return f"{table}/{key}/{field}"


def row_context(table: str, key: str) -> str:
    """What a value sealed inside an in-memory record is bound to: its table and row. The
    store re-seals such values (``StateStore.reseal``) under this context."""
    return f"{table}/{key}"


class Sealer:
    """Seals with the active data key and opens with whichever key a value names.

    ``Sealer(key_id, key)`` holds one fixed key; ``Sealer.for_keyring(keyring)`` follows the
    keyring through its rotations."""

    def __init__(self, key_id: str, key: bytes) -> None:
        if len(key) != DATA_KEY_BYTES:
            raise ValueError("the data key must be 32 bytes")
        self._bind(_OneKey(key_id, key))

    @classmethod
    def for_keyring(cls, keys: DataKeys) -> Sealer:
        sealer = cls.__new__(cls)
        sealer._bind(keys)
        return sealer

    @classmethod
    async def load_or_create(cls, keyring_dir: Path) -> Sealer:
        return cls.for_keyring(await Keyring.load_or_create(keyring_dir))

    def _bind(self, keys: DataKeys) -> None:
        self._keys = keys
        # key ID -> cipher; a key ID always names the same bytes, so entries never go stale.
        self._ciphers: dict[str, AESGCM] = {}

    @property
    def key_id(self) -> str:
        """The ID of the key ``seal`` uses now."""
        return self._keys.active_data_key()[0]

    def seal(self, plaintext: str, context: str) -> str:
        key_id, key = self._keys.active_data_key()
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._cipher(key_id, key).encrypt(nonce, plaintext.encode(), context.encode())
        return f"{SEALED_PREFIX}{key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def unseal(self, value: str, context: str) -> str:
        if not is_sealed(value):
            raise SealError("value is not sealed")
        key_id, _, blob = value[len(SEALED_PREFIX):].partition(":")
        key = self._keys.data_key(key_id)
        if key is None:
            raise SealError(f"sealed with unknown data key {key_id!r}")
        try:
            raw = base64.b64decode(blob, validate=True)
            return self._cipher(key_id, key).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:],
                                                     context.encode()).decode()
        except (binascii.Error, InvalidTag, ValueError):
            raise SealError("sealed value does not open with the data key") from None

    def is_stale(self, value: Any) -> bool:
        """Whether ``value`` is sealed with a key other than the active one."""
        return is_sealed(value) and sealed_key_id(value) != self.key_id

    def reseal(self, value: str, context: str) -> str:
        """``value`` sealed again with the active key (a full rotation)."""
        return self.seal(self.unseal(value, context), context)

    def _cipher(self, key_id: str, key: bytes) -> AESGCM:
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            cipher = self._ciphers[key_id] = AESGCM(key)
        return cipher


def is_sealed(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def sealed_key_id(value: str) -> str:
    """The ID of the key a sealed value names."""
    return value[len(SEALED_PREFIX):].partition(":")[0]


def seal_record(sealer: Sealer, table: str, key: str, record: Any) -> Any:
    """``record`` (RPC form) as it may be written to disk."""
    fields = SECRET_FIELDS.get(table)
    if not fields or not isinstance(record, dict):
        return record
    out = dict(record)
    for name in fields:
        value = out.get(name)
        if isinstance(value, str) and value and not is_sealed(value):
            out[name] = sealer.seal(value, field_context(table, key, name))
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
            out[name] = sealer.unseal(value, field_context(table, key, name))
        elif isinstance(value, str) and value:
            plain = True
    return out, plain
