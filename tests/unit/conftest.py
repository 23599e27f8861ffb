"""Fixtures shared by the unit tests; the plain builders they use are in ``factories.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nomad_client.server.keyring import Keyring
from tests.unit.factories import ServedAPI, fresh_dir, make_server, node, run_in_own_loop, serving

if TYPE_CHECKING:
    from tests.unit.test_cli import Nomad


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


@pytest.fixture
async def nomad(tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[Nomad]:
    """An agent in this process, with the CLI's environment pointing at it (``test_cli``'s
    ``start_nomad``); stopped afterwards, its server's drain watchers with it."""
    # Imported here: only the tests that ask for an agent load the CLI test module.
    from tests.unit.test_cli import start_nomad

    started = await start_nomad(tmp_path, keyring, monkeypatch)
    yield started
    await started.agent.stop()
    await started.server.drainer.close()


@pytest.fixture
async def acl_node_api(keyring: Keyring) -> AsyncIterator[ServedAPI]:
    """A server with ACLs on and one node, "n1", its API served over TCP."""
    server = make_server(keyring, acl=True)
    await server.register_node(node("n1"))
    async with serving(server) as served:
        yield served
