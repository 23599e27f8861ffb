"""A task's HTTPS front door to its agent: ``python -m nomad_client.uiproxy``.

Run inside a task, it serves the agent's web UI and API to browsers over HTTPS on a group
port and forwards every API request to the task's own Task API socket
(``$NOMAD_SECRETS_DIR/api.sock``). It is a pipe for the *browser's* credentials: it forwards
the ``X-Nomad-Token`` (or a Bearer ``Authorization``) the browser sent and nothing else; it
never reads ``$NOMAD_TOKEN`` or the task's token file, so a request without a token reaches
the agent without one and is refused there (401/403 passes back to the browser).

* The UI's static files come from ``nomad_client.ui`` and are served here, with the UI's
  security headers; ``/`` redirects to ``/ui/``.
* Requests and responses pass through allow-lists of headers; bodies are streamed both
  ways (so log follow and the event stream work), the request body with a size cap.
* TLS: ``--cert``/``--key``, or a self-signed certificate made at start for ``localhost``,
  ``127.0.0.1`` and each ``--name``. Its key lives in memory; it touches a file only for
  the moment the ``ssl`` module needs to load it, in a private directory (the task's
  secrets dir when there is one), removed at once.
* One log line per request: method, path without its query, status, duration. Never a
  header, a token or a query string.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import attrs
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

log = logging.getLogger("nomad_client.uiproxy")

# Request headers a browser's request may carry to the agent. Authorization only as a Bearer
# token (see forward_request_headers); nothing that names the client, cookies or encodings.
REQUEST_HEADERS = ("X-Nomad-Token", "Content-Type", "Accept")
# Response headers the agent's answer may carry back to the browser.
RESPONSE_HEADERS = (
    "Content-Type", "Content-Length", "Content-Encoding", "Cache-Control", "Retry-After",
    "X-Nomad-Index", "X-Nomad-KnownLeader", "X-Nomad-LastContact", "X-Nomad-NextToken",
)
# Browsers ignore HSTS from a connection with certificate errors (the self-signed case) and
# for IP-address hosts, so this only pins hosts whose certificate they already trust.
HSTS = "max-age=31536000"
# On API answers: nothing the agent returns may be framed, sniffed into HTML or run.
API_SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DEFAULT_MAX_BODY = 16 * 1024 * 1024
_CHUNK = 64 * 1024
# sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107
# A stream (log follow, event stream) may outlive SIGTERM; the task's kill timeout is short.
_SHUTDOWN_TIMEOUT = 3.0
_LOGGED_PATH_MAX = 200

AssetReader = Callable[[str], Awaitable["tuple[bytes, str] | None"]]


@attrs.frozen
class Settings:
    host: str
    port: int
    socket_path: str
    cert_file: str | None = None
    key_file: str | None = None
    names: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY


# ---------------------------------------------------------------------- header allow-lists


def forward_request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a browser's request that go on to the agent."""
    out: dict[str, str] = {}
    lowered = {name.lower(): name for name in REQUEST_HEADERS}
    for name, value in headers.items():
        if name.lower() in lowered and lowered[name.lower()] not in out:
            out[lowered[name.lower()]] = value
    auth = _bearer(headers.get("Authorization"))
    if auth is not None:
        out["Authorization"] = auth
    # Ask for an identity body: a compressed stream would be buffered by the agent.
    out["Accept-Encoding"] = "identity"
    return out


def _bearer(value: str | None) -> str | None:
    """``value`` if it is a Bearer credential with a token, else None (Basic and other
    schemes are the browser's business with this proxy, never the agent's)."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return value


def forward_response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The headers of the agent's answer that go back to the browser, plus ours."""
    out: CIMultiDict[str] = CIMultiDict()
    allowed = {name.lower() for name in RESPONSE_HEADERS}
    for name, value in headers.items():
        if name.lower() in allowed:
            out.add(name, value)
    out.update(API_SECURITY_HEADERS)
    out["Strict-Transport-Security"] = HSTS
    return out


def upstream_target(raw_path: str) -> str | None:
    """The request target to send to the agent, or None when it is not one to forward:
    not origin-form, or with a ``.``/``..`` segment (also percent-encoded), which could
    make the agent's router see another path than the one this proxy screened."""
    if not raw_path.startswith("/") or raw_path.startswith("//"):
        return None
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    for segment in path.split("/"):
        if unquote(segment) in (".", ".."):
            return None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw_path):
        return None
    return raw_path


def loggable_path(raw_path: str) -> str:
    """The request's path for a log line: no query (tokens travel there), printable only,
    bounded."""
    path = raw_path.split("?", 1)[0]
    text = ascii(path)[1:-1]
    return text if len(text) <= _LOGGED_PATH_MAX else text[:_LOGGED_PATH_MAX] + "..."


