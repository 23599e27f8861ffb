"""A client-only agent's credentials (``agent.acl_cache.RemoteCredentials``) against a real
embedded server reached through its real ACL handlers (``server.rpc_acl``), over a transport
that can be switched to "unreachable"."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import make_mocked_request

from nomad_client.acl import DENY_ALL, MANAGEMENT
from nomad_client.agent.acl_cache import (
    JWKS_MIN_INTERVAL,
    NEGATIVE_TTL,
    UNREACHABLE_RETRY,
    RemoteCredentials,
    is_unreachable,
)
from nomad_client.http.auth import (
    FORBIDDEN,
    CredentialPending,
    CredentialSource,
    Need,
    authenticate_settled,
    resolve,
)
from nomad_client.http.context import ListenerContext
from nomad_client.http.errors import HTTPError
from nomad_client.http.router import ApiRequest, Router
from nomad_client.rpcwire.errors import NO_SERVER, PermissionDenied, RPCError
from nomad_client.server.keyring import IdentityError, Keyring
from nomad_client.server.rpc_acl import ACL_HANDLERS
from nomad_client.server.server import Server
from nomad_client.structs.codec import msgpack_roundtrip
from nomad_client.structs.models import ACLPolicy, Allocation, PolicyJobACL
from tests.unit.factories import (
    acl_token,
    identity_token,
    make_alloc,
    make_server,
    node,
    seed,
    wait_until,
)

NODE_ID = "n1"
NODE_SECRET = str(uuid.uuid4())
TASK_API = ListenerContext(name="task", task_api=True, alloc_id="x", task="t")
TCP = ListenerContext(name="http")
READ_POLICY = 'namespace "default" { policy = "read" }'
WRITE_POLICY = 'namespace "default" { policy = "write" }'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTransport:
    """The client's transport to one server: the real handlers, every request and reply
    through msgpack; ``down`` makes every call fail as an unreachable server does."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.down = False
        self.calls: list[str] = []

    async def call(self, method: str, args: dict[str, Any]) -> Any:
        self.calls.append(method)
        if self.down:
            raise RPCError(NO_SERVER, "no servers reachable: 127.0.0.1:4647")
        reply = await ACL_HANDLERS[method](self.server, msgpack_roundtrip(args))
        return msgpack_roundtrip(reply)

    def count(self, method: str) -> int:
        return self.calls.count(method)


@attrs.define
class Setup:
    server: Server
    transport: FakeTransport
    creds: RemoteCredentials
    clock: Clock
    allocs: dict[str, Allocation]


@pytest.fixture
async def setup(keyring: Keyring) -> AsyncIterator[Setup]:
    server = make_server(keyring, acl=True)
    await server.register_node(node(NODE_ID, secret_id=NODE_SECRET))
    transport = FakeTransport(server)
    clock = Clock()
    allocs: dict[str, Allocation] = {}
    creds = RemoteCredentials(transport, acl_enabled=True, token_ttl=30.0, policy_ttl=30.0,
                              alloc_view=allocs.get, clock=clock,
                              node_credentials=lambda: {"NodeID": NODE_ID,
                                                        "SecretID": NODE_SECRET})
    # Statically: the embedded server and the remote cache are both credential sources.
    sources: list[CredentialSource] = [server, creds]
    assert len(sources) == 2
    yield Setup(server, transport, creds, clock, allocs)
    await creds.close()
    await server.close()


async def settled_token(creds: RemoteCredentials, secret: str) -> Any:
    try:
        return creds.token_by_secret(secret)
    except CredentialPending as pending:
        await pending.settle()
    return creds.token_by_secret(secret)


async def settled_claims(creds: RemoteCredentials, jwt: str) -> Any:
    try:
        return creds.verify_workload_identity(jwt)
    except CredentialPending as pending:
        await pending.settle()
    return creds.verify_workload_identity(jwt)


def bearer(secret: str) -> dict[str, str]:
    return {"X-Nomad-Token": secret}


