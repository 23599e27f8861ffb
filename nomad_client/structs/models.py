"""The records the server stores and the client reports: allocations, task states and events,
nodes, evaluations, ACL tokens, policies and roles.

Jobs are kept as their canonical API dict (see ``nomad_client.jobspec.canonicalize_job``):
they arrive as JSON, are stored and served as JSON, and the runners only read a handful of
fields through the accessors in ``jobs.py``. Everything here is a frozen value; a change is
a new value (``attrs.evolve``) written back to the state store.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from nomad_client.structs.codec import SHARED_JOB, hidden_from_api

ZERO_TIME = "0001-01-01T00:00:00Z"


def now_ns() -> int:
    return time.time_ns()


def rfc3339(ts: float | None = None) -> str:
    """Go's time.Time JSON form, with nanoseconds."""
    when = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND_NS = 1_000_000_000
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                      r"(?:Z|([+-])(\d{2}):(\d{2}))")


def rfc3339_ns(ns: int) -> str:
    """Unix nanoseconds exactly as Go writes a ``time.Time`` in JSON (RFC 3339, UTC, the
    fraction's trailing zeros dropped), so ``parse_rfc3339_ns`` gives back the same value."""
    seconds, fraction = divmod(ns, _SECOND_NS)
    text = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    return text + "Z"


