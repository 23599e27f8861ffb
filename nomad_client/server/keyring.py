"""Workload-identity keyring: signs task identity tokens and verifies them.

This module is the single home of identity token checks. It owns one RSA-2048
signing key, kept in a keyring directory as a PEM file plus a JSON metadata
file, and it touches nothing but that directory.

Tokens are compact JWS (RS256) carrying the claims of a Nomad default task
identity. PyJWT's JWS layer signs them and checks their signatures, pinned to
RS256; every rule around that is written out here, in this order: size and
alphabet first (cheap), then the header (only RS256, no ``crit``, a ``kid``
naming one of our keys), then the signature, then the claims (presence, types,
audience, time window). The claims are checked here rather than by PyJWT,
whose checks are laxer (a float or numeric-string timestamp passes) and read
the wall clock. ``IdentityVerifier`` is the cache in front of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nomad_client import safefs

__all__ = [
    "DEFAULT_AUDIENCE",
    "LEEWAY_SECONDS",
    "MAX_TOKEN_BYTES",
    "IdentityClaims",
    "IdentityError",
    "IdentityVerifier",
    "Keyring",
    "KeyringError",
]

DEFAULT_AUDIENCE = "nomadproject.io"
ALGORITHM = "RS256"
KEY_FILE = "identity_key.pem"
META_FILE = "identity_key.json"

# Tokens we sign are ~1 KiB; anything far larger is rejected before any parsing.
MAX_TOKEN_BYTES = 16 * 1024

# The agent signs and verifies with the same clock, so the leeway only has to
# absorb the truncation of timestamps to whole seconds (iat/nbf are floored).
LEEWAY_SECONDS = 1

# How long a failed verification is remembered, so that a client replaying a
# bad token does not cost an RSA check per request.
NEGATIVE_TTL_SECONDS = 5.0

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_IDENTITY_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RSA_BITS = 2048
_RSA_EXPONENT = 65537

# The JWS codec. Only RS256 is registered, and each decode pins it again.
_JWS = jwt.PyJWS(algorithms=[ALGORITHM])


class IdentityError(Exception):
    """A token was rejected; ``str()`` is a short plain reason."""


class KeyringError(Exception):
    """The keyring directory or its files are unusable."""


@attrs.frozen
class IdentityClaims:
    """The verified claims of a task workload identity."""

    namespace: str
    job_id: str
    alloc_id: str
    task: str
    subject: str
    audience: tuple[str, ...]
    issued_at: int
    not_before: int
    expires_at: int | None
    token_id: str


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    """Decode one JWS segment, accepting only its canonical spelling.

    Re-encoding and comparing rejects padding, stray characters and
    non-zero trailing bits, so one token has exactly one string form (which
    keeps the verifier cache honest).
    """
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise IdentityError("token is malformed")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise IdentityError("token is malformed") from None
    if _b64url_encode(data) != segment:
        raise IdentityError("token is malformed")
    return data


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise IdentityError("token is malformed") from None
    if not isinstance(value, dict):
        raise IdentityError("token is malformed")
    return value


def _claim_str(payload: dict[str, Any], name: str) -> str:
    if name not in payload:
        raise IdentityError(f"missing claim {name!r}")
    value = payload[name]
    if not isinstance(value, str) or not value:
        raise IdentityError(f"claim {name!r} has the wrong type")
    return value


def _claim_int(payload: dict[str, Any], name: str) -> int:
    if name not in payload:
        raise IdentityError(f"missing claim {name!r}")
    return _as_timestamp(payload, name)


def _claim_optional_int(payload: dict[str, Any], name: str) -> int | None:
    return _as_timestamp(payload, name) if name in payload else None


def _as_timestamp(payload: dict[str, Any], name: str) -> int:
    value = payload[name]
    # bool is an int subclass in Python; a JSON true is not a timestamp.
    if not isinstance(value, int) or isinstance(value, bool):
        raise IdentityError(f"claim {name!r} has the wrong type")
    return value


def _claim_audience(payload: dict[str, Any]) -> tuple[str, ...]:
    if "aud" not in payload:
        raise IdentityError("missing claim 'aud'")
    value = payload["aud"]
    if isinstance(value, str) and value:
        return (value,)
    if (
        isinstance(value, list)
        and value
        and all(isinstance(item, str) and item for item in value)
    ):
        return tuple(value)
    raise IdentityError("claim 'aud' has the wrong type")


def _non_empty(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


class Keyring:
    """One persisted RSA signing key: signs, publishes (JWKS) and verifies tokens."""

    def __init__(
        self, *, key_id: str, private_key: rsa.RSAPrivateKey, create_time: float
    ) -> None:
        self.key_id = key_id
        self.create_time = create_time
        # The ``iss`` of every token signed, and what OIDC discovery advertises; the agent
        # sets it once its address is known. None: no ``iss``, and discovery is off.
        self.issuer: str | None = None
        self._private_key = private_key
        self._public_key = private_key.public_key()
        # Verification keys by ``kid``: a token's header can only pick one of these.
        self._verification_keys = {key_id: self._public_key}

    # ------------------------------------------------------------------ persistence

    @classmethod
    async def load_or_create(cls, keyring_dir: Path) -> Keyring:
        """Load the key from ``keyring_dir``, creating both on first use.

        Runs in a worker thread: RSA key generation takes tens to hundreds of
        milliseconds and the file I/O is blocking.
        """
        return await asyncio.to_thread(cls._load_or_create_sync, Path(keyring_dir))

    @classmethod
    def _load_or_create_sync(cls, keyring_dir: Path) -> Keyring:
        ensure_private_dir(keyring_dir)
        key_path = keyring_dir / KEY_FILE
        meta_path = keyring_dir / META_FILE
        # The key file is the commit point: metadata is written first, so a
        # crash during creation leaves metadata without a key, and nothing can
        # have been signed yet. A key without metadata is never guessed at.
        if not os.path.lexists(key_path):
            return cls._create(keyring_dir)
        if not os.path.lexists(meta_path):
            raise KeyringError(
                f"{meta_path}: missing, but {key_path.name} exists; "
                "refusing to replace an existing signing key"
            )
        return cls._load(key_path, meta_path)

    @classmethod
    def _create(cls, keyring_dir: Path) -> Keyring:
        private_key = rsa.generate_private_key(public_exponent=_RSA_EXPONENT, key_size=_RSA_BITS)
        keyring = cls(key_id=str(uuid.uuid4()), private_key=private_key, create_time=time.time())
        meta = {
            "key_id": keyring.key_id,
            "algorithm": ALGORITHM,
            "create_time": keyring.create_time,
            "public_key_sha256": _public_fingerprint(keyring._public_key),
        }
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_keyring_file(keyring_dir, META_FILE, json.dumps(meta, indent=2).encode() + b"\n")
        write_keyring_file(keyring_dir, KEY_FILE, pem)
        return keyring

    @classmethod
    def _load(cls, key_path: Path, meta_path: Path) -> Keyring:
        meta_raw = read_private_file(meta_path)
        try:
            meta = json.loads(meta_raw)
            key_id = meta["key_id"]
            create_time = meta["create_time"]
            fingerprint = meta["public_key_sha256"]
            if meta["algorithm"] != ALGORITHM:
                raise ValueError(f"unsupported algorithm {meta['algorithm']!r}")
            uuid.UUID(key_id)
            if not isinstance(create_time, int | float) or isinstance(create_time, bool):
                raise ValueError("create_time is not a number")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyringError(f"{meta_path}: corrupt keyring metadata ({exc})") from None

        pem = read_private_file(key_path)
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyringError(f"{key_path}: corrupt signing key ({exc})") from None
        if not isinstance(private_key, rsa.RSAPrivateKey) or private_key.key_size < _RSA_BITS:
            raise KeyringError(f"{key_path}: not an RSA key of at least {_RSA_BITS} bits")
        if _public_fingerprint(private_key.public_key()) != fingerprint:
            raise KeyringError(f"{key_path}: does not match the key recorded in {meta_path.name}")
        return cls(key_id=key_id, private_key=private_key, create_time=float(create_time))

    # ------------------------------------------------------------------ signing

    def sign_identity(
        self,
        *,
        namespace: str,
        job_id: str,
        alloc_id: str,
        task: str,
        group: str,
        region: str,
        identity_name: str = "default",
        audience: Sequence[str] = (DEFAULT_AUDIENCE,),
        ttl_seconds: float | None = None,
        now: float | None = None,
    ) -> str:
        """Sign a task identity token (RS256, header ``kid`` = our key id)."""
        for label, value in (
            ("namespace", namespace),
            ("job_id", job_id),
            ("alloc_id", alloc_id),
            ("task", task),
            ("group", group),
            ("region", region),
        ):
            _non_empty(label, value)
        if not isinstance(identity_name, str) or not _IDENTITY_NAME.fullmatch(identity_name):
            raise ValueError(f"identity_name {identity_name!r} must match [A-Za-z0-9_-]{{1,128}}")
        # A bare string is a sequence too; tuple("abc") would be three audiences.
        if isinstance(audience, str) or not audience:
            raise ValueError("audience must be a non-empty sequence of strings")
        auds = [_non_empty("audience entry", aud) for aud in audience]
        if ttl_seconds is not None and not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")

        moment = time.time() if now is None else now
        issued = int(moment)
        claims: dict[str, Any] = {
            "nomad_namespace": namespace,
            "nomad_job_id": job_id,
            "nomad_allocation_id": alloc_id,
            "nomad_task": task,
            "sub": ":".join((region, namespace, job_id, group, task, identity_name)),
            "aud": auds[0] if len(auds) == 1 else auds,
            "iat": issued,
            "nbf": issued,
            "jti": str(uuid.uuid4()),
        }
        if ttl_seconds is not None:
            claims["exp"] = math.ceil(moment + ttl_seconds)
        if self.issuer:
            claims["iss"] = self.issuer
        payload = json.dumps(claims, separators=(",", ":")).encode("utf-8")
        # The header is {"alg": "RS256", "kid": <our key id>, "typ": "JWT"}.
        return _JWS.encode(
            payload, self._private_key, algorithm=ALGORITHM, headers={"kid": self.key_id}
        )

    def jwks(self) -> dict[str, Any]:
        """The public key set, as served at ``/.well-known/jwks.json``."""
        numbers = self._public_key.public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "kid": self.key_id,
                    "use": "sig",
                    "alg": ALGORITHM,
                    "n": _b64url_encode(_int_bytes(numbers.n)),
                    "e": _b64url_encode(_int_bytes(numbers.e)),
                }
            ]
        }

    # ------------------------------------------------------------------ verification

    def verify(
        self, token: str, *, audience: str = DEFAULT_AUDIENCE, now: float | None = None
    ) -> IdentityClaims:
        """Verify ``token`` completely; raise ``IdentityError`` on any flaw."""
        if not isinstance(token, str):
            raise IdentityError("token is malformed")
        # Size first: nothing below runs on an oversized input.
        if len(token) > MAX_TOKEN_BYTES:
            raise IdentityError("token is too large")
        if not token.isascii():
            raise IdentityError("token is malformed")
        parts = token.split(".")
        if len(parts) != 3:
            raise IdentityError("token is malformed")
        # Every segment in its canonical spelling first: PyJWT also takes others (padded ones).
        header_data, _, _ = (_b64url_decode(part) for part in parts)

        header = _json_object(header_data)
        # Only RS256 is acceptable: this rejects "none" and the classic
        # HS256-with-the-public-key-as-secret confusion outright.
        if header.get("alg") != ALGORITHM:
            raise IdentityError("unsupported signing algorithm")
        if "crit" in header:
            raise IdentityError("unsupported critical header")
        kid = header.get("kid")
        key = self._verification_keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise IdentityError("unknown signing key")

        try:
            payload_data = _JWS.decode(token, key, algorithms=[ALGORITHM])
        except jwt.InvalidSignatureError:
            raise IdentityError("bad signature") from None
        except jwt.PyJWTError:
            # Nothing the checks above let through, but never PyJWT's text: it may quote input.
            raise IdentityError("token is malformed") from None

        payload = _json_object(payload_data)
        claims = IdentityClaims(
            namespace=_claim_str(payload, "nomad_namespace"),
            job_id=_claim_str(payload, "nomad_job_id"),
            alloc_id=_claim_str(payload, "nomad_allocation_id"),
            task=_claim_str(payload, "nomad_task"),
            subject=_claim_str(payload, "sub"),
            audience=_claim_audience(payload),
            issued_at=_claim_int(payload, "iat"),
            not_before=_claim_int(payload, "nbf"),
            expires_at=_claim_optional_int(payload, "exp"),
            token_id=_claim_str(payload, "jti"),
        )
        if audience not in claims.audience:
            raise IdentityError("wrong audience")
        check_time_window(claims, time.time() if now is None else now)
        return claims


def check_time_window(claims: IdentityClaims, now: float) -> None:
    """Raise ``IdentityError`` unless ``now`` lies within the token's nbf..exp window."""
    if now < claims.not_before - LEEWAY_SECONDS:
        raise IdentityError("token not yet valid")
    if claims.expires_at is not None and now >= claims.expires_at + LEEWAY_SECONDS:
        raise IdentityError("token expired")


