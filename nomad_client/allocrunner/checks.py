"""Health checks of services with provider ``"nomad"``, run by the client on the node.

A check probes its service's own address on this node (the allocation's port: its
``HostIP``, else the node's address, loopback by default) and nothing else; an http check
never follows a redirect, so it cannot be sent anywhere by the service it checks.

* ``http``: the check's method and path; a 2xx answer passes (200 with ``nomad: http ok``,
  another 2xx with the start of its body), anything else fails with the start of the body.
* ``tcp``: a connection that opens passes (``nomad: tcp ok``).

Each check starts ``pending``, is first probed after half its interval, then every interval,
each probe bounded by its timeout. Checks run in background tasks owned by a ``CheckRunner``
(one per allocation, grouped by workload: a task, or the group), cancelled when their service
is deregistered; results live in the client's ``CheckResults`` (memory only), served at
``GET /v1/allocation/:id/checks`` in Nomad's shape (``Group`` is the allocation's name and
``Timestamp`` unix seconds, as Nomad's quirks have it).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp
import attrs

from nomad_client.structs.network import join_host_port

SUCCESS = "success"
FAILURE = "failure"
PENDING = "pending"
MODE_HEALTHINESS = "healthiness"
# The most of an answer kept as a check's output, as Nomad's (3 KiB).
OUTPUT_LIMIT = 3 * 1024
NS = 1_000_000_000


@attrs.frozen
class CheckSpec:
    """One check to run, resolved against the allocation: ``address``/``port`` is where it
    probes; ``task`` is empty for a group's service. Times in seconds."""

    id: str
    alloc_id: str
    alloc_name: str
    task: str
    service: str
    name: str
    type: str
    address: str
    port: int
    path: str
    method: str
    interval: float
    timeout: float


@attrs.frozen
class CheckResult:
    status: str
    output: str
    timestamp: int = attrs.field(factory=lambda: int(time.time()))  # unix seconds
    status_code: int = 0


def check_spec(check: Mapping[str, Any], *, alloc_id: str, alloc_name: str, group: str,
               task: str, service: str, address: str, port: int) -> CheckSpec:
    """The spec of ``check`` (a canonical job's check) of a service at ``address:port``. Its
    ID is Nomad's kind: the SHA-256 of the allocation, group and the check's definition."""
    definition = "\x00".join(str(part) for part in (
        alloc_id, group, task, service, check["Name"], check["Type"], check.get("Path"),
        check.get("Method"), check["Interval"], check["Timeout"], check.get("PortLabel")))
    return CheckSpec(
        id=hashlib.sha256(definition.encode()).hexdigest(), alloc_id=alloc_id,
        alloc_name=alloc_name, task=task, service=service, name=check["Name"],
        type=check["Type"], address=address, port=port, path=check.get("Path") or "/",
        method=(check.get("Method") or "GET").upper(), interval=check["Interval"] / NS,
        timeout=check["Timeout"] / NS)


def result_api(spec: CheckSpec, result: CheckResult) -> dict[str, Any]:
    """Nomad's check result object, plus the alloc ID and the service and check names
    under the names the project uses elsewhere (``ServiceName``, ``CheckName``)."""
    out: dict[str, Any] = {
        "ID": spec.id, "Mode": MODE_HEALTHINESS, "Status": result.status,
        "Output": result.output, "Timestamp": result.timestamp, "Group": spec.alloc_name,
        "Service": spec.service, "Check": spec.name, "ServiceName": spec.service,
        "CheckName": spec.name, "AllocID": spec.alloc_id}
    if result.status_code:
        out["StatusCode"] = result.status_code
    if spec.task:
        out["Task"] = spec.task
    return out


