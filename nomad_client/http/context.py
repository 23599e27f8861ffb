"""Who a request came through and who sent it: values the router passes to auth and handlers."""

from __future__ import annotations

from typing import NamedTuple

import attrs

from nomad_client.server.keyring import IdentityClaims
from nomad_client.structs.models import ACLToken


@attrs.frozen
class ListenerContext:
    """Identifies the listener a request arrived on. ``task_api`` changes authentication:
    a credential is always required and the anonymous policy never applies."""

    name: str
    task_api: bool = False
    # The task a Task API listener serves (None on the TCP listener). Named in its log lines
    # now; the ACL system (the next piece of work) reads them to authorize per identity.
    alloc_id: str | None = None
    task: str | None = None


TCP_LISTENER = ListenerContext(name="http")


class Identity(NamedTuple):
    """The authenticated caller: an ACL token, a workload identity, or neither (anonymous).
    A NamedTuple (immutable, and cheap to build on every Task API request)."""

    token: ACLToken | None = None
    # Not read yet: the ACL system (the next piece of work) finds a workload identity's
    # policies from the job, group and task its claims name.
    claims: IdentityClaims | None = None

    @property
    def is_management(self) -> bool:
        return self.token is not None and self.token.type == "management"


ANONYMOUS = Identity()
# With ACLs off nobody is identified either; authorize() lets every request through.
ACLS_DISABLED = ANONYMOUS