# ---------------------------------------------------------------------- TLS


def self_signed(names: Iterable[str], days: int = 365) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed server certificate for ``localhost``,
    ``127.0.0.1`` and ``names``, as PEM (certificate, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in ("localhost", "127.0.0.1", *names):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 fingerprint of a PEM certificate, for a user to compare with the
    browser's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def server_context(settings: Settings) -> tuple[ssl.SSLContext, str | None]:
    """The TLS context to serve with, and the fingerprint of a self-signed certificate
    made for it (None when the certificate was configured)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file and settings.key_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
        return context, None
    cert_pem, key_pem = self_signed(settings.names)
    _load_from_memory(context, cert_pem, key_pem)
    return context, fingerprint(cert_pem)


def _load_from_memory(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl loads keys only from files: use a private dir (the task's secrets dir, a tmpfs,
    # when we run as a task) for as long as the load takes.
    secrets = os.environ.get("NOMAD_SECRETS_DIR")
    parent = secrets if secrets and os.path.isdir(secrets) else None
    directory = tempfile.mkdtemp(prefix="uiproxy-tls-", dir=parent)  # mode 0700
    try:
        cert_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(cert_path, key_path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------- the UI's files


async def _package_asset(name: str) -> tuple[bytes, str] | None:
    from nomad_client.ui import cached_asset, read_asset

    # The first read of a file is blocking I/O: off the event loop.
    return cached_asset(name) or await asyncio.to_thread(read_asset, name)


def _ui_headers() -> dict[str, str]:
    from nomad_client.ui import SECURITY_HEADERS

    return SECURITY_HEADERS


# ---------------------------------------------------------------------- the upstream socket


class Upstream:
    """The agent's socket as an HTTP client. Holds, for a socket path longer than
    ``sun_path``, an ``O_PATH`` descriptor on its directory to connect through."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._dir_fd: int | None = None
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.UnixConnector(path=self._connect_path(), limit=32)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                # Blocking queries and streams last as long as they last; only connecting
                # is bounded.
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10),
                skip_auto_headers=("User-Agent",))
        return self._session

    def _connect_path(self) -> str:
        if len(os.fsencode(self.socket_path)) <= _SUN_PATH_MAX:
            return self.socket_path
        directory, name = os.path.split(self.socket_path)
        if self._dir_fd is None:
            self._dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dir_fd}/{name}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


class _BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------- the application

_UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream", Upstream)


def build_app(settings: Settings, assets: AssetReader | None = None,
              ui_headers: Callable[[], Mapping[str, str]] | None = None) -> web.Application:
    """The proxy's application; ``assets``/``ui_headers`` replace the UI package's (tests)."""
    read_asset = assets or _package_asset
    headers_for_ui = ui_headers or _ui_headers
    app = web.Application(client_max_size=settings.max_body)

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        app[_UPSTREAM] = Upstream(settings.socket_path)
        yield
        await app[_UPSTREAM].close()

    app.cleanup_ctx.append(upstream_ctx)

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        status = 500
        try:
            response = await _dispatch(request, settings, read_asset, headers_for_ui)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the browser went away, or we are shutting down
            raise
        finally:
            log.info("%s %s %d %.1fms", request.method[:16], loggable_path(request.raw_path),
                     status, (time.monotonic() - started) * 1000)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _dispatch(request: web.Request, settings: Settings, read_asset: AssetReader,
                    ui_headers: Callable[[], Mapping[str, str]]) -> web.StreamResponse:
    path = request.raw_path.split("?", 1)[0]
    if path in ("/", "/ui"):
        return _plain(307, "", {"Location": "/ui/"})
    if path.startswith("/ui/"):
        return await _ui(request, path[len("/ui/"):], read_asset, ui_headers)
    target = upstream_target(request.raw_path)
    if target is None:
        return _plain(400, "invalid request path")
    return await _forward(request, target, settings)


def _plain(status: int, text: str, extra: Mapping[str, str] | None = None) -> web.Response:
    headers = {**API_SECURITY_HEADERS, "Strict-Transport-Security": HSTS, **(extra or {})}
    return web.Response(status=status, text=text, headers=headers)