class CheckResults:
    """The latest result of every running check of this node, by allocation and check ID."""

    def __init__(self) -> None:
        self._allocs: dict[str, dict[str, tuple[CheckSpec, CheckResult]]] = {}

    def record(self, spec: CheckSpec, result: CheckResult) -> None:
        self._allocs.setdefault(spec.alloc_id, {})[spec.id] = (spec, result)

    def forget(self, specs: Iterable[CheckSpec]) -> None:
        for spec in specs:
            held = self._allocs.get(spec.alloc_id)
            if held is not None:
                held.pop(spec.id, None)
                if not held:
                    del self._allocs[spec.alloc_id]

    def for_alloc(self, alloc_id: str) -> dict[str, dict[str, Any]] | None:
        """Check ID -> result (Nomad's shape); None when the allocation runs no checks."""
        held = self._allocs.get(alloc_id)
        if not held:
            return None
        return {check_id: result_api(spec, result) for check_id, (spec, result) in held.items()}


# ---- probes ----------------------------------------------------------------------------------
def _text(data: bytes) -> str:
    return data[:OUTPUT_LIMIT].decode("utf-8", errors="replace")


async def _probe_http(spec: CheckSpec) -> CheckResult:
    path = spec.path if spec.path.startswith("/") else f"/{spec.path}"
    url = f"http://{join_host_port(spec.address, spec.port)}{path}"
    # No proxy from the environment (trust_env off) and no redirects: this address only.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=spec.timeout),
                                     trust_env=False) as session:
        async with session.request(spec.method, url, allow_redirects=False) as response:
            body = await response.content.read(OUTPUT_LIMIT)
            status = response.status
    if 200 <= status < 300:
        output = "nomad: http ok" if status == 200 else _text(body)
        return CheckResult(SUCCESS, output, status_code=status)
    return CheckResult(FAILURE, _text(body) or f"nomad: http status {status}",
                       status_code=status)


async def _probe_tcp(spec: CheckSpec) -> CheckResult:
    async with asyncio.timeout(spec.timeout):
        _, writer = await asyncio.open_connection(spec.address, spec.port)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # it opened: that is all a tcp check asks
    return CheckResult(SUCCESS, "nomad: tcp ok")


async def probe(spec: CheckSpec) -> CheckResult:
    """One probe of ``spec``; a failure of any kind is a ``failure`` result, never raised."""
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.type == "http":
                return await _probe_http(spec)
            return await _probe_tcp(spec)
    except TimeoutError:
        return CheckResult(FAILURE, f"nomad: timed out after {spec.timeout:g}s")
    except (OSError, aiohttp.ClientError, ValueError) as err:
        return CheckResult(FAILURE, _text(f"nomad: {str(err) or type(err).__name__}".encode()))


async def run_check(spec: CheckSpec, results: CheckResults) -> None:
    """Probe ``spec`` forever (until cancelled), recording each result."""
    await asyncio.sleep(spec.interval / 2)
    while True:
        results.record(spec, await probe(spec))
        await asyncio.sleep(spec.interval)


class CheckRunner:
    """The running checks of one allocation, by workload (a task's name, or the group's
    workload): each check in a task of its own, cancelled with its workload."""

    def __init__(self, results: CheckResults) -> None:
        self._results = results
        self._running: dict[str, list[tuple[CheckSpec, asyncio.Task[None]]]] = {}

    async def start(self, workload: str, specs: Sequence[CheckSpec]) -> None:
        """Run ``specs`` for ``workload`` (in place of any it ran); each is ``pending``
        until its first probe."""
        await self.stop(workload)
        for spec in specs:
            self._results.record(spec, CheckResult(PENDING, "nomad: waiting to run"))
        self._running[workload] = [
            (spec, asyncio.create_task(run_check(spec, self._results),
                                       name=f"check-{spec.id[:8]}"))
            for spec in specs]

    async def stop(self, workload: str) -> None:
        """Stop the checks of ``workload`` and forget their results."""
        running = self._running.pop(workload, [])
        for _, task in running:
            task.cancel()
        await asyncio.gather(*(task for _, task in running), return_exceptions=True)
        self._results.forget(spec for spec, _ in running)

    async def stop_all(self) -> None:
        for workload in list(self._running):
            await self.stop(workload)
