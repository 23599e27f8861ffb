"""The one error type handlers raise; the router turns it into a plain-text response."""

from __future__ import annotations


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


def not_found(message: str) -> HTTPError:
    return HTTPError(404, message)


PERMISSION_DENIED = "Permission denied"
