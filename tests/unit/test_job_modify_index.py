"""``JobModifyIndex`` (the index of a job's last version change, not of its last write) where
Nomad hands it out: a plan's answer, which ``job run -check-index`` sends back, and each
evaluation of the job."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.structs.models import Evaluation
from tests.unit.launching import batch_job, register, served
from tests.unit.test_namespace_endpoints import Api


def service_job(count: int = 1) -> dict[str, Any]:
    return batch_job("web", count=count, Type="service")


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring) as api:
        yield api


async def mark_stable(api: Api) -> None:
    answer = await api.call("POST", "/v1/job/web/stable",
                            {"JobID": "web", "JobVersion": 0, "Stable": True})
    assert answer.status == 200, answer


async def test_a_plan_answers_the_version_index_that_check_index_wants(api: Api) -> None:
    await register(api, service_job(1))
    await mark_stable(api)  # a write that is no new version
    stored = api.server.job("web")
    assert stored is not None and stored["ModifyIndex"] > stored["JobModifyIndex"]
    planned = await api.call("POST", "/v1/job/web/plan", {"Job": service_job(2)})
    assert planned.status == 200, planned
    assert planned.body["JobModifyIndex"] == stored["JobModifyIndex"]
    run = await api.call("PUT", "/v1/jobs", {
        "Job": service_job(2), "EnforceIndex": True,
        "JobModifyIndex": planned.body["JobModifyIndex"]})
    assert run.status == 200, run


async def test_evaluations_carry_the_jobs_version_index(api: Api) -> None:
    await register(api, service_job(1))
    await mark_stable(api)
    await register(api, service_job(2))
    stored = api.server.job("web")
    assert stored is not None
    evals = (await api.call("GET", "/v1/job/web/evaluations")).body
    assert evals and max(e["JobModifyIndex"] for e in evals) == stored["JobModifyIndex"]
    assert all(e["JobModifyIndex"] > 0 for e in evals), evals


async def test_a_blocking_summary_wakes_for_an_evaluation(api: Api) -> None:
    # ``Queued`` comes from the job's latest evaluation: a new one alone changes the summary.
    await register(api, service_job(1))
    seen = await api.call("GET", "/v1/job/web/summary")
    assert seen.status == 200 and seen.nomad_index is not None
    ev = Evaluation(id=str(uuid.uuid4()), namespace="default", job_id="web",
                    type="service", triggered_by="job-register",
                    queued_allocations={"g": 3})
    await api.server.store.write({"evals": [(ev.id, ev)]})
    async with asyncio.timeout(10):
        woken = await api.call("GET", f"/v1/job/web/summary?index={seen.nomad_index}&wait=60s")
    assert woken.status == 200 and woken.nomad_index is not None
    assert woken.nomad_index > seen.nomad_index
