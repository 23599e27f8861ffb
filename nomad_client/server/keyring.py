"""The root keyring: signs task identity tokens, verifies them, and holds the data keys.

This module is the single home of identity token checks. It holds every root key,
as Nomad does: each has an ID, a create time, a state (``KeyState``), an RSA-2048
signing key and a 32-byte AES-256-GCM data key (``sealing.Sealer`` uses those).
New tokens are signed with the active key; a token signed with any key still held
verifies (until it expires), and the JWKS lists them all. ``rotate`` adds a new
active key. Where the keys are kept is a ``KeyStore``'s job: ``FileKeyStore`` keeps
them in the keyring directory (0700) in two 0600 files, the key pairs (``KEY_FILE``)
and their metadata (``META_FILE``), and touches nothing but that directory; the
files of a single-key agent (``LEGACY_*``) are taken over on load, their IDs kept.
A cluster's servers share one ring through another store (etcd), which may change
under a server: ``adopt`` installs a ring another server stored.

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
import contextlib
import enum
import hashlib
import json
import math
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

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
    "FileKeyStore",
    "IdentityVerifier",
    "KeyState",
    "KeyStore",
    "Keyring",
    "KeyringConflict",
    "KeyringError",
    "RootKey",
]

DEFAULT_AUDIENCE = "nomadproject.io"
ALGORITHM = "RS256"
# The one data-key algorithm, as Nomad names it (``RootKeyMeta.Algorithm``).
DATA_KEY_ALGORITHM = "aes256-gcm"
# Every root key's secret material, one PEM pair per key in the order of META_FILE: its RSA
# signing key (PKCS#8) and its 32-byte data key.
KEY_FILE = "root_keys.pem"
# What is known about each root key (ID, create time, state, public key fingerprint) and
# which one is active; no secrets.
META_FILE = "root_keys.json"
# The files of agents from before rotation (one signing key, one separate data key),
# migrated on load with their IDs kept.
LEGACY_KEY_FILE = "identity_key.pem"
LEGACY_META_FILE = "identity_key.json"
LEGACY_DATA_KEY_FILE = "data_key.json"

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
DATA_KEY_BYTES = 32
_SIGNING_BLOCK = b"PRIVATE KEY"
_DATA_KEY_BLOCK = b"NOMAD DATA KEY"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----\r?\n?", re.S)

# The JWS codec. Only RS256 is registered, and each decode pins it again.
_JWS = jwt.PyJWS(algorithms=[ALGORITHM])


class IdentityError(Exception):
    """A token was rejected; ``str()`` is a short plain reason."""


class KeyringError(Exception):
    """The keyring's store (its directory and files, or its shared copy) is unusable."""


class KeyringConflict(KeyringError):
    """The stored ring is not the one this keyring last read or wrote: another server created
    or changed it first."""


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


class KeyState(enum.StrEnum):
    """A root key's state, spelled as Nomad's ``RootKeyState`` values."""

    ACTIVE = "active"
    INACTIVE = "inactive"
    # Older keys during a full rotation, until every value sealed with them is re-sealed.
    REKEYING = "rekeying"
    PREPUBLISHED = "prepublished"
    DEPRECATED = "deprecated"


@attrs.frozen
class RootKey:
    """One root key, as in Nomad: an RSA key that signs workload identities (its ID is their
    ``kid``) and a 32-byte AES-256-GCM data key (its ID names the values it sealed)."""

    key_id: str
    create_time: float
    state: KeyState
    private_key: rsa.RSAPrivateKey = attrs.field(repr=False, eq=False)
    data_key: bytes = attrs.field(repr=False)
    # A migrated agent's data key had an ID of its own; values sealed then still name it.
    legacy_data_key_id: str | None = None

    @classmethod
    def generate(cls, state: KeyState = KeyState.ACTIVE) -> RootKey:
        return cls(key_id=str(uuid.uuid4()), create_time=time.time(), state=state,
                   private_key=_new_rsa_key(), data_key=secrets.token_bytes(DATA_KEY_BYTES))

    def meta(self) -> dict[str, Any]:
        """Nomad's ``RootKeyMeta`` (the shape of ``/v1/operator/keyring/keys``). The keys are
        not raft entries here, so their indexes are 0, as Nomad's rotate answer shows them."""
        return {"KeyID": self.key_id, "Algorithm": DATA_KEY_ALGORITHM,
                "CreateTime": int(self.create_time * 1e9), "CreateIndex": 0,
                "ModifyIndex": 0, "State": str(self.state), "PublishTime": 0}


