"""Attacker-minded tests for the workload-identity keyring and its verifier cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from nomad_client.server.keyring import (
    KEY_FILE,
    LEEWAY_SECONDS,
    MAX_TOKEN_BYTES,
    META_FILE,
    NEGATIVE_TTL_SECONDS,
    IdentityClaims,
    IdentityError,
    IdentityVerifier,
    Keyring,
    KeyringError,
)

T0 = 1_735_000_000.25
ALLOC = "5c63a1f0-0000-4000-8000-000000000001"


# ---------------------------------------------------------------------- fixtures


def _load(path: Path) -> Keyring:
    return asyncio.run(Keyring.load_or_create(path))


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    """A key of the attacker's own, for tokens that name or carry it."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign(keyring: Keyring, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "namespace": "default",
        "job_id": "web",
        "alloc_id": ALLOC,
        "task": "t",
        "group": "g",
        "region": "global",
        "now": T0,
    }
    args.update(overrides)
    return keyring.sign_identity(**args)


# ---------------------------------------------------------------------- token surgery


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    return json.loads(unb64(h)), json.loads(unb64(p)), s


def stolen_key(keyring_dir: Path) -> rsa.RSAPrivateKey:
    """What an attacker holding the key file could sign with."""
    key = serialization.load_pem_private_key((keyring_dir / KEY_FILE).read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def rs256(key: rsa.RSAPrivateKey, header: dict[str, Any], payload: dict[str, Any]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(sig)}"


def good_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "nomad_namespace": "default",
        "nomad_job_id": "web",
        "nomad_allocation_id": ALLOC,
        "nomad_task": "t",
        "sub": "global:default:web:g:t:default",
        "aud": "nomadproject.io",
        "iat": int(T0),
        "nbf": int(T0),
        "jti": str(uuid.uuid4()),
    }
    payload.update(changes)
    return payload


# ---------------------------------------------------------------------- signing


def test_token_has_nomad_shape(keyring: Keyring) -> None:
    header, payload, _ = segments(_sign(keyring))
    assert header == {"alg": "RS256", "kid": keyring.key_id, "typ": "JWT"}
    jti = payload.pop("jti")
    assert uuid.UUID(jti).version == 4
    assert payload == {
        "nomad_namespace": "default",
        "nomad_job_id": "web",
        "nomad_allocation_id": ALLOC,
        "nomad_task": "t",
        "sub": "global:default:web:g:t:default",
        "aud": "nomadproject.io",
        "iat": int(T0),
        "nbf": int(T0),
    }


def test_multiple_audiences_and_ttl(keyring: Keyring) -> None:
    token = _sign(keyring, audience=("a", "b"), ttl_seconds=60, identity_name="vault-x")
    _, payload, _ = segments(token)
    assert payload["aud"] == ["a", "b"]
    assert payload["exp"] == int(T0) + 61  # ceil(T0 + 60) with T0 = ....25
    assert payload["sub"].endswith(":vault-x")
    claims = keyring.verify(token, audience="b", now=T0 + 1)
    assert claims.audience == ("a", "b")
    assert claims.expires_at == payload["exp"]


def test_jti_is_unique_per_token(keyring: Keyring) -> None:
    assert segments(_sign(keyring))[1]["jti"] != segments(_sign(keyring))[1]["jti"]


def test_roundtrip_claims(keyring: Keyring) -> None:
    token = _sign(keyring)
    claims = keyring.verify(token, now=T0)
    assert claims == IdentityClaims(
        namespace="default",
        job_id="web",
        alloc_id=ALLOC,
        task="t",
        subject="global:default:web:g:t:default",
        audience=("nomadproject.io",),
        issued_at=int(T0),
        not_before=int(T0),
        expires_at=None,
        token_id=segments(token)[1]["jti"],
    )


