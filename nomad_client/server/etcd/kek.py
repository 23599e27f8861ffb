"""The key-encryption key (KEK): what seals the root keys the servers share through etcd.

Every server of a cluster reads the same KEK from ``server { keyring_kek_file = PATH }``: 32
random bytes, base64. The file is treated like an ssh private key: it must be a regular file
owned by the agent's user and unreadable by group and others, or it is refused. Errors name the
file and what is wrong, never its content.

``seal``/``open_`` are AES-256-GCM with a random 12-byte nonce. A blob is
``version || nonce || ciphertext+tag``; the version byte and the caller's ``aad`` (a root key's
ID) are authenticated, so a blob copied under another key's name does not open.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEK_BYTES", "KEKError", "generate_kek", "load_kek", "open_", "seal"]

KEK_BYTES = 32
_NONCE_BYTES = 12
_VERSION = b"\x01"
# The base64 of 32 bytes is 44 characters; anything much larger is not a KEK file.
_MAX_FILE_BYTES = 4096


class KEKError(Exception):
    """The KEK file is unusable, or a blob does not open with the KEK. Never holds key bytes."""


def generate_kek() -> str:
    """A new KEK, as its file holds it (base64 of 32 random bytes)."""
    return base64.b64encode(secrets.token_bytes(KEK_BYTES)).decode("ascii")


def load_kek(path: str | os.PathLike[str]) -> bytes:
    """Read and check the KEK file at ``path``. Blocking (a few system calls): call it at
    start-up or from a worker thread."""
    name = os.fspath(path)
    try:
        # Symlinks are followed (secrets are often mounted through one); the checks below
        # look at the file actually opened.
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KEKError(f"key-encryption key file {name}: does not exist") from None
    except OSError as exc:
        raise KEKError(f"key-encryption key file {name}: cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KEKError(f"key-encryption key file {name}: not a regular file")
        if st.st_uid != os.geteuid():
            raise KEKError(f"key-encryption key file {name}: owned by uid {st.st_uid}, not by "
                           f"this agent's user (uid {os.geteuid()}); refusing to use it")
        if st.st_mode & 0o077:
            raise KEKError(f"key-encryption key file {name}: mode "
                           f"{stat.S_IMODE(st.st_mode):04o} lets group or others read it; "
                           f"refusing to use it (chmod 600)")
        try:
            raw = os.read(fd, _MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise KEKError(f"key-encryption key file {name}: cannot read "
                           f"({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > _MAX_FILE_BYTES:
        raise KEKError(f"key-encryption key file {name}: too large to be a key "
                       f"(expected {KEK_BYTES} bytes, base64)")
    try:
        kek = base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KEKError(f"key-encryption key file {name}: not base64 "
                       f"(expected {KEK_BYTES} random bytes, base64)") from None
    if len(kek) != KEK_BYTES:
        raise KEKError(f"key-encryption key file {name}: decodes to {len(kek)} bytes, "
                       f"expected {KEK_BYTES}")
    return kek


def _aead(kek: bytes) -> AESGCM:
    if len(kek) != KEK_BYTES:
        raise KEKError(f"a key-encryption key is {KEK_BYTES} bytes, got {len(kek)}")
    return AESGCM(kek)


def seal(kek: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``kek``, bound to ``aad``."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return _VERSION + nonce + _aead(kek).encrypt(nonce, plaintext, _VERSION + aad)


def open_(kek: bytes, blob: bytes, aad: bytes) -> bytes:
    """Decrypt a ``seal`` blob; ``KEKError`` if it is not one, or not sealed with this KEK
    and ``aad``."""
    aead = _aead(kek)
    if len(blob) < 1 + _NONCE_BYTES + 16:
        raise KEKError("sealed blob is truncated")
    if blob[:1] != _VERSION:
        raise KEKError(f"sealed blob has unknown version {blob[0]}")
    nonce, ciphertext = blob[1:1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES:]
    try:
        return aead.decrypt(nonce, ciphertext, _VERSION + aad)
    except InvalidTag:
        raise KEKError("sealed blob does not open with this key-encryption key") from None
