"""RPC over real sockets on 127.0.0.1: the server's listener and the client's transport,
plaintext and mutual TLS (certificates made here)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import msgpack
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nomad_client.client.rpc_tcp import TcpTransport
from nomad_client.rpcwire import errors
from nomad_client.rpcwire.errors import RPCError
from nomad_client.rpcwire.framing import HANDSHAKE, encode_frame
from nomad_client.rpcwire.tls import (
    TLSSettings,
    client_context,
    expected_server_name,
    server_context,
)
from nomad_client.server.rpc_listener import RPCListener, handlers_dispatch
from tests.unit.factories import wait_until

# ---------------------------------------------------------------- certificates


@attrs.frozen
class Issued:
    cert: str
    key: str


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(directory: Path, name: str, subject: str, issuer: tuple[x509.Name, Any] | None, *,
           dns: tuple[str, ...] = (), ca: bool = False) -> tuple[Issued, x509.Name, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer else (subject_name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [*(x509.DNSName(d) for d in dns),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return Issued(str(cert_path), str(key_path)), subject_name, key


@attrs.frozen
class PKI:
    ca: Issued
    server: Issued  # server.global.nomad
    other_server: Issued  # server.other.nomad, same CA
    client: Issued
    other_ca: Issued
    other_client: Issued  # signed by other_ca

    def settings(self, node: Issued, *, ca: Issued | None = None,
                 verify_server_hostname: bool = False) -> TLSSettings:
        return TLSSettings(rpc=True, ca_file=(ca or self.ca).cert, cert_file=node.cert,
                           key_file=node.key, verify_server_hostname=verify_server_hostname)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_name, ca_key = _issue(d, "ca", "Test CA", None, ca=True)
    other_ca, other_name, other_key = _issue(d, "other-ca", "Other CA", None, ca=True)
    server = _issue(d, "server", "server", (ca_name, ca_key), dns=("server.global.nomad",))[0]
    other_server = _issue(d, "other-server", "server", (ca_name, ca_key),
                          dns=("server.other.nomad",))[0]
    client = _issue(d, "client", "client", (ca_name, ca_key), dns=("client.global.nomad",))[0]
    other_client = _issue(d, "other-client", "client", (other_name, other_key),
                          dns=("client.global.nomad",))[0]
    return PKI(ca, server, other_server, client, other_ca, other_client)


# ---------------------------------------------------------------- a server to call


class Failure(Exception):
    pass


class NotFound(Exception):
    """Named like the server's own NotFound."""


_RAISE: dict[str, Exception] = {
    "permission": PermissionError("node secret does not match"),
    "key": KeyError("alloc-1"),
    "notfound": NotFound("job example not found"),
    "value": ValueError("bad status"),
    "type": TypeError("wrong type"),
    "timeout": TimeoutError("slow"),
    "internal": Failure("db password is hunter2"),
}


class Handlers:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.calls = 0

    async def echo(self, args: dict[str, Any]) -> Any:
        self.calls += 1
        return args

    async def block(self, args: dict[str, Any]) -> Any:
        self.started += 1
        await self.release.wait()
        return {"Released": True}

    async def fail(self, args: dict[str, Any]) -> Any:
        raise _RAISE[args["Kind"]]


def _dispatch(h: Handlers) -> Callable[[str, dict[str, Any]], Awaitable[Any]]:
    table: dict[str, Callable[[Handlers, dict[str, Any]], Awaitable[Any]]] = {
        "Test.Echo": Handlers.echo, "Test.Block": Handlers.block, "Test.Fail": Handlers.fail}
    return handlers_dispatch(table, h)


