"""python-nomad's ACL calls, unmodified, against a real agent with ACLs enabled: bootstrap,
tokens (create, list, read, self, update, delete) and policies (create, list, read, update,
delete), with the shapes and status codes Nomad's HTTP API documents.

python-nomad is a blocking (requests) library: each call runs in a worker thread, so the
test's event loop keeps reading the agent's output.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import Any

import nomad
import nomad.api.exceptions as nomad_errors
import pytest

from nomad_client.structs.models import parse_rfc3339_ns
from tests.integration.harness import AgentProcess, assert_no_secrets

pytestmark = pytest.mark.timeout(90)

AgentFactory = Callable[..., AgentProcess]
READ_RULES = 'namespace "default" {\n  policy = "read"\n}\n'
WRITE_RULES = 'namespace "default" {\n  policy = "write"\n}\nnode {\n  policy = "read"\n}\n'
# The fields of a token list entry (no SecretID there) and of a full token.
TOKEN_STUB_FIELDS = {"AccessorID", "Name", "Type", "Policies", "Roles", "Global", "Hash",
                     "CreateTime", "ExpirationTime", "CreateIndex", "ModifyIndex"}
TOKEN_FIELDS = TOKEN_STUB_FIELDS | {"SecretID", "ExpirationTTL"}
# What the agent prints once started with ACLs enabled.
BOOTSTRAP_HINT = "ACLs are enabled: run 'nomad-client acl bootstrap'"


@pytest.fixture(autouse=True)
def _no_nomad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-nomad reads NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION and more from the
    environment whenever an argument is left out: none may leak into these tests."""
    for name in [n for n in os.environ if n.startswith("NOMAD_")]:
        monkeypatch.delenv(name)


def nomad_api(agent: AgentProcess, token: str | None = None) -> nomad.Nomad:
    return nomad.Nomad(address=agent.address, token=token, timeout=15)


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """One python-nomad call, off the event loop."""
    return await asyncio.to_thread(fn, *args)


async def raises(kind: type[Exception], fn: Callable[..., Any], *args: Any) -> str:
    """Call ``fn`` expecting python-nomad's ``kind`` of error; the agent's answer text."""
    with pytest.raises(kind) as caught:
        await call(fn, *args)
    response = caught.value.nomad_resp  # type: ignore[attr-defined]
    return str(response.text)


async def bootstrapped(agent: AgentProcess) -> dict[str, Any]:
    await agent.start()
    token: dict[str, Any] = await call(nomad_api(agent).acl.generate_bootstrap)
    return token


def is_uuid(text: Any) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except (TypeError, ValueError):
        return False


