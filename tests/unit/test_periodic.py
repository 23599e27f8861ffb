"""Periodic jobs: the cron dialect, the ``periodic`` block, and the server's launcher driven
by a fake clock across ticks (exactly one child per tick, prohibit_overlap, time zones,
restarts), force launches and addressing a child by its escaped ID."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from nomad_client.jobspec import JobValidationError, canonicalize_job, parse_jobspec
from nomad_client.jobspec.cron import CronError, next_launch, parse_cron, parse_time_zone
from nomad_client.server.keyring import Keyring
from nomad_client.server.state import StateStore
from tests.unit.factories import settle, wait_until
from tests.unit.launching import FakeClock, batch_job, child_ids, finish_allocs, register, served
from tests.unit.test_namespace_endpoints import Api

EVERY_FIVE = {"Spec": "*/5 * * * *"}


def at(hour: int, minute: int, second: int = 0, day: int = 1) -> int:
    return int(datetime(2026, 1, day, hour, minute, second, tzinfo=UTC).timestamp())


def periodic_job(job_id: str = "report", **periodic: object) -> dict[str, object]:
    return batch_job(job_id, Periodic={**EVERY_FIVE, **periodic})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def api(keyring: Keyring, clock: FakeClock) -> AsyncIterator[Api]:
    async with served(keyring, clock=clock) as api:
        yield api


async def tick(api: Api, clock: FakeClock, when: int, parent: str = "report") -> list[str]:
    """Move the clock to ``when``, let the launcher act, and return the children."""
    clock.set(when)
    await settle()
    return child_ids(api.server, parent)


# ---- the cron dialect ------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "after", "expected"), [
    ("*/5 * * * *", at(0, 15, 7), at(0, 20)),
    ("*/5 * * * *", at(0, 20), at(0, 25)),  # strictly after
    ("30 2 * * *", at(3, 0), at(2, 30, day=2)),
    ("0 0 * * * 2027", at(0, 0), int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())),
    ("15 * * * * * *", at(0, 0), at(0, 0, 15)),  # seven fields: seconds first
    ("@hourly", at(0, 15), at(1, 0)),
    ("@daily", at(0, 15), at(0, 0, day=2)),
    ("0 0 * * mon", at(0, 0), at(0, 0, day=5)),
    ("0 0 31 2 *", at(0, 0), None),  # never
])
def test_cron_specs_as_nomad_reads_them(spec: str, after: int, expected: int | None) -> None:
    found = next_launch([parse_cron(spec)], after, parse_time_zone("UTC"))
    assert (None if found is None else int(found)) == expected


@pytest.mark.parametrize(("spec", "reason"), [
    ("* * * *", "expected 5 to 7 fields, got 4"),
    ("61 * * * *", "out of range"),
    ("@every 5m", "expected 5 to 7 fields"),
    ("@midnight", "unknown alias '@midnight'"),
    ("x y z w v", "not acceptable"),
])
def test_bad_cron_specs_are_refused_with_the_reason(spec: str, reason: str) -> None:
    with pytest.raises(CronError) as info:
        parse_cron(spec)
    assert str(info.value).startswith(f'Invalid cron spec "{spec}": ')
    assert reason in str(info.value)


def test_time_zones_are_iana_names() -> None:
    assert parse_time_zone("") == ZoneInfo("UTC")
    assert parse_time_zone("Asia/Tokyo") == ZoneInfo("Asia/Tokyo")
    for name in ("Mars/Olympus", "../../etc/passwd", "/etc/localtime"):
        with pytest.raises(CronError, match="Invalid time zone"):
            parse_time_zone(name)


# ---- the jobspec ----------------------------------------------------------------------------
def test_the_periodic_block_is_decoded_and_filled() -> None:
    job = parse_jobspec(textwrap.dedent("""\
        job "report" {
          type = "batch"
          periodic {
            crons            = ["*/5 * * * *", "0 3 * * *"]
            prohibit_overlap = true
            time_zone        = "Europe/Berlin"
          }
          group "g" {
            task "t" {
              driver = "raw_exec"
            }
          }
        }
        """), "report.nomad.hcl")
    assert canonicalize_job(job)["Periodic"] == {
        "Enabled": True, "Spec": "", "Specs": ["*/5 * * * *", "0 3 * * *"], "SpecType": "cron",
        "ProhibitOverlap": True, "TimeZone": "Europe/Berlin"}
    assert "Periodic" not in parse_jobspec('job "x" {\n}\n', "x.hcl")  # no block, no key


@pytest.mark.parametrize(("periodic", "job_type", "problem"), [
    ({"Spec": "*/5 * * * *"}, "service",
     'Periodic can only be used with "batch" or "sysbatch" scheduler'),
    ({"Spec": "*/5 * * * *", "Specs": ["@daily"]}, "batch", "Only cron or crons may be used"),
    ({}, "batch", "Must specify a spec"),
    ({"Spec": "bad"}, "batch", 'Invalid cron spec "bad": expected 5 to 7 fields, got 1'),
    ({"Spec": "@daily", "TimeZone": "Nowhere/City"}, "batch",
     'Invalid time zone "Nowhere/City": unknown time zone Nowhere/City'),
    ({"Spec": "@daily", "SpecType": "rrule"}, "batch",
     "Unknown periodic specification type 'rrule'"),
    ({"Spec": "@daily", "ProhibitOverlap": "yes"}, "batch",
     "periodic: ProhibitOverlap must be a bool, got 'yes'"),
])
def test_bad_periodic_blocks_are_refused(periodic: dict[str, object], job_type: str,
                                         problem: str) -> None:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(batch_job(Type=job_type, Periodic=periodic))
    assert problem in info.value.problems


def test_a_disabled_periodic_block_is_not_validated_further() -> None:
    job = canonicalize_job(batch_job(Type="service", Periodic={"Enabled": False}))
    assert job["Periodic"]["Enabled"] is False


# ---- the launcher --------------------------------------------------------------------------
async def test_a_periodic_parent_never_runs_itself(api: Api) -> None:
    answer = await register(api, periodic_job())
    assert answer["EvalID"] == ""
    assert api.server.job_evaluations("report") == []
    assert api.server.job_allocs("report") == []
    assert (await api.call("GET", "/v1/job/report")).body["Status"] == "running"
    listed = (await api.call("GET", "/v1/jobs")).body
    assert listed[0]["Periodic"]["Spec"] == "*/5 * * * *" and listed[0]["Status"] == "running"


async def test_exactly_one_child_per_tick(api: Api, clock: FakeClock) -> None:
    await register(api, periodic_job())
    assert await tick(api, clock, at(0, 19, 59)) == []
    clock.set(at(0, 20))
    first = await wait_until(lambda: child_ids(api.server, "report"), "the first child")
    assert first == [f"report/periodic-{at(0, 20)}"]
    # Later in the same period, and the launcher woken by other work: still one child.
    assert await tick(api, clock, at(0, 24, 59)) == first
    await register(api, batch_job("other"))
    assert await tick(api, clock, at(0, 24, 59)) == first
    clock.set(at(0, 25))
    children = await wait_until(lambda: len(child_ids(api.server, "report")) == 2 and
                                child_ids(api.server, "report"), "the second child")
    assert children == [*first, f"report/periodic-{at(0, 25)}"]

    child = api.server.job(first[0])
    assert child is not None
    assert (child["ParentID"], child["Periodic"], child["Name"]) == ("report", None, first[0])
    evals = api.server.job_evaluations(first[0])
    assert [e.triggered_by for e in evals] == ["periodic-job"]
    assert len(api.server.job_allocs(first[0])) == 1  # the child runs; the parent never


async def test_prohibit_overlap_skips_a_tick_while_a_child_runs(api: Api,
                                                               clock: FakeClock) -> None:
    await register(api, periodic_job(ProhibitOverlap=True))
    clock.set(at(0, 20))
    first = await wait_until(lambda: child_ids(api.server, "report"), "the first child")
    # Its allocation is placed but never finishes (no client here): the next tick is skipped.
    assert await tick(api, clock, at(0, 25)) == first
    assert await tick(api, clock, at(0, 29)) == first
    await finish_allocs(api.server, first[0])
    clock.set(at(0, 30))
    later = await wait_until(lambda: len(child_ids(api.server, "report")) == 2 and
                             child_ids(api.server, "report"), "the child after the overlap")
    assert later == [*first, f"report/periodic-{at(0, 30)}"]


async def test_overlap_is_allowed_unless_prohibited(api: Api, clock: FakeClock) -> None:
    await register(api, periodic_job())
    for minute in (20, 25, 30):
        clock.set(at(0, minute))
        await wait_until(lambda m=minute: f"report/periodic-{at(0, m)}"
                         in child_ids(api.server, "report"), f"the child of 00:{minute}")
    assert len(child_ids(api.server, "report")) == 3


async def test_the_time_zone_is_honoured(api: Api, clock: FakeClock) -> None:
    # 09:00 in Tokyo is midnight UTC; the clock stands at 09:15 there.
    await register(api, periodic_job("tokyo", Spec="0 9 * * *", TimeZone="Asia/Tokyo"))
    await register(api, periodic_job("utc", Spec="0 9 * * *"))

    def schedules() -> tuple[int | None, ...]:
        return tuple(api.server.periodic.next_launch(api.server.job(job_id) or {})
                     for job_id in ("tokyo", "utc"))

    await wait_until(lambda: None not in schedules(), "both schedules")
    assert schedules() == (at(0, 0, day=2), at(9, 0))
    assert await tick(api, clock, at(8, 59), "tokyo") == []
    clock.set(at(9, 0))
    await wait_until(lambda: child_ids(api.server, "utc"), "the UTC child")
    assert child_ids(api.server, "tokyo") == []
    clock.set(at(0, 0, day=2))
    assert await wait_until(lambda: child_ids(api.server, "tokyo"), "the Tokyo child") == [
        f"tokyo/periodic-{at(0, 0, day=2)}"]


async def test_a_tick_is_never_launched_twice_and_missed_ticks_are_not_replayed(
        keyring: Keyring) -> None:
    store = StateStore()
    clock = FakeClock()
    async with served(keyring, clock=clock, store=store) as api:
        await register(api, periodic_job())
        clock.set(at(0, 20))
        await wait_until(lambda: child_ids(api.server, "report"), "the first child")
    launched = [f"report/periodic-{at(0, 20)}"]

    # The agent comes back at 00:31: the ticks of 00:25 and 00:30 passed while it was down.
    clock = FakeClock(at(0, 31))
    async with served(keyring, clock=clock, store=store) as api:
        assert await tick(api, clock, at(0, 34, 59)) == launched
        clock.set(at(0, 35))
        launched.append(f"report/periodic-{at(0, 35)}")
        await wait_until(lambda: child_ids(api.server, "report") == launched,
                         "the first tick after the restart")

    # Back again with the wall clock stepped back before launched ticks: none runs twice.
    clock = FakeClock(at(0, 19, 30))
    async with served(keyring, clock=clock, store=store) as api:
        for when in (at(0, 20), at(0, 35), at(0, 39)):
            assert await tick(api, clock, when) == launched
        clock.set(at(0, 40))
        launched.append(f"report/periodic-{at(0, 40)}")
        await wait_until(lambda: child_ids(api.server, "report") == launched,
                         "the next new tick")


async def test_a_stopped_parent_launches_no_more(api: Api, clock: FakeClock) -> None:
    await register(api, periodic_job())
    assert (await api.call("DELETE", "/v1/job/report")).status == 200
    assert (await api.call("GET", "/v1/job/report")).body["Status"] == "dead"
    assert await tick(api, clock, at(0, 20)) == []
    assert api.server.periodic.next_launch(api.server.job("report") or {}) is None


async def test_force_launches_a_child_now(api: Api, clock: FakeClock) -> None:
    await register(api, periodic_job(ProhibitOverlap=True))
    forced = await api.call("POST", "/v1/job/report/periodic/force")
    assert forced.status == 200, forced
    assert forced.body["EvalID"] and forced.body["EvalCreateIndex"] == forced.nomad_index
    assert forced.body["Index"] == forced.nomad_index
    now = int(clock())
    assert child_ids(api.server, "report") == [f"report/periodic-{now}"]
    assert api.server.evaluation(forced.body["EvalID"]) is not None
    # Force ignores prohibit_overlap: the first child still runs.
    clock.set(now + 1)
    assert (await api.call("PUT", "/v1/job/report/periodic/force")).status == 200
    assert child_ids(api.server, "report") == [f"report/periodic-{now}",
                                               f"report/periodic-{now + 1}"]


@pytest.mark.parametrize(("job", "status", "text"), [
    (None, 404, "job not found"),
    (batch_job(), 400, "can't force launch non-periodic job"),
    (periodic_job(Enabled=False), 400,
     'force launch for job "report" failed: can\'t force run non-tracked job "report" '
     "(default)"),
])
async def test_force_refusals(api: Api, job: dict[str, object] | None, status: int,
                              text: str) -> None:
    if job is not None:
        await register(api, job)
    answer = await api.call("POST", "/v1/job/report/periodic/force")
    assert (answer.status, answer.body) == (status, text)
    assert child_ids(api.server, "report") == []


async def test_a_job_cannot_change_kind(api: Api) -> None:
    await register(api, periodic_job())
    answer = await api.call("PUT", "/v1/jobs", {"Job": batch_job()})
    assert (answer.status, answer.body) == (
        400, "cannot update periodic job to being non-periodic")
    await register(api, batch_job("plain"))
    answer = await api.call("PUT", "/v1/jobs", {"Job": periodic_job("plain")})
    assert (answer.status, answer.body) == (
        400, "cannot update non-periodic job to being periodic")
    # The same kind again is fine, and a new schedule is taken up.
    await register(api, periodic_job(Spec="@hourly"))
    assert api.server.job("report")["Periodic"]["Spec"] == "@hourly"  # type: ignore[index]


async def test_a_child_is_addressed_by_its_escaped_id(api: Api) -> None:
    await register(api, periodic_job())
    child = (await api.call("POST", "/v1/job/report/periodic/force")).body
    child_id = child_ids(api.server, "report")[0]
    escaped = child_id.replace("/", "%2F")
    got = await api.call("GET", f"/v1/job/{escaped}")
    assert got.status == 200 and (got.body["ID"], got.body["ParentID"]) == (child_id, "report")
    allocs = await api.call("GET", f"/v1/job/{escaped.replace('F', 'f')}/allocations")
    assert [a["EvalID"] for a in allocs.body] == [child["EvalID"]]
    evals = await api.call("GET", f"/v1/job/{escaped}/evaluations")
    assert [e["ID"] for e in evals.body] == [child["EvalID"]]
    # Unescaped, the "/" splits the path: that is another route, which has no such job.
    assert (await api.call("GET", f"/v1/job/{child_id}")).status == 404
