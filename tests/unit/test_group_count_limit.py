"""A group's ``Count`` is bounded (``MAX_GROUP_COUNT``): placement runs on the event loop, so
an unbounded count (a registration or a scale action asking for 100,000 copies) would hold
every other request for seconds. Refused with a 400 naming the group."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from nomad_client.jobspec import JobValidationError, canonicalize_job
from nomad_client.jobspec.canonical import MAX_GROUP_COUNT
from nomad_client.server.keyring import Keyring
from tests.unit.launching import batch_job, register, served
from tests.unit.test_namespace_endpoints import Api


def service_job(count: int) -> dict[str, Any]:
    return batch_job("web", count=count, Type="service")


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring) as api:
        yield api


def test_the_limit_is_inclusive() -> None:
    assert MAX_GROUP_COUNT == 10_000
    canonicalize_job(service_job(MAX_GROUP_COUNT))
    with pytest.raises(JobValidationError, match="'g'.*at most 10000"):
        canonicalize_job(service_job(MAX_GROUP_COUNT + 1))


async def test_a_registration_over_the_limit_is_refused_before_placement(api: Api) -> None:
    for path in ("/v1/jobs", "/v1/job/web/plan"):
        answer = await api.call("PUT", path, {"Job": service_job(100_000)})
        assert answer.status == 400, (path, answer)
        assert "'g'" in answer.body and "at most 10000" in answer.body, answer.body
    # Validation answers in Nomad's shape: the problems listed.
    checked = await api.call("PUT", "/v1/validate/job", {"Job": service_job(100_000)})
    assert checked.status == 200
    assert any("'g'" in e and "at most 10000" in e for e in checked.body["ValidationErrors"])
    assert api.server.job("web") is None and not api.server.allocations()


async def test_a_scale_action_over_the_limit_is_refused(api: Api) -> None:
    await register(api, service_job(1))
    answer = await api.call("POST", "/v1/job/web/scale",
                            {"Count": MAX_GROUP_COUNT + 1, "Target": {"Group": "g"}})
    assert answer.status == 400 and '"g"' in answer.body, answer
    assert "at most 10000" in answer.body
    stored = api.server.job("web")
    assert stored is not None and stored["TaskGroups"][0]["Count"] == 1
