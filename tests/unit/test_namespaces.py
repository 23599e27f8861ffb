"""Namespaces on the server: the default namespace, validation, jobs keyed by (namespace, ID),
what a namespace admits of a job, the refusals of a delete, the client's one read (over the
RPC interface) and the move of jobs an older state file keyed by ID alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nomad_client.client.servers import ServerRPC
from nomad_client.server.keyring import Keyring
from nomad_client.server.namespaces import NamespaceError
from nomad_client.server.rpc import InProcessTransport
from nomad_client.server.server import Server
from nomad_client.server.state import JOBS, StateStore, job_key
from nomad_client.state_db import StateDB
from nomad_client.structs.models import AllocUpdate, DriverInfo
from nomad_client.structs.namespaces import Namespace, NamespaceCapabilities
from tests.unit.factories import SEALER, job, make_server, node

PROD = "prod"


def capabilities(**fields: Any) -> NamespaceCapabilities:
    return NamespaceCapabilities(**fields)


async def server_with_node(keyring: Keyring, *namespaces: Namespace) -> Server:
    """A server with one node (raw_exec and exec) and the given namespaces."""
    server = make_server(keyring)
    drivers = {name: DriverInfo(detected=True, healthy=True) for name in ("raw_exec", "exec")}
    await server.register_node(node(drivers=drivers))
    for namespace in namespaces:
        await server.upsert_namespace(namespace)
    return server


async def refusal(call: Any) -> NamespaceError:
    with pytest.raises(NamespaceError) as caught:
        await call
    return caught.value


# ---- the default namespace and validation ------------------------------------------------
async def test_the_default_namespace_exists_from_the_start_and_is_never_deleted(
        keyring: Keyring) -> None:
    server = make_server(keyring)
    [default] = server.namespaces()
    assert default == Namespace(name="default", description="Default shared namespace",
                                create_index=1, modify_index=1)
    refused = await refusal(server.delete_namespace("default"))
    assert (refused.status, refused.message) == (400, "can not delete default namespace")

    index = await server.upsert_namespace(Namespace(name="default", description="shared"))
    updated = server.namespace("default")
    assert updated is not None and updated.description == "shared"
    assert updated.modify_index == index and updated.create_index == 1


@pytest.mark.parametrize(("namespace", "problem"), [
    (Namespace(name="a_b"), 'invalid name "a_b". Must match regex ^[a-zA-Z0-9-]{1,128}$'),
    (Namespace(name="x" * 129), "Must match regex"),
    (Namespace(name=""), 'invalid name "". Must match regex'),
    (Namespace(name="ok", description="d" * 257), "description longer than 256"),
    (Namespace(name="ok", capabilities=capabilities(task_api="sometimes")),
     'Capabilities.TaskAPI: invalid Task API mode "sometimes": must be one of "enabled", '
     '"disabled", "opt_in", or "" (unset)'),
], ids=["underscore", "too long", "empty", "description", "task api mode"])
async def test_an_invalid_namespace_is_refused_with_nomads_text(
        keyring: Keyring, namespace: Namespace, problem: str) -> None:
    server = make_server(keyring)
    refused = await refusal(server.upsert_namespace(namespace))
    assert refused.status == 400
    assert refused.message.startswith(f"Invalid namespace \"{namespace.name[:200]}")
    assert problem in refused.message
    assert [n.name for n in server.namespaces()] == ["default"]


async def test_a_quota_is_refused_as_nomad_ce_does(keyring: Keyring) -> None:
    refused = await refusal(make_server(keyring).upsert_namespace(
        Namespace(name=PROD, quota="small")))
    assert refused.message == 'namespace "prod" using non-existent quota "small"'


async def test_the_task_api_mode_is_read_by_the_client_over_rpc(keyring: Keyring) -> None:
    server = make_server(keyring)
    for name, mode in (("on", "enabled"), ("off", "disabled"), ("asks", "opt_in"),
                       ("unset", "")):
        await server.upsert_namespace(Namespace(name=name,
                                                capabilities=capabilities(task_api=mode)))
    await server.upsert_namespace(Namespace(name="plain"))
    rpc = ServerRPC(InProcessTransport(server))
    assert {name: await rpc.namespace_task_api_mode(name)
            for name in ("on", "off", "asks", "unset", "plain", "default", "missing")} == {
        "on": "enabled", "off": "disabled", "asks": "opt_in", "unset": None, "plain": None,
        "default": None, "missing": None}


# ---- jobs in namespaces ----------------------------------------------------------------------
async def test_one_job_id_in_two_namespaces_is_two_jobs(keyring: Keyring) -> None:
    server = await server_with_node(keyring, Namespace(name=PROD))
    await server.register_job(job(count=1))
    await server.register_job(job(count=2, Namespace=PROD))

    default_job, prod_job = server.job("web"), server.job("web", PROD)
    assert default_job is not None and prod_job is not None
    assert (default_job["Namespace"], prod_job["Namespace"]) == ("default", PROD)
    assert [j["Namespace"] for j in server.jobs()] == ["default", PROD]
    assert server.jobs(PROD) == [prod_job]
    assert len(server.job_allocs("web")) == 1 and len(server.job_allocs("web", PROD)) == 2
    assert {a.namespace for a in server.job_allocs("web", PROD)} == {PROD}
    assert {a.namespace for a in server.allocations(PROD)} == {PROD}
    [default_eval] = server.job_evaluations("web")
    [prod_eval] = server.job_evaluations("web", PROD)
    assert (default_eval.namespace, prod_eval.namespace) == ("default", PROD)

    # Stopping and purging one leaves the other running.
    await server.deregister_job("web", purge=True, namespace=PROD)
    assert server.job("web", PROD) is None
    assert all(a.desired_status == "stop" for a in server.job_allocs("web", PROD))
    default_after = server.job("web")
    assert default_after is not None and not default_after["Stop"]
    assert [a.desired_status for a in server.job_allocs("web")] == ["run"]


async def test_a_job_in_a_namespace_that_does_not_exist_is_refused(keyring: Keyring) -> None:
    server = await server_with_node(keyring)
    refused = await refusal(server.register_job(job(Namespace="nope")))
    assert (refused.status, refused.message) == (
        400, 'job "web" is in nonexistent namespace "nope"')
    assert server.jobs() == [] and server.allocations() == []


@pytest.mark.parametrize(("caps", "message"), [
    (capabilities(enabled_task_drivers=("exec",)),
     'used task driver "raw_exec" is not allowed in namespace "prod"'),
    (capabilities(disabled_task_drivers=("raw_exec",)),
     'used task driver "raw_exec" is not allowed in namespace "prod"'),
    # Disabled wins over enabled.
    (capabilities(enabled_task_drivers=("raw_exec",), disabled_task_drivers=("raw_exec",)),
     'used task driver "raw_exec" is not allowed in namespace "prod"'),
], ids=["not enabled", "disabled", "enabled and disabled"])
async def test_a_driver_the_namespace_refuses_is_refused(
        keyring: Keyring, caps: NamespaceCapabilities, message: str) -> None:
    server = await server_with_node(keyring, Namespace(name=PROD, capabilities=caps))
    refused = await refusal(server.register_job(job(Namespace=PROD)))
    assert (refused.status, refused.message) == (400, message)
    assert server.job("web", PROD) is None


async def test_drivers_are_checked_per_task_and_named_together(keyring: Keyring) -> None:
    allowed = Namespace(name=PROD, capabilities=capabilities(enabled_task_drivers=("exec",)))
    server = await server_with_node(keyring, allowed)
    two_tasks = job(Namespace=PROD)
    two_tasks["TaskGroups"][0]["Tasks"] += [{"Name": "u", "Driver": "docker"},
                                            {"Name": "v", "Driver": "exec"}]
    refused = await refusal(server.register_job(two_tasks))
    assert refused.message == ('used task drivers ["docker" "raw_exec"] are not allowed in '
                               'namespace "prod"')
    await server.register_job(job(driver="exec", Namespace=PROD))
    assert server.job("web", PROD) is not None


async def test_a_changed_namespace_applies_to_the_next_registration(keyring: Keyring) -> None:
    server = await server_with_node(keyring, Namespace(name=PROD))
    await server.register_job(job(Namespace=PROD))
    await server.upsert_namespace(Namespace(
        name=PROD, capabilities=capabilities(disabled_task_drivers=("raw_exec",))))
    # Nothing is re-checked for a running job; a new version is.
    assert server.job("web", PROD) is not None
    await refusal(server.register_job(job(count=2, Namespace=PROD)))
    assert server.job("web", PROD)["TaskGroups"][0]["Count"] == 1  # type: ignore[index]


# ---- delete ----------------------------------------------------------------------------------
async def test_a_namespace_in_use_is_not_deleted(keyring: Keyring) -> None:
    server = await server_with_node(keyring, Namespace(name=PROD))
    await server.register_job(job(Namespace=PROD))
    refused = await refusal(server.delete_namespace(PROD))
    assert (refused.status, refused.message) == (400, (
        "2 errors occurred:\n"
        '\t* namespace "prod" has non-terminal jobs in regions: [global]\n'
        '\t* namespace "prod" has non-terminal allocations in regions: [global]\n\n'))

    # Stopped, its allocations still live until their client reports them finished.
    await server.deregister_job("web", purge=False, namespace=PROD)
    refused = await refusal(server.delete_namespace(PROD))
    assert refused.message == ("1 error occurred:\n\t* namespace \"prod\" has non-terminal "
                               "allocations in regions: [global]\n\n")
    await server.update_allocs_from_client([
        AllocUpdate(id=a.id, client_status="complete", client_description="", task_states={})
        for a in server.job_allocs("web", PROD)])
    # A dead job that is not purged does not hold the namespace; a variable does.
    await server.variables.put(PROD, "app/config", {"k": "v"})
    refused = await refusal(server.delete_namespace(PROD))
    assert refused.message == ("1 error occurred:\n\t* namespace \"prod\" has variables "
                               "associated with it in regions: [global]\n\n")
    await server.variables.delete(PROD, "app/config")
    index = await server.delete_namespace(PROD)
    assert server.namespace(PROD) is None and index == server.store.index

    missing = await refusal(server.delete_namespace(PROD))
    assert (missing.status, missing.message) == (404, "namespace not found")


# ---- persistence -----------------------------------------------------------------------------
async def test_jobs_of_an_older_state_file_move_to_their_namespaced_keys(tmp_path: Path
                                                                         ) -> None:
    db = await StateDB.open(tmp_path / "state.db")
    old_rows = {"web": job(Namespace="default", ModifyIndex=3),
                "api": job(ID="api", Namespace=PROD, ModifyIndex=4),
                "bare": job(ID="bare", ModifyIndex=5)}  # no Namespace: the default
    await db.write_batch([*(("table/jobs", key, row) for key, row in old_rows.items()),
                          ("server_meta", "index", 5)])
    store = await StateStore.restore(db, SEALER)
    assert store.get(JOBS, job_key("default", "web")) == old_rows["web"]
    assert store.get(JOBS, job_key(PROD, "api")) == old_rows["api"]
    assert store.get(JOBS, job_key("default", "bare")) == old_rows["bare"]
    assert len(store.values(JOBS)) == 3
    # ... on disk too: the old keys are gone.
    on_disk = dict(await db.items("table/jobs"))
    assert sorted(on_disk) == sorted([job_key("default", "bare"), job_key("default", "web"),
                                      job_key(PROD, "api")])
    await db.close()

    db = await StateDB.open(tmp_path / "state.db")
    again = await StateStore.restore(db, SEALER)
    assert sorted(k for k, _ in await db.items("table/jobs")) == sorted(on_disk)
    assert again.get(JOBS, job_key(PROD, "api")) == old_rows["api"]
    await db.close()


async def test_namespaces_survive_a_restart_and_the_default_comes_back(tmp_path: Path,
                                                                       keyring: Keyring
                                                                       ) -> None:
    db = await StateDB.open(tmp_path / "state.db")
    server = make_server(keyring, store=StateStore(db, SEALER))
    await server.upsert_namespace(Namespace(
        name=PROD, description="Production", meta={"team": "payments"},
        capabilities=capabilities(enabled_task_drivers=("exec",), task_api="opt_in")))
    stored = server.namespace(PROD)
    await db.close()

    db = await StateDB.open(tmp_path / "state.db")
    restored = make_server(keyring, store=await StateStore.restore(db, SEALER))
    assert restored.namespace(PROD) == stored
    assert [n.name for n in restored.namespaces()] == ["default", PROD]
    assert restored.namespace_task_api_mode(PROD) == "opt_in"
    await db.close()
