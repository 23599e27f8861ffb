"""``alloc exec`` without an agent: the frame codec, the endpoint's parameter checks and
refusals, who may exec (``alloc-exec``; ``alloc-node-exec`` for a task without filesystem
isolation), ``disable_remote_exec``, the CLI's escapes and argument split, and sessions run
through the real helper (on the host, and inside a PID and mount namespace of a process)."""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import json
import os
import pwd
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from nomad_client.agent.config import AgentFlags, build_agent_config
from nomad_client.allocrunner.alloc_runner import UnknownAllocation
from nomad_client.allocrunner.taskrunner.task_runner import ControlRefused
from nomad_client.cli.alloc_exec import EscapeFilter, exec_cmd, split_arguments
from nomad_client.cli.common import CommandError
from nomad_client.client.drivers import exec_helper
from nomad_client.client.drivers.base import DriverError, ExecTarget
from nomad_client.client.drivers.raw_exec import RawExecDriver
from nomad_client.client.exec_session import (
    ExecProcess,
    ExecRequest,
    ExecSession,
    ExecSessions,
    ExecStartError,
    ExecTask,
    FrameError,
    SessionEnd,
    decode_client_frame,
    encode_client_frames,
    exited_frame,
    output_frame,
)
from nomad_client.http.auth import authenticate_handshake, require_exec
from nomad_client.http.context import ACLS_DISABLED, TCP_LISTENER, Identity
from nomad_client.http.endpoints.alloc_exec import alloc_exec, parse_exec_query
from nomad_client.http.errors import HTTPError
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.server.keyring import Keyring
from nomad_client.structs.models import TOKEN_CLIENT, ACLPolicy, ACLToken, PolicyJobACL
from tests.unit.factories import identity_token, make_alloc, make_server, seed, wait_until
from tests.unit.test_drivers import sh

HOST = ExecTarget(env={"PATH": "/usr/bin:/bin", "GREETING": "hi"}, cwd="/")


# ---- frames ------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(("raw", "data", "close", "size"), [
    (json.dumps({"stdin": {"data": b64(b"ls\n")}}), b"ls\n", False, None),
    (json.dumps({"stdin": {"close": True}}), b"", True, None),
    (json.dumps({"stdin": {"data": b64(b"x"), "close": True}}), b"x", True, None),
    (json.dumps({"tty_size": {"height": 40, "width": 120}}), b"", False, (40, 120)),
    (json.dumps({}), b"", False, None),  # the Go client's heartbeat
    (json.dumps({"version": 1, "auth_token": "x", "extra": [1]}), b"", False, None),
    (json.dumps({"stdin": {"close": "yes"}}), b"", False, None),  # only true closes
    (json.dumps({"stdin": {"data": b64(b"\x00\xff")}}).encode(), b"\x00\xff", False, None),
])
def test_client_frames_decode(raw: str | bytes, data: bytes, close: bool,
                              size: tuple[int, int] | None) -> None:
    frame = decode_client_frame(raw)
    assert (frame.stdin_data, frame.stdin_close, frame.tty_size) == (data, close, size)


@pytest.mark.parametrize("raw", [
    "not json", "[1]", '"text"', b"\xff\xfe", '{"stdin": "x"}', '{"stdin": {"data": 5}}',
    '{"stdin": {"data": "***"}}', '{"stdin": {"data": "YWJ"}}',
    '{"tty_size": {"height": -1, "width": 80}}', '{"tty_size": {"height": 70000}}',
    '{"tty_size": {"height": true, "width": 80}}', '{"tty_size": {"width": "80"}}',
    '{"tty_size": []}', "[" * 200_000, '{"stdin": ' * 100_000,
])
def test_bad_client_frames_are_refused(raw: str | bytes) -> None:
    with pytest.raises(FrameError):
        decode_client_frame(raw)


def test_a_targets_env_is_never_shown() -> None:
    target = ExecTarget(env={"NOMAD_TOKEN": "s3cr3t-token"}, cwd="/", pid=7)
    assert "s3cr3t-token" not in repr(target) and "pid=7" in repr(target)


