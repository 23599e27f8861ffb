"""The Task API audit log: one JSON line per request over a task socket (refusals included),
never a secret, written off the event loop by an owned writer, rotated by size, bounded in
memory when the disk is slow, and closed cleanly (writer cancelled and awaited)."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import nomad_client.http.audit as audit_module
from nomad_client.http.audit import AuditLog, AuditSettings, audit_line, rfc3339, socket_fields
from nomad_client.http.auth import IDENTITY_NOT_BOUND
from nomad_client.server.keyring import Keyring
from tests.unit.factories import (
    TaskAPIStack,
    acl_token,
    identity_token,
    make_alloc,
    raw_exchange,
    request_bytes,
    seed,
    task_api_stack,
    wait_until,
)

FIELDS = {"time", "node", "namespace", "job", "alloc", "task", "method", "path", "status",
          "latency_ms", "identity", "peer"}


@pytest.fixture
async def stack(workdir: Path, keyring: Keyring) -> AsyncIterator[TaskAPIStack]:
    served = await task_api_stack(workdir, keyring)
    await served.configure(audit={"enabled": True, "path": str(workdir / "logs" / "audit.log")})
    yield served
    await served.stop()


def audit_path(stack: TaskAPIStack) -> Path:
    audit = stack.task_api._audit
    assert audit is not None
    return audit.settings.path


def line(fields: dict[str, Any]) -> bytes:
    return (json.dumps(fields) + "\n").encode()


def read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


async def lines_after(stack: TaskAPIStack, count: int) -> list[dict[str, Any]]:
    path = audit_path(stack)
    return await wait_until(lambda: len(read_lines(path)) >= count and read_lines(path),
                            f"{count} audit lines")


# ---- what a line says --------------------------------------------------------------------
async def test_one_line_per_request_with_every_field(stack: TaskAPIStack) -> None:
    assert (await stack.call("GET", "/v1/agent/health?pretty=1&token=x")).status == 200
    [line] = await lines_after(stack, 1)
    assert set(line) == FIELDS  # no "reason": nothing was refused
    assert line["node"] == "node-1"
    assert (line["namespace"], line["job"], line["alloc"], line["task"]) == (
        "default", "j", "a", "t")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/agent/health", 200)
    claims = stack.agent.server.verify_workload_identity(stack.token)
    assert line["identity"] == {"kind": "workload", "id": claims.subject}
    assert line["peer"] == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    assert 0 <= line["latency_ms"] < 10_000
    when = datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert when.tzinfo == datetime.UTC
    assert abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 60


async def test_identity_is_named_never_its_secret(stack: TaskAPIStack) -> None:
    token = acl_token()
    await seed(stack.agent.server, tokens=(token,))
    assert (await stack.call("GET", "/v1/agent/health", token=token.secret_id)).status == 200
    assert (await stack.call("GET", "/v1/agent/health", token="")).status == 401
    assert (await stack.call("GET", "/v1/agent/health", token="nonsense")).status == 403
    lines = await lines_after(stack, 3)
    assert [line["identity"] for line in lines] == [
        {"kind": "token", "id": token.accessor_id}, {"kind": "none", "id": ""},
        {"kind": "none", "id": ""}]
    assert [line["status"] for line in lines] == [200, 401, 403]


async def test_refusals_are_audited_with_their_reason(stack: TaskAPIStack) -> None:
    await stack.configure(denied_endpoints=("GET /v1/agent/self",),
                          rate_limit={"requests_per_second": 1, "burst": 3},
                          bind_identity_to_socket=True)
    other = make_alloc()
    await seed(stack.agent.server, allocs=(other,))
    foreign = identity_token(stack.agent.server.keyring, other)
    assert (await stack.call("GET", "/v1/agent/self")).status == 403
    assert (await stack.call("GET", "/v1/agent/health", token=foreign)).status == 403
    assert (await stack.call("GET", "/v1/agent/health")).status == 200
    assert (await stack.call("GET", "/v1/agent/health")).status == 429
    lines = await lines_after(stack, 4)
    assert [(line["status"], line.get("reason")) for line in lines] == [
        (403, 'Permission denied: "GET /v1/agent/self" is in '
              "client.task_api.denied_endpoints"),
        (403, IDENTITY_NOT_BOUND),
        (200, None),
        (429, "Too many requests: this task's Task API allows 1 requests per second "
              "(client.task_api.rate_limit)")]
    assert lines[0]["identity"]["kind"] == "workload"  # refused after authentication
    assert lines[3]["latency_ms"] >= 500  # held before it was refused


async def test_no_secret_ever_reaches_the_file(stack: TaskAPIStack) -> None:
    token = acl_token()
    await seed(stack.agent.server, tokens=(token,))
    secrets = [stack.token, token.secret_id]
    for secret in secrets:
        for header in ("X-Nomad-Token", "Authorization"):
            value = secret if header == "X-Nomad-Token" else f"Bearer {secret}"
            request = (f"GET /v1/agent/health?token={secret} HTTP/1.1\r\nHost: x\r\n"
                       f"{header}: {value}\r\nConnection: close\r\n\r\n").encode()
            assert (await raw_exchange(stack.sock, request)).status == 200
        # ... nor a token the caller put in the path itself.
        assert (await raw_exchange(stack.sock, request_bytes(
            "GET", f"/v1/token={secret}/{stack.token}", secret))).status == 404
    await lines_after(stack, 6)
    text = audit_path(stack).read_text()
    for secret in secrets:
        assert secret not in text
    assert "<redacted>" in text


# ---- the file ----------------------------------------------------------------------------
async def test_file_and_directory_modes(stack: TaskAPIStack) -> None:
    assert (await stack.call("GET", "/v1/agent/health")).status == 200
    await lines_after(stack, 1)
    path = audit_path(stack)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "a.log"
    log = AuditLog(AuditSettings(path, max_size=1000, max_files=3))
    await log.open()
    for i in range(60):
        log.record(line({"n": i, "pad": "x" * 80}))  # ~100 bytes a line
        await asyncio.sleep(0)  # let the writer run now and then
    await log.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["a.log", "a.log.1", "a.log.2"]  # max_files in all, the oldest gone
    numbers = []
    for name in ("a.log.2", "a.log.1", "a.log"):
        part = path.parent / name
        assert part.stat().st_size <= 1000
        assert stat.S_IMODE(part.stat().st_mode) == 0o600
        numbers += [json.loads(line)["n"] for line in part.read_text().splitlines()]
    assert numbers == list(range(60 - len(numbers), 60))  # the newest, in order, none torn
    assert len(numbers) >= 20


async def test_one_file_only_when_max_files_is_one(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(AuditSettings(path, max_size=300, max_files=1))
    await log.open()
    for i in range(20):
        log.record(line({"n": i, "pad": "x" * 80}))
    await log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]
    assert path.stat().st_size <= 300


async def test_close_cancels_and_awaits_the_writer_and_flushes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(AuditSettings(path, max_size=1 << 20, max_files=2))
    await log.open()
    writer = log._writer
    assert writer is not None and not writer.done()
    for i in range(5):
        log.record(line({"n": i}))
    await log.close()  # before the writer had a turn: close writes what is queued
    assert writer.cancelled()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "task-api-audit"]
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == list(range(5))
    log.record(line({"n": 99}))  # after close: ignored, no error
    assert path.read_text().count("\n") == 5


async def test_a_slow_disk_drops_and_counts_instead_of_growing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(audit_module, "MAX_PENDING_BYTES", 2000)
    release = threading.Event()
    entered = threading.Event()
    real_write = AuditLog._write

    def slow_write(self: AuditLog, batch: list[bytes]) -> None:
        entered.set()
        release.wait(30)
        real_write(self, batch)

    monkeypatch.setattr(AuditLog, "_write", slow_write)
    path = tmp_path / "a.log"
    log = AuditLog(AuditSettings(path, max_size=1 << 20, max_files=2))
    await log.open()
    try:
        log.record(line({"n": 0}))
        await wait_until(entered.is_set, "the writer to be writing")
        for i in range(1, 200):  # the disk is stuck: only ~2000 bytes may wait
            log.record(line({"n": i, "pad": "x" * 80}))
        dropped = log.dropped
        assert dropped > 150
        assert log._pending_bytes <= 2000
        with caplog.at_level(logging.WARNING, logger="nomad_client.http.audit"):
            release.set()
            log.record(line({"n": 999}))
            await wait_until(lambda: "999" in (path.read_text() if path.exists() else ""),
                             "the writer to catch up")
    finally:
        release.set()
        await log.close()
    reports = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(reports) == 1 and f"dropped {dropped} lines" in reports[0], reports


def test_rfc3339() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339(1_700_000_000.25) == "2023-11-14T22:13:20.250000Z"


@pytest.mark.parametrize("path", ['/v1/"quoted"\\back', "/v1/new\nline\ttab", "/v1/\udcff\x00",
                                  "/v1/caf\u00e9/\u2603", "/" + "x" * 10_000])
def test_every_line_is_one_line_of_valid_json(path: str) -> None:
    raw = audit_line(socket=socket_fields(node="n\"1", namespace=None, job="j\n", alloc="a",
                                          task="t"),
                     method="GET", path=path, status=403, latency=0.0123456,
                     identity=None, peer=(1, 2, 3), reason='no "way"\n')
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and raw.isascii()
    line = json.loads(raw)
    assert line["path"] == path and line["node"] == 'n"1' and line["job"] == "j\n"
    assert line["namespace"] == "" and line["reason"] == 'no "way"\n'
    assert line["peer"] == {"pid": 1, "uid": 2, "gid": 3}
    assert line["latency_ms"] == 12.346
    assert line["identity"] == {"kind": "none", "id": ""}
    assert set(line) == FIELDS | {"reason"}
