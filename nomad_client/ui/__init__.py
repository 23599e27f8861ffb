"""The agent's web UI: a few static files shipped in the package, served at ``/ui/``.

Only the names in ``ASSETS`` can ever be read: a request path is looked up in that table,
never joined to a directory, so no spelling of a path reaches another file.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR: Path = Path(__file__).resolve().parent / "static"
INDEX = "index.html"

# Name -> content type. Everything the page loads comes from here (no CDN, no network).
ASSETS: dict[str, str] = {
    INDEX: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

# On every UI response. The page's values are attacker-controlled (job names, metadata, log
# lines): no inline script may run, nothing is fetched from another origin, and no other
# site may frame the page.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_asset(name: str) -> tuple[bytes, str] | None:
    """The bytes and content type of the asset ``name``, or None if it is no asset (or
    missing from a broken install). Blocking on a name's first read: call it from a worker
    thread unless ``cached_asset`` has it."""
    if name not in ASSETS:  # checked first: a caller's name never reaches the cache
        return None
    return _read(name)


def cached_asset(name: str) -> tuple[bytes, str] | None:
    """The asset if it was read already (no I/O: safe on the event loop), else None."""
    return _loaded.get(name)


_loaded: dict[str, tuple[bytes, str]] = {}


def _read(name: str) -> tuple[bytes, str] | None:
    try:
        data = (STATIC_DIR / name).read_bytes()
    except OSError:  # a broken install: answered as a missing file, not a crash
        return None
    # The files are package data and do not change while the agent runs.
    _loaded[name] = (data, ASSETS[name])
    return _loaded[name]
