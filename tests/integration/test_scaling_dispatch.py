"""Scaling, dispatch and periodic launches end to end: real agents and raw_exec tasks that
call their own Task API socket with ``curl`` and their workload identity (``identity { env
= true }``, ACLs on, rights only through a policy attached to their job), and the periodic
launcher on the real clock."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from nomad_client.api.client import ApiClient, ApiError
from nomad_client.jobspec import canonicalize_job
from tests.integration.harness import (
    NEEDS_CURL,
    AgentProcess,
    bootstrap_acls,
    eventually,
    raw_exec_job,
    run_job,
    wait_client_status,
    wait_task_state,
)
from tests.integration.test_taskapi import local_dir

pytestmark = [
    pytest.mark.timeout(120),
    NEEDS_CURL,
]

AgentFactory = Callable[..., AgentProcess]
ENV_IDENTITY = {"Env": True}
# Secrets in a plain dir: these agents are killed at the end, which would leave mounts.
TASK_API = {"secrets_tmpfs": False}


def until_ok(method: str, path: str, body: dict[str, Any], out: str) -> str:
    """Shell: call ``path`` on the task's own socket until it answers 200, noting each
    status in ``$NOMAD_TASK_DIR/codes`` and the last answer's body in ``out``."""
    return (
        "while :; do "
        f'code=$(curl -s -o "$NOMAD_TASK_DIR/{out}" -w "%{{http_code}}" -X {method} '
        '--unix-socket "$NOMAD_SECRETS_DIR/api.sock" -H "X-Nomad-Token: $NOMAD_TOKEN" '
        f"-d '{json.dumps(body)}' \"http://localhost{path}\"); "
        'echo "$code" >> "$NOMAD_TASK_DIR/codes"; [ "$code" = 200 ] && break; sleep 0.2; '
        "done")


async def codes(agent: AgentProcess, alloc_id: str) -> list[str]:
    path = local_dir(agent, alloc_id) / "codes"
    return path.read_text().split() if path.exists() else []


async def attach(api: ApiClient, name: str, job_id: str, capabilities: list[str]) -> None:
    rules = f'namespace "default" {{\n  capabilities = {json.dumps(capabilities)}\n}}\n'
    await api.acl_policy_apply({"Name": name, "Rules": rules,
                                "JobACL": {"Namespace": "default", "JobID": job_id}})


async def test_a_task_scales_its_own_job(short_agent_factory: AgentFactory) -> None:
    agent = short_agent_factory(acl=True, task_api=TASK_API)
    await agent.start()
    async with agent.api(await bootstrap_acls(agent)) as api:
        scale = until_ok("POST", "/v1/job/$NOMAD_JOB_ID/scale",
                         {"Count": 2, "Target": {"Group": "g"}, "Message": "from the task"},
                         "scale.json")
        # Only the first copy asks; every copy then stays up.
        script = f'if [ "$NOMAD_ALLOC_INDEX" = 0 ]; then {scale}; fi; exec sleep 600'
        job = raw_exec_job("scaler", script, identity=ENV_IDENTITY, kill_timeout_s=1)
        job["TaskGroups"][0]["Scaling"] = {"Min": 1, "Max": 3}
        (first,) = await run_job(api, canonicalize_job(job))
        await wait_task_state(api, first["ID"], "t", "running")

        # No policy yet: the job's own identity may not scale it.
        await eventually(lambda: codes(agent, first["ID"]), message="the task's first try")
        assert (await codes(agent, first["ID"]))[0] == "403"
        assert len(await api.job_allocations("scaler")) == 1

        await attach(api, "scale-self", "scaler", ["scale-job"])
        await eventually(lambda: _last_is(agent, first["ID"], "200"),
                         message="the task's scale to succeed")
        answer = json.loads((local_dir(agent, first["ID"]) / "scale.json").read_text())
        assert answer["EvalID"] and answer["Index"]

        async def two_running() -> list[dict[str, Any]]:
            allocs = await api.job_allocations("scaler")
            running = [a for a in allocs if a["ClientStatus"] == "running"]
            return running if len(running) == 2 else []
        running = await eventually(two_running, timeout=30, message="the second allocation")
        assert {a["Name"] for a in running} == {"scaler.g[0]", "scaler.g[1]"}

        status = await api.job_scale_status("scaler")
        group = status["TaskGroups"]["g"]
        assert (group["Desired"], group["Running"]) == (2, 2)
        assert [(e["Count"], e["PreviousCount"], e["Message"]) for e in group["Events"]] == [
            (2, 1, "from the task")]
        # The operator's side: the bound still holds.
        with pytest.raises(ApiError) as refused:
            await api.job_scale("scaler", "g", 4)
        assert refused.value.status == 400
        assert "greater than scaling policy maximum: 4 > 3" in refused.value.body


