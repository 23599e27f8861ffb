"""Parameterized jobs and dispatch: the ``parameterized`` and ``dispatch_payload`` blocks,
``POST /v1/job/:id/dispatch`` (Nomad's checks, child jobs, idempotency, capability), the
client's payload file (written without following a symlink the task planted) and
``NOMAD_META_*``, and the ``job dispatch`` command."""

from __future__ import annotations

import base64
import os
import stat
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nomad_client.allocrunner.taskrunner.dispatch_payload_hook import write_payload
from nomad_client.client.drivers.base import TaskConfig, TaskHandle
from nomad_client.client.drivers.mock import MockDriver
from nomad_client.jobspec import JobValidationError, canonicalize_job, parse_jobspec
from nomad_client.server.dispatch import MAX_PAYLOAD_BYTES
from nomad_client.server.keyring import Keyring
from tests.unit.factories import start_agent, wait_until
from tests.unit.launching import batch_job, child_ids, finish_allocs, register, served
from tests.unit.test_cli import cli, start_nomad
from tests.unit.test_namespace_endpoints import Api

PARAMETERIZED = {"Payload": "optional", "MetaRequired": ["user"], "MetaOptional": ["tier"]}


def parent_job(job_id: str = "encode", **parameterized: Any) -> dict[str, Any]:
    return batch_job(job_id, Meta={"owner": "ops"},
                     ParameterizedJob={**PARAMETERIZED, **parameterized},
                     task={"DispatchPayload": {"File": "in/input.json"}})


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[Api]:
    async with served(keyring) as api:
        yield api


async def dispatch(api: Api, body: dict[str, Any], job_id: str = "encode",
                   token: str | None = None) -> Any:
    return await api.call("POST", f"/v1/job/{job_id}/dispatch", body, token=token)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- the jobspec ----------------------------------------------------------------------------
def test_the_blocks_are_decoded_and_filled() -> None:
    job = canonicalize_job(parse_jobspec(textwrap.dedent("""\
        job "encode" {
          type = "batch"
          parameterized {
            payload       = "required"
            meta_required = ["user"]
          }
          group "g" {
            task "t" {
              driver = "raw_exec"
              dispatch_payload {
                file = "config/input.json"
              }
            }
          }
        }
        """), "encode.nomad.hcl"))
    assert job["ParameterizedJob"] == {"Payload": "required", "MetaRequired": ["user"],
                                       "MetaOptional": []}
    assert job["TaskGroups"][0]["Tasks"][0]["DispatchPayload"] == {"File": "config/input.json"}


