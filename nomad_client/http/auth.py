"""Authentication and authorization for every HTTP request: the one place token checks live.

Rules by listener:
* Task API (a task's ``api.sock``): a credential is always required, whether ACLs are on or
  off. No token -> 401 ``Unauthorized``. Anything that is not a real credential (unknown,
  expired, malformed, badly signed, or the identity of an allocation that is no longer
  running) -> 403 ``Forbidden``. The anonymous policy never applies. Unlike Nomad, a random
  string is NOT accepted when ACLs are disabled.
* TCP API: with ACLs disabled everyone is allowed; with ACLs enabled a missing token means
  the anonymous identity and an invalid one is 403.

Authorization: with ACLs disabled every check passes. With ACLs enabled, management tokens
pass; policy evaluation for other identities is not implemented yet, so they fail closed
(403) except on endpoints that need no permission.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from nomad_client.http.context import ACLS_DISABLED, ANONYMOUS, Identity, ListenerContext
from nomad_client.http.errors import PERMISSION_DENIED, HTTPError
from nomad_client.server.keyring import IdentityError
from nomad_client.server.server import Server

log = logging.getLogger(__name__)

UNAUTHORIZED = HTTPError(401, "Unauthorized")
FORBIDDEN = HTTPError(403, "Forbidden")


def request_token(headers: Mapping[str, str]) -> str:
    """The caller's secret, extracted as Nomad does: a present ``X-Nomad-Token`` wins (even
    one of only spaces, which then means "no token"); else ``Authorization: Bearer <t>``,
    where the token is the first word after the scheme."""
    raw = headers.get("X-Nomad-Token")
    if raw:
        return raw.strip()
    auth = headers.get("Authorization")
    if not auth:
        return ""
    scheme, sep, rest = auth.partition(" ")
    if not sep or scheme.lower() != "bearer":
        return ""
    words = rest.split(None, 1)
    return words[0] if words else ""


def _looks_like_jwt(token: str) -> bool:
    # A JWT starts with a base64url JSON object ('{"' -> "eyJ"); ACL secrets are UUIDs,
    # which never do. Anything else that starts so is refused by the verifier.
    return token.startswith("eyJ")


def _is_token_text(token: str) -> bool:
    # Every real credential (a UUID, a JWT) is printable ASCII. aiohttp decodes header bytes
    # as UTF-8 with surrogateescape, so bytes that are not UTF-8 arrive here as lone
    # surrogates, which later code could not even encode: refuse them all up front.
    return token.isascii() and token.isprintable()


def resolve_credential(server: Server, token: str) -> Identity | None:
    """A real credential's identity, or None. Never raises for bad input."""
    if not _is_token_text(token):
        return None
    if _looks_like_jwt(token):
        try:
            claims = server.verify_workload_identity(token)
        except IdentityError:
            return None
        return Identity(None, claims)  # positional: hot path
    acl_token = server.token_by_secret(token)
    if acl_token is None or acl_token.expired(time.time()):
        return None
    return Identity(token=acl_token)


def authenticate(server: Server, headers: Mapping[str, str], ctx: ListenerContext) -> Identity:
    token = request_token(headers)
    if ctx.task_api:
        if not token:
            raise UNAUTHORIZED
        identity = resolve_credential(server, token)
        if identity is None:
            raise FORBIDDEN
        return identity
    if not server.acl_enabled:
        return ACLS_DISABLED
    if not token:
        return ANONYMOUS
    identity = resolve_credential(server, token)
    if identity is None:
        raise HTTPError(403, "ACL token not found")
    return identity


def authorize(server: Server, identity: Identity, capability: str | None) -> None:
    """Raise 403 unless ``identity`` holds ``capability`` (None = no permission needed)."""
    if capability is None or not server.acl_enabled:
        return
    if identity.is_management:
        return
    raise HTTPError(403, PERMISSION_DENIED)
