"""``update`` and ``migrate`` checked as Nomad's UpdateStrategy and MigrateStrategy Validate
check them (``jobspec.rollout``): what Nomad accepts passes, what it refuses is refused."""

from __future__ import annotations

from typing import Any

import pytest

from nomad_client.jobspec import JobValidationError, canonicalize_job

S = 1_000_000_000


def spec(**group: Any) -> dict[str, Any]:
    return {"ID": "web", "Type": "service", "TaskGroups": [
        {"Name": "g", "Tasks": [{"Name": "t", "Driver": "raw_exec"}], **group}]}


@pytest.mark.parametrize(("update", "problem"), [
    ({"HealthyDeadline": 60 * S, "ProgressDeadline": 60 * S},
     "Healthy deadline must be less than progress deadline"),
    ({"Stagger": 0}, "Stagger must be greater than zero"),
    ({"AutoPromote": True}, "Auto Promote requires a Canary count greater than zero"),
])
def test_an_update_block_nomad_refuses_is_refused(update: dict[str, Any], problem: str
                                                   ) -> None:
    with pytest.raises(JobValidationError, match=problem):
        canonicalize_job({**spec(), "Update": update})


def test_a_migrate_block_nomad_accepts_is_accepted() -> None:
    # Nomad allows a zero healthy deadline and a minimum healthy time equal to it.
    for migrate in ({"HealthyDeadline": 0, "MinHealthyTime": 0},
                    {"HealthyDeadline": 10 * S, "MinHealthyTime": 10 * S},
                    {"HealthCheck": "task_states"}):
        group = canonicalize_job(spec(Migrate=migrate))["TaskGroups"][0]
        assert all(group["Migrate"][k] == v for k, v in migrate.items()), migrate


@pytest.mark.parametrize(("migrate", "problem"), [
    ({"HealthCheck": "manual"}, "Invalid HealthCheck: 'manual'"),
    ({"MinHealthyTime": 20 * S, "HealthyDeadline": 10 * S},
     "MinHealthyTime must be less than HealthyDeadline"),
    ({"MaxParallel": -1}, "MaxParallel must be a non-negative whole number"),
])
def test_a_migrate_block_nomad_refuses_is_refused(migrate: dict[str, Any], problem: str
                                                  ) -> None:
    with pytest.raises(JobValidationError, match=problem):
        canonicalize_job(spec(Migrate=migrate))
