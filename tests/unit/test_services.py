"""Native service discovery below the HTTP layer: ``service``/``check`` blocks in jobspecs
(decoded with lines, JSON jobs held to the same rules), the server's registrations (a node
registers only its own live allocations' services; they go when the allocation stops), the
client's checks, and the service hook registering and deregistering with a task's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomad_client.allocrunner.checks import (
    FAILURE,
    PENDING,
    SUCCESS,
    CheckResults,
    CheckRunner,
    CheckSpec,
    probe,
)
from nomad_client.allocrunner.hooks import AllocHookDeps, TaskContext
from nomad_client.allocrunner.service_hook import ServiceHook
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.drivers.base import ExitResult, TaskHandle
from nomad_client.client.servers import ServerRPC
from nomad_client.client.taskenv import NodeView
from nomad_client.jobspec import JobspecError, JobValidationError, canonicalize_job, parse_jobspec
from nomad_client.server.keyring import Keyring
from nomad_client.server.rpc import InProcessTransport
from nomad_client.server.server import Server
from nomad_client.server.services import ServiceError
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB
from nomad_client.structs.models import Allocation, AllocUpdate, TaskEvent
from nomad_client.structs.services import registration_id
from tests.unit.factories import (
    SEALER,
    InProcessAgent,
    make_alloc,
    make_server,
    node,
    seed,
    settle,
    start_agent,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

S = 1_000_000_000


# ---- jobspec ---------------------------------------------------------------------------------
def parse(src: str) -> dict[str, Any]:
    return parse_jobspec(textwrap.dedent(src), "svc.nomad.hcl")


WEB_JOB = """\
job "web" {
  group "api" {
    network {
      port "http" {}
    }
    service {
      provider = "nomad"
      port     = "http"
      tags     = ["v1", "db"]
      check {
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "1s"
      }
    }
    task "server" {
      driver = "raw_exec"
      service {
        provider = "nomad"
        name     = "${TASK}-admin"
        port     = 9090
        check {
          name     = "alive"
          type     = "tcp"
          interval = "5s"
          timeout  = "2s"
        }
      }
    }
  }
}
"""


def test_group_and_task_services_decode_to_nomad_shape_with_its_defaults() -> None:
    job = canonicalize_job(parse(WEB_JOB))
    group = job["TaskGroups"][0]
    (group_service,) = group["Services"]
    assert group_service == {
        "Name": "web-api", "TaskName": "", "PortLabel": "http", "Tags": ["v1", "db"],
        "AddressMode": "auto", "Meta": {}, "Provider": "nomad",
        "Checks": [{"Name": 'service: "web-api" check', "Type": "http", "Path": "/health",
                    "Method": "GET", "Interval": 2 * S, "Timeout": S, "PortLabel": ""}]}
    (task_service,) = group["Tasks"][0]["Services"]
    assert task_service["Name"] == "server-admin"  # ${TASK}, replaced as Nomad's server does
    assert (task_service["TaskName"], task_service["PortLabel"]) == ("server", "9090")
    assert task_service["Checks"] == [{"Name": "alive", "Type": "tcp", "Path": "",
                                       "Method": "", "Interval": 5 * S, "Timeout": 2 * S,
                                       "PortLabel": ""}]


def test_jobs_without_services_keep_their_shape() -> None:
    job = parse('job "j" {\n  group "g" {\n    task "t" { driver = "raw_exec" }\n  }\n}\n')
    assert "Services" not in job["TaskGroups"][0]
    assert "Services" not in job["TaskGroups"][0]["Tasks"][0]
    canonical = canonicalize_job(job)
    assert canonical["TaskGroups"][0]["Services"] is None  # Nomad's JSON: null


def service_job(service_body: str) -> str:
    """A job whose group has one service with ``service_body`` (lines 4 onwards)."""
    return ('job "j" {\n  group "g" {\n    service {\n' + service_body
            + '\n    }\n    task "t" { driver = "raw_exec" }\n  }\n}\n')


CHECK = 'provider = "nomad"\nport = 8080\ncheck {\n'  # the check's body starts on line 7


@pytest.mark.parametrize(("body", "line", "fragment"), [
    ('name = "x"', 3, 'job.group[g].service: the \'service\' block is not supported with '
                      'provider "consul" (the default): this client has no Consul; '
                      'set provider = "nomad"'),
    ('provider = "consul"', 4, 'job.group[g].service.provider: the \'service\' block is not '
                               'supported with provider "consul"'),
    ('provider = "zookeeper"', 4, "unknown service provider 'zookeeper'"),
    ('provider = "nomad"\naddress_mode = "alloc"', 5,
     "job.group[g].service.address_mode: address_mode 'alloc' is not available"),
    ('provider = "nomad"\nweights { passing = 1 }', 5, "unknown block 'weights'"),
    ('provider = "nomad"\nenable_tag_override = true', 5, "unknown attribute"),
    (CHECK + 'type = "grpc"\n}', 7,
     "job.group[g].service.check.type: check type 'grpc' is not supported: provider "
     '"nomad" runs http and tcp checks only'),
    (CHECK + 'type = "script"\n}', 7, "check type 'script' is not supported"),
    (CHECK + 'type = "tcp"\ninterval = "500ms"\n}', 8,
     "check.interval: interval must be at least 1s"),
    (CHECK + 'type = "tcp"\ntimeout = "0s"\n}', 8, "check.timeout: timeout must be at least 1s"),
    (CHECK + 'type = "http"\nmethod = "FETCH"\n}', 8,
     "method 'FETCH' is not supported in an http check"),
    (CHECK + 'type = "http"\npath = "http://elsewhere/x"\n}', 8,
     "http type must have relative http path"),
    (CHECK + 'type = "http"\npath = "/a b"\n}', 8, "invalid http check path"),
    (CHECK + 'interval = "1s"\n}', 6, 'check.type: missing attribute: write type = "http"'),
    (CHECK + 'type = "tcp"\nheader { X = ["y"] }\n}', 8, "unknown block 'header'"),
])
def test_service_and_check_mistakes_are_refused_at_their_line(body: str, line: int,
                                                               fragment: str) -> None:
    with pytest.raises(JobspecError) as info:
        parse(service_job(body))
    assert fragment in info.value.message
    assert info.value.line == line


def json_job(group_services: list[Any] | None = None, task_services: list[Any] | None = None,
             **group: Any) -> dict[str, Any]:
    return {"ID": "j", "TaskGroups": [{
        "Name": "g", "Services": group_services, **group,
        "Tasks": [{"Name": "t", "Driver": "raw_exec", "Services": task_services}]}]}


NETWORK = [{"Mode": "host", "DynamicPorts": [{"Label": "http", "Value": 0, "To": 0}]}]


def problems(job: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(job)
    return info.value.problems


def test_json_jobs_are_held_to_the_same_rules() -> None:
    nomad = {"Provider": "nomad"}
    http_check = {"Type": "http", "Path": "/", "Interval": S, "Timeout": S}
    found = problems(json_job([
        {**nomad, "Name": "bad_name", "PortLabel": "http"},  # no network here
        {**nomad, "Name": "nocheckport", "Checks": [http_check]},
        {"Name": "consul-one"},
        {**nomad, "Name": "grpc", "PortLabel": "8080",
         "Checks": [{"Type": "grpc", "Interval": 10, "Timeout": S}]},
        {**nomad, "Name": "dup"}, {**nomad, "Name": "dup"},
        {**nomad, "Name": "mesh", "Connect": {"SidecarService": {}}},
        {**nomad, "Name": "orphan", "TaskName": "nope"},
        "not an object",
    ], [{**nomad, "TaskName": "someone-else"}]))
    assert "group 'g' service 'bad_name': service name 'bad_name' is not valid: 1 to 63 " \
           "letters, digits and dashes, starting and ending with a letter or digit" in found
    assert "group 'g' service 'bad_name': port label 'http' referenced by services " \
           "bad_name does not exist" in found
    assert "group 'g' service 'nocheckport': check 'service: \"nocheckport\" check': check " \
           "requires a port but neither check nor service 'nocheckport' have a port" in found
    assert any("service 'consul-one'" in p and '"consul" (the default)' in p for p in found)
    assert any("service 'grpc'" in p and "check type 'grpc' is not supported" in p
               for p in found)
    assert any("service 'grpc'" in p and "interval must be at least 1s" in p for p in found)
    assert "group 'g' service 'dup': Services are not unique: ->dup:" in found
    assert "group 'g' service 'mesh': Service with provider nomad cannot include Connect " \
           "blocks" in found
    assert "group 'g' service 'orphan': TaskName 'nope' is not a task of the group" in found
    assert "group 'g': each service must be an object" in found
    assert "group 'g' task 't' service 'j-g-t': a task's service can only name its own " \
           "task, not 'someone-else'" in found


def test_a_port_label_must_be_one_of_the_group_network_ports() -> None:
    service = {"Provider": "nomad", "PortLabel": "http",
               "Checks": [{"Type": "tcp", "Interval": S, "Timeout": S, "PortLabel": "admin"}]}
    found = problems(json_job([service], Networks=NETWORK))
    assert found == ("group 'g' service 'j-g': check 'service: \"j-g\" check': port label "
                     "'admin' referenced by services j-g does not exist",)
    job = canonicalize_job(json_job([{**service, "Checks": []}], Networks=NETWORK))
    assert job["TaskGroups"][0]["Services"][0]["PortLabel"] == "http"


def test_hcl_ports_refer_to_the_group_network() -> None:
    job = parse(WEB_JOB.replace('port     = "http"', 'port     = "https"'))
    with pytest.raises(JobValidationError, match="port label 'https' referenced by services "
                                                 "web-api does not exist"):
        canonicalize_job(job)


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=6),
    st.sampled_from(["nomad", "consul", "http", "tcp", "grpc", "auto", "host", "alloc", "GET",
                     "/health", "http://x/", "8080", "g", "t", S, 10 * S]))
_ANY = st.recursive(_VALUES, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def _objects(keys: list[str], **inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Objects with some of ``keys`` (random values unless given), or random JSON."""
    fields = {k: inner.get(k, _ANY) for k in keys}
    return st.one_of(_ANY, st.fixed_dictionaries({}, optional=fields))


