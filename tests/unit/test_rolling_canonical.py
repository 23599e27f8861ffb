"""Rolling updates compare canonical groups: an allocation placed by an older agent carries its
job as that agent filled it in, and a default added since must not make it outdated."""

from __future__ import annotations

import copy
import logging
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pytest

from nomad_client.jobspec import canonicalize_job, parse_jobspec
from nomad_client.server.keyring import Keyring
from nomad_client.server.rolling import CanonicalGroups, outdated
from nomad_client.server.scheduler import plan_job
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.structs.models import DESIRED_RUN, Allocation
from tests.unit.factories import node

SPEC = textwrap.dedent("""\
    job "web" {
      datacenters = ["dc1"]
      update { max_parallel = 1 }
      group "g" {
        count = 3
        network { port "http" {} }
        service {
          name     = "web"
          provider = "nomad"
          port     = "http"
        }
        task "t" {
          driver = "raw_exec"
          config {
            command = "/bin/sleep"
            args    = ["60"]
          }
          env { V = "1" }
          resources { memory = 64 }
        }
      }
    }
    """)
# What the server sets on a job when it stores a version of it.
STORED = {"Version": 0, "JobModifyIndex": 7, "ModifyIndex": 7, "CreateIndex": 7,
          "SubmitTime": 1_767_225_600_000_000_000, "Status": "running", "Stable": False,
          "Stop": False}


def decoded() -> dict[str, Any]:
    """The job as the HCL decoder gives it: no defaults filled."""
    return parse_jobspec(SPEC, "web.nomad.hcl")


def older_shape() -> dict[str, Any]:
    """The job as an older canonicalizer filled it: without defaults added since."""
    job = canonicalize_job(decoded())
    group = job["TaskGroups"][0]
    for key in ("EphemeralDisk", "Consul", "Disconnect", "PreventRescheduleOnLost",
                "ShutdownDelay", "Volumes"):
        del group[key]
    del group["Networks"][0]["Mode"]
    del group["Services"][0]["AddressMode"]
    task = group["Tasks"][0]
    for key in ("Identities", "TaskAPI", "KillSignal", "Lifecycle", "Kind", "LogConfig"):
        del task[key]
    return job


def changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The job's next version: canonical, with ``edit`` applied to its task."""
    job = copy.deepcopy(decoded())
    edit(job["TaskGroups"][0]["Tasks"][0])
    return canonicalize_job(job)


def placed(stored: Mapping[str, Any], count: int = 3) -> list[Allocation]:
    """``count`` allocations that run ``stored`` (a version the server stored)."""
    job = canonicalize_job(decoded())
    allocs = plan_job(job, "e", [node(datacenter="dc1")], []).new_allocs[:count]
    return [attrs.evolve(a, job={**copy.deepcopy(dict(stored)), **STORED}) for a in allocs]