class IdentityVerifier:
    """A bounded LRU cache in front of ``Keyring.verify``.

    Successful verifications are cached by token and re-checked against the
    clock on every hit, so a token expiring while cached is refused. Failures
    are cached for ``NEGATIVE_TTL_SECONDS`` in a separate LRU of the same bound,
    keyed by a digest, so garbage tokens neither force repeated RSA work nor
    evict good entries. Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._keyring = keyring
        self._max_entries = max_entries
        self._clock = clock
        # token -> (claims, earliest valid time, first invalid time): the window is
        # precomputed so a cache hit is one lookup and two comparisons.
        self._good: OrderedDict[str, tuple[IdentityClaims, float, float]] = OrderedDict()
        self._bad: OrderedDict[bytes, tuple[float, str]] = OrderedDict()

    def verify(self, token: str) -> IdentityClaims:
        now = self._clock()
        entry = self._good.get(token)
        if entry is not None:
            claims, earliest, latest = entry
            if earliest <= now < latest:
                self._good.move_to_end(token)
                return claims
            del self._good[token]
            try:
                check_time_window(claims, now)
            except IdentityError as exc:
                self._remember_failure(token, str(exc), now)
                raise

        # Oversized tokens are refused without hashing or caching anything.
        if not isinstance(token, str):
            raise IdentityError("token is malformed")
        if len(token) > MAX_TOKEN_BYTES:
            raise IdentityError("token is too large")

        digest = _digest(token)
        failure = self._bad.get(digest)
        if failure is not None:
            until, reason = failure
            if now < until:
                raise IdentityError(reason)
            del self._bad[digest]

        try:
            claims = self._keyring.verify(token, now=now)
        except IdentityError as exc:
            self._remember_failure(token, str(exc), now)
            raise
        latest = math.inf if claims.expires_at is None else claims.expires_at + LEEWAY_SECONDS
        self._good[token] = (claims, claims.not_before - LEEWAY_SECONDS, latest)
        if len(self._good) > self._max_entries:
            self._good.popitem(last=False)
        return claims

    def forget_alloc(self, alloc_id: str) -> None:
        """Drop every cached token of ``alloc_id`` (hygiene when it turns terminal)."""
        for token in [t for t, (c, _, _) in self._good.items() if c.alloc_id == alloc_id]:
            del self._good[token]

    def __len__(self) -> int:
        return len(self._good)

    def _remember_failure(self, token: str, reason: str, now: float) -> None:
        digest = _digest(token)
        self._bad[digest] = (now + NEGATIVE_TTL_SECONDS, reason)
        self._bad.move_to_end(digest)
        if len(self._bad) > self._max_entries:
            self._bad.popitem(last=False)


# ---------------------------------------------------------------------- helpers


def _digest(token: str) -> bytes:
    # surrogatepass: a token string may hold lone surrogates; it must still hash.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _public_fingerprint(public_key: rsa.RSAPublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


# ---------------------------------------------------------------------- the keyring dir
# Creating, writing and reading its files is safefs's; the keyring's own part is its error
# type and messages.


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700 if missing; refuse a symlink or a non-directory."""
    try:
        safefs.ensure_private_dir(path)
    except safefs.UnsafePathError as exc:
        raise KeyringError(f"{path}: keyring dir {exc.strerror}") from None
    except OSError as exc:
        raise KeyringError(f"{path}: cannot create keyring dir ({exc.strerror})") from None


def write_keyring_file(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` as 0600 via a temp file and an atomic rename."""
    safefs.write_private_file_in(directory, name, data)


def read_private_file(path: Path) -> bytes:
    try:
        return safefs.read_private_file(path)
    except safefs.UnsafePathError as exc:
        raise KeyringError(f"{path}: {exc.strerror}") from None
    except OSError as exc:
        raise KeyringError(f"{path}: cannot open ({exc.strerror})") from None
