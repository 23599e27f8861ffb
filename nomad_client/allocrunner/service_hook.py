"""Alloc hook ``services``: registers an allocation's services (provider ``"nomad"``) with
the servers while its tasks run, and runs their checks.

* When: a group's services once the first of its tasks is running (its driver handle
  exists), a task's services with each start of that task. A task's are deregistered when
  it exits (until its next start) or stops for good; the group's, and everything left, as
  soon as the allocation is told to stop (while its tasks are being stopped, so nobody is
  sent to a service going away), when all its tasks are dead (postrun) and when it is
  destroyed. An agent shutdown that leaves the tasks running leaves their registrations in
  place too (the next agent registers them again, unchanged).
* What: address and port of the allocation's port the service names (``allocated_resources``,
  read through ``structs.network``): its ``HostIP`` and host port; a numeric port is that
  port at the node's address. Registration IDs are Nomad's (``structs.services``).
* Checks run while their service is registered (``checks.CheckRunner``); their results go
  to the client's ``CheckResults``.

A registration that fails is retried with backoff for as long as its workload runs, and told
to the task once as an event; a deregistration is retried a few times (the servers remove an
allocation's registrations themselves once it is terminal). Nothing here fails a task.
The hook knows the servers only as a ``ServiceCatalog``: the client's RPC, as this node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from nomad_client.allocrunner.checks import CheckResults, CheckRunner, CheckSpec, check_spec
from nomad_client.allocrunner.hooks import AllocHookDeps, TaskContext
from nomad_client.client.drivers.base import ExitResult
from nomad_client.structs.jobs import task_group
from nomad_client.structs.models import EVENT_HOOK_MESSAGE, Allocation, TaskEvent
from nomad_client.structs.network import NODE_ADDRESS_ATTRIBUTE, AllocatedPort, allocated_ports
from nomad_client.structs.services import group_workload, registration_id

REGISTER_RETRY_FIRST = 0.1
REGISTER_RETRY_MAX = 5.0
DEREGISTER_ATTEMPTS = 5
DEREGISTER_RETRY_FIRST = 0.1
DEREGISTER_RETRY_MAX = 1.0
LOOPBACK = "127.0.0.1"


class ServiceCatalog(Protocol):
    """The servers' service registrations, as this node may change them."""

    async def register_services(self, alloc_id: str,
                                registrations: Sequence[Mapping[str, Any]]) -> None:
        """Create or update registrations of the allocation (Nomad's ServiceRegistration
        fields ``ID``, ``ServiceName``, ``Tags``, ``Address``, ``Port``). Raises if refused."""
        ...

    async def deregister_services(self, alloc_id: str, ids: Sequence[str]) -> None:
        """Remove registrations of the allocation; IDs it does not hold are no error."""
        ...


class PortNotFound(LookupError):
    """A service names a port the allocation was not given."""