def test_server_frames_are_nomads() -> None:
    assert json.loads(output_frame("stderr", b"oops")) == {"stderr": {"data": b64(b"oops")}}
    assert json.loads(exited_frame(3)) == {"exited": True, "result": {"exit_code": 3}}
    assert json.loads(exited_frame(0)) == {"exited": True, "result": {}}
    frames = [json.loads(f) for f in encode_client_frames(data=b"a", close=True,
                                                          tty_size=(24, 80))]
    assert frames == [{"tty_size": {"height": 24, "width": 80}},
                      {"stdin": {"data": b64(b"a")}}, {"stdin": {"close": True}}]


# ---- parameters and refusals ---------------------------------------------------------------
def api_request(query: str, identity: Identity = ACLS_DISABLED, *, upgrade: bool = True,
                alloc_id: str = "a1") -> ApiRequest:
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="} if upgrade else {}
    raw = make_mocked_request("GET", f"/v1/client/allocation/{alloc_id}/exec?{query}",
                              headers=headers)
    return ApiRequest(raw, TCP_LISTENER, identity, {"alloc_id": alloc_id})


@pytest.mark.parametrize(("query", "reason"), [
    ('command=["ls"]', "must provide task name"),
    ("task=t", "command must be a JSON array"),
    ("task=t&command=ls", "command must be a JSON array"),
    ('task=t&command={"a":1}', "command must be a JSON array of strings"),
    ("task=t&command=[1,2]", "command must be a JSON array of strings"),
    ("task=t&command=[]", "command is not present"),
    ('task=t&command=[""]', "command is not present"),
    ('task=t&command=["a","b\\u0000c"]', "NUL"),
    ('task=t&command=["\\ud800"]', "valid UTF-8"),
    ('task=t&command=["ls"]&tty=maybe', "as a boolean"),
    (f"task=t&command={json.dumps(['x'] * 5000)}", "more than"),
])
def test_bad_parameters_are_400(query: str, reason: str) -> None:
    with pytest.raises(HTTPError) as err:
        parse_exec_query(api_request(query))
    assert err.value.status == 400
    assert reason in err.value.message


def test_undecodable_query_bytes_are_replaced_not_fatal() -> None:
    query = parse_exec_query(api_request("task=t&command=%5B%22%FF%ED%A0%80%22%5D"))
    assert set("".join(query.request.command)) == {"\ufffd"}


def test_parameters_parse() -> None:
    query = parse_exec_query(api_request('task=t&command=["/bin/sh","-c","echo $x"]&tty=true'))
    assert query.task == "t"
    assert query.request == ExecRequest(("/bin/sh", "-c", "echo $x"), tty=True)
    assert not query.handshake


@attrs.define
class FakeClient:
    """The local client as the exec endpoint sees it: allocation "a1" with task "t"."""

    target: ExecTarget = HOST
    remote_exec_disabled: bool = False
    exec_sessions: ExecSessions = attrs.field(factory=ExecSessions)
    node_id: str = "n"

    def exec_task(self, alloc_id: str, task: str) -> ExecTask:
        if alloc_id != "a1":
            raise UnknownAllocation(alloc_id)
        if task != "t":
            raise ControlRefused(task)

        async def target() -> ExecTarget:
            return self.target

        return ExecTask(target=target, stopped=asyncio.Event().wait)


def services(keyring: Keyring, client: FakeClient) -> Services:
    return Services(server=make_server(keyring), client=client,  # type: ignore[arg-type]
                    agent_config={}, member={})


async def refusal(call: Awaitable[Any]) -> tuple[int, str]:
    with pytest.raises(HTTPError) as err:
        await call
    return err.value.status, err.value.message


async def test_refusals_before_the_upgrade(keyring: Keyring) -> None:
    client = FakeClient()
    svc = services(keyring, client)
    good = 'task=t&command=["true"]'
    assert await refusal(alloc_exec(svc, api_request(good, alloc_id="a2"))) == (
        404, "Unknown allocation 'a2'")
    assert await refusal(alloc_exec(svc, api_request('task=x&command=["true"]'))) == (
        400, "unknown task name 'x'")
    assert await refusal(alloc_exec(svc, api_request(good, upgrade=False))) == (
        400, "alloc exec needs a websocket upgrade")
    client.remote_exec_disabled = True
    assert await refusal(alloc_exec(svc, api_request(good))) == (403, "Permission denied")


