"""``GET /v1/metrics`` (JSON and Prometheus text), ``operator metrics``, and the client's
garbage collection, against an agent in this process (see ``test_cli``) running a job on the
mock driver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nomad_client.http.endpoints.metrics import Metric, prometheus_text
from nomad_client.http.request_counts import TASK_API_REQUESTS
from nomad_client.server.keyring import Keyring
from tests.unit.factories import (
    HttpAnswer,
    call_http,
    call_http_once,
    call_unix,
    make_server,
    serve_api,
    wait_until,
)
from tests.unit.test_cli import Nomad, cli, mock_job

pytestmark = pytest.mark.timeout(60)


async def get(nomad: Nomad, target: str) -> HttpAnswer:
    return await call_http_once(nomad.agent.api.url, "GET", target)


def gauge(body: dict[str, Any], name: str, **labels: str) -> Any:
    values = [g["Value"] for g in body["Gauges"]
              if g["Name"] == name and labels.items() <= g["Labels"].items()]
    assert len(values) == 1, (name, labels, values)
    return values[0]


async def running_job(nomad: Nomad) -> None:
    await nomad.run_job(mock_job("web"))
    await wait_until(lambda: nomad.job_status("web") == "running", "the job to run")


async def test_json_metrics_in_nomads_shape(nomad: Nomad) -> None:
    await running_job(nomad)
    answer = await get(nomad, "/v1/metrics")
    assert answer.status == 200
    body = answer.body
    assert set(body) == {"Timestamp", "Gauges", "Counters", "Samples", "Points"}
    assert body["Timestamp"].endswith(" +0000 UTC")
    node_id = nomad.client.node_id
    assert gauge(body, "nomad.client.allocations.running", node_id=node_id) == 1
    assert gauge(body, "nomad.client.allocations.pending", node_id=node_id) == 0
    assert gauge(body, "nomad.client.host.memory.total", node_id=node_id) > 0
    assert gauge(body, "nomad.runtime.num_goroutines") > 0
    assert gauge(body, "nomad.nomad.job_summary.running", job="web", task_group="g",
                 namespace="default") == 1
    assert gauge(body, "nomad.nomad.job_summary.queued", job="web", task_group="g") == 0
    assert gauge(body, "nomad.nomad.job_status.running") == 1


async def test_prometheus_text(nomad: Nomad) -> None:
    await running_job(nomad)
    answer = await get(nomad, "/v1/metrics?format=prometheus")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = answer.body
    assert "# TYPE nomad_client_allocations_running gauge" in text
    running = [line for line in text.splitlines()
               if line.startswith("nomad_client_allocations_running{")]
    assert len(running) == 1 and running[0].endswith(" 1")
    assert f'node_id="{nomad.client.node_id}"' in running[0]
    assert "nomad_client_host_memory_total{" in text
    assert "\nnomad_runtime_num_goroutines " in text
    assert 'nomad_nomad_job_summary_running{job="web",namespace="default",task_group="g"} 1' \
        in text


def test_prometheus_escapes_label_values() -> None:
    text = prometheus_text([Metric("a.b", 2, {"job": 'x"y\\z\nw'})],
                           [Metric("c", 3, {"status": "200"})])
    assert text == ('# HELP a_b a_b\n# TYPE a_b gauge\na_b{job="x\\"y\\\\z\\nw"} 2\n'
                    '# HELP c c\n# TYPE c counter\nc{status="200"} 3\n')


async def test_task_api_requests_are_counted_by_status(keyring: Keyring, tmp_path: Path
                                                       ) -> None:
    server = make_server(keyring, acl=True)
    sock = tmp_path / "api.sock"
    api = await serve_api(server, task_sock=sock)
    try:
        before = TASK_API_REQUESTS.snapshot().get(401, 0)
        assert (await call_unix(sock, "GET", "/v1/agent/health")).status == 401
        assert TASK_API_REQUESTS.snapshot().get(401, 0) == before + 1
        async with aiohttp.ClientSession() as session:
            # No ACL needed on TCP, even with ACLs on.
            metrics = await call_http(session, api.url, "GET", "/v1/metrics")
        assert metrics.status == 200
        [counter] = [c for c in metrics.body["Counters"]
                     if c["Name"] == "nomad.client.task_api.requests"
                     and c["Labels"] == {"status": "401"}]
        assert counter["Count"] == before + 1
    finally:
        await api.close()
        await server.close()


async def test_operator_metrics_cli(capsys: pytest.CaptureFixture[str], nomad: Nomad) -> None:
    await running_job(nomad)
    code, out, err = await cli(capsys, "operator", "metrics")
    assert code == 0, err
    assert {g["Name"] for g in json.loads(out)["Gauges"]} >= {
        "nomad.client.allocations.running"}
    code, out, err = await cli(capsys, "operator", "metrics", "-format", "prometheus")
    assert code == 0 and "# TYPE nomad_client_allocations_running gauge" in out
    code, _, err = await cli(capsys, "operator", "metrics", "-format", "xml")
    assert code == 1 and "Unsupported format" in err


async def test_client_gc_destroys_finished_allocations(capsys: pytest.CaptureFixture[str],
                                                       nomad: Nomad) -> None:
    await nomad.run_job(mock_job("short", run_for="10ms", Type="batch"))
    [alloc] = nomad.server.job_allocs("short")
    await wait_until(lambda: nomad.alloc_status(alloc.id) == "complete", "the batch job")
    alloc_dir = nomad.client.alloc_dir_for(alloc.id)
    assert alloc_dir is not None and alloc_dir.path.exists()
    async with aiohttp.ClientSession() as session:
        other = await call_http(session, nomad.agent.api.url, "PUT", "/v1/client/gc?node_id=x")
        assert other.status == 404
        answer = await call_http(session, nomad.agent.api.url, "PUT", "/v1/client/gc")
    assert answer.status == 200
    assert nomad.client.alloc_dir_for(alloc.id) is None and not alloc_dir.path.exists()
    assert nomad.server.allocation(alloc.id) is not None  # the server's record stays


def test_prometheus_values_are_exact() -> None:
    # Host memory in bytes: six significant digits (``:g``) would misreport it.
    text = prometheus_text([Metric("m", 17179869184, {}), Metric("f", 0.1 + 0.2, {}),
                            Metric("n", float("nan"), {}), Metric("i", float("inf"), {})], [])
    values = dict(line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    assert values == {"m": "17179869184", "f": "0.30000000000000004", "n": "NaN", "i": "+Inf"}