class ServiceHook:
    name = "services"

    def __init__(self, deps: AllocHookDeps, *, catalog: ServiceCatalog,
                 checks: CheckResults) -> None:
        self._alloc = deps.alloc
        self._log = deps.log
        self._catalog = catalog
        self._checks = CheckRunner(checks)
        self._group_key = group_workload(deps.alloc.task_group)
        self._group_services = _services(task_group(deps.alloc.job, deps.alloc.task_group))
        self._any = bool(self._group_services) or any(
            _services(t) for t in task_group(deps.alloc.job, deps.alloc.task_group)
            .get("Tasks") or ())
        # workload (a task's name, or the group's) -> what registers it, then the IDs it holds
        self._registering: dict[str, asyncio.Task[None]] = {}
        self._registered: dict[str, list[str]] = {}
        self._stopping = False

    # ---- task lifecycle ----------------------------------------------------------------
    async def task_starting(self, ctx: TaskContext) -> None:
        if not self._any or self._stopping:
            return
        await self._stop_workload(ctx.name)  # what an earlier start left, should any be
        self._registering[ctx.name] = asyncio.create_task(
            self._when_running(ctx), name=f"services-{ctx.name}")

    async def task_exited(self, ctx: TaskContext, result: ExitResult, will_restart: bool
                          ) -> None:
        await self._stop_workload(ctx.name)

    async def task_stopped(self, ctx: TaskContext) -> None:
        await self._stop_workload(ctx.name)

    async def _when_running(self, ctx: TaskContext) -> None:
        await ctx.handle.started()
        if self._stopping:
            return
        if self._group_services and self._group_key not in self._registering:
            # Its own task: the group's services outlive this task's start.
            self._registering[self._group_key] = asyncio.create_task(
                self._register(self._group_key, self._group_services, ctx, task=""),
                name="services-group")
        await self._register(ctx.name, _services(ctx.task), ctx, task=ctx.name)

    # ---- alloc lifecycle ---------------------------------------------------------------
    async def update(self, alloc: Allocation) -> None:
        self._alloc = alloc
        if alloc.server_terminal() and not self._stopping:
            self._stopping = True
            await self._stop_all()

    async def postrun(self) -> None:
        await self._stop_all()

    async def destroy(self) -> None:
        self._stopping = True
        await self._stop_all()

    async def shutdown(self) -> None:
        """The agent stops, the tasks run on: stop working, keep the registrations."""
        tasks = list(self._registering.values())
        self._registering.clear()
        await _cancelled(tasks)
        await self._checks.stop_all()

    # ---- registering -------------------------------------------------------------------
    async def _register(self, workload: str, services: Sequence[Mapping[str, Any]],
                        ctx: TaskContext, *, task: str) -> None:
        if not services:
            return
        try:
            registrations, specs = self._resolve(workload, services, ctx, task)
        except PortNotFound as err:
            self._tell(ctx, f"Services not registered: {err}")
            return
        await self._checks.start(workload, specs)
        # Known before the call: a deregistration racing it removes them either way.
        self._registered[workload] = [r["ID"] for r in registrations]
        await self._retrying(ctx, workload, lambda: self._catalog.register_services(
            self._alloc.id, registrations))

    async def _retrying(self, ctx: TaskContext, workload: str,
                        call: Callable[[], Awaitable[None]]) -> None:
        delay, told = REGISTER_RETRY_FIRST, False
        while True:
            try:
                await call()
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not told:
                    self._tell(ctx, f"Service registration failed, retrying: {err}")
                    told = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, REGISTER_RETRY_MAX)

    def _resolve(self, workload: str, services: Sequence[Mapping[str, Any]],
                 ctx: TaskContext, task: str) -> tuple[list[dict[str, Any]], list[CheckSpec]]:
        """The registrations of ``services`` and the specs of their checks."""
        alloc = self._alloc
        ports = {p.label: p for p in allocated_ports(alloc.allocated_resources)}
        node_address = ctx.node.attributes.get(NODE_ADDRESS_ATTRIBUTE) or LOOPBACK
        registrations, specs = [], []
        for service in services:
            label = service.get("PortLabel") or ""
            address, port = _address_of(label, ports, node_address)
            registrations.append({
                "ID": registration_id(alloc.id, workload, service["Name"], label),
                "ServiceName": service["Name"], "Tags": list(service.get("Tags") or ()),
                "Address": address, "Port": port})
            for check in service.get("Checks") or ():
                check_address, check_port = _address_of(check.get("PortLabel") or label,
                                                        ports, node_address)
                specs.append(check_spec(
                    check, alloc_id=alloc.id, alloc_name=alloc.name, group=alloc.task_group,
                    task=task, service=service["Name"], address=check_address,
                    port=check_port))
        return registrations, specs

    def _tell(self, ctx: TaskContext, message: str) -> None:
        self._log.warning("task %s: %s", ctx.name, message)
        ctx.emit(TaskEvent(type=EVENT_HOOK_MESSAGE, message=message, display_message=message))

    # ---- deregistering -----------------------------------------------------------------
    async def _stop_workload(self, workload: str) -> None:
        registering = self._registering.pop(workload, None)
        if registering is not None:
            await _cancelled([registering])
        await self._checks.stop(workload)
        ids = self._registered.pop(workload, None)
        if ids:
            await self._deregister(ids)

    async def _stop_all(self) -> None:
        for workload in {*self._registering, *self._registered}:
            await self._stop_workload(workload)

    async def _deregister(self, ids: Sequence[str]) -> None:
        delay = DEREGISTER_RETRY_FIRST
        for attempt in range(1, DEREGISTER_ATTEMPTS + 1):
            try:
                await self._catalog.deregister_services(self._alloc.id, ids)
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if attempt == DEREGISTER_ATTEMPTS:
                    # The servers remove them once the allocation is terminal.
                    self._log.warning("deregistering services %s failed: %s", ids, err)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, DEREGISTER_RETRY_MAX)


def _services(owner: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The services of a group or task (of a canonical job)."""
    return list(owner.get("Services") or ())


def _address_of(label: str, ports: Mapping[str, AllocatedPort], node_address: str
                ) -> tuple[str, int]:
    """Where a service's port ``label`` is reached: the allocation's port of that label (its
    host IP and host port), a numeric label at the node's address, or no port at all."""
    if not label:
        return node_address, 0
    if label in ports:
        port = ports[label]
        return port.host_ip or node_address, port.value
    if label.isdecimal():
        return node_address, int(label)
    raise PortNotFound(f"the allocation has no port {label!r}")


async def _cancelled(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
