"""``alloc logs -f`` (and the top-level ``logs``) against a real agent and a real task that
prints a line every 0.2 s: lines show up while the task still runs, the command exits when
the task ends, a tail of lines works, and Ctrl-C ends a follow quietly.

Touches only the agent the fixture starts, the CLI processes it runs, and their output.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from nomad_client.api import ApiClient
from tests.integration.harness import (
    REPO,
    AgentProcess,
    raw_exec_job,
    run_job,
    wait_client_status,
    wait_task_state,
)

LINES = 15
TICKER = f'i=1; while [ $i -le {LINES} ]; do echo "line-$i"; i=$((i+1)); sleep 0.2; done'
FOLLOW_TIMEOUT = 30.0


async def start_cli(agent: AgentProcess, *args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    env["NOMAD_ADDR"] = agent.address
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nomad_client", *args, cwd=str(REPO), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def read_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), FOLLOW_TIMEOUT)).decode()


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), FOLLOW_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the CLI did not finish") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def running_alloc(api: ApiClient, job_id: str, script: str, job_type: str) -> str:
    [stub] = await run_job(api, raw_exec_job(job_id, script, job_type=job_type))
    await wait_task_state(api, stub["ID"], "t", "running")
    return str(stub["ID"])


async def test_logs_follow_shows_lines_as_they_come_and_ends_with_the_task(
        agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "ticker", TICKER, "batch")
        proc = await start_cli(agent, "alloc", "logs", "-f", alloc_id[:8])
        first = await read_line(proc)
        # The first line is here while the task is still writing the rest.
        assert first == "line-1\n"
        alloc = await api.allocation_get(alloc_id)
        assert alloc["TaskStates"]["t"]["State"] == "running", alloc["ClientStatus"]
        code, rest, err = await finish(proc)  # returns once the task has ended
        assert code == 0, err
        assert first + rest == "".join(f"line-{i}\n" for i in range(1, LINES + 1))
        await wait_client_status(api, alloc_id, "complete")

    tail = await start_cli(agent, "logs", "-tail", "-n", "2", alloc_id)
    code, out, err = await finish(tail)
    assert (code, out) == (0, f"line-{LINES - 1}\nline-{LINES}\n"), err

    log_file = "alloc/logs/t.stdout.0"
    code, out, err = await finish(await start_cli(agent, "fs", "-tail", "-c", "8", alloc_id,
                                                  log_file))
    assert (code, out) == (0, f"line-{LINES}\n"), err
    code, out, err = await finish(await start_cli(agent, "alloc", "fs", "-stat", alloc_id,
                                                  log_file))
    assert code == 0, err
    assert out.splitlines()[1].split()[-1] == "t.stdout.0", out


async def test_ctrl_c_ends_a_follow_of_a_random_job_alloc_quietly(agent: AgentProcess) -> None:
    async with agent.api() as api:
        await running_alloc(api, "forever", "while true; do echo tick; sleep 0.2; done",
                            "service")
        proc = await start_cli(agent, "alloc", "logs", "-f", "-job", "forever")
        assert await read_line(proc) == "tick\n"
        assert await read_line(proc) == "tick\n"  # still following
        proc.send_signal(signal.SIGINT)
        code, _, err = await finish(proc)
        assert code == 0, err
        assert "Traceback" not in err
