"""The RPC wire's plain parts: frames, requests and replies, errors, server addresses."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from nomad_client.rpcwire import errors
from nomad_client.rpcwire.address import ServerAddress, parse_address
from nomad_client.rpcwire.errors import RPCError, error_from_wire, error_to_wire
from nomad_client.rpcwire.framing import (
    FrameError,
    FrameTooLarge,
    MalformedRequest,
    Request,
    encode_frame,
    parse_reply,
    parse_request,
    read_frame,
)


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


NESTED = {"Bytes": b"\x00\xff", "Big": 2**40, "Neg": -(2**40), "None": None,
          "List": [1, "two", [3.5, {"k": True}]], "Map": {"a": {"b": {"c": None}}}}


async def test_frames_round_trip_nested_values() -> None:
    reader = _reader(encode_frame(NESTED) + encode_frame([1, 2]))
    assert await read_frame(reader) == NESTED
    assert await read_frame(reader) == [1, 2]
    with pytest.raises(EOFError):
        await read_frame(reader)


async def test_length_over_the_cap_is_refused_before_the_body_is_read() -> None:
    # Only the header is there: reading the body would wait for 4 GiB that never come.
    with pytest.raises(FrameTooLarge):
        await read_frame(_reader(struct.pack(">I", 2**32 - 1)))
    with pytest.raises(FrameTooLarge):
        await read_frame(_reader(struct.pack(">I", 101) + b"x" * 101), max_frame=100)


@pytest.mark.parametrize("data", [
    struct.pack(">I", 0),
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # 0xc1 is never used in msgpack
    struct.pack(">I", 2) + b"\x91",  # truncated body
    b"\x00\x00",  # truncated header
    struct.pack(">I", 2) + b"\x01\x02",  # two values in one frame
    struct.pack(">I", 3) + b"\xd4\x01\x00",  # an extension type
    struct.pack(">I", 3) + b"\xa2\xff\xfe",  # a string that is not UTF-8
])
async def test_broken_frames_are_frame_errors(data: bytes) -> None:
    with pytest.raises(FrameError):
        await read_frame(_reader(data))


def test_encode_refuses_over_the_cap() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame({"x": b"y" * 200}, max_frame=100)


def test_request_round_trip() -> None:
    request = Request(7, "Node.Register", NESTED, 1.5)
    assert parse_request(msgpack.unpackb(msgpack.packb(request.to_wire()))) == request
    assert parse_request({"ID": 1, "Method": "M"}) == Request(1, "M", {}, None)


@pytest.mark.parametrize(("value", "request_id"), [
    ([1, 2], None),
    ({"Method": "M"}, None),
    ({"ID": "1", "Method": "M"}, None),
    ({"ID": True, "Method": "M"}, None),
    ({"ID": -1, "Method": "M"}, None),
    ({"ID": 3, "Method": 5}, 3),
    ({"ID": 3, "Method": ""}, 3),
    ({"ID": 3, "Method": "M" * 1000}, 3),
    ({"ID": 3, "Method": "M", "Args": [1]}, 3),
    ({"ID": 3, "Method": "M", "Timeout": "5"}, 3),
    ({"ID": 3, "Method": "M", "Timeout": -1}, 3),
    ({"ID": 3, "Method": "M", "Timeout": float("nan")}, 3),
])
def test_malformed_requests(value: object, request_id: int | None) -> None:
    with pytest.raises(MalformedRequest) as caught:
        parse_request(value)
    assert caught.value.request_id == request_id


def test_reply_needs_an_id() -> None:
    assert parse_reply({"ID": 2, "Result": [1], "Error": None}).result == [1]
    for bad in ({"Result": 1}, "x", {"ID": None}):
        with pytest.raises(FrameError):
            parse_reply(bad)


class NotFound(Exception):
    """Named like the server's own NotFound: matched by name."""


@pytest.mark.parametrize(("exc", "code"), [
    (PermissionError("no"), errors.PERMISSION_DENIED),
    (KeyError("node-1"), errors.NOT_FOUND),
    (NotFound("job x"), errors.NOT_FOUND),
    (ValueError("bad"), errors.BAD_REQUEST),
    (TypeError("bad"), errors.BAD_REQUEST),
    (TimeoutError(), errors.DEADLINE),
    (RPCError(errors.CONFLICT, "index moved"), errors.CONFLICT),
    (errors.UnknownMethod("nope"), errors.UNKNOWN_METHOD),
])
def test_error_mapping(exc: Exception, code: str) -> None:
    wire = error_to_wire(exc)
    assert wire["Code"] == code and wire["Message"]
    rebuilt = error_from_wire(wire)
    assert rebuilt.code == code
    assert isinstance(rebuilt, RPCError)


def test_unexpected_errors_say_nothing_but_internal(caplog: pytest.LogCaptureFixture) -> None:
    wire = error_to_wire(RuntimeError("secret-token-value"))
    assert wire == {"Code": errors.INTERNAL, "Message": "internal error"}
    assert "RPC handler failed" in caplog.text  # logged on the server, for its operator


def test_client_side_classes_keep_the_builtin_families() -> None:
    assert isinstance(error_from_wire({"Code": errors.PERMISSION_DENIED, "Message": "m"}),
                      PermissionError)
    assert isinstance(error_from_wire({"Code": errors.BAD_REQUEST, "Message": "m"}), ValueError)
    assert isinstance(error_from_wire({"Code": errors.DEADLINE, "Message": "m"}), TimeoutError)
    denied = errors.PermissionDenied("node secret mismatch")
    assert str(denied) == "node secret mismatch" and denied.code == errors.PERMISSION_DENIED
    assert error_from_wire({"Code": "FUTURE", "Message": "m"}).code == "FUTURE"
    assert error_from_wire("junk").code == errors.INTERNAL
    assert len(error_to_wire(ValueError("x" * 10_000))["Message"]) < 2000


@pytest.mark.parametrize(("text", "host", "port"), [
    ("10.0.0.1", "10.0.0.1", 4647),
    ("10.0.0.1:4648", "10.0.0.1", 4648),
    ("nomad.example.com:1", "nomad.example.com", 1),
    ("[::1]:4650", "::1", 4650),
    ("[fe80::1]", "fe80::1", 4647),
    ("::1", "::1", 4647),
    (" host:80 ", "host", 80),
])
def test_parse_address(text: str, host: str, port: int) -> None:
    assert parse_address(text) == ServerAddress(host, port)


def test_address_formats_back() -> None:
    assert str(parse_address("::1")) == "[::1]:4647"
    assert str(parse_address("h:1")) == "h:1"


@pytest.mark.parametrize(("text", "words"), [
    ("", "empty"),
    ("host:", "not a number"),
    ("host:abc", "not a number"),
    ("host:0", "out of range"),
    ("host:65536", "out of range"),
    (":4647", "missing host"),
    ("[::1", "missing ']'"),
    ("[nothost]:1", "not an IPv6 address"),
    ("[::1]x", "expected ':port'"),
    ("fe80::zz:1", "needs brackets"),
    ("a b:1", "whitespace"),
    ("host:+1", "not a number"),
])
def test_bad_addresses(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="invalid server address") as caught:
        parse_address(text)
    assert words in str(caught.value)
