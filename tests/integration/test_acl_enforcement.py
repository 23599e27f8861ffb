"""ACL enforcement on real agents with ``acl { enabled = true }``: what a workload identity,
a client token, a management token, an expired or deleted token and a request without a
token may do, over the TCP API and a task's ``api.sock``.

Policies come from ``testdata/policies``. Every agent is bootstrapped through the API for
its management token; a token that must expire within the test is seeded into the server's
state before the agent starts, because the API refuses expirations under Nomad's 1 minute.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_client.api.client import ApiClient
from nomad_client.structs.models import TOKEN_CLIENT, ACLToken
from tests.integration.harness import (
    POLICY_DIR,
    AgentProcess,
    apply_policy,
    bootstrap_acls,
    client_token,
    eventually,
    load_job,
    raw_exec_job,
    run_job,
    wait_client_status,
)
from tests.integration.test_cli import cli
from tests.integration.test_taskapi import (
    FILE_IDENTITY,
    NS,
    api_sock,
    read_token,
    restarts,
    start_task,
)
from tests.integration.test_taskapi_auth import seed_acl_tokens

pytestmark = pytest.mark.timeout(60)

AgentFactory = Callable[..., AgentProcess]
SLEEP = "exec sleep 300"
METADATA = "/v1/client/metadata"
# A valid credential whose ACL lacks what the route needs (not a failed authentication).
DENIED = (403, "Permission denied")
EXAMPLE_JOB = "taskapi-example"
# The example's curl fails on a 403; retried quickly, so one attempt follows the policy.
RETRY_QUICKLY = {"Attempts": 40, "Interval": 60 * NS, "Delay": int(0.25 * NS), "Mode": "fail"}
# How far ahead of the agent's start the seeded token expires: room for the agent to start
# and a task to get its socket, so the token is seen to work before it is seen to expire.
EXPIRES_AFTER_S = 8.0


async def call(address: str, method: str, url: str, secret: str = "",
               body: Any = None) -> tuple[int, str]:
    """One request to ``address`` (the TCP API's URL, or ``unix://<task socket>``) with
    ``secret`` as its token (none if empty): status and body text."""
    async with ApiClient(address, token=secret) as client:
        resp = await client.request(method, url, json=body)
    return resp.status, resp.text()


def unix(sock: Path) -> str:
    return f"unix://{sock}"


async def acl_agent(factory: AgentFactory) -> tuple[AgentProcess, str]:
    """A started agent with ACLs enabled, and its management token."""
    agent = factory(acl=True)
    await agent.start()
    return agent, await bootstrap_acls(agent)


async def sleeping_task(agent: AgentProcess, management: str, job_id: str) -> tuple[str, Path]:
    """A running raw_exec task with a workload identity file: its alloc ID and socket."""
    async with agent.api(management) as api:
        alloc_id = await start_task(agent, api, raw_exec_job(job_id, SLEEP,
                                                             identity=FILE_IDENTITY))
    return alloc_id, api_sock(agent, alloc_id)


async def test_spec_example_is_refused_until_a_node_write_policy_is_attached_to_its_job(
        short_agent_factory: AgentFactory) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the example's task runs the system curl, which is not installed")
    agent, management = await acl_agent(short_agent_factory)
    job = load_job("taskapi-example.nomad.hcl")
    [group] = job["TaskGroups"]
    [task] = group["Tasks"]
    group["RestartPolicy"] = task["RestartPolicy"] = RETRY_QUICKLY
    async with agent.api(management) as api:
        (alloc,) = await run_job(api, job)
        alloc_id = alloc["ID"]

        async def refused_and_retried() -> bool:
            # A restart means a first attempt failed; its curl log says how.
            if await restarts(api, alloc_id, EXAMPLE_JOB) < 1:
                return False
            stderr = await api.alloc_logs(alloc_id, EXAMPLE_JOB, stderr=True)
            return b"< HTTP/1.1 403" in stderr
        await eventually(refused_and_retried, message="the identity's request refused (403)")
        assert "example" not in ((await api.client_metadata_read())["Dynamic"] or {})

        applied = await cli(agent, "acl", "policy", "apply", f"-token={management}",
                            "-namespace", "default", "-job", EXAMPLE_JOB, "example-node-write",
                            str(POLICY_DIR / "node-write.hcl"))
        assert applied.code == 0, applied.output
        assert applied.stdout.strip() == 'Successfully wrote "example-node-write" ACL policy!'

        done = await wait_client_status(api, alloc_id, "complete", "failed")
        assert done["ClientStatus"] == "complete", done["TaskStates"]
        assert (await api.client_metadata_read())["Dynamic"] == {"example": "Hello World!"}

        async def filtered() -> list[dict[str, Any]]:
            return await api.nodes_list(filter='Meta.example == "Hello World!"')
        (node,) = await eventually(filtered, timeout=5, message="node visible to the filter")
        assert (await api.node_get(node["ID"]))["Meta"]["example"] == "Hello World!"


async def test_management_token_works_through_a_tasks_socket(
        agent_factory: AgentFactory) -> None:
    agent, management = await acl_agent(agent_factory)
    _, sock = await sleeping_task(agent, management, "operator")

    status, body = await call(unix(sock), "POST", METADATA, management,
                              {"Meta": {"operator": "was here"}})
    assert status == 200, body
    for url in (METADATA, "/v1/job/operator", "/v1/acl/tokens", "/v1/agent/self"):
        status, body = await call(unix(sock), "GET", url, management)
        assert status == 200, f"GET {url}: {status} {body}"
    async with agent.api(management) as api:
        assert (await api.client_metadata_read())["Dynamic"] == {"operator": "was here"}


async def test_expired_and_deleted_tokens_are_refused_on_their_next_request(
        agent_factory: AgentFactory) -> None:
    agent = agent_factory(acl=True)
    expires_at = time.time() + EXPIRES_AFTER_S
    expiring = ACLToken(accessor_id=str(uuid.uuid4()), secret_id=str(uuid.uuid4()),
                        name="expiring", type=TOKEN_CLIENT, policies=("node-read",),
                        expiration_time=int(expires_at * 1e9))
    await seed_acl_tokens(agent.data_dir, expiring)
    await agent.start()
    management = await bootstrap_acls(agent)
    async with agent.api(management) as api:
        await apply_policy(api, "node-read", "node-read")
        deleted = await client_token(api, "to-be-deleted", "node-read")
    _, sock = await sleeping_task(agent, management, "holder")

    refusals = {agent.address: (403, "ACL token not found"), unix(sock): (403, "Forbidden")}
    for address in refusals:
        for secret in (expiring.secret_id, deleted["SecretID"]):
            status, body = await call(address, "GET", METADATA, secret)
            assert status == 200, f"{address}: {status} {body}"
    assert time.time() < expires_at, "the check ran after expiry: raise EXPIRES_AFTER_S"

    async with agent.api(management) as api:
        await api.acl_token_delete(deleted["AccessorID"])
    for address, refused in refusals.items():
        assert await call(address, "GET", METADATA, deleted["SecretID"]) == refused, address

    async def expired() -> bool:
        return (await call(agent.address, "GET", METADATA, expiring.secret_id))[0] != 200
    await eventually(expired, timeout=EXPIRES_AFTER_S + 5, message="the token to expire")
    assert time.time() >= expires_at
    for address, refused in refusals.items():
        assert await call(address, "GET", METADATA, expiring.secret_id) == refused, address


async def test_anonymous_policy_serves_tokenless_tcp_but_never_the_task_api(
        agent_factory: AgentFactory) -> None:
    agent, management = await acl_agent(agent_factory)
    _, sock = await sleeping_task(agent, management, "anon")
    write = {"Meta": {"anonymous": "yes"}}

    assert await call(agent.address, "POST", METADATA, body=write) == DENIED
    async with agent.api(management) as api:
        await apply_policy(api, "anonymous", "node-write")

    status, body = await call(agent.address, "POST", METADATA, body=write)
    assert status == 200, body
    async with agent.api(management) as api:
        assert (await api.client_metadata_read())["Dynamic"] == {"anonymous": "yes"}
    for method, payload in (("GET", None), ("POST", write)):
        assert await call(unix(sock), method, METADATA, body=payload) == (401, "Unauthorized")


async def test_reading_alloc_files_needs_read_fs(agent_factory: AgentFactory) -> None:
    agent, management = await acl_agent(agent_factory)
    script = f'echo "file contents" > "$NOMAD_TASK_DIR/out.txt"; {SLEEP}'
    async with agent.api(management) as api:
        alloc_id = await start_task(agent, api, raw_exec_job("files", script,
                                                             identity=FILE_IDENTITY))
        await apply_policy(api, "read-fs", "read-fs")
        await apply_policy(api, "namespace-read", "namespace-read")
        with_read_fs = (await client_token(api, "with-read-fs", "read-fs"))["SecretID"]
        without = (await client_token(api, "without-read-fs", "namespace-read"))["SecretID"]
    cat = f"/v1/client/fs/cat/{alloc_id}?path=t/local/out.txt"

    async def written() -> bool:
        return (await call(agent.address, "GET", cat, management))[0] == 200
    await eventually(written, message="the task's file")
    sock = api_sock(agent, alloc_id)
    for address in (agent.address, unix(sock)):
        assert await call(address, "GET", cat, with_read_fs) == (200, "file contents\n")
        assert await call(address, "GET", cat, without) == DENIED, address
        # The token is real: it reads what its policy grants.
        status, body = await call(address, "GET", f"/v1/allocation/{alloc_id}", without)
        assert status == 200, f"{address}: {status} {body}"


async def test_workload_identity_without_a_policy_is_refused(
        agent_factory: AgentFactory) -> None:
    agent, management = await acl_agent(agent_factory)
    async with agent.api(management) as api:
        await run_job(api, raw_exec_job("other", "exit 0", job_type="batch"))
    alloc_id, sock = await sleeping_task(agent, management, "bare")
    identity = read_token(agent, alloc_id)
    register = {"Job": raw_exec_job("planted", "exit 0", job_type="batch")}

    status, body = await call(unix(sock), "GET", "/v1/agent/health", identity)
    assert status == 200, body  # the identity itself is valid
    for method, url, payload in (("PUT", "/v1/jobs", register), ("POST", "/v1/jobs", register),
                                 ("GET", "/v1/jobs", None), ("GET", "/v1/job/bare", None),
                                 ("GET", "/v1/job/other", None),
                                 ("POST", METADATA, {"Meta": {"planted": "yes"}}),
                                 ("GET", "/v1/acl/tokens", None)):
        assert await call(unix(sock), method, url, identity, payload) == DENIED, f"{method} {url}"
    async with agent.api(management) as api:
        assert [j["ID"] for j in await api.jobs_list()] == ["bare", "other"]
        assert "planted" not in ((await api.client_metadata_read())["Dynamic"] or {})
