"""The ACL endpoints (/v1/acl/*) through the real router on a real socket: Nomad's shapes,
status codes and error texts; bootstrap and its reset file; who may read what; tokens
refused at once when deleted or expired; and ACL state across a restore of the store."""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.durations import HOUR
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB
from nomad_client.structs.models import ACLToken, parse_rfc3339_ns, rfc3339_ns
from tests.unit.factories import (
    SEALER,
    HttpAnswer,
    acl_token,
    call_http,
    identity_token,
    make_alloc,
    seed,
    serve_api,
    wait_until,
)

READ_RULES = 'namespace "default" {\n  policy = "read"\n}\nnode {\n  policy = "read"\n}\n'
WRITE_RULES = 'namespace "default" {\n  policy = "write"\n}\n'


@attrs.define
class ACLAPI:
    """A server with ACLs (on or off) served over TCP, and a session to call it with."""

    server: Server
    url: str
    session: aiohttp.ClientSession
    management: str = ""  # the bootstrap token's secret, once bootstrapped

    async def call(self, method: str, path: str, body: Any = None, *,
                   token: str | None = None, data: bytes | None = None) -> HttpAnswer:
        """``token`` None means the management token (if any); "" means no token."""
        return await call_http(self.session, self.url, method, path, body, data=data,
                               token=self.management if token is None else token)

    async def ok(self, method: str, path: str, body: Any = None, *,
                 token: str | None = None) -> Any:
        answer = await self.call(method, path, body, token=token)
        assert answer.status == 200, answer
        return answer.body

    async def bootstrap(self) -> dict[str, Any]:
        token = await self.ok("POST", "/v1/acl/bootstrap", token="")
        self.management = token["SecretID"]
        return token

    async def client_token(self, **fields: Any) -> dict[str, Any]:
        token: dict[str, Any] = await self.ok("POST", "/v1/acl/token",
                                              {"Type": "client", **fields})
        return token


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[ACLAPI]:
    api = await serve_api(server)
    try:
        async with aiohttp.ClientSession() as session:
            yield ACLAPI(server, api.url, session)
    finally:
        await api.close()


def acl_server(keyring: Keyring, data_dir: Path, *, acl: bool = True,
               store: StateStore | None = None) -> Server:
    return Server(store or StateStore(), keyring, region="global", acl_enabled=acl,
                  data_dir=data_dir)


@pytest.fixture
async def api(workdir: Path, keyring: Keyring) -> AsyncIterator[ACLAPI]:
    """ACLs on, bootstrapped, with policies "readonly" and "writer"."""
    async with serving(acl_server(keyring, workdir)) as acl_api:
        await acl_api.bootstrap()
        for name, rules in (("readonly", READ_RULES), ("writer", WRITE_RULES)):
            await acl_api.ok("PUT", f"/v1/acl/policy/{name}", {"Name": name, "Rules": rules})
        yield acl_api


def go_errors(prefix: str, *errors: str) -> str:
    """A Nomad validation error body (go-multierror's list format)."""
    head = "1 error occurred" if len(errors) == 1 else f"{len(errors)} errors occurred"
    return f"{prefix}: {head}:\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


# ---- ACLs disabled -------------------------------------------------------------------------
async def test_with_acls_disabled_every_acl_route_says_so_except_token_self(
        workdir: Path, keyring: Keyring) -> None:
    async with serving(acl_server(keyring, workdir, acl=False)) as off:
        some_id = str(uuid.uuid4())
        for method, path in [
                ("POST", "/v1/acl/bootstrap"), ("GET", "/v1/acl/policies"),
                ("GET", "/v1/acl/policy/p"), ("PUT", "/v1/acl/policy/p"),
                ("DELETE", "/v1/acl/policy/p"), ("GET", "/v1/acl/policy/self"),
                ("GET", "/v1/acl/tokens"), ("POST", "/v1/acl/token"),
                ("GET", f"/v1/acl/token/{some_id}"), ("POST", f"/v1/acl/token/{some_id}"),
                ("DELETE", f"/v1/acl/token/{some_id}"), ("GET", "/v1/acl/roles"),
                ("POST", "/v1/acl/role"), ("GET", f"/v1/acl/role/{some_id}"),
                ("PUT", f"/v1/acl/role/{some_id}"), ("DELETE", f"/v1/acl/role/{some_id}"),
                ("GET", "/v1/acl/role/name/ops")]:
            answer = await off.call(method, path, {"Name": "p"} if method != "GET" else None)
            assert answer[:2] == (400, "ACL support disabled"), (method, path)
        me = await off.ok("GET", "/v1/acl/token/self")
        assert me["AccessorID"] == "acls-disabled" and me["Name"] == "ACLs disabled token"
        assert me["Type"] == "client" and me["SecretID"] == ""
        assert me["CreateTime"] == "1970-01-01T00:00:00Z"


