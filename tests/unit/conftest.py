"""Fixtures shared by the unit tests; the plain builders they use are in ``factories.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_client.server.keyring import Keyring
from tests.unit.factories import fresh_dir, run_in_own_loop


@pytest.fixture(scope="session")
def keyring_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding the session's signing key (``keyring``)."""
    return tmp_path_factory.mktemp("keyring")


@pytest.fixture(scope="session")
def keyring(keyring_dir: Path) -> Keyring:
    """One signing key for the whole session: RSA key generation is slow. Shared by every
    test, so a test that changes it (its ``issuer``) works on ``copy.copy(keyring)``."""
    return run_in_own_loop(Keyring.load_or_create(keyring_dir))


@pytest.fixture(scope="session")
def other_keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    """A second, unrelated signing key: what a forger would sign with."""
    return run_in_own_loop(Keyring.load_or_create(tmp_path_factory.mktemp("other-keyring")))


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory outside pytest's tmp tree, mode 0755: short paths (sockets fit) that
    every user can reach (a task may run as nobody). Removed afterwards."""
    with fresh_dir("unit-", 0o755) as path:
        yield path
