"""``GET /v1/metrics``: the agent's gauges and counters, as Nomad's in-memory sink shows them
(JSON) or, with ``?format=prometheus``, in the Prometheus text format with ``nomad_`` names.

Nothing is sampled in the background: every request measures what the state store, the
client and the event loop hold now. Gauges: ``nomad.runtime.num_goroutines`` (here the event
loop's tasks), per job and group ``nomad.nomad.job_summary.*``, per status
``nomad.nomad.job_status.*``, and for the local client ``nomad.client.allocations.*`` and
``nomad.client.host.memory.*``. Counters: ``nomad.client.task_api.requests`` by status
(counted since the agent started). No ACL is needed, as in Nomad.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
from aiohttp import web

from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.request_counts import TASK_API_REQUESTS
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.server.parent_jobs import is_parent
from nomad_client.structs.namespaces import job_namespace

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Client status -> the allocation gauge it counts in (Nomad's names).
_ALLOC_GAUGES = {"pending": "pending", "running": "running", "complete": "terminal",
                 "failed": "terminal", "lost": "terminal"}
_SUMMARY_GAUGES = ("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown")


@attrs.frozen
class Metric:
    """One gauge value, or one counter's total."""

    name: str
    value: float
    labels: dict[str, str] = attrs.field(factory=dict)


def _job_gauges(services: Services) -> Iterator[Metric]:
    server = services.server
    if server is None:  # a client-only agent: jobs are the servers' to count
        return
    statuses = dict.fromkeys(("pending", "running", "dead"), 0)
    for job in server.jobs():
        namespace = job_namespace(job)
        status = server.job_status(job)
        statuses[status] = statuses.get(status, 0) + 1
        if is_parent(job):
            continue
        summary = server.job_summary(job["ID"], namespace) or {}
        for group, counts in (summary.get("Summary") or {}).items():
            labels = {"job": job["ID"], "task_group": group, "namespace": namespace}
            for field in _SUMMARY_GAUGES:
                yield Metric(f"nomad.nomad.job_summary.{field.lower()}", counts.get(field, 0),
                             labels)
    for status, count in statuses.items():
        yield Metric(f"nomad.nomad.job_status.{status}", count)


async def _client_gauges(services: Services) -> list[Metric]:
    client = services.client
    if client is None:
        return []
    server = services.server
    # A client-only agent has no server record of its node to read here.
    node = server.node(client.node_id) if server is not None else None
    labels = {"node_id": client.node_id,
              "datacenter": node.datacenter if node is not None else "",
              "host": node.name if node is not None else "",
              "node_pool": node.node_pool if node is not None else ""}
    counts = dict.fromkeys(("pending", "running", "blocked", "migrating", "terminal"), 0)
    for alloc in server.node_allocs(client.node_id) if server is not None else ():
        gauge = _ALLOC_GAUGES.get(alloc.client_status)
        if gauge is not None:
            counts[gauge] += 1
    metrics = [Metric(f"nomad.client.allocations.{k}", v, labels) for k, v in counts.items()]
    try:
        memory = (await client.host_stats()).get("Memory") or {}
    except Exception:  # host figures are best effort: the rest is still worth answering
        log.warning("metrics: reading the host's memory failed", exc_info=True)
        memory = {}
    metrics += [Metric(f"nomad.client.host.memory.{field.lower()}", memory[field], labels)
                for field in ("Total", "Available", "Used", "Free") if field in memory]
    return metrics


def _counters() -> list[Metric]:
    return [Metric("nomad.client.task_api.requests", count, {"status": str(status)})
            for status, count in sorted(TASK_API_REQUESTS.snapshot().items())]


def _json_counter(metric: Metric) -> dict[str, Any]:
    # Nomad's SampledValue; every request is one unit, so the spread is nil.
    return {"Name": metric.name, "Count": metric.value, "Rate": metric.value / 10,
            "Sum": metric.value, "Min": 1, "Max": 1, "Mean": 1, "Stddev": 0,
            "Labels": metric.labels}


def _prometheus_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


# The text format's escapes in a label value.
_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def _prometheus_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    pairs = (f'{k}="{v.translate(_LABEL_ESCAPES)}"' for k, v in sorted(labels.items()))
    return "{" + ",".join(pairs) + "}"


def _prometheus_value(value: float) -> str:
    """Exact: ``:g`` keeps six digits, so 16 GiB of memory would read 1.71799e+10."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _prometheus_family(kind: str, metrics: Iterable[Metric]) -> Iterator[str]:
    by_name: dict[str, list[Metric]] = {}
    for metric in metrics:
        by_name.setdefault(_prometheus_name(metric.name), []).append(metric)
    for name, family in sorted(by_name.items()):
        yield f"# HELP {name} {name}"
        yield f"# TYPE {name} {kind}"
        for metric in family:
            yield f"{name}{_prometheus_labels(metric.labels)} {_prometheus_value(metric.value)}"


def prometheus_text(gauges: Iterable[Metric], counters: Iterable[Metric]) -> str:
    lines = [*_prometheus_family("gauge", gauges), *_prometheus_family("counter", counters)]
    return "\n".join(lines) + "\n"


async def metrics(services: Services, req: ApiRequest) -> Any:
    gauges = [Metric("nomad.runtime.num_goroutines", len(asyncio.all_tasks())),
              *_job_gauges(services), *await _client_gauges(services)]
    counters = _counters()
    if req.query.get("format") == "prometheus":
        return web.Response(text=prometheus_text(gauges, counters),
                            headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})
    return {"Timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime()),
            "Gauges": [{"Name": g.name, "Value": g.value, "Labels": g.labels} for g in gauges],
            "Counters": [_json_counter(c) for c in counters], "Samples": [], "Points": []}


def register(router: RouteTable, services: Services) -> None:
    Routes(router, services).add(("GET",), "/v1/metrics", metrics)