# ---- what a caller learns before it is authorized ---------------------------------------------
PROBES = (("a2", "t"), ("a1", "x"))  # an unknown allocation; an unknown task of a known one


@contextlib.asynccontextmanager
async def exec_server(svc: Services, identity: Identity) -> AsyncIterator[TestServer]:
    """The exec handler behind a real HTTP server (as the router calls it, with the caller
    the request's headers name), so a websocket client can talk to it."""
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await alloc_exec(svc, ApiRequest(request, TCP_LISTENER, identity,
                                                    dict(request.match_info)))
        except HTTPError as err:
            return web.Response(status=err.status, text=err.message)

    app = web.Application()
    app.router.add_get("/v1/client/allocation/{alloc_id}/exec", handler)
    async with TestServer(app) as server:
        yield server


async def _exec_outcome(server: TestServer, alloc_id: str, task: str, *,
                        handshake: str | None, first_frame: str | None = None
                        ) -> tuple[str, int | None, str]:
    """("http", status, body) for a refused upgrade, else ("close", code, reason) of the
    websocket after sending ``handshake`` (the token of a ``ws_handshake`` first frame) or
    ``first_frame`` as it is."""
    params = {"task": task, "command": '["true"]'}
    if handshake is not None:
        params["ws_handshake"] = "true"
    url = server.make_url(f"/v1/client/allocation/{alloc_id}/exec")
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, params=params)
        except aiohttp.WSServerHandshakeError as err:
            return "http", err.status, ""
        async with ws:
            if handshake is not None:
                await ws.send_str(first_frame or json.dumps({"version": 1,
                                                             "auth_token": handshake}))
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            return "close", msg.data, msg.extra or ""


async def test_handshake_callers_learn_nothing_before_they_are_authenticated(
        keyring: Keyring) -> None:
    server = make_server(keyring, acl=True)
    management = (await server.acls.bootstrap()).secret_id
    await seed(server, allocs=(make_alloc(id="a1"),))
    svc = attrs.evolve(services(keyring, FakeClient()), server=server)
    anonymous = await authenticate_handshake(server, {}, "", TCP_LISTENER)
    async with exec_server(svc, anonymous) as http:
        for alloc_id, task in PROBES:
            # Every probe upgrades alike; an unknown caller is refused by its handshake.
            assert await _exec_outcome(http, alloc_id, task, handshake="") == (
                "close", 1008, "Permission denied"), (alloc_id, task)
        # A caller allowed to know is told, by a close frame.
        assert await _exec_outcome(http, "a2", "t", handshake=management) == (
            "close", 1008, "Unknown allocation 'a2'")
        assert await _exec_outcome(http, "a1", "x", handshake=management) == (
            "close", 1008, "unknown task name 'x'")
        # A hostile handshake is the caller's error, not the agent's.
        outcome = await _exec_outcome(http, "a1", "t", handshake="", first_frame="[" * 200_000)
        assert outcome[:2] == ("close", 1008) and "handshake frame is not JSON" in outcome[2]


async def test_header_callers_without_alloc_exec_learn_nothing(keyring: Keyring) -> None:
    """As on the other allocation routes: 403 before 404 for a caller without the
    capability in the request's namespace."""
    server = make_server(keyring, acl=True)
    await seed(server, allocs=(make_alloc(id="a1"),))
    svc = attrs.evolve(services(keyring, FakeClient()), server=server)
    anonymous = await authenticate_handshake(server, {}, "", TCP_LISTENER)
    for alloc_id, task in PROBES:
        request = api_request(f'task={task}&command=["true"]', anonymous, alloc_id=alloc_id)
        assert await refusal(alloc_exec(svc, request)) == (403, "Permission denied")


