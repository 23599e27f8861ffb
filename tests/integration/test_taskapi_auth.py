"""Who may use a task's API socket, against real agents: the task's workload identity (checked
against the agent's published JWKS), forged and stale credentials, expiring identities, and
ACL tokens with ACLs enabled. The socket always asks for a credential; the TCP API does not
when ACLs are off.
"""

from __future__ import annotations

import base64
import json
import secrets
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nomad_client.server.sealing import Sealer
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB
from nomad_client.structs.models import ACLToken
from tests.integration.harness import (
    AgentProcess,
    eventually,
    raw_exec_job,
    wait_client_status,
)
from tests.integration.test_taskapi import (
    FILE_IDENTITY,
    NS,
    api_sock,
    local_dir,
    read_token,
    sock_request,
    start_task,
)

AUDIENCE = "nomadproject.io"
SLEEP = "exec sleep 300"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_tokens(real: str) -> dict[str, str]:
    """Credentials that must not pass, most of them derived from a real identity."""
    header_seg, payload_seg, sig_seg = real.split(".")
    kid = jwt.get_unverified_header(real)["kid"]
    claims = jwt.decode(real, options={"verify_signature": False})
    signature = bytearray(base64.urlsafe_b64decode(sig_seg + "=" * (-len(sig_seg) % 4)))
    signature[len(signature) // 2] ^= 0x01
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    none_header = _b64(json.dumps({"alg": "none", "kid": kid, "typ": "JWT"}).encode())
    return {
        "a one-letter string": "x",
        "a random string": secrets.token_urlsafe(24),
        "a random UUID": str(uuid.uuid4()),
        "a malformed JWT": "eyJhbGciOi.not-json.sig",
        "a flipped signature byte": f"{header_seg}.{payload_seg}.{_b64(bytes(signature))}",
        "another key with the same kid": jwt.encode(claims, other_key, algorithm="RS256",
                                                    headers={"kid": kid}),
        "an unsigned alg=none token": f"{none_header}.{payload_seg}.",
    }


async def status_and_body(path: Path, url: str = "/v1/agent/health", *,
                          token: str | None = None, bearer: str | None = None
                          ) -> tuple[int, str]:
    resp = await sock_request(path, url, token=token, bearer=bearer)
    return resp.status, resp.text()


def _credential(header: str, secret: str) -> dict[str, str]:
    """Keyword arguments sending ``secret`` in ``header`` (Authorization means Bearer)."""
    return {"token": secret} if header == "X-Nomad-Token" else {"bearer": secret}


# ---------------------------------------------------------------------- identity


async def test_workload_identity_is_exposed_and_verifies_against_jwks(
        agent: AgentProcess) -> None:
    script = ('printf %s "$NOMAD_TOKEN" > "$NOMAD_TASK_DIR/env_token"; '
              'printf %s "$NOMAD_UNIX_ADDR" > "$NOMAD_TASK_DIR/unix_addr"; ' + SLEEP)
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "ident", script, identity={"Env": True, "File": True}))
        local = local_dir(agent, alloc_id)
        await eventually(lambda: (local / "unix_addr").exists(), message="the task's env dump")
        jwks = await api.get("/.well-known/jwks.json")

    env_token = (local / "env_token").read_text()
    assert env_token == read_token(agent, alloc_id)
    token_file = api_sock(agent, alloc_id).parent / "nomad_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert (local / "unix_addr").read_text() == f"unix://{api_sock(agent, alloc_id)}"

    kid = jwt.get_unverified_header(env_token)["kid"]
    [jwk] = [k for k in jwks["keys"] if k["kid"] == kid]
    key = jwt.PyJWK(jwk)
    claims = jwt.decode(env_token, key.key, algorithms=["RS256"], audience=AUDIENCE)
    assert claims["nomad_namespace"] == "default"
    assert claims["nomad_job_id"] == "ident"
    assert claims["nomad_allocation_id"] == alloc_id
    assert claims["nomad_task"] == "t"
    assert claims["sub"] == "global:default:ident:g:t:default"
    assert claims["aud"] == AUDIENCE
    assert isinstance(claims["iat"], int) and isinstance(claims["nbf"], int)
    assert claims["nbf"] <= time.time() + 1 and time.time() - claims["iat"] < 120
    assert "exp" not in claims  # no ttl asked for, so the identity does not expire

    # The published key really is what separates genuine from forged tokens.
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged_tokens(env_token)["another key with the same kid"], key.key,
                   algorithms=["RS256"], audience=AUDIENCE)


# ---------------------------------------------------------------------- ACLs off