async def _ui(request: web.Request, name: str, read_asset: AssetReader,
        ui_headers: Callable[[], Mapping[str, str]]) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        return _plain(405, "method not allowed", {"Allow": "GET, HEAD"})
    # The asset reader has its own allow-list; anything else is a page route of the
    # single-page app, answered with index.html.
    found = (await read_asset(name) if name else None) or await read_asset("index.html")
    if found is None:
        return _plain(404, "the UI is not installed")
    body, content_type = found
    response = web.Response(status=200, body=body,
                            headers={**ui_headers(), "Strict-Transport-Security": HSTS})
    response.content_type = content_type.split(";", 1)[0].strip()
    if "charset=" in content_type:
        response.charset = content_type.split("charset=", 1)[1].strip()
    return response


async def _forward(request: web.Request, target: str, settings: Settings
                   ) -> web.StreamResponse:
    length = request.content_length
    if length is not None and length > settings.max_body:
        return _plain(413, "request body too large")
    upstream = request.app[_UPSTREAM]
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        async for chunk in request.content.iter_chunked(_CHUNK):
            sent += len(chunk)
            if sent > settings.max_body:
                raise _BodyTooLarge
            yield chunk

    # encoded=True: the agent must see the target byte for byte as the browser sent it
    # (``%2F`` inside a job ID is not a path separator).
    data = body() if request.body_exists else None
    response: web.StreamResponse | None = None
    try:
        async with upstream.session().request(
                request.method, URL(f"http://localhost{target}", encoded=True),
                headers=forward_request_headers(request.headers), data=data,
                allow_redirects=False) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason,
                                          headers=forward_response_headers(answer.headers))
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (_BodyTooLarge, aiohttp.ClientError, OSError) as err:
        if response is not None:
            # Either side went away mid-stream: the status is already sent; stop.
            return response
        if sent > settings.max_body:
            return _plain(413, "request body too large")
        if isinstance(err, aiohttp.ClientConnectorError | FileNotFoundError):
            return _plain(502, "the agent's Task API socket is not reachable")
        return _plain(502, "the agent's Task API socket failed to answer")


# ---------------------------------------------------------------------- running


class QuietBadRequests(logging.Filter):
    """Drops aiohttp's record of a malformed request: it is the client's mistake (answered
    400), its traceback quotes the request's bytes (a token among them, maybe), and any
    client could flood the log with them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)



async def serve(settings: Settings, stop: asyncio.Event,
                started: Callable[[int], None] | None = None) -> None:
    """Serve until ``stop`` is set, then shut down (streams get a short grace period).
    ``started`` gets the bound port."""
    context, print_ = server_context(settings)
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context)
        await site.start()
        port = _bound_port(runner) or settings.port
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        log.info("serving the UI at https://%s:%d/ui/ for the agent at %s", shown, port,
                 settings.socket_path)
        if print_ is not None:
            log.info("self-signed certificate, SHA-256 fingerprint %s", print_)
        if started is not None:
            started(port)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_args(argv: list[str] | None = None,
               environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m nomad_client.uiproxy",
        description="Serve the agent's UI and API over HTTPS, forwarding to a task's "
                    "Task API socket with the browser's token.")
    parser.add_argument("--listen", help="host:port (default 0.0.0.0:$NOMAD_PORT_https)")
    parser.add_argument("--socket", help="the agent's socket (default "
                                         "$NOMAD_SECRETS_DIR/api.sock)")
    parser.add_argument("--cert", help="PEM certificate (chain) file")
    parser.add_argument("--key", help="PEM private key file")
    parser.add_argument("--name", action="append", default=[],
                        help="another host name or IP for the self-signed certificate")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                        help="largest request body forwarded, in bytes")
    ns = parser.parse_args(argv)
    listen = ns.listen
    if listen is None:
        if not env.get("NOMAD_PORT_https"):
            parser.error("--listen is required outside a task with an \"https\" port")
        listen = f"0.0.0.0:{env['NOMAD_PORT_https']}"
    try:
        host, port = parse_listen(listen)
    except ValueError as err:
        parser.error(str(err))
    socket_path = ns.socket
    if socket_path is None:
        if not env.get("NOMAD_SECRETS_DIR"):
            parser.error("--socket is required outside a task")
        socket_path = str(Path(env["NOMAD_SECRETS_DIR"]) / "api.sock")
    if bool(ns.cert) != bool(ns.key):
        parser.error("--cert and --key go together")
    if ns.max_body <= 0:
        parser.error("--max-body must be positive")
    names = tuple(ns.name) + ((host,) if host not in ("0.0.0.0", "::") else ())
    return Settings(host=host, port=port, socket_path=socket_path, cert_file=ns.cert,
                    key_file=ns.key, names=names, max_body=ns.max_body)


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(settings, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] uiproxy: %(message)s"))
    from nomad_client import logredact

    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logredact.install()  # belt and braces: no line here should hold a secret anyway
    logging.getLogger("aiohttp.server").addFilter(QuietBadRequests())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
