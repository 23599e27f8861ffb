"""TLS for the RPC connections: the agent's ``tls { rpc, ca_file, cert_file, key_file,
verify_server_hostname }`` block turned into ``ssl.SSLContext`` objects.

Mutual TLS, as Nomad does it: servers require a client certificate signed by the CA;
clients verify the server's chain against the CA, and its name (``server.<region>.nomad``)
only with ``verify_server_hostname``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
from cryptography import x509


@attrs.frozen
class TLSSettings:
    rpc: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_server_hostname: bool = False


def expected_server_name(region: str) -> str:
    """The name every server certificate of ``region`` carries."""
    return f"server.{region}.nomad"


def _required(tls: TLSSettings) -> tuple[str, str, str]:
    missing = [name for name in ("ca_file", "cert_file", "key_file")
               if not getattr(tls, name)]
    if missing:
        raise ValueError(f"tls: {', '.join(missing)} required for RPC over TLS")
    assert tls.ca_file and tls.cert_file and tls.key_file
    return tls.ca_file, tls.cert_file, tls.key_file


def _readable(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls {option} {path}: cannot read: {exc.strerror or exc}") from None


def _load_ca(context: ssl.SSLContext, ca_file: str) -> None:
    _readable("ca_file", ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, ValueError):
        raise ValueError(f"tls ca_file {ca_file}: not a PEM CA certificate") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("encrypted keys are not supported")


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    cert = _readable("cert_file", cert_file)
    _readable("key_file", key_file)
    try:
        x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise ValueError(f"tls cert_file {cert_file}: not a PEM certificate") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, ValueError):
        # The key's content never goes into a message.
        raise ValueError(f"tls key_file {key_file}: not an unencrypted PEM private key "
                         f"matching cert_file {cert_file}") from None


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The listener's context: every peer must present a certificate signed by the CA."""
    ca_file, cert_file, key_file = _required(tls)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file)
    _load_ca(context, ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The client's context: presents its certificate, verifies the server's chain; checks
    the server's name only with ``verify_server_hostname`` (the transport then connects with
    ``server_hostname=expected_server_name(region)``)."""
    ca_file, cert_file, key_file = _required(tls)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file)
    _load_ca(context, ca_file)
    context.check_hostname = tls.verify_server_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context
