"""The Task API page's example, end to end, and the project's own CLI used from inside a task
over its socket (``NOMAD_ADDR=$NOMAD_UNIX_ADDR``)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable

import pytest

from tests.integration.harness import (
    AgentProcess,
    eventually,
    load_job,
    raw_exec_job,
    run_job,
    task_dir,
    wait_client_status,
)


async def test_spec_example_sets_dynamic_metadata_seen_by_node_filter(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the example's task runs the system curl, which is not installed")
    agent = short_agent_factory()
    await agent.start()
    async with agent.api() as api:
        (alloc,) = await run_job(api, load_job("taskapi-example.nomad.hcl"))
        done = await wait_client_status(api, alloc["ID"], "complete", "failed")
        assert done["ClientStatus"] == "complete", done["TaskStates"]

        async def filtered() -> list[dict[str, object]]:
            return await api.nodes_list(filter='Meta.example == "Hello World!"')
        (node,) = await eventually(filtered, timeout=2, message="node visible to the filter")
        meta = await api.client_metadata_read()
        assert meta["Dynamic"] == {"example": "Hello World!"}
        assert (await api.node_get(node["ID"]))["Meta"]["example"] == "Hello World!"
        # the token was the task's workload identity, sent over its socket: no other way in
        assert not (task_dir(agent, alloc["ID"], "taskapi") / "secrets" / "api.sock").exists()


async def test_project_cli_works_from_inside_a_task_over_its_socket(
        agent: AgentProcess) -> None:
    # The default test data dir is long: the socket path exceeds sun_path's 108 bytes, which
    # the API client handles by connecting through the directory's descriptor.
    script = (f'NOMAD_ADDR="$NOMAD_UNIX_ADDR" {sys.executable} -m nomad_client node meta apply '
              f'from_task=yes && NOMAD_ADDR="$NOMAD_UNIX_ADDR" {sys.executable} -m nomad_client '
              f'node meta read > "$NOMAD_TASK_DIR/meta.txt" 2>&1; echo $? > "$NOMAD_TASK_DIR/rc"')
    async with agent.api() as api:
        (alloc,) = await run_job(api, raw_exec_job("cli-in-task", script, job_type="batch",
                                                   identity={"Env": True}))
        await wait_client_status(api, alloc["ID"], "complete", "failed")
        local = task_dir(agent, alloc["ID"], "t") / "local"
        output = (local / "meta.txt").read_text()
        assert (local / "rc").read_text().strip() == "0", output
        assert "from_task = yes" in output
        assert (await api.client_metadata_read())["Meta"]["from_task"] == "yes"