def test_independent_jwt_library_accepts_token_via_jwks(keyring: Keyring) -> None:
    jwks = keyring.jwks()
    (key,) = jwks["keys"]
    assert {k: key[k] for k in ("kty", "kid", "use", "alg", "e")} == {
        "kty": "RSA",
        "kid": keyring.key_id,
        "use": "sig",
        "alg": "RS256",
        "e": "AQAB",
    }
    assert "=" not in key["n"] and len(unb64(key["n"])) == 256  # 2048-bit modulus
    public = jwt.PyJWK(key).key
    token = _sign(keyring, now=None, ttl_seconds=300)
    decoded = jwt.decode(token, public, algorithms=["RS256"], audience="nomadproject.io")
    assert decoded["nomad_allocation_id"] == ALLOC


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"namespace": ""}, "namespace"),
        ({"region": None}, "region"),
        ({"audience": "nomadproject.io"}, "audience"),
        ({"audience": ()}, "audience"),
        ({"audience": ("ok", "")}, "audience"),
        ({"identity_name": "bad name"}, "identity_name"),
        ({"identity_name": "x" * 129}, "identity_name"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": float("inf")}, "ttl_seconds"),
    ],
)
def test_sign_rejects_bad_arguments(keyring: Keyring, override: dict[str, Any],
                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _sign(keyring, **override)


# ---------------------------------------------------------------------- forgery


def test_tampered_payload_is_rejected(keyring: Keyring) -> None:
    token = _sign(keyring)
    h, _, s = token.split(".")
    evil = b64(json.dumps(good_payload(nomad_namespace="prod")).encode())
    with pytest.raises(IdentityError, match="^bad signature$"):
        keyring.verify(f"{h}.{evil}.{s}", now=T0)


def test_tampered_signature_is_rejected(keyring: Keyring) -> None:
    h, p, s = _sign(keyring).split(".")
    sig = bytearray(unb64(s))
    sig[10] ^= 1
    with pytest.raises(IdentityError, match="^bad signature$"):
        keyring.verify(f"{h}.{p}.{b64(bytes(sig))}", now=T0)


def test_signature_spliced_from_another_token_is_rejected(keyring: Keyring) -> None:
    a = _sign(keyring).split(".")
    b = _sign(keyring, job_id="other").split(".")
    with pytest.raises(IdentityError, match="^bad signature$"):
        keyring.verify(f"{a[0]}.{b[1]}.{a[2]}", now=T0)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", None, "RS512", "PS256", "ES256"])
def test_other_algorithms_are_rejected(keyring: Keyring, alg: Any) -> None:
    header = {"alg": alg, "kid": keyring.key_id, "typ": "JWT"}
    payload = good_payload()
    token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}."
    with pytest.raises(IdentityError, match="^(unsupported signing algorithm|token is malformed)$"):
        keyring.verify(token, now=T0)
    # Also with the genuine signature bytes of an honest token attached.
    with pytest.raises(IdentityError, match="^unsupported signing algorithm$"):
        keyring.verify(token + _sign(keyring).split(".")[2], now=T0)


