"""The client: fingerprints and registers this node, watches the server for the node's
allocations, runs one alloc runner per allocation, reports their state back, and keeps the
node's dynamic metadata.

It reaches the server only through ``ServerRPC``; it persists what an agent restart needs
(node identity, dynamic metadata, allocations, task states and driver handles) in its own
``StateDB``. Every background task it starts is owned here and cancelled on shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import random
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from nomad_client.allocrunner.alloc_runner import (
    AllocRunner,
    AllocRunnerConfig,
    RestoredTask,
    UnknownAllocation,
)
from nomad_client.allocrunner.builtin_hooks import BUILTIN_TASK_HOOKS, builtin_alloc_hooks
from nomad_client.allocrunner.checks import CheckResults
from nomad_client.allocrunner.hooks import TaskSocketServer
from nomad_client.client.allocdir import AllocDir, unmount_orphaned_tmpfs
from nomad_client.client.cgroups import CgroupManager, agent_cgroups, cgroup_of
from nomad_client.client.drivers import builtin_drivers
from nomad_client.client.drivers.base import Driver, DriverError, ExecTarget, TaskHandle
from nomad_client.client.exec_session import ChangeSignal, ExecSessions, ExecStartError, ExecTask
from nomad_client.client.fingerprint import fingerprint_node
from nomad_client.client.identities import IdentityManager
from nomad_client.client.nodemeta import MetaLimitError, MetaLimits, check_meta_update
from nomad_client.client.servers import NodeReply, ServerRPC, UnknownNode
from nomad_client.client.stats import HostStatsSampler, TaskUsageSampler
from nomad_client.client.taskapi_config import LiveTaskAPIConfig
from nomad_client.client.taskenv import NodeView
from nomad_client.state_db import CoalescingWriter, StateDB
from nomad_client.structs.codec import from_rpc, to_rpc
from nomad_client.structs.models import (
    NODE_READY,
    Allocation,
    AllocUpdate,
    DriverInfo,
    Node,
    TaskState,
    rfc3339,
)

log = logging.getLogger(__name__)

# Until the servers give a TTL (or when one gives none): how often the node heartbeats.
HEARTBEAT_INTERVAL = 10.0
# A heartbeat goes out at a random 40-60 % of the last TTL, so a lost one leaves time for
# another and clients started together spread out.
HEARTBEAT_TTL_SHARE = (0.4, 0.6)
# While the servers cannot be reached: retries back off from the first to the last, with
# jitter. Tasks keep running meanwhile.
HEARTBEAT_RETRY_MIN, HEARTBEAT_RETRY_MAX = 1.0, 30.0
WATCH_WAIT = 30.0
NODE_UPDATE_COALESCE = 0.1  # dynamic metadata reaches the servers well within a second
REPORT_COALESCE = 0.05
# Allocations fetched (and signed) per Alloc.GetAllocs: in a start storm the first runners
# start while the rest are fetched, and no one step holds the event loop for long.
FETCH_CHUNK = 100
# Allocation reports per Node.UpdateAlloc, for the same reason: the server encodes and writes
# every row a report changes in one step.
REPORT_CHUNK = 100

B_NODE, B_ALLOCS, B_TASKS = "node", "allocs", "tasks"
# Dynamic metadata: one row per key (None: a static key unset), so an update writes only the
# keys it changes. Older agents kept the whole dict in one row, migrated on start.
B_META = "nodemeta.keys"
B_LEGACY_META, LEGACY_META_KEY = "nodemeta", "meta"


@attrs.frozen
class ClientSettings:
    data_dir: Path
    alloc_dir: Path
    state_dir: Path
    name: str
    datacenter: str
    region: str
    http_addr: str
    static_meta: Mapping[str, str]
    node_class: str = ""
    node_pool: str = "default"
    meta_limits: MetaLimits = attrs.field(factory=MetaLimits)
    # The agent's live Task API config, replaced whole on a reload (then the agent calls
    # Client.apply_task_api_config).
    task_api: LiveTaskAPIConfig = attrs.field(factory=LiveTaskAPIConfig)
    # client { disable_remote_exec }: refuse every alloc exec (not reloadable).
    disable_remote_exec: bool = False
    # The servers' RPC addresses of a client-only agent (empty: this agent's own server).
    servers: tuple[str, ...] = ()


class Client:
    def __init__(self, settings: ClientSettings, rpc: ServerRPC, db: StateDB,
                 task_api: TaskSocketServer | None,
                 drivers: Mapping[str, Driver] | None = None) -> None:
        self.settings = settings
        self.rpc = rpc
        self.db = db
        # Alloc and task rows go through group commit: a start storm of N tasks costs a few
        # transactions, and each caller still returns only once its row is durable.
        self._writes = CoalescingWriter(db)
        self.task_api = task_api
        # Each namespace's Task API capability as last read: the answer when the servers
        # cannot be reached (the last thing they said, never a guess).
        self._namespace_modes: dict[str, str | None] = {}
        self.drivers = dict(drivers or builtin_drivers())
        self.node_id = ""
        self._secret_id = ""
        self._node: Node | None = None
        self._dynamic: dict[str, str | None] = {}
        self._meta_lock = asyncio.Lock()
        self.runners: dict[str, AllocRunner] = {}
        self._pending_reports: dict[str, AllocUpdate] = {}
        # The latest report of each allocation, sent again when the servers are reached
        # after a time without them (they may have marked the allocations unknown or lost).
        self._last_reports: dict[str, AllocUpdate] = {}
        self._heartbeat_ttl = HEARTBEAT_INTERVAL / HEARTBEAT_TTL_SHARE[1]
        self._rng = random.Random()
        self._report_wakeup = asyncio.Event()
        self._node_dirty = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._registered = False
        # Workload identities live in memory (and task secrets dirs), never in self.db.
        self.identities = IdentityManager(self._sign_identities)
        # Results of the service checks this node runs (GET /v1/allocation/:id/checks).
        self.checks = CheckResults()
        # alloc exec sessions (ended on shutdown), woken when their allocation changes.
        self.exec_sessions = ExecSessions()
        self._alloc_changes = ChangeSignal()
        self._task_usage = TaskUsageSampler(self._cpu_mhz, cgroups=self._cgroups)
        self._host_usage = HostStatsSampler(self._cpu_mhz)

    # ---- startup -----------------------------------------------------------------------
    async def start(self) -> None:
        await self._load_identity()
        await self._load_metadata()
        self._node = await self._build_node()
        try:
            await self._register()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            # Tasks restored below run on; the heartbeat loop keeps trying to register.
            log.warning("could not register with the servers (%s); will retry", _brief(err))
        await self._restore_allocs()
        for name, coro in (("watch-allocs", self._watch_allocs()),
                           ("heartbeat", self._heartbeat()),
                           ("node-updates", self._node_updates()),
                           ("alloc-reports", self._alloc_reports()),
                           ("identity-renewal", self.identities.run())):
            self._background.append(asyncio.create_task(coro, name=name))

    async def _load_identity(self) -> None:
        ident = await self.db.get(B_NODE, "identity")
        if not ident:
            ident = {"id": str(uuid.uuid4()), "secret": str(uuid.uuid4())}
            await self.db.put(B_NODE, "identity", ident)
        self.node_id, self._secret_id = ident["id"], ident["secret"]

    async def _build_node(self) -> Node:
        s = self.settings
        fp = await asyncio.to_thread(fingerprint_node, self.drivers, name=s.name,
                                     datacenter=s.datacenter, region=s.region,
                                     bind_addr=s.http_addr.rsplit(":", 1)[0])
        drivers = {name: DriverInfo(detected=d["Detected"], healthy=d["Healthy"],
                                    health_description=d.get("HealthDescription", ""),
                                    attributes=dict(d.get("Attributes") or {}),
                                    update_time=rfc3339())
                   for name, d in fp["Drivers"].items()}
        return Node(id=self.node_id, secret_id=self._secret_id, name=s.name,
                    datacenter=s.datacenter, http_addr=s.http_addr, node_class=s.node_class,
                    node_pool=s.node_pool,
                    attributes=dict(fp["Attributes"]), meta=self._merged_meta(),
                    drivers=drivers, node_resources=dict(fp.get("NodeResources") or {}),
                    status=NODE_READY)

    # ---- metadata ----------------------------------------------------------------------
    async def _load_metadata(self) -> None:
        """Read dynamic metadata, migrating the old one-row format and forgetting unsets of
        static keys the config no longer has, in one transaction."""
        legacy = await self.db.get(B_LEGACY_META, LEGACY_META_KEY)
        stored: dict[str, str | None] = dict(await self.db.items(B_META))
        migrated = {k: v for k, v in (legacy or {}).items() if k not in stored}
        dynamic = {**stored, **migrated}
        stale = [k for k, v in dynamic.items()
                 if v is None and k not in self.settings.static_meta]
        puts = [(B_META, k, v) for k, v in migrated.items() if k not in stale]
        deletes = [(B_META, k) for k in stale if k in stored]
        if legacy is not None:
            deletes.append((B_LEGACY_META, LEGACY_META_KEY))
        if puts or deletes:
            await self.db.write_batch(puts, deletes)
        self._dynamic = {k: v for k, v in dynamic.items() if k not in stale}
        try:
            check_meta_update({}, {}, self._dynamic, self.settings.meta_limits)
        except MetaLimitError as err:
            # Kept as stored: updates that do not grow it further are still accepted.
            log.warning("stored dynamic metadata exceeds the configured limits: %s", err)

    def _merged_meta(self) -> dict[str, str]:
        meta = dict(self.settings.static_meta)
        for key, value in self._dynamic.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        return meta

    def metadata(self) -> dict[str, Any]:
        return {"Meta": self._merged_meta(), "Dynamic": dict(self._dynamic),
                "Static": dict(self.settings.static_meta)}

    async def apply_metadata(self, meta: Mapping[str, str | None]) -> dict[str, Any]:
        """Apply a whole update or none of it; a :class:`MetaLimitError` (a ValueError)
        names the limit an update would exceed."""
        async with self._meta_lock:
            dynamic = {**self._dynamic, **meta}
            for key, value in meta.items():
                if value is None and key not in self.settings.static_meta:
                    dynamic.pop(key, None)  # unsetting a purely dynamic key forgets it
            check_meta_update(self._dynamic, meta, dynamic, self.settings.meta_limits)
            # Only the rows of keys this update changes are written.
            puts = [(B_META, k, dynamic[k]) for k in meta if k in dynamic
                    and (k not in self._dynamic or self._dynamic[k] != dynamic[k])]
            deletes = [(B_META, k) for k in meta if k in self._dynamic and k not in dynamic]
            if not puts and not deletes:
                return self.metadata()
            # Persist first: if the write fails nothing in memory has changed.
            await self.db.write_batch(puts, deletes)
            self._dynamic = dynamic
            assert self._node is not None
            self._node = attrs.evolve(self._node, meta=self._merged_meta())
            self._node_dirty.set()
            return self.metadata()

    def node_view(self) -> NodeView:
        node = self._node
        assert node is not None
        return NodeView(id=node.id, name=node.name, datacenter=node.datacenter,
                        region=self.settings.region, node_class=node.node_class,
                        pool=node.node_pool, attributes=node.attributes, meta=node.meta)

    def healthy(self) -> tuple[bool, str]:
        # Healthy while it knows servers, reachable or not: tasks and their sockets run on
        # through an outage, and an orchestrator restarting the agent would only hurt.
        if self._registered or self.settings.servers:
            return True, "ok"
        return False, "no known servers"

    def node_credentials(self) -> tuple[str, str]:
        """This node's ID and secret, which its calls to the servers carry."""
        return self.node_id, self._secret_id

    def allocation(self, alloc_id: str) -> Allocation | None:
        """The allocation as this client runs it (None: not here)."""
        runner = self.runners.get(alloc_id)
        return None if runner is None else runner.alloc

    # ---- allocation control and resource usage (the client's HTTP routes) ---------------
    def _runner(self, alloc_id: str) -> AllocRunner:
        runner = self.runners.get(alloc_id)
        if runner is None:
            raise UnknownAllocation(f"Unknown allocation {alloc_id!r}")
        return runner

    async def restart_alloc(self, alloc_id: str, task: str | None, all_tasks: bool) -> None:
        await self._runner(alloc_id).restart(task, all_tasks=all_tasks)

    async def signal_alloc(self, alloc_id: str, signal: str, task: str | None) -> None:
        await self._runner(alloc_id).signal(signal, task)

    async def alloc_stats(self, alloc_id: str, task: str | None) -> dict[str, Any]:
        runner = self._runner(alloc_id)
        roots = runner.process_roots(task)
        cgroups = {name: cg for name, r in runner.task_runners.items() if name in roots
                   and r.handle is not None and (cg := cgroup_of(r.handle.driver_state))}
        return await asyncio.to_thread(self._task_usage.alloc_usage, alloc_id, roots, cgroups)

    def _cgroups(self) -> CgroupManager | None:
        """This agent's task cgroups, once an exec task has made them (blocking: a thread's)."""
        return agent_cgroups(self.settings.data_dir)

    async def host_stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._host_usage.host_stats, self.settings.alloc_dir)

    def _cpu_mhz(self) -> float:
        attributes = self._node.attributes if self._node is not None else {}
        try:
            return float(attributes.get("cpu.frequency") or 0)
        except ValueError:
            return 0.0

    def alloc_dir_for(self, alloc_id: str) -> AllocDir | None:
        runner = self.runners.get(alloc_id)
        return runner.alloc_dir if runner is not None else None

    # ---- allocations -------------------------------------------------------------------
    @functools.cached_property
    def _runner_config(self) -> AllocRunnerConfig:
        # One for every runner: a copy per allocation (the host env above all) costs memory
        # per task, and nothing in it changes while the client runs.
        return AllocRunnerConfig(
            alloc_dir_root=self.settings.alloc_dir,
            driver_state_root=self.settings.state_dir / "tasks",
            drivers=self.drivers, node_view=self.node_view,
            alloc_hooks=builtin_alloc_hooks(self, self.checks),
            task_hooks=BUILTIN_TASK_HOOKS, task_api=self.task_api,
            host_env=dict(os.environ), persist_task=self._persist_task,
            report=self._queue_report, identities=self.identities,
            task_api_config=self.settings.task_api, namespaces=self)

    # ---- alloc exec ----------------------------------------------------------------------
    @property
    def remote_exec_disabled(self) -> bool:
        return self.settings.disable_remote_exec

    def exec_task(self, alloc_id: str, task: str) -> ExecTask:
        """Task ``task`` of the allocation, for ``alloc exec``: ``UnknownAllocation``, or
        ``ControlRefused`` when the allocation has no such task."""
        runner = self._runner(alloc_id).task_runner(task)

        async def target() -> ExecTarget:
            exec_target = getattr(runner.driver, "exec_target", None)
            if runner.handle is None or not runner.running:
                raise ExecStartError(f"task {task!r} is not running.")
            if exec_target is None:
                raise ExecStartError(f"task driver {runner.driver.name!r} does not support exec")
            try:
                return await exec_target(runner.handle)
            except DriverError as err:
                raise ExecStartError(f"task {task!r}: {err}") from None

        return ExecTask(target=target, stopped=lambda: self._alloc_changes.wait_until(
            alloc_id, lambda: not runner.running))

    # ---- the Task API ------------------------------------------------------------------
    async def namespace_task_api_mode(self, namespace: str) -> str | None:
        """``Capabilities.TaskAPI`` of ``namespace`` (None when it has no say), from the
        servers; the last answer if they cannot be reached."""
        try:
            mode = await self.rpc.namespace_task_api_mode(namespace)
        except asyncio.CancelledError:
            raise
        except Exception:
            if namespace in self._namespace_modes:
                return self._namespace_modes[namespace]
            raise
        self._namespace_modes[namespace] = mode
        return mode

    async def apply_task_api_config(self) -> None:
        """After the agent replaced ``settings.task_api``: every allocation's running tasks
        get or lose their Task API socket as the new config says (each with an event);
        tasks not running follow it on their next start."""
        await asyncio.gather(*(runner.config_reloaded() for runner in self.runners.values()))

    # ---- service discovery (the service hook's ServiceCatalog, as this node) ---------
    async def register_services(self, alloc_id: str,
                                registrations: Sequence[Mapping[str, Any]]) -> None:
        await self.rpc.service_registration_upsert(self.node_id, self._secret_id, alloc_id,
                                                   registrations)

    async def deregister_services(self, alloc_id: str, ids: Sequence[str]) -> None:
        await self.rpc.service_registration_delete(self.node_id, self._secret_id, alloc_id,
                                                   ids)

    def alloc_checks(self, alloc_id: str) -> dict[str, Any] | None:
        """The latest results of the allocation's service checks (None: it runs none)."""
        return self.checks.for_alloc(alloc_id)

    async def _sign_identities(self, alloc_id: str, tasks: Sequence[str]) -> dict[str, str]:
        return await self.rpc.alloc_sign_identities(self.node_id, self._secret_id, alloc_id,
                                                    tasks)

    async def _persist_task(self, alloc_id: str, task: str, state: TaskState,
                            handle: TaskHandle | None) -> None:
        await self._writes.put(B_TASKS, f"{alloc_id}/{task}", {
            "state": to_rpc(state), "handle": handle.to_dict() if handle else None})

    async def _restore_allocs(self) -> None:
        tasks: dict[str, dict[str, RestoredTask]] = {}
        for key, raw in await self.db.items(B_TASKS):
            alloc_id, _, task = key.partition("/")
            handle = TaskHandle.from_dict(raw["handle"]) if raw.get("handle") else None
            tasks.setdefault(alloc_id, {})[task] = RestoredTask(
                from_rpc(raw["state"], TaskState), handle)
        allocs = await self.db.items(B_ALLOCS)
        await self._unmount_orphans({alloc_id for alloc_id, _ in allocs})
        await self._remove_orphan_cgroups({a: tasks.get(a, {}) for a, _ in allocs})
        for alloc_id, raw in allocs:
            alloc = from_rpc(raw, Allocation)
            log.info("restoring allocation %s", alloc_id)
            self._start_runner(alloc, tasks.get(alloc_id, {}))

    async def _remove_orphan_cgroups(
            self, restored: Mapping[str, Mapping[str, RestoredTask]]) -> None:
        """Task cgroups an earlier agent left (it crashed, or was killed) that no restored
        task names: their processes run unsupervised, so they are killed and removed. Runs
        before any runner starts, so no task of this agent can be making one meanwhile."""
        keep = {cg for tasks in restored.values() for t in tasks.values()
                if t.handle is not None and (cg := cgroup_of(t.handle.driver_state))}

        def remove() -> list[str]:
            manager = agent_cgroups(self.settings.data_dir)
            if manager is None:
                return []
            removed = manager.remove_orphans(keep)
            manager.remove_parent_if_empty()  # an exec task makes it again when it needs it
            return removed
        try:
            gone = await asyncio.to_thread(remove)
        except Exception as err:  # the client can still run; the operator must know
            log.warning("could not remove leftover task cgroups: %s", err)
            return
        for name in gone:
            log.info("removed leftover task cgroup %s (killed its processes)", name)

    async def _unmount_orphans(self, restored: set[str]) -> None:
        """Secrets tmpfs mounts an earlier agent left (it crashed, or was killed) for
        allocations it no longer has: nothing else would ever unmount them."""
        try:
            gone = await asyncio.to_thread(unmount_orphaned_tmpfs, self.settings.alloc_dir,
                                           restored)
        except Exception as err:  # the client can still run; the operator must know
            log.warning("could not unmount leftover task secrets mounts: %s", err)
            return
        for mount_point in gone:
            log.info("unmounted leftover task secrets mount %s", mount_point)

    def _start_runner(self, alloc: Allocation,
                      restored: Mapping[str, RestoredTask] | None = None) -> None:
        runner = AllocRunner(alloc, self._runner_config, restored)
        self.runners[alloc.id] = runner
        runner.start()

    async def _watch_allocs(self) -> None:
        index = 0
        known: dict[str, int] = {}
        while True:
            try:
                allocs, new_index = await self.rpc.node_get_client_allocs(
                    self.node_id, index, WATCH_WAIT)
                changed = [a for a, idx in allocs.items() if known.get(a) != idx]
                for start in range(0, len(changed), FETCH_CHUNK):
                    fetched, identities = await self.rpc.alloc_get_allocs(
                        self.node_id, self._secret_id, changed[start:start + FETCH_CHUNK])
                    await self._apply_allocs(fetched, identities)
                for gone in set(self.runners) - set(allocs):
                    await self._gc(gone)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep watching: the next pass re-reads everything not yet applied.
                log.exception("watching allocations failed; retrying")
                await asyncio.sleep(1)
                continue
            index, known = new_index, allocs

    async def _apply_allocs(self, fetched: Sequence[Allocation],
                            identities: Mapping[str, Mapping[str, str]]) -> None:
        # Never ran here and never will: nothing to remember or restore.
        kept = [a for a in fetched if a.id in self.runners or not a.terminal()]
        # Every row is durable before any runner starts (a restored agent needs the
        # allocation of every task it finds), in one transaction for them all.
        await asyncio.gather(*(self._writes.put(B_ALLOCS, a.id, to_rpc(a)) for a in kept))
        for alloc in kept:
            self.identities.seed(alloc.id, identities.get(alloc.id, {}))
            runner = self.runners.get(alloc.id)
            if runner is None:
                self._start_runner(alloc)
            else:
                await runner.update(alloc)

    async def _gc(self, alloc_id: str) -> None:
        # The watcher and PUT /v1/client/gc may both collect one allocation: the first wins.
        runner = self.runners.pop(alloc_id, None)
        if runner is None:
            return
        await runner.destroy()
        self._task_usage.forget(alloc_id)
        self.identities.forget_alloc(alloc_id)
        self._last_reports.pop(alloc_id, None)
        await self._writes.flush()  # a row put before the destroy must not land after this
        await self.db.delete(B_ALLOCS, alloc_id)
        await self.db.delete_prefix(B_TASKS, f"{alloc_id}/")

    async def collect_garbage(self) -> list[str]:
        """``PUT /v1/client/gc``: destroy every allocation that has finished running here
        (its directory goes with it); the IDs destroyed. The server keeps its record."""
        finished = [alloc_id for alloc_id, runner in self.runners.items() if runner.done]
        for alloc_id in finished:
            await self._gc(alloc_id)
        return finished

    def _queue_report(self, update: AllocUpdate) -> None:
        self._pending_reports[update.id] = update
        self._last_reports[update.id] = update
        self._alloc_changes.notify(update.id)
        self._report_wakeup.set()

    async def _alloc_reports(self) -> None:
        while True:
            await self._report_wakeup.wait()
            await asyncio.sleep(REPORT_COALESCE)
            self._report_wakeup.clear()
            while self._pending_reports:
                batch = self._take_reports()
                try:
                    await self.rpc.node_update_alloc(batch)
                except asyncio.CancelledError:
                    # Shutting down: hand the batch back so the final flush still sends it.
                    self._requeue_reports(batch)
                    raise
                except Exception:
                    log.exception("reporting allocation state failed; will retry")
                    self._requeue_reports(batch)
                    self._report_wakeup.set()
                    await asyncio.sleep(1)
                    break

    def _take_reports(self) -> list[AllocUpdate]:
        """The oldest pending reports, at most ``REPORT_CHUNK`` of them."""
        ids = list(itertools.islice(self._pending_reports, REPORT_CHUNK))
        return [self._pending_reports.pop(alloc_id) for alloc_id in ids]

    def _requeue_reports(self, batch: Sequence[AllocUpdate]) -> None:
        for update in batch:  # a newer report of the same allocation wins
            self._pending_reports.setdefault(update.id, update)

    async def flush_reports(self) -> None:
        while self._pending_reports:
            await self.rpc.node_update_alloc(self._take_reports())

    # ---- node ---------------------------------------------------------------------------
    async def _register(self) -> NodeReply:
        assert self._node is not None
        reply = await self.rpc.node_register(self._node)
        self._registered = True
        self._take_ttl(reply)
        return reply

    def _take_ttl(self, reply: NodeReply) -> None:
        if reply.heartbeat_ttl > 0:
            self._heartbeat_ttl = reply.heartbeat_ttl

    def _heartbeat_delay(self, failures: int) -> float:
        if failures:
            backoff = min(HEARTBEAT_RETRY_MAX, HEARTBEAT_RETRY_MIN * 2 ** (failures - 1))
            return backoff * self._rng.uniform(0.5, 1.0)
        if not self._registered:
            return 0.0
        return self._heartbeat_ttl * self._rng.uniform(*HEARTBEAT_TTL_SHARE)

    async def _heartbeat(self) -> None:
        """Heartbeat within the TTL the servers set. While they cannot be reached, every
        task (and its Task API socket) keeps running and heartbeats retry with backoff;
        once they answer again, the latest report of every allocation is sent again. A
        node they no longer know registers again."""
        failures = 0
        while True:
            await asyncio.sleep(self._heartbeat_delay(failures))
            try:
                if self._registered:
                    self._take_ttl(await self.rpc.node_update_status(self.node_id, NODE_READY))
                else:
                    await self._register()
            except asyncio.CancelledError:
                raise
            except UnknownNode:
                log.warning("the servers no longer know this node; registering again")
                self._registered = False
                failures = 0
                continue
            except Exception as err:
                failures += 1
                if failures == 1:
                    log.warning("heartbeat failed (%s); tasks keep running, retrying",
                                _brief(err))
                continue
            if failures:
                log.info("heartbeat succeeded again after %d failures", failures)
                self._resend_reports()
            failures = 0

    def _resend_reports(self) -> None:
        for alloc_id, update in self._last_reports.items():
            if alloc_id in self.runners:  # a newer pending report wins
                self._pending_reports.setdefault(alloc_id, update)
        if self._pending_reports:
            self._report_wakeup.set()

    async def _node_updates(self) -> None:
        while True:
            await self._node_dirty.wait()
            await asyncio.sleep(NODE_UPDATE_COALESCE)
            self._node_dirty.clear()
            assert self._node is not None
            try:
                await self._register()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node update failed; will retry")
                self._node_dirty.set()
                await asyncio.sleep(1)

    # ---- shutdown -----------------------------------------------------------------------
    async def shutdown(self, *, stop_tasks: bool) -> None:
        """Stop the client. With ``stop_tasks`` (dev mode) every task is killed and its
        files removed; otherwise tasks keep running for the next agent to reattach."""
        await self.exec_sessions.close()  # their commands are killed, whatever the mode
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        runners = list(self.runners.values())
        if stop_tasks:
            await asyncio.gather(*(r.destroy() for r in runners), return_exceptions=True)
        else:
            await asyncio.gather(*(r.shutdown() for r in runners), return_exceptions=True)
        await self._remove_empty_cgroup_parent()
        await self._close_drivers()
        await self._writes.close()  # what the runners persisted is on disk before we return
        try:
            await self.flush_reports()
        except Exception:
            log.debug("final report failed", exc_info=True)

    async def _close_drivers(self) -> None:
        """Drivers that own helper processes (the exec drivers' launchers) let them go;
        the tasks those started keep running."""
        for driver in self.drivers.values():
            close = getattr(driver, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception as err:  # shutting down regardless
                    log.warning("could not close driver %s: %s", driver.name, err)

    async def _remove_empty_cgroup_parent(self) -> None:
        """This agent's parent cgroup, once no task cgroup is left in it (running tasks
        keep theirs, and the parent, for the next agent to reattach)."""
        def remove() -> None:
            manager = agent_cgroups(self.settings.data_dir)
            if manager is not None:
                manager.remove_parent_if_empty()
        try:
            await asyncio.to_thread(remove)
        except Exception as err:  # shutting down regardless; the operator must know
            log.warning("could not remove this agent's parent cgroup: %s", err)


def _brief(err: Exception) -> str:
    """An error for a log line: its type and message, no traceback."""
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
