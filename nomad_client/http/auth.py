"""Authentication and authorization for every HTTP request: the one place token checks live.

Rules by listener:
* Task API (a task's ``api.sock``): a credential is always required, whether ACLs are on or
  off. No token -> 401 ``Unauthorized``. Anything that is not a real credential (unknown,
  expired, malformed, badly signed, or the identity of an allocation that is no longer
  running) -> 403 ``Forbidden``. The anonymous policy never applies. Unlike Nomad, a random
  string is NOT accepted when ACLs are disabled.
* TCP API: with ACLs disabled everyone is allowed; with ACLs enabled a missing token means
  the anonymous identity and an invalid one is 403.

Credentials come from a ``CredentialSource``: the embedded ``Server`` itself, or on a
client-only agent the servers' answers cached by ``agent.acl_cache.RemoteCredentials``.
A remote source that has to ask the servers first raises ``CredentialPending`` from the
synchronous calls; ``authenticate_settled`` (and the router) await it and ask again, so the
request path of a cached caller stays without a coroutine.

Authorization: an authenticated identity carries its compiled ACL (``resolve_acl``:
everything with ACLs disabled; for anonymous, the ``anonymous`` policy or nothing). Each
route declares a ``Need``, checked before its handler, a namespaced one in the namespace the
request names (``?namespace=``, default ``default``). Handlers that look an object up check
its own namespace too (``require``), and lists keep only what the caller may see
(``allows``). A refusal is 403 ``Permission denied``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

import attrs
from multidict import MultiMapping

from nomad_client.acl import ACL, WorkloadClaim
from nomad_client.acl.capabilities import NAMESPACE_CAPABILITIES, OPERATOR_CAPABILITIES
from nomad_client.http.context import ACLS_DISABLED, UNRESOLVED, Identity, ListenerContext
from nomad_client.http.errors import PERMISSION_DENIED, HTTPError
from nomad_client.server.acl_resolver import workload_key
from nomad_client.server.keyring import LEEWAY_SECONDS, IdentityClaims, IdentityError
from nomad_client.structs.models import ACLToken, Allocation
from nomad_client.structs.namespaces import DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from aiohttp import web

    from nomad_client.http.router import ApiRequest

log = logging.getLogger(__name__)

UNAUTHORIZED = HTTPError(401, "Unauthorized")
FORBIDDEN = HTTPError(403, "Forbidden")
TOKEN_NOT_FOUND = HTTPError(403, "ACL token not found")
PERMISSION_REFUSED = HTTPError(403, PERMISSION_DENIED)
# In a request: every namespace. To the ACL, a check in it asks "in any namespace?".
ALL_NAMESPACES = "*"


class CredentialPending(Exception):
    """A remote credential source cannot answer from its cache: await ``settle()`` (it asks
    the servers and caches their answer, or what it may still use when they are unreachable),
    then ask again. The embedded server never raises it. Carries no credential text."""

    def __init__(self, settle: Callable[[], Awaitable[None]]) -> None:
        super().__init__("credential lookup pending")
        self.settle = settle


class CredentialSource(Protocol):
    """What authentication and authorization ask of the agent's credential source. The
    synchronous calls may raise ``CredentialPending`` (a remote source's cache miss)."""

    @property
    def acl_enabled(self) -> bool: ...

    def token_by_secret(self, secret: str) -> ACLToken | None:
        """The token whose secret ID is ``secret`` (expired or not); None if none."""
        ...

    def verify_workload_identity(self, token: str) -> IdentityClaims:
        """The claims of a valid workload identity of a running allocation, else
        ``IdentityError``."""
        ...

    def cached_acl(self, token: ACLToken | None, claims: IdentityClaims | None
                   ) -> ACL | None:
        """The caller's compiled ACL if it is at hand without waiting, else None."""
        ...

    async def resolve_acl(self, token: ACLToken | None, claims: IdentityClaims | None
                          ) -> ACL:
        """The caller's compiled ACL (anonymous with neither)."""
        ...

    def allocation(self, alloc_id: str) -> Allocation | None:
        """The allocation a workload identity names (its workload's policies and grants)."""
        ...


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
    # Every real credential (a UUID, a JWT) is ASCII. aiohttp decodes header bytes as UTF-8
    # with surrogateescape, so bytes that are not UTF-8 arrive here as lone surrogates, which
    # later code could not even encode: refuse them all up front. (isascii is O(1); control
    # characters need no check of their own: no credential matches them.)
    return token.isascii()


def _credential(server: CredentialSource, token: str
                ) -> tuple[ACLToken | None, IdentityClaims | None] | None:
    """A real credential's ACL token or workload identity claims; None if it is not one.
    Never raises for bad input."""
    if not _is_token_text(token):
        return None
    if _looks_like_jwt(token):
        try:
            return None, server.verify_workload_identity(token)
        except IdentityError:
            return None
    acl_token = server.token_by_secret(token)
    if acl_token is None or acl_token.expired(time.time()):
        return None
    return acl_token, None


def authenticate(server: CredentialSource, headers: Mapping[str, str], ctx: ListenerContext
                 ) -> Identity:
    """The caller, or 401/403. Synchronous, so the request path pays no coroutine: when the
    caller's ACL still has to be compiled, the identity carries ``UNRESOLVED`` (which allows
    nothing) and ``resolve`` must be awaited. A remote source may raise
    ``CredentialPending`` (``authenticate_settled`` handles it)."""
    token = request_token(headers)
    if ctx.task_api:
        if not token:
            raise UNAUTHORIZED  # never anonymous
    elif not server.acl_enabled:
        return ACLS_DISABLED
    elif not token:
        return Identity(None, None, UNRESOLVED)  # anonymous
    credential = _credential(server, token)
    if credential is None:
        raise FORBIDDEN if ctx.task_api else TOKEN_NOT_FOUND
    acl_token, claims = credential
    return Identity(acl_token, claims, server.cached_acl(acl_token, claims) or UNRESOLVED)


async def authenticate_settled(server: CredentialSource, headers: Mapping[str, str],
                               ctx: ListenerContext) -> Identity:
    """``authenticate``, waiting for a remote source to settle a credential it had to look
    up. A source still unsettled after that is treated as having refused the credential:
    never fail open."""
    try:
        return authenticate(server, headers, ctx)
    except CredentialPending as pending:
        await pending.settle()
    try:
        return authenticate(server, headers, ctx)
    except CredentialPending:
        raise (FORBIDDEN if ctx.task_api else TOKEN_NOT_FOUND) from None


# bind_identity_to_socket: a workload identity works only on its own allocation's sockets.
IDENTITY_NOT_BOUND = ("Permission denied: the workload identity belongs to another "
                      "allocation than this socket's (client.task_api.bind_identity_to_socket)")


def socket_binding_refusal(identity: Identity, ctx: ListenerContext) -> str | None:
    """With ``bind_identity_to_socket`` on: why ``identity`` may not be used on the Task API
    socket ``ctx`` describes (a 403's text), or None. ACL tokens are not bound to a socket;
    a workload identity is, to its allocation (any task of it)."""
    claims = identity.claims
    if claims is not None and claims.alloc_id != ctx.alloc_id:
        return IDENTITY_NOT_BOUND
    return None


async def resolve(server: CredentialSource, identity: Identity) -> Identity:
    """``identity`` with its compiled ACL (for one ``authenticate`` left unresolved)."""
    return identity._replace(acl=await server.resolve_acl(identity.token, identity.claims))


# ---- long-lived requests ---------------------------------------------------------------
TOKEN_EXPIRED = HTTPError(403, "ACL token expired")


def credential_expiry(identity: Identity) -> float | None:
    """When the caller's credential stops being accepted (unix seconds); None: not by time."""
    if identity.token is not None and identity.token.expiration_time is not None:
        return identity.token.expiration_time / 1e9
    if identity.claims is not None and identity.claims.expires_at is not None:
        return float(identity.claims.expires_at + LEEWAY_SECONDS)
    return None


async def reauthenticate(server: CredentialSource, identity: Identity,
                         headers: Mapping[str, str], ctx: ListenerContext) -> Identity:
    """The caller of a request that outlives a moment (an event stream) checked again, as
    a new request would be, with its ACL as it is now (policy changes included). 403
    ``ACL token expired`` once ``identity``'s credential has expired; 403 once its token
    is deleted or its workload's allocation has stopped."""
    try:
        fresh = await authenticate_settled(server, headers, ctx)
    except HTTPError:
        expiry = credential_expiry(identity)
        if expiry is not None and time.time() >= expiry:
            raise TOKEN_EXPIRED from None
        raise
    return await resolve(server, fresh) if fresh.acl is UNRESOLVED else fresh


# ---- authorization ---------------------------------------------------------------------
Check = Callable[[ACL, str], bool]


@attrs.frozen
class Need:
    """What a route asks of the caller's ACL, built once when the route is registered:
    ``Need.none``, ``Need.management``, ``Need.agent_read``, ``Need.agent_write``,
    ``Need.node_read``, ``Need.node_write``, ``Need.namespace_access`` (any capability
    short of deny: reading the namespace itself), or ``Need.namespace(cap, ...)`` (any one of
    the capabilities, in the namespace asked about)."""

    name: str
    # (acl, namespace) -> allowed; None when the route needs no permission at all.
    check: Check | None = attrs.field(eq=False, repr=False)
    namespaced: bool = False

    none: ClassVar[Need]
    management: ClassVar[Need]
    agent_read: ClassVar[Need]
    agent_write: ClassVar[Need]
    node_read: ClassVar[Need]
    node_write: ClassVar[Need]
    namespace_access: ClassVar[Need]

    @classmethod
    def namespace(cls, *capabilities: str) -> Need:
        unknown = [c for c in capabilities if c not in NAMESPACE_CAPABILITIES]
        if not capabilities or unknown:
            raise ValueError(f"not namespace capabilities: {unknown or 'none given'}")
        first = capabilities[0]
        if len(capabilities) == 1:  # the common case, without a generator per check
            def check(acl: ACL, ns: str) -> bool:
                return acl.allow_namespace_op(ns, first)
        else:
            def check(acl: ACL, ns: str) -> bool:
                return any(acl.allow_namespace_op(ns, c) for c in capabilities)
        return cls("namespace:" + "|".join(capabilities), check, namespaced=True)

    @classmethod
    def operator_capability(cls, capability: str) -> Need:
        """An ``operator`` capability (``keyring-read``, ``keyring-rotate``, …): granted by
        ``operator { policy = "write" }`` or by naming it in ``capabilities``."""
        if capability not in OPERATOR_CAPABILITIES or capability == "deny":
            raise ValueError(f"not an operator capability: {capability!r}")
        return cls("operator:" + capability,
                   lambda acl, ns: acl.allow_operator_capability(capability))

    def allows(self, acl: ACL, namespace: str) -> bool:
        return self.check is None or acl.management or self.check(acl, namespace)


Need.none = Need("none", None)
Need.management = Need("management", lambda acl, ns: acl.management)
Need.agent_read = Need("agent:read", lambda acl, ns: acl.allow_agent_read())
Need.agent_write = Need("agent:write", lambda acl, ns: acl.allow_agent_write())
Need.node_read = Need("node:read", lambda acl, ns: acl.allow_node_read())
Need.node_write = Need("node:write", lambda acl, ns: acl.allow_node_write())
Need.namespace_access = Need("namespace:any", lambda acl, ns: acl.allow_namespace(ns),
                             namespaced=True)


def request_namespace(query: MultiMapping[str]) -> str:
    """The namespace a request names (``?namespace=``; ``*`` means all of them)."""
    return query.get("namespace") or DEFAULT_NAMESPACE


def authorize(identity: Identity, need: Need, request: web.BaseRequest) -> None:
    """Raise 403 unless ``identity`` meets the route's ``need`` in the namespace the request
    names (for ``*``: in some namespace)."""
    if need.check is None or identity.acl.management:
        return
    namespace = request_namespace(request.query) if need.namespaced else ""
    if not need.check(identity.acl, namespace):
        raise PERMISSION_REFUSED


def require_in_request(req: ApiRequest, need: Need) -> None:
    """``authorize`` again, for a need the handler only knows once it has read the request
    (stricter than the one its route declares)."""
    authorize(req.identity, need, req.raw)


def allows(req: ApiRequest, namespace: str, need: Need) -> bool:
    """Whether the caller meets ``need`` in ``namespace``, an object's own (for filters).
    No object lives in ``*``, so here it never stands for "some namespace"."""
    acl = req.identity.acl
    return acl.management or (namespace != ALL_NAMESPACES and need.allows(acl, namespace))


def require(req: ApiRequest, namespace: str, need: Need) -> None:
    """Raise 403 unless the caller meets ``need`` in ``namespace``, an object's own."""
    if not allows(req, namespace, need):
        raise PERMISSION_REFUSED


# ---- variables -------------------------------------------------------------------------
# The variable operations a workload identity's implicit grants can answer (Nomad passes
# the claim only to the Read and List RPCs): never writes, deletes or locks.
_CLAIMED_VARIABLE_OPS = frozenset({"read", "list"})


def _workload_claim(server: CredentialSource, claims: IdentityClaims) -> WorkloadClaim | None:
    alloc = server.allocation(claims.alloc_id)
    if alloc is None:
        return None
    namespace, job_id, group, task = workload_key(alloc, claims.task)
    return WorkloadClaim(namespace=namespace, job_id=job_id, group=group, task=task)


def allows_variable(req: ApiRequest, server: CredentialSource, namespace: str, path: str,
                    op: str) -> bool:
    """Whether the caller may ``op`` (read, list, write, destroy) the variable at ``path``.
    Variable capabilities come only from ``variables`` rules and, for read and list, a
    workload's implicit grant of its own ``nomad/jobs/...`` paths."""
    acl = req.identity.acl
    if acl.management:
        return True
    claims = req.identity.claims
    claim = None
    if claims is not None and op in _CLAIMED_VARIABLE_OPS:
        claim = _workload_claim(server, claims)
    return acl.allow_variable_op(namespace, path, op, claim)


# ---- service registrations -------------------------------------------------------------
_READ_SERVICES = Need.namespace("read-job")


def allows_service_read(req: ApiRequest, server: CredentialSource, namespace: str) -> bool:
    """Whether the caller may read the service registrations of ``namespace``: with
    ``read-job`` there, or as a workload of that namespace, which needs no policy for it
    (Nomad's implicit grant lets every workload discover services; here, those of its own
    namespace only)."""
    if allows(req, namespace, _READ_SERVICES):
        return True
    claims = req.identity.claims
    claim = None if claims is None else _workload_claim(server, claims)
    return claim is not None and claim.namespace == namespace


# ---- alloc exec ------------------------------------------------------------------------
ALLOC_EXEC = Need.namespace("alloc-exec")
# Also needed for a task without filesystem isolation (raw_exec): its commands run on the
# node itself, as Nomad asks.
ALLOC_NODE_EXEC = Need.namespace("alloc-node-exec")
HANDSHAKE_MISMATCH = HTTPError(400, "handshake auth token mismatched auth header token")


def require_exec(identity: Identity, namespace: str, *, fs_isolated: bool) -> None:
    """Raise 403 unless ``identity`` may run commands in a task of ``namespace``: with
    ``alloc-exec`` there, and ``alloc-node-exec`` too when the task is not isolated. A
    workload identity holds them only through a policy attached to its job."""
    needs = (ALLOC_EXEC,) if fs_isolated else (ALLOC_EXEC, ALLOC_NODE_EXEC)
    acl = identity.acl
    if not acl.management and (namespace == ALL_NAMESPACES
                               or not all(need.allows(acl, namespace) for need in needs)):
        raise PERMISSION_REFUSED


async def authenticate_handshake(server: CredentialSource, headers: Mapping[str, str], token: str,
                                 ctx: ListenerContext) -> Identity:
    """The caller named by a websocket's first frame (``ws_handshake``, for browsers, which
    cannot set headers); a header token, if one was sent too, must be the same."""
    header_token = request_token(headers)
    if header_token and header_token != token:
        raise HANDSHAKE_MISMATCH
    identity = await authenticate_settled(server, {"X-Nomad-Token": token}, ctx)
    return await resolve(server, identity) if identity.acl is UNRESOLVED else identity