def test_hs256_with_public_key_as_secret_is_rejected(keyring: Keyring) -> None:
    header = {"alg": "HS256", "kid": keyring.key_id, "typ": "JWT"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(good_payload()).encode())}"
    public_key = jwt.PyJWK(keyring.jwks()["keys"][0]).key
    for encoding, fmt in (
        (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        (serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    ):
        secret = public_key.public_bytes(encoding, fmt)
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        with pytest.raises(IdentityError, match="^unsupported signing algorithm$"):
            keyring.verify(f"{signing_input}.{b64(mac)}", now=T0)


def test_wrong_kid_is_rejected_even_with_a_valid_signature(keyring: Keyring,
                                                            keyring_dir: Path) -> None:
    key = stolen_key(keyring_dir)
    key_id = keyring.key_id
    path_kids = ("../../../etc/passwd", f"../{key_id}", f"{key_id}/../{key_id}",
                 f"./{key_id}", f"{key_id}\x00", "/dev/stdin", "")  # fmt: skip
    for kid in (str(uuid.uuid4()), None, 7, keyring.key_id.upper(), [keyring.key_id],
                {"kid": keyring.key_id}, *path_kids):  # fmt: skip
        token = rs256(key, {"alg": "RS256", "kid": kid}, good_payload())
        with pytest.raises(IdentityError, match="^unknown signing key$"):
            keyring.verify(token, now=T0)
    # Sanity: the same forge helper with the right kid produces an accepted token.
    ok = rs256(key, {"alg": "RS256", "kid": keyring.key_id}, good_payload())
    assert keyring.verify(ok, now=T0).alloc_id == ALLOC


@pytest.mark.parametrize(
    "extra",
    [
        # Keys or key locations offered by the token itself are never used.
        {"jwk": "FOREIGN_JWK"},
        {"jku": "http://127.0.0.1:1/jwks.json"},
        {"x5u": "http://127.0.0.1:1/cert.pem"},
        {"x5c": ["MIIB"]},
        {"b64": False},
    ],
)
def test_keys_named_in_the_header_are_ignored(
    keyring: Keyring, attacker_key: rsa.RSAPrivateKey, extra: dict[str, Any]
) -> None:
    attacker_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(attacker_key.public_key(), as_dict=True)
    header = {"alg": "RS256", "kid": keyring.key_id, "typ": "JWT"}
    header.update({k: attacker_jwk if v == "FOREIGN_JWK" else v for k, v in extra.items()})
    token = rs256(attacker_key, header, good_payload())
    with pytest.raises(IdentityError, match="^(bad signature|token is malformed)$"):
        keyring.verify(token, now=T0)


def test_crit_header_is_rejected(keyring: Keyring, keyring_dir: Path) -> None:
    header = {"alg": "RS256", "kid": keyring.key_id, "crit": ["exp"]}
    with pytest.raises(IdentityError, match="critical"):
        keyring.verify(rs256(stolen_key(keyring_dir), header, good_payload()), now=T0)


def test_token_of_another_keyring_is_rejected(keyring: Keyring, other_keyring: Keyring) -> None:
    foreign = _sign(other_keyring)
    with pytest.raises(IdentityError, match="^unknown signing key$"):
        keyring.verify(foreign, now=T0)
    # The other keyring's token relabelled with our kid: signature must fail.
    _, p, s = foreign.split(".")
    h = b64(json.dumps({"alg": "RS256", "kid": keyring.key_id, "typ": "JWT"}).encode())
    with pytest.raises(IdentityError, match="^bad signature$"):
        keyring.verify(f"{h}.{p}.{s}", now=T0)


# ---------------------------------------------------------------------- time and audience


def test_expiry_boundaries(keyring: Keyring) -> None:
    token = _sign(keyring, ttl_seconds=10)
    exp = segments(token)[1]["exp"]
    assert keyring.verify(token, now=exp - 0.001).expires_at == exp
    assert keyring.verify(token, now=exp + LEEWAY_SECONDS - 0.001).expires_at == exp
    with pytest.raises(IdentityError, match="^token expired$"):
        keyring.verify(token, now=exp + LEEWAY_SECONDS)
    with pytest.raises(IdentityError, match="^token expired$"):
        keyring.verify(token, now=exp + 3600)


def test_not_yet_valid(keyring: Keyring) -> None:
    token = _sign(keyring)
    nbf = int(T0)
    assert keyring.verify(token, now=nbf - LEEWAY_SECONDS).not_before == nbf
    with pytest.raises(IdentityError, match="^token not yet valid$"):
        keyring.verify(token, now=nbf - LEEWAY_SECONDS - 0.001)


def test_wrong_audience(keyring: Keyring) -> None:
    with pytest.raises(IdentityError, match="^wrong audience$"):
        keyring.verify(_sign(keyring), audience="vault.io", now=T0)
    with pytest.raises(IdentityError, match="^wrong audience$"):
        keyring.verify(_sign(keyring, audience=("vault.io", "consul.io")), now=T0)


# ---------------------------------------------------------------------- claims


@pytest.mark.parametrize(
    "claim", ["nomad_namespace", "nomad_job_id", "nomad_allocation_id", "nomad_task", "sub",
              "aud", "iat", "nbf", "jti"],
)
def test_missing_claim(keyring: Keyring, keyring_dir: Path, claim: str) -> None:
    payload = good_payload()
    del payload[claim]
    token = rs256(stolen_key(keyring_dir), {"alg": "RS256", "kid": keyring.key_id}, payload)
    with pytest.raises(IdentityError, match=f"^missing claim '{claim}'$"):
        keyring.verify(token, now=T0)


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("nomad_namespace", 1),
        ("nomad_job_id", None),
        ("nomad_allocation_id", ["x"]),
        ("nomad_task", ""),
        ("sub", {"a": 1}),
        ("jti", 5),
        ("aud", 5),
        ("aud", []),
        ("aud", [1]),
        ("aud", ["nomadproject.io", ""]),
        ("aud", ""),
        ("iat", "1735000000"),
        ("iat", True),
        ("nbf", 1735000000.5),
        ("exp", "never"),
        ("exp", False),
        ("exp", None),
    ],
)
def test_claim_of_wrong_type(keyring: Keyring, keyring_dir: Path, claim: str, value: Any) -> None:
    token = rs256(stolen_key(keyring_dir), {"alg": "RS256", "kid": keyring.key_id},
                  good_payload(**{claim: value}))
    with pytest.raises(IdentityError, match=f"^claim '{claim}' has the wrong type$"):
        keyring.verify(token, now=T0)


