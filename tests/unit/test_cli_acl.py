"""The ``acl`` commands against the real agent API: a server with ACLs enabled and the router
with every endpoint, in this process, on a real TCP port. The router notes each request, so
a test checks what the CLI sent as well as what it printed.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nomad_client.cli.acl import format_token, go_time
from nomad_client.cli.main import main
from nomad_client.server.keyring import Keyring
from tests.unit.factories import InProcessAgent, start_agent, write_file
from tests.unit.test_cli import RecordingRouter, Seen, cli

READ_RULES = 'namespace "default" {\n  policy = "read"\n}\n'
GO_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
Capsys = pytest.CaptureFixture[str]


@pytest.fixture
async def agent(tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[InProcessAgent]:
    """An agent with ACLs enabled and not bootstrapped; $NOMAD_ADDR points at it and no
    other NOMAD_ variable is set."""
    started = await start_agent(tmp_path, keyring, acl=True, with_client=False,
                                router_type=RecordingRouter)
    for name in [n for n in os.environ if n.startswith("NOMAD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NOMAD_ADDR", started.api.url)
    yield started
    await started.stop()


def seen(agent: InProcessAgent) -> list[Seen]:
    router = agent.api.router
    assert isinstance(router, RecordingRouter)
    return router.seen


def requests(agent: InProcessAgent) -> list[tuple[str, str]]:
    return [(s.method, s.path) for s in seen(agent)]


async def ok(capsys: Capsys, *argv: str) -> str:
    """Run a command that must succeed silently on stderr; its stdout."""
    code, out, err = await cli(capsys, *argv)
    assert (code, err) == (0, ""), (out, err)
    return out


async def fails(capsys: Capsys, *argv: str) -> str:
    """Run a command that must fail with exit code 1 and nothing on stdout; its stderr."""
    code, out, err = await cli(capsys, *argv)
    assert (code, out) == (1, ""), (out, err)
    return err


async def bootstrap(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Bootstrap ACLs; the management token, now in $NOMAD_TOKEN."""
    token: dict[str, Any] = json.loads(await ok(capsys, "acl", "bootstrap", "-json"))
    monkeypatch.setenv("NOMAD_TOKEN", token["SecretID"])
    return token


