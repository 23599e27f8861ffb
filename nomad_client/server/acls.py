"""ACL tokens, policies and roles on the server: Nomad's validation rules and error texts,
the writes that store them, bootstrap, and which policies an identity holds.

Every check that depends on other rows (a role's policies exist, a name or secret is not
taken, the token being updated is still there) runs inside a row update, under the state
store's write lock, so two concurrent requests can never both pass it. Errors carry Nomad's
texts; ``ACLInvalid`` is a refusal of the request (400), ``ACLNotFound`` a missing object
(404). Neither ever names a secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from nomad_client.acl import JobACL, PolicyError, job_acl_matches, parse_policy, validate_job_acl
from nomad_client.durations import HOUR, MINUTE, format_duration
from nomad_client.server.state import (
    ACL_BOOTSTRAP,
    ACL_POLICIES,
    ACL_ROLES,
    ACL_TOKENS,
    DELETE,
    StateStore,
    secret_digest,
)
from nomad_client.structs.models import (
    TOKEN_CLIENT,
    TOKEN_MANAGEMENT,
    ACLPolicy,
    ACLRole,
    ACLToken,
)

log = logging.getLogger(__name__)

# Nomad's defaults for acl.token_min_expiration_ttl / token_max_expiration_ttl.
MIN_TOKEN_TTL = MINUTE
MAX_TOKEN_TTL = 24 * HOUR
MAX_TOKEN_NAME_BYTES = 256
MAX_DESCRIPTION_CHARS = 256
# The HCL front-end needs a few hundred bytes of memory per byte of rules: bound the input.
MAX_RULES_CHARS = 256 * 1024
NAME_PATTERN = re.compile(r"[a-zA-Z0-9-]{1,128}")
BOOTSTRAP_RESET_FILE = "acl-bootstrap-reset"
BOOTSTRAP_ROW = "bootstrap"
# The policy a request without a token holds (Nomad's anonymous token).
ANONYMOUS_POLICY = "anonymous"


class ACLInvalid(ValueError):
    """The request is refused (HTTP 400); str() is Nomad's text for why."""


class ACLNotFound(LookupError):
    """The object the request names does not exist (HTTP 404)."""


@attrs.frozen
class RoleLink:
    """A token's reference to a role, by ID or (when the ID is empty) by name."""

    id: str = ""
    name: str = ""


def multierror(errors: Sequence[str]) -> str:
    """Errors listed as Go's hashicorp/go-multierror prints them (Nomad's error bodies)."""
    count = "1 error occurred" if len(errors) == 1 else f"{len(errors)} errors occurred"
    return count + ":\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


def is_uuid(text: str) -> bool:
    try:
        return len(text) == 36 and str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def _blake2b(*parts: str) -> str:
    digest = hashlib.blake2b(digest_size=32)
    for part in parts:
        digest.update(part.encode())
    return base64.b64encode(digest.digest()).decode()


def token_hash(token: ACLToken) -> str:
    return _blake2b(token.name, token.type, *token.policies,
                    "global" if token.global_ else "local", *token.roles)


def policy_hash(policy: ACLPolicy) -> str:
    scope = policy.job_acl
    workload = () if scope is None else (scope.namespace, scope.job_id, scope.group, scope.task)
    return _blake2b(policy.name, policy.description, policy.rules, *workload)


def role_hash(role: ACLRole) -> str:
    return _blake2b(role.name, role.description, *role.policies)