def test_payload_not_an_object(keyring: Keyring, keyring_dir: Path) -> None:
    key = stolen_key(keyring_dir)
    h = b64(json.dumps({"alg": "RS256", "kid": keyring.key_id}).encode())
    for body in (b"[1,2]", b'"x"', b"null", b"\xff\xfe", b"{"):
        signing_input = f"{h}.{b64(body)}"
        sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        with pytest.raises(IdentityError, match="^token is malformed$"):
            keyring.verify(f"{signing_input}.{b64(sig)}", now=T0)


# ---------------------------------------------------------------------- malformed input


def test_huge_token_is_rejected_before_parsing(keyring: Keyring) -> None:
    token = _sign(keyring)
    padded = token + "A" * (MAX_TOKEN_BYTES + 1 - len(token))
    # Without the size gate this would be "bad signature" or "malformed".
    with pytest.raises(IdentityError, match="^token is too large$"):
        keyring.verify(padded, now=T0)
    with pytest.raises(IdentityError, match="^token is too large$"):
        keyring.verify("é" * (MAX_TOKEN_BYTES + 1), now=T0)
    with pytest.raises(IdentityError, match="^token is too large$"):
        keyring.verify("x" * 10_000_000, now=T0)


@pytest.mark.parametrize(
    "garbage",
    ["", ".", "..", "...", "a.b", "a.b.c.d", "é.é.é", "\udc80.a.b", "\x00", "Bearer x.y.z",
     " eyJ.eyJ.sig", "a..b", "!!!.???.***", "YQ==.YQ==.YQ=="],
)
def test_garbage_is_malformed(keyring: Keyring, garbage: str) -> None:
    with pytest.raises(IdentityError, match="^token is malformed$"):
        keyring.verify(garbage, now=T0)


def test_non_string_token(keyring: Keyring) -> None:
    with pytest.raises(IdentityError, match="^token is malformed$"):
        keyring.verify(b"a.b.c", now=T0)  # type: ignore[arg-type]


def test_non_canonical_base64_is_rejected(keyring: Keyring) -> None:
    h, p, s = _sign(keyring).split(".")
    # A 342-char signature segment carries 4 spare bits; flipping them decodes
    # to the same bytes, so a lax decoder would accept a second spelling.
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    alt = s[:-1] + last[last.index(s[-1]) ^ 1]
    assert unb64(alt) == unb64(s)
    with pytest.raises(IdentityError, match="^token is malformed$"):
        keyring.verify(f"{h}.{p}.{alt}", now=T0)
    with pytest.raises(IdentityError, match="^token is malformed$"):
        keyring.verify(f"{h}.{p}.{s}==", now=T0)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_only_identity_errors(keyring: Keyring, text: str) -> None:
    with pytest.raises(IdentityError):
        keyring.verify(text, now=T0)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_fuzz_structured_garbage(keyring: Keyring, header: bytes, payload: bytes) -> None:
    with pytest.raises(IdentityError):
        keyring.verify(f"{b64(header)}.{b64(payload)}.{b64(b'sig')}", now=T0)


# ---------------------------------------------------------------------- persistence


def test_persistence_and_modes(workdir: Path) -> None:
    path = workdir / "deep" / "ring"
    first = _load(path)
    token = _sign(first)
    second = _load(path)
    assert second.key_id == first.key_id
    assert second.create_time == first.create_time
    assert second.verify(token, now=T0).alloc_id == ALLOC
    assert second.jwks() == first.jwks()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path / KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path / META_FILE).st_mode) == 0o600
    meta = json.loads((path / META_FILE).read_text())
    assert meta["key_id"] == first.key_id and uuid.UUID(meta["key_id"]).version == 4
    assert sorted(os.listdir(path)) == sorted([KEY_FILE, META_FILE])  # no temp leftovers


