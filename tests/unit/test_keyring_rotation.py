"""Root key rotation: several signing and data keys held at once, the files of a single-key
agent migrated with their IDs, full rotation re-sealing the state, the
``/v1/operator/keyring/*`` endpoints and the ``operator root keyring`` commands."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from nomad_client.cli.main import main
from nomad_client.server.keyring import (
    KEY_FILE,
    LEGACY_DATA_KEY_FILE,
    LEGACY_KEY_FILE,
    LEGACY_META_FILE,
    META_FILE,
    IdentityError,
    IdentityVerifier,
    Keyring,
    KeyState,
)
from nomad_client.server.sealing import Sealer, is_sealed, row_context
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB
from nomad_client.structs.models import TOKEN_CLIENT, ACLPolicy, ACLToken
from tests.unit.factories import make_server, serve_api

ALLOC = "5c63a1f0-0000-4000-8000-000000000001"
SECRET = "3f0b8a0e-6c1d-4a8f-9b7e-2d5c1e4f6a70"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
Capsys = pytest.CaptureFixture[str]


def sign(keyring: Keyring, **kw: Any) -> str:
    return keyring.sign_identity(namespace="default", job_id="web", alloc_id=ALLOC, task="t",
                                 group="g", region="global", **kw)


def kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs256(key: rsa.RSAPrivateKey, key_id: str, claims: dict[str, Any]) -> str:
    """A token as the single-key agent signed it."""
    header = {"alg": "RS256", "kid": key_id, "typ": "JWT"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def state_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file())


# ---- the keyring -------------------------------------------------------------------------
async def test_rotation_signs_with_the_new_key_and_keeps_verifying_the_old(tmp_path: Path
                                                                           ) -> None:
    keyring = await Keyring.load_or_create(tmp_path / "kr")
    verifier = IdentityVerifier(keyring)
    old_id = keyring.key_id
    old_token = sign(keyring, ttl_seconds=60)
    new = await keyring.rotate()
    assert keyring.key_id == new.key_id != old_id
    new_token = sign(keyring, ttl_seconds=60)
    assert (kid(old_token), kid(new_token)) == (old_id, new.key_id)
    assert verifier.verify(old_token).alloc_id == verifier.verify(new_token).alloc_id == ALLOC
    assert [k["kid"] for k in keyring.jwks()["keys"]] == [old_id, new.key_id]
    assert {k.key_id: k.state for k in keyring.keys()} == {old_id: KeyState.INACTIVE,
                                                          new.key_id: KeyState.ACTIVE}
    # An old key's tokens still end when they expire.
    with pytest.raises(IdentityError, match="expired"):
        keyring.verify(old_token, now=keyring.keys()[0].create_time + 3600)

    again = await Keyring.load_or_create(tmp_path / "kr")  # the rotation is on disk
    assert again.key_id == new.key_id and again.jwks() == keyring.jwks()
    assert again.verify(old_token).alloc_id == ALLOC
    assert sorted(os.listdir(tmp_path / "kr")) == sorted([KEY_FILE, META_FILE])
    for name in (KEY_FILE, META_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / "kr" / name).st_mode) == 0o600


async def test_values_sealed_before_a_rotation_still_open(tmp_path: Path) -> None:
    keyring = await Keyring.load_or_create(tmp_path / "kr")
    sealer = Sealer.for_keyring(keyring)
    before = sealer.seal("s3cret", "ctx")
    old_id = sealer.key_id
    await keyring.rotate()
    after = sealer.seal("s3cret", "ctx")
    assert sealer.key_id == keyring.key_id != old_id
    assert f":{old_id}:" in before and f":{keyring.key_id}:" in after
    assert sealer.unseal(before, "ctx") == sealer.unseal(after, "ctx") == "s3cret"
    reloaded = await Sealer.load_or_create(tmp_path / "kr")
    assert reloaded.unseal(before, "ctx") == "s3cret"


def write_legacy_dir(directory: Path) -> tuple[str, str, rsa.RSAPrivateKey, bytes]:
    """The files a single-key agent wrote: a signing key with its metadata, a data key."""
    directory.mkdir(mode=0o700)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signing_id, data_id, data_key = str(uuid.uuid4()), str(uuid.uuid4()), os.urandom(32)
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    files = {
        LEGACY_KEY_FILE: private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()),
        LEGACY_META_FILE: json.dumps({"key_id": signing_id, "algorithm": "RS256",
                                      "create_time": 1_700_000_000.5,
                                      "public_key_sha256": hashlib.sha256(der).hexdigest()
                                      }).encode(),
        LEGACY_DATA_KEY_FILE: json.dumps({"key_id": data_id,
                                          "key": base64.b64encode(data_key).decode()}).encode(),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        os.chmod(directory / name, 0o600)
    return signing_id, data_id, private_key, data_key


async def test_a_single_key_dir_is_migrated_keeping_its_ids(tmp_path: Path) -> None:
    signing_id, data_id, private_key, data_key = write_legacy_dir(tmp_path / "kr")
    old_sealed = Sealer(data_id, data_key).seal("s3cret", "acl_tokens/a/SecretID")
    token = rs256(private_key, signing_id, {
        "nomad_namespace": "default", "nomad_job_id": "web", "nomad_allocation_id": ALLOC,
        "nomad_task": "t", "sub": "global:default:web:g:t:default", "aud": "nomadproject.io",
        "iat": int(time.time()), "nbf": int(time.time()), "jti": str(uuid.uuid4())})

    keyring = await Keyring.load_or_create(tmp_path / "kr")
    assert keyring.key_id == signing_id and keyring.create_time == 1_700_000_000.5
    assert keyring.verify(token).alloc_id == ALLOC
    assert Sealer.for_keyring(keyring).unseal(old_sealed, "acl_tokens/a/SecretID") == "s3cret"
    assert sorted(os.listdir(tmp_path / "kr")) == sorted([KEY_FILE, META_FILE])
    again = await Keyring.load_or_create(tmp_path / "kr")  # and it stays so
    assert again.key_id == signing_id and again.data_key(data_id) == data_key


# ---- full rotation re-seals the state ---------------------------------------------------
async def test_full_rotation_reseals_every_sealed_value(tmp_path: Path) -> None:
    keyring = await Keyring.load_or_create(tmp_path / "kr")
    sealer = Sealer.for_keyring(keyring)
    old_id = keyring.key_id
    db = await StateDB.open(tmp_path / "server" / "state.db")
    store = StateStore(db, sealer)
    # A row holding a value sealed in memory (as a variable's items are), bound to its row.
    sealed_row = {"ID": "v", "Data": sealer.seal("items", row_context("jobs", "v")),
                  "KeyID": old_id}
    token = ACLToken(accessor_id="acc-1", secret_id=SECRET, name="ops", type="management")
    await store.write({"acl_tokens": [("acc-1", token)], "jobs": [("v", sealed_row)]})
    assert old_id.encode() in state_bytes(tmp_path / "server")

    await keyring.rotate(full=True)
    assert keyring.rekeying
    index = await store.reseal()
    await keyring.finish_rekeying()
    assert not keyring.rekeying
    row = store.get("jobs", "v")
    assert row["KeyID"] == keyring.key_id and row["ModifyIndex"] == index
    assert sealer.unseal(row["Data"], row_context("jobs", "v")) == "items"
    assert store.get("acl_tokens", "acc-1").modify_index < index  # disk form only
    await db.close()
    on_disk = state_bytes(tmp_path / "server")
    assert old_id.encode() not in on_disk and SECRET.encode() not in on_disk

    db = await StateDB.open(tmp_path / "server" / "state.db")
    restored = await StateStore.restore(db, Sealer.for_keyring(keyring))
    raw = await db.get("table/acl_tokens", "acc-1")
    await db.close()
    assert restored.get("acl_tokens", "acc-1").secret_id == SECRET
    assert is_sealed(raw["SecretID"]) and f":{keyring.key_id}:" in raw["SecretID"]


# ---- the endpoints --------------------------------------------------------------------
OPERATOR_READ = 'operator {\n  policy = "read"\n}\n'


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Any, aiohttp.ClientSession, Any]]:
    """An ACL-enabled server on a fresh keyring whose store is on disk, its API, a session,
    and secrets: management and an operator-read client token."""
    keyring = await Keyring.load_or_create(tmp_path / "kr")
    db = await StateDB.open(tmp_path / "server" / "state.db")
    server = make_server(keyring, acl=True, store=StateStore(db, Sealer.for_keyring(keyring)))
    api = await serve_api(server)
    management = await server.acls.bootstrap()
    await server.acls.upsert_policy(ACLPolicy(name="op-read", rules=OPERATOR_READ))
    reader = await server.acls.upsert_token(
        ACLToken(accessor_id="", secret_id="", name="r", type=TOKEN_CLIENT,
                 policies=("op-read",)), [])
    try:
        async with aiohttp.ClientSession() as session:
            yield api, session, {"management": management.secret_id,
                                 "reader": reader.secret_id, "server": server}
    finally:
        await api.close()
        await db.close()


async def call(served: Any, method: str, path: str, who: str = "") -> tuple[int, Any]:
    api, session, secrets = served
    headers = {"X-Nomad-Token": secrets[who]} if who else {}
    async with session.request(method, api.url + path, headers=headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else text


async def test_keys_and_rotate_have_nomads_shapes(served: Any) -> None:
    status, keys = await call(served, "GET", "/v1/operator/keyring/keys", "management")
    assert status == 200 and len(keys) == 1
    assert set(keys[0]) == {"KeyID", "Algorithm", "CreateTime", "CreateIndex", "ModifyIndex",
                            "State", "PublishTime"}
    assert keys[0]["Algorithm"] == "aes256-gcm" and keys[0]["State"] == "active"
    assert isinstance(keys[0]["CreateTime"], int) and keys[0]["CreateTime"] > 10**18
    old_id = keys[0]["KeyID"]

    status, answer = await call(served, "PUT", "/v1/operator/keyring/rotate?full=true",
                                "management")
    assert status == 200 and set(answer) == {"Key", "Index"}
    assert answer["Key"]["State"] == "active" and answer["Key"]["KeyID"] != old_id
    _, keys = await call(served, "GET", "/v1/operator/keyring/keys", "management")
    assert {k["KeyID"]: k["State"] for k in keys} == {old_id: "inactive",
                                                      answer["Key"]["KeyID"]: "active"}
    assert (await call(served, "DELETE", "/v1/operator/keyring/keys", "management"))[0] == 405
    assert (await call(served, "GET", "/v1/operator/keyring/other", "management")) == (
        405, "Invalid method")
    status, text = await call(served, "PUT", "/v1/operator/keyring/rotate?publish_time=1",
                              "management")
    assert status == 400 and "publish_time" in text


async def test_keyring_routes_need_the_operator_capabilities(served: Any) -> None:
    for who in ("", "reader"):
        status, text = await call(served, "PUT", "/v1/operator/keyring/rotate", who)
        assert (status, text) == (403, "Permission denied")
    assert (await call(served, "GET", "/v1/operator/keyring/keys"))[0] == 403
    assert (await call(served, "GET", "/v1/operator/keyring/keys", "reader"))[0] == 200
    assert len(served[2]["server"].keyring.keys()) == 1  # nothing rotated


# ---- the CLI ------------------------------------------------------------------------------
async def run_cli(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    # In a thread: the CLI runs its own event loop.
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_cli_lists_and_rotates(served: Any, capsys: Capsys,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    api, _, secrets = served
    monkeypatch.setenv("NOMAD_ADDR", api.url)
    monkeypatch.setenv("NOMAD_TOKEN", secrets["management"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    active = secrets["server"].keyring.key_id

    code, out, err = await run_cli(capsys, "operator", "root", "keyring", "list")
    assert (code, err) == (0, "")
    header, row = out.splitlines()
    assert re.fullmatch(r"Key\s+State\s+Create Time\s+Publish Time", header)
    assert re.fullmatch(rf"{active[:8]}\s+active\s+\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d"
                        r"(Z|[+-]\d\d:\d\d)\s+<none>", row)

    code, out, err = await run_cli(capsys, "operator", "root", "keyring", "rotate",
                                   "-full", "-verbose")
    assert (code, err) == (0, "")
    new = secrets["server"].keyring.key_id
    assert new != active and re.search(rf"^{new}\s+active\s", out.splitlines()[1])

    code, out, _ = await run_cli(capsys, "operator", "root", "keyring", "list", "-json")
    assert code == 0 and [k["State"] for k in json.loads(out)] == ["inactive", "active"]
    assert re.search(rf'"KeyID": "{UUID}"', out) and out.startswith("[\n    {")

    monkeypatch.delenv("NOMAD_TOKEN")
    code, out, err = await run_cli(capsys, "operator", "root", "keyring", "rotate")
    assert (code, out) == (1, "") and err.startswith("error: ") and "403" in err
    code, _, err = await run_cli(capsys, "operator", "root", "keyring", "remove")
    assert code == 1 and "keyring list" in err
