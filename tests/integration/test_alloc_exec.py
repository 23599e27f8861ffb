"""``alloc exec`` on real agents with real raw_exec tasks: the websocket endpoint driven by a
raw websocket client and by the CLI (also through a pty, as a person at a terminal would),
its ACL rules, ``disable_remote_exec``, and sessions ending with their task or client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pty
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nomad_client.api.client import ApiClient, ApiError
from tests.integration.conftest import _kill_leftover_tasks
from tests.integration.harness import (
    NEEDS_CURL,
    REPO,
    AgentProcess,
    bootstrap_acls,
    eventually,
    is_alive,
    new_marker,
    procs_with,
    raw_exec_job,
    run_job,
    wait_task_state,
)
from tests.integration.test_taskapi import api_sock, local_dir, start_task

pytestmark = pytest.mark.timeout(120)

EXEC_ONLY = 'namespace "default" { capabilities = ["alloc-exec"] }'
EXEC_AND_NODE_EXEC = 'namespace "default" { capabilities = ["alloc-exec", "alloc-node-exec"] }'
READ_ONLY = 'namespace "default" { policy = "read" }'
OPERATOR = """
namespace "default" {
  policy       = "read"
  capabilities = ["alloc-exec", "alloc-node-exec"]
}
node { policy = "read" }
"""


class ExecAgent(AgentProcess):
    """An agent whose client config also has the given ``client`` settings."""

    def __init__(self, data_dir: Path, client: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.client_settings = dict(client)

    def write_config(self) -> None:
        super().write_config()
        config = json.loads(self.config_path.read_text())
        config["client"].update(self.client_settings)
        self.config_path.write_text(json.dumps(config))


async def running_alloc(api: ApiClient, job_id: str, script: str = "sleep 300") -> str:
    allocs = await run_job(api, raw_exec_job(job_id, script))
    alloc_id: str = allocs[0]["ID"]
    await wait_task_state(api, alloc_id, "t", "running")
    return alloc_id


async def collect(ws: aiohttp.ClientWebSocketResponse) -> tuple[dict[str, bytes], list[Any]]:
    """Output by stream, and every frame that carried no data, until the socket closes."""
    output: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    others: list[Any] = []
    async for msg in ws:
        frame = json.loads(msg.data)
        data = next((frame[s]["data"] for s in output if "data" in frame.get(s, {})), None)
        if data is None:
            others.append(frame)
        else:
            stream = "stdout" if "stdout" in frame else "stderr"
            output[stream] += base64.b64decode(data)
    return output, others


async def cli(agent: AgentProcess, *args: str, token: str = "", stdin: bytes | None = None
              ) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    env.update(NOMAD_ADDR=agent.address, NOMAD_TOKEN=token)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nomad_client", *args, env=env, cwd=str(REPO),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin or b""), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ---- output and exit status --------------------------------------------------------------
async def test_raw_websocket_gets_output_frames_and_exit_status(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
        script = 'echo hi; echo oops >&2; pwd; echo "$NOMAD_ALLOC_ID"; exit 3'
        async with api.alloc_exec(alloc_id, "t", ["/bin/sh", "-c", script]) as ws:
            output, others = await collect(ws)
            assert ws.close_code == aiohttp.WSCloseCode.OK
    lines = output["stdout"].decode().splitlines()
    assert lines[0] == "hi"
    assert lines[1].endswith(f"/{alloc_id}/t")  # the task dir
    assert lines[2] == alloc_id  # the task's env
    assert output["stderr"] == b"oops\n"
    assert others == [{"stdout": {"close": True}}, {"stderr": {"close": True}},
                      {"exited": True, "result": {"exit_code": 3}}]


async def test_stdin_is_forwarded_and_closed(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
        async with api.alloc_exec(alloc_id, "t", ["/bin/sh", "-c", "tr a-z A-Z"]) as ws:
            await ws.send_str(json.dumps({"stdin": {"data": base64.b64encode(b"abc\n").decode()}}))
            await ws.send_str(json.dumps({"unknown": 1}))  # ignored, as Nomad does
            await ws.send_str(json.dumps({"stdin": {"close": True}}))
            output, others = await collect(ws)
    assert output["stdout"] == b"ABC\n"
    assert others[-1] == {"exited": True, "result": {}}


async def test_cli_output_and_exit_status(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
    code, out, err = await cli(agent, "alloc", "exec", "-i=false", alloc_id[:8],
                               "/bin/sh", "-c", "echo hello; echo warn >&2; exit 3")
    assert (code, out, err) == (3, "hello\n", "warn\n")
    # stdin forwarded (-i is the default), the command's own flags kept, -job picks an alloc.
    code, out, _ = await cli(agent, "exec", "-job", "j", "cat", "-n", stdin=b"x\n")
    assert (code, out.split()) == (0, ["1", "x"])


async def test_cli_refusals_are_reported(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
    code, _, err = await cli(agent, "alloc", "exec", "-task", "t", alloc_id, "/no/such/cmd")
    assert code == 1
    assert "failed to exec into task" in err and "no such file" in err
    code, _, err = await cli(agent, "alloc", "exec", "-task", "nope", alloc_id, "true")
    assert code == 1 and "nope" in err


async def test_interactive_pty_session_through_the_cli(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    env.update(NOMAD_ADDR=agent.address, TERM="dumb", PS1="$ ")
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nomad_client", "alloc", "exec", alloc_id, "/bin/sh",
        stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(REPO),
        start_new_session=True)
    os.close(slave)
    seen = bytearray()

    def read_until(needle: bytes) -> bool:
        try:
            seen.extend(os.read(master, 65536))
        except BlockingIOError:
            pass
        return needle in seen

    os.set_blocking(master, False)
    try:
        os.write(master, b"echo $((6*7)); tty\n")
        await eventually(lambda: read_until(b"42"), timeout=30, message="the command's output")
        await eventually(lambda: read_until(b"/dev/pts/"), message="a pty inside")
        os.write(master, b"exit 5\n")
        assert await asyncio.wait_for(proc.wait(), 30) == 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


# ---- sessions end ------------------------------------------------------------------------
async def test_session_ends_when_the_task_stops(agent: AgentProcess) -> None:
    marker = new_marker()
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
        async with api.alloc_exec(alloc_id, "t", ["/bin/sh", "-c", f"sleep 300 # {marker}"]
                                  ) as ws:
            await eventually(lambda: procs_with(marker), message="the exec'd command")
            await api.job_deregister("j")
            _, others = await asyncio.wait_for(collect(ws), 30)
    assert others[-1] == {"exited": True, "result": {"exit_code": 137}}
    assert not [p for p in procs_with(marker) if is_alive(p)]


async def test_client_going_away_kills_the_command(agent: AgentProcess) -> None:
    marker = new_marker()
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
        async with api.alloc_exec(alloc_id, "t", ["/bin/sh", "-c", f"sleep 300 # {marker}"]):
            found = await eventually(lambda: procs_with(marker), message="the exec'd command")
    await eventually(lambda: not any(is_alive(p) for p in found), message="the command killed")


async def test_agent_shutdown_kills_sessions(agent: AgentProcess) -> None:
    marker = new_marker()
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
        async with api.alloc_exec(alloc_id, "t", ["/bin/sh", "-c", f"sleep 300 # {marker}"]):
            found = await eventually(lambda: procs_with(marker), message="the exec'd command")
            await agent.stop()
    assert not any(is_alive(p) for p in found)


# ---- who may exec ------------------------------------------------------------------------
async def exec_status(api: ApiClient, alloc_id: str) -> int | str:
    """200 once the session ran (``true``), else the refusal's status and text."""
    try:
        async with api.alloc_exec(alloc_id, "t", ["true"]) as ws:
            _, others = await collect(ws)
    except ApiError as err:
        return f"{err.status} {err.body}"
    assert others[-1] == {"exited": True, "result": {}}
    return 200