def test_corrupt_key_file_is_an_error_and_kept(workdir: Path) -> None:
    _load(workdir)
    key_path = workdir / KEY_FILE
    key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyringError, match=str(key_path)) as info:
        _load(workdir)
    assert "corrupt" in str(info.value)
    assert b"garbage" in key_path.read_bytes()  # never silently replaced


def test_key_from_elsewhere_is_detected(workdir: Path, keyring_dir: Path) -> None:
    _load(workdir)
    shutil.copyfile(keyring_dir / KEY_FILE, workdir / KEY_FILE)
    with pytest.raises(KeyringError, match="does not match"):
        _load(workdir)


@pytest.mark.parametrize(
    "meta",
    [b"", b"{", b"[]", b'{"key_id": "x", "algorithm": "RS256", "create_time": 1,'
     b' "public_key_sha256": "00"}', b'{"key_id": "3f0e7c4a-1111-4222-8333-444455556666"}'],
)
def test_corrupt_metadata_is_an_error(workdir: Path, meta: bytes) -> None:
    _load(workdir)
    (workdir / META_FILE).write_bytes(meta)
    with pytest.raises(KeyringError, match=META_FILE):
        _load(workdir)


def test_key_without_metadata_is_refused(workdir: Path) -> None:
    _load(workdir)
    os.unlink(workdir / META_FILE)
    with pytest.raises(KeyringError, match="refusing to replace"):
        _load(workdir)


def test_metadata_without_key_means_interrupted_creation(workdir: Path) -> None:
    old = _load(workdir)
    os.unlink(workdir / KEY_FILE)
    new = _load(workdir)
    assert new.key_id != old.key_id
    assert _load(workdir).key_id == new.key_id


def test_readable_key_file_is_refused(workdir: Path) -> None:
    _load(workdir)
    os.chmod(workdir / KEY_FILE, 0o644)
    with pytest.raises(KeyringError, match="readable by others"):
        _load(workdir)


def test_symlinked_key_file_is_refused(workdir: Path, keyring_dir: Path) -> None:
    _load(workdir / "ring")
    os.unlink(workdir / "ring" / KEY_FILE)
    os.symlink(keyring_dir / KEY_FILE, workdir / "ring" / KEY_FILE)
    with pytest.raises(KeyringError, match=KEY_FILE):
        _load(workdir / "ring")


def test_symlinked_keyring_dir_is_refused(workdir: Path) -> None:
    (workdir / "real").mkdir()
    os.symlink(workdir / "real", workdir / "link")
    with pytest.raises(KeyringError, match="symlink"):
        _load(workdir / "link")
    assert os.listdir(workdir / "real") == []