# ---- bootstrap -----------------------------------------------------------------------------
async def test_bootstrap_once_then_only_with_the_reset_file(workdir: Path,
                                                            keyring: Keyring) -> None:
    async with serving(acl_server(keyring, workdir)) as acl_api:
        first = await acl_api.call("POST", "/v1/acl/bootstrap", token="")
        assert first.status == 200
        token = first.body
        assert token["Name"] == "Bootstrap Token" and token["Type"] == "management"
        assert token["Global"] is True and token["Policies"] is None
        assert token["ExpirationTime"] is None and token["ExpirationTTL"] == ""
        assert uuid.UUID(token["AccessorID"]) and uuid.UUID(token["SecretID"])
        assert token["CreateIndex"] == token["ModifyIndex"] == first.nomad_index
        reset = first.nomad_index
        assert reset is not None

        again = await acl_api.call("PUT", "/v1/acl/bootstrap", token="")
        assert again[:2] == (400, f"ACL bootstrap already done (reset index: {reset})")
        (workdir / "acl-bootstrap-reset").write_text(f"{reset + 7}\n")
        wrong = await acl_api.call("POST", "/v1/acl/bootstrap", token="")
        assert wrong[:2] == (400, f"Invalid bootstrap reset index (specified {reset + 7}, "
                                  f"reset index: {reset})")
        (workdir / "acl-bootstrap-reset").write_text(f"{reset}\n")
        second = await acl_api.call("POST", "/v1/acl/bootstrap", token="")
        assert second.status == 200 and second.body["SecretID"] != token["SecretID"]
        # The reset index moved on with it: the same file does not work twice.
        third = await acl_api.call("POST", "/v1/acl/bootstrap", token="")
        assert third[:2] == (400, f"Invalid bootstrap reset index (specified {reset}, "
                                  f"reset index: {second.nomad_index})")
        # Both management tokens work.
        for secret in (token["SecretID"], second.body["SecretID"]):
            assert (await acl_api.call("GET", "/v1/acl/tokens", token=secret)).status == 200


async def test_bootstrap_takes_an_operator_chosen_secret(workdir: Path,
                                                         keyring: Keyring) -> None:
    async with serving(acl_server(keyring, workdir)) as acl_api:
        for body, error in [({"BootstrapSecret": "not-a-uuid"}, "invalid acl token"),
                            ({"BootstrapSecret": 7}, "BootstrapSecret must be a string"),
                            ([1], "Request body must be a JSON object")]:
            assert (await acl_api.call("POST", "/v1/acl/bootstrap", body, token=""))[:2] \
                == (400, error)
        broken = await acl_api.call("POST", "/v1/acl/bootstrap", data=b"{", token="")
        assert broken.status == 400 and broken.body.startswith("failed to decode request body")
        chosen = str(uuid.uuid4())
        token = await acl_api.ok("POST", "/v1/acl/bootstrap", {"BootstrapSecret": chosen},
                                 token="")
        assert token["SecretID"] == chosen
        me = await acl_api.ok("GET", "/v1/acl/token/self", token=chosen)
        assert me["AccessorID"] == token["AccessorID"]