class KeyStore(Protocol):
    """Where a keyring's root keys are kept."""

    async def load(self) -> list[RootKey] | None:
        """The stored ring, or None when there is none yet."""
        ...

    async def save(self, keys: Sequence[RootKey], *, new_ring: bool) -> None:
        """Store ``keys`` as the whole ring: the first one (``new_ring``), or the successor of
        the ring this store last loaded or saved (what it compares is taken when called, before
        any await). A shared store raises ``KeyringConflict`` when another writer got there
        first (its ring exists, or it changed since)."""
        ...


class FileKeyStore:
    """The root keys in a private directory of this agent's (embedded mode)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    async def load(self) -> list[RootKey] | None:
        # Worker threads: the file I/O is blocking.
        return await asyncio.to_thread(_load_keys, self.directory)

    async def save(self, keys: Sequence[RootKey], *, new_ring: bool) -> None:
        await asyncio.to_thread(_write_keys, self.directory, keys, new_ring=new_ring)


# How often a change of a shared ring is tried again when another server changed it first.
_COMMIT_ATTEMPTS = 5


class Keyring:
    """Every root key held: signs with the active one (and publishes and verifies with all),
    hands the data keys to the sealer, rotates, and persists the set in its store."""

    def __init__(self, keys: Sequence[RootKey], directory: Path | None = None, *,
                 store: KeyStore | None = None) -> None:
        _check_one_active(keys)
        # The ``iss`` of every token signed, and what OIDC discovery advertises; the agent
        # sets it once its address is known. None: no ``iss``, and discovery is off.
        self.issuer: str | None = None
        if store is None and directory is not None:
            store = FileKeyStore(directory)
        self._store = store
        self._rotate_lock = asyncio.Lock()
        self._install(keys)

    def adopt(self, keys: Sequence[RootKey]) -> None:
        """Hold ``keys`` from now on: the ring as another server stored it."""
        _check_one_active(keys)
        self._install(keys)

    def _install(self, keys: Sequence[RootKey]) -> None:
        # One assignment per attribute: a reader on the loop never sees half a rotation.
        self._keys = {key.key_id: key for key in keys}
        self._active = next(k for k in keys if k.state is KeyState.ACTIVE)
        # Verification keys by ``kid``: a token's header can only pick one of these.
        self._verification_keys = {k.key_id: k.private_key.public_key() for k in keys}
        data_keys = {k.key_id: k.data_key for k in keys}
        data_keys.update({k.legacy_data_key_id: k.data_key for k in keys
                          if k.legacy_data_key_id})
        self._data_keys = data_keys

    @property
    def key_id(self) -> str:
        """The active key's ID: the ``kid`` of tokens signed now."""
        return self._active.key_id

    @property
    def create_time(self) -> float:
        return self._active.create_time

    def keys(self) -> list[RootKey]:
        """Every root key held, oldest first."""
        return list(self._keys.values())

    def active_data_key(self) -> tuple[str, bytes]:
        return self._active.key_id, self._active.data_key

    def data_key(self, key_id: str) -> bytes | None:
        return self._data_keys.get(key_id)

    @property
    def rekeying(self) -> bool:
        """Whether a full rotation is unfinished (its re-sealing still to do)."""
        return any(k.state is KeyState.REKEYING for k in self._keys.values())

    # ------------------------------------------------------------------ rotation

    async def rotate(self, *, full: bool = False) -> RootKey:
        """Make a new active key; the old ones stay for verifying and unsealing. With
        ``full`` they are marked ``rekeying`` until ``finish_rekeying`` (the caller re-seals
        every stored value in between). The new set is on disk before it is used."""
        async with self._rotate_lock:
            new = await asyncio.to_thread(RootKey.generate)
            retired = KeyState.REKEYING if full else KeyState.INACTIVE

            def change(keys: list[RootKey]) -> list[RootKey]:
                return [*(k if k.state is not KeyState.ACTIVE else attrs.evolve(k, state=retired)
                          for k in keys), new]

            await self._commit(change)
            return new

    async def finish_rekeying(self) -> None:
        """Every value is sealed with the active key now: ``rekeying`` keys become inactive."""

        def change(keys: list[RootKey]) -> list[RootKey] | None:
            if not any(k.state is KeyState.REKEYING for k in keys):
                return None
            return [attrs.evolve(k, state=KeyState.INACTIVE) if k.state is KeyState.REKEYING
                    else k for k in keys]

        async with self._rotate_lock:
            await self._commit(change)

    async def _commit(self, change: Callable[[list[RootKey]], list[RootKey] | None]) -> None:
        """Store and install ``change`` applied to the ring. A shared ring another server
        changed first is read again and the change applied to that, so neither is lost."""
        for attempt in range(_COMMIT_ATTEMPTS):
            keys = change(self.keys())
            if keys is None:
                return
            if self._store is None:
                self._install(keys)
                return
            try:
                await self._store.save(keys, new_ring=False)
            except KeyringConflict:
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                current = await self._store.load()
                if current is None:
                    raise KeyringError("the stored keyring disappeared") from None
                self.adopt(current)
                continue
            self._install(keys)
            return

    # ------------------------------------------------------------------ persistence

    @classmethod
    async def load_or_create(cls, keyring_dir: Path) -> Keyring:
        """Load the root keys from ``keyring_dir``, creating the first one on first use and
        migrating the files of a single-key agent (IDs kept)."""
        return await cls.load_or_create_from(FileKeyStore(Path(keyring_dir)))

    @classmethod
    async def load_or_create_from(cls, store: KeyStore) -> Keyring:
        """Load the ring ``store`` holds, creating its first key on first use. When servers
        sharing a store start together, one creates the ring and the others load it."""
        keys = await store.load()
        if keys is None:
            # A worker thread: RSA key generation takes tens to hundreds of milliseconds.
            first = [await asyncio.to_thread(RootKey.generate)]
            try:
                await store.save(first, new_ring=True)
                keys = first
            except KeyringConflict:
                keys = await store.load()
                if keys is None:
                    raise KeyringError("the keyring another server created cannot be "
                                       "found") from None
        return cls(keys, store=store)

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
        """Sign a task identity token (RS256, header ``kid`` = the active key's id)."""
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
        # The header is {"alg": "RS256", "kid": <the active key's id>, "typ": "JWT"}.
        active = self._active
        return _JWS.encode(
            payload, active.private_key, algorithm=ALGORITHM, headers={"kid": active.key_id}
        )

    def jwks(self) -> dict[str, Any]:
        """The public key set, as served at ``/.well-known/jwks.json``: every key held, so
        identities signed before a rotation keep verifying elsewhere too."""
        return {"keys": [_jwk(key_id, public_key)
                         for key_id, public_key in self._verification_keys.items()]}

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