async def running_alloc(s: Setup, **changes: Any) -> Allocation:
    alloc = make_alloc(node_id=NODE_ID, **changes)
    await seed(s.server, allocs=(alloc,))
    s.allocs[alloc.id] = alloc
    return alloc


async def client_token(s: Setup, policy: str = READ_POLICY) -> Any:
    await s.server.acls.upsert_policy(ACLPolicy(name="p", rules=policy))
    token = acl_token("client")
    await seed(s.server, tokens=(token,))
    return token


# ---- workload identities ---------------------------------------------------------------
async def test_workload_identity_is_verified_locally_with_the_servers_keys(
        setup: Setup, keyring: Keyring) -> None:
    alloc = await running_alloc(setup)
    jwt = identity_token(keyring, alloc)
    identity = await authenticate_settled(setup.creds, bearer(jwt), TASK_API)
    assert identity.claims is not None and identity.claims.alloc_id == alloc.id
    assert setup.transport.calls == ["Keyring.ListPublic"]
    # Verified again without asking anyone, even with the servers gone.
    setup.transport.down = True
    assert setup.creds.verify_workload_identity(jwt).alloc_id == alloc.id
    assert setup.transport.calls == ["Keyring.ListPublic"]


async def test_identity_of_an_allocation_the_client_sees_stopped_is_refused(
        setup: Setup, keyring: Keyring) -> None:
    alloc = await running_alloc(setup)
    jwt = identity_token(keyring, alloc)
    assert (await settled_claims(setup.creds, jwt)).alloc_id == alloc.id
    # The client's own view decides, not the server's.
    setup.allocs[alloc.id] = attrs.evolve(alloc, client_status="complete")
    with pytest.raises(IdentityError, match="terminal"):
        setup.creds.verify_workload_identity(jwt)
    setup.allocs[alloc.id] = attrs.evolve(alloc, desired_status="stop")
    with pytest.raises(IdentityError, match="terminal"):
        setup.creds.verify_workload_identity(jwt)
    del setup.allocs[alloc.id]
    with pytest.raises(IdentityError, match="does not exist"):
        setup.creds.verify_workload_identity(jwt)


async def test_unknown_key_id_fetches_the_key_set_again_at_most_once_per_interval(
        setup: Setup, keyring: Keyring, tmp_path: Path) -> None:
    alloc = await running_alloc(setup)
    assert await settled_claims(setup.creds, identity_token(keyring, alloc))
    fetched = setup.transport.count("Keyring.ListPublic")
    # The servers rotate: a new key signs, the client has not heard of it.
    rotating = await Keyring.load_or_create(tmp_path / "ring")
    setup.server.keyring = rotating
    setup.clock.now += JWKS_MIN_INTERVAL
    await rotating.rotate()
    rotated = identity_token(rotating, alloc)
    assert (await settled_claims(setup.creds, rotated)).alloc_id == alloc.id
    assert setup.transport.count("Keyring.ListPublic") == fetched + 1
    # A key nobody has: refused, and within the interval without another fetch.
    stranger = await Keyring.load_or_create(tmp_path / "stranger")
    for _ in range(5):
        with pytest.raises(IdentityError, match="unknown signing key"):
            setup.creds.verify_workload_identity(identity_token(stranger, alloc))
    assert setup.transport.count("Keyring.ListPublic") == fetched + 1
    setup.clock.now += JWKS_MIN_INTERVAL
    with pytest.raises(HTTPError) as refused:
        await authenticate_settled(setup.creds, bearer(identity_token(stranger, alloc)),
                                   TASK_API)
    assert refused.value is FORBIDDEN
    assert setup.transport.count("Keyring.ListPublic") == fetched + 2


def _tampered(jwt: str, alloc_id: str) -> str:
    header, payload, signature = jwt.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["nomad_allocation_id"] = alloc_id
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return ".".join((header, forged, signature))


