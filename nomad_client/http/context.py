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
    alloc_id: str | None = None
    task: str | None = None


TCP_LISTENER = ListenerContext(name="http")

IDENTITY_ACLS_DISABLED = "acls-disabled"
IDENTITY_ANONYMOUS = "anonymous"
IDENTITY_ACL_TOKEN = "acl-token"
IDENTITY_WORKLOAD = "workload"


class Identity(NamedTuple):
    """The authenticated caller. A NamedTuple (immutable, and cheap to build on every
    Task API request)."""

    kind: str
    token: ACLToken | None = None
    claims: IdentityClaims | None = None

    @property
    def is_management(self) -> bool:
        return self.token is not None and self.token.type == "management"


ACLS_DISABLED = Identity(kind=IDENTITY_ACLS_DISABLED)
ANONYMOUS = Identity(kind=IDENTITY_ANONYMOUS)
