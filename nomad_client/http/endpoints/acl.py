"""/v1/acl/*: bootstrap, policies, tokens and roles, with Nomad's shapes, codes and texts.

Who may call what follows Nomad. Management-only routes declare ``Need.management``, so
the router refuses anyone else before the handler runs. Routes whose answer depends on who
asks (a token reading itself, a policy read by a holder, lists showing only what the caller
holds) declare none and decide here, from ``req.identity``. With ACLs disabled every route
answers ``400 ACL support disabled``, except ``token/self``.

Request bodies are read as Go's encoding/json reads them: keys matched case-insensitively,
unknown keys ignored, ``null`` meaning "not given".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator
from typing import Any

import attrs
from aiohttp import web

from nomad_client.acl import PolicyError, parse_policy, policy_to_rules_json
from nomad_client.durations import DurationError, format_duration, parse_duration_ns
from nomad_client.http.auth import Need
from nomad_client.http.bodyfields import object_fields as _fields
from nomad_client.http.bodyfields import path_id as _path_id
from nomad_client.http.bodyfields import string_field as _string
from nomad_client.http.bodyfields import strings_field as _strings
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import PERMISSION_DENIED, HTTPError, bad_request, not_found
from nomad_client.http.jsonbody import BadJSONBody, decode_json_body
from nomad_client.http.query import block, by_creation, by_field, list_query
from nomad_client.http.router import ApiRequest, Reply
from nomad_client.http.services import Services
from nomad_client.server.acls import ANONYMOUS_POLICY, ACLInvalid, ACLNotFound, RoleLink
from nomad_client.server.server import Resource, Server
from nomad_client.structs.codec import to_api
from nomad_client.structs.models import (
    TOKEN_CLIENT,
    ACLPolicy,
    ACLRole,
    ACLToken,
    PolicyJobACL,
    parse_rfc3339_ns,
    rfc3339_ns,
)

MANAGEMENT = Need.management
GET = ("GET",)
WRITE = ("PUT", "POST")
DELETE = ("DELETE",)
ANY_METHOD = ("GET", "PUT", "POST", "DELETE")

ACL_DISABLED = HTTPError(400, "ACL support disabled")
FORBIDDEN = HTTPError(403, PERMISSION_DENIED)
TOKEN_NOT_FOUND = "ACL token not found"
ZERO_TIME_NS = parse_rfc3339_ns("0001-01-01T00:00:00Z")  # Go's zero time.Time: "not set"
MAX_INT64 = 2**63 - 1

# The tokens Nomad shows for a caller without one.
ACLS_DISABLED_TOKEN = ACLToken(accessor_id="acls-disabled", secret_id="",
                               name="ACLs disabled token", type=TOKEN_CLIENT, create_time=0)
ANONYMOUS_TOKEN = ACLToken(accessor_id="anonymous", secret_id="", name="Anonymous Token",
                           type=TOKEN_CLIENT, policies=(ANONYMOUS_POLICY,), create_time=0)

TOKEN_FIELDS = ("AccessorID", "SecretID", "Name", "Type", "Policies", "Roles", "Global",
                "ExpirationTime", "ExpirationTTL")
POLICY_FIELDS = ("Name", "Description", "Rules", "JobACL")
JOB_ACL_FIELDS = ("Namespace", "JobID", "Group", "Task")
ROLE_FIELDS = ("ID", "Name", "Description", "Policies")
BY_NAME = by_field("Name")
BY_ACCESSOR = by_field("AccessorID")
TOKENS_BY_CREATION = by_creation("AccessorID")


# ---- request bodies ------------------------------------------------------------------------
def _objects(fields: dict[str, Any], name: str, keys: tuple[str, ...]
             ) -> list[dict[str, Any]]:
    value = fields.get(name, [])
    if not isinstance(value, list):
        raise bad_request(f"{name} must be a list of objects")
    return [_fields(item, keys, f"Each of {name}") for item in value]


def _ttl_ns(fields: dict[str, Any]) -> int:
    """``ExpirationTTL``: a Go duration string or integer nanoseconds (as Nomad reads it)."""
    value = fields.get("ExpirationTTL", "")
    if isinstance(value, str):
        try:
            return parse_duration_ns(value) if value else 0
        except DurationError as err:
            raise bad_request(f"Invalid ExpirationTTL: {err}") from None
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and abs(value) <= MAX_INT64:
        return int(value)
    raise bad_request("ExpirationTTL must be a duration string or integer nanoseconds")


def _time_ns(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be an RFC 3339 time")
    try:
        ns = parse_rfc3339_ns(value)
    except ValueError as err:
        raise bad_request(f"Invalid {name}: {err}") from None
    return None if ns == ZERO_TIME_NS else ns


def _token_draft(body: Any) -> tuple[ACLToken, list[RoleLink]]:
    fields = _fields(body, TOKEN_FIELDS)
    global_ = fields.get("Global", False)
    if not isinstance(global_, bool):
        raise bad_request("Global must be a boolean")
    links = [RoleLink(id=_string(link, "ID"), name=_string(link, "Name"))
             for link in _objects(fields, "Roles", ("ID", "Name"))]
    draft = ACLToken(accessor_id=_string(fields, "AccessorID"),
                     secret_id=_string(fields, "SecretID"), name=_string(fields, "Name"),
                     type=_string(fields, "Type"), policies=_strings(fields, "Policies"),
                     global_=global_, expiration_time=_time_ns(fields, "ExpirationTime"),
                     expiration_ttl=_ttl_ns(fields))
    return draft, links


def _policy_draft(body: Any) -> ACLPolicy:
    fields = _fields(body, POLICY_FIELDS)
    job_acl = None
    if "JobACL" in fields:
        scope = _fields(fields["JobACL"], JOB_ACL_FIELDS, "JobACL")
        job_acl = PolicyJobACL(namespace=_string(scope, "Namespace"),
                               job_id=_string(scope, "JobID"), group=_string(scope, "Group"),
                               task=_string(scope, "Task"))
    return ACLPolicy(name=_string(fields, "Name"), description=_string(fields, "Description"),
                     rules=_string(fields, "Rules"), job_acl=job_acl)


def _role_draft(body: Any) -> ACLRole:
    fields = _fields(body, ROLE_FIELDS)
    policies = tuple(_string(link, "Name")
                     for link in _objects(fields, "Policies", ("Name",)))
    return ACLRole(id=_string(fields, "ID"), name=_string(fields, "Name"),
                   description=_string(fields, "Description"), policies=policies)


# ---- response bodies -----------------------------------------------------------------------
def token_view(server: Server, token: ACLToken, *, stub: bool = False) -> dict[str, Any]:
    """Nomad's ACLToken JSON (``stub``: the list form, without SecretID and ExpirationTTL).
    Role links show the roles' current names; links to deleted roles are left out."""
    roles = [{"ID": role.id, "Name": role.name}
             for role in map(server.acls.role, token.roles) if role is not None]
    view: dict[str, Any] = {
        "AccessorID": token.accessor_id, "SecretID": token.secret_id, "Name": token.name,
        "Type": token.type, "Policies": list(token.policies) or None, "Roles": roles or None,
        "Global": token.global_, "Hash": token.hash or None,
        "CreateTime": rfc3339_ns(token.create_time),
        "ExpirationTime": (None if token.expiration_time is None
                           else rfc3339_ns(token.expiration_time)),
        "ExpirationTTL": format_duration(token.expiration_ttl) if token.expiration_ttl else "",
        "CreateIndex": token.create_index, "ModifyIndex": token.modify_index,
    }
    if stub:
        del view["SecretID"], view["ExpirationTTL"]
    return view


