"""The streaming fs endpoints (``fs/stream``, ``fs/readat``, ``fs/logs`` with follow, origin
or offset) over a real router, listener and alloc dir: Nomad's frames and offsets, following
a file as it grows, truncation and deletion events, plain mode, and a client that hangs up
freeing its stream. Symlinks are still refused."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.api import ApiClient
from nomad_client.cli.alloc import (
    BYTES_PER_LINE,
    TailSpec,
    add_read_flags,
    last_lines,
    tail_spec,
)
from nomad_client.cli.common import CommandParser
from nomad_client.client.allocdir import AllocDir
from nomad_client.http.endpoints import fs_stream
from nomad_client.server.keyring import Keyring
from tests.integration.harness import fds_on
from tests.unit.factories import OneAllocClient, make_server, serve_api, wait_until

ALLOC_ID = "5f0c1e2a-3b4d-4c6e-8f90-a1b2c3d4e5f6"
FILE = "web/local/out.txt"


@attrs.frozen
class Agent:
    url: str
    adir: AllocDir

    @property
    def file(self) -> Path:
        return self.adir.path / FILE

    def log(self, index: int, kind: str = "stdout") -> Path:
        return self.adir.logs_dir / f"web.{kind}.{index}"


@pytest.fixture
async def agent(workdir: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[Agent]:
    monkeypatch.setattr(fs_stream, "POLL_INTERVAL", 0.02)
    monkeypatch.setattr(fs_stream, "HEARTBEAT_INTERVAL", 0.1)
    adir = AllocDir(workdir / "alloc", ALLOC_ID)
    adir.build()
    adir.build_task_dir("web", None)
    api = await serve_api(make_server(keyring), client=OneAllocClient(adir))
    try:
        yield Agent(api.url, adir)
    finally:
        await api.close()


def _url(agent: Agent, kind: str) -> str:
    return f"{agent.url}/v1/client/fs/{kind}/{ALLOC_ID}"


async def fetch(agent: Agent, kind: str, **params: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
            s.get(_url(agent, kind), params=params) as resp:
        body = await resp.read()
        if resp.status >= 400:
            assert resp.status < 500 and resp.content_type == "text/plain", (resp, body)
        return resp.status, body


def parse_frames(body: bytes) -> list[dict[str, Any]]:
    frames, _ = split_frames(body)
    return frames


def split_frames(buffer: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The complete frames at the start of ``buffer`` and what is left of it."""
    decoder = json.JSONDecoder()
    text, pos, found = buffer.decode(), 0, []
    while pos < len(text):
        try:
            frame, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        found.append(frame)
        pos = end
    return found, text[pos:].encode()


def data_of(frames: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(f["Data"]) for f in frames if f.get("Data"))


