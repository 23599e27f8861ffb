"""Workload identities verified away from the keyring: with the public keys the servers
publish (their JWKS), by the keyring's own checks.

A client-only agent holds no root key, only the servers' public key set. ``PublicKeySet``
builds RSA public keys from JWK entries (strictly: RSA, RS256 or unstated, signature use or
unstated, a sane modulus and exponent) and verifies a token with ``Keyring.verify`` itself,
so the header, signature, claim and time-window rules stay in one place.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from nomad_client.server.keyring import (
    DEFAULT_AUDIENCE,
    MAX_TOKEN_BYTES,
    IdentityClaims,
    IdentityVerifier,
    Keyring,
)

ALGORITHM = "RS256"
# What a JWKS entry may hold: our keys are RSA-2048; anything far outside is not one of ours.
MIN_MODULUS_BITS = 2048
MAX_MODULUS_BITS = 8192
MAX_KEYS = 64
_KID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class JWKSError(ValueError):
    """A public key set that cannot be used; ``str()`` names the entry, never key material."""


def _b64url_int(value: object, what: str) -> int:
    if not isinstance(value, str) or not value or len(value) > 2048:
        raise JWKSError(f"{what} is missing or malformed")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise JWKSError(f"{what} is not base64url") from None
    return int.from_bytes(raw, "big")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> tuple[str, rsa.RSAPublicKey]:
    """The (kid, RSA public key) a JWK entry describes; ``JWKSError`` for anything else."""
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise JWKSError("key without a valid kid")
    if jwk.get("kty") != "RSA":
        raise JWKSError(f"key {kid}: not an RSA key")
    if jwk.get("alg", ALGORITHM) != ALGORITHM:
        raise JWKSError(f"key {kid}: not an {ALGORITHM} key")
    if jwk.get("use", "sig") != "sig":
        raise JWKSError(f"key {kid}: not a signing key")
    n = _b64url_int(jwk.get("n"), f"key {kid}: modulus")
    e = _b64url_int(jwk.get("e"), f"key {kid}: exponent")
    if not MIN_MODULUS_BITS <= n.bit_length() <= MAX_MODULUS_BITS:
        raise JWKSError(f"key {kid}: modulus of {n.bit_length()} bits")
    if e < 3 or e % 2 == 0 or e.bit_length() > 32:
        raise JWKSError(f"key {kid}: unusable exponent")
    try:
        return kid, rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise JWKSError(f"key {kid}: not a valid RSA public key") from None


class PublicKeySet:
    """The servers' signing keys by kid: verifies as a ``Keyring`` does, signs nothing."""

    def __init__(self, keys: Mapping[str, rsa.RSAPublicKey]) -> None:
        # The one attribute ``Keyring.verify`` reads.
        self._verification_keys = dict(keys)

    @classmethod
    def from_jwks(cls, entries: Iterable[Any]) -> PublicKeySet:
        """The set of a JWKS ``keys`` list. Entries that are not usable RSA signing keys are
        an error, not skipped: a server publishes only its own keys."""
        keys: dict[str, rsa.RSAPublicKey] = {}
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise JWKSError("key entry is not an object")
            kid, key = public_key_from_jwk(entry)
            keys[kid] = key
            if len(keys) > MAX_KEYS:
                raise JWKSError(f"more than {MAX_KEYS} keys")
        return cls(keys)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._verification_keys)

    def fingerprint(self) -> frozenset[tuple[str, int, int]]:
        """What identifies the set's content (to tell whether a refetch changed it)."""
        return frozenset((kid, k.public_numbers().n, k.public_numbers().e)
                         for kid, k in self._verification_keys.items())

    def verify(self, token: str, *, audience: str = DEFAULT_AUDIENCE,
               now: float | None = None) -> IdentityClaims:
        """``Keyring.verify`` with these keys: every rule of it, unchanged."""
        return Keyring.verify(cast(Keyring, self), token, audience=audience, now=now)

    def verifier(self) -> IdentityVerifier:
        """The keyring's caching verifier in front of this set."""
        return IdentityVerifier(cast(Keyring, self))


def token_key_id(token: str) -> str | None:
    """The ``kid`` a token's header names, unverified (None when it names none or the token
    is not a JWS): only to decide whether the key set is worth fetching again."""
    if len(token) > MAX_TOKEN_BYTES:
        return None
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    return kid if isinstance(kid, str) else None
