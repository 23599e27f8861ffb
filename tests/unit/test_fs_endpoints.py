"""The /v1/client/fs endpoints against a task that attacks them: symlinks planted or swapped
in while a request runs, FIFOs and devices, names too long, files vanishing mid-listing, and
log files built to exhaust the agent's memory. Served by a real router and listener over a
real alloc dir; every refusal must be a plain-text 4xx, never a 500 or a hang.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import stat
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.client.allocdir import AllocDir
from nomad_client.http.endpoints.client import LOG_FRAME_BYTES, MAX_LOG_BYTES
from nomad_client.server.keyring import Keyring
from tests.integration.harness import fds_on, sparse
from tests.unit.factories import OneAllocClient, make_server, serve_api, wait_until

IS_ROOT = os.geteuid() == 0
ALLOC_ID = "0b4f3c52-7d1e-4f7a-9c0e-2d51a6b3e9f1"
HOST_SECRET = "host-only secret"
MIB = 1024 * 1024


@attrs.frozen
class Agent:
    url: str
    adir: AllocDir
    host: Path  # a directory outside the alloc dir, standing for the host's files

    @property
    def local(self) -> Path:
        return self.adir.path / "web" / "local"


@pytest.fixture
async def agent(workdir: Path, keyring: Keyring) -> AsyncIterator[Agent]:
    adir = AllocDir(workdir / "alloc", ALLOC_ID)
    adir.build()
    adir.build_task_dir("web", None)
    (adir.path / "web" / "secrets" / "nomad_token").write_text("task-token")
    host = workdir / "host"
    host.mkdir()
    (host / "passwd").write_text(HOST_SECRET)
    (host / "web.stdout.0").write_text(HOST_SECRET)
    api = await serve_api(make_server(keyring), client=OneAllocClient(adir))
    try:
        yield Agent(api.url, adir, host)
    finally:
        await api.close()


async def get(agent: Agent, kind: str, timeout: float = 10, **params: str) -> tuple[int, bytes]:
    url = f"{agent.url}/v1/client/fs/{kind}/{ALLOC_ID}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
            s.get(url, params=params) as resp:
        body = await resp.read()
        if resp.status >= 400:
            assert resp.status < 500, (kind, params, resp.status, body)
            assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers
        return resp.status, body


def refused(status: int, body: bytes, code: int, *fragments: str) -> None:
    assert status == code, (status, body)
    text = body.decode()
    assert HOST_SECRET not in text and "task-token" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def frames(body: bytes) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    text, pos, out = body.decode(), 0, []
    while pos < len(text):
        frame, pos = decoder.raw_decode(text, pos)
        out.append(frame)
    return out


# -- symlinks ---------------------------------------------------------------------------


async def test_logs_dir_replaced_by_a_symlink_is_refused(agent: Agent) -> None:
    # The shared alloc/ dir is world-writable: any task can swap alloc/logs for a link.
    logs = agent.adir.logs_dir
    logs.rmdir()
    logs.symlink_to(agent.host)
    for plain in ("true", "false"):
        status, body = await get(agent, "logs", task="web", type="stdout", plain=plain)
        refused(status, body, 403, "goes through a symlink", "symlinks are not followed")


async def test_log_file_that_is_a_symlink_is_refused(agent: Agent) -> None:
    (agent.adir.logs_dir / "web.stdout.0").symlink_to(agent.host / "passwd")
    status, body = await get(agent, "logs", task="web", type="stdout", plain="true")
    refused(status, body, 403, "symlink")


@pytest.mark.parametrize(("kind", "path"), [
    ("ls", "web/local/link"), ("ls", "web/local/link/sub"), ("stat", "web/local/link"),
    ("stat", "web/local/link/passwd"), ("cat", "web/local/link/passwd"),
    ("cat", "web/local/file-link"), ("ls", "web/local/inside"),
])
async def test_no_symlink_is_followed(agent: Agent, kind: str, path: str) -> None:
    (agent.local / "link").symlink_to(agent.host)
    (agent.local / "file-link").symlink_to(agent.host / "passwd")
    (agent.local / "inside").symlink_to("../tmp")  # even one pointing inside
    status, body = await get(agent, kind, path=path)
    refused(status, body, 403, "goes through a symlink")


async def test_listing_shows_links_as_links(agent: Agent) -> None:
    (agent.local / "link").symlink_to(agent.host)
    (agent.local / "file").write_text("12345")
    status, body = await get(agent, "ls", path="web/local")
    assert status == 200, body
    entries = {e["Name"]: e for e in json.loads(body)}
    assert set(entries) == {"link", "file"}
    assert entries["link"]["FileMode"].startswith("l") and not entries["link"]["IsDir"]
    assert entries["file"]["Size"] == 5 and entries["file"]["FileMode"] == "-rw-r--r--"


async def test_directory_swapped_for_a_link_mid_request_is_never_followed(
        agent: Agent) -> None:
    """A task flips a directory and a link to a host directory as fast as it can while the
    agent lists it: a listing may fail, but must never show the host directory."""
    d, parked = agent.local / "d", agent.local / "d.real"
    d.mkdir()
    (d / "task-file").write_text("x")
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            d.rename(parked)
            d.symlink_to(agent.host)
            d.unlink()
            parked.rename(d)

    flipper = threading.Thread(target=flip)
    flipper.start()
    seen: Counter[int] = Counter()
    try:
        for _ in range(300):
            status, body = await get(agent, "ls", path="web/local/d")
            seen[status] += 1
            assert b"passwd" not in body and b"web.stdout.0" not in body, body
            if status == 200:
                assert [e["Name"] for e in json.loads(body)] == ["task-file"]
            elif status == 400:
                assert b"changed while being opened" in body, body
    finally:
        stop.set()
        flipper.join()
    assert set(seen) <= {200, 400, 403, 404}, seen
    assert seen[200] > 0, seen  # some listings ran while the real directory was there


async def test_listing_survives_children_vanishing(agent: Agent) -> None:
    """Entries deleted between reading the directory and stat-ing them are skipped; the
    listing itself never fails because of them."""
    churn = agent.local / "churn"
    churn.mkdir()
    # A separate process, so the churn really runs in parallel with the agent's listing.
    # A rolling window of short-lived files: whatever a listing sees is soon deleted.
    script = ("import os, sys\n"
              "n = 0\n"
              "while True:\n"
              "    open(os.path.join(sys.argv[1], f'f{n}'), 'w').close()\n"
              "    if n >= 300: os.unlink(os.path.join(sys.argv[1], f'f{n - 300}'))\n"
              "    n += 1\n")
    churner = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(churn))
    statuses: Counter[int] = Counter()
    listed = 0
    try:
        for _ in range(200):
            status, body = await get(agent, "ls", path="web/local/churn")
            statuses[status] += 1
            if status == 200:
                listed += len(json.loads(body))
    finally:
        churner.kill()
        await churner.wait()
    assert statuses == Counter({200: 200}), statuses
    assert listed > 0  # the churn really ran while the agent listed


# -- malformed paths and odd files ------------------------------------------------------


@pytest.mark.parametrize("kind", ["ls", "stat", "cat"])
@pytest.mark.parametrize(("path", "fragment"), [
    ("web/" + "a" * 300, "too long"),
    ("web/local/" + "b" * 256 + "/x", "too long"),
    ("alloc/logs\x00/../../etc/passwd", "NUL"),
    ("x/" * 2100, "path is too long"),
])
async def test_malformed_paths_are_400(agent: Agent, kind: str, path: str,
                                       fragment: str) -> None:
    status, body = await get(agent, kind, path=path)
    refused(status, body, 400, fragment)


async def test_path_through_a_file_is_400(agent: Agent) -> None:
    (agent.local / "f").write_text("x")
    status, body = await get(agent, "ls", path="web/local/f/x")
    refused(status, body, 400, "is not a directory")


async def test_missing_path_is_404(agent: Agent) -> None:
    for kind in ("ls", "stat"):
        status, body = await get(agent, kind, path="web/local/nope")
        refused(status, body, 404, "no such file or directory")


async def test_missing_file_to_read_is_400_as_in_nomad(agent: Agent) -> None:
    # Nomad's FileSystem.Stream (cat, readat, stream) answers a file it cannot stat with 400.
    for kind in ("cat", "readat", "stream"):
        status, body = await get(agent, kind, path="web/local/nope")
        refused(status, body, 400, "no such file or directory")


@pytest.mark.timeout(30)
async def test_cat_of_a_fifo_is_refused_without_hanging(agent: Agent) -> None:
    fifo = agent.local / "fifo"
    os.mkfifo(fifo)
    try:
        status, body = await get(agent, "cat", timeout=5, path="web/local/fifo")
        refused(status, body, 400, "a FIFO", "not a regular file")
        status, body = await get(agent, "stat", timeout=5, path="web/local/fifo")
        assert status == 200 and json.loads(body)["FileMode"].startswith("p"), body
    finally:
        _release_readers(fifo)


async def test_cat_of_a_socket_or_directory_is_refused(agent: Agent) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(agent.local / "sock"))
        status, body = await get(agent, "cat", path="web/local/sock")
        refused(status, body, 400, "a socket")
    finally:
        sock.close()
    status, body = await get(agent, "cat", path="web/local")
    refused(status, body, 400, "is a directory")


@pytest.mark.skipif(not IS_ROOT, reason="creating a device node needs root")
async def test_cat_of_a_device_is_refused_unopened(agent: Agent) -> None:
    # /dev/zero: reading it would fill memory up to the cat limit.
    os.mknod(agent.local / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    status, body = await get(agent, "cat", path="web/local/zero")
    refused(status, body, 400, "a character device")


@pytest.mark.timeout(30)
async def test_log_file_replaced_by_a_fifo_is_refused_without_hanging(agent: Agent) -> None:
    fifo = agent.adir.logs_dir / "web.stdout.0"
    os.mkfifo(fifo)
    try:
        status, body = await get(agent, "logs", timeout=5, task="web", type="stdout",
                                 plain="true")
        refused(status, body, 400, "a FIFO")
    finally:
        _release_readers(fifo)


def _release_readers(fifo: Path) -> None:
    # Should a reader be stuck opening the FIFO (the bug under test), let it go so the
    # worker thread, and with it the test run, can finish.
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting: nothing to release


async def test_secrets_can_be_listed_but_not_read(agent: Agent) -> None:
    status, body = await get(agent, "ls", path="web/secrets")
    assert status == 200 and [e["Name"] for e in json.loads(body)] == ["nomad_token"]
    for path in ("web/secrets/nomad_token", "web/SECRETS/nomad_token",
                 "web/local/../secrets/nomad_token"):
        status, body = await get(agent, "cat", path=path)
        refused(status, body, 403, "Reading secret file prohibited")


# -- logs -------------------------------------------------------------------------------


async def test_logs_are_capped_and_read_in_index_order(agent: Agent) -> None:
    # Forty files that look 1 MiB each (sparse); index 10 must come after index 9.
    for i in range(40):
        sparse(agent.adir.logs_dir / f"web.stdout.{i}", MIB, f"<{i}>".encode())
    (agent.adir.logs_dir / "web.stderr.0").write_text("not stdout")
    (agent.adir.logs_dir / "other.stdout.0").write_text("not web")
    status, body = await get(agent, "logs", task="web", type="stdout", plain="true")
    assert status == 200
    assert len(body) == MAX_LOG_BYTES
    starts = [body[i * MIB:i * MIB + 5].rstrip(b"\0") for i in range(MAX_LOG_BYTES // MIB)]
    assert starts == [f"<{i}>".encode() for i in range(16)]


@pytest.mark.parametrize("size", [MAX_LOG_BYTES + 3 * MIB, 70 * MIB])
async def test_a_log_larger_than_the_cap_returns_its_start(agent: Agent, size: int) -> None:
    sparse(agent.adir.logs_dir / "web.stdout.0", size, b"first line\n")
    status, body = await get(agent, "logs", task="web", type="stdout", plain="true")
    assert status == 200, body[:200]
    assert len(body) == MAX_LOG_BYTES
    assert body.startswith(b"first line\n")


async def test_log_frames_are_small_and_carry_offsets(agent: Agent) -> None:
    first = os.urandom(200 * 1024 + 7)
    second = b"second file\n"
    (agent.adir.logs_dir / "web.stdout.0").write_bytes(first)
    (agent.adir.logs_dir / "web.stdout.1").write_bytes(second)
    status, body = await get(agent, "logs", task="web", type="stdout")
    assert status == 200
    got = frames(body)
    data = [base64.b64decode(f["Data"]) for f in got]
    assert all(0 < len(d) <= LOG_FRAME_BYTES for d in data)
    assert b"".join(data) == first + second
    assert [f["File"] for f in got] == ["alloc/logs/web.stdout.0"] * 4 + \
        ["alloc/logs/web.stdout.1"]
    assert [f["Offset"] for f in got] == [65536, 131072, 196608, len(first), len(second)]


async def test_log_frames_of_a_huge_log_stay_within_the_cap(agent: Agent) -> None:
    sparse(agent.adir.logs_dir / "web.stderr.0", 70 * MIB, b"x")
    status, body = await get(agent, "logs", task="web", type="stderr")
    assert status == 200
    got = frames(body)
    assert len(got) == MAX_LOG_BYTES // LOG_FRAME_BYTES
    assert got[-1]["Offset"] == MAX_LOG_BYTES


async def test_no_logs_yet_is_404(agent: Agent) -> None:
    status, body = await get(agent, "logs", task="web", type="stdout")
    refused(status, body, 404, "not started yet")


# -- streaming --------------------------------------------------------------------------


async def test_cat_streams_a_file_larger_than_the_old_cap(agent: Agent) -> None:
    big = agent.local / "big"
    sparse(big, 80 * MIB, b"head of the file")
    url = f"{agent.url}/v1/client/fs/cat/{ALLOC_ID}"
    async with aiohttp.ClientSession() as s, s.get(url, params={"path": "web/local/big"}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Length"] == str(80 * MIB)
        first = await resp.content.readexactly(16)
        rest = 0
        async for chunk in resp.content.iter_chunked(MIB):
            rest += len(chunk)
    assert first == b"head of the file"
    assert 16 + rest == 80 * MIB


async def test_cat_is_byte_exact(agent: Agent) -> None:
    data = os.urandom(3 * MIB + 7)
    (agent.local / "random").write_bytes(data)
    status, body = await get(agent, "cat", path="web/local/random")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_cat_of_a_file_that_shrinks_mid_stream_is_cut_short(agent: Agent) -> None:
    """The length was promised in the headers: a file that shrinks ends the connection
    early, so the client can tell it did not get the whole file."""
    shrinking = agent.local / "shrinking"
    sparse(shrinking, 48 * MIB, b"x")
    url = f"{agent.url}/v1/client/fs/cat/{ALLOC_ID}"
    got = 0
    async with aiohttp.ClientSession() as s, \
            s.get(url, params={"path": "web/local/shrinking"}) as resp:
        assert resp.status == 200
        got += len(await resp.content.readexactly(64 * 1024))
        os.truncate(shrinking, 0)
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_chunked(MIB):
                got += len(chunk)
    assert 0 < got < 48 * MIB


async def test_a_client_hanging_up_mid_cat_releases_the_file(agent: Agent) -> None:
    big = agent.local / "big"
    sparse(big, 80 * MIB, b"x")
    url = f"{agent.url}/v1/client/fs/cat/{ALLOC_ID}"
    async with aiohttp.ClientSession() as s:
        resp = await s.get(url, params={"path": "web/local/big"})
        assert resp.status == 200
        await resp.content.readexactly(MIB)
        # The agent is now held up by a reader that stopped reading: the file is open.
        assert fds_on(big) == 1
        resp.close()  # drops the connection mid-body
        await wait_until(lambda: fds_on(big) == 0, "the file closed")


async def test_logs_stream_across_files_in_order(agent: Agent) -> None:
    first, second = os.urandom(300 * 1024), os.urandom(5000)
    (agent.adir.logs_dir / "web.stdout.0").write_bytes(first)
    (agent.adir.logs_dir / "web.stdout.1").write_bytes(second)
    status, body = await get(agent, "logs", task="web", type="stdout", plain="true")
    assert status == 200
    assert body == first + second


async def test_a_refused_later_log_file_cuts_the_stream_short(agent: Agent) -> None:
    """Only the first log file can still be refused with a 4xx; a later one that turns
    out to be a symlink ends the connection, never a complete-looking body."""
    sparse(agent.adir.logs_dir / "web.stdout.0", 4 * MIB, b"first")
    (agent.adir.logs_dir / "web.stdout.1").symlink_to(agent.host / "passwd")
    url = f"{agent.url}/v1/client/fs/logs/{ALLOC_ID}"
    params = {"task": "web", "type": "stdout", "plain": "true"}
    async with aiohttp.ClientSession() as s, s.get(url, params=params) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