async def test_the_request_names_the_namespace_the_caller_holds_alloc_exec_in(
        keyring: Keyring) -> None:
    """As on the other allocation routes (the API client sends the allocation's)."""
    server = make_server(keyring, acl=True)
    await seed(server, allocs=(make_alloc(id="a1", namespace="prod"),))
    await server.acls.upsert_policy(ACLPolicy(name="prod", rules=OTHER_NS))
    token = await server.acls.upsert_token(ACLToken(
        accessor_id="", secret_id="", name="prod", type=TOKEN_CLIENT, policies=("prod",)))
    caller = await authenticate_handshake(server, {}, token.secret_id, TCP_LISTENER)
    svc = attrs.evolve(services(keyring, FakeClient()), server=server)
    query = 'task=t&command=["true"]'
    assert await refusal(alloc_exec(svc, api_request(query, caller))) == (
        403, "Permission denied")
    # Allowed: only the missing upgrade is left to refuse.
    assert await refusal(alloc_exec(svc, api_request(
        query + "&namespace=prod", caller, upgrade=False))) == (
        400, "alloc exec needs a websocket upgrade")


# ---- who may exec ----------------------------------------------------------------------------
EXEC = 'namespace "default" { capabilities = ["alloc-exec"] }'
NODE_EXEC = 'namespace "default" { capabilities = ["alloc-exec", "alloc-node-exec"] }'
NODE_EXEC_ONLY = 'namespace "default" { capabilities = ["alloc-node-exec"] }'
WRITE = 'namespace "default" { policy = "write" }'
OTHER_NS = 'namespace "prod" { capabilities = ["alloc-exec", "alloc-node-exec"] }'

# credential -> (may exec into an isolated task, may exec into a raw_exec task)
ACL_TABLE = {
    "management": (True, True),
    "exec": (True, False),
    "node-exec": (True, True),
    "node-exec-only": (False, False),
    "write": (True, False),  # namespace write includes alloc-exec, never alloc-node-exec
    "other-namespace": (False, False),
    "workload": (False, False),  # no policy attached to its job
    "workload+exec": (True, False),
    "workload+node-exec": (True, True),
}


async def test_acl_table(keyring: Keyring) -> None:
    server = make_server(keyring, acl=True)
    alloc = make_alloc()
    exec_job = make_alloc(job_id="exec-job")
    node_exec_job = make_alloc(job_id="node-exec-job")
    await seed(server, allocs=(alloc, exec_job, node_exec_job))
    secrets = {"management": (await server.acls.bootstrap()).secret_id}
    for name, rules in (("exec", EXEC), ("node-exec", NODE_EXEC),
                        ("node-exec-only", NODE_EXEC_ONLY), ("write", WRITE),
                        ("other-namespace", OTHER_NS)):
        await server.acls.upsert_policy(ACLPolicy(name=name, rules=rules))
        token = await server.acls.upsert_token(ACLToken(
            accessor_id="", secret_id="", name=name, type=TOKEN_CLIENT, policies=(name,)))
        secrets[name] = token.secret_id
    # Policies attached to a job: its workloads hold them, job "j"'s do not.
    for job_id, rules in (("exec-job", EXEC), ("node-exec-job", NODE_EXEC)):
        await server.acls.upsert_policy(ACLPolicy(
            name=job_id, rules=rules, job_acl=PolicyJobACL(namespace="default", job_id=job_id)))
    secrets["workload"] = identity_token(keyring, alloc)
    secrets["workload+exec"] = identity_token(keyring, exec_job)
    secrets["workload+node-exec"] = identity_token(keyring, node_exec_job)
    results = {}
    for name, secret in secrets.items():
        identity = await authenticate_handshake(server, {}, secret, TCP_LISTENER)
        results[name] = tuple(_allowed(identity, fs_isolated=isolated)
                              for isolated in (True, False))
    assert results == ACL_TABLE


def _allowed(identity: Identity, *, fs_isolated: bool) -> bool:
    try:
        require_exec(identity, "default", fs_isolated=fs_isolated)
    except HTTPError as err:
        assert (err.status, err.message) == (403, "Permission denied")
        return False
    return True


