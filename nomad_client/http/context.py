"""Who a request came through and who sent it: values the router passes to auth and handlers."""

from __future__ import annotations

from typing import NamedTuple

import attrs

from nomad_client.acl import ACL, DENY_ALL, MANAGEMENT
from nomad_client.allocrunner.hooks import TaskProcesses
from nomad_client.http.ratelimit import TokenBucket
from nomad_client.server.keyring import IdentityClaims
from nomad_client.structs.models import ACLToken


class TaskSocketState:
    """What changes while a task's socket is served: its rate-limit bucket, and its audit
    lines' shared fields as last encoded (for the node ID they were encoded with)."""

    __slots__ = ("audit_fields", "bucket")

    def __init__(self) -> None:
        self.bucket = TokenBucket()
        self.audit_fields: tuple[str, str] | None = None  # (node ID, encoded fields)


@attrs.frozen
class ListenerContext:
    """Identifies the listener a request arrived on. ``task_api`` changes authentication:
    a credential is always required and the anonymous policy never applies."""

    name: str
    task_api: bool = False
    # The task a Task API listener serves (None on the TCP listener): named in its log and
    # audit lines; the socket's allocation is what ``bind_identity_to_socket`` checks.
    alloc_id: str | None = None
    task: str | None = None
    namespace: str | None = None
    job_id: str | None = None
    # Which processes are the task's (the peer-credential check).
    processes: TaskProcesses | None = attrs.field(default=None, eq=False)
    # The one mutable per-task part.
    state: TaskSocketState | None = attrs.field(default=None, eq=False)


TCP_LISTENER = ListenerContext(name="http")


class Identity(NamedTuple):
    """The authenticated caller: an ACL token, a workload identity, or neither (anonymous),
    with the ACL it holds, compiled once when the request is authenticated. A NamedTuple
    (immutable, and cheap to build on every Task API request)."""

    token: ACLToken | None = None
    claims: IdentityClaims | None = None
    # What the caller may do; an identity built without one may do nothing.
    acl: ACL = DENY_ALL

    @property
    def is_management(self) -> bool:
        return self.token is not None and self.token.type == "management"


# The ACL of an identity whose ACL is still to be compiled (``auth.resolve``): allows nothing.
UNRESOLVED = ACL()
# With ACLs off nobody is identified, and every check passes.
ACLS_DISABLED = Identity(acl=MANAGEMENT)
