"""Bad input to a real agent's HTTP API: every refusal carries the right status and a
plain-text message, the agent keeps serving, and nothing it had stored is lost. Also
blocking queries, the request size limit, and path confinement of the fs endpoints against
what a task can plant in its alloc dir.

Touches only the agents the fixtures start and the processes their tasks spawn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from nomad_client.api.client import ApiClient, ApiResponse
from tests.integration.harness import (
    AgentProcess,
    eventually,
    parse_raw_response,
    raw_exec_job,
    run_job,
    task_dir,
    wait_task_state,
)

KEEPER = "keeper"


@attrs.frozen
class Seeded:
    """An agent with one stored job, and what the store held right after it was stored."""

    agent: AgentProcess
    api: ApiClient
    job: dict[str, Any]
    evals: list[dict[str, Any]]


@pytest.fixture
async def seeded(agent: AgentProcess) -> AsyncIterator[Seeded]:
    # A job that can never be placed: stored state without any process to clean up.
    job = raw_exec_job(KEEPER, "true", extra_task={"Driver": "docker",
                                                    "Config": {"image": "busybox"}})
    async with agent.api() as api:
        await api.job_register(job)
        yield Seeded(agent, api, await api.job_get(KEEPER), await api.job_evaluations(KEEPER))


async def _assert_intact(seeded: Seeded) -> None:
    """The agent still answers, and holds exactly what it held before the bad request."""
    api = seeded.api
    assert (await api.agent_health())["server"]["ok"] is True
    jobs = await api.jobs_list()
    assert [j["ID"] for j in jobs] == [KEEPER]
    job = await api.job_get(KEEPER)
    assert job["ModifyIndex"] == seeded.job["ModifyIndex"]
    assert job["Version"] == seeded.job["Version"]
    assert await api.job_evaluations(KEEPER) == seeded.evals
    assert len(await api.nodes_list()) == 1


def _assert_error(resp: ApiResponse, status: int, *fragments: str) -> None:
    assert resp.status == status, (resp.status, resp.text())
    assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
    text = resp.text()
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def _register_body(**extra: Any) -> bytes:
    job = raw_exec_job("newjob", "true")
    return json.dumps({"Job": job, **extra}).encode()


JOB_WITHOUT_ID = json.dumps({"Job": {"Type": "service", "TaskGroups": []}}).encode()

BAD_REQUESTS: Mapping[str, tuple[str, str, bytes | None, int, str]] = {
    # name: (method, path, body, status, message fragment)
    "malformed-json": ("POST", "/v1/jobs", b'{"Job": {"ID": ', 400,
                       "Failed to decode request body"),
    "not-an-object": ("POST", "/v1/jobs", b'["Job"]', 400,
                      "Request body must be a JSON object"),
    # A key Nomad knows that this agent does not implement (a key Nomad does not know is
    # ignored, as Nomad's decoder ignores it).
    "unimplemented-field": ("POST", "/v1/jobs", _register_body(PolicyOverride=True), 400,
                            "PolicyOverride is not supported by this agent"),
    "missing-job": ("POST", "/v1/jobs", b"{}", 400, "Job must be specified"),
    "empty-body": ("POST", "/v1/jobs", b"", 400, "Request body is empty"),
    "job-without-id": ("PUT", "/v1/jobs", JOB_WITHOUT_ID, 400, "Job ID hasn't been provided"),
    "path-id-mismatch": ("POST", "/v1/job/other", _register_body(), 400,
                         "Job ID does not match name"),
    "wrong-method": ("PATCH", "/v1/jobs", None, 405, "Invalid method"),
    "wrong-method-job": ("DELETE", "/v1/jobs", None, 405, "Invalid method"),
    "unknown-job": ("GET", "/v1/job/no-such-job", None, 404, "job not found"),
    "unknown-alloc": ("GET", "/v1/allocation/9e3f0000-0000-0000-0000-000000000000", None, 404,
                      "alloc not found"),
    "unknown-node": ("GET", "/v1/node/9e3f0000-0000-0000-0000-000000000000", None, 404,
                     "node not found"),
    "filter-syntax": ("GET", "/v1/nodes?filter=Meta.rack%20%3D%3D", None, 400,
                      "failed to read filter expression"),
    "filter-unknown-field": ("GET", "/v1/nodes?filter=Bogus%20%3D%3D%20%22x%22", None, 400,
                             "unknown field 'Bogus'"),
    "index-not-a-number": ("GET", "/v1/jobs?index=abc", None, 400, "Invalid index"),
    "wait-not-a-duration": ("GET", "/v1/jobs?index=1&wait=soon", None, 400, "Invalid wait time"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_bad_request_is_refused_and_nothing_is_lost(seeded: Seeded, case: str) -> None:
    method, path, body, status, fragment = BAD_REQUESTS[case]
    headers = {"Content-Type": "application/json"} if body is not None else None
    resp = await seeded.api.request(method, path, data=body, headers=headers)
    _assert_error(resp, status, fragment)
    await _assert_intact(seeded)


async def test_blocking_query_times_out_with_same_index(seeded: Seeded) -> None:
    first = await seeded.api.request("GET", "/v1/jobs")
    assert first.status == 200 and first.index > 0
    started = time.monotonic()
    resp = await seeded.api.request("GET", "/v1/jobs",
                                    params={"index": first.index, "wait": "1s"})
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert 0.9 <= elapsed < 3, elapsed
    assert resp.index == first.index
    assert [j["ID"] for j in resp.json()] == [KEEPER]


def _tcp_queues(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) of this host's IPv4 TCP socket from ``local`` to ``remote``, as
    /proc/net/tcp shows them; None while there is no such socket."""
    def hex_address(address: tuple[str, int]) -> str:
        ip = int.from_bytes(socket.inet_aton(address[0]), sys.byteorder)
        return f"{ip:08X}:{address[1]:04X}"

    wanted = [hex_address(local), hex_address(remote)]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1:3] == wanted:
                tx_queue, rx_queue = fields[4].split(":")
                return int(tx_queue, 16), int(rx_queue, 16)
    return None