async def test_acl_capabilities(agent_factory: Any) -> None:
    agent = agent_factory(acl=True)
    await agent.start()
    management = await bootstrap_acls(agent)
    tokens = {}
    async with agent.api(management) as api:
        alloc_id = await running_alloc(api, "j")
        for name, rules in (("exec", EXEC_ONLY), ("node-exec", EXEC_AND_NODE_EXEC),
                            ("read", READ_ONLY)):
            await api.acl_policy_apply({"Name": name, "Rules": rules})
            token = await api.acl_token_create({"Name": name, "Type": "client",
                                                "Policies": [name]})
            tokens[name] = token["SecretID"]
        assert await exec_status(api, alloc_id) == 200
    for name, expected in (("node-exec", 200), ("exec", "403 Permission denied"),
                           ("read", "403 Permission denied")):
        async with agent.api(tokens[name]) as api:
            assert await exec_status(api, alloc_id) == expected, name
    async with agent.api() as api:  # anonymous
        assert await exec_status(api, alloc_id) == "403 Permission denied"
    code, _, err = await cli(agent, "alloc", "exec", "-i=false", alloc_id, "true",
                             token=tokens["exec"])
    assert code == 1 and "Permission denied" in err


async def test_disable_remote_exec(tmp_path: Path) -> None:
    agent = ExecAgent(tmp_path / "a", {"disable_remote_exec": True})
    await agent.start()
    try:
        async with agent.api() as api:
            alloc_id = await running_alloc(api, "j")
            assert await exec_status(api, alloc_id) == "403 Permission denied"
            assert (await api.agent_self())["config"]["Client"]["DisableRemoteExec"] is True
    finally:
        await agent.kill()
        _kill_leftover_tasks(tmp_path)