@pytest.mark.parametrize(("fields", "problem"), [
    ({"Type": "service", "ParameterizedJob": {}},
     'Parameterized job can only be used with "batch" or "sysbatch" scheduler'),
    ({"ParameterizedJob": {"Payload": "maybe"}},
     "Unknown payload requirement: 'maybe' (expected one of optional, required, forbidden)"),
    ({"ParameterizedJob": {"MetaRequired": ["a", "b"], "MetaOptional": ["b", "a"]}},
     "Required and optional meta keys should be disjoint. Following keys exist in both: "
     "[a b]"),
    ({"TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t", "Driver": "raw_exec",
                                              "DispatchPayload": {"File": "../../etc/x"}}]}]},
     "group 'g' task 't': Dispatch Payload validation failed: destination escapes allocation "
     "directory"),
    ({"Dispatched": True}, "job can't be submitted with 'Dispatched' set"),
    ({"ParentID": "admin"},
     "job can't be submitted with a ParentID: only the server derives child jobs"),
])
def test_bad_blocks_are_refused(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(batch_job(**fields))
    assert problem in info.value.problems


# ---- dispatch -------------------------------------------------------------------------------
async def test_a_parent_never_runs_and_a_dispatch_makes_a_child_that_does(api: Api) -> None:
    registered = await register(api, parent_job())
    assert registered["EvalID"] == "" and api.server.job_allocs("encode") == []
    assert (await api.call("GET", "/v1/job/encode")).body["Status"] == "running"

    answer = await dispatch(api, {"Payload": b64(b'{"x": 1}'), "Meta": {"user": "ann"}})
    assert answer.status == 200, answer
    child_id = answer.body["DispatchedJobID"]
    prefix, _, unix_and_hex = child_id.partition("/dispatch-")
    unix, _, tail = unix_and_hex.partition("-")
    assert prefix == "encode" and unix.isdigit() and len(tail) == 8
    assert answer.body["Index"] == answer.nomad_index == answer.body["EvalCreateIndex"]
    assert api.server.evaluation(answer.body["EvalID"]) is not None
    assert child_ids(api.server, "encode") == [child_id]

    child = (await api.call("GET", f"/v1/job/{child_id.replace('/', '%2F')}")).body
    assert child["CreateIndex"] == answer.body["JobCreateIndex"]
    assert (child["ParentID"], child["Dispatched"], child["Name"]) == ("encode", True, child_id)
    assert child["Meta"] == {"owner": "ops", "user": "ann", "tier": ""}
    assert base64.b64decode(child["Payload"]) == b'{"x": 1}'
    assert len(api.server.job_allocs(child_id)) == 1
    # The parent is unchanged; a second dispatch makes another child.
    assert (await dispatch(api, {"Meta": {"user": "bob"}})).status == 200
    assert len(child_ids(api.server, "encode")) == 2


@pytest.mark.parametrize(("parent", "body", "status", "text"), [
    (parent_job(), {"Meta": {}}, 400, "Dispatch did not provide required meta keys: [user]"),
    (parent_job(), {"Meta": {"user": "a", "zz": "1", "aa": "2"}}, 400,
     "Dispatch request included unpermitted metadata keys: [aa zz]"),
    (parent_job(Payload="required"), {"Meta": {"user": "a"}}, 400,
     "Payload is not provided but required by parameterized job"),
    (parent_job(Payload="forbidden"), {"Meta": {"user": "a"}, "Payload": b64(b"x")}, 400,
     "Payload provided but forbidden by parameterized job"),
    (parent_job(), {"Meta": {"user": "a"}, "Payload": b64(b"x" * (MAX_PAYLOAD_BYTES + 1))},
     400, f"Payload exceeds maximum size; {MAX_PAYLOAD_BYTES + 1} > {MAX_PAYLOAD_BYTES}"),
    (parent_job(), {"Meta": {"user": "a"}, "Payload": "not base64!"}, 400,
     "Payload must be base64-encoded"),
    (parent_job(), {"Meta": {"user": 1}}, 400, "Meta must be an object of strings"),
    (parent_job(), {"Meta": {"user": "a"}, "JobID": "other"}, 400, "Job ID does not match"),
    (parent_job(), {"Meta": {"user": "a"}, "Priority": 101}, 400,
     "dispatch job priority must be between [1, 100]"),
    (batch_job("encode"), {}, 400, 'Specified job "encode" is not a parameterized job'),
    (None, {}, 404, "parameterized job not found"),
])
async def test_dispatch_refusals(api: Api, parent: dict[str, Any] | None, body: dict[str, Any],
                                 status: int, text: str) -> None:
    if parent is not None:
        await register(api, parent)
    answer = await dispatch(api, body)
    assert (answer.status, answer.body) == (status, text)
    assert child_ids(api.server, "encode") == []


async def test_a_stopped_parent_and_a_child_cannot_be_dispatched(api: Api) -> None:
    await register(api, parent_job())
    child_id = (await dispatch(api, {"Meta": {"user": "a"}})).body["DispatchedJobID"]
    answer = await dispatch(api, {"Meta": {"user": "a"}}, child_id.replace("/", "%2F"))
    assert (answer.status, answer.body) == (
        400, f'Specified job "{child_id}" is not a parameterized job')
    assert (await api.call("DELETE", "/v1/job/encode")).status == 200
    answer = await dispatch(api, {"Meta": {"user": "a"}})
    assert (answer.status, answer.body) == (400, 'Specified job "encode" is stopped')


async def test_an_idempotency_token_gives_the_live_child_again(api: Api) -> None:
    await register(api, parent_job())
    body = {"Meta": {"user": "a"}, "IdempotencyToken": "run-42"}
    first = (await dispatch(api, body)).body
    again = await dispatch(api, body)
    assert again.status == 200
    assert again.body["DispatchedJobID"] == first["DispatchedJobID"]
    assert again.body["EvalID"] == "" and again.body["JobCreateIndex"] == first["JobCreateIndex"]
    # The query parameter wins over the body's token.
    other = await api.call("POST", "/v1/job/encode/dispatch?idempotency_token=other", body)
    assert other.body["DispatchedJobID"] != first["DispatchedJobID"]
    assert len(child_ids(api.server, "encode")) == 2
    # Once the child has finished, the token dispatches anew.
    await finish_allocs(api.server, first["DispatchedJobID"])
    later = (await dispatch(api, body)).body
    assert later["DispatchedJobID"] not in (first["DispatchedJobID"],
                                            other.body["DispatchedJobID"])
    assert later["EvalID"]


async def test_dispatch_needs_dispatch_job(keyring: Keyring) -> None:
    async with served(keyring, acl=True) as api:
        await register(api, parent_job())
        body = {"Meta": {"user": "a"}}
        for rules, allowed in (
                ('namespace "default" { capabilities = ["dispatch-job"] }', True),
                ('namespace "default" { policy = "write" }', True),
                ('namespace "default" { capabilities = ["submit-job", "read-job"] }', False),
                ('namespace "other" { capabilities = ["dispatch-job"] }', False)):
            answer = await dispatch(api, body, token=await api.token_for(rules))
            assert answer.status == (200 if allowed else 403), (rules, answer)


# ---- the payload on the client ------------------------------------------------------------
def test_the_payload_file_is_written_without_following_symlinks(tmp_path: Path) -> None:
    task_dir, outside = tmp_path / "task", tmp_path / "outside"
    (task_dir / "local").mkdir(parents=True)
    outside.mkdir()
    write_payload(task_dir, "local/a/b/input.json", b"payload")
    written = task_dir / "local" / "a" / "b" / "input.json"
    assert written.read_bytes() == b"payload"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    local = (task_dir / "local").stat()
    for made in (task_dir / "local" / "a", task_dir / "local" / "a" / "b"):
        st = made.stat()
        assert (st.st_uid, st.st_gid) == (local.st_uid, local.st_gid)

    # A symlink the task put at the file's name is replaced, never written through.
    (outside / "victim").write_bytes(b"keep")
    written.unlink()
    written.symlink_to(outside / "victim")
    write_payload(task_dir, "local/a/b/input.json", b"new")
    assert not written.is_symlink() and written.read_bytes() == b"new"
    assert (outside / "victim").read_bytes() == b"keep"

    # A symlinked directory on the way is refused.
    (task_dir / "local" / "c").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match="symlink"):
        write_payload(task_dir, "local/c/input.json", b"x")
    assert list(outside.iterdir()) == [outside / "victim"]


