"""A task's ``resources`` block: ``memory_max`` (oversubscription) and ``cores``, decoded and
checked as Nomad does."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_client.jobspec import (
    JobspecError,
    JobValidationError,
    canonicalize_job,
    parse_jobspec,
)


def job_with(resources: str) -> str:
    return (f'job "j" {{\n  group "g" {{\n    task "t" {{\n      driver = "exec"\n'
            f"      resources {{\n        {resources}\n      }}\n    }}\n  }}\n}}\n")


def resources_of(resources: str) -> dict[str, Any]:
    job = canonicalize_job(parse_jobspec(job_with(resources), "r.nomad.hcl"))
    return job["TaskGroups"][0]["Tasks"][0]["Resources"]


def problems_of(resources: dict[str, Any]) -> list[str]:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job({"ID": "j", "TaskGroups": [{"Name": "g", "Tasks": [
            {"Name": "t", "Driver": "exec", "Resources": resources}]}]})
    return info.value.problems


def test_memory_max_and_cores_are_decoded() -> None:
    assert resources_of("memory = 128\n memory_max = 256") == {
        "CPU": 100, "MemoryMB": 128, "MemoryMaxMB": 256}
    # Asking for cores drops the default cpu, as Nomad's canonicalization does.
    assert resources_of("cores = 2") == {"CPU": 0, "MemoryMB": 300, "Cores": 2}


def test_without_them_the_block_is_as_before() -> None:
    assert resources_of("cpu = 200") == {"CPU": 200, "MemoryMB": 300}


@pytest.mark.parametrize("memory_max", [0, -1, 300, 1024])
def test_memory_max_at_least_memory_or_a_sentinel(memory_max: int) -> None:
    assert resources_of(f"memory_max = {memory_max}")["MemoryMaxMB"] == memory_max


@pytest.mark.parametrize("resources, fragment", [
    ({"MemoryMB": 256, "MemoryMaxMB": 128},
     "MemoryMaxMB value (128) should be larger than MemoryMB value (256)"),
    ({"MemoryMaxMB": -2}, "MemoryMaxMB value (-2) should be larger than MemoryMB value (300)"),
    ({"MemoryMaxMB": "lots"}, "MemoryMaxMB value ('lots')"),
    ({"CPU": 500, "Cores": 1}, "Task can only ask for 'cpu' or 'cores' resource, not both."),
    ({"Cores": -1}, "cores value cannot be negative, got -1"),
    ({"Cores": 0}, "minimum CPU value is 1, got 0"),
])
def test_bad_resources_are_refused_with_nomads_reason(
        resources: dict[str, Any], fragment: str) -> None:
    problems = problems_of(resources)
    assert any(fragment in p for p in problems), (fragment, problems)


def test_hcl_type_errors_name_the_attribute() -> None:
    with pytest.raises(JobspecError, match="memory_max"):
        parse_jobspec(job_with('memory_max = "big"'), "r.nomad.hcl")
