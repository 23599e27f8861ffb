"""python-nomad's variable calls, unmodified, against a real agent with ACLs off and with ACLs
on (a management token): list with prefix and namespace, create with and without ``cas``,
read, delete, and python-nomad's ``VariableConflict`` on a stale ``cas``.

python-nomad is a blocking (requests) library: each call runs in a worker thread, so the
test's event loop keeps reading the agent's output.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import nomad
import nomad.api.exceptions as nomad_errors
import pytest

from tests.integration.harness import AgentProcess

pytestmark = pytest.mark.timeout(90)

AgentFactory = Callable[..., AgentProcess]
METADATA_FIELDS = {"Namespace", "Path", "CreateIndex", "ModifyIndex", "CreateTime",
                   "ModifyTime"}


@pytest.fixture(autouse=True)
def _no_nomad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-nomad reads NOMAD_TOKEN, NOMAD_NAMESPACE and more from the environment whenever
    an argument is left out: none may leak into these tests."""
    for name in [n for n in os.environ if n.startswith("NOMAD_")]:
        monkeypatch.delenv(name)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One python-nomad call, off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def started(agent_factory: AgentFactory, acl: bool) -> nomad.Nomad:
    """A started agent and a python-nomad client for it (management token with ACLs on)."""
    agent = agent_factory(acl=acl)
    await agent.start()
    token = None
    if acl:
        boot = await call(nomad.Nomad(address=agent.address, timeout=15).acl.generate_bootstrap)
        token = boot["SecretID"]
    return nomad.Nomad(address=agent.address, token=token, timeout=15)


@pytest.mark.parametrize("acl", [False, True], ids=["acl-off", "acl-on"])
async def test_variable_calls_with_cas_list_read_and_delete(agent_factory: AgentFactory,
                                                           acl: bool) -> None:
    api = await started(agent_factory, acl)
    created = await call(api.variable.create_variable, "app/config",
                         {"Items": {"user": "admin", "pass": "s3cr3t"}})
    assert created["Path"] == "app/config" and created["Namespace"] == "default"
    assert created["Items"] == {"user": "admin", "pass": "s3cr3t"}
    first = created["ModifyIndex"]
    assert first > 0 and created["CreateIndex"] == first

    # cas=0 means "create only": the path exists, so python-nomad raises VariableConflict
    # carrying the stored variable
    with pytest.raises(nomad_errors.VariableConflict) as conflict:
        await call(api.variable.create_variable, "app/config", {"Items": {"user": "x"}},
                   cas=0)
    assert conflict.value.nomad_resp.status_code == 409  # type: ignore[attr-defined]
    assert conflict.value.nomad_resp.json()["ModifyIndex"] == first  # type: ignore[attr-defined]

    updated = await call(api.variable.create_variable, "app/config",
                         {"Items": {"user": "root"}}, namespace="default", cas=first)
    assert updated["Items"] == {"user": "root"}
    assert updated["ModifyIndex"] > first and updated["CreateIndex"] == first

    # a stale cas conflicts and changes nothing
    with pytest.raises(nomad_errors.VariableConflict):
        await call(api.variable.create_variable, "app/config", {"Items": {"user": "late"}},
                   cas=first)
    read = await call(api.variable.get_variable, "app/config", namespace="default")
    assert read["Items"] == {"user": "root"}
    assert read["ModifyIndex"] == updated["ModifyIndex"]

    await call(api.variable.create_variable, "app/other", {"Items": {"k": "v"}}, cas=0)
    await call(api.variable.create_variable, "elsewhere/x", {"Items": {"k": "v"}})
    listed = await call(api.variables.get_variables, prefix="app/", namespace="default")
    assert [v["Path"] for v in listed] == ["app/config", "app/other"]
    assert all(set(v) >= METADATA_FIELDS and "Items" not in v for v in listed)
    everything = await call(api.variables.get_variables)
    assert {v["Path"] for v in everything} == {"app/config", "app/other", "elsewhere/x"}

    deleted = await call(api.variable.delete_variable, "app/config", namespace="default")
    assert deleted.status_code == 204 and deleted.text == ""
    with pytest.raises(nomad_errors.URLNotFoundNomadException):
        await call(api.variable.get_variable, "app/config")
    # a missing variable deletes without error, as in Nomad
    assert (await call(api.variable.delete_variable, "app/config")).status_code == 204


@pytest.mark.parametrize("acl", [False, True], ids=["acl-off", "acl-on"])
async def test_delete_with_stale_cas_conflicts_and_keeps_the_variable(
        agent_factory: AgentFactory, acl: bool) -> None:
    api = await started(agent_factory, acl)
    first = await call(api.variable.create_variable, "db/creds", {"Items": {"a": "1"}})
    second = await call(api.variable.create_variable, "db/creds", {"Items": {"a": "2"}},
                        cas=first["ModifyIndex"])
    with pytest.raises(nomad_errors.VariableConflict):
        await call(api.variable.delete_variable, "db/creds", cas=first["ModifyIndex"])
    assert (await call(api.variable.get_variable, "db/creds"))["Items"] == {"a": "2"}
    gone = await call(api.variable.delete_variable, "db/creds", cas=second["ModifyIndex"])
    assert gone.status_code == 204
    assert await call(api.variables.get_variables, prefix="db/") == []


async def test_acls_on_refuse_variables_without_a_token(agent_factory: AgentFactory) -> None:
    api = await started(agent_factory, acl=True)
    await call(api.variable.create_variable, "team/secret", {"Items": {"k": "v"}})
    anonymous = nomad.Nomad(address=api.address, timeout=15)  # no token
    with pytest.raises(nomad_errors.URLNotAuthorizedNomadException):
        await call(anonymous.variable.get_variable, "team/secret")
    with pytest.raises(nomad_errors.URLNotAuthorizedNomadException):
        await call(anonymous.variable.create_variable, "team/secret", {"Items": {"k": "x"}})
    assert (await call(api.variable.get_variable, "team/secret"))["Items"] == {"k": "v"}
