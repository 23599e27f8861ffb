"""The one error type handlers raise; the router turns it into a plain-text response."""

from __future__ import annotations

from typing import TypeVar

_T = TypeVar("_T")


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


def not_found(message: str) -> HTTPError:
    return HTTPError(404, message)


def found_or_404(value: _T | None, missing: str) -> _T:
    """``value``, unless the lookup that gave it found nothing: then a 404 saying ``missing``."""
    if value is None:
        raise not_found(missing)
    return value


PERMISSION_DENIED = "Permission denied"