# ---- policies ------------------------------------------------------------------------------
async def test_policy_write_read_list_delete(api: ACLAPI) -> None:
    written = await api.call("PUT", "/v1/acl/policy/ops",
                             {"Name": "ops", "Description": "operators", "Rules": READ_RULES,
                              "JobACL": {"Namespace": "default", "JobID": "web"}})
    assert written.status == 200 and written.body == "" and written.nomad_index
    policy = await api.ok("GET", "/v1/acl/policy/ops")
    assert policy["Name"] == "ops" and policy["Description"] == "operators"
    assert policy["Rules"] == READ_RULES  # verbatim
    assert policy["JobACL"] == {"Namespace": "default", "JobID": "web", "Group": "", "Task": ""}
    assert policy["CreateIndex"] == policy["ModifyIndex"] == written.nomad_index
    assert policy["Hash"]
    assert policy["RulesJSON"]["Node"] == {"Policy": "read"}
    assert policy["RulesJSON"]["Namespaces"][0]["Name"] == "default"

    stubs = await api.ok("GET", "/v1/acl/policies")
    assert [s["Name"] for s in stubs] == ["ops", "readonly", "writer"]
    assert set(stubs[0]) == {"Name", "Description", "JobACL", "Hash", "CreateIndex",
                             "ModifyIndex"}
    assert [s["Name"] for s in await api.ok("GET", "/v1/acl/policies?prefix=re")] == [
        "readonly"]

    # POST updates; the hash follows the content.
    await api.ok("POST", "/v1/acl/policy/ops", {"Name": "ops", "Rules": WRITE_RULES})
    updated = await api.ok("GET", "/v1/acl/policy/ops")
    assert updated["Hash"] != policy["Hash"] and updated["JobACL"] is None
    assert updated["CreateIndex"] == policy["CreateIndex"]
    assert updated["ModifyIndex"] > policy["ModifyIndex"]

    deleted = await api.call("DELETE", "/v1/acl/policy/ops")
    assert deleted.status == 200 and deleted.body == ""
    assert (await api.call("GET", "/v1/acl/policy/ops"))[:2] == (404, "ACL policy not found")
    # Deleting what is not there is no error (as in Nomad).
    assert (await api.call("DELETE", "/v1/acl/policy/ops")).status == 200


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"Name": "other", "Rules": ""}, 400, "ACL policy name does not match request path"),
    (None, 400, "Request body is empty"),
    ({"Name": "p", "Rules": 5}, 400, "Rules must be a string"),
    ({"Name": "p", "JobACL": "x"}, 400, "JobACL must be a JSON object"),
    ({"Name": "p", "Description": "d" * 257, "Rules": ""}, 400,
     go_errors("policy 0 invalid", "description longer than 256")),
    ({"Name": "p", "Rules": "", "JobACL": {"JobID": "j", "Task": "t"}}, 400,
     go_errors("policy 0 invalid", "namespace must be set to set job ID",
               "group must be set to set task")),
])
async def test_policy_write_refusals(api: ACLAPI, body: Any, status: int, error: str) -> None:
    assert (await api.call("PUT", "/v1/acl/policy/p", body))[:2] == (status, error)
    assert (await api.call("GET", "/v1/acl/policy/p")).status == 404  # nothing stored


async def test_policy_rules_and_name_are_validated(api: ACLAPI) -> None:
    bad_rules = await api.call("PUT", "/v1/acl/policy/p",
                               {"Name": "p", "Rules": 'namespace "default" { policy = "x" }'})
    assert bad_rules.status == 400
    assert bad_rules.body.startswith("policy 0 invalid: 1 error occurred:\n"
                                     "\t* failed to parse rules: ")
    unknown_key = await api.call("PUT", "/v1/acl/policy/p", {"Name": "p", "Rules": "nope {}"})
    assert unknown_key.status == 400 and "nope" in unknown_key.body
    bad_name = await api.call("PUT", "/v1/acl/policy/a_b", {"Rules": ""})
    assert bad_name[:2] == (400, go_errors("policy 0 invalid", "invalid name 'a_b'"))
    # Empty rules are a valid policy that grants nothing; a missing Name takes the path's.
    assert (await api.call("PUT", "/v1/acl/policy/empty", {"Rules": ""})).status == 200
    # Keys are matched as Go matches them: case-insensitively; unknown keys are ignored.
    assert (await api.call("PUT", "/v1/acl/policy/lower",
                           {"name": "lower", "rules": READ_RULES, "Extra": 1})).status == 200
    assert (await api.ok("GET", "/v1/acl/policy/lower"))["Rules"] == READ_RULES


async def test_policies_are_read_by_management_holders_and_anyone_for_anonymous(
        api: ACLAPI) -> None:
    await api.ok("PUT", "/v1/acl/policy/anonymous", {"Name": "anonymous", "Rules": ""})
    holder = (await api.client_token(Policies=["readonly"]))["SecretID"]
    held = await api.ok("GET", "/v1/acl/policies", token=holder)
    assert [p["Name"] for p in held] == ["readonly"]
    assert (await api.call("GET", "/v1/acl/policy/readonly", token=holder)).status == 200
    assert (await api.call("GET", "/v1/acl/policy/writer", token=holder))[:2] == (
        403, "Permission denied")
    # Not held and not there: still 403, so a caller learns nothing about other names.
    assert (await api.call("GET", "/v1/acl/policy/nope", token=holder)).status == 403
    for caller in (holder, ""):
        assert (await api.call("GET", "/v1/acl/policy/anonymous", token=caller)).status == 200
    assert [p["Name"] for p in await api.ok("GET", "/v1/acl/policies", token="")] == [
        "anonymous"]
    for method in ("PUT", "DELETE"):
        refused = await api.call(method, "/v1/acl/policy/readonly",
                                 {"Name": "readonly", "Rules": ""}, token=holder)
        assert refused[:2] == (403, "Permission denied")
    assert (await api.ok("GET", "/v1/acl/policy/readonly"))["Rules"] == READ_RULES