class Spy:
    """Canonicalizes as the register path does, counting the calls per job version;
    ``fail``: refuses every stored job (as a newer validation could)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Any] = []
        self.fail = fail

    def __call__(self, job: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(job.get("JobModifyIndex"))
        if self.fail and "JobModifyIndex" in job:
            raise ValueError("refused: V=hunter2")
        return canonicalize_job(job)


# ---- what is outdated -----------------------------------------------------------------------
@pytest.mark.parametrize("stored", [decoded, older_shape], ids=["decoded", "older-shape"])
def test_an_unchanged_job_in_an_older_shape_is_not_outdated(
        stored: Callable[[], dict[str, Any]]) -> None:
    new = canonicalize_job(decoded())
    allocs = placed(stored())
    # As stored, the group lacks what today's canonicalizer adds...
    assert allocs[0].job["TaskGroups"][0].get("EphemeralDisk") is None
    assert new["TaskGroups"][0]["EphemeralDisk"] is not None
    # ...which is no change of what runs.
    assert outdated(new, allocs, CanonicalGroups()) == []


@pytest.mark.parametrize("edit", [
    lambda task: task["Config"].update(args=["120"]),
    lambda task: task["Env"].update(V="2"),
    lambda task: task["Resources"].update(MemoryMB=128),
    lambda task: task["Resources"].update(CPU=200),
], ids=["args", "env", "memory", "cpu"])
def test_a_change_to_what_runs_is_outdated_whatever_the_stored_shape(
        edit: Callable[[dict[str, Any]], None]) -> None:
    new = changed(edit)
    for stored in (decoded(), older_shape(), canonicalize_job(decoded())):
        assert [a.index for a in outdated(new, placed(stored), CanonicalGroups())] == [0, 1, 2]


def test_a_count_change_is_not_outdated() -> None:
    bigger = decoded()
    bigger["TaskGroups"][0]["Count"] = 5
    new = canonicalize_job(bigger)
    for stored in (decoded(), older_shape()):
        assert outdated(new, placed(stored), CanonicalGroups()) == []


def test_what_the_server_sets_never_counts() -> None:
    stored = older_shape()
    stored["TaskGroups"][0]["Scaling"] = {"ID": "policy-1", "CreateIndex": 7, "ModifyIndex": 7,
                                          "Min": 1, "Max": 5, "Enabled": True}
    new = {**canonicalize_job(decoded()), "Version": 4, "JobModifyIndex": 90,
           "ModifyIndex": 95, "CreateIndex": 7, "SubmitTime": 2_000_000_000_000_000_000,
           "Status": "pending", "StatusDescription": "", "Stable": True}
    new["TaskGroups"][0]["Scaling"] = {"ID": "policy-1", "CreateIndex": 7, "ModifyIndex": 90,
                                       "Min": 1, "Max": 9, "Enabled": True}
    assert outdated(new, placed(stored), CanonicalGroups()) == []


# ---- the cache ------------------------------------------------------------------------------
def test_each_stored_version_is_canonicalized_once() -> None:
    spy = Spy()
    groups = CanonicalGroups(canonicalize=spy)
    new = changed(lambda task: task["Env"].update(V="2"))
    allocs = placed(older_shape()) * 100  # many allocations of one version
    assert len(outdated(new, allocs, groups)) == 300
    assert outdated(new, allocs, groups)
    # The stored version once; the new job (its markers unset here) once per pass.
    assert spy.calls.count(7) == 1 and spy.calls.count(None) == 2

    newer = [attrs.evolve(a, job={**a.job, "Version": 1, "JobModifyIndex": 9})
             for a in placed(older_shape())]
    outdated(new, [*allocs, *newer], groups)
    assert spy.calls.count(9) == 1 and spy.calls.count(7) == 1


def test_an_older_row_is_named_by_its_modify_index() -> None:
    spy = Spy()
    groups = CanonicalGroups(canonicalize=spy)
    new = canonicalize_job(decoded())
    # Rows from before versions: no Version, JobModifyIndex or SubmitTime.
    old_rows = [attrs.evolve(a, job={k: v for k, v in a.job.items() if k not in (
        "Version", "JobModifyIndex", "SubmitTime")}) for a in placed(older_shape())] * 50
    assert outdated(new, old_rows, groups) == []
    assert len(spy.calls) == 2  # the stored rows once, the new job once


def test_the_cache_is_bounded() -> None:
    spy = Spy()
    groups = CanonicalGroups(size=2, canonicalize=spy)
    new = canonicalize_job(decoded())
    versions = [[attrs.evolve(a, job={**a.job, "Version": v, "JobModifyIndex": 10 + v})
                 for a in placed(older_shape(), count=1)] for v in range(3)]
    for allocs in versions:
        outdated(new, allocs, groups)
    outdated(new, versions[2], groups)  # still held
    assert spy.calls.count(12) == 1
    outdated(new, versions[0], groups)  # dropped when the third came in
    assert spy.calls.count(10) == 2


def test_a_stored_job_that_no_longer_canonicalizes_is_compared_as_stored(
        caplog: pytest.LogCaptureFixture) -> None:
    spy = Spy(fail=True)
    groups = CanonicalGroups(canonicalize=spy)
    canonical = canonicalize_job(decoded())
    caplog.set_level(logging.DEBUG, logger="nomad_client.server.rolling")
    # The raw comparison: the same stored job is not outdated, an older shape is.
    assert outdated(canonical, placed(canonical), groups) == []
    aged = [attrs.evolve(a, job={**a.job, "JobModifyIndex": 8})
            for a in placed(older_shape())]
    assert len(outdated(canonical, aged, groups)) == 3
    for _ in range(3):
        outdated(canonical, placed(canonical), groups)
    failures = [r.getMessage() for r in caplog.records]
    assert len(failures) == 2  # once per stored version, not per allocation or pass
    assert all("ValueError" in failure for failure in failures)
    assert "hunter2" not in caplog.text  # the error's text may quote the job


# ---- through the server ---------------------------------------------------------------------
async def test_registering_an_unchanged_job_replaces_no_older_allocation(
        keyring: Keyring) -> None:
    server = Server(StateStore(), keyring, region="global", acl_enabled=False)
    await server.register_node(node(datacenter="dc1"))
    try:
        await server.register_job(canonicalize_job(decoded()))
        first = server.job_allocs("web")
        assert len(first) == 3
        # As an older agent stored them: their job in an older shape, same version.
        aged = [attrs.evolve(a, job={**older_shape(), **{k: a.job[k] for k in STORED}})
                for a in first]
        await server.store.write({"allocs": [(a.id, a) for a in aged]})
        assert server.job_allocs("web")[0].job["TaskGroups"][0].get("EphemeralDisk") is None

        await server.register_job(canonicalize_job(decoded()))
        assert {a.id for a in server.job_allocs("web") if a.desired_status == DESIRED_RUN} \
            == {a.id for a in first}
        assert not server.rolling.rolling("default", "web")

        await server.register_job(changed(lambda task: task["Env"].update(V="2")))
        assert server.rolling.rolling("default", "web")
        assert sum(a.desired_status != DESIRED_RUN for a in server.job_allocs("web")) == 1
    finally:
        await server.close()