def _token_errors(token: ACLToken, existing: ACLToken | None) -> list[str]:
    """Nomad's ``ACLToken.Validate``: ``existing`` is the stored token an update replaces."""
    errors = []
    if len(token.name.encode()) > MAX_TOKEN_NAME_BYTES:
        errors.append("token name too long")
    if token.type == TOKEN_CLIENT:
        if not token.policies and not token.roles:
            errors.append("client token missing policies or roles")
    elif token.type == TOKEN_MANAGEMENT:
        if token.policies or token.roles:
            errors.append("management token cannot be associated with policies or roles")
    else:
        errors.append("token type must be client or management")
    if existing is None:
        if token.expiration_ttl < 0:
            errors.append(f"token expiration TTL '{format_duration(token.expiration_ttl)}' "
                          "should not be negative")
        if token.expiration_time is not None:
            if token.create_time > token.expiration_time:
                errors.append("expiration time cannot be before create time")
            expires_in = token.expiration_time - token.create_time
            if expires_in > MAX_TOKEN_TTL:
                errors.append(f"expiration time cannot be more than "
                              f"{format_duration(MAX_TOKEN_TTL)} in the future "
                              f"(was {format_duration(expires_in)})")
            elif expires_in < MIN_TOKEN_TTL:
                errors.append(f"expiration time cannot be less than "
                              f"{format_duration(MIN_TOKEN_TTL)} in the future "
                              f"(was {format_duration(expires_in)})")
    else:
        if existing.global_ != token.global_:
            errors.append("cannot toggle global mode")
        if existing.expiration_ttl != token.expiration_ttl:
            errors.append("cannot update expiration TTL")
        if existing.expiration_time != token.expiration_time:
            errors.append("cannot update expiration time")
    return errors


