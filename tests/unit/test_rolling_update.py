"""Rolling updates on a fake clock, and the blocks they read: ``update``, ``migrate`` and
``ephemeral_disk`` (decoded, filled, checked, and the disk counted in placement)."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from nomad_client.jobspec import JobValidationError, canonicalize_job, parse_jobspec
from nomad_client.server.keyring import Keyring
from nomad_client.server.plan import dry_run
from nomad_client.server.rolling import UPDATING, outdated, replace_allowance
from nomad_client.server.scheduler import plan_job
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.structs.models import DESIRED_RUN, Allocation, AllocUpdate
from tests.unit.factories import node, settle, wait_until
from tests.unit.launching import FakeClock

S = 1_000_000_000
MIN_HEALTHY = 10  # seconds
UPDATE = {"MaxParallel": 1, "MinHealthyTime": MIN_HEALTHY * S, "HealthyDeadline": 60 * S}
# Real seconds a condition may take on a loaded 2-core box; the rollout's own time is fake.
PATIENCE = 60.0


def web(count: int = 3, env: str = "1", **update: Any) -> dict[str, Any]:
    return canonicalize_job({
        "ID": "web", "Type": "service", "Datacenters": ["dc1"], "Update": {**UPDATE, **update},
        "TaskGroups": [{"Name": "g", "Count": count, "Tasks": [{
            "Name": "t", "Driver": "raw_exec", "Config": {"command": "/bin/sleep"},
            "Env": {"V": env}}]}]})


class WatchedClock(FakeClock):
    """A fake clock that knows what its sleepers wait for: a test can see when the rollout
    has taken in a change (it then sleeps until a new time) instead of guessing."""

    def __init__(self) -> None:
        super().__init__()
        self.wake_times: list[float] = []

    def sleep(self, seconds: float) -> Awaitable[None]:
        return self._watched(self.now + seconds)  # its wake time taken now, as the base does

    async def _watched(self, wake_at: float) -> None:
        self.wake_times.append(wake_at)
        try:
            await super().sleep(wake_at - self.now)
        finally:
            self.wake_times.remove(wake_at)

    def sleeping_until(self, wake_at: float) -> bool:
        return any(abs(t - wake_at) < 1e-6 for t in self.wake_times)


@pytest.fixture
def clock() -> WatchedClock:
    return WatchedClock()


@pytest.fixture
async def server(keyring: Keyring, clock: FakeClock) -> AsyncIterator[Server]:
    server = Server(StateStore(), keyring, region="global", acl_enabled=False, clock=clock,
                    sleep=clock.sleep)
    await server.register_node(node(datacenter="dc1"))
    try:
        yield server
    finally:
        await server.close()


def live(server: Server) -> list[Allocation]:
    return [a for a in server.job_allocs("web")
            if a.desired_status == DESIRED_RUN and not a.client_terminal()]


def env_of(alloc: Allocation) -> str:
    return str(alloc.job["TaskGroups"][0]["Tasks"][0]["Env"]["V"])


async def report(server: Server, allocs: list[Allocation], status: str = "running") -> None:
    await server.update_allocs_from_client([AllocUpdate(a.id, status, "", {}) for a in allocs])


async def start_v1(server: Server) -> None:
    await server.register_job(web())
    await report(server, live(server))


async def eventually(check: Callable[[], Any], what: str) -> None:
    await wait_until(check, what, timeout=PATIENCE)


async def report_healthy_from_now(server: Server, clock: WatchedClock,
                                  allocs: list[Allocation]) -> None:
    """Report ``allocs`` running, and wait until the rollout has seen it at this clock time:
    it then sleeps until they have been running for the minimum healthy time."""
    await report(server, allocs)
    await eventually(lambda: clock.sleeping_until(clock.now + MIN_HEALTHY),
                     "the rollout to see the batch running")


# ---- which allocations are replaced ---------------------------------------------------------
def test_only_a_change_to_what_runs_makes_allocations_outdated() -> None:
    v1 = web()
    allocs = plan_job(v1, "e", [node(datacenter="dc1")], []).new_allocs
    assert outdated(web(), allocs) == []
    assert outdated(web(count=5, MaxParallel=2), allocs) == []  # count and rollout only
    assert [a.index for a in outdated(web(env="2"), allocs)] == [0, 1, 2]
    batch = {**web(env="2"), "Type": "batch", "Update": None}
    batch["TaskGroups"][0]["Update"] = None
    assert outdated(batch, allocs) == []  # batch jobs do not roll
    assert outdated(web(env="2", MaxParallel=0), allocs) == []  # max_parallel 0: no rolling
    assert replace_allowance(web(MaxParallel=2), "job-register") == {"g": 2}
    assert replace_allowance(web(), "node-update") == {}


def test_a_plan_shows_the_first_batch_as_destructive_updates() -> None:
    v1 = web()
    allocs = plan_job(v1, "e", [node(datacenter="dc1")], []).new_allocs
    planned = dry_run(web(env="2", MaxParallel=2), v1, [node(datacenter="dc1")], allocs,
                      allocs, with_diff=True)
    assert planned.annotations is not None
    counts = planned.annotations["g"]
    assert (counts["DestructiveUpdate"], counts["Ignore"], counts["Place"],
            counts["Stop"]) == (2, 1, 0, 0)
    assert planned.diff is not None
    assert planned.diff["TaskGroups"][0]["Updates"] == {"create/destroy update": 2,
                                                         "ignore": 1}


# ---- the rollout ----------------------------------------------------------------------------
async def test_a_new_version_replaces_one_batch_at_a_time(server: Server,
                                                         clock: WatchedClock) -> None:
    await start_v1(server)
    old = {a.id for a in live(server)}
    await server.register_job(web(env="2"))
    # One old allocation stopped for the update, one new in its slot.
    stopped = [a for a in server.job_allocs("web") if a.desired_status != DESIRED_RUN]
    assert [a.desired_description for a in stopped] == [UPDATING]
    assert sorted(env_of(a) for a in live(server)) == ["1", "1", "2"]
    assert server.rolling.rolling("default", "web")

    for step in (2, 3):
        new = [a for a in live(server) if env_of(a) == "2" and a.client_status != "running"]
        await report_healthy_from_now(server, clock, new)
        clock.set(clock.now + MIN_HEALTHY / 2)  # not yet healthy for long enough
        await settle()
        assert sum(env_of(a) == "2" for a in live(server)) == step - 1
        clock.set(clock.now + MIN_HEALTHY / 2)
        await eventually(lambda step=step: sum(env_of(a) == "2" for a in live(server)) == step,
                         f"batch {step}")
    new = [a for a in live(server) if a.client_status != "running"]
    await report_healthy_from_now(server, clock, new)
    clock.set(clock.now + MIN_HEALTHY)
    await eventually(lambda: not server.rolling.rolling("default", "web"), "the rollout's end")
    assert {env_of(a) for a in live(server)} == {"2"} and len(live(server)) == 3
    assert not old & {a.id for a in live(server)}
    assert sorted(a.index for a in live(server)) == [0, 1, 2]


async def test_a_batch_not_healthy_by_the_deadline_ends_the_rollout(
        server: Server, clock: FakeClock) -> None:
    await start_v1(server)
    await server.register_job(web(env="2"))
    clock.set(clock.now + 61)  # the new allocation never ran
    await eventually(lambda: not server.rolling.rolling("default", "web"), "giving up")
    assert sorted(env_of(a) for a in live(server)) == ["1", "1", "2"]  # the rest stay


async def test_a_failed_replacement_ends_the_rollout(server: Server) -> None:
    await start_v1(server)
    await server.register_job(web(env="2"))
    await report(server, [a for a in live(server) if env_of(a) == "2"], "failed")
    await eventually(lambda: not server.rolling.rolling("default", "web"), "giving up")
    assert sorted(env_of(a) for a in live(server) if a.client_status == "running") == [
        "1", "1"]


async def test_a_newer_version_takes_over_a_rollout(server: Server, clock: FakeClock) -> None:
    await start_v1(server)
    await server.register_job(web(env="2"))
    await server.register_job(web(env="3"))
    # The half-started "2" is outdated too: still one batch at a time.
    assert sorted(env_of(a) for a in live(server))[-1] == "3"
    assert sum(env_of(a) == "3" for a in live(server)) == 1
    assert server.rolling.rolling("default", "web")


# ---- the blocks -----------------------------------------------------------------------------
def test_update_migrate_and_ephemeral_disk_are_decoded_and_filled() -> None:
    job = canonicalize_job(parse_jobspec(textwrap.dedent("""\
        job "web" {
          update { max_parallel = 2 }
          group "g" {
            ephemeral_disk {
              size   = 500
              sticky = true
            }
            migrate { min_healthy_time = "5s" }
            update { healthy_deadline = "2m" }
            task "t" {
              driver = "raw_exec"
              config { command = "/bin/true" }
            }
          }
        }
        """), "web.nomad.hcl"))
    group = job["TaskGroups"][0]
    assert group["EphemeralDisk"] == {"SizeMB": 500, "Sticky": True, "Migrate": False}
    assert group["Migrate"] == {"MaxParallel": 1, "HealthCheck": "checks",
                                "MinHealthyTime": 5 * S, "HealthyDeadline": 300 * S}
    assert group["Update"]["MaxParallel"] == 2 and group["Update"]["HealthyDeadline"] == 120 * S
    assert job["Update"]["MaxParallel"] == 2 and job["Update"]["Canary"] == 0


@pytest.mark.parametrize(("job", "problem"), [
    ({"Update": {"Canary": 1}}, "canary deployments are not supported"),
    ({"Update": {"MinHealthyTime": 60 * S, "HealthyDeadline": 30 * S}},
     "Minimum healthy time must be less than healthy deadline"),
    ({"Type": "batch", "Update": {"MaxParallel": 1}}, "does not allow update block"),
    ({"Type": "batch", "TaskGroups": [{"Name": "g", "Migrate": {}, "Tasks": [
        {"Name": "t", "Driver": "raw_exec"}]}]}, "does not allow migrate block"),
    ({"TaskGroups": [{"Name": "g", "EphemeralDisk": {"SizeMB": 5}, "Tasks": [
        {"Name": "t", "Driver": "raw_exec"}]}]}, "minimum DiskMB value is 10; got 5"),
])
def test_bad_rollout_blocks_are_refused(job: dict[str, Any], problem: str) -> None:
    spec = {"ID": "web", "TaskGroups": [{"Name": "g", "Tasks": [
        {"Name": "t", "Driver": "raw_exec"}]}], **job}
    with pytest.raises(JobValidationError, match=problem):
        canonicalize_job(spec)


def test_ephemeral_disk_is_counted_in_placement() -> None:
    small = node(datacenter="dc1", attributes={"kernel.name": "linux",
                                               "unique.storage.bytesfree": str(1000 * 2**20)})
    job = canonicalize_job({"ID": "web", "Datacenters": ["dc1"], "TaskGroups": [{
        "Name": "g", "Count": 2, "EphemeralDisk": {"SizeMB": 600},
        "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}]})
    plan = plan_job(job, "e", [small], [])
    assert len(plan.new_allocs) == 1 and plan.queued == {"g": 1}
    assert plan.failed_groups["g"].dimension_exhausted == {"disk": 1}
    # A node that reports no free disk is not limited by it; Nomad's 300 MB by default.
    assert len(plan_job(job, "e", [node(datacenter="dc1")], []).new_allocs) == 2
    three = canonicalize_job({**job, "TaskGroups": [{**job["TaskGroups"][0], "Count": 3,
                                                     "EphemeralDisk": None}]})
    assert len(plan_job(three, "e", [small], []).new_allocs) == 3
    four = {**three, "TaskGroups": [{**three["TaskGroups"][0], "Count": 4}]}
    assert len(plan_job(four, "e", [small], []).new_allocs) == 3
