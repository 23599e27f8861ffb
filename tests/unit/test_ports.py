"""Group networks and ports: the jobspec (HCL with lines, JSON validation), the scheduler's
port bookkeeping, the task's port variables and the CLI's addresses table."""

from __future__ import annotations

import random
import textwrap
from typing import Any

import attrs
import pytest

from nomad_client.cli.alloc import _addresses
from nomad_client.client.taskenv import TaskEnvInput, build_task_env, port_env
from nomad_client.jobspec import JobspecError, JobValidationError, canonicalize_job, parse_jobspec
from nomad_client.server.keyring import Keyring
from nomad_client.server.ports import DYNAMIC_PORT_FAILED, RESERVED_PORT_COLLISION
from nomad_client.server.scheduler import PlacementPlan, plan_job
from nomad_client.structs.codec import from_rpc, msgpack_roundtrip, to_api, to_rpc
from nomad_client.structs.models import Allocation, AllocUpdate, Node
from nomad_client.structs.network import NODE_ADDRESS_ATTRIBUTE, AllocatedPort, allocated_ports
from tests.unit.factories import make_server, node
from tests.unit.test_taskenv import NODE, make_input


def parse(src: str) -> dict[str, Any]:
    return parse_jobspec(textwrap.dedent(src), "ports.nomad.hcl")


def group_job(network: str) -> str:
    """A one-group job whose group holds ``network`` (HCL) from line 3 on."""
    return (
        'job "web" {\n'
        '  group "g" {\n'
        f"{textwrap.indent(textwrap.dedent(network).strip(), '    ')}\n"
        '    task "t" {\n'
        '      driver = "raw_exec"\n'
        "    }\n"
        "  }\n"
        "}\n"
    )


def parse_error(network: str) -> JobspecError:
    with pytest.raises(JobspecError) as info:
        parse(group_job(network))
    return info.value