def _bound(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@asynccontextmanager
async def listening(handlers: Handlers, *, host: str = "127.0.0.1", port: int = 0,
                    **kwargs: Any) -> AsyncIterator[RPCListener]:
    listener = RPCListener(_dispatch(handlers), _bound(host, port), **kwargs)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


@asynccontextmanager
async def transport(*servers: str, **kwargs: Any) -> AsyncIterator[TcpTransport]:
    t = TcpTransport(list(servers), **kwargs)
    try:
        yield t
    finally:
        await t.close()


def _addr(listener: RPCListener) -> str:
    host, port = listener.address
    return f"{host}:{port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InOrder:
    """No shuffle, full backoff: deterministic server order."""

    def shuffle(self, x: list[Any]) -> None:
        pass

    def uniform(self, a: float, b: float) -> float:
        return b


# ---------------------------------------------------------------- calls


NESTED = {"Bytes": b"\x00\x01\xff", "Big": 2**40 + 1, "Neg": -(2**35), "None": None,
          "Deep": [{"a": [1, 2.5, None, b""]}, "x"], "Empty": {}}


async def test_round_trip_of_nested_values() -> None:
    h = Handlers()
    async with listening(h) as listener, transport(_addr(listener)) as t:
        assert t.current_server is None and t.last_contact is None
        assert await t.call("Test.Echo", NESTED) == NESTED
        assert t.current_server == _addr(listener)
        assert t.last_contact is not None and t.last_contact <= time.monotonic()


async def test_unknown_method() -> None:
    async with listening(Handlers()) as listener, transport(_addr(listener)) as t:
        with pytest.raises(errors.UnknownMethod, match="Nope.Nothing"):
            await t.call("Nope.Nothing", {})


@pytest.mark.parametrize(("kind", "code", "family"), [
    ("permission", errors.PERMISSION_DENIED, PermissionError),
    ("key", errors.NOT_FOUND, LookupError),
    ("notfound", errors.NOT_FOUND, LookupError),
    ("value", errors.BAD_REQUEST, ValueError),
    ("type", errors.BAD_REQUEST, ValueError),
    ("timeout", errors.DEADLINE, TimeoutError),
    ("internal", errors.INTERNAL, RPCError),
])
async def test_handler_errors_reach_the_client(kind: str, code: str, family: type) -> None:
    async with listening(Handlers()) as listener, transport(_addr(listener)) as t:
        with pytest.raises(RPCError) as caught:
            await t.call("Test.Fail", {"Kind": kind})
        assert caught.value.code == code and isinstance(caught.value, family)
        # The connection is still good for the next call.
        assert await t.call("Test.Echo", {"x": 1}) == {"x": 1}


async def test_internal_errors_carry_no_exception_text(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    async with listening(Handlers()) as listener, transport(_addr(listener)) as t:
        with pytest.raises(RPCError) as caught:
            await t.call("Test.Fail", {"Kind": "internal"})
    assert caught.value.message == "internal error"
    assert "hunter2" not in repr(caught.value)
    assert "RPC handler failed" in caplog.text  # the server's operator does see it


async def test_a_long_poll_does_not_hold_up_other_calls() -> None:
    h = Handlers()
    async with listening(h) as listener, transport(_addr(listener)) as t:
        long_poll = asyncio.create_task(t.call("Test.Block", {"MaxQueryTime": 300}))
        await wait_until(lambda: h.started == 1, "the long poll to reach the server")
        async with asyncio.timeout(30):  # behind the long poll, they would wait 300 s
            quick = await asyncio.gather(*(t.call("Test.Echo", {"N": n}) for n in range(50)))
        assert quick == [{"N": n} for n in range(50)]
        assert not long_poll.done()
        assert len(listener._connections) == 1  # all on the one connection
        h.release.set()
        assert await long_poll == {"Released": True}


async def test_the_server_enforces_the_deadline() -> None:
    h = Handlers()
    async with listening(h) as listener, transport(_addr(listener)) as t:
        with pytest.raises(errors.DeadlineExceeded, match="deadline of 0.2s exceeded"):
            await t.call("Test.Block", {}, timeout=0.2)
        # The handler was cancelled, the connection lives on.
        assert await t.call("Test.Echo", {"a": 1}) == {"a": 1}


def test_deadline_defaults() -> None:
    t = TcpTransport(["127.0.0.1:1"], default_timeout=30.0)
    assert t._timeout_for({}, None) == 30.0
    assert t._timeout_for({"MaxQueryTime": 300}, None) == 310.0
    assert t._timeout_for({"MaxQueryTime": 300}, 5.0) == 5.0
    with pytest.raises(ValueError):
        t._timeout_for({}, 0)


# ---------------------------------------------------------------- hostile peers


async def _raw_exchange(listener: RPCListener, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; what the server sent back until it closed."""
    reader, writer = await asyncio.open_connection(*listener.address)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(15):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def _frame_raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("data", [
    b"X" + encode_frame({"ID": 1, "Method": "Test.Echo", "Args": {}}),
    HANDSHAKE + struct.pack(">I", 2**32 - 1),
    HANDSHAKE + _frame_raw(b"\xc1\xc1\xc1\xc1"),
    HANDSHAKE + encode_frame([1, 2, 3]),
    HANDSHAKE + encode_frame({"Method": "Test.Echo", "Args": {}}),
    HANDSHAKE + encode_frame({"ID": "one", "Method": "Test.Echo"}),
], ids=["handshake", "length", "garbage", "non-map", "no-id", "id-type"])
async def test_hostile_input_closes_only_that_connection(data: bytes) -> None:
    h = Handlers()
    async with listening(h) as listener, transport(_addr(listener)) as t:
        assert await t.call("Test.Echo", {"before": 1}) == {"before": 1}
        assert await _raw_exchange(listener, data) == b""  # closed, nothing answered
        # The established connection and new ones are served as before.
        assert await t.call("Test.Echo", {"after": 1}) == {"after": 1}
        async with transport(_addr(listener)) as fresh:
            assert await fresh.call("Test.Echo", {}) == {}
        assert h.calls == 3


async def test_a_bad_request_with_an_id_gets_an_answer() -> None:
    async with listening(Handlers()) as listener:
        reader, writer = await asyncio.open_connection(*listener.address)
        try:
            writer.write(HANDSHAKE + encode_frame({"ID": 9, "Method": 5})
                         + encode_frame({"ID": 10, "Method": "Test.Echo", "Args": {"k": 1}}))
            replies = {}
            for _ in range(2):
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                reply = msgpack.unpackb(await reader.readexactly(length))
                replies[reply["ID"]] = reply
        finally:
            writer.close()
            await writer.wait_closed()
    assert replies[9]["Error"]["Code"] == errors.BAD_REQUEST
    assert replies[10] == {"ID": 10, "Result": {"k": 1}, "Error": None}


async def test_a_hostile_server_fails_the_call_not_the_client() -> None:
    async def lying_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        writer.write(struct.pack(">I", 2**32 - 1))
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(lying_server, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        async with transport(f"127.0.0.1:{port}") as t:
            with pytest.raises(errors.Unavailable, match="protocol error"):
                await t.call("Test.Echo", {})
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------- failover


async def test_failover_past_a_dead_server() -> None:
    dead = f"127.0.0.1:{_free_port()}"
    async with listening(Handlers()) as listener, \
            transport(dead, _addr(listener), rng=InOrder()) as t:
        assert t.servers == [dead, _addr(listener)]
        assert await t.call("Test.Echo", {"x": 1}) == {"x": 1}
        assert t.current_server == _addr(listener)


async def test_no_server_reachable_fails_fast() -> None:
    dead = [f"127.0.0.1:{_free_port()}" for _ in range(3)]
    async with transport(*dead, connect_timeout=5.0) as t:
        started = time.monotonic()
        with pytest.raises(errors.NoServer, match="no servers reachable") as caught:
            await t.call("Test.Echo", {})
        assert time.monotonic() - started < 5.0
        assert all(d in str(caught.value) for d in dead)
        # Straight away again: every server is backing off, nothing waits.
        with pytest.raises(errors.NoServer, match="backing off"):
            await t.call("Test.Echo", {})
    async with transport() as empty:
        with pytest.raises(errors.NoServer, match="no servers configured"):
            await empty.call("Test.Echo", {})


async def test_reconnects_to_a_restarted_server() -> None:
    h = Handlers()
    port = _free_port()
    async with transport(f"127.0.0.1:{port}", backoff_min=0.05, backoff_max=0.2) as t:
        async with listening(h, port=port):
            assert await t.call("Test.Echo", {"n": 1}) == {"n": 1}
            in_flight = asyncio.create_task(t.call("Test.Block", {}))
            await wait_until(lambda: h.started == 1, "the call to reach the server")
        with pytest.raises(errors.Unavailable):
            await in_flight
        with pytest.raises(RPCError) as caught:
            await t.call("Test.Echo", {})
        assert caught.value.code in (errors.NO_SERVER, errors.UNAVAILABLE)
        async with listening(h, port=port):
            async def answered() -> bool:
                try:
                    return await t.call("Test.Echo", {"n": 2}) == {"n": 2}
                except errors.NoServer:
                    return False
            await wait_until(answered, "the transport to reconnect")


async def test_set_servers_moves_new_calls_and_retires_the_old_connection() -> None:
    h1, h2 = Handlers(), Handlers()
    async with listening(h1) as one, listening(h2) as two, transport(_addr(one)) as t:
        long_poll = asyncio.create_task(t.call("Test.Block", {}))
        await wait_until(lambda: h1.started == 1, "the call to reach the first server")
        t.set_servers([_addr(two)])
        assert t.servers == [_addr(two)]
        assert await t.call("Test.Echo", {"on": 2}) == {"on": 2}
        assert (h1.calls, h2.calls) == (0, 1)
        h1.release.set()
        assert await long_poll == {"Released": True}  # the old connection finished its call
        await wait_until(lambda: not one._connections, "the retired connection to close")
        with pytest.raises(ValueError, match="invalid server address"):
            t.set_servers(["host:port"])
        assert t.servers == [_addr(two)]


async def test_close_fails_calls_in_flight() -> None:
    h = Handlers()
    async with listening(h) as listener:
        t = TcpTransport([_addr(listener)])
        in_flight = asyncio.create_task(t.call("Test.Block", {}))
        await wait_until(lambda: h.started == 1, "the call to reach the server")
        await t.close()
        with pytest.raises(errors.Unavailable, match="closed"):
            await in_flight
        with pytest.raises(errors.Unavailable, match="closed"):
            await t.call("Test.Echo", {})


# ---------------------------------------------------------------- TLS


async def test_mutual_tls(pki: PKI) -> None:
    server_tls = server_context(pki.settings(pki.server))
    async with listening(Handlers(), ssl_context=server_tls) as listener, \
            transport(_addr(listener), ssl_context=client_context(pki.settings(pki.client))) as t:
        assert await t.call("Test.Echo", NESTED) == NESTED


def _no_cert_context(pki: PKI) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=pki.ca.cert)
    return context


async def test_a_client_without_a_certificate_is_refused(pki: PKI) -> None:
    h = Handlers()
    server_tls = server_context(pki.settings(pki.server))
    async with listening(h, ssl_context=server_tls) as listener, \
            transport(_addr(listener), ssl_context=_no_cert_context(pki)) as t:
        with pytest.raises(RPCError) as caught:
            await t.call("Test.Echo", {})
        assert caught.value.code in (errors.UNAVAILABLE, errors.NO_SERVER)
    assert h.calls == 0


async def test_a_client_certificate_from_another_ca_is_refused(pki: PKI) -> None:
    h = Handlers()
    server_tls = server_context(pki.settings(pki.server))
    client_tls = client_context(pki.settings(pki.other_client))
    async with listening(h, ssl_context=server_tls) as listener, \
            transport(_addr(listener), ssl_context=client_tls) as t:
        with pytest.raises(RPCError) as caught:
            await t.call("Test.Echo", {})
        assert caught.value.code in (errors.UNAVAILABLE, errors.NO_SERVER)
    assert h.calls == 0


async def test_a_server_from_another_ca_is_refused(pki: PKI) -> None:
    h = Handlers()
    server_tls = server_context(pki.settings(pki.server))
    client_tls = client_context(pki.settings(pki.client, ca=pki.other_ca))
    async with listening(h, ssl_context=server_tls) as listener, \
            transport(_addr(listener), ssl_context=client_tls) as t:
        with pytest.raises(errors.NoServer, match="TLS"):
            await t.call("Test.Echo", {})
    assert h.calls == 0


@pytest.mark.parametrize(("server_cert", "ok"), [("server", True), ("other_server", False)])
async def test_verify_server_hostname(pki: PKI, server_cert: str, ok: bool) -> None:
    server_tls = server_context(pki.settings(getattr(pki, server_cert)))
    client_tls = client_context(pki.settings(pki.client, verify_server_hostname=True))
    assert client_tls.check_hostname
    async with listening(Handlers(), ssl_context=server_tls) as listener, \
            transport(_addr(listener), ssl_context=client_tls,
                      server_hostname=expected_server_name("global")) as t:
        if ok:
            assert await t.call("Test.Echo", {"ok": True}) == {"ok": True}
        else:
            with pytest.raises(errors.NoServer, match="TLS"):
                await t.call("Test.Echo", {})


def test_without_verify_server_hostname_only_the_chain_is_checked(pki: PKI) -> None:
    context = client_context(pki.settings(pki.client))
    assert not context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert server_context(pki.settings(pki.server)).verify_mode == ssl.CERT_REQUIRED


def test_tls_file_errors_name_the_file(pki: PKI, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    good = pki.settings(pki.server)
    cases = [
        (attrs.evolve(good, ca_file=missing), "ca_file " + missing),
        (attrs.evolve(good, ca_file=str(junk)), "ca_file " + str(junk)),
        (attrs.evolve(good, cert_file=str(junk)), "cert_file " + str(junk)),
        (attrs.evolve(good, key_file=missing), "key_file " + missing),
        (attrs.evolve(good, key_file=str(junk)), "key_file " + str(junk)),
        (attrs.evolve(good, key_file=pki.client.key), "key_file " + pki.client.key),
        (attrs.evolve(good, key_file=None), "key_file required"),
    ]
    for settings, words in cases:
        for build in (server_context, client_context):
            with pytest.raises(ValueError) as caught:
                build(settings)
            assert words in str(caught.value), (words, str(caught.value))
            assert "PRIVATE KEY" not in str(caught.value)


# ---------------------------------------------------------------- plaintext from afar


def _non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and \
                    not ipaddress.ip_address(address.address).is_loopback:
                return str(address.address)
    return None


async def test_plaintext_from_a_non_loopback_peer_is_refused() -> None:
    host = _non_loopback_ipv4()
    if host is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    h = Handlers()
    async with listening(h, host=host) as listener:
        async with transport(_addr(listener)) as t:
            with pytest.raises(RPCError) as caught:
                await t.call("Test.Echo", {})
            assert caught.value.code in (errors.UNAVAILABLE, errors.NO_SERVER)
        assert h.calls == 0
    async with listening(h, host=host, allow_plaintext_remote=True) as listener, \
            transport(_addr(listener)) as t:
        assert await t.call("Test.Echo", {"remote": 1}) == {"remote": 1}


async def test_listener_close_ends_calls_in_flight() -> None:
    h = Handlers()
    listener = RPCListener(_dispatch(h), _bound())
    await listener.start()
    try:
        async with transport(_addr(listener)) as t:
            in_flight = [asyncio.create_task(t.call("Test.Block", {})) for _ in range(3)]
            await wait_until(lambda: h.started == 3, "the calls to reach the server")
            await listener.close()
            for call in in_flight:
                with pytest.raises(errors.Unavailable):
                    await call
    finally:
        await listener.close()