def _dedup(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


class ACLs:
    """The ACL part of the server's state: reads, and writes that validate as Nomad does."""

    def __init__(self, store: StateStore, data_dir: Path | None = None) -> None:
        self.store = store
        # The server's data dir, where an operator drops the bootstrap reset file.
        self.data_dir = data_dir

    # ---- reads -------------------------------------------------------------------------
    def token(self, accessor_id: str) -> ACLToken | None:
        return self.store.get(ACL_TOKENS, accessor_id)

    def tokens(self) -> list[ACLToken]:
        return self.store.rows(ACL_TOKENS)

    def token_by_secret(self, secret: str) -> ACLToken | None:
        token = self.store.lookup(ACL_TOKENS, "secret", secret_digest(secret))
        # The digest found the row; the secret itself is still compared (in constant time),
        # so only the exact secret ever matches.
        if token is None or not hmac.compare_digest(
                token.secret_id.encode("utf-8", "surrogatepass"),
                secret.encode("utf-8", "surrogatepass")):
            return None
        return token

    def policy(self, name: str) -> ACLPolicy | None:
        return self.store.get(ACL_POLICIES, name)

    def policies(self) -> list[ACLPolicy]:
        return self.store.rows(ACL_POLICIES)

    def role(self, role_id: str) -> ACLRole | None:
        return self.store.get(ACL_ROLES, role_id)

    def role_by_name(self, name: str) -> ACLRole | None:
        return self.store.lookup(ACL_ROLES, "name", name)

    def roles(self) -> list[ACLRole]:
        return self.store.rows(ACL_ROLES)

    def token_policy_names(self, token: ACLToken) -> frozenset[str]:
        """The token's own policies and those of the roles it links to. Links to deleted
        roles are skipped; names of policies that do not exist are kept (they match nothing,
        as in Nomad)."""
        names = set(token.policies)
        for role_id in token.roles:
            role = self.role(role_id)
            if role is not None:
                names.update(role.policies)
        return frozenset(names)

    def workload_policy_names(self, namespace: str, job_id: str, group: str, task: str
                              ) -> frozenset[str]:
        """The policies whose JobACL attaches them to this workload."""
        return frozenset(
            p.name for p in self.store.values(ACL_POLICIES)
            if p.job_acl is not None and job_acl_matches(
                JobACL(**attrs.asdict(p.job_acl)), namespace=namespace, job_id=job_id,
                group=group, task=task))

    # ---- bootstrap -----------------------------------------------------------------------
    async def bootstrap(self, secret: str = "") -> ACLToken:
        """Create the first management token (with ``secret`` as its secret ID if given).
        Once done, only again with the reset file naming the current reset index."""
        if secret and not is_uuid(secret):
            raise ACLInvalid("invalid acl token")
        wanted_reset = await asyncio.to_thread(self._reset_index_from_file)
        token = ACLToken(accessor_id=str(uuid.uuid4()), secret_id=secret or str(uuid.uuid4()),
                         name="Bootstrap Token", type=TOKEN_MANAGEMENT, global_=True)
        token = attrs.evolve(token, hash=token_hash(token))

        def mark(current: dict[str, Any] | None, index: int) -> dict[str, Any]:
            if current is not None:
                reset = current["ModifyIndex"]
                if wanted_reset == 0:
                    raise ACLInvalid(f"ACL bootstrap already done (reset index: {reset})")
                if wanted_reset != reset:
                    raise ACLInvalid(f"Invalid bootstrap reset index (specified "
                                     f"{wanted_reset}, reset index: {reset})")
            return {}

        await self.store.write(updates={ACL_BOOTSTRAP: [(BOOTSTRAP_ROW, mark)],
                                        ACL_TOKENS: [(token.accessor_id,
                                                      self._insert_token(token))]})
        return self._stored(ACL_TOKENS, token.accessor_id)

    def _reset_index_from_file(self) -> int:
        if self.data_dir is None:
            return 0
        path = self.data_dir / BOOTSTRAP_RESET_FILE
        try:
            with path.open("rb") as file:
                text = file.read(64).decode(errors="replace")  # an index is a few digits
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot read the ACL bootstrap reset file %s: %s", path, exc.strerror)
            return 0
        try:
            return int(text.strip())
        except ValueError:
            log.warning("the ACL bootstrap reset file %s does not hold an index", path)
            return 0

    # ---- tokens --------------------------------------------------------------------------
    async def upsert_token(self, draft: ACLToken, role_links: Sequence[RoleLink] = ()
                           ) -> ACLToken:
        """Create (``draft.accessor_id`` empty) or update a token, as Nomad's
        ``ACL.UpsertTokens`` does. An unknown accessor ID creates the token with the IDs
        given, if both are UUIDs and it is a client token (an operator moving tokens
        between clusters); otherwise it is an error."""
        accessor = draft.accessor_id or str(uuid.uuid4())

        def apply(current: ACLToken | None, index: int) -> ACLToken:
            token = self._admit_token(draft, role_links, current, accessor)
            return self._insert_token(token)(current, index)

        await self.store.write(updates={ACL_TOKENS: [(accessor, apply)]})
        return self._stored(ACL_TOKENS, accessor)

    def _admit_token(self, draft: ACLToken, role_links: Sequence[RoleLink],
                     current: ACLToken | None, accessor: str) -> ACLToken:
        if draft.accessor_id and current is None and not (
                is_uuid(draft.accessor_id) and is_uuid(draft.secret_id)
                and draft.type == TOKEN_CLIENT):
            raise ACLInvalid(f"cannot find token {draft.accessor_id}")
        if current is None:
            now = time.time_ns()
            expiration = draft.expiration_time
            if expiration is None and draft.expiration_ttl:
                expiration = now + draft.expiration_ttl
            token = attrs.evolve(
                draft, accessor_id=accessor,
                secret_id=draft.secret_id if draft.accessor_id else str(uuid.uuid4()),
                create_time=now, expiration_time=expiration)
        else:
            # An update never changes the secret or the creation time, whatever it sends.
            token = attrs.evolve(draft, secret_id=current.secret_id,
                                 create_time=current.create_time)
        # Validated with the links as given (Nomad checks them only afterwards), then
        # stored with the IDs they resolve to.
        token = attrs.evolve(token, policies=_dedup(token.policies),
                             roles=tuple(link.id or link.name for link in role_links))
        errors = _token_errors(token, current)
        if errors:
            raise ACLInvalid(f"token 0 invalid: {multierror(errors)}")
        token = attrs.evolve(token, roles=self._role_ids(role_links))
        return attrs.evolve(token, hash=token_hash(token))

    def _role_ids(self, links: Sequence[RoleLink]) -> tuple[str, ...]:
        ids: list[str] = []
        for link in links:
            role = self.role(link.id) if link.id else self.role_by_name(link.name)
            if role is None:
                raise ACLInvalid(f"cannot find role {link.id or link.name}")
            ids.append(role.id)
        return _dedup(ids)

    def _insert_token(self, token: ACLToken) -> Any:
        """A row update writing ``token``, unless another token already holds its secret."""
        def apply(current: ACLToken | None, index: int) -> ACLToken:
            holder = self.store.lookup(ACL_TOKENS, "secret", secret_digest(token.secret_id))
            if holder is not None and holder.accessor_id != token.accessor_id:
                raise ACLInvalid("token 0 invalid: its secret ID belongs to another token")
            return token
        return apply

    async def delete_token(self, accessor_id: str) -> int:
        def remove(current: ACLToken | None, index: int) -> Any:
            if current is None:
                raise ACLInvalid(f"Cannot delete nonexistent tokens: {accessor_id}")
            return DELETE

        return await self.store.write(updates={ACL_TOKENS: [(accessor_id, remove)]})

    # ---- policies ------------------------------------------------------------------------
    async def upsert_policy(self, draft: ACLPolicy) -> int:
        """Validate as Nomad's ``ACLPolicy.Validate`` (the rules parsed strictly) and store
        the policy with its rules text as written."""
        job_acl = draft.job_acl
        if job_acl is not None and not any(attrs.astuple(job_acl)):
            job_acl = None  # an empty JobACL attaches to nothing: the same as none
        errors = []
        if not NAME_PATTERN.fullmatch(draft.name):
            errors.append(f"invalid name '{draft.name}'")
        if len(draft.rules) > MAX_RULES_CHARS:
            errors.append(f"failed to parse rules: rules are longer than {MAX_RULES_CHARS} "
                          "characters")
        else:
            try:
                # Parsing is CPU work on caller input: off the event loop.
                await asyncio.to_thread(parse_policy, draft.rules, strict=True)
            except PolicyError as err:
                errors.append(f"failed to parse rules: {err}")
        if len(draft.description) > MAX_DESCRIPTION_CHARS:
            errors.append(f"description longer than {MAX_DESCRIPTION_CHARS}")
        if job_acl is not None:
            errors.extend(validate_job_acl(JobACL(**attrs.asdict(job_acl))))
        if errors:
            raise ACLInvalid(f"policy 0 invalid: {multierror(errors)}")
        policy = attrs.evolve(draft, job_acl=job_acl)
        policy = attrs.evolve(policy, hash=policy_hash(policy))
        return await self.store.write({ACL_POLICIES: [(policy.name, policy)]})

    async def delete_policy(self, name: str) -> int:
        """Remove a policy; an unknown name is no error (as in Nomad)."""
        def remove(current: ACLPolicy | None, index: int) -> Any:
            return None if current is None else DELETE

        return await self.store.write(updates={ACL_POLICIES: [(name, remove)]})

    # ---- roles ---------------------------------------------------------------------------
    async def upsert_role(self, draft: ACLRole) -> ACLRole:
        """Create (``draft.id`` empty) or update a role, as Nomad's ``ACL.UpsertRoles``."""
        policies = _dedup(draft.policies)
        errors = []
        if not NAME_PATTERN.fullmatch(draft.name):
            errors.append(f"invalid name '{draft.name}'")
        if len(draft.description) > MAX_DESCRIPTION_CHARS:
            errors.append(f"description longer than {MAX_DESCRIPTION_CHARS}")
        if not policies:
            errors.append("at least one policy should be specified")
        if errors:
            raise ACLInvalid(f"role 0 invalid: {multierror(errors)}")
        role = attrs.evolve(draft, id=draft.id or str(uuid.uuid4()), policies=policies)
        role = attrs.evolve(role, hash=role_hash(role))

        def apply(current: ACLRole | None, index: int) -> ACLRole | None:
            if draft.id and current is None:
                raise ACLInvalid(f"cannot find role {draft.id}")
            for name in policies:
                if self.policy(name) is None:
                    raise ACLInvalid(f"cannot find policy {name}")
            holder = self.role_by_name(role.name)
            if holder is not None and holder.id != role.id:
                raise ACLInvalid(f"role with name {role.name} already exists" if current is None
                                 else f"ACL role with name {role.name} already exists")
            if current is not None and current.hash == role.hash:
                return None  # nothing changes: no write, no new index
            return role

        await self.store.write(updates={ACL_ROLES: [(role.id, apply)]})
        return self._stored(ACL_ROLES, role.id)

    async def delete_role(self, role_id: str) -> int:
        """Remove a role. Tokens keep their link; it is skipped from then on."""
        def remove(current: ACLRole | None, index: int) -> Any:
            if current is None:
                raise ACLNotFound("ACL role not found")
            return DELETE

        return await self.store.write(updates={ACL_ROLES: [(role_id, remove)]})

    def _stored(self, table: str, key: str) -> Any:
        row = self.store.get(table, key)
        assert row is not None  # just written, with no await since
        return row