class Follow:
    """A followed stream, read frame by frame as the test goes."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.frames: list[dict[str, Any]] = []
        self._rest = b""

    async def until(self, check: Any, what: str) -> None:
        while not check(self.frames):
            chunk = await self.resp.content.readany()
            assert chunk, f"the stream ended before {what}: {self.frames}"
            found, self._rest = split_frames(self._rest + chunk)
            self.frames.extend(found)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


# -- fs/stream and fs/readat without following ------------------------------------------


async def test_stream_frames_carry_nomads_shape_and_offsets(agent: Agent) -> None:
    content = os.urandom(150 * 1024)
    agent.file.write_bytes(content)
    status, body = await fetch(agent, "stream", path=FILE, follow="false")
    assert status == 200, body
    frames = parse_frames(body)
    assert len(frames) == 3  # 64 KiB per frame
    assert data_of(frames) == content
    assert [f["Offset"] for f in frames] == [65536, 131072, len(content)]
    assert {f["File"] for f in frames} == {FILE}


async def test_stream_offset_and_origin(agent: Agent) -> None:
    agent.file.write_bytes(b"0123456789")
    status, body = await fetch(agent, "stream", path=FILE, follow="false", offset="4")
    assert status == 200 and data_of(parse_frames(body)) == b"456789"
    status, body = await fetch(agent, "stream", path=FILE, follow="false", origin="end",
                               offset="3")
    assert status == 200 and data_of(parse_frames(body)) == b"789"
    assert parse_frames(body)[-1]["Offset"] == 10
    status, body = await fetch(agent, "stream", path=FILE, follow="false", plain="true",
                               origin="end", offset="99")
    assert status == 200 and body == b"0123456789"


async def test_readat_returns_the_range(agent: Agent) -> None:
    agent.file.write_bytes(b"0123456789")
    assert await fetch(agent, "readat", path=FILE, offset="2", limit="5") == (200, b"23456")
    assert await fetch(agent, "readat", path=FILE, offset="7") == (200, b"789")
    assert await fetch(agent, "readat", path=FILE, offset="20") == (200, b"")


INT64_MAX = 2**63 - 1


async def test_offsets_and_limits_are_read_as_go_int64(agent: Agent) -> None:
    # Nomad parses them with strconv.ParseInt(_, 10, 64): the largest int64 is valid (and
    # past the end of any file), one more is a 400, never a stream cut short.
    agent.file.write_bytes(b"0123456789")
    big, too_big = str(INT64_MAX), str(INT64_MAX + 1)
    assert await fetch(agent, "readat", path=FILE, offset=big) == (200, b"")
    assert await fetch(agent, "readat", path=FILE, offset=big, limit=big) == (200, b"")
    assert await fetch(agent, "readat", path=FILE, offset="3", limit=big) == (200, b"3456789")
    assert await fetch(agent, "stream", path=FILE, follow="false", plain="true",
                       origin="end", offset=big) == (200, b"0123456789")
    status, body = await fetch(agent, "stream", path=FILE, follow="false", offset=big)
    assert (status, parse_frames(body)) == (200, [])
    for kind, params in [("readat", {"offset": too_big}), ("readat", {"limit": too_big}),
                         ("stream", {"offset": too_big}), ("readat", {"offset": "1_0"}),
                         ("readat", {"limit": " 5"}), ("stream", {"offset": "2" * 5000})]:
        name = next(iter(params))
        status, body = await fetch(agent, kind, path=FILE, **params)
        assert status == 400 and f"error parsing {name}" in body.decode(), (params, body)
    status, body = await fetch(agent, "readat", path=FILE, offset=too_big)
    assert "value out of range" in body.decode(), body


async def test_log_offsets_are_read_as_go_int64(agent: Agent) -> None:
    agent.log(0).write_bytes(b"abc")
    agent.log(1).write_bytes(b"def")
    status, body = await fetch(agent, "logs", task="web", type="stdout", plain="true",
                               origin="end", offset=str(INT64_MAX))
    assert (status, body) == (200, b"abcdef")
    status, body = await fetch(agent, "logs", task="web", type="stdout", plain="true",
                               offset=str(INT64_MAX))
    assert (status, body) == (200, b"")
    status, body = await fetch(agent, "logs", task="web", type="stdout",
                               offset=str(INT64_MAX + 1))
    assert status == 400 and "error parsing offset" in body.decode(), body


@pytest.mark.parametrize(("kind", "params", "reason"), [
    ("stream", {"path": FILE, "origin": "middle"}, "origin must be start or end"),
    ("stream", {"path": FILE, "offset": "-1"}, "error parsing offset"),
    ("stream", {"path": FILE, "follow": "maybe"}, "boolean"),
    ("readat", {"path": FILE, "limit": "x"}, "error parsing limit"),
    ("stream", {}, "must provide a file name"),
    ("logs", {"task": "web", "type": "stdout", "origin": "x"}, "origin must be start"),
])
async def test_bad_queries_are_400(agent: Agent, kind: str, params: dict[str, str],
                                   reason: str) -> None:
    agent.file.write_bytes(b"x")
    status, body = await fetch(agent, kind, **params)
    assert status == 400 and reason in body.decode(), body


@pytest.mark.parametrize("kind", ["stream", "readat"])
async def test_symlinks_are_still_refused(agent: Agent, workdir: Path, kind: str) -> None:
    secret = workdir / "host-secret"
    secret.write_text("host only")
    (agent.adir.path / "web" / "local" / "link").symlink_to(secret)
    status, body = await fetch(agent, kind, path="web/local/link", follow="false")
    assert status == 403 and b"symlink" in body and b"host only" not in body


# -- following ---------------------------------------------------------------------------


async def test_follow_sees_appended_data_and_heartbeats(
        agent: Agent, session: aiohttp.ClientSession) -> None:
    agent.file.write_bytes(b"first\n")
    async with session.get(_url(agent, "stream"), params={"path": FILE}) as resp:
        assert resp.status == 200
        stream = Follow(resp)
        await stream.until(lambda fs: data_of(fs) == b"first\n", "the first line")
        await stream.until(lambda fs: {} in fs, "a heartbeat")
        with agent.file.open("ab") as f:
            f.write(b"second\n")
        await stream.until(lambda fs: data_of(fs) == b"first\nsecond\n", "the appended line")
        assert stream.frames[-1]["Offset"] == 13


async def test_truncation_is_an_event_and_the_file_is_read_again(
        agent: Agent, session: aiohttp.ClientSession) -> None:
    agent.file.write_bytes(b"a long first version\n")
    async with session.get(_url(agent, "stream"), params={"path": FILE}) as resp:
        stream = Follow(resp)
        await stream.until(lambda fs: data_of(fs) == b"a long first version\n", "the data")
        with agent.file.open("r+b") as f:
            f.truncate(0)
        await stream.until(lambda fs: any(f.get("FileEvent") == "file truncated"
                                          for f in fs), "the truncation event")
        with agent.file.open("ab") as f:
            f.write(b"new\n")
        await stream.until(lambda fs: data_of(fs).endswith(b"version\nnew\n"), "new data")


async def test_deletion_is_an_event_that_ends_the_stream(
        agent: Agent, session: aiohttp.ClientSession) -> None:
    agent.file.write_bytes(b"data\n")
    async with session.get(_url(agent, "stream"), params={"path": FILE}) as resp:
        stream = Follow(resp)
        await stream.until(lambda fs: data_of(fs) == b"data\n", "the data")
        agent.file.unlink()
        rest = await resp.read()  # returns only once the stream ends
    frames, _ = split_frames(rest)
    assert [f["FileEvent"] for f in frames if f.get("FileEvent")] == ["file deleted"]


async def test_plain_follow_sends_raw_bytes(agent: Agent,
                                            session: aiohttp.ClientSession) -> None:
    agent.file.write_bytes(b"one\n")
    params = {"path": FILE, "plain": "true"}
    async with session.get(_url(agent, "stream"), params=params) as resp:
        assert resp.content_type == "text/plain"
        assert await resp.content.readuntil(b"\n") == b"one\n"
        with agent.file.open("ab") as f:
            f.write(b"two\n")
        assert await resp.content.readuntil(b"\n") == b"two\n"


async def test_client_hanging_up_frees_the_stream(agent: Agent) -> None:
    agent.file.write_bytes(b"idle\n")
    session = aiohttp.ClientSession()
    try:
        resp = await session.get(_url(agent, "stream"), params={"path": FILE})
        assert await resp.content.readany()
        assert fds_on(agent.file) == 1  # the agent's descriptor
        resp.close()  # drops the connection while the stream only waits for growth
    finally:
        await session.close()
    await wait_until(lambda: fds_on(agent.file) == 0, "the stream's file closed")


# -- logs --------------------------------------------------------------------------------


async def test_logs_tail_spans_rotated_files(agent: Agent) -> None:
    agent.log(0).write_bytes(b"aaaa")
    agent.log(1).write_bytes(b"bb")
    status, body = await fetch(agent, "logs", task="web", type="stdout", plain="true",
                               origin="end", offset="4")
    assert (status, body) == (200, b"aabb")
    status, body = await fetch(agent, "logs", task="web", type="stdout", offset="1")
    assert status == 200 and data_of(parse_frames(body)) == b"aaabb"
    assert [f["File"] for f in parse_frames(body)] == ["alloc/logs/web.stdout.0",
                                                      "alloc/logs/web.stdout.1"]


async def test_logs_follow_crosses_rotation_and_ends_with_the_task(
        agent: Agent, session: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dead = False
    monkeypatch.setattr(fs_stream, "task_finished", lambda *args: dead)
    agent.log(0).write_bytes(b"one\n")
    params = {"task": "web", "type": "stdout", "follow": "true"}
    async with session.get(_url(agent, "logs"), params=params) as resp:
        stream = Follow(resp)
        await stream.until(lambda fs: data_of(fs) == b"one\n", "the first line")
        with agent.log(0).open("ab") as f:
            f.write(b"two\n")
        agent.log(1).write_bytes(b"three\n")
        await stream.until(lambda fs: data_of(fs) == b"one\ntwo\nthree\n", "the rotation")
        with agent.log(1).open("ab") as f:
            f.write(b"last\n")
        dead = True
        rest = await resp.read()  # the stream ends: the task is dead, its log read
    frames, _ = split_frames(rest)
    assert data_of(stream.frames + frames) == b"one\ntwo\nthree\nlast\n"


async def test_logs_follow_of_a_dead_task_ends_at_once(agent: Agent) -> None:
    # The server knows no such allocation: nothing will write to its logs any more.
    agent.log(0).write_bytes(b"done\n")
    status, body = await fetch(agent, "logs", task="web", type="stdout", follow="true",
                               plain="true")
    assert (status, body) == (200, b"done\n")


async def test_logs_follow_from_a_tail_in_an_earlier_file_moves_on(
        agent: Agent, session: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fs_stream, "task_finished", lambda *args: False)
    agent.log(0).write_bytes(b"aaaa")
    agent.log(1).write_bytes(b"bb")
    params = {"task": "web", "type": "stdout", "follow": "true", "origin": "end",
              "offset": "4"}
    async with session.get(_url(agent, "logs"), params=params) as resp:
        stream = Follow(resp)
        await stream.until(lambda fs: data_of(fs) == b"aabb", "the tail")
        with agent.log(1).open("ab") as f:
            f.write(b"cc")
        await stream.until(lambda fs: data_of(fs) == b"aabbcc", "growth of the last file")


async def test_api_client_streams_frames(agent: Agent) -> None:
    agent.file.write_bytes(b"x" * 70_000)
    async with ApiClient(agent.url) as api:
        frames = [f async for f in api.fs_stream(ALLOC_ID, FILE, follow=False)]
        assert [f["Offset"] for f in frames] == [65536, 70_000]
        assert b"".join(f["Data"] for f in frames) == b"x" * 70_000
        tail = b"".join([c async for c in api.fs_stream_plain(
            ALLOC_ID, FILE, origin="end", offset=3, follow=False)])
        assert tail == b"xxx"
        assert await api.fs_readat(ALLOC_ID, FILE, 69_998) == b"xx"


@pytest.mark.parametrize(("argv", "spec"), [
    ([], TailSpec()),
    (["-tail"], TailSpec("end", 10 * BYTES_PER_LINE, 10)),
    (["-tail", "-n", "3"], TailSpec("end", 3 * BYTES_PER_LINE, 3)),
    (["-tail", "-c", "7"], TailSpec("end", 7)),
])
def test_cli_tail_flags(argv: list[str], spec: TailSpec) -> None:
    parser = CommandParser("alloc logs", "alloc logs <alloc>", "")
    parser.add_positionals("args", 1, 1)
    add_read_flags(parser)
    assert tail_spec(parser.parse([*argv, "a1"])) == spec


def test_last_lines() -> None:
    assert last_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert last_lines(b"partial\nb\nc", 2) == b"b\nc"
    assert last_lines(b"a\n", 0) == b""