async def test_handshake_token_must_match_a_header_token(keyring: Keyring) -> None:
    server = make_server(keyring, acl=True)
    secret = (await server.acls.bootstrap()).secret_id
    with pytest.raises(HTTPError, match="mismatched"):
        await authenticate_handshake(server, {"X-Nomad-Token": "other"}, secret, TCP_LISTENER)
    identity = await authenticate_handshake(server, {"X-Nomad-Token": secret}, secret,
                                            TCP_LISTENER)
    assert identity.is_management
    with pytest.raises(HTTPError) as err:
        await authenticate_handshake(server, {}, "not-a-token", TCP_LISTENER)
    assert err.value.status == 403


# ---- disable_remote_exec ------------------------------------------------------------------
def test_disable_remote_exec_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.hcl"
    path.write_text('data_dir = "/tmp/x"\nclient {\n  enabled = true\n'
                    '  disable_remote_exec = true\n}\n')
    config = build_agent_config([path], AgentFlags())
    assert config.client.disable_remote_exec is True
    assert config.to_api_dict()["Client"]["DisableRemoteExec"] is True
    path.write_text('data_dir = "/tmp/x"\nclient {\n  enabled = true\n}\n')
    assert build_agent_config([path], AgentFlags()).client.disable_remote_exec is False
    path.write_text('data_dir = "/tmp/x"\nclient {\n  enabled = true\n'
                    '  disable_remote_exec = "yes"\n}\n')
    with pytest.raises(Exception, match="disable_remote_exec"):
        build_agent_config([path], AgentFlags())


# ---- the CLI's side --------------------------------------------------------------------------
@pytest.mark.parametrize(("chunks", "sent", "disconnect"), [
    ([b"ls\r"], b"ls\r", False),
    ([b"~."], b"", True),
    ([b"echo\r~", b"."], b"echo\r", True),
    ([b"a~.b"], b"a~.b", False),  # not at the start of a line
    ([b"~~x"], b"~x", False),
    ([b"~x"], b"~x", False),
    ([b"\n~.rest"], b"\n", True),
])
def test_escape_filter(chunks: list[bytes], sent: bytes, disconnect: bool) -> None:
    escapes = EscapeFilter(b"~")
    out, ended = b"", False
    for chunk in chunks:
        data, ended = escapes.feed(chunk)
        out += data
    assert (out, ended) == (sent, disconnect)
    assert EscapeFilter(None).feed(b"~.") == (b"~.", False)


@pytest.mark.parametrize(("argv", "flags", "rest"), [
    (["a1", "ls", "-la"], [], ["a1", "ls", "-la"]),
    (["-task", "t", "-t", "a1", "sh", "-t"], ["-task", "t", "-t"], ["a1", "sh", "-t"]),
    (["-it", "-e=none", "a1", "sh"], ["-i", "-t", "-e=none"], ["a1", "sh"]),
    (["-job", "--", "-weird-job", "ls"], ["-job"], ["-weird-job", "ls"]),
])
def test_flags_stop_at_the_first_argument(argv: list[str], flags: list[str],
                                          rest: list[str]) -> None:
    assert split_arguments(argv) == (flags, rest)


# ---- sessions, with the real helper ----------------------------------------------------------
@attrs.define
class FakeChannel:
    incoming: asyncio.Queue[str | bytes | None] = attrs.field(factory=asyncio.Queue)
    sent: list[dict[str, Any]] = attrs.field(factory=list)
    delay: float = 0.0

    async def send(self, frame: str) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.sent.append(json.loads(frame))

    async def receive(self) -> str | bytes | None:
        return await self.incoming.get()

    def output(self, stream: str = "stdout") -> bytes:
        return b"".join(base64.b64decode(f[stream]["data"]) for f in self.sent
                        if "data" in f.get(stream, {}))


async def session(command: list[str], channel: FakeChannel, *, tty: bool = False,
                  target: ExecTarget = HOST,
                  stopped: Callable[[], Awaitable[None]] | None = None) -> SessionEnd:
    process = await ExecProcess.start(target, ExecRequest(tuple(command), tty))
    return await ExecSession(process, channel, stopped or asyncio.Event().wait).run()