def kv_lines(out: str) -> dict[str, str]:
    """``Key = value`` lines as a dict (other lines ignored)."""
    pairs = (line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    return {key.strip(): value for key, value in pairs}


# ---------------------------------------------------------------------------------------
# Output helpers


def test_go_time_prints_as_go_does() -> None:
    assert go_time("2026-01-02T03:04:05.123456789Z") == "2026-01-02 03:04:05.123456789 +0000 UTC"
    assert go_time("2026-01-02T03:04:05.120Z") == "2026-01-02 03:04:05.12 +0000 UTC"
    assert go_time("2026-01-02T03:04:05Z") == "2026-01-02 03:04:05 +0000 UTC"
    assert go_time("2026-01-02T03:04:05.5+02:00") == "2026-01-02 03:04:05.5 +0200 +0200"
    assert go_time("0001-01-01T00:00:00Z") == "" and go_time(None) == ""


def test_client_token_block_lists_policies_and_role_links() -> None:
    token = {"AccessorID": "a", "SecretID": "s", "Name": "", "Type": "client",
             "Policies": ["p1", "p2"], "Roles": [{"ID": "r-1", "Name": "ops"}],
             "Global": False, "CreateTime": "2026-01-02T03:04:05Z",
             "ExpirationTime": "2026-01-02T04:04:05Z", "CreateIndex": 7, "ModifyIndex": 9}
    assert format_token(token).splitlines() == [
        "Accessor ID  = a",
        "Secret ID    = s",
        "Name         = <none>",
        "Type         = client",
        "Global       = false",
        "Create Time  = 2026-01-02 03:04:05 +0000 UTC",
        "Expiry Time  = 2026-01-02 04:04:05 +0000 UTC",
        "Create Index = 7",
        "Modify Index = 9",
        "Policies     = [p1 p2]",
        "",
        "Roles",
        "ID   Name",
        "r-1  ops",
    ]
    assert format_token({**token, "Roles": []}).endswith("\n\nRoles\n<none>")


@pytest.mark.parametrize(("argv", "message"), [
    (["acl", "policy", "info"], "This command takes one argument: <name>"),
    (["acl", "policy", "apply", "p"], "This command takes two arguments: <name> and <path>"),
    (["acl", "policy", "list", "extra"], "This command takes no arguments"),
    (["acl", "bootstrap", "a", "b"], "This command takes up to one argument"),
    (["acl", "token", "delete"], "This command takes one argument: <token_accessor_id>"),
    (["acl", "role", "info"], "This command takes one argument: <acl_role_id>"),
    (["acl", "token", "create", "-ttl", "soon"],
     'Failed to parse TTL as time duration: time: invalid duration "soon"'),
    (["acl", "role", "create", "-policy", "p"],
     "ACL role name must be specified using the -name flag"),
    (["acl", "role", "create", "-name", "ops"],
     "At least one policy name must be specified using the -policy flag"),
    (["acl", "role", "update", "r"], "Please provide at least one flag to update the ACL role"),
    (["acl", "token", "self"], "No token present in the environment or set via the CLI flag"),
])
def test_usage_errors_use_nomads_words(capsys: Capsys, monkeypatch: pytest.MonkeyPatch,
                                       argv: list[str], message: str) -> None:
    monkeypatch.delenv("NOMAD_TOKEN", raising=False)
    # Nothing listens here: each error must come before any request.
    monkeypatch.setenv("NOMAD_ADDR", "http://127.0.0.1:1")
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines()[0] == message


def test_policy_apply_needs_each_outer_workload_flag(capsys: Capsys, tmp_path: Path) -> None:
    rules = write_file(tmp_path, "p.hcl", READ_RULES)
    for flags, message in ((["-job", "web"], "-namespace is required if -job is set"),
                           (["-namespace", "default", "-group", "g"],
                            "-job is required if -group is set"),
                           (["-namespace", "default", "-job", "web", "-task", "t"],
                            "-group is required if -task is set")):
        assert main(["acl", "policy", "apply", "-address", "http://127.0.0.1:1", *flags,
                     "p", str(rules)]) == 1
        assert capsys.readouterr().err == message + "\n"
    missing = tmp_path / "missing.hcl"
    assert main(["acl", "policy", "apply", "p", str(missing)]) == 1
    assert capsys.readouterr().err == (f"Failed to read file: open {missing}: "
                                       "no such file or directory\n")


def test_group_usage(capsys: Capsys) -> None:
    assert main(["acl", "token", "-help"]) == 0
    assert "Subcommands: create, list, info, self, update, delete" in capsys.readouterr().out
    assert main(["acl", "role", "frob"]) == 1
    assert "acl role: unknown subcommand 'frob'" in capsys.readouterr().err
    assert main(["-help"]) == 0
    assert "acl bootstrap" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# bootstrap


async def test_bootstrap_prints_the_management_token_once(capsys: Capsys,
                                                          agent: InProcessAgent) -> None:
    out = await ok(capsys, "acl", "bootstrap")
    assert requests(agent) == [("PUT", "/v1/acl/bootstrap")]
    (stored,) = agent.server.acls.tokens()
    lines = out.splitlines()
    assert lines[:5] == [
        f"Accessor ID  = {stored.accessor_id}",
        f"Secret ID    = {stored.secret_id}",
        "Name         = Bootstrap Token",
        "Type         = management",
        "Global       = true",
    ]
    assert re.fullmatch(f"Create Time  = {GO_TIME}", lines[5]), lines[5]
    assert lines[6:] == [
        "Expiry Time  = <none>",
        f"Create Index = {stored.create_index}",
        f"Modify Index = {stored.modify_index}",
        "Policies     = n/a",
        "Roles        = n/a",
    ]

    err = await fails(capsys, "acl", "bootstrap")
    assert re.fullmatch(r"Error bootstrapping: Unexpected response code: 400 \(ACL bootstrap "
                        r"already done \(reset index: \d+\)\)\n", err), err


@pytest.mark.parametrize("source", ["file", "stdin"])
async def test_bootstrap_with_an_operator_chosen_secret(
        capsys: Capsys, agent: InProcessAgent, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, source: str) -> None:
    secret = str(uuid.uuid4())
    if source == "file":
        path = write_file(tmp_path, "secret", secret + "\n")  # as `echo` writes it
        argv = ["acl", "bootstrap", "-json", str(path)]
    else:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(secret.encode())))
        argv = ["acl", "bootstrap", "-json", "-"]
    out = await ok(capsys, *argv)
    token = json.loads(out)
    assert token["SecretID"] == secret and token["Type"] == "management"
    assert out.startswith('{\n    "AccessorID": ')  # Nomad's 4-space JSON, API field order
    assert agent.server.token_by_secret(secret) is not None