async def test_tampered_identity_is_refused_also_while_servers_are_unreachable(
        setup: Setup, keyring: Keyring) -> None:
    alloc = await running_alloc(setup)
    other = await running_alloc(setup)
    jwt = identity_token(keyring, alloc)
    assert await settled_claims(setup.creds, jwt)
    setup.transport.down = True
    setup.clock.now += JWKS_MIN_INTERVAL
    for forged in (_tampered(jwt, other.id), jwt[:-4] + "AAAA", jwt + "x"):
        with pytest.raises(HTTPError) as refused:
            await authenticate_settled(setup.creds, bearer(forged), TASK_API)
        assert refused.value is FORBIDDEN


async def test_no_key_set_and_no_servers_refuses_every_identity(
        setup: Setup, keyring: Keyring) -> None:
    alloc = await running_alloc(setup)
    setup.transport.down = True
    with pytest.raises(HTTPError) as refused:
        await authenticate_settled(setup.creds, bearer(identity_token(keyring, alloc)),
                                   TASK_API)
    assert refused.value is FORBIDDEN


async def test_start_fetches_the_key_set_and_close_stops(
        setup: Setup, keyring: Keyring) -> None:
    jwt = identity_token(keyring, await running_alloc(setup))

    def verifies() -> bool:
        try:
            return bool(setup.creds.verify_workload_identity(jwt))
        except (CredentialPending, IdentityError):
            return False

    setup.creds.start()
    await wait_until(verifies, "the key set fetched by the refresh task")
    assert setup.transport.calls == ["Keyring.ListPublic"]
    await setup.creds.close()


# ---- ACL tokens ------------------------------------------------------------------------
async def test_token_is_resolved_once_and_cached_for_its_ttl(setup: Setup) -> None:
    token = await client_token(setup)
    identity = await authenticate_settled(setup.creds, bearer(token.secret_id), TCP)
    assert identity.token is not None and identity.token.accessor_id == token.accessor_id
    assert identity.token.secret_id == ""  # the servers never send it back
    identity = await resolve(setup.creds, identity)
    assert identity.acl.allow_namespace_op("default", "read-job")
    assert not identity.acl.allow_namespace_op("default", "submit-job")
    calls = list(setup.transport.calls)
    assert calls.count("ACL.ResolveToken") == 1
    # Within the TTLs: answered from the cache, ACL included, nothing asked.
    setup.clock.now += 29
    again = await authenticate_settled(setup.creds, bearer(token.secret_id), TCP)
    assert again.acl.allow_namespace_op("default", "read-job")
    assert setup.transport.calls == calls


async def test_cached_token_is_served_stale_while_servers_are_unreachable(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = await client_token(setup)
    heard = await resolve(setup.creds, await authenticate_settled(
        setup.creds, bearer(token.secret_id), TCP))
    assert heard.acl.allow_namespace_op("default", "read-job")
    setup.transport.down = True
    for _ in range(3):
        setup.clock.now += 60
        identity = await authenticate_settled(setup.creds, bearer(token.secret_id), TCP)
        identity = await resolve(setup.creds, identity)
        assert identity.token is not None
        assert identity.acl.allow_namespace_op("default", "read-job")
    outage = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage) == 1  # logged once per outage
    # Back: the servers are asked again, and their answer wins.
    setup.transport.down = False
    await setup.server.acls.delete_token(token.accessor_id)
    setup.clock.now += UNREACHABLE_RETRY
    with pytest.raises(HTTPError):
        await authenticate_settled(setup.creds, bearer(token.secret_id), TCP)


async def test_deleted_token_stops_working_after_the_ttl(setup: Setup) -> None:
    token = await client_token(setup)
    assert await settled_token(setup.creds, token.secret_id) is not None
    await setup.server.acls.delete_token(token.accessor_id)
    setup.clock.now += 29
    assert setup.creds.token_by_secret(token.secret_id) is not None  # still cached
    setup.clock.now += 1
    assert await settled_token(setup.creds, token.secret_id) is None
    with pytest.raises(HTTPError) as refused:
        await authenticate_settled(setup.creds, bearer(token.secret_id), TASK_API)
    assert refused.value is FORBIDDEN