async def test_blocking_query_wakes_when_a_job_is_registered(seeded: Seeded) -> None:
    first = await seeded.api.request("GET", "/v1/jobs")
    host, _, port = seeded.agent.address.removeprefix("http://").rpartition(":")
    agent_address = (host, int(port))
    reader, writer = await asyncio.open_connection(*agent_address)
    try:
        started = time.monotonic()
        writer.write(f"GET /v1/jobs?index={first.index}&wait=20s HTTP/1.1\r\n"
                     "Host: localhost\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        blocked = asyncio.ensure_future(reader.read())
        ours = writer.get_extra_info("sockname")[:2]

        def agent_has_read_the_query() -> bool:
            # Our bytes acknowledged by the agent's host, and none left unread there.
            sent, received = _tcp_queues(ours, agent_address), _tcp_queues(agent_address, ours)
            return sent is not None and sent[0] == 0 and received is not None \
                and received[1] == 0

        await eventually(agent_has_read_the_query, interval=0.01,
                         message="the agent to read the blocking query")
        assert not blocked.done(), "the blocking query returned before anything changed"
        async with seeded.agent.api() as other:
            await other.job_register(raw_exec_job("waker", "true", extra_task={
                "Driver": "docker", "Config": {"image": "busybox"}}))
        resp = parse_raw_response(await asyncio.wait_for(blocked, 5))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert time.monotonic() - started < 5
    assert resp.status == 200 and resp.index > first.index
    assert "waker" in [j["ID"] for j in resp.json()]


async def test_oversized_body_is_refused_quickly(seeded: Seeded) -> None:
    # A raw client that reads the answer while it is still sending a 20 MiB body: its send
    # side may fail once the agent has answered and closed, the answer must still arrive.
    host, _, port = seeded.agent.address.removeprefix("http://").rpartition(":")
    size = 20 * 1024 * 1024
    chunk = b" " * (256 * 1024)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
            f"\r\nContent-Length: {size}\r\n\r\n").encode()
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send_body() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.create_task(send_body())
    try:
        answer = await asyncio.wait_for(_read_until_closed(reader), 10)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert time.monotonic() - started < 5
    _assert_error(parse_raw_response(answer), 413, "Request body too large")
    await _assert_intact(seeded)


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the agent sends until it closes; a reset after the answer counts as a
    close (the answer is what matters)."""
    chunks = []
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_jobs_parse_reports_the_broken_line(seeded: Seeded) -> None:
    hcl = 'job "x" {\n  type = "batch"\n  group "g" {\n    task "t" {\n      driver =\n' \
          '    }\n  }\n}\n'
    resp = await seeded.api.request("POST", "/v1/jobs/parse", json={"JobHCL": hcl})
    _assert_error(resp, 400, "Failed to parse job", ":5:")
    await _assert_intact(seeded)


# -- fs endpoints ------------------------------------------------------------------------

SNEAKY_SCRIPT = 'ln -s /etc "$NOMAD_TASK_DIR/escape" && echo linked && exec sleep 300'


async def test_fs_endpoints_stay_inside_the_alloc_dir(agent: AgentProcess) -> None:
    job = raw_exec_job("sneaky", SNEAKY_SCRIPT, identity={"File": True}, kill_timeout_s=1)
    async with agent.api() as api:
        allocs = await run_job(api, job)
        alloc_id = allocs[0]["ID"]
        await wait_task_state(api, alloc_id, "t", "running")
        await eventually(lambda: _logs_have(api, alloc_id, b"linked"), message="symlink")
        token_file = task_dir(agent, alloc_id, "t") / "secrets" / "nomad_token"
        token = await asyncio.to_thread(token_file.read_text)
        assert token.count(".") == 2  # a JWT, so the check below means something
        passwd = await asyncio.to_thread(Path("/etc/passwd").read_text)

        refusals = [
            ("cat", "../../etc/passwd"),
            ("cat", "/etc/passwd"),
            ("cat", "t/local/escape/passwd"),
            ("ls", "t/local/escape"),
            ("stat", "t/local/escape/passwd"),
            ("cat", "t/secrets/nomad_token"),
            ("cat", "t/SECRETS/../secrets/nomad_token"),
        ]
        for kind, path in refusals:
            resp = await api.request("GET", f"/v1/client/fs/{kind}/{alloc_id}",
                                     params={"path": path})
            assert 400 <= resp.status < 500, (kind, path, resp.status, resp.text())
            assert resp.headers["Content-Type"].startswith("text/plain"), (kind, path)
            text = resp.text()
            assert token not in text and "root:" not in text and passwd not in text, \
                (kind, path, text)

        listing = await api.fs_ls(alloc_id, "/")
        assert {"alloc", "t"} <= {e["Name"] for e in listing}
        # The task's own link shows up in a listing; it is only never followed out.
        local = await api.fs_ls(alloc_id, "t/local")
        assert "escape" in {e["Name"] for e in local}
        assert (await api.get("/v1/agent/health"))["client"]["ok"] is True


async def _logs_have(api: ApiClient, alloc_id: str, needle: bytes) -> bool:
    resp = await api.request("GET", f"/v1/client/fs/logs/{alloc_id}",
                             params={"task": "t", "type": "stdout", "plain": "true"})
    return resp.status == 200 and needle in resp.body


PLANTING_SCRIPT = (
    'mkfifo "$NOMAD_TASK_DIR/fifo" && ln -s /etc "$NOMAD_ALLOC_DIR/data/etc" && '
    'ln -s ../logs "$NOMAD_ALLOC_DIR/data/logs" && echo planted && exec sleep 300'
)


async def test_fs_endpoints_refuse_what_a_task_plants(agent: AgentProcess) -> None:
    """A FIFO (which would hang a reader), links in the shared alloc dir (to a host dir and
    even one pointing inside): each is refused with a plain 4xx, quickly, and the agent
    keeps serving; logs still come back as frames."""
    job = raw_exec_job("planter", PLANTING_SCRIPT, kill_timeout_s=1)
    async with agent.api() as api:
        allocs = await run_job(api, job)
        alloc_id = allocs[0]["ID"]
        await wait_task_state(api, alloc_id, "t", "running")
        await eventually(lambda: _logs_have(api, alloc_id, b"planted"), message="planted")
        # The task dir is not world-writable: a sibling task cannot swap its secrets dir.
        tdir = task_dir(agent, alloc_id, "t")
        assert (await asyncio.to_thread(tdir.stat)).st_mode & 0o777 == 0o755

        cases = [
            ("cat", "t/local/fifo", 400, "a FIFO"),
            ("ls", "alloc/data/etc", 403, "symlinks are not followed"),
            ("cat", "alloc/data/etc/passwd", 403, "symlinks are not followed"),
            ("stat", "alloc/data/logs", 403, "symlinks are not followed"),
            ("ls", "t/local/" + "x" * 300, 400, "too long"),
        ]
        for kind, path, status, fragment in cases:
            started = time.monotonic()
            resp = await api.request("GET", f"/v1/client/fs/{kind}/{alloc_id}",
                                     params={"path": path})
            assert time.monotonic() - started < 5, (kind, path)
            _assert_error(resp, status, fragment)

        stat = await api.fs_stat(alloc_id, "t/local/fifo")
        assert stat["FileMode"].startswith("p")
        resp = await api.request("GET", f"/v1/client/fs/logs/{alloc_id}",
                                 params={"task": "t", "type": "stdout"})
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
        frame = json.loads(resp.text())
        assert frame["File"] == "alloc/logs/t.stdout.0"
        assert base64.b64decode(frame["Data"]) == b"planted\n"
        assert frame["Offset"] == len(b"planted\n")
        assert (await api.get("/v1/agent/health"))["client"]["ok"] is True
