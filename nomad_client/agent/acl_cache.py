"""A client-only agent's credentials: the servers' answers, checked and cached here, so the
Task API and HTTP API authenticate without a local server (``http.auth.CredentialSource``).

* Workload identities are verified locally, by the keyring's own rules, against the public
  keys the servers publish (``Keyring.ListPublic``). The key set is fetched at start, again on
  a timer, and again when a token names a key it lacks, at most once per
  ``JWKS_MIN_INTERVAL`` (a stream of tokens with made-up key IDs costs one fetch). Whether the
  identity's allocation still runs is read from this client's own view.
* ACL tokens are resolved by the servers (``ACL.ResolveToken``) and cached for ``token_ttl``
  by the SHA-256 digest of their secret (the secret itself is never kept); policies
  (``ACL.GetPolicies``, ``ACL.GetClaimPolicies``) for ``policy_ttl``. A secret the servers
  do not know is remembered as unknown for a moment (``NEGATIVE_TTL``).
* While the servers are unreachable, what is cached keeps answering, however old: a known
  token keeps working, an unknown one is still refused, a tampered identity still fails its
  signature check. Nothing is ever allowed for lack of an answer: a credential or policy
  never seen resolves to a refusal. After a failed call the servers are not asked again for
  ``UNREACHABLE_RETRY`` seconds, so an outage does not slow every request down.

Every lookup of one thing runs once however many requests wait for it. No secret reaches a
log line: failures are logged by kind, never with the server's message or the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs

from nomad_client.acl import ACL, DENY_ALL, MANAGEMENT, ACLCache
from nomad_client.http.auth import CredentialPending
from nomad_client.rpcwire.errors import DEADLINE, NO_SERVER, UNAVAILABLE, RPCError
from nomad_client.server.acl_resolver import MAX_COMPILED, WorkloadKey, workload_key
from nomad_client.server.acl_resolver import _compile as compile_policies
from nomad_client.server.acls import ANONYMOUS_POLICY, is_uuid
from nomad_client.server.jwks_verify import JWKSError, PublicKeySet, token_key_id
from nomad_client.server.keyring import IdentityClaims, IdentityError, IdentityVerifier
from nomad_client.structs.codec import from_rpc
from nomad_client.structs.models import (
    DESIRED_RUN,
    TOKEN_MANAGEMENT,
    ACLPolicy,
    ACLToken,
    Allocation,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A secret the servers said they do not know: refused without asking again for this long.
NEGATIVE_TTL = 5.0
# After the servers failed to answer: answer from the cache alone for this long.
UNREACHABLE_RETRY = 2.0
# The key set is fetched again for an unknown key ID at most this often, and on this timer.
JWKS_MIN_INTERVAL = 10.0
JWKS_REFRESH_INTERVAL = 300.0
# A call the servers do not answer within this long counts as "unreachable".
RPC_TIMEOUT = 10.0
# Tokens (known and unknown, kept apart so a flood of bad secrets evicts no good one) and
# workloads remembered; the least recently used go first.
MAX_ENTRIES = 4096
# RPC error codes that mean "no answer", not "the answer is no".
UNREACHABLE_CODES = frozenset({NO_SERVER, UNAVAILABLE, DEADLINE})


class Transport(Protocol):
    """The client's RPC transport to the servers; errors are exceptions."""

    async def call(self, method: str, args: dict[str, Any]) -> Any: ...


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the servers did not answer (rather than refused)."""
    if isinstance(exc, RPCError):  # first: some RPC errors are OSErrors (PermissionDenied)
        return exc.code in UNREACHABLE_CODES
    if isinstance(exc, PermissionError):
        return False
    return isinstance(exc, OSError | TimeoutError)


def _describe(exc: BaseException) -> str:
    # The kind of failure only: a server's message or an exception's text may quote input.
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__} ({code})" if isinstance(code, str) else type(exc).__name__


def _secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


@attrs.frozen
class _Token:
    """A known token as the servers described it (its secret ID blanked)."""

    token: ACLToken
    policy_names: frozenset[str]
    fresh_until: float


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > MAX_ENTRIES:
        cache.popitem(last=False)


class RemoteCredentials:
    """``http.auth.CredentialSource`` for a client-only agent (see the module docstring).

    ``transport.call(method, args)`` reaches the servers; ``node_credentials`` gives the
    ``NodeID`` and ``SecretID`` the ACL calls carry (the node is known only once the client
    has started). ``alloc_view`` is the client's own allocation by ID. ``clock`` (monotonic
    seconds) times the caches. ``start`` begins the key set's refresh; ``close`` ends it
    and every lookup in flight. Use it from one event loop."""

    def __init__(self, transport: Transport, *, acl_enabled: bool, token_ttl: float = 30.0,
                 policy_ttl: float = 30.0,
                 alloc_view: Callable[[str], Allocation | None],
                 node_credentials: Callable[[], Mapping[str, str]] = dict,
                 clock: Callable[[], float] = time.monotonic,
                 rpc_timeout: float = RPC_TIMEOUT) -> None:
        if not (token_ttl > 0 and policy_ttl > 0):
            raise ValueError("token_ttl and policy_ttl must be positive")
        self._transport = transport
        self._acl_enabled = acl_enabled
        self._token_ttl = token_ttl
        self._policy_ttl = policy_ttl
        self._alloc_view = alloc_view
        self._node_credentials = node_credentials
        self._clock = clock
        self._rpc_timeout = rpc_timeout
        self._tokens: OrderedDict[bytes, _Token] = OrderedDict()
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # digest -> refused until
        # The policies each token holds (its roles' included), by accessor ID: what its ACL
        # is compiled from, as last heard.
        self._token_policies: OrderedDict[str, frozenset[str]] = OrderedDict()
        # Policy name -> (the policy, or None: it does not exist; fresh until).
        self._policies: dict[str, tuple[ACLPolicy | None, float]] = {}
        self._workloads: OrderedDict[WorkloadKey, tuple[frozenset[str], float]] = OrderedDict()
        # Compiled ACLs: by policy set as last resolved (the request path's shortcut, fresh
        # while every policy in it is), and by (name, modify index) pairs.
        self._acls: OrderedDict[frozenset[str], tuple[ACL, float]] = OrderedDict()
        self._compiled = ACLCache(MAX_COMPILED)
        self._flights: dict[Hashable, asyncio.Future[Any]] = {}
        self._unreachable_until = -math.inf
        self._outage_logged = False
        # Refusals by the servers logged since they last answered (each kind once).
        self._refusals_logged: set[tuple[str, str]] = set()
        self._keys: PublicKeySet | None = None
        self._verifier: IdentityVerifier | None = None
        self._jwks_tried_at = -math.inf
        self._refresher: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Fetch the servers' key set now and keep it fresh (an owned task)."""
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_keys(),
                                                  name="jwks-refresh")

    async def close(self) -> None:
        tasks: list[asyncio.Future[Any]] = list(self._flights.values())
        if self._refresher is not None:
            tasks.append(self._refresher)
            self._refresher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def acl_enabled(self) -> bool:
        return self._acl_enabled

    @property
    def servers_answering(self) -> bool:
        """Whether the last call to the servers was answered (or none failed recently)."""
        return self._clock() >= self._unreachable_until

    # ---- CredentialSource ----------------------------------------------------------------
    def token_by_secret(self, secret: str) -> ACLToken | None:
        if not is_uuid(secret):
            return None  # every secret is a UUID: nothing to ask the servers
        digest = _secret_digest(secret)
        now = self._clock()
        known = self._tokens.get(digest)
        if known is not None and (now < known.fresh_until or self._down(now)):
            return known.token
        refused_until = self._unknown.get(digest)
        if refused_until is not None and (now < refused_until or self._down(now)):
            return None
        raise CredentialPending(lambda: self._once(("token", digest),
                                                   lambda: self._load_token(digest, secret)))

    def verify_workload_identity(self, token: str) -> IdentityClaims:
        verifier = self._verifier
        if verifier is None:
            if self._jwks_due():
                raise CredentialPending(self._settle_keys)
            raise IdentityError("no signing keys known")
        try:
            claims = verifier.verify(token)
        except IdentityError:
            if self._jwks_due() and self._names_unknown_key(token):
                raise CredentialPending(self._settle_keys) from None
            raise
        # The same rule as the embedded server's, on this client's view of the allocation.
        alloc = self._alloc_view(claims.alloc_id)
        if alloc is None:
            raise IdentityError("allocation does not exist")
        if alloc.client_terminal() or alloc.desired_status != DESIRED_RUN:
            raise IdentityError("allocation is terminal")
        return claims

    def cached_acl(self, token: ACLToken | None, claims: IdentityClaims | None) -> ACL | None:
        if not self._acl_enabled:
            return MANAGEMENT
        if token is not None:
            if token.type == TOKEN_MANAGEMENT:
                return MANAGEMENT
            return self._fresh_acl(self._token_policies.get(token.accessor_id))
        if claims is not None:
            alloc = self._alloc_view(claims.alloc_id)
            known = None if alloc is None else self._workloads.get(
                workload_key(alloc, claims.task))
            if known is None or self._clock() >= known[1]:
                return None
            return self._fresh_acl(known[0])
        return None

    async def resolve_acl(self, token: ACLToken | None, claims: IdentityClaims | None) -> ACL:
        if not self._acl_enabled:
            return MANAGEMENT
        names: frozenset[str] | None
        if token is not None:
            if token.type == TOKEN_MANAGEMENT:
                return MANAGEMENT
            names = self._token_policies.get(token.accessor_id)
        elif claims is not None:
            alloc = self._alloc_view(claims.alloc_id)
            names = None if alloc is None else await self._workload_policies(
                workload_key(alloc, claims.task))
        else:
            names = frozenset({ANONYMOUS_POLICY})
        if names is None:
            return DENY_ALL  # nothing known about what it holds: nothing
        return await self._acl_of(names)

    def allocation(self, alloc_id: str) -> Allocation | None:
        return self._alloc_view(alloc_id)

    # ---- tokens --------------------------------------------------------------------------
    async def _load_token(self, digest: bytes, secret: str) -> None:
        now = self._clock()
        if self._down(now):
            self._refuse_unless_known(digest, now)
            return
        try:
            reply = await self._call("ACL.ResolveToken", {"TokenSecretID": secret})
            found = reply["Token"]
            token = None if found is None else from_rpc(found, ACLToken)
            names = frozenset(str(n) for n in reply.get("PolicyNames") or ())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._failed("ACL.ResolveToken", exc):
                self._refuse_unless_known(digest, now)
            else:
                self._tokens.pop(digest, None)
                _remember(self._unknown, digest, now + NEGATIVE_TTL)
            return
        if token is None:
            self._tokens.pop(digest, None)
            _remember(self._unknown, digest, now + min(NEGATIVE_TTL, self._token_ttl))
            return
        self._unknown.pop(digest, None)
        _remember(self._tokens, digest, _Token(token, names, now + self._token_ttl))
        _remember(self._token_policies, token.accessor_id, names)

    def _refuse_unless_known(self, digest: bytes, now: float) -> None:
        # Unreachable: a known token stays as it was (served stale); an unknown one is
        # refused until the servers are asked again.
        if digest not in self._tokens:
            _remember(self._unknown, digest, max(now, self._unreachable_until))

    # ---- policies ------------------------------------------------------------------------
    def _fresh_acl(self, names: frozenset[str] | None) -> ACL | None:
        known = None if names is None else self._acls.get(names)
        if known is None or self._clock() >= known[1]:
            return None
        return known[0]

    async def _acl_of(self, names: frozenset[str]) -> ACL:
        policies = await self._current_policies(names)
        if policies is None:
            return DENY_ALL  # a policy never seen, and no answer now: refuse, never guess
        fresh_until = min((self._policies[n][1] for n in names), default=math.inf)
        acl = DENY_ALL
        if policies:
            key = tuple((p.name, p.modify_index) for p in policies)
            compiled = self._compiled.peek(key)
            if compiled is None:
                compiled = await self._once(("compile", key), lambda: self._compile(key, policies))
            acl = compiled
        _remember(self._acls, names, (acl, fresh_until))
        return acl

    async def _compile(self, key: Hashable, policies: Sequence[ACLPolicy]) -> ACL:
        acl = await asyncio.to_thread(compile_policies, policies)
        return self._compiled.get(key, lambda: acl)

    async def _current_policies(self, names: Iterable[str]) -> list[ACLPolicy] | None:
        """The existing policies among ``names`` in name order, fetched again where stale
        (while the servers answer); None when one of them was never heard of."""
        wanted = sorted(names)
        now = self._clock()
        stale = tuple(n for n in wanted
                      if (known := self._policies.get(n)) is None or now >= known[1])
        if stale and not self._down(now):
            await self._once(("policies", stale), lambda: self._load_policies(stale))
        if any(n not in self._policies for n in wanted):
            return None
        return [p for n in wanted if (p := self._policies[n][0]) is not None]

    async def _load_policies(self, names: Sequence[str]) -> None:
        now = self._clock()
        try:
            reply = await self._call("ACL.GetPolicies", {"Names": list(names)})
            found = self._parse_policies(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed("ACL.GetPolicies", exc)
            return
        for name in names:
            self._policies[name] = (found.get(name), now + self._policy_ttl)

    async def _workload_policies(self, key: WorkloadKey) -> frozenset[str] | None:
        """The names of the policies attached to a workload; None if never heard of."""
        now = self._clock()
        known = self._workloads.get(key)
        if (known is None or now >= known[1]) and not self._down(now):
            await self._once(("workload", key), lambda: self._load_workload(key))
            known = self._workloads.get(key)
        return None if known is None else known[0]

    async def _load_workload(self, key: WorkloadKey) -> None:
        now = self._clock()
        namespace, job_id, group, task = key
        try:
            reply = await self._call("ACL.GetClaimPolicies", {
                "Namespace": namespace, "JobID": job_id, "Group": group, "Task": task})
            found = self._parse_policies(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed("ACL.GetClaimPolicies", exc)
            return
        for name, policy in found.items():
            self._policies[name] = (policy, now + self._policy_ttl)
        _remember(self._workloads, key, (frozenset(found), now + self._policy_ttl))

    @staticmethod
    def _parse_policies(reply: Any) -> dict[str, ACLPolicy]:
        policies = [from_rpc(p, ACLPolicy) for p in reply["Policies"]]
        return {p.name: p for p in policies}

    # ---- the key set -----------------------------------------------------------------------
    def _jwks_due(self) -> bool:
        return self._clock() - self._jwks_tried_at >= JWKS_MIN_INTERVAL

    def _names_unknown_key(self, token: str) -> bool:
        kid = token_key_id(token)
        return kid is not None and (self._keys is None or kid not in self._keys.key_ids)

    async def _settle_keys(self) -> None:
        await self._once("jwks", self._load_keys)

    async def _load_keys(self) -> bool:
        """Fetch the servers' key set; whether the servers answered with a usable one."""
        if self._down(self._clock()):
            return False  # asked again once they may answer: no request waits for nothing
        self._jwks_tried_at = self._clock()
        try:
            reply = await self._call("Keyring.ListPublic", {})
            keys = PublicKeySet.from_jwks(reply["Keys"])
        except asyncio.CancelledError:
            raise
        except JWKSError as exc:  # its text names the entry, never key material
            log.warning("the servers' public key set is unusable, keeping the one held: %s",
                        exc)
            return False
        except Exception as exc:
            self._failed("Keyring.ListPublic", exc)
            return False
        if self._keys is None or keys.fingerprint() != self._keys.fingerprint():
            # A fresh verifier: nothing verified or refused with the old set carries over.
            self._keys, self._verifier = keys, keys.verifier()
        return True

    async def _refresh_keys(self) -> None:
        while True:
            fetched = await self._once("jwks", self._load_keys)
            await asyncio.sleep(JWKS_REFRESH_INTERVAL if fetched else JWKS_MIN_INTERVAL)

    # ---- calls ---------------------------------------------------------------------------
    def _down(self, now: float) -> bool:
        return now < self._unreachable_until

    async def _call(self, method: str, args: dict[str, Any]) -> Any:
        async with asyncio.timeout(self._rpc_timeout):
            reply = await self._transport.call(method, {**self._node_credentials(), **args})
        if self._outage_logged:
            log.info("servers answer again: credentials are checked with them again")
            self._outage_logged = False
        self._refusals_logged.clear()
        self._unreachable_until = -math.inf
        return reply

    def _failed(self, method: str, exc: Exception) -> bool:
        """Note a failed call; whether it means the servers are unreachable."""
        if is_unreachable(exc):
            self._unreachable_until = self._clock() + UNREACHABLE_RETRY
            if not self._outage_logged:
                self._outage_logged = True
                log.warning("servers unreachable (%s): answering from cached credentials",
                            _describe(exc))
            return True
        kind = (method, _describe(exc))
        if kind not in self._refusals_logged:  # a task retrying must not flood the log
            self._refusals_logged.add(kind)
            log.warning("%s failed (%s): the credential is refused", *kind)
        return False

    async def _once(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """``load()``, run once for every caller waiting on ``key`` at the same time. A
        caller that goes away does not cancel it for the others."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(load())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight)  # type: ignore[no-any-return]

    def _landed(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._flights.get(key) is done:
            del self._flights[key]
        if not done.cancelled():
            done.exception()  # retrieved: its waiters (if any are left) saw it
