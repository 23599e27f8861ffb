"""Browser tests of the web UI: headless Chromium (Debian's ``chromium`` package) driven by
Playwright for Python. Playwright's own browser builds are never downloaded: the system's
Chromium is launched by path, and installed with apt here when it is missing and we may."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# The agents and their cleanup are the integration tests' (imported, so pytest finds them).
from tests.integration.conftest import short_agent_factory

if TYPE_CHECKING:
    from playwright.async_api import Browser

__all__ = ["short_agent_factory"]

CHROMIUM = Path("/usr/bin/chromium")
# Everything that would reach out on its own (updates, sync, field trials) is off: the tests
# check that the page makes no third-party request, so the browser must make none either.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
_APT_PACKAGES = ["chromium", "chromium-driver"]
# apt on a shared CI machine: slow, but bounded.
_APT_DEADLINE_S = 240.0


def _apt(apt: str, *args: str, deadline: float) -> bool:
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run([apt, *args], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=left, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _install_chromium() -> str | None:
    """Install Chromium with apt when it is missing and we run as root; None when it is
    there, else why not."""
    if CHROMIUM.exists():
        return None
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        return f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)"
    deadline = time.monotonic() + _APT_DEADLINE_S
    install = ("install", "-y", "--no-install-recommends", *_APT_PACKAGES)
    # A fresh machine's package lists may be stale or empty: update once, then try again.
    if not _apt(apt, *install, deadline=deadline):
        _apt(apt, "update", deadline=deadline)
        _apt(apt, *install, deadline=deadline)
    return None if CHROMIUM.exists() else f"installing {CHROMIUM} with apt-get failed"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The system's Chromium, installed first if need be; the test is skipped without it."""
    pytest.importorskip("playwright.async_api", reason="Playwright for Python is not installed")
    reason = _install_chromium()
    if reason is not None:
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """A headless Chromium of its own for each test. Playwright launches it with a fresh
    temporary profile (``--user-data-dir``), removed on close."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS,
            chromium_sandbox=False)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the views' screenshots go: $NOMAD_UI_SCREENSHOTS when set, else the test's
    temp dir."""
    where = Path(os.environ.get("NOMAD_UI_SCREENSHOTS") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where
