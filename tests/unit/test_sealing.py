"""Secrets at rest: credential fields of server records never reach the state file in the
clear, open again on restore, are bound to their row, and older files are sealed on load."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nomad_client.server.keyring import KeyringError
from nomad_client.server.sealing import DATA_KEY_FILE, Sealer, SealError, is_sealed
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB
from nomad_client.structs.codec import to_rpc
from nomad_client.structs.models import ACLToken
from tests.unit.factories import node

SECRET = "3f0b8a0e-6c1d-4a8f-9b7e-2d5c1e4f6a70"
NODE_SECRET = "9d2c7b1a-0e4f-4c3b-8a6d-5f1e2b3c4d5e"


def token(secret: str = SECRET) -> ACLToken:
    return ACLToken(accessor_id="acc-1", secret_id=secret, name="ops", type="management")


def file_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file())


async def test_data_key_is_created_private_and_reloaded(tmp_path: Path) -> None:
    first = await Sealer.load_or_create(tmp_path / "kr")
    st = os.stat(tmp_path / "kr" / DATA_KEY_FILE)
    assert stat.S_IMODE(st.st_mode) == 0o600
    again = await Sealer.load_or_create(tmp_path / "kr")
    assert again.key_id == first.key_id
    assert again.unseal(first.seal("x", "ctx"), "ctx") == "x"


async def test_corrupt_data_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    kr = tmp_path / "kr"
    await Sealer.load_or_create(kr)
    (kr / DATA_KEY_FILE).write_text('{"key_id": "not-a-uuid", "key": "c2VjcmV0"}')
    os.chmod(kr / DATA_KEY_FILE, 0o600)
    with pytest.raises(KeyringError, match="corrupt data key") as err:
        await Sealer.load_or_create(kr)
    assert "c2VjcmV0" not in str(err.value)


def test_sealed_value_is_bound_to_its_row_and_key() -> None:
    sealer = Sealer("00000000-0000-4000-8000-000000000001", bytes(32))
    sealed = sealer.seal(SECRET, "acl_tokens/a/SecretID")
    assert SECRET not in sealed and is_sealed(sealed)
    assert sealer.unseal(sealed, "acl_tokens/a/SecretID") == SECRET
    with pytest.raises(SealError):
        sealer.unseal(sealed, "acl_tokens/b/SecretID")  # copied into another row
    other = Sealer("00000000-0000-4000-8000-000000000002", bytes(32))
    with pytest.raises(SealError, match="unknown data key"):
        other.unseal(sealed, "acl_tokens/a/SecretID")
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SealError):
        sealer.unseal(tampered, "acl_tokens/a/SecretID")


async def test_state_file_never_holds_secrets_and_restore_opens_them(tmp_path: Path) -> None:
    sealer = await Sealer.load_or_create(tmp_path / "kr")
    db = await StateDB.open(tmp_path / "server" / "state.db")
    store = StateStore(db, sealer)
    await store.write({"acl_tokens": [("acc-1", token())],
                       "nodes": [("n1", node(secret_id=NODE_SECRET))]})
    assert store.get("acl_tokens", "acc-1").secret_id == SECRET  # in memory: in the clear
    await db.close()
    on_disk = file_bytes(tmp_path / "server")
    assert SECRET.encode() not in on_disk and NODE_SECRET.encode() not in on_disk
    db = await StateDB.open(tmp_path / "server" / "state.db")
    restored = await StateStore.restore(db, sealer)
    await db.close()
    assert restored.get("acl_tokens", "acc-1") == store.get("acl_tokens", "acc-1")
    assert restored.get("nodes", "n1").secret_id == NODE_SECRET


async def test_a_state_file_from_before_sealing_is_sealed_on_load(tmp_path: Path) -> None:
    db = await StateDB.open(tmp_path / "server" / "state.db")
    await db.put("table/acl_tokens", "acc-1", to_rpc(token()))  # as older agents wrote it
    await db.close()
    sealer = await Sealer.load_or_create(tmp_path / "kr")
    db = await StateDB.open(tmp_path / "server" / "state.db")
    restored = await StateStore.restore(db, sealer)
    raw = await db.get("table/acl_tokens", "acc-1")
    await db.close()
    assert restored.get("acl_tokens", "acc-1").secret_id == SECRET
    assert is_sealed(raw["SecretID"])
    assert SECRET.encode() not in file_bytes(tmp_path / "server")


def test_a_persisted_store_requires_a_sealer() -> None:
    with pytest.raises(ValueError, match="sealer"):
        StateStore(object())  # type: ignore[arg-type]