def parse_rfc3339_ns(text: str) -> int:
    """An RFC 3339 time (as Go's JSON decoder reads one) in unix nanoseconds; ValueError if
    it is not one."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    when = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                    tzinfo=UTC)
    seconds = (when - _EPOCH) // timedelta(seconds=1)
    if sign:
        offset = int(off_h) * 3600 + int(off_m) * 60
        seconds -= offset if sign == "+" else -offset
    return seconds * _SECOND_NS + int((fraction or "").ljust(9, "0"))


# Task event types (the vocabulary Nomad's clients use).
EVENT_RECEIVED = "Received"
EVENT_TASK_SETUP = "Task Setup"
EVENT_SETUP_FAILURE = "Setup Failure"
EVENT_DRIVER_FAILURE = "Driver Failure"
EVENT_STARTED = "Started"
EVENT_TERMINATED = "Terminated"
EVENT_KILLING = "Killing"
EVENT_KILLED = "Killed"
EVENT_RESTARTING = "Restarting"
EVENT_NOT_RESTARTING = "Not Restarting"
EVENT_HOOK_FAILED = "Task hook failed"
EVENT_HOOK_MESSAGE = "Task hook message"
EVENT_FAILED_RESTORING = "Failed Restoring Task"
EVENT_SIBLING_FAILED = "Sibling Task Failed"
# A user (or a hook) asked for a restart, or for a signal to be sent to the task.
EVENT_RESTART_SIGNALED = "Restart Signaled"
EVENT_SIGNALING = "Signaling"

TASK_PENDING = "pending"
TASK_RUNNING = "running"
TASK_DEAD = "dead"

ALLOC_PENDING = "pending"
ALLOC_RUNNING = "running"
ALLOC_COMPLETE = "complete"
ALLOC_FAILED = "failed"
ALLOC_LOST = "lost"
# The server's word for an allocation on a node it has not heard from, while the group's
# ``disconnect.lost_after`` lets it wait for the node before calling it lost.
ALLOC_UNKNOWN = "unknown"
CLIENT_TERMINAL = frozenset({ALLOC_COMPLETE, ALLOC_FAILED, ALLOC_LOST})

DESIRED_RUN = "run"
DESIRED_STOP = "stop"

MAX_TASK_EVENTS = 10


@attrs.frozen
class TaskEvent:
    type: str
    time: int = attrs.field(factory=now_ns)
    message: str = ""
    display_message: str = ""
    details: dict[str, str] = attrs.field(factory=dict)
    fails_task: bool = False
    restart_reason: str = ""
    setup_error: str = ""
    driver_error: str = ""
    exit_code: int = 0
    signal: int = 0
    kill_reason: str = ""
    kill_timeout: int = 0
    start_delay: int = 0


@attrs.frozen
class TaskState:
    state: str = TASK_PENDING
    failed: bool = False
    restarts: int = 0
    last_restart: str = ZERO_TIME
    started_at: str = ZERO_TIME
    finished_at: str = ZERO_TIME
    events: tuple[TaskEvent, ...] = ()

    def with_event(self, event: TaskEvent) -> TaskState:
        events = (*self.events, event)[-MAX_TASK_EVENTS:]
        return attrs.evolve(self, events=events, failed=self.failed or event.fails_task)


@attrs.frozen
class DesiredTransition:
    """What the server wants done with an allocation beyond its desired status (Nomad's):
    ``migrate`` is set when a user stopped it (``/v1/allocation/:id/stop``), so it is
    stopped and replaced, with ``no_shutdown_delay`` and ``reschedule`` as they asked."""

    migrate: bool = False
    reschedule: bool = False
    force_reschedule: bool = False
    no_shutdown_delay: bool = False


@attrs.frozen
class Allocation:
    id: str
    namespace: str
    eval_id: str
    name: str
    node_id: str
    node_name: str
    job_id: str
    # Shared with other allocations of the job version (SHARED_JOB): never mutate it.
    job: dict[str, Any] = attrs.field(metadata=SHARED_JOB)
    task_group: str
    desired_status: str = DESIRED_RUN
    desired_description: str = ""
    desired_transition: DesiredTransition = attrs.field(factory=DesiredTransition)
    client_status: str = ALLOC_PENDING
    client_description: str = ""
    task_states: dict[str, TaskState] = attrs.field(factory=dict)
    create_index: int = 0
    modify_index: int = 0
    alloc_modify_index: int = 0
    create_time: int = attrs.field(factory=now_ns)
    modify_time: int = attrs.field(factory=now_ns)
    # Nomad's shape: {"Shared": {"Ports": [{"Label", "Value", "To", "HostIP"}], "Networks":
    # [{"Mode", "IP", "ReservedPorts": [...], "DynamicPorts": [...]}]}}; ports the scheduler
    # gave the allocation on its node ({} when its groups ask for none).
    allocated_resources: dict[str, Any] = attrs.field(factory=dict)
    # Nomad's other Allocation fields, at Go's zero values until something here sets them.
    resources: dict[str, Any] | None = None
    task_resources: dict[str, Any] | None = None
    services: dict[str, str] | None = None
    metrics: AllocMetric | None = None
    deployment_id: str = ""
    deployment_status: dict[str, Any] | None = None
    followup_eval_id: str = ""
    previous_allocation: str = ""
    next_allocation: str = ""
    reschedule_tracker: dict[str, Any] | None = None
    network_status: dict[str, Any] | None = None
    preempted_allocations: list[str] | None = None
    preempted_by_allocation: str = ""
    # No signed identities here: a record is stored and persisted, a token must not be.
    # The server signs them for the client beside the record (Alloc.GetAllocs,
    # Alloc.SignIdentities) and the client keeps them in memory and task secrets dirs only.

    @property
    def index(self) -> int:
        """``web.api[2]`` -> 2."""
        return int(self.name.rsplit("[", 1)[1].rstrip("]"))

    def client_terminal(self) -> bool:
        return self.client_status in CLIENT_TERMINAL

    def server_terminal(self) -> bool:
        return self.desired_status != DESIRED_RUN

    def terminal(self) -> bool:
        return self.client_terminal() or self.server_terminal()


@attrs.frozen
class DriverInfo:
    """A driver's fingerprint: what a driver reports and a node carries for it."""

    detected: bool
    healthy: bool
    health_description: str = ""
    attributes: dict[str, str] = attrs.field(factory=dict)
    update_time: str = ZERO_TIME


NODE_READY = "ready"
NODE_INIT = "initializing"
# Missed its heartbeats: ``disconnected`` while some allocation on it may still come back
# (``disconnect.lost_after``), ``down`` otherwise.
NODE_DOWN = "down"
NODE_DISCONNECTED = "disconnected"


@attrs.frozen
class Node:
    id: str
    name: str
    datacenter: str
    http_addr: str
    secret_id: str = hidden_from_api(default="")
    node_class: str = ""
    node_pool: str = "default"
    attributes: dict[str, str] = attrs.field(factory=dict)
    meta: dict[str, str] = attrs.field(factory=dict)
    drivers: dict[str, DriverInfo] = attrs.field(factory=dict)
    node_resources: dict[str, Any] = attrs.field(factory=dict)
    # What the operator keeps back from scheduling; nothing, in Nomad's shape, unless set.
    reserved_resources: dict[str, Any] = attrs.field(factory=lambda: {
        "Cpu": {"CpuShares": 0}, "Memory": {"MemoryMB": 0}, "Disk": {"DiskMB": 0},
        "Networks": {"ReservedHostPorts": ""}})
    status: str = NODE_INIT
    status_description: str = ""
    status_updated_at: int = 0
    scheduling_eligibility: str = "eligible"
    drain: bool = False
    # Nomad's DrainStrategy (None: not draining) and LastDrain; owned by the server
    # (``server.drain``), never by the client's registration.
    drain_strategy: dict[str, Any] | None = None
    last_drain: dict[str, Any] | None = None
    create_index: int = 0
    modify_index: int = 0
    # Nomad's other Node fields, at Go's zero values until something here sets them.
    tls_enabled: bool = False
    resources: dict[str, Any] | None = None
    reserved: dict[str, Any] | None = None
    links: dict[str, str] | None = None
    cgroup_parent: str = ""
    events: list[dict[str, Any]] | None = None
    host_volumes: dict[str, Any] | None = None
    gc_volumes_on_node_gc: bool = False
    host_networks: dict[str, Any] | None = None
    csi_controller_plugins: dict[str, Any] | None = None
    csi_node_plugins: dict[str, Any] | None = None
    node_max_allocs: int = 0


@attrs.frozen
class AllocMetric:
    nodes_evaluated: int = 0
    nodes_filtered: int = 0
    nodes_available: dict[str, int] = attrs.field(factory=dict)
    constraint_filtered: dict[str, int] = attrs.field(factory=dict)
    nodes_exhausted: int = 0
    # Why feasible nodes could not take the group, e.g. "network: reserved port collision
    # http=8080" -> number of nodes; and how many more of its allocations failed alike.
    dimension_exhausted: dict[str, int] = attrs.field(factory=dict)
    coalesced_failures: int = 0


EVAL_PENDING = "pending"
EVAL_COMPLETE = "complete"


@attrs.frozen
class Evaluation:
    id: str
    namespace: str
    job_id: str
    type: str
    triggered_by: str
    priority: int = 50
    status: str = EVAL_PENDING
    status_description: str = ""
    failed_tg_allocs: dict[str, AllocMetric] = attrs.field(factory=dict)
    queued_allocations: dict[str, int] = attrs.field(factory=dict)
    create_index: int = 0
    modify_index: int = 0
    create_time: int = attrs.field(factory=now_ns)
    modify_time: int = attrs.field(factory=now_ns)
    # Nomad's other Evaluation fields, at Go's zero values until something here sets them.
    job_modify_index: int = 0
    node_id: str = ""
    node_modify_index: int = 0
    deployment_id: str = ""
    wait: int = 0  # nanoseconds, as Go's time.Duration
    wait_until: str = ZERO_TIME
    next_eval: str = ""
    previous_eval: str = ""
    blocked_eval: str = ""
    related_evals: list[dict[str, Any]] | None = None
    plan_annotations: dict[str, Any] | None = None
    class_eligibility: dict[str, bool] | None = None
    escaped_computed_class: bool = False
    quota_limit_reached: str = ""
    missing_non_node_resources: list[str] | None = None
    annotate_plan: bool = False
    snapshot_index: int = 0


TOKEN_CLIENT = "client"
TOKEN_MANAGEMENT = "management"


@attrs.frozen
class ACLToken:
    """An ACL token. Times are unix nanoseconds; ``roles`` are role IDs (a role's name can
    change, its ID cannot: names are looked up again whenever a token is shown)."""

    accessor_id: str
    secret_id: str = attrs.field(repr=False)  # never in a log line by way of a repr
    name: str
    type: str  # TOKEN_CLIENT | TOKEN_MANAGEMENT
    policies: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    global_: bool = False
    create_time: int = attrs.field(factory=now_ns)
    expiration_time: int | None = None  # None = never
    expiration_ttl: int = 0  # what the creator asked for; 0 = none
    hash: str = ""  # base64 BLAKE2b-256, as Nomad's
    create_index: int = 0
    modify_index: int = 0

    def expired(self, now: float) -> bool:
        """Whether the token has expired at ``now`` (unix seconds)."""
        return self.expiration_time is not None and now * 1e9 >= self.expiration_time


@attrs.frozen
class PolicyJobACL:
    """The workloads a policy is attached to (Nomad's ``JobACL``): every workload of
    ``namespace``, or of one job, group or task there."""

    namespace: str = ""
    job_id: str = ""
    group: str = ""
    task: str = ""


@attrs.frozen
class ACLPolicy:
    """An ACL policy as stored: its rules are the text the operator wrote (parsed again
    when it is compiled or shown)."""

    name: str
    description: str = ""
    rules: str = ""
    job_acl: PolicyJobACL | None = None
    hash: str = ""
    create_index: int = 0
    modify_index: int = 0


@attrs.frozen
class ACLRole:
    """A named set of policies that tokens link to by ID."""

    id: str
    name: str
    description: str = ""
    policies: tuple[str, ...] = ()  # policy names
    hash: str = ""
    create_index: int = 0
    modify_index: int = 0


@attrs.frozen
class AllocUpdate:
    """What a client reports about one of its allocations (Node.UpdateAlloc)."""

    id: str
    client_status: str
    client_description: str
    task_states: dict[str, TaskState]


@attrs.frozen
class VariableLock:
    """The lock on a variable. Durations are nanoseconds. When it expires is kept in a
    renewal record beside the variable (``server.variables``): a renewal moves no
    ModifyIndex of the variable."""

    id: str = attrs.field(repr=False)  # the holder's proof of holding: never in a log line
    ttl: int = 0
    lock_delay: int = 0


@attrs.frozen
class Variable:
    """A variable as stored: its items are one sealed blob (``data``, the JSON of the items
    sealed under the key ``key_id`` with namespace and path as associated data), so the
    state file never holds them in the clear. Times are unix nanoseconds."""

    namespace: str
    path: str
    data: str = attrs.field(repr=False)
    key_id: str = ""
    create_index: int = 0
    modify_index: int = 0
    create_time: int = 0
    modify_time: int = 0
    lock: VariableLock | None = None
