"""``job run -check-index/-json/-output``, ``job history``, ``inspect``, ``revert``,
``validate``, ``eval`` and the top-level ``run``/``status``/``stop``, against a real agent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nomad_client.api import ApiClient
from nomad_client.server.keyring import Keyring
from tests.unit.factories import write_file
from tests.unit.test_cli import Nomad, cli, mock_job, newest_eval, start_nomad, stored_job


@pytest.fixture
async def nomad(tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[Nomad]:
    started = await start_nomad(tmp_path / "agent", keyring, monkeypatch)
    yield started
    await started.agent.stop()


def job_file(tmp_path: Path, count: int = 1) -> Path:
    return write_file(tmp_path, f"web-{count}.json",
                      json.dumps({"Job": mock_job(TaskGroups=[{
                          **mock_job()["TaskGroups"][0], "Count": count}])}))


async def test_run_check_index_json_and_output(capsys: pytest.CaptureFixture[str],
                                               nomad: Nomad, tmp_path: Path) -> None:
    path = job_file(tmp_path)
    code, out, _ = await cli(capsys, "job", "run", "-json", "-output", str(path))
    assert code == 0 and json.loads(out)["Job"]["ID"] == "web"
    assert nomad.server.job("web") is None  # -output submits nothing

    code, out, err = await cli(capsys, "job", "run", "-json", "-detach", "-check-index", "0",
                               str(path))
    assert code == 0, err
    index = stored_job(nomad)["JobModifyIndex"]
    code, _, err = await cli(capsys, "job", "run", "-json", "-detach", "-check-index", "0",
                             str(job_file(tmp_path, 2)))
    assert (code, err) == (1, "Enforcing job modify index 0: job already exists\n"
                              "Job not updated\n")
    code, _, err = await cli(capsys, "run", "-json", "-detach", "-check-index", str(index),
                             str(job_file(tmp_path, 2)))
    assert code == 0, err
    assert stored_job(nomad)["Version"] == 1
    async with ApiClient(address=nomad.agent.api.url) as client:
        source = await client.job_submission("web", 1)
    assert source["Format"] == "json" and json.loads(source["Source"])["Job"]["ID"] == "web"


async def test_history_inspect_revert(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await nomad.run_job(mock_job())
    await nomad.run_job(mock_job(Meta={"v": "2"}))
    code, out, _ = await cli(capsys, "job", "history", "web")
    assert code == 0
    assert [line.split("=")[1].strip() for line in out.splitlines()
            if line.startswith("Version")] == ["1", "0"]
    code, out, _ = await cli(capsys, "job", "inspect", "-version", "0", "web")
    assert code == 0 and json.loads(out)["Job"]["Version"] == 0
    assert "Meta" not in json.loads(out)["Job"] or not json.loads(out)["Job"]["Meta"]

    code, out, err = await cli(capsys, "job", "revert", "-detach", "web", "0")
    assert code == 0, err
    assert out == f"Job reverted\nEvaluation ID: {newest_eval(nomad, 'web')}\n"
    assert stored_job(nomad)["Version"] == 2 and not stored_job(nomad).get("Meta")
    code, _, err = await cli(capsys, "job", "revert", "web", "2")
    assert code == 1 and "can't revert to current version" in err


async def test_validate_and_eval(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                 tmp_path: Path) -> None:
    code, out, _ = await cli(capsys, "job", "validate", "-json", str(job_file(tmp_path)))
    assert (code, out) == (0, "Job validation successful\n")
    bad = write_file(tmp_path, "bad.json", json.dumps(mock_job(Type="nonsense")))
    code, _, err = await cli(capsys, "job", "validate", "-json", str(bad))
    assert code == 1 and err.startswith("Job validation errors:\n* ")
    assert nomad.server.job("web") is None

    await nomad.run_job(mock_job())
    before = newest_eval(nomad, "web")
    code, out, err = await cli(capsys, "job", "eval", "-detach", "-force-reschedule", "web")
    assert code == 0, err
    created = newest_eval(nomad, "web")
    assert created != before and out == f"Evaluation created\nEvaluation ID: {created}\n"

    code, out, _ = await cli(capsys, "status")
    assert code == 0 and "web" in out


async def test_status_of_a_parent_shows_its_children(capsys: pytest.CaptureFixture[str],
                                                     nomad: Nomad) -> None:
    await nomad.run_job(mock_job(Type="batch", Periodic={"Enabled": False, "Spec": "@daily",
                                                         "SpecType": "cron"}))
    code, out, err = await cli(capsys, "job", "status", "web")
    assert code == 0, err
    lines = out.splitlines()
    s = lines.index("Children Job Summary")
    assert lines[s + 1].split() == ["Pending", "Running", "Dead"]
    assert lines[s + 2].split() == ["0", "0", "0"]
    assert "Summary" not in lines