@NEEDS_CURL
async def test_operator_calls_the_task_api_through_alloc_exec(short_agent_factory: Any
                                                              ) -> None:
    """The spec's operator case: ``alloc exec`` with an ACL token into a task, and from
    inside it the Task API socket with that token."""
    agent = short_agent_factory(acl=True)
    await agent.start()
    management = await bootstrap_acls(agent)
    async with agent.api(management) as api:
        alloc_id = await start_task(agent, api, raw_exec_job("j", "sleep 300"))
        # As Nomad's CLI, ours also reads the allocation (read-job) to find it.
        await api.acl_policy_apply({"Name": "ops", "Rules": OPERATOR})
        operator = (await api.acl_token_create({"Name": "ops", "Type": "client",
                                                "Policies": ["ops"]}))["SecretID"]
    script = ('curl -sS --unix-socket "$NOMAD_SECRETS_DIR/api.sock" '
              f'-H "X-Nomad-Token: {operator}" http://localhost/v1/client/metadata')
    code, out, err = await cli(agent, "alloc", "exec", "-i=false", alloc_id,
                               "/bin/sh", "-c", script, token=operator)
    assert code == 0, err
    assert "Meta" in json.loads(out)


# ---- an isolated task ----------------------------------------------------------------------
async def exec_driver_problem(api: ApiClient) -> str | None:
    """Why this node cannot run ``exec`` tasks (its fingerprint), or None."""
    nodes = await eventually(api.nodes_list, message="the node")
    node = await api.node_get(nodes[0]["ID"])
    info = (node.get("Drivers") or {}).get("exec")
    if info is None:
        return "this agent has no exec driver"
    if not info.get("Healthy"):
        return f"exec driver unhealthy: {info.get('HealthDescription')}"
    return None


