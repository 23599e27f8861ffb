"""The event stream end to end on real agents with ACLs on: a raw_exec task follows its own
allocation's events through its own Task API socket with its workload identity, and
python-nomad's (blocking) stream client follows a job's events over TCP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import nomad
import pytest

from tests.integration.harness import (
    AgentProcess,
    bootstrap_acls,
    eventually,
    raw_exec_job,
    run_job,
)
from tests.integration.test_taskapi import local_dir

pytestmark = pytest.mark.timeout(90)

AgentFactory = Callable[..., AgentProcess]
READ_JOB = 'namespace "default" {\n  capabilities = ["read-job"]\n}\n'
# The task's side: the status of a Node subscription (its job's policy grants no node read),
# then its own allocation's events until an AllocationUpdated comes; that line is published
# by a rename as "seen", so the test never reads half of it.
FOLLOW_OWN_ALLOC = r'''
cd "$NOMAD_TASK_DIR"
curl -s -o /dev/null -w '%{http_code}' --unix-socket "$NOMAD_SECRETS_DIR/api.sock" \
  -H "X-Nomad-Token: $NOMAD_TOKEN" "localhost/v1/event/stream?topic=Node" > node-status
curl -sN --unix-socket "$NOMAD_SECRETS_DIR/api.sock" -H "X-Nomad-Token: $NOMAD_TOKEN" \
  "localhost/v1/event/stream?topic=Allocation:$NOMAD_ALLOC_ID" |
while IFS= read -r line; do
  case "$line" in
    *'"AllocationUpdated"'*) printf '%s\n' "$line" > seen.part; mv seen.part seen; break ;;
  esac
done
exec sleep 300
'''


@pytest.fixture(autouse=True)
def _no_nomad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-nomad reads NOMAD_* settings from the environment: none may leak in."""
    for name in [n for n in os.environ if n.startswith("NOMAD_")]:
        monkeypatch.delenv(name)


@pytest.mark.skipif(shutil.which("curl") is None,
                    reason="curl is not installed: the task cannot call its socket")
async def test_a_task_follows_its_own_allocation_through_its_socket(
        short_agent_factory: AgentFactory) -> None:
    agent = short_agent_factory(acl=True)
    await agent.start()
    management = await bootstrap_acls(agent)
    async with agent.api(management) as api:
        # As in Nomad, a workload identity reads allocations only through its job's policy.
        await api.acl_policy_apply({"Name": "watcher-reads", "Rules": READ_JOB,
                                    "JobACL": {"Namespace": "default", "JobID": "watcher"}})
        await run_job(api, raw_exec_job("bystander", "exec sleep 300"))
        allocs = await run_job(api, raw_exec_job("watcher", FOLLOW_OWN_ALLOC,
                                                 identity={"Env": True}))
        alloc_id = allocs[0]["ID"]
        local = local_dir(agent, alloc_id)
        seen = await eventually(lambda: (local / "seen").exists() and (local / "seen").read_text(),
                                timeout=30, message="the task's marker")
    assert (local / "node-status").read_text() == "403"
    batch = json.loads(seen)
    assert batch["Events"], batch
    for event in batch["Events"]:
        assert (event["Topic"], event["Key"], event["Namespace"]) == (
            "Allocation", alloc_id, "default")
        assert event["FilterKeys"] == ["watcher"]
        assert event["Payload"]["Allocation"]["ID"] == alloc_id
        assert event["Payload"]["Allocation"]["Job"] is None
    assert "AllocationUpdated" in {e["Type"] for e in batch["Events"]}


async def test_python_nomad_follows_a_jobs_events(agent_factory: AgentFactory) -> None:
    agent = agent_factory(acl=True)
    await agent.start()
    management = await bootstrap_acls(agent)
    client = nomad.Nomad(address=agent.address, token=management, timeout=15)
    thread, stop, events = client.event.stream.get_stream(
        topic=["Job:followed"], namespace="default", timeout=None)
    thread.start()
    try:
        async with agent.api(management) as api:
            await run_job(api, raw_exec_job("ignored", "exec sleep 300"))
            await run_job(api, raw_exec_job("followed", "exec sleep 300"))
        batch: dict[str, Any] = await asyncio.to_thread(events.get, timeout=30)
    finally:
        # The stream thread looks at ``stop`` after each line it reads; the agent's parting
        # line on shutdown is one.
        stop.set()
        await agent.stop()
        await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive()
    assert [(e["Topic"], e["Type"], e["Key"]) for e in batch["Events"]] == [
        ("Job", "JobRegistered", "followed")]
    assert batch["Events"][0]["Payload"]["Job"]["ID"] == "followed"
    leftovers = []
    while not events.empty():
        leftovers.append(events.get_nowait())
    # Only the parting line may follow: nothing about the other job.
    assert all("Events" not in line or all(e["Key"] == "followed" for e in line["Events"])
               for line in leftovers), leftovers