def _check_one_active(keys: Sequence[RootKey]) -> None:
    actives = [k for k in keys if k.state is KeyState.ACTIVE]
    if len(actives) != 1:
        raise ValueError(f"a keyring needs exactly one active key, got {len(actives)}")


def _digest(token: str) -> bytes:
    # surrogatepass: a token string may hold lone surrogates; it must still hash.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _jwk(key_id: str, public_key: rsa.RSAPublicKey) -> dict[str, Any]:
    numbers = public_key.public_numbers()
    return {
        "kty": "RSA",
        "kid": key_id,
        "use": "sig",
        "alg": ALGORITHM,
        "n": _b64url_encode(_int_bytes(numbers.n)),
        "e": _b64url_encode(_int_bytes(numbers.e)),
    }


def _new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=_RSA_EXPONENT, key_size=_RSA_BITS)


def public_fingerprint(public_key: rsa.RSAPublicKey) -> str:
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


# ---------------------------------------------------------------------- the root key files
# Runs in worker threads (``FileKeyStore``).


def _refuse_keys_without_metadata(key_path: Path, meta_path: Path, what: str) -> None:
    # The key file is the commit point and metadata is written first, so a key without its
    # metadata was never created by us: it is never guessed at, nor replaced.
    if not os.path.lexists(meta_path):
        raise KeyringError(f"{meta_path}: missing, but {key_path.name} exists; "
                           f"refusing to replace {what}")