async def test_policy_self_lists_what_the_caller_holds(api: ACLAPI) -> None:
    holder = (await api.client_token(Policies=["writer"]))["SecretID"]
    assert [p["Name"] for p in await api.ok("GET", "/v1/acl/policy/self", token=holder)] == [
        "writer"]
    assert len(await api.ok("GET", "/v1/acl/policy/self")) == 2  # management: all
    assert (await api.call("GET", "/v1/acl/policy/self", token=""))[:2] == (
        403, "Permission denied")
    await api.ok("DELETE", "/v1/acl/policy/writer")
    assert await api.ok("GET", "/v1/acl/policy/self", token=holder) is None  # as Nomad


# ---- tokens --------------------------------------------------------------------------------
async def test_token_create_shapes_and_expiry(api: ACLAPI) -> None:
    created = await api.call("POST", "/v1/acl/token",
                             {"Name": "ci", "Type": "client", "Policies": ["readonly"],
                              "ExpirationTTL": "1h"})
    assert created.status == 200
    token = created.body
    assert set(token) == {"AccessorID", "SecretID", "Name", "Type", "Policies", "Roles",
                          "Global", "Hash", "CreateTime", "ExpirationTime", "ExpirationTTL",
                          "CreateIndex", "ModifyIndex"}
    assert token["Name"] == "ci" and token["Policies"] == ["readonly"]
    assert token["Roles"] is None and token["Global"] is False and token["Hash"]
    assert token["ExpirationTTL"] == "1h0m0s"
    assert parse_rfc3339_ns(token["ExpirationTime"]) - parse_rfc3339_ns(
        token["CreateTime"]) == HOUR
    assert token["ModifyIndex"] == created.nomad_index
    assert uuid.UUID(token["SecretID"]) and token["SecretID"] != token["AccessorID"]

    in_ns = await api.client_token(Policies=["readonly"], ExpirationTTL=2 * HOUR)
    assert in_ns["ExpirationTTL"] == "2h0m0s"
    # A SecretID sent with a new token is not taken: Nomad generates it.
    chosen = str(uuid.uuid4())
    assert (await api.client_token(Policies=["p"], SecretID=chosen))["SecretID"] != chosen

    stubs = await api.ok("GET", "/v1/acl/tokens")
    assert [s["Name"] for s in stubs] == ["Bootstrap Token", "ci", "", ""]  # oldest first
    assert all("SecretID" not in s and "ExpirationTTL" not in s for s in stubs)
    prefixed = await api.ok("GET", f"/v1/acl/tokens?prefix={token['AccessorID'][:8]}")
    assert [s["AccessorID"] for s in prefixed] == [token["AccessorID"]]


@pytest.mark.parametrize(("body", "errors"), [
    ({"Policies": ["p"]}, ["token type must be client or management"]),
    ({"Type": "client"}, ["client token missing policies or roles"]),
    ({"Type": "management", "Policies": ["p"]},
     ["management token cannot be associated with policies or roles"]),
    ({"Type": "client", "Policies": ["p"], "Name": "n" * 257}, ["token name too long"]),
    ({"Type": "client", "Policies": ["p"], "ExpirationTTL": "10s"},
     ["expiration time cannot be less than 1m0s in the future (was 10s)"]),
    ({"Type": "client", "Policies": ["p"], "ExpirationTTL": "25h"},
     ["expiration time cannot be more than 24h0m0s in the future (was 25h0m0s)"]),
    ({"Type": "client", "Policies": ["p"], "ExpirationTTL": "-1s"},
     ["token expiration TTL '-1s' should not be negative",
      "expiration time cannot be before create time",
      "expiration time cannot be less than 1m0s in the future (was -1s)"]),
])
async def test_token_create_is_validated_as_nomad(api: ACLAPI, body: dict[str, Any],
                                                  errors: list[str]) -> None:
    answer = await api.call("POST", "/v1/acl/token", body)
    assert answer[:2] == (400, go_errors("token 0 invalid", *errors))
    assert len(await api.ok("GET", "/v1/acl/tokens")) == 1  # only the bootstrap token


async def test_token_expiration_time_may_be_given_instead_of_a_ttl(api: ACLAPI) -> None:
    in_two_hours = rfc3339_ns(time.time_ns() + 2 * HOUR)
    token = await api.client_token(Policies=["p"], ExpirationTime=in_two_hours)
    assert token["ExpirationTime"] == in_two_hours and token["ExpirationTTL"] == ""
    past = await api.call("POST", "/v1/acl/token", {"Type": "client", "Policies": ["p"],
                                                    "ExpirationTime": "2001-01-01T00:00:00Z"})
    assert past.status == 400
    # The "was" duration depends on the clock.
    assert re.fullmatch(r"token 0 invalid: 2 errors occurred:\n"
                        r"\t\* expiration time cannot be before create time\n"
                        r"\t\* expiration time cannot be less than 1m0s in the future "
                        r"\(was -\d+h\d+m[\d.]+s\)\n\n", past.body), past.body