async def test_exec_into_an_isolated_task_sees_its_root_and_processes(agent: AgentProcess
                                                                     ) -> None:
    async with agent.api() as api:
        problem = await exec_driver_problem(api)
        if problem is not None:
            pytest.skip(problem)
        job = raw_exec_job("iso", "")
        task = job["TaskGroups"][0]["Tasks"][0]
        task.update(Driver="exec", Config={"command": "/bin/sleep", "args": ["300"]})
        allocs = await run_job(api, job)
        alloc_id = allocs[0]["ID"]
        try:
            await wait_task_state(api, alloc_id, "t", "running")
            script = "ls /; tr '\\0' ' ' < /proc/1/cmdline; echo; id -u"
            async with api.alloc_exec(alloc_id, "t", ["/bin/sh", "-c", script]) as ws:
                output, others = await collect(ws)
        finally:
            # Stopped by its agent: a task in a chroot is beyond the harness's cleanup.
            await api.job_deregister("iso")
            await wait_task_state(api, alloc_id, "t", "dead")
    assert others[-1] == {"exited": True, "result": {}}, output
    lines = output["stdout"].decode().split()
    assert {"alloc", "local", "secrets"} <= set(lines)  # the task's chroot
    assert "/bin/sleep 300" in output["stdout"].decode()  # its pid 1 is the task
    assert lines[-1] != "0"  # as the task's user (nobody), not root


async def test_exec_into_an_isolated_task_holds_no_more_than_the_task(agent: AgentProcess
                                                                      ) -> None:
    """Every capability set of the command, bounding included, is the task's own."""
    async with agent.api() as api:
        problem = await exec_driver_problem(api)
        if problem is not None:
            pytest.skip(problem)
        job = raw_exec_job("caps", "")
        task = job["TaskGroups"][0]["Tasks"][0]
        task.update(Driver="exec", Config={"command": "/bin/sleep", "args": ["300"],
                                           "cap_add": ["kill"], "cap_drop": ["chown"]})
        allocs = await run_job(api, job)
        alloc_id = allocs[0]["ID"]
        try:
            await wait_task_state(api, alloc_id, "t", "running")
            script = "grep ^Cap /proc/1/status; echo --; grep ^Cap /proc/self/status"
            async with api.alloc_exec(alloc_id, "t", ["/bin/sh", "-c", script]) as ws:
                output, others = await collect(ws)
        finally:
            await api.job_deregister("caps")
            await wait_task_state(api, alloc_id, "t", "dead")
    assert others[-1] == {"exited": True, "result": {}}, output
    task_caps, command_caps = output["stdout"].decode().split("--\n")
    assert command_caps == task_caps
    assert "CapAmb:\t0000000000000020" in task_caps  # kill, added for a non-root user


# ---- hostile clients, browsers and the Task API socket -------------------------------------
async def test_bad_frames_end_the_session(agent: AgentProcess) -> None:
    async with agent.api() as api:
        alloc_id = await running_alloc(api, "j")
        async with api.alloc_exec(alloc_id, "t", ["cat"]) as ws:
            # A binary frame is read as JSON too, as Nomad's ReadJSON does.
            await ws.send_bytes(json.dumps({"stdin": {"data": base64.b64encode(b"x\n").decode()
                                                      }}).encode())
            assert json.loads((await ws.receive()).data) == {
                "stdout": {"data": base64.b64encode(b"x\n").decode()}}
            await ws.send_str('{"stdin": {"data": "***"}}')
            msg = await ws.receive()
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1007)
            assert "base64" in msg.extra
        async with api.alloc_exec(alloc_id, "t", ["cat"]) as ws:
            await ws.send_str("x" * (2 * 1024 * 1024))
            msg = await ws.receive()
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE,
                                            aiohttp.WSCloseCode.MESSAGE_TOO_BIG)


