"""Who a request came through and who sent it: values the router passes to auth and handlers."""

from __future__ import annotations

from typing import NamedTuple

import attrs

from nomad_client.acl import ACL, DENY_ALL, MANAGEMENT
from nomad_client.server.keyring import IdentityClaims
from nomad_client.structs.models import ACLToken


@attrs.frozen
class ListenerContext:
    """Identifies the listener a request arrived on. ``task_api`` changes authentication:
    a credential is always required and the anonymous policy never applies."""

    name: str
    task_api: bool = False
    # The task a Task API listener serves (None on the TCP listener), named in its log lines.
    alloc_id: str | None = None
    task: str | None = None


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