async def test_bootstrap_refuses_a_malformed_secret_without_echoing_it(
        capsys: Capsys, agent: InProcessAgent, tmp_path: Path) -> None:
    path = write_file(tmp_path, "secret", "my-not-so-secret-word\n")
    err = await fails(capsys, "acl", "bootstrap", str(path))
    assert err.startswith("Error bootstrapping: Unexpected response code: 400 ("), err
    assert "not-so-secret" not in err
    assert agent.server.acls.tokens() == []
    err = await fails(capsys, "acl", "bootstrap", str(tmp_path / "absent"))
    assert err == (f"Error reading provided token: open {tmp_path / 'absent'}: "
                   "no such file or directory\n")


# ---------------------------------------------------------------------------------------
# policy


async def test_policy_apply_list_info_delete(capsys: Capsys, agent: InProcessAgent,
                                             monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    await bootstrap(capsys, monkeypatch)
    rules = write_file(tmp_path, "readonly.hcl", READ_RULES)
    assert await ok(capsys, "acl", "policy", "apply", "-description", "Read only",
                    "readonly", str(rules)) == 'Successfully wrote "readonly" ACL policy!\n'
    assert requests(agent)[-1] == ("PUT", "/v1/acl/policy/readonly")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(READ_RULES.encode())))
    await ok(capsys, "acl", "policy", "apply", "-namespace", "default", "-job", "web",
             "-group", "g", "web-reader", "-")

    assert (await ok(capsys, "acl", "policy", "list")).splitlines() == [
        "Name        Description",
        "readonly    Read only",
        "web-reader  <none>",
    ]
    listed = json.loads(await ok(capsys, "acl", "policy", "list", "-json"))
    assert [p["Name"] for p in listed] == ["readonly", "web-reader"]

    stored = agent.server.acls.policy("readonly")
    assert stored is not None
    assert (await ok(capsys, "acl", "policy", "info", "readonly")).splitlines() == [
        "Name        = readonly",
        "Description = Read only",
        f"CreateIndex = {stored.create_index}",
        f"ModifyIndex = {stored.modify_index}",
        "",
        "Rules",
        "",
        # The rules verbatim, their own last newline included (Nomad prints them so too).
        *READ_RULES.splitlines(),
        "",
    ]
    attached = (await ok(capsys, "acl", "policy", "info", "web-reader")).split("\n\n")
    assert attached[1].splitlines() == ["Associated Workload", "Namespace = default",
                                        "JobID     = web", "Group     = g",
                                        "Task      = <none>"]
    info = json.loads(await ok(capsys, "acl", "policy", "info", "-json", "web-reader"))
    assert info["JobACL"] == {"Namespace": "default", "JobID": "web", "Group": "g",
                              "Task": ""}
    assert info["Rules"] == READ_RULES

    assert await ok(capsys, "acl", "policy", "delete",
                    "web-reader") == "Successfully deleted web-reader policy!\n"
    assert requests(agent)[-1] == ("DELETE", "/v1/acl/policy/web-reader")
    assert await fails(capsys, "acl", "policy", "info", "web-reader") == (
        "Error fetching info on ACL policy: Unexpected response code: 404 "
        "(ACL policy not found)\n")


