"""RPC benchmark: what a client->server call costs in-process, over TCP, and over mutual TLS.

Not a test: it prints figures and exits 0 (non-zero only when it could not run).

One process, one event loop (uvloop when installed, as the agent runs): a server-side
``RPCListener`` on 127.0.0.1 and a client ``TcpTransport`` calling it, against the embedded
path the agent uses without a network (the arguments and reply each round-tripped through
msgpack, as ``InProcessTransport`` does). The handler echoes its arguments back; the
arguments are shaped like a client's ``Node.UpdateAlloc`` (a few allocation updates with
task states), so encoding costs what it costs for real calls.

Three variants, run alternately (in-process, TCP, mTLS, in-process, ...) because a shared
machine is noisy:
  (a) in-process,
  (b) TCP, plaintext over loopback,
  (c) TCP with mutual TLS (certificates made for the run, ECDSA P-256).
Each run makes ``--calls`` calls one after another (round-trip latency, not throughput) and
then ``--calls`` calls ``--concurrency`` at a time on the one connection (throughput);
the medians over ``--rounds`` runs are reported.

May touch: a temp dir it creates (the certificates), 127.0.0.1 ports it binds. It removes
the temp dir before it exits.

    python bench/rpc_bench.py [--calls 2000] [--rounds 5] [--concurrency 32] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nomad_client.client.rpc_tcp import TcpTransport
from nomad_client.rpcwire.tls import TLSSettings, client_context, server_context
from nomad_client.server.rpc_listener import RPCListener
from nomad_client.structs.codec import msgpack_roundtrip

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


def payload() -> dict[str, Any]:
    """Arguments shaped like a Node.UpdateAlloc of three allocations."""
    task_state = {"State": "running", "Failed": False, "Restarts": 0,
                  "StartedAt": "2024-01-01T00:00:00Z", "FinishedAt": None,
                  "Events": [{"Type": "Started", "Time": 1_700_000_000_000_000_000,
                              "Message": "Task started by client", "Details": {}}] * 3}
    return {"Alloc": [{"ID": f"{n:08d}-0000-4000-8000-000000000000",
                       "ClientStatus": "running", "ClientDescription": "Tasks are running",
                       "TaskStates": {"web": task_state, "sidecar": task_state},
                       "NetworkStatus": None, "ModifyTime": 1_700_000_000_000_000_000}
                      for n in range(3)]}


async def echo(method: str, args: dict[str, Any]) -> Any:
    return {"Index": 1, "Echo": args}


class InProcess:
    """What the embedded mode does: both sides of the call through msgpack, no socket."""

    async def call(self, method: str, args: dict[str, Any]) -> Any:
        return msgpack_roundtrip(await echo(method, msgpack_roundtrip(args)))


def make_certs(directory: Path) -> tuple[TLSSettings, TLSSettings]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])

    def issue(name: str, subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool,
              dns: str | None) -> None:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(dns)]), False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    issue("ca", ca_name, ca_key, True, None)
    for name in ("server", "client"):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issue(name, subject, ec.generate_private_key(ec.SECP256R1()), False,
              f"{name}.global.nomad")

    def settings(name: str) -> TLSSettings:
        return TLSSettings(rpc=True, ca_file=str(directory / "ca.pem"),
                           cert_file=str(directory / f"{name}.pem"),
                           key_file=str(directory / f"{name}-key.pem"))
    return settings("server"), settings("client")


async def one_run(call: Call, args: dict[str, Any], calls: int, concurrency: int
                  ) -> tuple[float, float, float]:
    """(median latency s, p99 latency s, calls/s at ``concurrency``)."""
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await call("Bench.Echo", args)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            await call("Bench.Echo", args)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = calls / (time.perf_counter() - started)
    return (statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1], rate)


def address(listener: RPCListener) -> str:
    host, port = listener.address
    return f"{host}:{port}"


def loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


async def measure(args: argparse.Namespace, directory: Path) -> None:
    server_tls, client_tls = make_certs(directory)
    plain = RPCListener(echo, loopback_socket())
    secure = RPCListener(echo, loopback_socket(), ssl_context=server_context(server_tls))
    await plain.start()
    await secure.start()
    transports = [TcpTransport([address(plain)]),
                  TcpTransport([address(secure)], ssl_context=client_context(client_tls))]
    try:
        variants: dict[str, Call] = {"in-process": InProcess().call,
                                     "TCP": transports[0].call, "mTLS": transports[1].call}
        body = payload()
        for call in variants.values():  # connect, warm up
            for _ in range(50):
                assert (await call("Bench.Echo", body))["Echo"] == body
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, call in variants.items():
                results[name].append(await one_run(call, body, args.calls, args.concurrency))
    finally:
        for t in transports:
            await t.close()
        await plain.close()
        await secure.close()

    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"RPC round trip, {args.calls} calls x {args.rounds} alternating runs, "
          f"{len(msgpack.packb(body, use_bin_type=True))}-byte arguments, loop: {loop}")
    print(f"{'variant':<12}{'p50 us':>10}{'p99 us':>10}{'calls/s @' + str(args.concurrency):>16}"
          f"{'p50 vs in-process':>20}")
    base = statistics.median(r[0] for r in results["in-process"])
    for name, runs in results.items():
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        rate = statistics.median(r[2] for r in runs)
        print(f"{name:<12}{p50 * 1e6:>10.1f}{p99 * 1e6:>10.1f}{rate:>16.0f}"
              f"{p50 / base:>19.1f}x")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="rpc-bench-"))
    try:
        await measure(args, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.loop == "uvloop":
            try:
                import uvloop
            except ImportError:
                print("uvloop is not installed; running on asyncio's loop", file=sys.stderr)
            else:
                uvloop.run(run(args))
                return 0
        asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a benchmark that could not run says why and fails
        print(f"benchmark failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