@pytest.mark.parametrize(("body", "error"), [
    ({"Type": "client", "ExpirationTTL": "soon"}, "Invalid ExpirationTTL: "),
    ({"Type": "client", "ExpirationTTL": True}, "ExpirationTTL must be a duration string"),
    ({"Type": "client", "ExpirationTime": "tomorrow"}, "Invalid ExpirationTime: "),
    ({"Type": "client", "Policies": "p"}, "Policies must be a list of strings"),
    ({"Type": "client", "Roles": [{"ID": 1}]}, "ID must be a string"),
    ({"Type": "client", "Global": "yes"}, "Global must be a boolean"),
    ({"Type": "client", "Roles": [{"Name": "nope"}]}, "cannot find role nope"),
])
async def test_token_bodies_that_cannot_be_read_are_400(api: ACLAPI, body: dict[str, Any],
                                                        error: str) -> None:
    answer = await api.call("POST", "/v1/acl/token", body)
    assert answer.status == 400 and answer.body.startswith(error), answer


async def test_token_update_keeps_secret_and_refuses_immutable_changes(api: ACLAPI) -> None:
    token = await api.client_token(Name="a", Policies=["readonly"], ExpirationTTL="1h")
    path = f"/v1/acl/token/{token['AccessorID']}"
    # What a client fetched, changed and sent back (python-nomad's update_token does this).
    updated = await api.ok("POST", path, {**token, "Name": "b", "Policies": ["writer"],
                                          "SecretID": str(uuid.uuid4())})
    assert updated["Name"] == "b" and updated["Policies"] == ["writer"]
    assert updated["SecretID"] == token["SecretID"]
    assert updated["CreateTime"] == token["CreateTime"]
    assert updated["CreateIndex"] == token["CreateIndex"]
    assert updated["ModifyIndex"] > token["ModifyIndex"] and updated["Hash"] != token["Hash"]
    # Without the AccessorID in the body, the path's is taken.
    renamed = {k: v for k, v in updated.items() if k != "AccessorID"} | {"Name": "c"}
    assert (await api.ok("PUT", path, renamed))["Name"] == "c"

    refusals: list[tuple[dict[str, Any], list[str]]] = [
        ({"Global": True}, ["cannot toggle global mode"]),
        ({"ExpirationTTL": "2h"}, ["cannot update expiration TTL"]),
        ({"ExpirationTime": None}, ["cannot update expiration time"]),
        ({"ExpirationTTL": "", "ExpirationTime": None},
         ["cannot update expiration TTL", "cannot update expiration time"]),
    ]
    for change, errors in refusals:
        body = {k: v for k, v in {**updated, **change}.items() if v is not None}
        assert (await api.call("PUT", path, body))[:2] == (
            400, go_errors("token 0 invalid", *errors)), change
    mismatch = await api.call("PUT", path, {**updated, "AccessorID": str(uuid.uuid4())})
    assert mismatch[:2] == (400, "Token Accessor ID does not match")


async def test_token_upload_with_chosen_ids_only_for_client_tokens(api: ACLAPI) -> None:
    accessor, secret = str(uuid.uuid4()), str(uuid.uuid4())
    uploaded = await api.ok("PUT", f"/v1/acl/token/{accessor}",
                            {"AccessorID": accessor, "SecretID": secret, "Type": "client",
                             "Policies": ["readonly"]})
    assert (uploaded["AccessorID"], uploaded["SecretID"]) == (accessor, secret)
    assert (await api.ok("GET", "/v1/acl/token/self", token=secret))["AccessorID"] == accessor
    other = str(uuid.uuid4())
    for body in ({"SecretID": str(uuid.uuid4()), "Type": "management"},
                 {"SecretID": "not-a-uuid", "Type": "client", "Policies": ["p"]}):
        assert (await api.call("PUT", f"/v1/acl/token/{other}", body))[:2] == (
            400, f"cannot find token {other}")
    # A secret already held by another token is refused, without naming it.
    taken = await api.call("PUT", f"/v1/acl/token/{other}",
                           {"SecretID": secret, "Type": "client", "Policies": ["p"]})
    assert taken.status == 400 and secret not in taken.body


async def test_token_reads_management_or_the_token_itself(api: ACLAPI) -> None:
    mine = await api.client_token(Policies=["readonly"])
    theirs = await api.client_token(Policies=["readonly"])
    read = await api.ok("GET", f"/v1/acl/token/{mine['AccessorID']}", token=mine["SecretID"])
    assert read == mine
    assert await api.ok("GET", f"/v1/acl/token/{mine['AccessorID']}") == mine
    for accessor in (theirs["AccessorID"], str(uuid.uuid4())):
        assert (await api.call("GET", f"/v1/acl/token/{accessor}", token=mine["SecretID"]))[
            :2] == (403, "Permission denied")
    assert (await api.call("GET", f"/v1/acl/token/{uuid.uuid4()}"))[:2] == (
        404, "ACL token not found")
    for method, path in (("GET", "/v1/acl/tokens"), ("POST", "/v1/acl/token"),
                         ("DELETE", f"/v1/acl/token/{theirs['AccessorID']}")):
        assert (await api.call(method, path, {"Type": "client"} if method == "POST" else None,
                               token=mine["SecretID"]))[:2] == (403, "Permission denied")