async def test_socket_always_requires_a_real_credential_with_acls_off(
        agent: AgentProcess) -> None:
    async with agent.api() as api:
        a_alloc = await start_task(agent, api, raw_exec_job(
            "a", SLEEP, identity=FILE_IDENTITY, kill_timeout_s=1))
        b_alloc = await start_task(agent, api, raw_exec_job(
            "b", SLEEP, identity=FILE_IDENTITY, kill_timeout_s=1))
        sock = api_sock(agent, b_alloc)
        own, a_token = read_token(agent, b_alloc), read_token(agent, a_alloc)

        assert await status_and_body(sock) == (401, "Unauthorized")
        # Authentication comes before routing: unknown paths reveal nothing without one.
        assert await status_and_body(sock, "/v1/no/such/path") == (401, "Unauthorized")
        assert await status_and_body(sock, "/v1/no/such/path", token="x") == (403, "Forbidden")

        for what, bad in forged_tokens(own).items():
            for header in ("X-Nomad-Token", "Authorization"):
                got = await status_and_body(sock, **_credential(header, bad))
                assert got == (403, "Forbidden"), f"{what} via {header}: {got}"

        for url in ("/v1/agent/health", "/v1/agent/self", "/v1/client/metadata"):
            for header in ("X-Nomad-Token", "Authorization"):
                status, body = await status_and_body(sock, url, **_credential(header, own))
                assert status == 200, f"{url} via {header}: {status} {body}"

        # The TCP API keeps its ACLs-off behaviour: no token needed.
        assert (await api.request("GET", "/v1/agent/self")).status == 200

        # Another live allocation's identity is a real credential...
        assert (await sock_request(sock, bearer=a_token)).status == 200
        # ...until that allocation is stopped.
        await api.job_deregister("a")
        await wait_client_status(api, a_alloc, "complete", "failed")
        assert await status_and_body(sock, bearer=a_token) == (403, "Forbidden")
        assert await status_and_body(sock, token=a_token) == (403, "Forbidden")
        assert (await sock_request(sock, bearer=own)).status == 200


async def test_identity_with_a_ttl_stops_working_when_it_expires(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(
            "ttl", SLEEP, identity={"File": True, "TTL": 2 * NS}))
    sock = api_sock(agent, alloc_id)
    token = read_token(agent, alloc_id)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert 2 <= claims["exp"] - claims["iat"] <= 3

    assert (await sock_request(sock, bearer=token)).status == 200

    async def refused() -> bool:
        status, body = await status_and_body(sock, bearer=token)
        assert status in (200, 403), f"unexpected {status}: {body}"
        return (status, body) == (403, "Forbidden")

    await eventually(refused, timeout=10, interval=0.25, message="the identity to expire")
    assert time.time() >= claims["exp"]


# ---------------------------------------------------------------------- ACLs on


def _acl_token(name: str, type_: str, expiration_time: float | None = None) -> ACLToken:
    return ACLToken(accessor_id=str(uuid.uuid4()), secret_id=str(uuid.uuid4()), name=name,
                    type=type_, policies=() if type_ == "management" else ("readonly",),
                    expiration_time=(None if expiration_time is None
                                     else int(expiration_time * 1e9)))


async def seed_acl_tokens(data_dir: Path, *tokens: ACLToken) -> None:
    """Write tokens into the server's state (through its store, so their secrets are sealed
    as the agent seals them) before the agent first starts."""
    sealer = await Sealer.load_or_create(data_dir / "server" / "keyring")
    db = await StateDB.open(data_dir / "server" / "state.db")
    try:
        await StateStore(db, sealer).write(
            {"acl_tokens": [(token.accessor_id, token) for token in tokens]})
    finally:
        await db.close()


async def test_acl_tokens_on_the_socket_with_acls_on(
        agent_factory: Callable[..., AgentProcess]) -> None:
    management = _acl_token("ops", "management")
    expired = _acl_token("old ops", "management", expiration_time=time.time() - 3600)
    client = _acl_token("reader", "client")
    agent = agent_factory(acl=True)
    await seed_acl_tokens(agent.data_dir, management, expired, client)
    await agent.start()

    async with agent.api(token=management.secret_id) as api:
        alloc_id = await start_task(agent, api, raw_exec_job("acl", SLEEP,
                                                             identity=FILE_IDENTITY))
    sock = api_sock(agent, alloc_id)

    status, body = await status_and_body(sock, "/v1/agent/self", token=management.secret_id)
    assert status == 200, body
    assert await status_and_body(sock, "/v1/agent/self",
                                 token=expired.secret_id) == (403, "Forbidden")
    # A client token authenticates, then its (unimplemented) policies deny, failing closed.
    assert await status_and_body(sock, "/v1/agent/self",
                                 bearer=client.secret_id) == (403, "Permission denied")
    status, body = await status_and_body(sock, "/v1/agent/health", bearer=client.secret_id)
    assert status == 200, body

    # No anonymous access through the socket, while the TCP API treats it as anonymous.
    assert await status_and_body(sock, "/v1/agent/self") == (401, "Unauthorized")
    async with agent.api() as anonymous:
        resp = await anonymous.request("GET", "/v1/agent/self")
    assert resp.status == 403, resp.text()

    identity = read_token(agent, alloc_id)
    status, body = await status_and_body(sock, "/v1/agent/health", bearer=identity)
    assert status == 200, body