async def _last_is(agent: AgentProcess, alloc_id: str, code: str) -> bool:
    seen = await codes(agent, alloc_id)
    return bool(seen) and seen[-1] == code


async def test_a_task_dispatches_a_parameterized_job(short_agent_factory: AgentFactory
                                                     ) -> None:
    agent = short_agent_factory(acl=True, task_api=TASK_API)
    await agent.start()
    async with agent.api(await bootstrap_acls(agent)) as api:
        reader = raw_exec_job(
            "encode", 'cat "$NOMAD_TASK_DIR/in/input.json" > "$NOMAD_TASK_DIR/seen"; '
                      'echo " user=$NOMAD_META_user tier=[$NOMAD_META_TIER]" '
                      '>> "$NOMAD_TASK_DIR/seen"',
            job_type="batch", extra_task={"DispatchPayload": {"File": "in/input.json"}})
        reader["ParameterizedJob"] = {"Payload": "required", "MetaRequired": ["user"],
                                      "MetaOptional": ["tier"]}
        registered = await api.job_register(canonicalize_job(reader))
        assert registered["EvalID"] == ""

        payload = base64.b64encode(b'{"frames": 24}').decode()
        dispatch = until_ok("POST", "/v1/job/encode/dispatch",
                            {"Payload": payload, "Meta": {"user": "ann"}}, "dispatch.json")
        dispatcher = raw_exec_job("dispatcher", f"{dispatch}; exec sleep 600",
                                  identity=ENV_IDENTITY, kill_timeout_s=1)
        await attach(api, "dispatch-encode", "dispatcher", ["dispatch-job"])
        (alloc,) = await run_job(api, dispatcher)
        await eventually(lambda: _last_is(agent, alloc["ID"], "200"),
                         message="the task's dispatch")
        answer = json.loads((local_dir(agent, alloc["ID"]) / "dispatch.json").read_text())
        child_id = answer["DispatchedJobID"]
        assert child_id.startswith("encode/dispatch-") and answer["EvalID"]

        child = await api.job_get(child_id)  # the client escapes the "/"
        assert (child["ParentID"], child["Dispatched"]) == ("encode", True)
        (child_alloc,) = await eventually(lambda: api.job_allocations(child_id),
                                          message="the child's allocation")
        done = await wait_client_status(api, child_alloc["ID"], "complete", "failed",
                                        timeout=30)
        assert done["ClientStatus"] == "complete", done["TaskStates"]
        seen = (local_dir(agent, child_alloc["ID"]) / "seen").read_text()
        assert seen == '{"frames": 24} user=ann tier=[]\n'
        assert await api.job_allocations("encode") == []  # the parent never runs


async def test_a_periodic_job_launches_one_child_per_tick(agent_factory: AgentFactory
                                                          ) -> None:
    agent = agent_factory(task_api=TASK_API)
    await agent.start()
    async with agent.api() as api:
        # Seven fields (Nomad's dialect): every 15 seconds, so the test waits at most that.
        job = raw_exec_job("tick", "true", job_type="batch")
        job["Periodic"] = {"Spec": "*/15 * * * * * *", "ProhibitOverlap": True}
        assert (await api.job_register(canonicalize_job(job)))["EvalID"] == ""

        async def children(count: int) -> list[dict[str, Any]]:
            found = [j for j in await api.jobs_list(prefix="tick/") if j["ParentID"] == "tick"]
            return sorted(found, key=lambda j: j["ID"]) if len(found) >= count else []

        first, second = await eventually(lambda: children(2), timeout=60, interval=0.5,
                                         message="two ticks' children")
        ticks = [int(j["ID"].rpartition("-")[2]) for j in (first, second)]
        assert ticks[0] % 15 == 0 and ticks[1] - ticks[0] == 15
        for stub in (first, second):
            # Launched once: never registered again, one evaluation, by the launcher.
            child = await api.job_get(stub["ID"])
            assert child["Version"] == 0 and child["Periodic"] is None
            evals = await api.job_evaluations(stub["ID"])
            assert [e["TriggeredBy"] for e in evals] == ["periodic-job"]
        assert await api.job_allocations("tick") == []

        forced = await api.job_periodic_force("tick")
        assert forced["EvalID"]
        evaluation = await api.evaluation_get(forced["EvalID"])
        assert evaluation["JobID"].startswith("tick/periodic-")
        assert evaluation["TriggeredBy"] == "periodic-job"