async def test_token_self_for_each_kind_of_caller(api: ACLAPI) -> None:
    me = await api.ok("GET", "/v1/acl/token/self")
    assert me["Type"] == "management" and me["SecretID"] == api.management
    anonymous = await api.ok("GET", "/v1/acl/token/self", token="")
    assert anonymous["AccessorID"] == "anonymous" and anonymous["Policies"] == ["anonymous"]
    alloc = make_alloc()
    await seed(api.server, allocs=(alloc,))
    workload = identity_token(api.server.keyring, alloc)
    assert (await api.call("GET", "/v1/acl/token/self", token=workload))[:2] == (
        404, "ACL token not found")
    assert (await api.call("GET", "/v1/acl/token/self", token=str(uuid.uuid4())))[:2] == (
        403, "ACL token not found")


async def test_a_deleted_token_is_refused_at_once(api: ACLAPI) -> None:
    token = await api.client_token(Policies=["readonly"])
    secret = token["SecretID"]
    assert (await api.call("GET", "/v1/acl/token/self", token=secret)).status == 200
    deleted = await api.call("DELETE", f"/v1/acl/token/{token['AccessorID']}")
    assert deleted.status == 200 and deleted.body == ""
    assert (await api.call("GET", "/v1/acl/token/self", token=secret))[:2] == (
        403, "ACL token not found")
    assert api.server.token_by_secret(secret) is None
    again = await api.call("DELETE", f"/v1/acl/token/{token['AccessorID']}")
    assert again[:2] == (400, f"Cannot delete nonexistent tokens: {token['AccessorID']}")


async def test_an_expired_token_is_refused_on_its_next_request(api: ACLAPI) -> None:
    # The shortest TTL Nomad allows is a minute: the token is written with its expiry close.
    soon = attrs.evolve(acl_token("client"), expiration_time=time.time_ns() + 300_000_000)
    await seed(api.server, tokens=(soon,))
    assert (await api.call("GET", "/v1/acl/token/self", token=soon.secret_id)).status == 200

    async def refused() -> bool:
        answer = await api.call("GET", "/v1/acl/token/self", token=soon.secret_id)
        return answer[:2] == (403, "ACL token not found")

    await wait_until(refused, "the token to expire")
    assert time.time_ns() >= soon.expiration_time  # type: ignore[operator]


# ---- roles ---------------------------------------------------------------------------------
async def test_role_create_read_update_delete(api: ACLAPI) -> None:
    created = await api.call("POST", "/v1/acl/role",
                             {"Name": "ops", "Description": "on call",
                              "Policies": [{"Name": "readonly"}, {"Name": "readonly"}]})
    assert created.status == 200
    role = created.body
    assert set(role) == {"ID", "Name", "Description", "Policies", "Hash", "CreateIndex",
                         "ModifyIndex"}
    assert role["Policies"] == [{"Name": "readonly"}]  # duplicates collapsed
    assert role["ModifyIndex"] == created.nomad_index and uuid.UUID(role["ID"])
    path = f"/v1/acl/role/{role['ID']}"
    assert await api.ok("GET", path) == role
    assert await api.ok("GET", "/v1/acl/role/name/ops") == role
    assert await api.ok("GET", "/v1/acl/roles") == [role]
    assert await api.ok("GET", f"/v1/acl/roles?prefix={role['ID'][:6]}") == [role]
    assert await api.ok("GET", "/v1/acl/roles?prefix=ops") == []  # the prefix is on the ID

    same = await api.call("PUT", path, {**role})
    assert same.status == 200 and same.body["ModifyIndex"] == role["ModifyIndex"]  # no-op
    changed = await api.ok("PUT", path, {"Name": "ops2", "Policies": [{"Name": "writer"}]})
    assert changed["ID"] == role["ID"] and changed["Name"] == "ops2"
    assert changed["ModifyIndex"] > role["ModifyIndex"] and changed["Hash"] != role["Hash"]
    assert (await api.call("GET", "/v1/acl/role/name/ops"))[:2] == (404, "ACL role not found")

    deleted = await api.call("DELETE", path)
    assert deleted.status == 200 and deleted.body == ""
    assert (await api.call("GET", path))[:2] == (404, "ACL role not found")
    assert (await api.call("DELETE", path))[:2] == (404, "ACL role not found")


