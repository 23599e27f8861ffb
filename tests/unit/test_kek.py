"""The key-encryption key file and the AES-256-GCM sealing of root keys with it."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from nomad_client.server.etcd.kek import KEK_BYTES, KEKError, generate_kek, load_kek, open_, seal


def kek_file(tmp_path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "kek"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def test_generated_key_loads_back(tmp_path: Path) -> None:
    text = generate_kek()
    assert len(base64.b64decode(text, validate=True)) == KEK_BYTES
    assert generate_kek() != text
    assert load_kek(kek_file(tmp_path, text)) == base64.b64decode(text)


def test_whitespace_around_and_inside_is_tolerated(tmp_path: Path) -> None:
    text = generate_kek()
    spaced = f"  {text[:20]}\n{text[20:]}\r\n\n"
    assert load_kek(kek_file(tmp_path, spaced)) == base64.b64decode(text)


def test_symlink_to_a_good_file_is_followed(tmp_path: Path) -> None:
    target = kek_file(tmp_path, generate_kek())
    link = tmp_path / "link"
    link.symlink_to(target)
    assert len(load_kek(link)) == KEK_BYTES


def refusal(path: Path) -> str:
    with pytest.raises(KEKError) as info:
        load_kek(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in refusal(tmp_path / "nope")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_mode_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    message = refusal(kek_file(tmp_path, generate_kek(), mode))
    assert f"{mode:04o}" in message and "refusing" in message


def test_owner_other_than_the_agent_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    path = kek_file(tmp_path, generate_kek())
    os.chown(path, 65534, -1)
    assert "owned by uid" in refusal(path)


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = kek_file(tmp_path, generate_kek(), 0o000)
    assert "cannot open" in refusal(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d"
    path.mkdir(mode=0o700)
    assert "not a regular file" in refusal(path)


@pytest.mark.parametrize("content", ["not base64 at all!", "QUJD=X", "\u00e9\u00e9"])
def test_not_base64(tmp_path: Path, content: str) -> None:
    message = refusal(kek_file(tmp_path, content))
    assert "not base64" in message and content not in message


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_wrong_length(tmp_path: Path, size: int) -> None:
    content = base64.b64encode(os.urandom(size)).decode()
    message = refusal(kek_file(tmp_path, content))
    assert f"decodes to {size} bytes" in message
    if content:
        assert content not in message


def test_huge_file(tmp_path: Path) -> None:
    assert "too large" in refusal(kek_file(tmp_path, b"A" * 100_000))


# ---- sealing ----------------------------------------------------------------------------

KEK = os.urandom(KEK_BYTES)


def test_seal_round_trip_and_randomised() -> None:
    secret = b"root key material" * 10
    one, two = seal(KEK, secret, b"key-1"), seal(KEK, secret, b"key-1")
    assert one != two  # a fresh nonce each time
    assert secret not in one
    assert open_(KEK, one, b"key-1") == secret == open_(KEK, two, b"key-1")


def test_another_kek_does_not_open() -> None:
    blob = seal(KEK, b"secret", b"key-1")
    with pytest.raises(KEKError, match="does not open"):
        open_(os.urandom(KEK_BYTES), blob, b"key-1")


def test_blob_is_bound_to_its_aad() -> None:
    blob = seal(KEK, b"secret", b"key-1")
    with pytest.raises(KEKError, match="does not open"):
        open_(KEK, blob, b"key-2")


@pytest.mark.parametrize("index", [0, 1, 13, -1])
def test_tampering_is_detected(index: int) -> None:
    blob = bytearray(seal(KEK, b"secret", b"key-1"))
    blob[index] ^= 0x01
    with pytest.raises(KEKError):
        open_(KEK, bytes(blob), b"key-1")


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01" + b"\x00" * 27])
def test_truncated_blobs(blob: bytes) -> None:
    with pytest.raises(KEKError, match="truncated"):
        open_(KEK, blob, b"key-1")


def test_kek_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(KEKError, match="32 bytes"):
        seal(b"short", b"x", b"")