async def test_unknown_token_is_refused_and_remembered_briefly(setup: Setup) -> None:
    secret = str(uuid.uuid4())
    assert await settled_token(setup.creds, secret) is None
    assert setup.transport.count("ACL.ResolveToken") == 1
    assert setup.creds.token_by_secret(secret) is None  # no lookup: remembered
    # Created meanwhile: known once the short memory of "unknown" has passed.
    token = attrs.evolve(acl_token("management"), secret_id=secret)
    await seed(setup.server, tokens=(token,))
    setup.clock.now += NEGATIVE_TTL
    found = await settled_token(setup.creds, secret)
    assert found is not None and found.accessor_id == token.accessor_id


async def test_unknown_token_is_refused_while_servers_are_unreachable(setup: Setup) -> None:
    setup.transport.down = True
    for ctx in (TASK_API, TCP):
        with pytest.raises(HTTPError) as refused:
            await authenticate_settled(setup.creds, bearer(str(uuid.uuid4())), ctx)
        assert refused.value.status == 403
    # Not a UUID: no secret is one, so nobody is asked.
    setup.transport.calls.clear()
    assert setup.creds.token_by_secret("not-a-secret") is None
    assert setup.transport.calls == []


async def test_node_must_authenticate_for_acl_calls(setup: Setup) -> None:
    token = await client_token(setup)
    args = {"NodeID": NODE_ID, "SecretID": str(uuid.uuid4()), "TokenSecretID": token.secret_id}
    with pytest.raises(PermissionError):
        await ACL_HANDLERS["ACL.ResolveToken"](setup.server, args)
    with pytest.raises(ValueError):
        await ACL_HANDLERS["ACL.GetPolicies"](
            setup.server, {"NodeID": NODE_ID, "SecretID": NODE_SECRET, "Names": "p"})
    reply = await ACL_HANDLERS["ACL.ResolveToken"](
        setup.server, {**args, "SecretID": NODE_SECRET})
    assert reply["Token"]["AccessorID"] == token.accessor_id
    assert reply["Token"]["SecretID"] == "" and reply["PolicyNames"] == ["p"]


async def test_refusal_by_the_servers_is_not_mistaken_for_an_outage() -> None:
    assert is_unreachable(RPCError(NO_SERVER, "x"))
    assert is_unreachable(ConnectionRefusedError()) and is_unreachable(TimeoutError())
    assert not is_unreachable(PermissionDenied("node secret ID does not match"))
    assert not is_unreachable(PermissionError())


async def test_router_waits_for_the_servers_answer_then_authorizes(setup: Setup) -> None:
    router = Router(setup.creds)

    async def whoami(req: ApiRequest) -> Any:
        assert req.identity.token is not None
        return {"AccessorID": req.identity.token.accessor_id}

    router.add(["GET"], "/v1/whoami", whoami, Need.namespace("read-job"))
    router.add(["GET"], "/v1/write", whoami, Need.namespace("submit-job"))
    token = await client_token(setup)

    async def status(path: str, secret: str) -> tuple[int, bytes]:
        request = make_mocked_request("GET", path, headers=bearer(secret))
        response = await router.dispatch(request, TCP)
        return response.status, response.body  # type: ignore[attr-defined]

    assert await status("/v1/whoami", token.secret_id) == (
        200, json.dumps({"AccessorID": token.accessor_id}, separators=(",", ":")).encode())
    assert (await status("/v1/write", token.secret_id))[0] == 403
    assert await status("/v1/whoami", str(uuid.uuid4())) == (403, b"ACL token not found")


