"""Allocation control: a user's stop (``/v1/allocation/:id/stop``, replaced by the scheduler
under the same name), restart and signal (``/v1/client/allocation/:id/{restart,signal}``,
carried out by the task runners), through the server, the runners, raw_exec and the HTTP
API, with the ``alloc-lifecycle`` capability checked for workload identities.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.allocrunner.alloc_runner import AllocRunner
from nomad_client.client.drivers import DriverError
from nomad_client.client.drivers.mock import MockDriver
from nomad_client.server.alloc_control import STOPPED_BY_USER
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import NotFound, Server
from nomad_client.structs.models import (
    ACLPolicy,
    Allocation,
    AllocUpdate,
    DesiredTransition,
    PolicyJobACL,
)
from tests.unit.factories import (
    InProcessAgent,
    call_http,
    identity_token,
    job,
    make_server,
    node,
    start_agent,
    wait_until,
)
from tests.unit.test_cli import Nomad, cli, mock_job, newest_eval
from tests.unit.test_drivers import TrackingDriver, sh, started  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(60)

NS = 1_000_000_000
NO_RESTARTS = {"Attempts": 0, "Interval": 60 * NS, "Delay": 0, "Mode": "fail"}
LIFECYCLE_RULES = 'namespace "default" { capabilities = ["alloc-lifecycle"] }'
READ_RULES = 'namespace "default" { capabilities = ["read-job"] }'
DENIED = (403, "Permission denied")


def live(server: Server, job_id: str = "web") -> list[Allocation]:
    return sorted((a for a in server.job_allocs(job_id) if a.desired_status == "run"),
                  key=lambda a: a.name)


# ---- the server: a stopped allocation is replaced ----------------------------------------
async def test_a_stopped_allocation_is_replaced_under_its_name_index(keyring: Keyring) -> None:
    server = make_server(keyring)
    await server.register_node(node("n1"))
    await server.register_job(job(count=2))
    target = next(a for a in live(server) if a.index == 1)

    eval_id, index = await server.stop_allocation(target.id, no_shutdown_delay=True)

    stopped = server.allocation(target.id)
    assert stopped is not None
    assert (stopped.desired_status, stopped.desired_description) == ("stop", STOPPED_BY_USER)
    assert stopped.desired_transition == DesiredTransition(migrate=True, no_shutdown_delay=True)
    assert stopped.alloc_modify_index > target.alloc_modify_index  # its client sees it
    now = live(server)
    assert [a.name for a in now] == ["web.g[0]", "web.g[1]"]
    replacement = now[1]
    assert replacement.id != target.id and replacement.eval_id == eval_id
    evaluation = server.evaluation(eval_id)
    assert evaluation is not None and evaluation.triggered_by == "alloc-stop"
    assert index == server.store.index

    # Stopping it again marks it again and evaluates, but places nothing more.
    again, _ = await server.stop_allocation(target.id)
    assert again != eval_id and len(live(server)) == 2
    marked = server.allocation(target.id)
    assert marked is not None and marked.desired_transition == DesiredTransition(migrate=True)
    with pytest.raises(NotFound):
        await server.stop_allocation("no-such-alloc")


async def test_a_finished_batch_allocation_that_is_stopped_runs_again(keyring: Keyring) -> None:
    server = make_server(keyring)
    await server.register_node(node("n1"))
    await server.register_job(job(Type="batch"))
    (done,) = live(server)
    await server.update_allocs_from_client([AllocUpdate(done.id, "complete", "", {})])
    await server.register_job(job(Type="batch"))  # a new version: finished work is not redone
    assert live(server) == [server.allocation(done.id)]

    await server.stop_allocation(done.id)
    (rerun,) = live(server)
    assert rerun.id != done.id and rerun.name == done.name


# ---- the runners: restart and signal ---------------------------------------------------
@attrs.define
class Agent:
    """An in-process agent (ACLs on) running mock tasks, a management token and HTTP."""

    agent: InProcessAgent
    session: aiohttp.ClientSession
    management: str
    driver: MockDriver

    @property
    def server(self) -> Server:
        return self.agent.server

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None
                   ) -> tuple[int, Any]:
        answer = await call_http(self.session, self.agent.api.url, method, path, body,
                                 token=self.management if token is None else token)
        return answer.status, answer.body

    def runner(self, alloc_id: str) -> AllocRunner:
        assert self.agent.client is not None
        return self.agent.client.runners[alloc_id]

    async def run(self, job_id: str, tasks: dict[str, str], *, job_type: str = "service",
                  restart: dict[str, Any] | None = None) -> Allocation:
        """Register a job of mock tasks (name -> run_for) and wait until each runs, or, if
        it runs for "0s", has finished."""
        spec = {"ID": job_id, "Type": job_type, "Datacenters": ["dc1"], "TaskGroups": [{
            "Name": "g", "Count": 1, "RestartPolicy": restart or NO_RESTARTS,
            "Tasks": [{"Name": name, "Driver": "mock_driver", "KillTimeout": NS // 10,
                       "Config": {"run_for": run_for}} for name, run_for in tasks.items()]}]}
        await self.server.register_job(spec)
        (alloc,) = self.server.job_allocs(job_id)
        assert self.agent.client is not None
        runners = self.agent.client.runners

        def settled() -> bool:
            runner = runners.get(alloc.id)
            if runner is None or len(runner.task_runners) < len(tasks):
                return False
            return all(tr.finished if tasks[name] == "0s" else tr.running
                       for name, tr in runner.task_runners.items())
        await wait_until(settled, f"the tasks of {job_id} to run")
        return alloc

    async def attach(self, name: str, rules: str, job_id: str) -> None:
        await self.server.acls.upsert_policy(ACLPolicy(
            name=name, rules=rules, job_acl=PolicyJobACL(namespace="default", job_id=job_id)))

    def identity(self, alloc: Allocation, task: str = "t") -> str:
        return identity_token(self.server.keyring, alloc, task)


@pytest.fixture
async def agent(workdir: Path, keyring: Keyring) -> AsyncIterator[Agent]:
    driver = MockDriver()
    started_agent = await start_agent(workdir, keyring, acl=True, drivers={"mock_driver": driver})
    try:
        management = await started_agent.server.acls.bootstrap()
        async with aiohttp.ClientSession() as session:
            yield Agent(started_agent, session, management.secret_id, driver)
    finally:
        await started_agent.stop()


def events(runner: AllocRunner, task: str) -> list[tuple[str, str]]:
    return [(e.type, e.display_message) for e in runner.task_runners[task].state.events]


async def test_a_user_restart_does_not_count_against_the_restart_policy(agent: Agent) -> None:
    # One restart allowed, the next one fails the task: two counted restarts would end it.
    alloc = await agent.run("web", {"t": "1h"}, restart={**NO_RESTARTS, "Attempts": 1})
    runner = agent.runner(alloc.id)
    task = runner.task_runners["t"]
    for count in (1, 2):
        before = task.handle
        assert before is not None
        assert await agent.call("POST", f"/v1/client/allocation/{alloc.id}/restart",
                                {"TaskName": "t"}) == (200, {"Index": 0})
        # The call returns once the task has exited for the restart.
        with pytest.raises(DriverError):
            await agent.driver.signal_task(before, "SIGUSR1")
        await wait_until(lambda: task.running, "the task to run again")
        assert task.handle is not before
        assert task.state.restarts == count and not task.state.failed
    assert task.restarts.count == 0
    assert [kind for kind, _ in events(runner, "t")][-5:] == [
        "Restart Signaled", "Terminated", "Restarting", "Task Setup", "Started"]
    signaled = [e for e in task.state.events if e.type == "Restart Signaled"]
    assert [e.restart_reason for e in signaled] == ["User requested task to restart"] * 2
    assert signaled[-1].display_message == "User requested task to restart"


async def test_restart_targets_and_refusals(agent: Agent) -> None:
    alloc = await agent.run("batch", {"t": "1h", "short": "0s"}, job_type="batch")
    runner = agent.runner(alloc.id)
    path = f"/v1/client/allocation/{alloc.id}/restart"
    # Nothing named: every running task (an empty body is fine, as in Nomad).
    assert await agent.call("PUT", path) == (200, {"Index": 0})
    await wait_until(lambda: runner.task_runners["t"].running, "t to run again")
    assert runner.task_runners["t"].state.restarts == 1
    assert runner.task_runners["short"].state.restarts == 0  # finished: left alone
    reasons = [e.restart_reason for e in runner.task_runners["t"].state.events
               if e.type == "Restart Signaled"]
    assert reasons == ["User requested running tasks to restart"]

    assert await agent.call("PUT", path, {"TaskName": "short"}) == (
        400, "Task not running: short")
    assert await agent.call("PUT", path, {"TaskName": "nope"}) == (
        400, "Could not find task runner for task: nope")
    assert await agent.call("PUT", path, {"TaskName": "t", "AllTasks": True}) == (
        400, "task name cannot be set when restarting all tasks")
    assert await agent.call("PUT", path, {"AllTasks": "yes"}) == (
        400, "AllTasks must be a boolean")
    assert (await call_http(agent.session, agent.agent.api.url, "PUT", path, data=b"{",
                            token=agent.management)).status == 400
    unknown = "/v1/client/allocation/00000000-0000-4000-8000-000000000000/restart"
    assert (await agent.call("PUT", unknown))[0] == 404


async def test_signals_reach_the_task_through_its_driver(agent: Agent) -> None:
    alloc = await agent.run("sig", {"t": "1h", "short": "0s"}, job_type="batch")
    runner = agent.runner(alloc.id)
    task = runner.task_runners["t"]
    path = f"/v1/client/allocation/{alloc.id}/signal"
    assert await agent.call("POST", path, {"Task": "t", "Signal": "SIGUSR1"}) == (
        200, {"Index": 0})
    assert await agent.call("POST", path, {"Signal": "hup"}) == (200, {"Index": 0})
    assert task.handle is not None
    assert agent.driver.signals_received(task.handle) == ["SIGUSR1", "SIGHUP"]
    signaling = [e for e in task.state.events if e.type == "Signaling"]
    assert [e.details for e in signaling] == [{"signal": "SIGUSR1"}, {"signal": "SIGHUP"}]
    assert signaling[0].display_message == "Task being sent a signal"

    assert await agent.call("POST", path, {"Task": "t", "Signal": "SIGNOPE"}) == (
        400, "failed to parse signal: invalid signal: SIGNOPE")
    assert (await agent.call("POST", path, {"Task": "t"}))[0] == 400  # Signal is required
    assert (await agent.call("POST", path, {"Task": "t", "Signal": 10}))[0] == 400
    assert await agent.call("POST", path, {"Task": "short", "Signal": "SIGUSR1"}) == (
        400, "Task not running: short")
    assert agent.driver.signals_received(task.handle) == ["SIGUSR1", "SIGHUP"]

    # SIGKILL ends the task; the policy then decides, as for any death.
    assert await agent.call("POST", path, {"Task": "t", "Signal": "SIGKILL"}) == (
        200, {"Index": 0})
    await wait_until(lambda: task.finished, "the killed task to be dead")
    assert task.state.failed
    assert await agent.call("POST", path, {"Signal": "SIGUSR1"}) == (
        400, "Task not running: no task of the allocation runs")
    assert (await agent.call("POST", path, {"Signal": "SIGUSR1"}, token=""))[0] == 403


async def test_alloc_lifecycle_is_needed_for_workload_identities(agent: Agent) -> None:
    ctl = await agent.run("ctl", {"t": "1h"})
    web = await agent.run("web", {"t": "1h"})
    token = agent.identity(ctl)
    calls = [("POST", f"/v1/client/allocation/{web.id}/signal", {"Signal": "SIGUSR1"}),
             ("PUT", f"/v1/client/allocation/{ctl.id}/restart", {"TaskName": "t"}),
             ("POST", f"/v1/allocation/{web.id}/stop", None)]

    # No policy attached to its job: nothing, its own allocation included.
    for method, path, body in calls:
        assert await agent.call(method, path, body, token) == DENIED, path
    # read-job is not enough either.
    await agent.attach("reader", READ_RULES, "ctl")
    for method, path, body in calls:
        assert await agent.call(method, path, body, token) == DENIED, path
    # alloc-lifecycle, attached to its job, is.
    await agent.attach("lifecycle", LIFECYCLE_RULES, "ctl")
    for method, path, body in calls:
        status, answer = await agent.call(method, path, body, token)
        assert status == 200, (path, answer)
    # The stopped allocation was replaced under its name; the restart ran.
    await wait_until(lambda: [a.name for a in live(agent.server, "web")] == ["web.g[0]"]
                     and live(agent.server, "web")[0].id != web.id, "web's replacement")
    assert agent.runner(ctl.id).task_runners["t"].state.restarts == 1
    # Another job's identity holds nothing.
    other = agent.identity(live(agent.server, "web")[0])
    assert await agent.call("POST", f"/v1/allocation/{ctl.id}/stop", None, other) == DENIED


async def test_stop_route_answers_as_nomad(agent: Agent) -> None:
    web = await agent.run("web", {"t": "1h"})
    answer = await call_http(agent.session, agent.agent.api.url, "PUT",
                             f"/v1/allocation/{web.id}/stop?no_shutdown_delay",
                             token=agent.management)
    assert answer.status == 200 and set(answer.body) == {"EvalID", "Index"}
    assert answer.nomad_index == answer.body["Index"] > 0
    evaluation = agent.server.evaluation(answer.body["EvalID"])
    assert evaluation is not None and evaluation.triggered_by == "alloc-stop"
    shown = (await agent.call("GET", f"/v1/allocation/{web.id}"))[1]
    assert shown["DesiredTransition"] == {"Migrate": True, "Reschedule": False,
                                          "ForceReschedule": False, "NoShutdownDelay": True}
    assert shown["DesiredStatus"] == "stop"
    # Its client kills its tasks.
    runner = agent.runner(web.id)
    await wait_until(lambda: runner.task_runners["t"].finished, "the stopped task to end")
    assert (await agent.call("PUT", "/v1/allocation/nope/stop"))[0] == 404
    assert (await agent.call("PUT", f"/v1/allocation/{web.id}/stop?reschedule=maybe"))[0] \
        == 400
    assert (await agent.call("GET", f"/v1/allocation/{web.id}/stop"))[0] == 405


# ---- raw_exec delivers signals through its executor --------------------------------------
TRAP = ('trap \'echo got-usr1 >> "$OUT"\' USR1; trap \'echo got-hup >> "$OUT"\' HUP; '
        'trap \'echo got-winch >> "$OUT"\' WINCH; echo ready >> "$OUT"; '
        'while :; do sleep 0.05; done')


async def test_raw_exec_signals_reach_the_task(workdir: Path, started: list[Any]) -> None:  # noqa: F811
    drv = TrackingDriver(started)
    out = workdir / "out.txt"
    handle = await drv.start_task(sh(workdir, TRAP, env={"PATH": "/usr/bin:/bin",
                                                          "OUT": str(out)}))

    def lines() -> list[str]:
        return out.read_text().split() if out.exists() else []
    await wait_until(lambda: "ready" in lines(), "the task to set its traps")
    # USR1 and HUP are relayed by the executor; WINCH goes to the task's group directly.
    for name, seen in (("SIGUSR1", "got-usr1"), ("HUP", "got-hup"), ("SIGWINCH", "got-winch")):
        await drv.signal_task(handle, name)
        await wait_until(lambda seen=seen: seen in lines(), f"the task to see {name}")
    with pytest.raises(DriverError, match="unknown signal"):
        await drv.signal_task(handle, "SIGBOGUS")

    await drv.signal_task(handle, "SIGKILL")
    result = await asyncio.wait_for(drv.wait_task(handle), 15)
    assert (result.exit_code, result.signal) == (128 + signal.SIGKILL, signal.SIGKILL)
    with pytest.raises(DriverError, match="not running"):
        await drv.signal_task(handle, "SIGUSR1")
    with contextlib.suppress(DriverError):
        await drv.destroy_task(handle)


# ---- the CLI ---------------------------------------------------------------------------
async def test_cli_alloc_signal_restart_stop_and_stats(capsys: pytest.CaptureFixture[str],
                                                       nomad: Nomad) -> None:  # noqa: F811
    await nomad.run_job(mock_job("web", tasks=("t", "u")))
    (alloc,) = nomad.server.job_allocs("web")
    client = nomad.client
    await wait_until(lambda: alloc.id in client.runners and all(
        tr.running for tr in client.runners[alloc.id].task_runners.values()), "web to run")
    tasks = client.runners[alloc.id].task_runners
    short = alloc.id[:8]

    assert await cli(capsys, "alloc", "signal", "-s", "SIGUSR1", "-task", "t", short) == (
        0, "", "")
    assert tasks["t"].handle is not None
    assert nomad.driver.signals_received(tasks["t"].handle) == ["SIGUSR1"]
    code, _, err = await cli(capsys, "alloc", "signal", "-s", "NOPE", short, "t")
    assert code == 1 and err.startswith("Error signalling allocation: ") \
        and "failed to parse signal: invalid signal: NOPE" in err
    code, _, err = await cli(capsys, "alloc", "restart", short, "nope")
    assert (code, err) == (1, "Could not find task named: nope, found:\n  * t\n  * u\n")
    code, _, err = await cli(capsys, "alloc", "restart", "-all-tasks", short, "t")
    assert (code, err) == (1, "The -all-tasks option is not allowed when restarting a "
                              "specific task.\n")

    assert await cli(capsys, "alloc", "restart", "-task", "u", short) == (0, "", "")
    await wait_until(lambda: tasks["u"].running, "u to run again")
    assert (tasks["u"].state.restarts, tasks["t"].state.restarts) == (1, 0)

    def reported_running() -> bool:
        # The CLI shows the servers' view, which the client's reports reach a moment later.
        served = nomad.server.allocation(alloc.id)
        states = served.task_states if served is not None else {}
        return all(name in states and states[name].state == "running" for name in ("t", "u"))
    await wait_until(reported_running, "the servers to hear that t and u run")
    code, out, _ = await cli(capsys, "alloc", "status", "-stats", short)
    assert code == 0
    lines = out.splitlines()
    at = lines.index('Task "t" is "running"')
    assert lines[at + 1:at + 4] == ["Task Resources:", "CPU        Memory",
                                    "0/100 MHz  0 B/300 MiB"]
    # The mock driver's tasks have no process: nothing measured.
    code, out, _ = await cli(capsys, "alloc", "status", short)
    assert code == 0 and "Task Resources:" not in out

    code, out, _ = await cli(capsys, "alloc", "stop", "-detach", short)
    assert code == 0
    stopped = nomad.server.allocation(alloc.id)
    assert stopped is not None and stopped.desired_status == "stop"
    assert out.strip() == newest_eval(nomad, "web")

    node_id = client.node_id
    code, out, _ = await cli(capsys, "node", "status", "-stats", node_id[:8])
    assert code == 0
    for title in ("Host Resource Utilization", "Detailed CPU Stats", "Memory Stats",
                  "Disk Stats"):
        assert title in out.splitlines(), title
    code, _, err = await cli(capsys, "node", "status", "-stats")
    assert code == 1 and "needs a node" in err
