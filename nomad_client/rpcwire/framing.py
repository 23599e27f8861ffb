"""The RPC wire format.

A connection opens with one handshake byte (``HANDSHAKE``), inside TLS when TLS is on; then
each direction carries frames: a 4-byte big-endian length, then that many bytes of one
msgpack map.

* request: ``{"ID": int, "Method": str, "Args": map, "Timeout": float seconds}``
* reply:   ``{"ID": int, "Result": any, "Error": None | {"Code": str, "Message": str}}``

Many requests may be in flight on one connection; replies come back in completion order and
are matched by ``ID``. The length is checked against the cap before a byte of the body is
read, so a hostile length costs nothing but the connection.
"""

from __future__ import annotations

import asyncio
import math
import struct
from typing import Any, Final, TypeGuard

import attrs
import msgpack

HANDSHAKE: Final = b"\x4e"  # "N"
MAX_FRAME: Final = 64 * 1024 * 1024
MAX_METHOD: Final = 256
_HEADER: Final = struct.Struct(">I")
_MAX_ID: Final = 2**64 - 1


class FrameError(ValueError):
    """The peer broke the protocol; the connection cannot go on."""


class FrameTooLarge(FrameError):
    pass


class MalformedRequest(FrameError):
    """A request that cannot be served. With a ``request_id`` the connection can go on (the
    peer gets a BAD_REQUEST reply); without one nobody can be answered."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _no_ext(code: int, data: bytes) -> Any:
    # Handlers take plain values; msgpack extension types (timestamps...) are not part of it.
    raise ValueError(f"msgpack extension type {code} is not accepted")


def encode_frame(value: Any, *, max_frame: int = MAX_FRAME) -> bytes:
    """One frame; ``TypeError`` for a value msgpack cannot carry, ``FrameTooLarge`` over the
    cap (the peer would refuse it)."""
    body = msgpack.packb(value, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes is over the {max_frame} byte limit")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises many kinds (ExtraData, StackError, Unicode...)
        raise FrameError(f"undecodable frame: {type(exc).__name__}") from None


async def read_frame(reader: asyncio.StreamReader, *, max_frame: int = MAX_FRAME) -> Any:
    """The next frame's value; ``EOFError`` at a clean end of stream (between frames),
    ``FrameError`` for a broken one (including a stream cut inside a frame)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("stream ended inside a frame header") from None
        raise EOFError from None
    (length,) = _HEADER.unpack(header)
    if length > max_frame:
        raise FrameTooLarge(f"frame length {length} is over the {max_frame} byte limit")
    if length == 0:
        raise FrameError("empty frame")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError("stream ended inside a frame") from None
    return decode_body(body)


def _is_id(value: Any) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= _MAX_ID


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@attrs.frozen
class Request:
    id: int
    method: str
    args: dict[str, Any]
    timeout: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"ID": self.id, "Method": self.method, "Args": self.args,
                "Timeout": self.timeout}


def parse_request(value: Any) -> Request:
    if not isinstance(value, dict):
        raise MalformedRequest(f"request is a {type(value).__name__}, not a map")
    request_id = value.get("ID")
    if not _is_id(request_id):
        raise MalformedRequest("request has no valid ID")
    method = value.get("Method")
    if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD:
        raise MalformedRequest("request Method must be a non-empty string of at most "
                               f"{MAX_METHOD} characters", request_id)
    args = value.get("Args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise MalformedRequest("request Args must be a map", request_id)
    timeout = value.get("Timeout")
    if timeout is not None and (not _is_number(timeout) or not math.isfinite(timeout)
                                or timeout <= 0):
        raise MalformedRequest("request Timeout must be a positive number of seconds",
                               request_id)
    return Request(request_id, method, args, None if timeout is None else float(timeout))


@attrs.frozen
class Reply:
    id: int
    result: Any = None
    error: dict[str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"ID": self.id, "Result": self.result, "Error": self.error}


def parse_reply(value: Any) -> Reply:
    """A server's reply; ``FrameError`` when it cannot be matched to a request. An ``Error``
    of the wrong shape is kept for ``errors.error_from_wire`` to report."""
    if not isinstance(value, dict) or not _is_id(value.get("ID")):
        raise FrameError("reply has no valid ID")
    error = value.get("Error")
    return Reply(value["ID"], value.get("Result"), error if error is not None else None)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream, waiting a bounded time for a TLS peer's goodbye."""
    writer.close()
    try:
        async with asyncio.timeout(5.0):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except Exception:
        pass  # already broken: closing is all that was left to do
