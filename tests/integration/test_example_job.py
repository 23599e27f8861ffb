"""``testdata/jobs/example.nomad.hcl`` (what ``nomad job init`` writes, for raw_exec) end to
end: ``job plan`` shows it would be created, ``job run`` runs it, its server answers on its
dynamic port with its service registered and its check passing; planned again it changes
nothing, and with another count it would."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import AgentProcess, eventually, wait_task_state
from tests.integration.test_cli import cli

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("python3") is None, reason="the example runs python3"),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "testdata" / "jobs" / "example.nomad.hcl"


async def test_the_init_example_plans_runs_and_plans_again(
        short_agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    agent = short_agent_factory()
    await agent.start()
    plan = await cli(agent, "job", "plan", str(EXAMPLE))
    assert plan.code == 1, plan.output
    assert plan.stdout.startswith('+ Job: "example"\n+ Task Group: "web" (1 create)\n'), \
        plan.output
    assert "Scheduler dry-run:\n- All tasks successfully allocated." in plan.stdout

    run = await cli(agent, "job", "run", "-detach", str(EXAMPLE))
    assert run.code == 0, run.output
    async with agent.api() as api:
        (alloc,) = await eventually(lambda: api.job_allocations("example"),
                                    message="the example's allocation")
        await wait_task_state(api, alloc["ID"], "server", "running", timeout=30)
        (registration,) = await eventually(lambda: api.service_registrations("example-web"),
                                           timeout=30, message="its registration")
        assert registration["Tags"] == ["global", "web"]

        async def check_passed() -> dict[str, Any] | None:
            checks = await api.alloc_checks(alloc["ID"])
            return next((c for c in checks.values() if c["Status"] == "success"), None)
        check = await eventually(check_passed, timeout=40, message="the http check to pass")
        assert (check["CheckName"], check["ServiceName"]) == ("alive", "example-web")
        job = await api.job_get("example")
        group = job["TaskGroups"][0]
        assert group["EphemeralDisk"]["SizeMB"] == 300
        assert group["Update"]["MaxParallel"] == 1 and group["Migrate"]["HealthCheck"] == "checks"

    again = await cli(agent, "job", "plan", str(EXAMPLE))
    assert again.code == 0, again.output
    assert again.stdout.startswith('Job: "example"\nTask Group: "web" (1 ignore)\n'), \
        again.output
    bigger = tmp_path / "example.nomad.hcl"
    bigger.write_text(EXAMPLE.read_text().replace("count = 1", "count = 2"))
    scaled = await cli(agent, "job", "plan", str(bigger))
    assert scaled.code == 1, scaled.output
    assert '+/- Count: "1" => "2"' in scaled.stdout
    assert '(1 create, 1 ignore)' in scaled.stdout
