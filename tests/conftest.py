"""Fixtures for every test, unit and integration."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nomad_client.client.drivers.launcher import Launcher


@pytest.fixture(autouse=True)
async def close_launchers(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Drivers made inline by a test start a launcher process with their first task, as
    the agent's do; the agent closes its drivers at shutdown, this closes the tests'."""
    started: list[Launcher] = []
    start = Launcher._start

    async def tracked(self: Launcher) -> object:
        started.append(self)
        return await start(self)

    monkeypatch.setattr(Launcher, "_start", tracked)
    yield
    for launcher in started:
        await launcher.close()