def test_keyring_dir_mode_is_tightened(workdir: Path) -> None:
    path = workdir / "ring"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    _load(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_keyring_path_that_is_a_file(workdir: Path) -> None:
    (workdir / "f").write_text("x")
    with pytest.raises(KeyringError, match="not a directory"):
        _load(workdir / "f")


# ---------------------------------------------------------------------- verifier cache


class Spy:
    """Counts calls to the underlying (expensive) verification."""

    def __init__(self, keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = keyring.verify

        def counting(token: str, **kwargs: Any) -> IdentityClaims:
            self.calls += 1
            return real(token, **kwargs)

        monkeypatch.setattr(keyring, "verify", counting)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_cache_avoids_reverification(keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(keyring, monkeypatch)
    verifier = IdentityVerifier(keyring, clock=Clock(T0))
    token = _sign(keyring)
    results = {verifier.verify(token) for _ in range(100)}
    assert spy.calls == 1
    assert len(results) == 1 and next(iter(results)).alloc_id == ALLOC


def test_expiry_is_checked_on_cache_hits(keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(keyring, monkeypatch)
    clock = Clock(T0)
    verifier = IdentityVerifier(keyring, clock=clock)
    token = _sign(keyring, ttl_seconds=60)
    verifier.verify(token)
    clock.now = T0 + 30
    verifier.verify(token)
    assert spy.calls == 1
    clock.now = T0 + 61 + LEEWAY_SECONDS
    with pytest.raises(IdentityError, match="^token expired$"):
        verifier.verify(token)
    with pytest.raises(IdentityError, match="^token expired$"):
        verifier.verify(token)
    clock.now += NEGATIVE_TTL_SECONDS + 1  # once the failure entry lapses: full check, same answer
    with pytest.raises(IdentityError, match="^token expired$"):
        verifier.verify(token)
    assert spy.calls == 2


def test_failures_are_cached_briefly(keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(keyring, monkeypatch)
    clock = Clock(T0)
    verifier = IdentityVerifier(keyring, clock=clock)
    h, p, s = _sign(keyring).split(".")
    forged = f"{h}.{b64(json.dumps(good_payload(nomad_task='admin')).encode())}.{s}"
    for _ in range(50):
        with pytest.raises(IdentityError, match="^bad signature$"):
            verifier.verify(forged)
    assert spy.calls == 1
    clock.now += NEGATIVE_TTL_SECONDS + 0.1
    with pytest.raises(IdentityError, match="^bad signature$"):
        verifier.verify(forged)
    assert spy.calls == 2


def test_not_yet_valid_is_not_stuck_in_the_cache(keyring: Keyring) -> None:
    clock = Clock(T0 - 60)
    verifier = IdentityVerifier(keyring, clock=clock)
    token = _sign(keyring)
    with pytest.raises(IdentityError, match="^token not yet valid$"):
        verifier.verify(token)
    clock.now = T0
    assert verifier.verify(token).alloc_id == ALLOC


def test_oversized_tokens_never_reach_the_keyring(
    keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(keyring, monkeypatch)
    verifier = IdentityVerifier(keyring, clock=Clock(T0))
    for _ in range(3):
        with pytest.raises(IdentityError, match="^token is too large$"):
            verifier.verify("x" * (MAX_TOKEN_BYTES + 1))
    assert spy.calls == 0


def test_lru_bound_on_good_entries(keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(keyring, monkeypatch)
    verifier = IdentityVerifier(keyring, max_entries=2, clock=Clock(T0))
    a, b, c = (_sign(keyring, task=name) for name in "abc")
    verifier.verify(a)
    verifier.verify(b)
    verifier.verify(a)  # a is now most recent; b is the eviction candidate
    verifier.verify(c)
    assert len(verifier) == 2 and spy.calls == 3
    verifier.verify(a)
    verifier.verify(c)
    assert spy.calls == 3
    verifier.verify(b)
    assert spy.calls == 4


def test_garbage_flood_is_bounded_and_spares_good_entries(
    keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(keyring, monkeypatch)
    verifier = IdentityVerifier(keyring, max_entries=4, clock=Clock(T0))
    good = _sign(keyring)
    verifier.verify(good)
    garbage = [f"junk-{i}" for i in range(100)]
    for junk in garbage:
        with pytest.raises(IdentityError):
            verifier.verify(junk)
    assert len(verifier._bad) == 4  # bounded
    calls = spy.calls
    verifier.verify(good)  # still cached despite the flood
    with pytest.raises(IdentityError):
        verifier.verify(garbage[-1])  # recent failure: cached
    assert spy.calls == calls
    with pytest.raises(IdentityError):
        verifier.verify(garbage[0])  # evicted failure: checked again
    assert spy.calls == calls + 1


def test_forget_alloc(keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(keyring, monkeypatch)
    verifier = IdentityVerifier(keyring, clock=Clock(T0))
    mine = _sign(keyring, alloc_id="alloc-1")
    mine_too = _sign(keyring, alloc_id="alloc-1", task="u")
    theirs = _sign(keyring, alloc_id="alloc-2")
    for token in (mine, mine_too, theirs):
        verifier.verify(token)
    verifier.forget_alloc("alloc-1")
    assert len(verifier) == 1
    verifier.verify(theirs)
    assert spy.calls == 3
    verifier.verify(mine)
    assert spy.calls == 4


def test_verifier_rejects_bad_bound(keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        IdentityVerifier(keyring, max_entries=0)