async def test_session_runs_a_command_with_the_targets_env_and_cwd() -> None:
    channel = FakeChannel()
    channel.incoming.put_nowait(json.dumps({"stdin": {"data": b64(b"in\n"), "close": True}}))
    end = await session(["/bin/sh", "-c", 'cat; echo "$GREETING"; pwd; echo e >&2; exit 4'],
                        channel)
    assert end == SessionEnd(exit_code=4)
    assert channel.output() == b"in\nhi\n/\n"
    assert channel.output("stderr") == b"e\n"
    assert channel.sent[-3:] == [{"stdout": {"close": True}}, {"stderr": {"close": True}},
                                 {"exited": True, "result": {"exit_code": 4}}]


async def test_tty_session_merges_output_and_resizes() -> None:
    channel = FakeChannel()
    channel.incoming.put_nowait(json.dumps({"tty_size": {"height": 33, "width": 101}}))
    channel.incoming.put_nowait(json.dumps({"stdin": {"data": b64(b"x\n")}}))
    end = await session(["/bin/sh", "-c", "read l; stty size; echo err >&2; tty"], channel,
                        tty=True)
    assert end == SessionEnd(exit_code=0)
    out = channel.output()
    assert b"33 101" in out and b"err" in out and b"/dev/pts/" in out
    assert not any("stderr" in f for f in channel.sent)


async def test_invalid_frame_or_client_gone_kills_the_command() -> None:
    for frame, expected in (("garbage", "invalid frame"), (None, None)):
        channel = FakeChannel()
        channel.incoming.put_nowait(frame)
        end = await asyncio.wait_for(session(["sleep", "300"], channel), 10)
        if expected is None:
            assert end == SessionEnd(client_gone=True)
        else:
            assert end.error is not None and expected in end.error