async def test_bootstrap_once_then_tokens_through_their_lifecycle(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory(acl=True)
    boot = await bootstrapped(agent)
    assert set(boot) >= TOKEN_FIELDS
    assert (boot["Name"], boot["Type"], boot["Global"]) == ("Bootstrap Token", "management",
                                                            True)
    assert is_uuid(boot["AccessorID"]) and is_uuid(boot["SecretID"])
    assert boot["Policies"] in (None, []) and boot["ExpirationTime"] is None
    assert parse_rfc3339_ns(boot["CreateTime"]) > 0
    assert BOOTSTRAP_HINT in agent.output
    again = await raises(nomad_errors.BadRequestNomadException,
                         nomad_api(agent).acl.generate_bootstrap)
    assert again.startswith("ACL bootstrap already done (reset index: "), again

    admin = nomad_api(agent, boot["SecretID"]).acl
    me = await call(admin.get_self_token)
    assert (me["AccessorID"], me["SecretID"]) == (boot["AccessorID"], boot["SecretID"])

    created = await call(admin.create_token, {"Name": "ci", "Type": "client",
                                               "Policies": ["readonly"], "Global": False})
    assert set(created) >= TOKEN_FIELDS
    assert (created["Name"], created["Type"], created["Policies"]) == ("ci", "client",
                                                                       ["readonly"])
    assert is_uuid(created["AccessorID"]) and is_uuid(created["SecretID"])
    accessor, secret = created["AccessorID"], created["SecretID"]

    listed = await call(admin.get_tokens)
    assert {t["AccessorID"] for t in listed} == {boot["AccessorID"], accessor}
    assert all(set(t) >= TOKEN_STUB_FIELDS and "SecretID" not in t for t in listed)

    fetched = await call(admin.get_token, accessor)
    assert {k: fetched[k] for k in ("AccessorID", "SecretID", "Name", "Policies")} == {
        "AccessorID": accessor, "SecretID": secret, "Name": "ci", "Policies": ["readonly"]}

    # The way a caller edits a token: read it, change fields, send it back whole.
    edited = {**fetched, "Name": "ci-renamed", "Policies": ["readonly", "deployer"]}
    updated = await call(admin.update_token, accessor, edited)
    assert (updated["AccessorID"], updated["SecretID"]) == (accessor, secret)
    assert (updated["Name"], sorted(updated["Policies"])) == ("ci-renamed",
                                                              ["deployer", "readonly"])
    assert updated["ModifyIndex"] > fetched["ModifyIndex"]
    assert (await call(admin.get_token, accessor))["Name"] == "ci-renamed"

    # The client token can read itself, but managing tokens needs a management token.
    ci = nomad_api(agent, secret).acl
    assert (await call(ci.get_self_token))["AccessorID"] == accessor
    assert await raises(nomad_errors.URLNotAuthorizedNomadException,
                        ci.get_tokens) == "Permission denied"
    await raises(nomad_errors.URLNotAuthorizedNomadException, ci.create_token,
                 {"Name": "escalate", "Type": "management"})

    assert await call(admin.delete_token, accessor) is True
    assert await raises(nomad_errors.URLNotFoundNomadException, admin.get_token,
                        accessor) == "ACL token not found"
    assert {t["AccessorID"] for t in await call(admin.get_tokens)} == {boot["AccessorID"]}
    # A deleted token's secret no longer authenticates.
    await raises(nomad_errors.URLNotAuthorizedNomadException, ci.get_self_token)

    await assert_no_secrets(agent, [boot["SecretID"], secret])


async def test_token_requests_the_server_refuses(agent_factory: AgentFactory) -> None:
    agent = agent_factory(acl=True)
    boot = await bootstrapped(agent)
    admin = nomad_api(agent, boot["SecretID"]).acl

    text = await raises(nomad_errors.BadRequestNomadException, admin.create_token,
                        {"Name": "x", "Type": "superuser", "Policies": ["p"]})
    assert "token type must be client or management" in text
    text = await raises(nomad_errors.BadRequestNomadException, admin.create_token,
                        {"Name": "x", "Type": "client"})
    assert text.startswith("token 0 invalid"), text
    text = await raises(nomad_errors.BadRequestNomadException, admin.create_token,
                        {"Name": "x", "Type": "client", "Policies": ["p"],
                         "ExpirationTTL": "10s"})
    assert "expiration time cannot be less than 1m0s in the future" in text
    # Nobody without a token lists tokens.
    await raises(nomad_errors.URLNotAuthorizedNomadException, nomad_api(agent).acl.get_tokens)

    short = await call(admin.create_token, {"Name": "short", "Type": "client",
                                            "Policies": ["p"], "ExpirationTTL": "1h"})
    assert short["ExpirationTTL"] == "1h0m0s"
    lifetime = (parse_rfc3339_ns(short["ExpirationTime"])
                - parse_rfc3339_ns(short["CreateTime"]))
    assert lifetime == 3600 * 10**9


async def test_policies_through_their_lifecycle(agent_factory: AgentFactory) -> None:
    agent = agent_factory(acl=True)
    boot = await bootstrapped(agent)
    admin = nomad_api(agent, boot["SecretID"]).acl

    written = await call(admin.create_policy, "readonly",
                         {"Name": "readonly", "Description": "Read the default namespace",
                          "Rules": READ_RULES})
    # python-nomad hands back the raw response: Nomad answers a policy write with 200 and
    # an empty body.
    assert (written.status_code, written.text) == (200, "")
    await call(admin.create_policy, "deployer",
               {"Name": "deployer", "Description": "", "Rules": WRITE_RULES})

    listed = await call(admin.get_policies)
    assert sorted(p["Name"] for p in listed) == ["deployer", "readonly"]
    stub = next(p for p in listed if p["Name"] == "readonly")
    assert stub["Description"] == "Read the default namespace" and "Rules" not in stub
    assert stub["CreateIndex"] > 0 and stub["Hash"]

    policy = await call(admin.get_policy, "readonly")
    assert (policy["Name"], policy["Rules"]) == ("readonly", READ_RULES)
    assert policy["JobACL"] is None

    await call(admin.update_policy, "readonly",
               {"Name": "readonly", "Description": "now described", "Rules": READ_RULES})
    changed = await call(admin.get_policy, "readonly")
    assert changed["Description"] == "now described"
    assert changed["ModifyIndex"] > policy["ModifyIndex"]
    assert changed["Hash"] != policy["Hash"]

    # A client token sees the policies it holds, and only those.
    holder = await call(admin.create_token, {"Name": "reader", "Type": "client",
                                             "Policies": ["readonly"]})
    reader = nomad_api(agent, holder["SecretID"]).acl
    assert [p["Name"] for p in await call(reader.get_policies)] == ["readonly"]
    assert (await call(reader.get_policy, "readonly"))["Rules"] == READ_RULES
    await raises(nomad_errors.URLNotAuthorizedNomadException, reader.get_policy, "deployer")
    await raises(nomad_errors.URLNotAuthorizedNomadException, reader.delete_policy,
                 "readonly")

    assert await call(admin.delete_policy, "deployer") is True
    assert await raises(nomad_errors.URLNotFoundNomadException, admin.get_policy,
                        "deployer") == "ACL policy not found"
    assert [p["Name"] for p in await call(admin.get_policies)] == ["readonly"]

    await assert_no_secrets(agent, [boot["SecretID"], holder["SecretID"]])


async def test_policy_writes_the_server_refuses(agent_factory: AgentFactory) -> None:
    agent = agent_factory(acl=True)
    boot = await bootstrapped(agent)
    admin = nomad_api(agent, boot["SecretID"]).acl

    text = await raises(nomad_errors.BadRequestNomadException, admin.create_policy, "a",
                        {"Name": "b", "Rules": READ_RULES})
    assert text == "ACL policy name does not match request path"
    text = await raises(nomad_errors.BadRequestNomadException, admin.create_policy, "bad",
                        {"Name": "bad", "Rules": 'namespace "default" { policy = "own" }'})
    assert text.startswith("policy 0 invalid: "), text
    assert [p["Name"] for p in await call(admin.get_policies)] == []


async def test_acl_endpoints_answer_400_with_acls_disabled(agent_factory: AgentFactory
                                                            ) -> None:
    agent = agent_factory(acl=False)
    await agent.start()
    text = await raises(nomad_errors.BadRequestNomadException,
                        nomad_api(agent).acl.generate_bootstrap)
    assert text == "ACL support disabled"
    assert BOOTSTRAP_HINT not in agent.output
