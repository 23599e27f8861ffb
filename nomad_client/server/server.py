"""The embedded server: owns the state store, the scheduler and the keyring.

Jobs live in a namespace and are found by (namespace, ID); every read by job ID takes the
namespace, ``default`` when a caller names none. Allocations and evaluations carry their
job's namespace.

HTTP endpoints call it directly (they live in the same agent process); the client reaches it
only through ``rpc.ServerRPC``. Every write goes through ``StateStore.write`` so indexes and
blocking queries stay consistent; a change to part of an existing row is a row update applied
under the store's write lock, never a whole row read earlier.

One server of a cluster is the leader (``set_leader``; a server alone always is). Only the
leader plans: another server's evaluations are written ``pending`` and the leader's broker
task plans them. Only the leader tracks heartbeats (``server.heartbeats``; a node not heard
from in time is marked as ``server.disconnect`` says), launches periodic jobs, drains nodes
and rolls updates out.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from nomad_client.acl import ACL, DENY_ALL, MANAGEMENT
from nomad_client.server.acl_resolver import ACLResolver, workload_key
from nomad_client.server.acls import ANONYMOUS_POLICY, ACLs
from nomad_client.server.alloc_control import ALLOC_STOP_TRIGGER, stopped_by_user
from nomad_client.server.disconnect import (
    Reconnect,
    mark_lost,
    mark_unknown,
    on_missed,
    on_reconnect,
)
from nomad_client.server.dispatch import Dispatcher
from nomad_client.server.drain import NodeDrainer, keep_server_fields
from nomad_client.server.events import EventBroker
from nomad_client.server.heartbeats import (
    DEFAULT_GRACE,
    DEFAULT_MAX_PER_SECOND,
    DEFAULT_MIN_TTL,
    HeartbeatTracker,
)
from nomad_client.server.job_summary import job_summary
from nomad_client.server.job_versions import (
    DEFAULT_TRACKED_VERSIONS,
    check_enforced_index,
    check_version_kept,
    history_marked_stable,
    job_modify_index,
    marked_stable,
    revert_target,
    spec_changed,
    submission_of,
    versioned,
    versions,
    with_version,
)
from nomad_client.server.keyring import IdentityClaims, IdentityError, IdentityVerifier, Keyring
from nomad_client.server.namespaces import Namespaces, admit_job
from nomad_client.server.node_allocs import NodeAllocIndex
from nomad_client.server.node_evaluate import jobs_to_evaluate
from nomad_client.server.parent_jobs import (
    JobKindChange,
    children,
    is_parent,
    kind_change,
    parent_status,
)
from nomad_client.server.periodic import PeriodicLauncher
from nomad_client.server.ports import holds_ports
from nomad_client.server.rolling import RollingUpdates, batch_of, replace_allowance
from nomad_client.server.scaling import JobScaler, with_scaling_policies
from nomad_client.server.scheduler import plan_job
from nomad_client.server.sealing import Sealer
from nomad_client.server.services import ServiceRegistry
from nomad_client.server.state import (
    ACL_POLICIES,
    ACL_ROLES,
    ACL_TOKENS,
    DELETE,
    JOB_VERSIONS,
    JOBS,
    NAMESPACES,
    PERIODIC_LAUNCHES,
    SCALING_EVENTS,
    SERVICES,
    VARIABLES,
    Change,
    RowUpdate,
    StateStore,
    job_key,
)
from nomad_client.server.variables import Sealing, Variables
from nomad_client.structs.jobs import tasks as job_tasks
from nomad_client.structs.models import (
    ALLOC_UNKNOWN,
    DESIRED_RUN,
    DESIRED_STOP,
    EVAL_COMPLETE,
    EVAL_PENDING,
    NODE_DISCONNECTED,
    NODE_DOWN,
    NODE_INIT,
    NODE_READY,
    TOKEN_MANAGEMENT,
    ACLToken,
    Allocation,
    AllocUpdate,
    Evaluation,
    Node,
)
from nomad_client.structs.namespaces import DEFAULT_NAMESPACE, Namespace, job_namespace

log = logging.getLogger(__name__)

# Evaluations are history: only the newest few of each job are kept.
MAX_EVALS_PER_JOB = 10
EVAL_FAILED = "failed"
NODE_UPDATE_TRIGGER = "node-update"
# Jobs whose allocations are bound to their nodes: nothing is placed elsewhere for them.
_NODE_BOUND_TYPES = frozenset({"system", "sysbatch"})
# What a client may say its node is (Nomad's valid node statuses).
_CLIENT_STATUSES = frozenset({NODE_INIT, NODE_READY, NODE_DOWN, NODE_DISCONNECTED})


class NotFound(Exception):
    pass


class NotEvaluable(ValueError):
    """A job that is never evaluated was asked to be (a parent; Nomad's message)."""


class Resource(enum.StrEnum):
    """What a blocking query can watch. Each is one table of the state store, whose index
    moves with every write to it."""

    JOBS = JOBS
    ALLOCATIONS = "allocs"
    EVALUATIONS = "evals"
    NODES = "nodes"
    ACL_TOKENS = ACL_TOKENS
    ACL_POLICIES = ACL_POLICIES
    ACL_ROLES = ACL_ROLES
    VARIABLES = VARIABLES
    NAMESPACES = NAMESPACES
    SERVICES = SERVICES
    SCALING_EVENTS = SCALING_EVENTS


class Server:
    def __init__(self, store: StateStore, keyring: Keyring, *, region: str,
                 acl_enabled: bool, data_dir: Path | None = None,
                 sealer: Sealing | None = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 tracked_versions: int = DEFAULT_TRACKED_VERSIONS,
                 leader: bool = True,
                 min_heartbeat_ttl: float = DEFAULT_MIN_TTL,
                 max_heartbeats_per_second: float = DEFAULT_MAX_PER_SECOND,
                 heartbeat_grace: float = DEFAULT_GRACE,
                 heartbeat_clock: Callable[[], float] = time.monotonic,
                 heartbeat_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """``data_dir`` is the server's own data directory (where an operator may put the
        ACL bootstrap reset file); None for a server that keeps no files. ``sealer`` seals
        variables' items (default: the store's; a store kept only in memory gets a key of
        its own that dies with it). ``clock`` (unix seconds) times variable locks, nodes'
        disconnect windows and, with ``sleep``, periodic launches. ``leader``: whether the
        server starts as the leader (a server alone always is; in a cluster the election
        says, through ``set_leader``). The heartbeat knobs are Nomad's ``server`` options;
        ``heartbeat_clock`` (monotonic seconds) and ``heartbeat_sleep`` time heartbeats.
        A server made leader plans inline; the broker that plans evaluations other servers
        left pending starts with ``set_leader(True)``."""
        self.store = store
        self.keyring = keyring
        self.region = region
        self.acl_enabled = acl_enabled
        # How many versions of each job are kept (Nomad's ``job_tracked_versions``).
        self.tracked_versions = tracked_versions
        self.acls = ACLs(store, data_dir)
        self.acl_resolver = ACLResolver(self.acls)
        self.identities = IdentityVerifier(keyring)
        # One scheduling pass at a time, as a single-leader cluster would do.
        self._plan_lock = asyncio.Lock()
        # Its lock reaper is one of the leader's duties.
        self.variables = Variables(store, sealer or store.sealer or _ephemeral_sealer(),
                                   clock=clock, leading=False)
        self._namespaces = Namespaces(store, self.job_status, region=region)
        # Service registrations; those of allocations that stop or go are removed.
        self.services = ServiceRegistry(store)
        # Every committed change becomes events here (GET /v1/event/stream).
        self.events = EventBroker()
        store.observe(self.events.publish)
        # What each client watches, kept per node so a status report wakes no watcher.
        self._node_allocs = NodeAllocIndex(store)
        # Scaling, dispatch and periodic launches (``server.scaling``, ``dispatch``,
        # ``periodic``). The launcher's task starts now if the store holds a periodic job,
        # else with the first one registered; ``close`` stops it.
        self.scaling = JobScaler(store, self._evaluate, tracked_versions=tracked_versions)
        self.dispatcher = Dispatcher(store, self.register_job, self.job_status, clock=clock)
        self._clock = clock
        self._sleep = sleep
        self.periodic = self._new_launcher()
        # Node eligibility and drains (``server.drain``); drains a restart interrupted resume.
        self.drainer = NodeDrainer(store, self._evaluate, self._reevaluate_queued, clock=clock,
                                   leading=lambda: self._leader)
        # Rolling updates of jobs whose new version changed their groups (``server.rolling``).
        self.rolling = RollingUpdates(
            lambda namespace, job_id: self.job_allocs(job_id, namespace),
            lambda index, wait: store.wait_for_change(("allocs",), index, wait),
            self._evaluate, clock=clock, sleep=sleep)
        # Node liveness (``server.heartbeats``, ``server.disconnect``): the leader's.
        self.heartbeats = HeartbeatTracker(
            self._heartbeat_missed, min_ttl=min_heartbeat_ttl,
            max_per_second=max_heartbeats_per_second, grace=heartbeat_grace,
            clock=heartbeat_clock, sleep=heartbeat_sleep)
        # Evaluations a follower left pending, for the leader to process; kept up to date
        # from every commit (this server's or another's), so finding them scans nothing.
        self._pending_evals: set[str] = {e.id for e in store.values("evals")
                                         if e.status == EVAL_PENDING}
        self._periodic_changed: dict[str, dict[str, Any]] = {}
        self._drain_started = False
        self._leader_wake = asyncio.Event()
        self._eval_loop: asyncio.Task[None] | None = None
        self._leader = False
        store.observe(self._observe_commit)
        if leader:
            # Alone, it plans every evaluation as it is made: no other server leaves one
            # pending, so the broker waits for a ``set_leader(True)``.
            self._start_leader_duties(broker=False)

    # ---- leadership --------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self._leader

    async def set_leader(self, leader: bool) -> None:
        """Become the leader (start the duties only one server may run: heartbeat
        tracking, periodic launches, drains, rolling updates, evaluation processing and
        releasing expired variable locks)
        or stop being it (every one of them is stopped before this returns)."""
        if leader:
            self._start_leader_duties()
            return
        if not self._leader and self._eval_loop is None:
            return
        self._leader = False
        await self._stop_leader_duties()

    def _start_leader_duties(self, *, broker: bool = True) -> None:
        """Idempotent; the parts that need a running event loop wait for one (a server made
        outside a loop starts them at its first ``set_leader(True)``). ``broker``: start the
        task that plans pending evaluations too."""
        self._leader = True
        self.periodic.start_if_needed()
        self.drainer.resume()
        self.variables.lead()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # As Nomad's new leader: every node not known down gets a full TTL from now.
        self.heartbeats.start(n.id for n in self.store.values("nodes")
                              if n.status not in (NODE_DOWN, NODE_INIT))
        if broker and self._eval_loop is None:
            # Evaluations left pending (by followers, or before a restart) come first.
            self._leader_wake.set()
            self._eval_loop = loop.create_task(self._process_pending_evals(),
                                               name="evaluation-broker")

    async def _stop_leader_duties(self) -> None:
        loop_task, self._eval_loop = self._eval_loop, None
        if loop_task is not None:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
        await self.drainer.close()
        await self.rolling.close()
        await self.heartbeats.stop()
        await self.variables.follow()
        # A closed launcher stays closed: the next leadership gets a fresh one.
        launcher, self.periodic = self.periodic, self._new_launcher()
        await launcher.close()

    def _new_launcher(self) -> PeriodicLauncher:
        return PeriodicLauncher(self.store, self.register_job, self.job_status,
                                clock=self._clock, sleep=self._sleep)

    def _observe_commit(self, index: int, changes: Sequence[Change]) -> None:
        for change in changes:
            if change.table == "evals":
                ev = change.after
                if ev is not None and ev.status == EVAL_PENDING:
                    self._pending_evals.add(ev.id)
                    self._leader_wake.set()
                else:
                    self._pending_evals.discard(change.key)
            elif change.table == "nodes" and change.after is not None \
                    and change.after.drain_strategy is not None \
                    and (change.before is None or change.before.drain_strategy is None):
                # A drain started through another server: the leader's drainer runs it.
                self._drain_started = True
                self._leader_wake.set()
            elif change.table == JOBS and isinstance(change.after, dict) \
                    and change.after.get("Periodic") is not None:
                # A periodic job registered through another server: the leader's launcher
                # must look at its schedule.
                self._periodic_changed[change.key] = change.after
                self._leader_wake.set()

    async def _process_pending_evals(self) -> None:
        """The leader's evaluation broker: plans every pending evaluation, oldest first,
        and wakes whenever a new one is committed."""
        while True:
            await self._leader_wake.wait()
            self._leader_wake.clear()
            changed, self._periodic_changed = self._periodic_changed, {}
            for job in changed.values():
                self.periodic.notify(job)
            if self._drain_started:
                self._drain_started = False
                self.drainer.resume()  # starts a watcher only where none runs
            pending = [ev for ev in (self.store.get("evals", i) for i in list(self._pending_evals))
                       if ev is not None and ev.status == EVAL_PENDING]
            for ev in sorted(pending, key=lambda e: e.create_index):
                try:
                    await self._run_pending(ev.id)
                except Exception as err:
                    # Failed for good (it would fail again): recorded, not retried forever.
                    log.exception("evaluation %s of job %s failed", ev.id, ev.job_id)
                    await self._finish_eval(ev.id, EVAL_FAILED, f"evaluation failed: {err}")

    async def _run_pending(self, eval_id: str) -> None:
        async with self._plan_lock:
            ev: Evaluation | None = self.store.get("evals", eval_id)
            if ev is None or ev.status != EVAL_PENDING:
                return
            job = self.job(ev.job_id, ev.namespace)
            if job is None or is_parent(job):
                await self._finish_eval(eval_id, EVAL_COMPLETE, "")
                return
            await self._plan(job, ev, dedupe=False)

    async def _finish_eval(self, eval_id: str, status: str, description: str) -> None:
        def finish(current: Evaluation | None, index: int) -> Evaluation | None:
            if current is None or current.status != EVAL_PENDING:
                return None
            return attrs.evolve(current, status=status, status_description=description,
                                modify_time=time.time_ns())
        await self.store.write(updates={"evals": [(eval_id, finish)]})

    async def close(self) -> None:
        """Stop the server's background work (the leader's duties, the variable lock
        reaper) and end every event stream."""
        self.events.close()
        self._leader = False
        await self._stop_leader_duties()
        await self.periodic.close()
        await self.variables.close()
        await self.services.close()

    # ---- reads (what the HTTP API serves; listings are in ID order) ----------------------
    def job(self, job_id: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any] | None:
        return self.store.get(JOBS, job_key(namespace, job_id))

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The jobs of ``namespace``, by ID (None: of every namespace, by namespace, then
        ID)."""
        jobs = self.store.rows(JOBS)
        if namespace is None:
            return jobs
        return [j for j in jobs if job_namespace(j) == namespace]

    def allocation(self, alloc_id: str) -> Allocation | None:
        return self.store.get("allocs", alloc_id)

    def allocations(self, namespace: str | None = None) -> list[Allocation]:
        """The allocations of ``namespace`` (None: of every namespace)."""
        allocs: list[Allocation] = self.store.rows("allocs")
        if namespace is None:
            return allocs
        return [a for a in allocs if a.namespace == namespace]

    def job_allocs(self, job_id: str, namespace: str = DEFAULT_NAMESPACE) -> list[Allocation]:
        return [a for a in self.allocations(namespace) if a.job_id == job_id]

    def node_allocs(self, node_id: str) -> list[Allocation]:
        return [a for a in self.allocations() if a.node_id == node_id]

    def node(self, node_id: str) -> Node | None:
        return self.store.get("nodes", node_id)

    def nodes(self) -> list[Node]:
        return self.store.rows("nodes")

    def evaluation(self, eval_id: str) -> Evaluation | None:
        return self.store.get("evals", eval_id)

    def job_evaluations(self, job_id: str, namespace: str = DEFAULT_NAMESPACE
                        ) -> list[Evaluation]:
        return [e for e in self.store.rows("evals")
                if e.job_id == job_id and e.namespace == namespace]

    def job_summary(self, job_id: str, namespace: str = DEFAULT_NAMESPACE
                    ) -> dict[str, Any] | None:
        """The job's ``JobSummary`` (``server.job_summary``); None when there is no job."""
        job = self.job(job_id, namespace)
        if job is None:
            return None
        evals = self._job_evals(job_id, namespace)
        return job_summary(job, self.job_allocs(job_id, namespace),
                           evals[-1] if evals else None,
                           children(self.jobs(namespace), job), self.job_status)

    def job_versions(self, job_id: str, namespace: str = DEFAULT_NAMESPACE
                     ) -> list[dict[str, Any]] | None:
        """The kept versions of a job, newest (the job as it is) first; None: no job."""
        key = job_key(namespace, job_id)
        job = self.store.get(JOBS, key)
        return None if job is None else versions(job, self.store.get(JOB_VERSIONS, key))

    def job_submission(self, job_id: str, version: int,
                       namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any] | None:
        """The source version ``version`` of the job was submitted as, if it was."""
        return submission_of(self.store.get(JOB_VERSIONS, job_key(namespace, job_id)), version)

    async def evaluate_job(self, job_id: str, *, namespace: str = DEFAULT_NAMESPACE,
                           force_reschedule: bool = False) -> tuple[str, int]:
        """A new evaluation of the job (NotFound; a parent is never evaluated:
        ``NotEvaluable``). ``force_reschedule``: its failed allocations are replaced even
        where a reschedule policy would not."""
        job = self.job(job_id, namespace)
        if job is None:
            raise NotFound("job not found")
        if is_parent(job):
            kind = "periodic" if job.get("Periodic") is not None else "parameterized"
            raise NotEvaluable(f"can't evaluate {kind} job")
        if force_reschedule:
            await self.store.write(updates={"allocs": [
                (a.id, _force_reschedule) for a in self.job_allocs(job_id, namespace)
                if a.client_status == "failed"]})
        return await self._evaluate(job_id, "job-eval", namespace)

    async def revert_job(self, job_id: str, version: int, *, namespace: str = DEFAULT_NAMESPACE,
                         enforce_prior_version: int | None = None) -> tuple[str, int]:
        """Register version ``version`` of the job again, as its next version
        (``VersionNotFound``, ``VersionConflict`` with Nomad's texts)."""
        key = job_key(namespace, job_id)
        current = self.store.get(JOBS, key)
        target = revert_target(current, self.store.get(JOB_VERSIONS, key), job_id, namespace,
                               version, enforce_prior_version)
        # The version enforced was checked on the job as read: a change since is a conflict.
        enforced = None if enforce_prior_version is None else job_modify_index(current or {})
        return await self.register_job(target, enforce_index=enforced)

    async def set_job_stability(self, job_id: str, version: int, stable: bool, *,
                                namespace: str = DEFAULT_NAMESPACE) -> int:
        """Mark version ``version`` of the job stable or not (Nomad's ``Job.Stable``), in
        the job itself when it is that version and in its history; ``VersionNotFound``.
        The write's index."""
        key = job_key(namespace, job_id)
        check_version_kept(self.store.get(JOBS, key), self.store.get(JOB_VERSIONS, key),
                           job_id, namespace, version)
        return await self.store.write(updates={
            JOBS: [(key, lambda job, index: marked_stable(job, version, stable, index))],
            JOB_VERSIONS: [(key, lambda history, index: history_marked_stable(
                history, version, stable, index))]})

    def namespace(self, name: str) -> Namespace | None:
        return self._namespaces.get(name)

    def namespaces(self) -> list[Namespace]:
        """Every namespace, by name."""
        return self._namespaces.all()

    def namespace_task_api_mode(self, name: str) -> str | None:
        """The namespace's ``Capabilities.TaskAPI``; None when unset or no such namespace."""
        namespace = self._namespaces.get(name)
        return None if namespace is None else namespace.task_api_mode

    def index_of(self, *resources: Resource) -> int:
        """The index of the latest write to any of ``resources`` (at least 1)."""
        return self.store.table_index(*resources)

    async def wait_for_change(self, resources: Sequence[Resource], min_index: int,
                              wait: float) -> int:
        """Block until one of ``resources`` has an index above ``min_index`` or ``wait``
        seconds (capped by the store) pass; return their index either way."""
        return await self.store.wait_for_change(resources, min_index, wait)

    # ---- namespaces --------------------------------------------------------------------
    async def upsert_namespace(self, namespace: Namespace) -> int:
        """Create or replace a namespace (``NamespaceError`` when it is invalid)."""
        return await self._namespaces.upsert(namespace)

    async def delete_namespace(self, name: str) -> int:
        """Delete a namespace that holds no live job, allocation or variable."""
        return await self._namespaces.delete(name)

    # ---- jobs --------------------------------------------------------------------------
    async def register_job(self, job: Mapping[str, Any], *,
                           triggered_by: str = "job-register",
                           enforce_index: int | None = None,
                           submission: Mapping[str, Any] | None = None) -> tuple[str, int]:
        """Register ``job`` in its ``Namespace`` (``NamespaceError`` when that namespace does
        not exist or refuses one of its task drivers; ``JobKindChange`` when it would make a
        job periodic or parameterized, or stop it being so). A parent job (periodic or
        parameterized) is not evaluated: its eval ID is "". A job that changed becomes its
        next version (``server.job_versions``); an unchanged one is only evaluated again.
        ``enforce_index``: the ``JobModifyIndex`` the job must have (0: it must not exist),
        else ``VersionConflict``. ``submission``: the source it was made from (Nomad's
        ``JobSubmission``), kept with its version."""
        submitted = {**job, "Namespace": job_namespace(job), "Stop": False,
                     "SubmitTime": time.time_ns(), "Status": "pending"}
        namespace, job_id = submitted["Namespace"], submitted["ID"]
        key = job_key(namespace, job_id)
        made: list[tuple[dict[str, Any] | None, dict[str, Any]]] = []  # (previous, new)

        def next_version(previous: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            # Under the write lock: a namespace deleted or changed meanwhile is seen.
            admit_job(self._namespaces.get(namespace), submitted)
            if (change := kind_change(previous, submitted)) is not None:
                raise JobKindChange(change)
            if enforce_index is not None:
                check_enforced_index(previous, enforce_index)
            candidate = with_scaling_policies(previous, submitted, index)
            if not spec_changed(previous, candidate):
                return None  # the same job again: same version, only a new evaluation
            new_version = versioned(previous, candidate, index)
            made.append((previous, new_version))
            return new_version

        def record(history: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            if not made:
                return None
            previous, new_version = made[-1]
            return with_version(history, previous, new_version, self.tracked_versions,
                                submission)

        await self.store.write(updates={JOBS: [(key, next_version)],
                                        JOB_VERSIONS: [(key, record)]})
        if self._leader:
            self.periodic.notify(submitted)
        return await self._evaluate(job_id, triggered_by, namespace)

    async def deregister_job(self, job_id: str, *, purge: bool,
                             namespace: str = DEFAULT_NAMESPACE) -> tuple[str, int]:
        key = job_key(namespace, job_id)
        if self.store.get(JOBS, key) is None:
            return "", 0  # Nomad answers 200 with empty IDs for unknown jobs

        stopped: list[dict[str, Any]] = []  # [previous, stopped] once it is stopped

        def stop(current: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            if current is None:
                return None
            if current.get("Stop"):
                return {**current, "SubmitTime": time.time_ns()}
            # As in Nomad, a stop is the job's next version (so it can be reverted).
            stopped[:] = [current, versioned(current, {**current, "Stop": True,
                                                       "SubmitTime": time.time_ns()}, index)]
            return stopped[1]

        def record(history: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            if not stopped:
                return None
            return with_version(history, stopped[0], stopped[1], self.tracked_versions)

        await self.store.write(updates={JOBS: [(key, stop)], JOB_VERSIONS: [(key, record)]})
        if self._leader:
            self.periodic.notify(self.store.get(JOBS, key) or {})
        eval_id, index = await self._evaluate(job_id, "job-deregister", namespace)
        if purge:
            # Allocations already finished go now; running ones once their client reports
            # them terminal (see update_allocs_from_client). Their clients then remove
            # the allocation directories. Deciding under the write lock means a final report
            # racing the purge is never missed by both.
            def collect(current: Allocation | None, index: int) -> Any:
                return DELETE if current is not None and current.client_terminal() else None

            index = await self.store.write(
                deletes={JOBS: [key], SCALING_EVENTS: [key], PERIODIC_LAUNCHES: [key],
                         JOB_VERSIONS: [key]},
                updates={"allocs": [(a.id, collect)
                                    for a in self.job_allocs(job_id, namespace)]})
        return eval_id, index

    async def stop_allocation(self, alloc_id: str, *, no_shutdown_delay: bool = False,
                              reschedule: bool = False) -> tuple[str, int]:
        """A user's stop of one allocation (``server.alloc_control``): it is stopped and its
        job evaluated, which replaces it. NotFound for an unknown allocation."""
        alloc = self.allocation(alloc_id)
        if alloc is None:
            raise NotFound("allocation not found")
        await self.store.write(updates={"allocs": [(alloc_id, stopped_by_user(
            no_shutdown_delay=no_shutdown_delay, reschedule=reschedule))]})
        return await self._evaluate(alloc.job_id, ALLOC_STOP_TRIGGER, alloc.namespace)

    def job_status(self, job: Mapping[str, Any]) -> str:
        if is_parent(job):
            return parent_status(job)
        allocs = self.job_allocs(job["ID"], job_namespace(job))
        if any(not a.client_terminal() and a.desired_status == DESIRED_RUN for a in allocs):
            return "running" if any(a.client_status == "running" for a in allocs) else "pending"
        if job.get("Stop") or (allocs and job.get("Type") == "batch"):
            return "dead"
        return "pending"

    def _job_evals(self, job_id: str, namespace: str) -> list[Evaluation]:
        """The job's evaluations, oldest first."""
        return sorted((e for e in self.store.values("evals")
                       if e.job_id == job_id and e.namespace == namespace),
                      key=lambda e: e.create_index)

    async def _evaluate(self, job_id: str, triggered_by: str,
                        namespace: str = DEFAULT_NAMESPACE, *,
                        for_node: Node | None = None) -> tuple[str, int]:
        """``for_node``: a user asked to evaluate that node (``evaluate_node``): the
        evaluation names it and is made even when it changes nothing. Only the leader plans:
        another server leaves the evaluation pending for it."""
        if not self._leader:
            return await self._enqueue(job_id, triggered_by, namespace, for_node)
        async with self._plan_lock:
            job = self.job(job_id, namespace)
            if job is None or is_parent(job):  # a parent never runs itself
                return "", self.store.index
            ev = _new_evaluation(job, triggered_by, namespace, for_node)
            return await self._plan(job, ev, dedupe=triggered_by == NODE_UPDATE_TRIGGER
                                    and for_node is None)

    async def _enqueue(self, job_id: str, triggered_by: str, namespace: str,
                       for_node: Node | None) -> tuple[str, int]:
        """A pending evaluation, for the leader's broker (Nomad's eval broker)."""
        job = self.job(job_id, namespace)
        if job is None or is_parent(job):
            return "", self.store.index
        ev = _new_evaluation(job, triggered_by, namespace, for_node)
        return ev.id, await self.store.write({"evals": [(ev.id, ev)]})

    async def _plan(self, job: dict[str, Any], ev: Evaluation, *, dedupe: bool
                    ) -> tuple[str, int]:
        """Place ``job`` as evaluation ``ev`` (new, or pending) and write the result with
        the evaluation, complete. Under the plan lock. ``dedupe``: a plan that changes
        nothing since the job's latest evaluation writes none."""
        job_id, namespace, triggered_by = ev.job_id, ev.namespace, ev.triggered_by
        nodes = self.store.values("nodes")
        plan = plan_job(job, ev.id, nodes, self.job_allocs(job_id, namespace),
                        self.store.values("allocs"),
                        replace=replace_allowance(job, triggered_by))
        history = [e for e in self._job_evals(job_id, namespace) if e.id != ev.id]
        latest = history[-1] if history else None
        if (dedupe and latest is not None
                and not plan.new_allocs and not plan.stopped_allocs
                and latest.queued_allocations == plan.queued
                and latest.failed_tg_allocs == plan.failed_groups):
            # Nothing changed for this job: a new evaluation would only be noise.
            return latest.id, self.store.index
        ev = attrs.evolve(ev, status=EVAL_COMPLETE, failed_tg_allocs=dict(plan.failed_groups),
                          queued_allocations=dict(plan.queued), modify_time=time.time_ns())
        # Pending ones are the leader's work still to do, never pruned as history.
        done = [e for e in history if e.status != EVAL_PENDING]
        expired = [e.id for e in done[:max(len(done) - MAX_EVALS_PER_JOB + 1, 0)]]
        index = await self.store.write(
            {"evals": [(ev.id, ev)]}, {"evals": expired},
            updates={"allocs": [
                # No identities here: they are signed when the client fetches its
                # allocations (allocs_for_node), so no token reaches the state store.
                *((a.id, _placed(a)) for a in plan.new_allocs),
                *((a.id, _stopped(a.desired_status, a.desired_description))
                  for a in plan.stopped_allocs),
                # The allocations replaced point to their replacements (Nomad's).
                *((a.previous_allocation, _replaced_by(a.id)) for a in plan.new_allocs
                  if a.previous_allocation)]})
        if plan.failed_groups:
            log.info("job %s (namespace %s): could not place %s", job_id, namespace,
                     dict(plan.queued))
        self.rolling.after_evaluation(
            batch_of(job, ev.id, plan.replaced, plan.outdated_left), triggered_by,
            bool(plan.replaced))
        return ev.id, index

    def _sign_tasks(self, alloc: Allocation, tasks: Sequence[str] | None = None
                    ) -> dict[str, str]:
        """Sign the default identity of ``tasks`` (all of the allocation's tasks when None).
        Blocking (RSA): call it in a worker thread."""
        tokens = {}
        for task in job_tasks(alloc.job, alloc.task_group):
            if tasks is not None and task["Name"] not in tasks:
                continue
            ttl_ns = (task.get("Identity") or {}).get("TTL") or 0
            tokens[task["Name"]] = self.keyring.sign_identity(
                namespace=alloc.namespace, job_id=alloc.job_id, alloc_id=alloc.id,
                task=task["Name"], group=alloc.task_group, region=self.region,
                # Unlike Nomad, the default identity may carry a ttl (and so an exp claim).
                ttl_seconds=ttl_ns / 1e9 if ttl_ns else None)
        return tokens

    async def _reevaluate_queued(self) -> None:
        """A node changed: retry every live job that still has allocations it could not place."""
        latest: dict[tuple[str, str], Evaluation] = {}
        for ev in self.store.values("evals"):
            known = latest.get((ev.namespace, ev.job_id))
            if known is None or ev.create_index > known.create_index:
                latest[ev.namespace, ev.job_id] = ev
        for job in self.store.rows(JOBS):
            namespace = job_namespace(job)
            ev = latest.get((namespace, job["ID"]))
            if job.get("Stop") or ev is None or not ev.queued_allocations:
                continue
            try:
                await self._evaluate(job["ID"], NODE_UPDATE_TRIGGER, namespace)
            except Exception:
                # One bad job must never stop nodes from registering.
                log.exception("re-evaluating job %s (namespace %s) failed", job["ID"],
                              namespace)

    # ---- nodes (the client side of the RPC interface lands here) ------------------------
    async def client_register(self, node: Node) -> tuple[int, float]:
        """A client's ``Node.Register``: the write's index and the heartbeat TTL (seconds)
        the client must next be heard within."""
        index = await self.register_node(node)
        return index, self.heartbeats.reset(node.id)

    async def client_heartbeat(self, node_id: str, status: str) -> tuple[int, float]:
        """A client's ``Node.UpdateStatus`` (its heartbeat): NotFound for a node the
        servers do not know (the client registers again)."""
        if status not in _CLIENT_STATUSES:
            raise ValueError(f"invalid status for node: {status!r}")
        index = await self.update_node_status(node_id, status)
        if status == NODE_DOWN:
            self.heartbeats.forget(node_id)
            return index, 0.0
        return index, self.heartbeats.reset(node_id)

    async def register_node(self, node: Node) -> int:
        node = attrs.evolve(node, status=NODE_READY, status_updated_at=int(self._clock()))
        relevant = False
        was = ""

        def replace(previous: Node | None, index: int) -> Node:
            nonlocal relevant, was
            if previous is not None and previous.secret_id \
                    and previous.secret_id != node.secret_id:
                raise PermissionError("node secret ID does not match")
            kept = keep_server_fields(previous, node)
            was = previous.status if previous is not None else ""
            relevant = previous is None or _scheduling_view(previous) != _scheduling_view(kept)
            return kept

        index = await self.store.write(updates={"nodes": [(node.id, replace)]})
        if was in (NODE_DOWN, NODE_DISCONNECTED):
            await self._node_returned(node.id)
        # Clients re-register on every metadata tweak; only a change placement could see
        # is worth a scheduling pass.
        if relevant:
            await self._reevaluate_queued()
        return index

    async def update_node_status(self, node_id: str, status: str) -> int:
        """Set the node's status. ``down`` (an operator's word, or the heartbeat tracker's
        through ``_node_missed``) loses its allocations; ``ready`` after ``down`` or
        ``disconnected`` is the node's return."""
        node = self._node(node_id)
        if status == NODE_DOWN:
            return await self._node_missed(node_id, windows=False)

        def set_status(current: Node | None, index: int) -> Node | None:
            if current is None or current.status == status:
                return None
            return attrs.evolve(current, status=status,
                                status_updated_at=int(self._clock()))

        index = await self.store.write(updates={"nodes": [(node_id, set_status)]})
        if status == NODE_READY and node.status in (NODE_DOWN, NODE_DISCONNECTED):
            await self._node_returned(node_id)
            await self._reevaluate_queued()  # a ready node again: what waited may land
        return index

    async def _heartbeat_missed(self, node_id: str) -> None:
        """The tracker's call: the node was not heard from in time (or a disconnect window
        of one of its allocations ended)."""
        node = self.node(node_id)
        if not self._leader or node is None or node.status in (NODE_DOWN, NODE_INIT):
            return
        log.warning("node %s missed its heartbeats", node_id)
        await self._node_missed(node_id, windows=True)

    async def _node_missed(self, node_id: str, *, windows: bool) -> int:
        """Mark the node ``disconnected`` or ``down`` and its allocations ``unknown`` or
        ``lost`` (``server.disconnect``), then evaluate their jobs so that what may be
        replaced is placed on other nodes."""
        node = self._node(node_id)
        now = self._clock()
        since = node.status_updated_at if node.status == NODE_DISCONNECTED else now
        missed = on_missed(self.node_allocs(node_id), since, now, windows=windows)
        stamp = time.time_ns()

        def set_status(current: Node | None, index: int) -> Node | None:
            if current is None or current.status == missed.node_status:
                return None
            return attrs.evolve(current, status=missed.node_status,
                                status_updated_at=int(now))

        def mark(change: Callable[[Allocation, int], Allocation]) -> RowUpdate:
            def apply(current: Allocation | None, index: int) -> Allocation | None:
                # Decided on the rows read above: one that finished or was stopped since
                # keeps what it is now.
                if current is None or current.desired_status != DESIRED_RUN \
                        or current.client_terminal():
                    return None
                return attrs.evolve(change(current, stamp), alloc_modify_index=index)
            return apply

        index = await self.store.write(updates={
            "nodes": [(node_id, set_status)],
            "allocs": [*((a.id, mark(mark_unknown)) for a in missed.unknown),
                       *((a.id, mark(mark_lost)) for a in missed.lost)]})
        if missed.recheck_in is not None:
            self.heartbeats.schedule(node_id, missed.recheck_in)
        else:
            self.heartbeats.forget(node_id)
        for alloc in missed.lost:
            self.identities.forget_alloc(alloc.id)
        await self._evaluate_jobs_of((*missed.unknown, *missed.lost))
        return index

    async def _node_returned(self, node_id: str) -> None:
        """A node marked down or disconnected is back: its unknown allocations run on or
        give way to their replacements (``server.disconnect``), then its jobs and the
        system jobs that fit it are evaluated."""
        node = self._node(node_id)
        log.info("node %s is back", node_id)
        node_allocs = self.node_allocs(node_id)
        decided: Reconnect = on_reconnect(node_allocs, self.store.values("allocs"))

        def resume(status: str) -> RowUpdate:
            def apply(current: Allocation | None, index: int) -> Allocation | None:
                if current is None or current.client_status != ALLOC_UNKNOWN \
                        or current.desired_status != DESIRED_RUN:
                    return None
                return attrs.evolve(current, client_status=status, client_description="",
                                    modify_time=time.time_ns(), alloc_modify_index=index)
            return apply

        if decided.resumed or decided.stopped:
            await self.store.write(updates={"allocs": [
                *((a.id, resume(status)) for a, status in decided.resumed),
                *((a.id, _stopped(DESIRED_STOP, why)) for a, why in decided.stopped)]})
        await self._evaluate_jobs_of(
            [a for a, _ in (*decided.resumed, *decided.stopped)],
            jobs_to_evaluate(node, node_allocs, self.store.rows(JOBS)))

    async def _evaluate_jobs_of(self, allocs: Sequence[Allocation],
                                more: Sequence[tuple[str, str]] = ()) -> None:
        """A node-update evaluation of each job of ``allocs`` (but those bound to their
        nodes, which have nowhere else to go) and of ``more`` (namespace, job ID)."""
        jobs = dict.fromkeys((a.namespace, a.job_id) for a in allocs
                             if a.job.get("Type") not in _NODE_BOUND_TYPES)
        jobs.update(dict.fromkeys(more))
        for namespace, job_id in jobs:
            try:
                await self._evaluate(job_id, NODE_UPDATE_TRIGGER, namespace)
            except Exception:
                # One bad job must not keep the others from being replaced.
                log.exception("evaluating job %s (namespace %s) after a node change failed",
                              job_id, namespace)

    async def evaluate_node(self, node_id: str) -> tuple[list[str], int]:
        """Evaluate every job with allocations on the node and every system job that fits it
        (Nomad's ``Node.Evaluate``, ``server.node_evaluate``); NotFound. The evaluations'
        IDs and the index of the last (0: none was needed)."""
        node = self._node(node_id)
        eval_ids, index = [], 0
        for namespace, job_id in jobs_to_evaluate(node, self.node_allocs(node_id),
                                                  self.store.rows(JOBS)):
            eval_id, written = await self._evaluate(job_id, NODE_UPDATE_TRIGGER, namespace,
                                                    for_node=node)
            if eval_id:
                eval_ids.append(eval_id)
                index = written
        return eval_ids, index

    def _node(self, node_id: str) -> Node:
        node = self.node(node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        return node

    async def client_allocs(self, node_id: str, min_index: int, wait: float
                            ) -> tuple[dict[str, int], int]:
        """The node's allocations (ID -> ``AllocModifyIndex``) once one of them has changed
        since ``min_index`` (``server.node_allocs``), or ``wait`` has passed."""
        index = await self._node_allocs.wait(node_id, min_index, wait)
        return self._node_allocs.allocs(node_id), index

    def allocs_by_id(self, alloc_ids: Sequence[str]) -> list[Allocation]:
        return [a for a in (self.store.get("allocs", i) for i in alloc_ids) if a is not None]

    async def allocs_for_node(self, node_id: str, secret_id: str, alloc_ids: Sequence[str]
                              ) -> tuple[list[Allocation], dict[str, dict[str, str]]]:
        """``allocs_by_id`` for a client, with fresh identities (alloc ID -> task -> token)
        for those of its allocations that are still live. Signed per fetch, never stored."""
        self._authenticate_node(node_id, secret_id)
        allocs = self.allocs_by_id(alloc_ids)
        live = [a for a in allocs if a.node_id == node_id and not a.terminal()]
        if not live:
            return allocs, {}
        # RSA signing costs a millisecond or two per task: one hop off the loop for them all.
        signed = await asyncio.to_thread(lambda: {a.id: self._sign_tasks(a) for a in live})
        return allocs, signed

    async def sign_identities(self, node_id: str, secret_id: str, alloc_id: str,
                              tasks: Sequence[str]) -> dict[str, str]:
        """Fresh identities for ``tasks`` of a live allocation placed on the calling node."""
        self._authenticate_node(node_id, secret_id)
        alloc = self.store.get("allocs", alloc_id)
        if alloc is None:
            raise NotFound(f"allocation {alloc_id} not found")
        if alloc.node_id != node_id:
            raise PermissionError(f"allocation {alloc_id} is not placed on this node")
        if alloc.terminal():
            raise PermissionError(f"allocation {alloc_id} is terminal")
        known = {t["Name"] for t in job_tasks(alloc.job, alloc.task_group)}
        unknown = sorted(set(tasks) - known)
        if unknown:
            raise NotFound(f"allocation {alloc_id} has no task {unknown[0]!r}")
        return await asyncio.to_thread(self._sign_tasks, alloc, list(tasks))

    async def upsert_services(self, node_id: str, secret_id: str, alloc_id: str,
                              registrations: Sequence[Any]) -> int:
        """A client registers services of one of its live allocations (``server.services``:
        ``ServiceError`` when refused)."""
        node = self._authenticate_node(node_id, secret_id)
        return await self.services.upsert(node, alloc_id, registrations)

    async def deregister_services(self, node_id: str, secret_id: str, alloc_id: str,
                                  ids: Sequence[str] | None) -> int:
        """A client removes registrations it made for ``alloc_id`` (None: all of them)."""
        node = self._authenticate_node(node_id, secret_id)
        return await self.services.deregister(node, alloc_id, ids)

    def _authenticate_node(self, node_id: str, secret_id: str) -> Node:
        """The registered node whose secret ID is ``secret_id``; compared in constant time."""
        node = self.store.get("nodes", node_id)
        if node is None or not node.secret_id or not hmac.compare_digest(
                node.secret_id.encode(), secret_id.encode()):
            raise PermissionError("node secret ID does not match")
        return node

    async def update_allocs_from_client(self, updates: Sequence[AllocUpdate]) -> int:
        """Record what clients report; only the client-owned fields of the latest row change,
        so a concurrent stop from the scheduler survives."""
        terminal: list[str] = []
        freed_ports = False

        def report(update: AllocUpdate) -> RowUpdate:
            def apply(current: Allocation | None, index: int) -> Any:
                nonlocal freed_ports
                if current is None:
                    return None
                alloc = attrs.evolve(
                    current, client_status=update.client_status,
                    client_description=update.client_description,
                    task_states=dict(update.task_states), modify_time=time.time_ns())
                if alloc.client_terminal():
                    terminal.append(alloc.id)
                    freed_ports = freed_ports or holds_ports(current)
                    if self.job(alloc.job_id, alloc.namespace) is None:
                        return DELETE  # its job was purged: garbage-collect it
                return alloc
            return apply

        if not updates:
            return self.store.index
        index = await self.store.write(updates={"allocs": [(u.id, report(u)) for u in updates]})
        for alloc_id in terminal:
            self.identities.forget_alloc(alloc_id)
        if freed_ports:
            # Host ports came free: a group that could not get them may be placed now.
            await self._reevaluate_queued()
        return index

    # ---- authentication ----------------------------------------------------------------
    def token_by_secret(self, secret: str) -> ACLToken | None:
        """The token whose secret ID is ``secret`` (expired or not): one dict lookup."""
        return self.acls.token_by_secret(secret)

    def identity_policy_names(self, token: ACLToken | None, claims: IdentityClaims | None
                              ) -> frozenset[str] | None:
        """The names of the policies a caller holds; None for a management token (all).
        A caller with neither a token nor claims is anonymous."""
        if token is not None:
            if token.type == TOKEN_MANAGEMENT:
                return None
            return self.acls.token_policy_names(token)
        if claims is not None:
            return self.workload_policy_names(claims)
        return frozenset({ANONYMOUS_POLICY})

    def workload_policy_names(self, claims: IdentityClaims) -> frozenset[str]:
        """The policies a workload identity gets: those attached by JobACL to its namespace,
        job (a dispatched or periodic child counts as its parent), group or task."""
        alloc = self.store.get("allocs", claims.alloc_id)
        if alloc is None:
            return frozenset()
        return self.acls.workload_policy_names(*workload_key(alloc, claims.task))

    def cached_acl(self, token: ACLToken | None, claims: IdentityClaims | None) -> ACL | None:
        """``resolve_acl``'s answer when it needs no compiling (almost every request), with
        no coroutine on the request path; None when it does."""
        if not self.acl_enabled:
            return MANAGEMENT
        if token is not None:
            return self.acl_resolver.cached_for_token(token)
        if claims is not None:
            return self.acl_resolver.cached_for_workload(claims.alloc_id, claims.task)
        return None  # anonymous: rare enough to take the general path

    async def resolve_acl(self, token: ACLToken | None, claims: IdentityClaims | None) -> ACL:
        """The compiled ACL of an authenticated caller: ``token``, else the workload identity
        ``claims``, else anonymous. With ACLs disabled, everything is allowed."""
        if not self.acl_enabled:
            return MANAGEMENT
        if token is not None:
            return await self.acl_resolver.for_token(token)
        if claims is not None:
            alloc = self.store.get("allocs", claims.alloc_id)
            if alloc is None:
                return DENY_ALL  # gone since it was verified: no policy, so nothing
            return await self.acl_resolver.for_workload(alloc, claims.task)
        return await self.acl_resolver.for_anonymous()

    def verify_workload_identity(self, token: str) -> IdentityClaims:
        """A workload identity is valid while its signature, time claims and allocation are."""
        claims = self.identities.verify(token)
        alloc = self.store.get("allocs", claims.alloc_id)
        if alloc is None:
            raise IdentityError("allocation does not exist")
        if alloc.client_terminal() or alloc.desired_status != DESIRED_RUN:
            raise IdentityError("allocation is terminal")
        return claims



def _ephemeral_sealer() -> Sealer:
    # Nothing sealed with it is ever written to disk: a random key, lost with the process.
    return Sealer(str(uuid.uuid4()), secrets.token_bytes(32))


def _placed(alloc: Allocation) -> RowUpdate:
    """A new allocation, stamped with the index of the write that creates it."""
    def apply(current: Allocation | None, index: int) -> Allocation:
        return attrs.evolve(alloc, alloc_modify_index=index)
    return apply


def _stopped(desired_status: str, description: str) -> RowUpdate:
    """The scheduler's side of an existing allocation: only the desired fields change."""
    def apply(current: Allocation | None, index: int) -> Allocation | None:
        if current is None or current.desired_status == desired_status:
            return None
        return attrs.evolve(current, desired_status=desired_status,
                            desired_description=description, alloc_modify_index=index)
    return apply


def _replaced_by(replacement_id: str) -> RowUpdate:
    def apply(current: Allocation | None, index: int) -> Allocation | None:
        if current is None or current.next_allocation == replacement_id:
            return None
        return attrs.evolve(current, next_allocation=replacement_id)
    return apply


def _new_evaluation(job: Mapping[str, Any], triggered_by: str, namespace: str,
                    for_node: Node | None) -> Evaluation:
    return Evaluation(id=str(uuid.uuid4()), namespace=namespace, job_id=job["ID"],
                      type=job.get("Type", "service"), triggered_by=triggered_by,
                      priority=job.get("Priority", 50), job_modify_index=job_modify_index(job),
                      node_id=for_node.id if for_node else "",
                      node_modify_index=for_node.modify_index if for_node else 0)


def _force_reschedule(current: Allocation | None, index: int) -> Allocation | None:
    if current is None or current.desired_transition.force_reschedule:
        return None
    return attrs.evolve(current, desired_transition=attrs.evolve(
        current.desired_transition, force_reschedule=True), alloc_modify_index=index)


def _scheduling_view(node: Node) -> tuple[Any, ...]:
    """The parts of a node that placement looks at; a change elsewhere needs no new plan."""
    drivers = {name: (d.detected, d.healthy, d.attributes) for name, d in node.drivers.items()}
    return (node.status, node.scheduling_eligibility, node.drain, node.datacenter,
            node.node_pool, node.node_class, node.attributes, node.meta, drivers)