async def test_policy_apply_reports_the_servers_refusal(capsys: Capsys, agent: InProcessAgent,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    await bootstrap(capsys, monkeypatch)
    rules = write_file(tmp_path, "bad.hcl", 'namespace "default" { policy = "own" }')
    err = await fails(capsys, "acl", "policy", "apply", "bad", str(rules))
    assert err.startswith("Error writing ACL policy: Unexpected response code: 400 (policy 0 "
                          "invalid: "), err
    assert agent.server.acls.policies() == []


# ---------------------------------------------------------------------------------------
# token


async def test_token_create_list_info_self_update_delete(
        capsys: Capsys, agent: InProcessAgent, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    boot = await bootstrap(capsys, monkeypatch)
    rules = write_file(tmp_path, "readonly.hcl", READ_RULES)
    await ok(capsys, "acl", "policy", "apply", "readonly", str(rules))

    # A policy that does not exist is only warned about, as Nomad's CLI does.
    code, out, err = await cli(capsys, "acl", "token", "create", "-name", "ci", "-policy",
                               "readonly", "-policy", "ghost", "-ttl", "90m")
    assert code == 0
    assert err == ("Error fetching info on ghost policy: Unexpected response code: 404 "
                   "(ACL policy not found)\n")
    fields = kv_lines(out)
    accessor, secret = fields["Accessor ID"], fields["Secret ID"]
    assert re.fullmatch(UUID, accessor) and re.fullmatch(UUID, secret)
    assert (fields["Name"], fields["Type"], fields["Global"], fields["Policies"]) == (
        "ci", "client", "false", "[readonly ghost]")
    assert re.fullmatch(GO_TIME, fields["Expiry Time"]), fields["Expiry Time"]
    assert out.endswith("\n\nRoles\n<none>\n")
    created = next(s for s in seen(agent) if s.path == "/v1/acl/token")
    assert created.method == "PUT"
    stored = agent.server.acls.token(accessor)
    assert stored is not None and stored.expiration_ttl == 90 * 60 * 10**9

    assert (await ok(capsys, "acl", "token", "list")).splitlines() == [
        "Name             Type        Global  Accessor ID                           Expired",
        f"Bootstrap Token  management  true    {boot['AccessorID']}  false",
        f"ci               client      false   {accessor}  false",
    ]
    listed = json.loads(await ok(capsys, "acl", "token", "list", "-json"))
    assert {t["AccessorID"] for t in listed} == {boot["AccessorID"], accessor}

    assert kv_lines(await ok(capsys, "acl", "token", "info", accessor))["Secret ID"] == secret
    info = json.loads(await ok(capsys, "acl", "token", "info", "-json", accessor))
    assert (info["AccessorID"], info["ExpirationTTL"]) == (accessor, "1h30m0s")

    # `self` answers for whichever token is in use: here the flag's.
    mine = kv_lines(await ok(capsys, "acl", "token", "self", "-token", secret))
    assert (mine["Accessor ID"], mine["Name"]) == (accessor, "ci")

    updated = kv_lines(await ok(capsys, "acl", "token", "update", "-name", "ci-2", accessor))
    assert (updated["Name"], updated["Policies"], updated["Secret ID"]) == (
        "ci-2", "[readonly ghost]", secret)
    updated = kv_lines(await ok(capsys, "acl", "token", "update", "-policy", "readonly",
                                accessor))
    assert (updated["Name"], updated["Policies"]) == ("ci-2", "[readonly]")
    assert [m for m, p in requests(agent) if p == f"/v1/acl/token/{accessor}"][-2:] == [
        "GET", "PUT"]

    assert await ok(capsys, "acl", "token", "delete",
                    accessor) == f"Token {accessor} successfully deleted\n"
    assert await fails(capsys, "acl", "token", "info", accessor) == (
        "Error fetching token: Unexpected response code: 404 (ACL token not found)\n")
    assert agent.server.acls.token(accessor) is None


async def test_token_commands_need_permission(capsys: Capsys, agent: InProcessAgent,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    await bootstrap(capsys, monkeypatch)
    code, out, _ = await cli(capsys, "acl", "token", "create", "-policy", "p", "-json")
    assert code == 0
    client = json.loads(out)
    monkeypatch.setenv("NOMAD_TOKEN", client["SecretID"])
    assert await fails(capsys, "acl", "token", "list") == (
        "Error listing ACL tokens: Unexpected response code: 403 (Permission denied)\n")
    assert await fails(capsys, "acl", "token", "create", "-type", "management") == (
        "Error creating token: Unexpected response code: 403 (Permission denied)\n")
    # A token may always read itself.
    assert kv_lines(await ok(capsys, "acl", "token", "self"))["Type"] == "client"


async def test_token_self_with_a_workload_identity_shaped_token(
        capsys: Capsys, agent: InProcessAgent) -> None:
    err = await fails(capsys, "acl", "token", "self", "-token", "header.payload.signature")
    assert err == "No ACL tokens, nor ACL policies attached to a workload identity found.\n"


async def test_management_token_create(capsys: Capsys, agent: InProcessAgent,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    await bootstrap(capsys, monkeypatch)
    out = await ok(capsys, "acl", "token", "create", "-type", "management", "-name", "ops",
                   "-global")
    fields = kv_lines(out)
    assert (fields["Type"], fields["Global"], fields["Policies"], fields["Roles"]) == (
        "management", "true", "n/a", "n/a")
    assert "\nRoles\n" not in out


# ---------------------------------------------------------------------------------------
# role


async def test_role_create_list_info_update_delete(
        capsys: Capsys, agent: InProcessAgent, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    await bootstrap(capsys, monkeypatch)
    rules = write_file(tmp_path, "rules.hcl", READ_RULES)
    for name in ("readonly", "deployer", "auditor"):
        await ok(capsys, "acl", "policy", "apply", name, str(rules))

    out = await ok(capsys, "acl", "role", "create", "-name", "ops", "-description",
                   "Operators", "-policy", "readonly", "-policy", "deployer")
    fields = kv_lines(out)
    role_id = fields["ID"]
    assert re.fullmatch(UUID, role_id)
    assert (fields["Name"], fields["Description"], fields["Policies"]) == (
        "ops", "Operators", "deployer,readonly")
    assert [line.split(" = ")[0].strip() for line in out.splitlines()] == [
        "ID", "Name", "Description", "Policies", "Create Index", "Modify Index"]

    assert (await ok(capsys, "acl", "role", "list")).splitlines() == [
        f"ID{' ' * 36}Name  Description  Policies",
        f"{role_id}  ops   Operators    deployer,readonly",
    ]
    assert kv_lines(await ok(capsys, "acl", "role", "info", role_id))["Name"] == "ops"
    by_name = json.loads(await ok(capsys, "acl", "role", "info", "-by-name", "-json", "ops"))
    assert by_name["ID"] == role_id
    assert ("GET", "/v1/acl/role/name/ops") in requests(agent)

    # A token can hold the role, shown by ID and name.
    token = await ok(capsys, "acl", "token", "create", "-role-name", "ops")
    assert token.endswith(f"\n\nRoles\nID{' ' * 36}Name\n{role_id}  ops\n")

    # Merging adds policies and keeps what is not named.
    merged = kv_lines(await ok(capsys, "acl", "role", "update", "-policy", "auditor",
                               role_id))
    assert (merged["Name"], merged["Description"], merged["Policies"]) == (
        "ops", "Operators", "auditor,deployer,readonly")
    replaced = json.loads(await ok(capsys, "acl", "role", "update", "-no-merge", "-name",
                                   "ops2", "-policy", "auditor", "-json", role_id))
    assert (replaced["Name"], replaced["Description"],
            [p["Name"] for p in replaced["Policies"]]) == ("ops2", "", ["auditor"])
    assert await fails(capsys, "acl", "role", "update", "-no-merge", "-name", "x",
                       role_id) == ("At least one policy name must be specified using the "
                                    "-policy flag\n")

    assert await ok(capsys, "acl", "role", "delete",
                    role_id) == f"ACL role {role_id} successfully deleted\n"
    assert await fails(capsys, "acl", "role", "info", role_id) == (
        "Error reading ACL role: Unexpected response code: 404 (ACL role not found)\n")
    assert await ok(capsys, "acl", "role", "list") == "No ACL roles found\n"


async def test_role_create_names_a_missing_policy(capsys: Capsys, agent: InProcessAgent,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    await bootstrap(capsys, monkeypatch)
    assert await fails(capsys, "acl", "role", "create", "-name", "ops", "-policy",
                       "ghost") == ("Error creating ACL role: Unexpected response code: 400 "
                                    "(cannot find policy ghost)\n")
    assert await ok(capsys, "acl", "policy", "list") == "No policies found\n"