async def test_leftovers_of_a_tty_session_are_killed() -> None:
    """A background job in a process group of its own, deaf to the hangup, holding the pty:
    still in the session, so it goes with it."""
    marker = f"exec-leftover-{os.getpid()}"
    channel = FakeChannel()
    script = f"set -m; sh -c 'trap \"\" HUP; sleep 300; : {marker}' & echo started"
    end = await session(["/bin/sh", "-c", script], channel, tty=True)
    assert end.exit_code == 0 and b"started" in channel.output()
    await wait_until(lambda: not _marked(marker), "the leftover to die")


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes whose command line holds ``marker``."""
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if marker in " ".join(p.info["cmdline"] or ()) and p.pid != os.getpid()
            and p.info["status"] != psutil.STATUS_ZOMBIE]


async def test_leftovers_forking_while_the_session_ends_are_killed() -> None:
    """A background loop still forking while the session's leftovers are killed: a child
    forked after one scan of /proc is found by the next."""
    marker = f"exec-forker-{os.getpid()}"
    channel = FakeChannel()
    script = (f"set -m; sh -c 'trap \"\" HUP; while :; do sh -c \"sleep 300; : {marker}\" & "
              "sleep 0.002; done' & sleep 0.3; echo started")
    end = await session(["/bin/sh", "-c", script], channel, tty=True)
    assert end.exit_code == 0 and b"started" in channel.output()
    await wait_until(lambda: not _marked(marker), "every leftover to die", timeout=5)


async def test_task_stopping_ends_the_session() -> None:
    channel = FakeChannel()
    stop = asyncio.Event()
    running = asyncio.ensure_future(session(["sleep", "300"], channel, stopped=stop.wait))
    await asyncio.sleep(0)
    stop.set()
    end = await asyncio.wait_for(running, 10)
    assert end == SessionEnd(exit_code=137)


async def test_output_waits_for_a_slow_client() -> None:
    channel = FakeChannel(delay=0.002)
    end = await session(["head", "-c", "300000", "/dev/zero"], channel)
    assert end == SessionEnd(exit_code=0)
    assert channel.output() == b"\0" * 300000
    assert max(len(base64.b64decode(f["stdout"]["data"])) for f in channel.sent
               if "data" in f.get("stdout", {})) <= 4096


async def test_command_that_cannot_start_is_reported() -> None:
    with pytest.raises(ExecStartError, match="no such file"):
        await ExecProcess.start(HOST, ExecRequest(("/no/such/command",)))


async def test_sessions_end_on_close() -> None:
    sessions = ExecSessions()
    channel = FakeChannel()
    running = asyncio.ensure_future(sessions.run(session(["sleep", "300"], channel)))
    await wait_until(lambda: len(sessions), "the session running")
    await sessions.close()
    with pytest.raises(asyncio.CancelledError):
        await running
    with pytest.raises(Exception, match="shutting down"):
        await sessions.run(session(["true"], channel))


# ---- joining a process's namespaces ------------------------------------------------------
def test_helper_create_time_is_psutils() -> None:
    assert exec_helper.create_time(os.getpid()) == pytest.approx(
        psutil.Process().create_time(), abs=0.01)


async def test_reused_pid_is_refused() -> None:
    target = attrs.evolve(HOST, pid=os.getpid(), pid_create_time=1.0)
    with pytest.raises(ExecStartError, match="another process"):
        await ExecProcess.start(target, ExecRequest(("true",)))


NEEDS_UNSHARE = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="joining namespaces needs root and unshare(1)")


@NEEDS_UNSHARE
async def test_command_joins_the_pid_and_mount_namespace_of_the_target() -> None:
    isolated = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--mount", "--fork", "--mount-proc", "sleep", "300")
    child: psutil.Process | None = None
    try:
        def inner() -> psutil.Process | None:
            children = psutil.Process(isolated.pid).children()
            return children[0] if children else None
        child = await wait_until(inner, "the process in its namespaces")
        target = attrs.evolve(HOST, pid=child.pid, pid_create_time=child.create_time())
        channel = FakeChannel()
        end = await session(["/bin/sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$"],
                            channel, target=target)
        assert end == SessionEnd(exit_code=0)
        cmdline, pid = channel.output().decode().splitlines()
        assert cmdline.strip() == "sleep 300"  # its pid 1 is the target's
        assert int(pid) < 100  # a pid of the target's namespace
    finally:
        if child is not None:  # the namespace's pid 1 would outlive unshare
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        isolated.kill()
        await isolated.wait()


def _imports(module: Any) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"{node.module}.{alias.name}" if node.module == "nomad_client.client.drivers"
                 else str(node.module) for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}
    return imported - {"__future__"}


def test_helper_imports_only_the_standard_library() -> None:
    """And ``isolation``, the one home of the system calls, itself standard library only."""
    from nomad_client.client.drivers import isolation

    assert _imports(exec_helper) - {"nomad_client.client.drivers.isolation"} \
        <= sys.stdlib_module_names
    assert {name.split(".")[0] for name in _imports(isolation)} <= sys.stdlib_module_names


# ---- what the command gets, and what a hostile task cannot make the helper do -------------
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="changing users needs root")


def _cap_lines(status: bytes | str) -> list[str]:
    text = status.decode() if isinstance(status, bytes) else status
    return [line for line in text.splitlines() if line.startswith("Cap")]


@contextlib.asynccontextmanager
async def _process_holding(uid: int, caps: Any) -> Any:
    """A ``sleep`` running as ``uid`` with exactly the capability sets ``caps``."""
    from nomad_client.client.drivers import isolation

    process = await asyncio.create_subprocess_exec(
        "sleep", "300", preexec_fn=lambda: isolation.become_user(uid, uid, [], caps))
    try:
        # Wait for the exec: until then it is a copy of us.
        await wait_until(lambda: psutil.Process(process.pid).name() == "sleep", "the exec")
        yield process.pid
    finally:
        process.kill()
        await process.wait()


@NEEDS_ROOT
@pytest.mark.parametrize(("uid", "root"), [(65534, False), (0, True)])
async def test_command_gets_exactly_the_capabilities_of_the_task(uid: int, root: bool) -> None:
    """Bounding set included: the command never holds more than the task's process."""
    from nomad_client.client.drivers import isolation

    caps = isolation.CapabilitySets.for_task(
        [isolation.CAPABILITIES[n] for n in ("CHOWN", "KILL", "NET_BIND_SERVICE")],
        [isolation.CAPABILITIES["NET_BIND_SERVICE"]], root=root)
    async with _process_holding(uid, caps) as pid:
        target = attrs.evolve(HOST, pid=pid, pid_create_time=psutil.Process(pid).create_time(),
                              uid=uid, gid=uid, groups=())
        channel = FakeChannel()
        end = await session(["grep", "^Cap", "/proc/self/status"], channel, target=target)
        assert end == SessionEnd(exit_code=0), channel.output("stderr")
        expected = _cap_lines(Path(f"/proc/{pid}/status").read_text())
    assert _cap_lines(channel.output()) == expected
    assert int(expected[3].split()[1], 16) == caps.bounding  # CapBnd: not the full set