class RecordingDriver(MockDriver):
    """The mock driver, keeping the environment each task started with."""

    def __init__(self) -> None:
        super().__init__()
        self.envs: dict[str, dict[str, str]] = {}

    async def start_task(self, cfg: TaskConfig) -> TaskHandle:
        self.envs[cfg.alloc_id] = dict(cfg.env)
        return await super().start_task(cfg)


async def test_the_child_task_gets_its_payload_file_and_meta(tmp_path: Path,
                                                             keyring: Keyring) -> None:
    driver = RecordingDriver()
    agent = await start_agent(tmp_path, keyring, drivers={"mock_driver": driver})
    try:
        parent = batch_job("encode", Meta={"owner": "ops"}, ParameterizedJob=PARAMETERIZED,
                           task={"Driver": "mock_driver", "Config": {"run_for": "1h"},
                                 "DispatchPayload": {"File": "in/input.json"}})
        await agent.server.register_job(canonicalize_job(parent))
        result = await agent.server.dispatcher.dispatch(
            "default", "encode", b'{"frames": 24}', {"user": "ann"})
        alloc = (await wait_until(lambda: agent.server.job_allocs(result.dispatched_job_id),
                                  "the child's allocation"))[0]
        env = await wait_until(lambda: driver.envs.get(alloc.id), "the child task's start")
        payload = tmp_path / "alloc" / alloc.id / "t" / "local" / "in" / "input.json"
        assert payload.read_bytes() == b'{"frames": 24}'
        assert stat.S_IMODE(os.stat(payload).st_mode) == 0o600
        assert (env["NOMAD_META_user"], env["NOMAD_META_USER"]) == ("ann", "ann")
        assert (env["NOMAD_META_owner"], env["NOMAD_META_tier"]) == ("ops", "")
        assert env["NOMAD_JOB_ID"] == result.dispatched_job_id
    finally:
        await agent.stop()
        await agent.server.close()


# ---- the command ----------------------------------------------------------------------------
async def test_job_dispatch_command(tmp_path: Path, keyring: Keyring,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    nomad = await start_nomad(tmp_path, keyring, monkeypatch)
    try:
        parent = batch_job("encode", ParameterizedJob=PARAMETERIZED,
                           task={"Driver": "mock_driver", "Config": {"run_for": "0s"}})
        await nomad.server.register_job(canonicalize_job({**parent, "Datacenters": ["dc1"]}))
        await nomad.server.register_job(canonicalize_job(batch_job("encoder-plain")))
        source = tmp_path / "input.json"
        source.write_bytes(b"{}")
        code, out, err = await cli(capsys, "job", "dispatch", "-detach", "-meta", "user=ann",
                                   "-idempotency-token", "t1", "enc", str(source))
        assert (code, err) == (0, ""), err
        child_id = child_ids(nomad.server, "encode")[0]
        child = nomad.server.job(child_id)
        assert child is not None and base64.b64decode(child["Payload"]) == b"{}"
        assert child["Meta"]["user"] == "ann" and child["DispatchIdempotencyToken"] == "t1"
        lines = out.splitlines()
        assert lines[0] == f"Dispatched Job ID = {child_id}"
        assert lines[1].startswith("Evaluation ID     = ") and len(lines) == 2

        code, out, _ = await cli(capsys, "job", "dispatch", "-meta", "user=bob", "encode")
        assert code == 0 and 'Evaluation "' in out  # monitored to the end
        code, _, err = await cli(capsys, "job", "dispatch", "-meta", "novalue", "encode")
        assert (code, err.strip()) == (1, "Error parsing meta value: novalue")
        code, _, err = await cli(capsys, "job", "dispatch", "encoder-plain")
        assert code == 1
        assert 'No parameterized job(s) with prefix or id "encoder-plain" found' in err
        code, _, err = await cli(capsys, "job", "dispatch", "encode")
        assert code == 1 and "Dispatch did not provide required meta keys: [user]" in err
    finally:
        await nomad.agent.stop()
        await nomad.server.close()