def _load_keys(directory: Path) -> list[RootKey] | None:
    ensure_private_dir(directory)
    key_path, meta_path = directory / KEY_FILE, directory / META_FILE
    keys: list[RootKey] | None
    if os.path.lexists(key_path):
        _refuse_keys_without_metadata(key_path, meta_path, "existing root keys")
        keys = _read_keys(key_path, meta_path)
    else:
        # No key file: a new ring (None: or one whose creation was interrupted before its
        # commit point), or the files of a single-key agent to take over.
        keys = _read_legacy_keys(directory)
        if keys is not None:
            _write_keys(directory, keys, new_ring=True)
    # This code never writes the single-key files: once the ring holds their keys they go.
    for name in (LEGACY_KEY_FILE, LEGACY_META_FILE, LEGACY_DATA_KEY_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
    return keys


def _write_keys(directory: Path, keys: Sequence[RootKey], *, new_ring: bool) -> None:
    """Write both files (0600, atomically each). The commit point of a new ring is the key
    file: metadata without keys is an interrupted creation, started again, and nothing can
    have been signed or sealed with it. The commit point of a change to an existing ring is
    the metadata: key pairs past the ones it lists are an interrupted rotation, ignored."""
    active = next(k for k in keys if k.state is KeyState.ACTIVE)
    meta = {
        "key_id": active.key_id,
        "keys": [
            {
                "key_id": key.key_id,
                "algorithm": DATA_KEY_ALGORITHM,
                "create_time": key.create_time,
                "state": str(key.state),
                "public_key_sha256": public_fingerprint(key.private_key.public_key()),
                **({"legacy_data_key_id": key.legacy_data_key_id}
                   if key.legacy_data_key_id else {}),
            }
            for key in keys
        ],
    }
    files = [
        (META_FILE, json.dumps(meta, indent=2).encode() + b"\n"),
        (KEY_FILE, b"".join(_key_pair_pem(key) for key in keys)),
    ]
    for name, data in files if new_ring else reversed(files):
        write_keyring_file(directory, name, data)


def signing_key_pem(key: RootKey) -> bytes:
    """A root key's RSA signing key as PKCS#8 PEM, unencrypted: seal it before it leaves."""
    return key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_pair_pem(key: RootKey) -> bytes:
    signing = signing_key_pem(key)
    body = base64.encodebytes(key.data_key)  # 64-character lines, as PEM has them
    label = _DATA_KEY_BLOCK
    return signing + b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"


@attrs.frozen
class _KeyMeta:
    key_id: str
    create_time: float
    state: KeyState
    fingerprint: str
    legacy_data_key_id: str | None


def _read_keys(key_path: Path, meta_path: Path) -> list[RootKey]:
    entries = _read_meta(meta_path)
    pem = read_private_file(key_path)
    blocks = [(m.group(1), m.group(0), m.group(2)) for m in _PEM_BLOCK.finditer(pem)]
    pairs = list(zip(blocks[0::2], blocks[1::2], strict=False))[: len(entries)]
    if len(pairs) < len(entries) or any(
        signing[0] != _SIGNING_BLOCK or data[0] != _DATA_KEY_BLOCK for signing, data in pairs
    ):
        raise KeyringError(
            f"{key_path}: corrupt data key or signing key "
            f"(expected {len(entries)} key pairs, as {meta_path.name} lists)"
        )
    keys = []
    for entry, (signing, data) in zip(entries, pairs, strict=True):
        private_key = load_signing_key(key_path, signing[1])
        if public_fingerprint(private_key.public_key()) != entry.fingerprint:
            raise KeyringError(f"{key_path}: does not match the key recorded in {meta_path.name}")
        try:
            data_key = base64.b64decode(b"".join(data[2].split()), validate=True)
        except (binascii.Error, ValueError):
            data_key = b""
        if len(data_key) != DATA_KEY_BYTES:
            raise KeyringError(f"{key_path}: corrupt data key of root key {entry.key_id}")
        keys.append(RootKey(key_id=entry.key_id, create_time=entry.create_time,
                            state=entry.state, private_key=private_key, data_key=data_key,
                            legacy_data_key_id=entry.legacy_data_key_id))
    return keys


def _read_meta(meta_path: Path) -> list[_KeyMeta]:
    try:
        meta = json.loads(read_private_file(meta_path))
        entries = [_key_meta(entry) for entry in meta["keys"]]
        actives = [e.key_id for e in entries if e.state is KeyState.ACTIVE]
        if actives != [meta["key_id"]]:
            raise ValueError("exactly one key, the one named by key_id, must be active")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyringError(f"{meta_path}: corrupt keyring metadata ({exc})") from None
    return entries


def _key_meta(entry: dict[str, Any]) -> _KeyMeta:
    _check_algorithm(entry["algorithm"], DATA_KEY_ALGORITHM)
    legacy = entry.get("legacy_data_key_id")
    return _KeyMeta(
        key_id=str(uuid.UUID(entry["key_id"])),
        create_time=_number(entry["create_time"]),
        state=KeyState(entry["state"]),
        fingerprint=str(entry["public_key_sha256"]),
        legacy_data_key_id=str(uuid.UUID(legacy)) if legacy else None,
    )


def _check_algorithm(algorithm: object, expected: str) -> None:
    if algorithm != expected:
        raise ValueError(f"unsupported algorithm {algorithm!r}")


def _number(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError("create_time is not a number")
    return float(value)


def load_signing_key(where: str | Path, pem: bytes) -> rsa.RSAPrivateKey:
    """A root key's RSA signing key from its PKCS#8 PEM; errors start with ``where``."""
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyringError(f"{where}: corrupt signing key ({exc})") from None
    if not isinstance(private_key, rsa.RSAPrivateKey) or private_key.key_size < _RSA_BITS:
        raise KeyringError(f"{where}: not an RSA key of at least {_RSA_BITS} bits")
    return private_key


# ---- the files of a single-key agent


def _read_legacy_keys(directory: Path) -> list[RootKey] | None:
    """The one root key a single-key agent's files make, both IDs kept (tokens name the
    signing key's, sealed values the data key's); None when there are no such files."""
    key_path, meta_path = directory / LEGACY_KEY_FILE, directory / LEGACY_META_FILE
    data_path = directory / LEGACY_DATA_KEY_FILE
    signing = None
    if os.path.lexists(key_path):
        _refuse_keys_without_metadata(key_path, meta_path, "an existing signing key")
        signing = _read_legacy_signing_key(key_path, meta_path)
    data = _read_legacy_data_key(data_path) if os.path.lexists(data_path) else None
    if signing is None and data is None:
        return None
    key_id, create_time, private_key = signing or (str(uuid.uuid4()), time.time(),
                                                   _new_rsa_key())
    data_key_id, data_key = data or (key_id, secrets.token_bytes(DATA_KEY_BYTES))
    return [RootKey(key_id=key_id, create_time=create_time, state=KeyState.ACTIVE,
                    private_key=private_key, data_key=data_key,
                    legacy_data_key_id=data_key_id if data_key_id != key_id else None)]


def _read_legacy_signing_key(key_path: Path, meta_path: Path
                             ) -> tuple[str, float, rsa.RSAPrivateKey]:
    try:
        meta = json.loads(read_private_file(meta_path))
        key_id = str(uuid.UUID(meta["key_id"]))
        create_time = _number(meta["create_time"])
        fingerprint = meta["public_key_sha256"]
        _check_algorithm(meta["algorithm"], ALGORITHM)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyringError(f"{meta_path}: corrupt keyring metadata ({exc})") from None
    private_key = load_signing_key(key_path, read_private_file(key_path))
    if public_fingerprint(private_key.public_key()) != fingerprint:
        raise KeyringError(f"{key_path}: does not match the key recorded in {meta_path.name}")
    return key_id, create_time, private_key


def _read_legacy_data_key(path: Path) -> tuple[str, bytes]:
    raw = read_private_file(path)
    try:
        record = json.loads(raw)
        key = base64.b64decode(record["key"], validate=True)
        if len(key) != DATA_KEY_BYTES:
            raise ValueError("wrong length")
        return str(uuid.UUID(record["key_id"])), key
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        # The type only: the message could quote the key.
        raise KeyringError(f"{path}: corrupt data key ({type(exc).__name__})") from None
