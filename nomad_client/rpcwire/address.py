"""Server addresses as operators write them: ``host``, ``host:port``, ``[v6]:port``."""

from __future__ import annotations

import ipaddress
from typing import Final

import attrs

DEFAULT_RPC_PORT: Final = 4647


@attrs.frozen
class ServerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, address: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"invalid server address {address!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid server address {address!r}: port {port} is out of range "
                         "(1-65535)")
    return port


def parse_address(address: str, default_port: int = DEFAULT_RPC_PORT) -> ServerAddress:
    """``"10.0.0.1"`` -> 10.0.0.1:4647; ``"[::1]:4648"``; a bare IPv6 address takes the
    default port (its colons cannot also carry one)."""
    text = address.strip()
    if not text:
        raise ValueError("invalid server address: empty")
    if any(c.isspace() for c in text):
        raise ValueError(f"invalid server address {address!r}: contains whitespace")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"invalid server address {address!r}: missing ']'")
        host, rest = text[1:close], text[close + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid server address {address!r}: {host!r} in brackets is "
                             "not an IPv6 address") from None
        if not rest:
            return ServerAddress(host, default_port)
        if not rest.startswith(":"):
            raise ValueError(f"invalid server address {address!r}: expected ':port' after ']'")
        return ServerAddress(host, _port(rest[1:], address))
    if text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"invalid server address {address!r}: an IPv6 address with a "
                             "port needs brackets, as in [::1]:4647") from None
        return ServerAddress(text, default_port)
    host, sep, port = text.partition(":")
    if not host:
        raise ValueError(f"invalid server address {address!r}: missing host")
    return ServerAddress(host, _port(port, address) if sep else default_port)
