"""RPC errors as they travel: a code every side understands, and a message for humans.

Servers raise ordinary exceptions (``PermissionError``, ``NotFound``, ``ValueError``...);
``error_to_wire`` turns them into ``{"Code", "Message"}`` and ``error_from_wire`` rebuilds an
``RPCError`` on the client whose class still matches the original family, so existing
``except PermissionError`` code keeps working across the network.
"""

from __future__ import annotations

import logging
from typing import Any, Final

log = logging.getLogger(__name__)

UNKNOWN_METHOD: Final = "UNKNOWN_METHOD"
BAD_REQUEST: Final = "BAD_REQUEST"
PERMISSION_DENIED: Final = "PERMISSION_DENIED"
NOT_FOUND: Final = "NOT_FOUND"
CONFLICT: Final = "CONFLICT"
DEADLINE: Final = "DEADLINE"
UNAVAILABLE: Final = "UNAVAILABLE"
INTERNAL: Final = "INTERNAL"
NO_SERVER: Final = "NO_SERVER"

# A message travels to the peer and into its logs: long enough for any real message, short
# enough that a handler echoing a huge input does not turn into a huge reply.
MAX_MESSAGE: Final = 1024


class RPCError(Exception):
    """An RPC failed; ``code`` is one of this module's constants (or a peer's unknown one)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class _CodedError(RPCError):
    CODE: str = INTERNAL

    def __init__(self, message: str) -> None:
        # One positional argument only: OSError subclasses read two as (errno, strerror).
        super().__init__(self.CODE, message)


class UnknownMethod(_CodedError):
    CODE = UNKNOWN_METHOD


class BadRequest(_CodedError, ValueError):
    CODE = BAD_REQUEST


class PermissionDenied(_CodedError, PermissionError):
    CODE = PERMISSION_DENIED


class NotFound(_CodedError, LookupError):
    CODE = NOT_FOUND


class Conflict(_CodedError):
    CODE = CONFLICT


class DeadlineExceeded(_CodedError, TimeoutError):
    CODE = DEADLINE


class Unavailable(_CodedError, ConnectionError):
    CODE = UNAVAILABLE


class Internal(_CodedError):
    CODE = INTERNAL


class NoServer(_CodedError, ConnectionError):
    CODE = NO_SERVER


_BY_CODE: dict[str, type[_CodedError]] = {
    cls.CODE: cls for cls in (UnknownMethod, BadRequest, PermissionDenied, NotFound, Conflict,
                              DeadlineExceeded, Unavailable, Internal, NoServer)}


def rpc_error(code: str, message: str) -> RPCError:
    """The most specific ``RPCError`` for ``code``."""
    cls = _BY_CODE.get(code)
    return RPCError(code, message) if cls is None else cls(message)


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."


def _message(exc: BaseException) -> str:
    # KeyError's str() is the repr of its key; its argument reads better.
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return f"not found: {exc.args[0]}"
    return str(exc) or type(exc).__name__


def _named_not_found(exc: BaseException) -> bool:
    # Duck-typed so this module need not import the server (nomad_client.server.server.NotFound).
    return any(cls.__name__ == "NotFound" for cls in type(exc).__mro__)


def error_to_wire(exc: BaseException) -> dict[str, str]:
    """The wire form of an exception a handler raised. Unexpected exceptions are logged here
    and travel as a bare "internal error": no exception text or traceback leaves the server."""
    if isinstance(exc, RPCError):
        code = exc.code
    elif isinstance(exc, PermissionError):
        code = PERMISSION_DENIED
    elif isinstance(exc, TimeoutError):
        code = DEADLINE
    elif isinstance(exc, KeyError) or _named_not_found(exc):
        code = NOT_FOUND
    elif isinstance(exc, ValueError | TypeError):
        code = BAD_REQUEST
    else:
        log.error("RPC handler failed", exc_info=exc)
        return {"Code": INTERNAL, "Message": "internal error"}
    return {"Code": code, "Message": _clip(_message(exc))}


def error_from_wire(value: Any) -> RPCError:
    """Rebuild a peer's error; a malformed one is itself reported as an error, never raised."""
    if (not isinstance(value, dict) or not isinstance(value.get("Code"), str)
            or not isinstance(value.get("Message"), str)):
        return Internal("malformed error in reply")
    return rpc_error(_clip(value["Code"]), _clip(value["Message"]))