def validation_problems(networks: Any) -> tuple[str, ...]:
    job = {"ID": "web", "TaskGroups": [
        {"Name": "g", "Networks": networks, "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}]}
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(job)
    return info.value.problems


# ---- jobspec -----------------------------------------------------------------------------
def test_network_block_decodes_to_nomads_api_shape() -> None:
    job = parse(group_job("""
        network {
          mode = "host"
          port "http" {
            static = 8080
            to     = 80
          }
          port "db" {}
          port "admin" {
            to           = -1
            host_network = "default"
          }
        }
    """))
    assert job["TaskGroups"][0]["Networks"] == [{
        "Mode": "host",
        "ReservedPorts": [{"Label": "http", "Value": 8080, "To": 80}],
        "DynamicPorts": [{"Label": "db", "Value": 0, "To": 0},
                         {"Label": "admin", "Value": 0, "To": -1, "HostNetwork": "default"}],
    }]
    canonical = canonicalize_job(job)
    assert canonical["TaskGroups"][0]["Networks"] == job["TaskGroups"][0]["Networks"]


def test_a_network_with_only_a_mode_is_filled_in() -> None:
    job = parse(group_job('network { mode = "none" }'))
    assert canonicalize_job(job)["TaskGroups"][0]["Networks"] == [
        {"Mode": "none", "ReservedPorts": [], "DynamicPorts": []}]
    bare = canonicalize_job(parse(group_job("network {}")))
    assert bare["TaskGroups"][0]["Networks"] == [
        {"Mode": "host", "ReservedPorts": [], "DynamicPorts": []}]


def test_a_group_without_a_network_has_none() -> None:
    job = parse(group_job(""))
    assert "Networks" not in job["TaskGroups"][0]
    assert canonicalize_job(job)["TaskGroups"][0]["Networks"] == []


@pytest.mark.parametrize(("network", "line", "message"), [
    ("""
     network {
       port "http" {}
       port "http" {}
     }""", 5, "port label 'http' already in use by the group network (first at line 4)"),
    ("""
     network {
       port "a" { static = 8080 }
       port "b" {
         static = 8080
       }
     }""", 6, "static port 8080 already reserved by port 'a'"),
    ("""
     network {
       port "http" {
         static = 70000
       }
     }""", 5, "port 'http': static must be between 1 and 65535, got 70000"),
    ("""
     network {
       port "http" { static = 0 }
     }""", 4, "static must be between 1 and 65535, got 0"),
    ("""
     network {
       port "http" {
         to = -2
       }
     }""", 5, "port 'http': to must be between -1 and 65535, got -2"),
    ("""
     network {
       port "my-port" {}
     }""", 4, "invalid port label 'my-port'"),
    ("""
     network {
       port "1st" {}
     }""", 4, "invalid port label '1st'"),
    ("""
     network {
       mode = "bridge"
     }""", 4, "unsupported network mode 'bridge' (expected one of host, none)"),
    ("""
     network {
       port "http" { host_network = "public" }
     }""", 4, "host_network 'public' is not supported"),
    ("""
     network {
       port "http" { ignore_collision = true }
     }""", 4, "unknown attribute 'ignore_collision'"),
    ("""
     network {}
     network {}""", 4, "only one network block is allowed (first at line 3)"),
    ("""
     network "n" {}""", 3, "the network block takes no label"),
    ("""
     network {
       port {}
     }""", 4, "missing label"),
])
def test_network_errors_name_the_file_and_line(network: str, line: int, message: str) -> None:
    err = parse_error(network)
    assert (err.filename, err.line) == ("ports.nomad.hcl", line)
    assert message in str(err)
    assert str(err).startswith(f"ports.nomad.hcl:{line}: job.group[g].network")


def test_json_networks_are_filled_and_accepted() -> None:
    job = {"ID": "web", "TaskGroups": [{
        "Name": "g", "Tasks": [{"Name": "t", "Driver": "raw_exec"}],
        "Networks": [{"ReservedPorts": [{"Label": "http", "Value": 8080}],
                      "DynamicPorts": [{"Label": "db", "HostNetwork": "default"}],
                      "MBits": 0}]}]}
    (network,) = canonicalize_job(job)["TaskGroups"][0]["Networks"]
    assert network["Mode"] == "host"
    assert network["ReservedPorts"] == [{"Label": "http", "Value": 8080, "To": 0}]
    assert network["DynamicPorts"] == [
        {"Label": "db", "Value": 0, "To": 0, "HostNetwork": "default"}]


@pytest.mark.parametrize(("networks", "problem"), [
    ("host", "Networks must be a list"),
    ([{}, {}], "only one network block is allowed in a task group"),
    (["host"], "each network must be an object"),
    ([{"Mode": "bridge"}], "unsupported network mode 'bridge'"),
    ([{"DynamicPorts": {"Label": "a"}}], "DynamicPorts must be a list of objects"),
    ([{"DynamicPorts": [{"Label": "a"}, {"Label": "a"}]}],
     "port label 'a' already in use by the group network"),
    ([{"ReservedPorts": [{"Label": "a", "Value": 1}], "DynamicPorts": [{"Label": "a"}]}],
     "port label 'a' already in use by the group network"),
    ([{"ReservedPorts": [{"Label": "a", "Value": 80}, {"Label": "b", "Value": 80}]}],
     "static port 80 already reserved by port 'a'"),
    ([{"ReservedPorts": [{"Label": "a", "Value": 65536}]}],
     "port 'a': static must be between 1 and 65535, got 65536"),
    ([{"ReservedPorts": [{"Label": "a"}]}], "port 'a': static must be between 1 and 65535"),
    ([{"ReservedPorts": [{"Label": "a", "Value": "80"}]}], "static must be between 1 and"),
    ([{"DynamicPorts": [{"Label": "a", "Value": 20001}]}],
     "dynamic port 'a': Value must be 0 (the scheduler picks it)"),
    ([{"DynamicPorts": [{"Label": "a", "To": 70000}]}], "to must be between -1 and 65535"),
    ([{"DynamicPorts": [{"Label": "a", "To": True}]}], "to must be between -1 and 65535"),
    ([{"DynamicPorts": [{"Value": 0}]}], "invalid port label None"),
    ([{"DynamicPorts": [{"Label": "a b"}]}], "invalid port label 'a b'"),
    ([{"DynamicPorts": [{"Label": "a", "HostNetwork": "public"}]}],
     "host_network 'public' is not supported"),
    ([{"ReservedPorts": [{"Label": "a", "Value": 80, "IgnoreCollision": True}]}],
     "IgnoreCollision is not supported"),
])
def test_json_networks_are_validated(networks: Any, problem: str) -> None:
    problems = validation_problems(networks)
    assert any(problem in p and p.startswith("group 'g' network: ") for p in problems), problems


# ---- scheduler ---------------------------------------------------------------------------
def port_job(count: int = 1, *, reserved: tuple[tuple[str, int, int], ...] = (),
             dynamic: tuple[tuple[str, int], ...] = (), job_id: str = "web") -> dict[str, Any]:
    """A canonical service job: group "g" runs ``count`` copies, asking for ``reserved``
    (label, static, to) and ``dynamic`` (label, to) ports."""
    network = {"Mode": "host",
               "ReservedPorts": [{"Label": lbl, "Value": v, "To": to} for lbl, v, to in reserved],
               "DynamicPorts": [{"Label": lbl, "Value": 0, "To": to} for lbl, to in dynamic]}
    return canonicalize_job({"ID": job_id, "Datacenters": ["dc*"], "TaskGroups": [{
        "Name": "g", "Count": count, "Networks": [network],
        "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}]})


def port_node(node_id: str = "n1", address: str = "10.0.0.7",
              resources: dict[str, int] | None = None) -> Node:
    """A ready node reached at ``address``, with ``resources`` (its dynamic port range)."""
    return node(node_id, attributes={"kernel.name": "linux", NODE_ADDRESS_ATTRIBUTE: address},
                node_resources=resources or {})


def plan(job: dict[str, Any], nodes: list[Node], existing: list[Allocation] | None = None,
         others: list[Allocation] | None = None, seed: int = 7) -> PlacementPlan:
    return plan_job(job, "e1", nodes, existing or [], others or [], rng=random.Random(seed))


def host_ports(alloc: Allocation) -> list[int]:
    return sorted(p.value for p in allocated_ports(alloc.allocated_resources))


def test_a_new_allocation_gets_its_static_and_dynamic_ports() -> None:
    (alloc,) = plan(port_job(reserved=(("http", 8080, 80),), dynamic=(("db", 0),)),
                    [port_node()]).new_allocs
    shared = alloc.allocated_resources["Shared"]
    (db_port,) = [p["Value"] for p in shared["Ports"] if p["Label"] == "db"]
    assert 20000 <= db_port <= 32000
    assert shared["Ports"] == [
        {"Label": "http", "Value": 8080, "To": 80, "HostIP": "10.0.0.7"},
        {"Label": "db", "Value": db_port, "To": 0, "HostIP": "10.0.0.7"}]
    assert shared["Networks"] == [{
        "Mode": "host", "IP": "10.0.0.7",
        "ReservedPorts": [{"Label": "http", "Value": 8080, "To": 80}],
        "DynamicPorts": [{"Label": "db", "Value": db_port, "To": 0}]}]
    # The API form carries it under Nomad's name.
    assert to_api(alloc)["AllocatedResources"] == alloc.allocated_resources
    assert from_rpc(msgpack_roundtrip(to_rpc(alloc)), Allocation) == alloc


def test_groups_without_a_network_get_no_resources() -> None:
    job = canonicalize_job({"ID": "web", "TaskGroups": [
        {"Name": "g", "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}]})
    (alloc,) = plan(job, [port_node()]).new_allocs
    assert alloc.allocated_resources == {}
    assert "AllocatedResources" in to_api(alloc)


def test_dynamic_ports_come_from_the_nodes_range_at_random() -> None:
    job = port_job(dynamic=(("a", 0), ("b", -1)))
    small = port_node(resources={"MinDynamicPort": 40000, "MaxDynamicPort": 40009})
    (alloc,) = plan(job, [small]).new_allocs
    ports = allocated_ports(alloc.allocated_resources)
    assert all(40000 <= p.value <= 40009 for p in ports)
    assert len({p.value for p in ports}) == 2
    # to = -1: the task uses the host port itself.
    assert {p.label: p.to for p in ports}["b"] == {p.label: p.value for p in ports}["b"]
    # Seeded: the same picks; another seed: others (random, not first-free).
    again = plan(job, [small]).new_allocs[0]
    assert host_ports(again) == host_ports(alloc)
    picks = {tuple(host_ports(plan(job, [port_node()], seed=s).new_allocs[0]))
             for s in range(5)}
    assert len(picks) == 5


def test_a_bad_node_range_falls_back_to_the_default() -> None:
    job = port_job(dynamic=(("a", 0),))
    for bad in ({"MinDynamicPort": 30000, "MaxDynamicPort": 20000},
                {"MinDynamicPort": 0, "MaxDynamicPort": 70000}, {"MinDynamicPort": 20000}):
        (alloc,) = plan(job, [port_node(resources=bad)]).new_allocs
        assert 20000 <= host_ports(alloc)[0] <= 32000


def test_no_two_live_allocations_on_a_node_share_a_port() -> None:
    # Ten ports for five allocations of two ports each: every port of the range is used once.
    tight = port_node(resources={"MinDynamicPort": 21000, "MaxDynamicPort": 21009})
    job = port_job(5, dynamic=(("a", 0), ("b", 0)))
    first = plan(job, [tight]).new_allocs
    ports = [port for alloc in first for port in host_ports(alloc)]
    assert sorted(ports) == list(range(21000, 21010))
    # Another job on the same node finds nothing left, and says so.
    other = port_job(dynamic=(("x", 0),), job_id="other")
    blocked = plan(other, [tight], others=list(first))
    assert not blocked.new_allocs
    metric = blocked.failed_groups["g"]
    assert metric.nodes_exhausted == 1
    assert metric.dimension_exhausted == {DYNAMIC_PORT_FAILED: 1}
    assert blocked.queued == {"g": 1}


def test_ports_of_other_jobs_and_earlier_allocations_are_avoided() -> None:
    n1 = port_node(resources={"MinDynamicPort": 22000, "MaxDynamicPort": 22003})
    job = port_job(2, dynamic=(("a", 0),))
    (first,) = plan(port_job(dynamic=(("a", 0),)), [n1]).new_allocs
    holder = attrs.evolve(first, job_id="other", id="other-alloc", client_status="running")
    placed = plan(job, [n1], others=[holder]).new_allocs
    assert len(placed) == 2
    used = [host_ports(holder)[0], *(host_ports(a)[0] for a in placed)]
    assert len(set(used)) == 3


def test_a_static_port_taken_on_every_node_is_not_placed() -> None:
    web = port_job(reserved=(("http", 8080, 0),))
    (holder,) = plan(port_job(reserved=(("http", 8080, 0),), job_id="other"),
                     [port_node()]).new_allocs
    result = plan(web, [port_node()], others=[holder])
    assert not result.new_allocs
    metric = result.failed_groups["g"]
    assert metric.dimension_exhausted == {f"{RESERVED_PORT_COLLISION} http=8080": 1}
    assert (metric.nodes_evaluated, metric.nodes_exhausted, metric.nodes_filtered) == (1, 1, 0)
    assert result.queued == {"g": 1}
    # The API names the dimension as Nomad does.
    assert to_api(metric)["DimensionExhausted"] == {"network: reserved port collision http=8080": 1}
    # Another node with the port free takes it.
    (alloc,) = plan(web, [port_node(), port_node("n2")], others=[holder]).new_allocs
    assert alloc.node_id == "n2"


def test_a_static_port_fits_once_per_node() -> None:
    result = plan(port_job(3, reserved=(("http", 8080, 0),)), [port_node(), port_node("n2")])
    assert sorted(a.node_id for a in result.new_allocs) == ["n1", "n2"]
    metric = result.failed_groups["g"]
    assert metric.nodes_exhausted == 2 and metric.coalesced_failures == 0
    assert result.queued == {"g": 1}
    four = plan(port_job(4, reserved=(("http", 8080, 0),)), [port_node()])
    assert len(four.new_allocs) == 1
    assert four.queued == {"g": 3} and four.failed_groups["g"].coalesced_failures == 2


@pytest.mark.parametrize(("status", "held"), [
    ("pending", True), ("running", True), ("complete", False), ("failed", False),
    ("lost", False)])
def test_only_allocations_that_may_still_run_hold_their_ports(status: str, held: bool) -> None:
    web = port_job(reserved=(("http", 8080, 0),))
    (holder,) = plan(port_job(reserved=(("http", 8080, 0),), job_id="other"),
                     [port_node()]).new_allocs
    # A stopped allocation holds its ports until its client says it is done: its process
    # may still be bound to them.
    holder = attrs.evolve(holder, client_status=status, desired_status="stop")
    result = plan(web, [port_node()], others=[holder])
    assert bool(result.failed_groups) is held
    assert len(result.new_allocs) == (0 if held else 1)


async def test_a_group_waiting_for_a_port_is_placed_once_it_is_freed(
        keyring: Keyring) -> None:
    server = make_server(keyring)
    await server.register_node(port_node("n1", "127.0.0.1"))
    await server.register_job(port_job(reserved=(("http", 8080, 0),), job_id="first"))
    (first,) = server.job_allocs("first")
    await server.register_job(port_job(reserved=(("http", 8080, 0),), job_id="second"))
    assert server.job_allocs("second") == []
    (evaluation,) = server.job_evaluations("second")
    assert to_api(evaluation)["FailedTGAllocs"]["g"]["DimensionExhausted"] == {
        "network: reserved port collision http=8080": 1}
    await server.update_allocs_from_client(
        [AllocUpdate(first.id, "running", "", {})])
    assert server.job_allocs("second") == []  # still running: still holds the port
    await server.update_allocs_from_client(
        [AllocUpdate(first.id, "complete", "", {})])
    (second,) = server.job_allocs("second")
    assert allocated_ports(second.allocated_resources) == (
        AllocatedPort("http", 8080, 0, "127.0.0.1"),)


# ---- task environment --------------------------------------------------------------------
def test_port_variables_follow_nomads_rules() -> None:
    env = port_env([AllocatedPort("http", 8080, 80, "10.0.0.7"),
                    AllocatedPort("db", 23456, 0, "10.0.0.7")])
    assert env == {
        # NOMAD_PORT_ is the port the task listens on ("to" when set); the addresses are the
        # host's, with the host port even when "to" is set (as Nomad's).
        "NOMAD_PORT_http": "80", "NOMAD_ALLOC_PORT_http": "80",
        "NOMAD_HOST_PORT_http": "8080", "NOMAD_IP_http": "10.0.0.7",
        "NOMAD_HOST_IP_http": "10.0.0.7", "NOMAD_ADDR_http": "10.0.0.7:8080",
        "NOMAD_HOST_ADDR_http": "10.0.0.7:8080",
        "NOMAD_PORT_db": "23456", "NOMAD_ALLOC_PORT_db": "23456",
        "NOMAD_HOST_PORT_db": "23456", "NOMAD_IP_db": "10.0.0.7",
        "NOMAD_HOST_IP_db": "10.0.0.7", "NOMAD_ADDR_db": "10.0.0.7:23456",
        "NOMAD_HOST_ADDR_db": "10.0.0.7:23456",
    }
    assert port_env([AllocatedPort("v6", 9000, 0, "::1")])["NOMAD_ADDR_v6"] == "[::1]:9000"


def test_every_task_of_the_allocation_gets_the_port_variables() -> None:
    (alloc,) = plan(port_job(reserved=(("http", 8080, 80),)), [port_node()]).new_allocs
    for task in ("web", "sidecar"):
        inp: TaskEnvInput = make_input(task=task, allocated_resources=alloc.allocated_resources,
                                       task_env={"LISTEN": "${NOMAD_IP_http}:${NOMAD_PORT_http}"})
        env = build_task_env(inp, NODE, {})
        assert env["NOMAD_PORT_http"] == "80"
        assert env["NOMAD_ADDR_http"] == "10.0.0.7:8080"
        assert env["LISTEN"] == "10.0.0.7:80"  # interpolation sees them
    # The task's own env block still has the last word.
    env = build_task_env(make_input(allocated_resources=alloc.allocated_resources,
                                    task_env={"NOMAD_PORT_http": "9"}), NODE, {})
    assert env["NOMAD_PORT_http"] == "9"
    assert not any(k.startswith("NOMAD_PORT_") for k in build_task_env(make_input(), NODE, {}))


# ---- CLI ---------------------------------------------------------------------------------
def test_alloc_status_shows_the_allocation_addresses() -> None:
    (alloc,) = plan(port_job(reserved=(("http", 8080, 80),), dynamic=(("db", 0),)),
                    [port_node()]).new_allocs
    db = {p.label: p.value for p in allocated_ports(alloc.allocated_resources)}["db"]
    lines = _addresses(to_api(alloc)).splitlines()
    assert lines[0] == 'Allocation Addresses (mode = "host"):'
    assert lines[1].split() == ["Label", "Dynamic", "Address"]
    assert lines[2].split() == ["*db", "yes", f"10.0.0.7:{db}"]
    assert lines[3].split() == ["*http", "no", "10.0.0.7:8080", "->", "80"]
    assert _addresses(to_api(attrs.evolve(alloc, allocated_resources={}))) == ""