# ---- policies ----------------------------------------------------------------------------
async def test_policy_change_is_seen_after_the_policy_ttl(setup: Setup) -> None:
    token = await client_token(setup, READ_POLICY)
    first = await resolve(setup.creds, await authenticate_settled(
        setup.creds, bearer(token.secret_id), TCP))
    assert not first.acl.allow_namespace_op("default", "submit-job")
    await setup.server.acls.upsert_policy(ACLPolicy(name="p", rules=WRITE_POLICY))
    setup.clock.now += 29
    assert setup.creds.cached_acl(first.token, None) is first.acl
    setup.clock.now += 1
    assert setup.creds.cached_acl(first.token, None) is None
    later = await resolve(setup.creds, await authenticate_settled(
        setup.creds, bearer(token.secret_id), TCP))
    assert later.acl.allow_namespace_op("default", "submit-job")


async def test_workload_gets_the_policies_attached_to_its_job(
        setup: Setup, keyring: Keyring) -> None:
    await setup.server.acls.upsert_policy(ACLPolicy(
        name="wl", rules=READ_POLICY, job_acl=PolicyJobACL(namespace="default", job_id="j")))
    alloc = await running_alloc(setup)
    identity = await authenticate_settled(setup.creds, bearer(identity_token(keyring, alloc)),
                                          TASK_API)
    identity = await resolve(setup.creds, identity)
    assert identity.acl.allow_namespace_op("default", "read-job")
    assert setup.creds.cached_acl(None, identity.claims) is identity.acl
    # Nothing heard of a workload's policies and no servers: nothing allowed.
    other = await running_alloc(setup, job_id="k", job={"ID": "k"})
    setup.transport.down = True
    claims = await settled_claims(setup.creds, identity_token(keyring, other))
    assert await setup.creds.resolve_acl(None, claims) is DENY_ALL


async def test_policy_never_seen_while_unreachable_allows_nothing(setup: Setup) -> None:
    token = await client_token(setup)
    found = await settled_token(setup.creds, token.secret_id)
    setup.transport.down = True
    assert await setup.creds.resolve_acl(found, None) is DENY_ALL
    assert await setup.creds.resolve_acl(None, None) is DENY_ALL  # anonymous, unknown


async def test_acls_disabled_allows_every_authenticated_caller(setup: Setup) -> None:
    creds = RemoteCredentials(setup.transport, acl_enabled=False, alloc_view=setup.allocs.get,
                              clock=setup.clock,
                              node_credentials=lambda: {"NodeID": NODE_ID,
                                                        "SecretID": NODE_SECRET})
    token = await client_token(setup)
    # The TCP API asks nothing; the Task API still needs a real credential.
    assert (await authenticate_settled(creds, {}, TCP)).acl is MANAGEMENT
    identity = await authenticate_settled(creds, bearer(token.secret_id), TASK_API)
    assert identity.acl is MANAGEMENT
    with pytest.raises(HTTPError):
        await authenticate_settled(creds, bearer(str(uuid.uuid4())), TASK_API)
    await creds.close()


# ---- secrets -------------------------------------------------------------------------------
async def test_no_secret_reaches_a_log_line(
        setup: Setup, keyring: Keyring, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = await client_token(setup)
    alloc = await running_alloc(setup)
    jwt = identity_token(keyring, alloc)
    secrets = [token.secret_id, NODE_SECRET, jwt, jwt.split(".")[2]]
    unknown = str(uuid.uuid4())
    secrets.append(unknown)
    await settled_token(setup.creds, token.secret_id)
    await settled_claims(setup.creds, jwt)
    setup.transport.down = True
    setup.clock.now += 60
    await settled_token(setup.creds, token.secret_id)
    await settled_token(setup.creds, unknown)
    # Refused by the servers (a wrong node secret): logged by kind only.
    setup.transport.down = False
    setup.clock.now += 60
    wrong = RemoteCredentials(setup.transport, acl_enabled=True, alloc_view=setup.allocs.get,
                              clock=setup.clock,
                              node_credentials=lambda: {"NodeID": NODE_ID,
                                                        "SecretID": token.secret_id})
    assert await settled_token(wrong, token.secret_id) is None
    await wrong.close()
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_info)
        for secret in secrets:
            assert secret not in text