def policy_stub(policy: ACLPolicy) -> dict[str, Any]:
    view = to_api(policy)
    del view["Rules"]
    return view


def role_view(role: ACLRole) -> dict[str, Any]:
    return to_api(role) | {"Policies": [{"Name": name} for name in role.policies]}


def _written(index: int) -> web.Response:
    """A write Nomad answers with an empty 200 body (and the write's index)."""
    return web.Response(headers={"X-Nomad-Index": str(index)})


# ---- who is asking -------------------------------------------------------------------------
def _acls_on(services: Services) -> Server:
    server = services.own_server
    if not server.acl_enabled:
        raise ACL_DISABLED
    return server


def _held_policies(server: Server, req: ApiRequest) -> frozenset[str] | None:
    """The policies the caller holds; None for management (every policy)."""
    return server.identity_policy_names(req.identity.token, req.identity.claims)


def _linked_roles(req: ApiRequest) -> frozenset[str] | None:
    """The role IDs the caller's token links to; None for management. A workload identity
    has no token to link roles, and is refused as Nomad refuses it."""
    identity = req.identity
    if identity.is_management:
        return None
    if identity.claims is not None:
        raise HTTPError(403, TOKEN_NOT_FOUND)
    return frozenset(identity.token.roles if identity.token is not None else ())


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The server's refusals as HTTP errors."""
    try:
        yield
    except ACLNotFound as err:
        raise not_found(str(err)) from None
    except ACLInvalid as err:
        raise bad_request(str(err)) from None