async def test_role_refusals(api: ACLAPI) -> None:
    other = await api.ok("POST", "/v1/acl/role", {"Name": "taken",
                                                  "Policies": [{"Name": "readonly"}]})
    unknown = str(uuid.uuid4())
    cases = [
        ("POST", "/v1/acl/role", {"Name": "a b", "Description": "d" * 257},
         go_errors("role 0 invalid", "invalid name 'a b'", "description longer than 256",
                   "at least one policy should be specified")),
        ("POST", "/v1/acl/role", {"Name": "r", "Policies": [{"Name": "nope"}]},
         "cannot find policy nope"),
        ("POST", "/v1/acl/role", {"Name": "taken", "Policies": [{"Name": "writer"}]},
         "role with name taken already exists"),
        ("POST", "/v1/acl/role", {"ID": unknown, "Name": "r",
                                  "Policies": [{"Name": "writer"}]},
         f"cannot find role {unknown}"),
        ("PUT", f"/v1/acl/role/{other['ID']}", {"ID": unknown, "Name": "r",
                                                "Policies": [{"Name": "writer"}]},
         "ACL role ID does not match request path"),
        ("POST", "/v1/acl/role", {"Name": "r", "Policies": ["writer"]},
         "Each of Policies must be a JSON object"),
        ("GET", "/v1/acl/role/", None, "missing ACL role ID"),
        ("GET", "/v1/acl/role/name/", None, "missing ACL role name"),
    ]
    for method, path, body, error in cases:
        assert (await api.call(method, path, body))[:2] == (400, error), (method, path, body)
    second = await api.ok("POST", "/v1/acl/role", {"Name": "second",
                                                   "Policies": [{"Name": "writer"}]})
    rename = await api.call("PUT", f"/v1/acl/role/{second['ID']}",
                            {"Name": "taken", "Policies": [{"Name": "writer"}]})
    assert rename[:2] == (400, "ACL role with name taken already exists")
    assert [r["Name"] for r in await api.ok("GET", "/v1/acl/roles")] == sorted(
        ["taken", "second"], key=lambda n: {"taken": other["ID"], "second": second["ID"]}[n])


async def test_tokens_link_roles_by_id_or_name_and_hold_their_policies(api: ACLAPI) -> None:
    ops = await api.ok("POST", "/v1/acl/role", {"Name": "ops",
                                                "Policies": [{"Name": "writer"}]})
    dev = await api.ok("POST", "/v1/acl/role", {"Name": "dev",
                                                "Policies": [{"Name": "readonly"}]})
    token = await api.client_token(Roles=[{"Name": "ops"}, {"ID": ops["ID"]},
                                          {"ID": dev["ID"]}])
    assert token["Roles"] == [{"ID": ops["ID"], "Name": "ops"},
                              {"ID": dev["ID"], "Name": "dev"}]  # duplicates dropped
    stored = api.server.acls.token(token["AccessorID"])
    assert stored is not None and stored.roles == (ops["ID"], dev["ID"])  # IDs only
    secret = token["SecretID"]
    assert [p["Name"] for p in await api.ok("GET", "/v1/acl/policies", token=secret)] == [
        "readonly", "writer"]
    assert (await api.call("GET", "/v1/acl/policy/writer", token=secret)).status == 200
    assert await api.ok("GET", f"/v1/acl/role/{ops['ID']}", token=secret) == ops
    assert await api.ok("GET", "/v1/acl/role/name/dev", token=secret) == dev

    # A renamed role shows its new name; a deleted one drops out of the token's links and
    # takes its policies with it.
    await api.ok("PUT", f"/v1/acl/role/{dev['ID']}", {"Name": "devs",
                                                      "Policies": [{"Name": "readonly"}]})
    await api.ok("DELETE", f"/v1/acl/role/{ops['ID']}")
    me = await api.ok("GET", "/v1/acl/token/self", token=secret)
    assert me["Roles"] == [{"ID": dev["ID"], "Name": "devs"}]
    assert (await api.call("GET", "/v1/acl/policy/writer", token=secret)).status == 403
    assert [r["Name"] for r in await api.ok("GET", "/v1/acl/roles", token=secret)] == ["devs"]