async def test_browser_handshake_carries_the_token(agent_factory: Any) -> None:
    agent = agent_factory(acl=True)
    await agent.start()
    management = await bootstrap_acls(agent)
    async with agent.api(management) as api:
        alloc_id = await running_alloc(api, "j")
    url = f"{agent.address}/v1/client/allocation/{alloc_id}/exec"
    params = {"task": "t", "command": '["echo","hi"]', "ws_handshake": "true"}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, params=params) as ws:
            await ws.send_str(json.dumps({"version": 1, "auth_token": management}))
            output, others = await collect(ws)
        assert output["stdout"] == b"hi\n"
        assert others[-1] == {"exited": True, "result": {}}
        for handshake, reason in (({"version": 2, "auth_token": management},
                                   "unexpected handshake value: 2"),
                                  ({"version": 1, "auth_token": "nope"}, "ACL token not found")):
            async with session.ws_connect(url, params=params) as ws:
                await ws.send_str(json.dumps(handshake))
                msg = await ws.receive()
                assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1008,
                                                           reason)


async def test_exec_through_a_task_api_socket(agent_factory: Any) -> None:
    agent = agent_factory(acl=True)
    await agent.start()
    management = await bootstrap_acls(agent)
    async with agent.api(management) as api:
        alloc_id = await start_task(agent, api, raw_exec_job("j", "sleep 300"))
    sock = api_sock(agent, alloc_id)
    async with ApiClient(f"unix://{sock}", token=management) as over_socket:
        async with over_socket.alloc_exec(alloc_id, "t", ["echo", "via socket"]) as ws:
            output, _ = await collect(ws)
        assert output["stdout"] == b"via socket\n"
        # The socket serves on: the session was one request.
        assert (await over_socket.get("/v1/agent/health")) is not None


# Each step N, once the test creates "go.N" in the task's local dir, asks the socket to exec
# into allocation $TARGET and leaves the HTTP status and body in "out.N" (a rename, so the
# test never reads half of it). Without upgrade headers, a caller allowed to exec learns
# only that it needs an upgrade (400); one that is not gets 403 first.
PROBE_EXEC = (
    'for n in 1 2 3; do while [ ! -e "$NOMAD_TASK_DIR/go.$n" ]; do sleep 0.05; done; '
    'curl -sS -g --unix-socket "$NOMAD_SECRETS_DIR/api.sock" -H "X-Nomad-Token: $NOMAD_TOKEN" '
    '-w " %{http_code}" "http://localhost/v1/client/allocation/$(cat "$NOMAD_TASK_DIR/target")'
    '/exec?task=t&command=%5B%22true%22%5D" > "$NOMAD_TASK_DIR/out.$n.tmp" 2>&1; '
    'mv "$NOMAD_TASK_DIR/out.$n.tmp" "$NOMAD_TASK_DIR/out.$n"; done; sleep 300')


@NEEDS_CURL
async def test_a_workload_identity_needs_a_job_policy_to_exec_elsewhere(
        short_agent_factory: Any) -> None:
    agent = short_agent_factory(acl=True)
    await agent.start()
    management = await bootstrap_acls(agent)
    async with agent.api(management) as api:
        victim = await start_task(agent, api, raw_exec_job("victim", "sleep 300"))
        prober = await start_task(agent, api, raw_exec_job(
            "prober", PROBE_EXEC, identity={"Env": True}))
        local = local_dir(agent, prober)
        (local / "target").write_text(victim)

        async def step(n: int) -> str:
            (local / f"go.{n}").touch()
            out = local / f"out.{n}"
            await eventually(out.exists, timeout=20, message=f"probe {n}")
            return out.read_text()

        assert await step(1) == "Permission denied 403"  # no policy attached to its job
        rules = {"Name": "prober-exec", "Rules": EXEC_ONLY,
                 "JobACL": {"Namespace": "default", "JobID": "prober"}}
        await api.acl_policy_apply(rules)
        # raw_exec runs on the node itself: alloc-exec alone is not enough.
        assert await step(2) == "Permission denied 403"
        await api.acl_policy_apply({**rules, "Rules": EXEC_AND_NODE_EXEC})
        assert await step(3) == "alloc exec needs a websocket upgrade 400"
