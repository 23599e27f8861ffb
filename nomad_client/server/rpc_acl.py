"""The servers' answers to client agents that check credentials themselves (a client-only
agent's Task API and HTTP API), named after Nomad's RPCs.

Every ACL call comes from a registered client node: ``NodeID`` and ``SecretID`` (the node's
own secret) are checked first. A token travels back without its secret ID: the client only
needs to know what the secret it was shown stands for. ``Keyring.ListPublic`` needs no
caller: the public key set is public (``/.well-known/jwks.json`` serves the same).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nomad_client.server.server import Server
from nomad_client.structs.codec import to_rpc
from nomad_client.structs.models import ACLPolicy

Handler = Callable[[Server, dict[str, Any]], Awaitable[Any]]

# Far above any real secret (a UUID) or policy name; a request past these is refused.
MAX_SECRET_CHARS = 256
MAX_NAMES = 1024
MAX_NAME_CHARS = 512


def _text(args: dict[str, Any], name: str, limit: int = MAX_NAME_CHARS) -> str:
    value = args.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{name} must be a string of at most {limit} characters")
    return value


def _authenticate(server: Server, args: dict[str, Any]) -> None:
    # The server's own node check (constant-time secret comparison); PermissionError.
    server._authenticate_node(_text(args, "NodeID"), _text(args, "SecretID", MAX_SECRET_CHARS))


def _policies(policies: Sequence[ACLPolicy]) -> list[Any]:
    return [to_rpc(p) for p in sorted(policies, key=lambda p: p.name)]


async def _resolve_token(server: Server, args: dict[str, Any]) -> Any:
    """The token whose secret is ``TokenSecretID`` (null when there is none), and the names
    of every policy it holds, its roles' included (what the client compiles)."""
    _authenticate(server, args)
    secret = _text(args, "TokenSecretID", MAX_SECRET_CHARS)
    token = server.token_by_secret(secret) if secret else None
    if token is None:
        return {"Token": None, "PolicyNames": [], "Index": server.store.index}
    names = server.identity_policy_names(token, None)
    reply = to_rpc(token)
    reply["SecretID"] = ""  # never sent back: the caller already holds it, or must not
    return {"Token": reply, "PolicyNames": sorted(names or ()), "Index": server.store.index}


async def _get_policies(server: Server, args: dict[str, Any]) -> Any:
    """The existing policies among ``Names`` (a missing one is simply not in the reply)."""
    _authenticate(server, args)
    names = args.get("Names")
    if not isinstance(names, list) or len(names) > MAX_NAMES or not all(
            isinstance(n, str) and len(n) <= MAX_NAME_CHARS for n in names):
        raise ValueError(f"Names must be a list of at most {MAX_NAMES} strings")
    found = [p for p in map(server.acls.policy, dict.fromkeys(names)) if p is not None]
    return {"Policies": _policies(found), "Index": server.store.index}


async def _get_claim_policies(server: Server, args: dict[str, Any]) -> Any:
    """The policies JobACL attaches to one workload: ``Namespace``, ``JobID`` (the parent's,
    for a dispatched or periodic child), ``Group`` and ``Task``."""
    _authenticate(server, args)
    key = tuple(_text(args, name) for name in ("Namespace", "JobID", "Group", "Task"))
    names = server.acls.workload_policy_names(*key)
    found = [p for p in map(server.acls.policy, names) if p is not None]
    return {"Policies": _policies(found), "Index": server.store.index}


async def _keyring_list_public(server: Server, args: dict[str, Any]) -> Any:
    return {"Keys": server.keyring.jwks()["keys"], "Index": server.store.index}


ACL_HANDLERS: dict[str, Handler] = {
    "ACL.ResolveToken": _resolve_token,
    "ACL.GetPolicies": _get_policies,
    "ACL.GetClaimPolicies": _get_claim_policies,
    "Keyring.ListPublic": _keyring_list_public,
}