async def test_roles_are_read_by_management_or_tokens_linked_to_them(api: ACLAPI) -> None:
    ops = await api.ok("POST", "/v1/acl/role", {"Name": "ops",
                                                "Policies": [{"Name": "writer"}]})
    plain = (await api.client_token(Policies=["readonly"]))["SecretID"]
    assert await api.ok("GET", "/v1/acl/roles", token=plain) == []
    for path in (f"/v1/acl/role/{ops['ID']}", "/v1/acl/role/name/ops",
                 f"/v1/acl/role/{uuid.uuid4()}", "/v1/acl/role/name/nope"):
        assert (await api.call("GET", path, token=plain))[:2] == (403, "Permission denied")
    alloc = make_alloc()
    await seed(api.server, allocs=(alloc,))
    workload = identity_token(api.server.keyring, alloc)
    assert (await api.call("GET", "/v1/acl/roles", token=workload))[:2] == (
        403, "ACL token not found")
    write = await api.call("POST", "/v1/acl/role",
                           {"Name": "mine", "Policies": [{"Name": "readonly"}]}, token=plain)
    assert write[:2] == (403, "Permission denied")


# ---- workload identities -------------------------------------------------------------------
async def test_workload_identities_hold_the_policies_attached_to_them(api: ACLAPI) -> None:
    attachments = {"ns-wide": {"Namespace": "default"},
                   "this-task": {"Namespace": "default", "JobID": "j", "Group": "g",
                                 "Task": "t"},
                   "other-task": {"Namespace": "default", "JobID": "j", "Group": "g",
                                  "Task": "u"},
                   "other-job": {"Namespace": "default", "JobID": "k"}}
    for name, job_acl in attachments.items():
        await api.ok("PUT", f"/v1/acl/policy/{name}",
                     {"Name": name, "Rules": READ_RULES, "JobACL": job_acl})
    alloc = make_alloc()
    await seed(api.server, allocs=(alloc,))
    workload = identity_token(api.server.keyring, alloc)
    held = await api.ok("GET", "/v1/acl/policies", token=workload)
    assert [p["Name"] for p in held] == ["ns-wide", "this-task"]
    assert [p["Name"] for p in await api.ok("GET", "/v1/acl/policy/self", token=workload)] \
        == ["ns-wide", "this-task"]
    assert (await api.call("GET", "/v1/acl/policy/this-task", token=workload)).status == 200
    assert (await api.call("GET", "/v1/acl/policy/other-job", token=workload)).status == 403


# ---- persistence ---------------------------------------------------------------------------
async def test_acl_state_survives_a_restore_with_secrets_sealed(workdir: Path,
                                                                keyring: Keyring) -> None:
    db_path = workdir / "server" / "state.db"
    db = await StateDB.open(db_path)
    async with serving(acl_server(keyring, workdir, store=StateStore(db, SEALER))) as before:
        boot = await before.bootstrap()
        await before.ok("PUT", "/v1/acl/policy/readonly", {"Name": "readonly",
                                                           "Rules": READ_RULES})
        role = await before.ok("POST", "/v1/acl/role", {"Name": "ops",
                                                        "Policies": [{"Name": "readonly"}]})
        token = await before.client_token(Roles=[{"ID": role["ID"]}], ExpirationTTL="1h")
        records = {t: before.server.store.rows(t)
                   for t in ("acl_tokens", "acl_policies", "acl_roles", "acl_bootstrap")}
    await db.close()
    on_disk = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.is_file())
    for secret in (boot["SecretID"], token["SecretID"]):
        assert secret.encode() not in on_disk
    assert token["AccessorID"].encode() in on_disk  # the file is the one written to

    db = await StateDB.open(db_path)
    try:
        store = await StateStore.restore(db, SEALER)
        assert {t: store.rows(t) for t in records} == records
        async with serving(acl_server(keyring, workdir, store=store)) as after:
            # The secret index was rebuilt: both tokens still authenticate.
            me = await after.ok("GET", "/v1/acl/token/self", token=token["SecretID"])
            assert me == token
            after.management = boot["SecretID"]
            assert await after.ok("GET", f"/v1/acl/role/{role['ID']}") == role
            again = await after.call("POST", "/v1/acl/bootstrap", token="")
            assert again[:2] == (400, f"ACL bootstrap already done (reset index: "
                                      f"{boot['CreateIndex']})")
    finally:
        await db.close()


async def test_token_lookup_follows_every_write_to_the_table(keyring: Keyring,
                                                             workdir: Path) -> None:
    server = acl_server(keyring, workdir)
    first = acl_token("client")
    await seed(server, tokens=(first,))
    assert server.token_by_secret(first.secret_id) == server.acls.token(first.accessor_id)
    # A new secret under the same accessor: the old one stops working at once.
    rotated = attrs.evolve(first, secret_id=str(uuid.uuid4()))
    await seed(server, tokens=(rotated,))
    assert server.token_by_secret(first.secret_id) is None
    found = server.token_by_secret(rotated.secret_id)
    assert isinstance(found, ACLToken) and found.accessor_id == first.accessor_id
    await server.store.write(deletes={"acl_tokens": [first.accessor_id]})
    assert server.token_by_secret(rotated.secret_id) is None