# ---- bootstrap -----------------------------------------------------------------------------
async def bootstrap(services: Services, req: ApiRequest) -> Reply:
    server = _acls_on(services)
    data = await req.body()
    secret = ""
    if data.strip():  # the body is optional
        try:
            body = decode_json_body(data)
        except BadJSONBody as err:
            raise bad_request(f"failed to decode request body: {err}") from None
        secret = _string(_fields(body, ("BootstrapSecret",)), "BootstrapSecret")
    with _refusals():
        token = await server.acls.bootstrap(secret)
    return Reply(token_view(server, token), token.modify_index)


# ---- policies ------------------------------------------------------------------------------
async def list_policies(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = _acls_on(services)
    listing = await list_query(server, req.query, (Resource.ACL_POLICIES,))
    held = _held_policies(server, req)
    return await listing.reply(
        [policy_stub(p) for p in server.acls.policies() if held is None or p.name in held],
        BY_NAME, prefix_of=lambda stub: stub["Name"])


async def own_policies(services: Services, req: ApiRequest) -> Reply:
    """GET /v1/acl/policy/self: the policies that apply to the caller (null if none)."""
    server = _acls_on(services)
    if req.identity.token is None and req.identity.claims is None:
        raise FORBIDDEN  # as Nomad: no token is taken for a workload identity without claims
    index = await block(server, req.query, (Resource.ACL_POLICIES,))
    held = _held_policies(server, req)
    stubs = [policy_stub(p) for p in server.acls.policies() if held is None or p.name in held]
    return Reply(stubs or None, index)


async def get_policy(services: Services, req: ApiRequest) -> Reply:
    server = _acls_on(services)
    name = req.params["name"]
    held = _held_policies(server, req)
    if held is not None and name not in held and name != ANONYMOUS_POLICY:
        raise FORBIDDEN
    index = await block(server, req.query, (Resource.ACL_POLICIES,))
    policy = server.acls.policy(name)
    if policy is None:
        raise not_found("ACL policy not found")
    try:
        # Stored rules are read leniently, as Nomad evaluates them.
        parsed = await asyncio.to_thread(parse_policy, policy.rules, strict=False)
        rules_json = policy_to_rules_json(parsed, policy.rules)
    except PolicyError:
        rules_json = None
    return Reply(to_api(policy) | {"RulesJSON": rules_json}, index)


async def upsert_policy(services: Services, req: ApiRequest) -> web.Response:
    server = _acls_on(services)
    draft = _policy_draft(await req.json())
    name = _path_id(draft.name, req.params["name"], "ACL policy name does not match request path")
    with _refusals():
        index = await server.acls.upsert_policy(attrs.evolve(draft, name=name))
    return _written(index)


async def delete_policy(services: Services, req: ApiRequest) -> web.Response:
    server = _acls_on(services)
    return _written(await server.acls.delete_policy(req.params["name"]))


# ---- tokens --------------------------------------------------------------------------------
async def list_tokens(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = _acls_on(services)
    listing = await list_query(server, req.query, (Resource.ACL_TOKENS,))
    # With a prefix (of the accessor ID) in accessor ID order, as Nomad's prefix index gives
    # them; without one oldest first.
    order = BY_ACCESSOR if listing.prefix else TOKENS_BY_CREATION
    return await listing.reply([token_view(server, t, stub=True) for t in server.acls.tokens()],
                               order, prefix_of=lambda stub: stub["AccessorID"])


async def upsert_token(services: Services, req: ApiRequest) -> Reply:
    """PUT/POST /v1/acl/token (create; with an AccessorID, update) and /v1/acl/token/:id."""
    server = _acls_on(services)
    draft, links = _token_draft(await req.json())
    accessor = _path_id(draft.accessor_id, req.params.get("accessor"),
                        "Token Accessor ID does not match")
    with _refusals():
        token = await server.acls.upsert_token(attrs.evolve(draft, accessor_id=accessor), links)
    return Reply(token_view(server, token), token.modify_index)


async def get_token(services: Services, req: ApiRequest) -> Reply:
    server = _acls_on(services)
    accessor = req.params["accessor"]
    caller = req.identity.token
    if not req.identity.is_management and (caller is None or caller.accessor_id != accessor):
        raise FORBIDDEN  # whether or not such a token exists
    index = await block(server, req.query, (Resource.ACL_TOKENS,))
    token = server.acls.token(accessor)
    if token is None:
        raise not_found(TOKEN_NOT_FOUND)
    return Reply(token_view(server, token), index)


async def token_self(services: Services, req: ApiRequest) -> Reply:
    server = services.own_server
    if not server.acl_enabled:
        return Reply(token_view(server, ACLS_DISABLED_TOKEN), server.index_of(
            Resource.ACL_TOKENS))
    identity = req.identity
    if identity.token is None and identity.claims is not None:
        raise not_found(TOKEN_NOT_FOUND)  # a workload identity is not an ACL token
    index = await block(server, req.query, (Resource.ACL_TOKENS,))
    return Reply(token_view(server, identity.token or ANONYMOUS_TOKEN), index)


async def delete_token(services: Services, req: ApiRequest) -> web.Response:
    server = _acls_on(services)
    with _refusals():
        return _written(await server.acls.delete_token(req.params["accessor"]))


# ---- roles ---------------------------------------------------------------------------------
async def list_roles(services: Services, req: ApiRequest) -> web.StreamResponse:
    server = _acls_on(services)
    linked = _linked_roles(req)
    listing = await list_query(server, req.query, (Resource.ACL_ROLES,))
    # The prefix is of the role ID, as Nomad's.
    return await listing.reply(
        [role_view(r) for r in server.acls.roles() if linked is None or r.id in linked])


def _read_role(req: ApiRequest, role: ACLRole | None, index: int) -> Reply:
    linked = _linked_roles(req)
    if linked is not None and (role is None or role.id not in linked):
        raise FORBIDDEN  # whether or not such a role exists
    if role is None:
        raise not_found("ACL role not found")
    return Reply(role_view(role), index)


async def get_role(services: Services, req: ApiRequest) -> Reply:
    server = _acls_on(services)
    index = await block(server, req.query, (Resource.ACL_ROLES,))
    return _read_role(req, server.acls.role(req.params["role_id"]), index)


async def get_role_by_name(services: Services, req: ApiRequest) -> Reply:
    server = _acls_on(services)
    index = await block(server, req.query, (Resource.ACL_ROLES,))
    return _read_role(req, server.acls.role_by_name(req.params["name"]), index)


async def upsert_role(services: Services, req: ApiRequest) -> Reply:
    """PUT/POST /v1/acl/role (create; with an ID, update) and /v1/acl/role/:id."""
    server = _acls_on(services)
    draft = _role_draft(await req.json())
    role_id = _path_id(draft.id, req.params.get("role_id"),
                       "ACL role ID does not match request path")
    with _refusals():
        role = await server.acls.upsert_role(attrs.evolve(draft, id=role_id))
    return Reply(role_view(role), role.modify_index)


async def delete_role(services: Services, req: ApiRequest) -> web.Response:
    server = _acls_on(services)
    with _refusals():
        return _written(await server.acls.delete_role(req.params["role_id"]))


def _missing(message: str) -> Any:
    async def refuse(services: Services, req: ApiRequest) -> Any:
        _acls_on(services)
        raise bad_request(message)
    return refuse


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(WRITE, "/v1/acl/bootstrap", bootstrap)
    routes.add(GET, "/v1/acl/policies", list_policies)
    routes.add(GET, "/v1/acl/policy/self", own_policies)
    routes.add(GET, "/v1/acl/policy/{name}", get_policy)
    routes.add(WRITE, "/v1/acl/policy/{name}", upsert_policy, MANAGEMENT)
    routes.add(DELETE, "/v1/acl/policy/{name}", delete_policy, MANAGEMENT)
    routes.add(GET, "/v1/acl/tokens", list_tokens, MANAGEMENT)
    routes.add(WRITE, "/v1/acl/token", upsert_token, MANAGEMENT)
    routes.add(GET, "/v1/acl/token/self", token_self)
    routes.add(GET, "/v1/acl/token/{accessor}", get_token)
    routes.add(WRITE, "/v1/acl/token/{accessor}", upsert_token, MANAGEMENT)
    routes.add(DELETE, "/v1/acl/token/{accessor}", delete_token, MANAGEMENT)
    routes.add(GET, "/v1/acl/roles", list_roles)
    routes.add(WRITE, "/v1/acl/role", upsert_role, MANAGEMENT)
    routes.add(ANY_METHOD, "/v1/acl/role/", _missing("missing ACL role ID"))
    routes.add(ANY_METHOD, "/v1/acl/role/name/", _missing("missing ACL role name"))
    routes.add(GET, "/v1/acl/role/name/{name}", get_role_by_name)
    routes.add(GET, "/v1/acl/role/{role_id}", get_role)
    routes.add(WRITE, "/v1/acl/role/{role_id}", upsert_role, MANAGEMENT)
    routes.add(DELETE, "/v1/acl/role/{role_id}", delete_role, MANAGEMENT)