@NEEDS_UNSHARE
async def test_a_task_in_a_user_namespace_of_its_own_is_not_joined() -> None:
    """A task that made a user namespace (and a mount namespace under it) would have the
    helper enter a world it controls: refused, whatever else it joins."""
    owned = await asyncio.create_subprocess_exec(
        "unshare", "--user", "--map-root-user", "--mount", "sleep", "300")
    try:
        await wait_until(lambda: psutil.Process(owned.pid).name() == "sleep", "the exec")
        target = attrs.evolve(HOST, pid=owned.pid,
                              pid_create_time=psutil.Process(owned.pid).create_time())
        with pytest.raises(ExecStartError, match="user namespace of its own"):
            await ExecProcess.start(target, ExecRequest(("true",)))
    finally:
        owned.kill()
        await owned.wait()


@NEEDS_UNSHARE
async def test_the_command_inherits_only_its_stdio() -> None:
    """None of the helper's descriptors (namespaces, the task's root, its own pipes) leak."""
    isolated = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--ipc", "--uts", "sleep", "300")
    try:
        await wait_until(lambda: psutil.Process(isolated.pid).name() == "sleep", "the exec")
        target = attrs.evolve(HOST, pid=isolated.pid,
                              pid_create_time=psutil.Process(isolated.pid).create_time())
        for tty in (False, True):
            channel = FakeChannel()
            # The shell's glob reads the directory before any descriptor of its own opens.
            end = await session(["/bin/sh", "-c", "cd /proc/self/fd && echo *"], channel,
                                target=target, tty=tty)
            assert end == SessionEnd(exit_code=0)
            listed = channel.output().split()
            assert listed == [b"0", b"1", b"2", b"3"], listed
    finally:
        isolated.kill()
        await isolated.wait()


@pytest.mark.parametrize(("argv", "message"), [
    (["-t", "-i=false", "a1", "sh"], "-i must be enabled if running with tty"),
    (["-e", "xy", "a1", "sh"], "-e requires 'none' or a single character"),
    (["a1"], "at least 2 arguments"),
])
def test_cli_refuses_bad_flags_before_connecting(argv: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        exec_cmd(argv)


# ---- raw_exec's target ---------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="running a task as nobody needs root")
async def test_raw_exec_target_is_the_tasks_env_dir_and_user(workdir: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "NOMAD_TASK_NAME": "web", "WITH_SIGN": "a=b=c"}
    cfg = sh(workdir, "sleep 30", user="nobody", env=env)
    driver = RawExecDriver()
    handle = await driver.start_task(cfg)
    try:
        nobody = pwd.getpwnam("nobody")
        for fresh in (driver, RawExecDriver()):  # a new driver: as after an agent restart
            target = await fresh.exec_target(handle)
            assert dict(target.env) == env
            assert target.cwd == str(cfg.task_dir)
            assert (target.uid, target.gid) == (nobody.pw_uid, nobody.pw_gid)
            assert target.pid is None  # the host: no isolation to join
    finally:
        await driver.destroy_task(handle)
    with pytest.raises(DriverError, match="not running"):
        await driver.exec_target(handle)