_CHECKS = st.one_of(_ANY, st.lists(_objects(
    ["Name", "Type", "Path", "Method", "Interval", "Timeout", "PortLabel"]), max_size=2))
_SERVICES = st.one_of(_ANY, st.lists(_objects(
    ["Name", "TaskName", "PortLabel", "Tags", "AddressMode", "Meta", "Provider", "Connect"],
    Checks=_CHECKS), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group_services=_SERVICES, task_services=_SERVICES, networks=st.one_of(_ANY, st.just(
    NETWORK)), task_name=st.one_of(st.just("t"), _ANY))
def test_random_services_fail_only_with_validation_errors(
        group_services: Any, task_services: Any, networks: Any, task_name: Any) -> None:
    job = json_job(group_services, task_services, Networks=networks)
    job["TaskGroups"][0]["Tasks"][0]["Name"] = task_name
    try:
        out = canonicalize_job(job)
    except JobValidationError as err:
        assert err.problems
        return
    assert canonicalize_job(out) == out


# ---- the server's registrations ------------------------------------------------------------
def names(server: Server) -> list[str]:
    return sorted(r["ServiceName"] for r in server.services.all())


NODE_SECRET = "0c3e8f42-6a56-4d2d-9a51-0b8e5a4d3c21"


@attrs.define
class Catalog:
    """A server with node "n1" (and "n2"), a live allocation on n1, and the RPC a client
    uses (through msgpack, as the embedded server's transport does)."""

    server: Server
    rpc: ServerRPC
    alloc: Allocation

    def registration(self, name: str = "web", port: int = 20001, *, tags: list[str] | None = None,
                     alloc: Allocation | None = None, label: str = "http") -> dict[str, Any]:
        alloc = alloc or self.alloc
        return {"ID": registration_id(alloc.id, "group-g", name, label), "ServiceName": name,
                "Tags": tags or [], "Address": "127.0.0.1", "Port": port}

    async def register(self, *registrations: dict[str, Any], alloc: Allocation | None = None,
                       secret: str = NODE_SECRET) -> int:
        return await self.rpc.service_registration_upsert(
            "n1", secret, (alloc or self.alloc).id, registrations)

    def rows(self) -> list[dict[str, Any]]:
        return self.server.services.all()


async def catalog_on(server: Server) -> Catalog:
    await server.register_node(node("n1", secret_id=NODE_SECRET))
    await server.register_node(node("n2", secret_id="another-secret"))
    alloc = make_alloc(node_id="n1", job_id="web")
    await seed(server, allocs=(alloc,))
    return Catalog(server, ServerRPC(InProcessTransport(server)), alloc)


@pytest.fixture
async def catalog(keyring: Keyring) -> AsyncIterator[Catalog]:
    server = make_server(keyring)
    yield await catalog_on(server)
    await server.close()


async def test_a_node_registers_its_allocations_services_and_the_server_adds_the_rest(
        catalog: Catalog) -> None:
    index = await catalog.register(catalog.registration(tags=["v1"]))
    (row,) = catalog.rows()
    assert row == {
        "ID": f"_nomad-task-{catalog.alloc.id}-group-g-web-http", "ServiceName": "web",
        "Namespace": "default", "NodeID": "n1", "Datacenter": "dc1", "JobID": "web",
        "AllocID": catalog.alloc.id, "Tags": ["v1"], "Address": "127.0.0.1", "Port": 20001,
        "CreateIndex": index, "ModifyIndex": index}
    # The same again changes nothing, not even an index; a change moves ModifyIndex only.
    assert await catalog.register(catalog.registration(tags=["v1"])) == index
    assert catalog.rows() == [row]
    changed = await catalog.register(catalog.registration(tags=["v2"]))
    (row,) = catalog.rows()
    assert (row["Tags"], row["CreateIndex"], row["ModifyIndex"]) == (["v2"], index, changed)


@pytest.mark.parametrize(("case", "status", "message"), [
    ("another node's allocation", 403, "is not placed on this node"),
    ("an ID of another allocation", 403, "is not one of allocation"),
    ("an unknown allocation", 404, "not found"),
    ("a stopped allocation", 403, "is terminal"),
    ("a wildcard address", 400, "invalid service registration address"),
    ("a port out of range", 400, "invalid service registration port"),
    ("a name with a newline", 400, "invalid service registration name"),
])
async def test_registrations_a_node_may_not_make(catalog: Catalog, case: str, status: int,
                                                 message: str) -> None:
    target, registration = catalog.alloc, catalog.registration()
    if case == "another node's allocation":
        target = make_alloc(node_id="n2")
        await seed(catalog.server, allocs=(target,))
        registration = catalog.registration(alloc=target)
    elif case == "an ID of another allocation":
        registration = catalog.registration(alloc=make_alloc())
    elif case == "an unknown allocation":
        target = make_alloc(node_id="n1")
        registration = catalog.registration(alloc=target)
    elif case == "a stopped allocation":
        target = make_alloc(node_id="n1", desired_status="stop")
        await seed(catalog.server, allocs=(target,))
        registration = catalog.registration(alloc=target)
    elif case == "a wildcard address":
        registration["Address"] = "0.0.0.0"
    elif case == "a port out of range":
        registration["Port"] = 70000
    else:
        registration["ServiceName"] = "web\nx"
    with pytest.raises(ServiceError) as info:
        await catalog.register(registration, alloc=target)
    assert info.value.status == status and message in info.value.message
    assert catalog.rows() == []


async def test_only_the_node_itself_may_register_or_deregister(catalog: Catalog) -> None:
    with pytest.raises(PermissionError):
        await catalog.register(catalog.registration(), secret="guessed")
    await catalog.register(catalog.registration("a"), catalog.registration("b"))
    a_id, b_id = (r["ID"] for r in catalog.rows())
    with pytest.raises(PermissionError):
        await catalog.rpc.service_registration_delete("n1", "guessed", catalog.alloc.id, None)
    # Another node (with its own secret) removes nothing of n1's.
    await catalog.rpc.service_registration_delete("n2", "another-secret", catalog.alloc.id,
                                                  None)
    assert len(catalog.rows()) == 2
    await catalog.rpc.service_registration_delete("n1", NODE_SECRET, catalog.alloc.id,
                                                  [a_id, "unknown-is-fine"])
    assert [r["ID"] for r in catalog.rows()] == [b_id]
    await catalog.rpc.service_registration_delete("n1", NODE_SECRET, catalog.alloc.id, None)
    assert catalog.rows() == []


@pytest.mark.parametrize("how", ["client reports it complete", "job stopped",
                                 "job purged"])
async def test_registrations_go_when_their_allocation_stops(keyring: Keyring, how: str
                                                            ) -> None:
    server = make_server(keyring)
    await server.register_node(node("n1", secret_id=NODE_SECRET))
    await server.register_job({"ID": "web", "Datacenters": ["dc*"], "TaskGroups": [
        {"Name": "g", "Count": 2, "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}]})
    catalog = Catalog(server, ServerRPC(InProcessTransport(server)), server.job_allocs("web")[0])
    other = server.job_allocs("web")[1]
    await catalog.register(catalog.registration("web"))
    await catalog.register(catalog.registration("web", alloc=other), alloc=other)
    assert len(catalog.rows()) == 2
    if how == "client reports it complete":
        await server.update_allocs_from_client([AllocUpdate(
            id=catalog.alloc.id, client_status="complete", client_description="",
            task_states={})])
        await wait_until(lambda: [r["AllocID"] for r in catalog.rows()] == [other.id],
                         "the finished allocation's registration to go")
    else:
        await server.deregister_job("web", purge=how == "job purged")
        await wait_until(lambda: catalog.rows() == [], "every registration of the job to go")
    await server.close()


async def test_registrations_are_persisted_and_stale_ones_go_after_a_restart(
        keyring: Keyring, tmp_path: Path) -> None:
    db = await StateDB.open(tmp_path / "state.db")
    server = Server(StateStore(db, SEALER), keyring, region="global", acl_enabled=False)
    catalog = await catalog_on(server)
    live = make_alloc(node_id="n1")
    await seed(server, allocs=(live,))
    await catalog.register(catalog.registration("stale"))
    await catalog.register(catalog.registration("live", alloc=live), alloc=live)
    await server.close()
    # One allocation stops while no registry watches (as an older agent could leave it).
    store = await StateStore.restore(db, SEALER)
    await store.write({"allocs": [(catalog.alloc.id,
                                   attrs.evolve(catalog.alloc, desired_status="stop"))]})

    server = Server(await StateStore.restore(db, SEALER), keyring, region="global",
                    acl_enabled=False)
    assert names(server) == ["live", "stale"]
    await server.register_node(node("n3"))  # the next write: the stale one goes after it
    await wait_until(lambda: names(server) == ["live"],
                     "the stopped allocation's registration to go")
    await server.close()
    await db.close()


# ---- checks ------------------------------------------------------------------------------------
def spec(port: int, check_type: str = "http", path: str = "/", **changes: Any) -> CheckSpec:
    fields: dict[str, Any] = dict(
        id="c1", alloc_id="a1", alloc_name="web.g[0]", task="", service="web", name="alive",
        type=check_type, address="127.0.0.1", port=port, path=path, method="GET",
        interval=1.0, timeout=2.0)
    return CheckSpec(**(fields | changes))


@pytest.fixture
async def http_service() -> AsyncIterator[int]:
    """A local HTTP service: ``/ok`` 200, ``/accepted`` 202 with a body, ``/broken`` 503
    with a long body, ``/moved`` a redirect to ``/ok``, ``/slow`` only once the test ends."""
    released = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/ok":
            return web.Response(text="fine")
        if request.path == "/accepted":
            return web.Response(status=202, text="queued")
        if request.path == "/moved":
            raise web.HTTPFound("/ok")
        if request.path == "/slow":
            await released.wait()
        return web.Response(status=503, text="x" * 10_000)

    server = web.Server(answer)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    released.set()
    await runner.cleanup()


async def test_http_checks_pass_on_2xx_and_never_follow_a_redirect(http_service: int) -> None:
    ok = await probe(spec(http_service, path="/ok"))
    assert (ok.status, ok.output, ok.status_code) == (SUCCESS, "nomad: http ok", 200)
    accepted = await probe(spec(http_service, path="accepted"))  # a relative path is fine
    assert (accepted.status, accepted.output) == (SUCCESS, "queued")
    broken = await probe(spec(http_service, path="/broken"))
    assert (broken.status, broken.status_code) == (FAILURE, 503)
    assert broken.output == "x" * 3072  # truncated
    moved = await probe(spec(http_service, path="/moved"))
    assert (moved.status, moved.status_code) == (FAILURE, 302)
    slow = await probe(spec(http_service, path="/slow", timeout=0.2))
    assert (slow.status, slow.output) == (FAILURE, "nomad: timed out after 0.2s")


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A local port nothing listens on (bound but not listening, for the duration)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_tcp_checks_pass_when_a_connection_opens(http_service: int) -> None:
    assert (await probe(spec(http_service, "tcp"))).output == "nomad: tcp ok"
    with closed_port() as port:
        refused = await probe(spec(port, "tcp"))
    assert refused.status == FAILURE and refused.output.startswith("nomad: ")


async def test_a_check_runner_owns_its_checks_and_their_results(http_service: int) -> None:
    results = CheckResults()
    runner = CheckRunner(results)
    await runner.start("group-g", [spec(http_service, path="/ok", interval=0.05)])
    (first,) = results.for_alloc("a1").values()  # type: ignore[union-attr]
    assert first["Status"] == PENDING
    await wait_until(lambda: results.for_alloc("a1")["c1"]["Status"] == SUCCESS,  # type: ignore[index]
                     "the first probe")
    result = results.for_alloc("a1")["c1"]  # type: ignore[index]
    assert {k: result[k] for k in ("ID", "Mode", "Group", "Service", "Check", "StatusCode",
                                   "CheckName", "ServiceName", "AllocID")} == {
        "ID": "c1", "Mode": "healthiness", "Group": "web.g[0]", "Service": "web",
        "Check": "alive", "StatusCode": 200, "CheckName": "alive", "ServiceName": "web",
        "AllocID": "a1"}
    assert "Task" not in result  # a group's service
    await runner.stop("group-g")
    assert results.for_alloc("a1") is None


# ---- the service hook, with a real client ------------------------------------------------------
@pytest.fixture
async def agent(workdir: Path, keyring: Keyring) -> AsyncIterator[InProcessAgent]:
    started = await start_agent(workdir, keyring)
    yield started
    await started.stop()


def hook_job(run_for: str = "1h", restart_delay: int = 0) -> dict[str, Any]:
    check = {"Type": "tcp", "Interval": S, "Timeout": S}
    return canonicalize_job({"ID": "web", "Datacenters": ["dc1"], "TaskGroups": [{
        "Name": "g", "Networks": NETWORK,
        "RestartPolicy": {"Attempts": 3, "Interval": 60 * S, "Delay": restart_delay,
                          "Mode": "fail"},
        "Services": [{"Provider": "nomad", "PortLabel": "http", "Tags": ["v1"],
                      "Checks": [check]}],
        "Tasks": [{"Name": "t", "Driver": "mock_driver", "Config": {"run_for": run_for},
                   "Services": [{"Provider": "nomad", "Name": "admin", "PortLabel": "9090"}]},
                  {"Name": "sidecar", "Driver": "mock_driver",
                   "Config": {"run_for": "1h"}}]}]})


async def test_services_follow_their_tasks_and_allocation(agent: InProcessAgent) -> None:
    server, client = agent.server, agent.client
    assert client is not None
    await server.register_job(hook_job())
    await wait_until(lambda: names(server) == ["admin", "web-g"], "both registrations")
    (alloc,) = server.job_allocs("web")
    (port,) = alloc.allocated_resources["Shared"]["Ports"]
    group_service = next(r for r in server.services.all() if r["ServiceName"] == "web-g")
    assert (group_service["Address"], group_service["Port"]) == (port["HostIP"], port["Value"])
    assert group_service["ID"] == f"_nomad-task-{alloc.id}-group-g-web-g-http"
    admin = next(r for r in server.services.all() if r["ServiceName"] == "admin")
    assert (admin["Port"], admin["ID"]) == (9090, f"_nomad-task-{alloc.id}-t-admin-9090")
    # Nothing listens on the allocated port (a mock task): its tcp check fails.
    await wait_until(lambda: any(c["Status"] == FAILURE
                                 for c in (client.alloc_checks(alloc.id) or {}).values()),
                     "the check's first probe")

    await server.deregister_job("web", purge=False)
    await wait_until(lambda: names(server) == [], "the registrations to go")
    await wait_until(lambda: client.alloc_checks(alloc.id) is None, "the checks to stop")


async def test_a_task_that_exits_takes_its_services_along_until_it_runs_again(
        agent: InProcessAgent) -> None:
    server = agent.server
    await server.register_job(hook_job(run_for="300ms", restart_delay=S))
    await wait_until(lambda: names(server) == ["admin", "web-g"], "both registrations")
    # "t" exits and waits a second to restart: meanwhile its service is gone, the group's
    # stays (its other task runs on); then it is back.
    await wait_until(lambda: names(server) == ["web-g"], "the exited task's service to go")
    await wait_until(lambda: names(server) == ["admin", "web-g"], "it back with its task")


# ---- the service hook alone, with a catalog that can fail ---------------------------------------
@attrs.define
class FakeCatalog:
    """The servers' catalog as the hook sees it; the next ``failures`` registrations fail."""

    held: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    failures: int = 0
    attempts: int = 0

    async def register_services(self, alloc_id: str,
                                registrations: Sequence[Mapping[str, Any]]) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("no servers")
        self.held.update({r["ID"]: dict(r) for r in registrations})

    async def deregister_services(self, alloc_id: str, ids: Sequence[str]) -> None:
        for reg_id in ids:
            self.held.pop(reg_id, None)


PORTS = {"Shared": {"Ports": [{"Label": "http", "Value": 23456, "To": 0,
                               "HostIP": "10.1.2.3"}]}}
NODE_VIEW = NodeView(id="n", name="n", datacenter="dc1", region="global", node_class="",
                     pool="default", attributes={"unique.network.ip-address": "10.1.2.3"},
                     meta={})


@attrs.define
class HookSetup:
    hook: ServiceHook
    catalog: FakeCatalog
    results: CheckResults
    contexts: dict[str, TaskContext]
    events: list[TaskEvent]

    async def start(self, task: str) -> None:
        """The task starts: ``task_starting``, then its driver handle appears."""
        ctx = self.contexts[task]
        await self.hook.task_starting(ctx)
        ctx.handle.set(TaskHandle(driver="mock_driver", alloc_id=ctx.alloc.id, task=task,
                                  pid=1, create_time=0.0, started_at=0.0))

    def ids(self) -> list[str]:
        return sorted(self.catalog.held)


@pytest.fixture
async def hooked(tmp_path: Path) -> AsyncIterator[HookSetup]:
    alloc = make_alloc(job=hook_job(), job_id="web", task_group="g", name="web.g[0]",
                       allocated_resources=PORTS)
    adir = AllocDir(tmp_path / "alloc", alloc.id)
    adir.build()
    events: list[TaskEvent] = []
    contexts = {task["Name"]: TaskContext(
        alloc=alloc, task=task, alloc_dir=adir, task_dir=adir.build_task_dir(task["Name"], None),
        node=NODE_VIEW, emit=events.append, log=logging.getLogger("test"))
        for task in alloc.job["TaskGroups"][0]["Tasks"]}
    catalog, results = FakeCatalog(), CheckResults()
    hook = ServiceHook(AllocHookDeps(alloc=alloc, alloc_dir=adir, task_api=None,
                                     log=logging.getLogger("test")),
                       catalog=catalog, checks=results)
    yield HookSetup(hook, catalog, results, contexts, events)
    await hook.destroy()


GROUP_ID = "group-g-web-g-http"
TASK_ID = "t-admin-9090"


async def test_the_hook_registers_at_the_allocation_port_once_the_task_runs(
        hooked: HookSetup) -> None:
    alloc_id = hooked.contexts["t"].alloc.id
    await hooked.hook.task_starting(hooked.contexts["t"])
    await settle()
    assert hooked.ids() == []  # no driver handle yet: not running
    hooked.contexts["t"].handle.set(TaskHandle(driver="mock_driver", alloc_id=alloc_id,
                                               task="t", pid=1, create_time=0.0,
                                               started_at=0.0))
    await wait_until(lambda: len(hooked.ids()) == 2, "both registrations")
    prefix = f"_nomad-task-{alloc_id}-"
    assert hooked.catalog.held[prefix + GROUP_ID] == {
        "ID": prefix + GROUP_ID, "ServiceName": "web-g", "Tags": ["v1"],
        "Address": "10.1.2.3", "Port": 23456}
    assert hooked.catalog.held[prefix + TASK_ID]["Port"] == 9090
    (check,) = hooked.results.for_alloc(alloc_id).values()  # type: ignore[union-attr]
    assert (check["Status"], check["Group"], check["Service"]) == (PENDING, "web.g[0]",
                                                                   "web-g")

    # A second task starting registers nothing twice; its exit leaves the group's.
    await hooked.start("sidecar")
    await settle()
    assert hooked.catalog.attempts == 2
    await hooked.hook.task_exited(hooked.contexts["t"], ExitResult(exit_code=0), True)
    assert hooked.ids() == [prefix + GROUP_ID]
    # The allocation is told to stop: everything goes, before its tasks are killed.
    await hooked.hook.update(attrs.evolve(hooked.contexts["t"].alloc, desired_status="stop"))
    assert hooked.ids() == [] and hooked.results.for_alloc(alloc_id) is None


async def test_a_failed_registration_is_retried_and_told_once(hooked: HookSetup) -> None:
    hooked.catalog.failures = 3
    await hooked.start("t")
    await wait_until(lambda: len(hooked.ids()) == 2, "the registrations, after retries")
    told = [e.display_message for e in hooked.events]
    # One event per workload whose registration failed (the group's and the task's).
    assert told == ["Service registration failed, retrying: no servers"] * 2


async def test_an_agent_shutdown_keeps_the_registrations(hooked: HookSetup) -> None:
    await hooked.start("t")
    await wait_until(lambda: len(hooked.ids()) == 2, "both registrations")
    await hooked.hook.shutdown()
    assert len(hooked.ids()) == 2
    assert hooked.results.for_alloc(hooked.contexts["t"].alloc.id) is None  # checks stopped


async def test_a_port_the_allocation_lacks_is_told_to_the_task(hooked: HookSetup) -> None:
    alloc = attrs.evolve(hooked.contexts["t"].alloc, allocated_resources={})
    await hooked.hook.update(alloc)
    await hooked.start("t")
    await wait_until(lambda: hooked.ids(), "the task's own service (a numeric port)")
    assert [r["ServiceName"] for r in hooked.catalog.held.values()] == ["admin"]
    assert [e.display_message for e in hooked.events] == [
        "Services not registered: the allocation has no port 'http'"]
