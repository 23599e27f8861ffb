"""The event broker: every committed state change becomes Nomad-shaped events, kept in a
bounded ring that subscribers (the ``/v1/event/stream`` endpoint) read at their own pace.

Where events come from: one place, the state store's commit hook (``StateStore.observe``).
Each committed batch (one store index) is turned into one ``EventBatch``: one ``Event`` per
changed row of a table that has a topic (``TABLE_TOPICS``). Nomad sets an event's ``Type``
per Raft message; we have no message kinds, so the type is read from the change itself
(a new allocation or a changed desired status is the scheduler's ``PlanResult``, a change to
anything else is a client's ``AllocationUpdated``; a stopped or purged job is
``JobDeregistered``; …). Deleting an evaluation or allocation is garbage collection, which
Nomad does not publish either.

What an event holds: its topic, type, key, filter keys and namespace, and the row as stored
(for a deletion, as it was last). Rows are immutable, so the payload a subscriber is sent
is built from the row when first asked for (by the HTTP layer, which knows how Nomad shows
each object and strips secrets), never on the write path.

Memory: the ring keeps the newest ``capacity`` events (at least the newest batch, however
large) and drops whole batches, oldest first. A subscription is only a cursor into the ring:
it holds nothing of its own, so a slow reader costs no memory. One whose next batch has been
dropped has fallen more than ``capacity`` events behind and is closed
(``LAGGING``): its client should subscribe again from the last index it saw.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs

from nomad_client.server.state import (
    ACL_POLICIES,
    ACL_ROLES,
    ACL_TOKENS,
    JOBS,
    SERVICES,
    Change,
)
from nomad_client.structs.models import Allocation, Node
from nomad_client.structs.namespaces import job_namespace

# How many events the ring keeps (whole batches; the newest batch is always kept).
DEFAULT_CAPACITY = 4096

# Why a subscription ended, as its client is told.
LAGGING: Final = "subscription closed by server, client should resubscribe"
SHUTTING_DOWN: Final = "subscription closed by server: the agent is shutting down"
UNSUBSCRIBED: Final = "subscription closed"

# Topics (Nomad's names). Those this agent publishes:
JOB, ALLOCATION, EVALUATION, NODE, SERVICE = "Job", "Allocation", "Evaluation", "Node", "Service"
ACL_TOKEN, ACL_POLICY, ACL_ROLE = "ACLToken", "ACLPolicy", "ACLRole"
# Every topic a Nomad client may ask for; the others are accepted and simply stay quiet.
KNOWN_TOPICS: Final = frozenset({
    JOB, ALLOCATION, EVALUATION, NODE, SERVICE, ACL_TOKEN, ACL_POLICY, ACL_ROLE,
    "Deployment", "NodePool", "ACLAuthMethod", "ACLBindingRule", "HostVolume", "CSIVolume",
    "CSIPlugin", "Operator", "Variable"})


@attrs.frozen(eq=False)  # compared and hashed by identity: rows hold dicts
class Event:
    """One changed object. ``row`` is the object as stored (for a deletion: as it was
    last); the wire payload is built from it by whoever sends the event."""

    topic: str
    type: str
    key: str
    namespace: str  # "" for objects outside namespaces (nodes, ACL objects)
    filter_keys: tuple[str, ...]
    index: int
    row: Any = attrs.field(repr=False)
    deleted: bool = False

    def matches_key(self, key: str) -> bool:
        """``topic=<Topic>:<key>`` selects this event (its key or one of its filter keys)."""
        return key == self.key or key in self.filter_keys


@attrs.frozen(eq=False)
class EventBatch:
    """The events of one committed write, in the order of its changes."""

    index: int
    events: tuple[Event, ...]


# ---- from a change to an event --------------------------------------------------------
@attrs.frozen
class TopicSpec:
    """How the rows of one table become events. ``event_type`` reads the change
    (before, after) and returns the event's type, or None for a change Nomad does not
    publish."""

    topic: str
    key: Callable[[Any], str]
    event_type: Callable[[Any | None, Any | None], str | None]
    namespace: Callable[[Any], str] = lambda row: ""
    filter_keys: Callable[[Any], tuple[str, ...]] = lambda row: ()


def _job_type(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    return "JobDeregistered" if after is None or after.get("Stop") else "JobRegistered"


def _alloc_type(before: Allocation | None, after: Allocation | None) -> str | None:
    if after is None:
        return None  # garbage collection
    if (before is None or after.desired_status != before.desired_status
            or after.alloc_modify_index != before.alloc_modify_index):
        return "PlanResult"  # the scheduler placed or stopped it
    return "AllocationUpdated"


def _eval_type(before: Any | None, after: Any | None) -> str | None:
    return None if after is None else "EvaluationUpdated"


def _node_type(before: Node | None, after: Node | None) -> str:
    if after is None:
        return "NodeDeregistration"
    if before is None or before.status == after.status:
        return "NodeRegistration"
    status_only = attrs.evolve(before, status=after.status,
                               status_description=after.status_description,
                               status_updated_at=after.status_updated_at,
                               modify_index=after.modify_index)
    # Nomad's real type for a status change (its docs say "NodeEvent").
    return "NodeStreamEvent" if status_only == after else "NodeRegistration"


def _service_type(before: Any | None, after: Any | None) -> str:
    return "ServiceDeregistration" if after is None else "ServiceRegistration"


def _acl_type(name: str) -> Callable[[Any | None, Any | None], str]:
    def event_type(before: Any | None, after: Any | None) -> str:
        return f"{name}Deleted" if after is None else f"{name}Upserted"
    return event_type


TABLE_TOPICS: Mapping[str, TopicSpec] = {
    JOBS: TopicSpec(JOB, key=lambda job: job["ID"], event_type=_job_type,
                    namespace=job_namespace),
    "allocs": TopicSpec(ALLOCATION, key=lambda a: a.id, event_type=_alloc_type,
                        namespace=lambda a: a.namespace, filter_keys=lambda a: (a.job_id,)),
    "evals": TopicSpec(EVALUATION, key=lambda e: e.id, event_type=_eval_type,
                       namespace=lambda e: e.namespace, filter_keys=lambda e: (e.job_id,)),
    "nodes": TopicSpec(NODE, key=lambda n: n.id, event_type=_node_type),
    SERVICES: TopicSpec(
        SERVICE, key=lambda s: s["ID"], event_type=_service_type,
        namespace=lambda s: s.get("Namespace") or "",
        filter_keys=lambda s: tuple(k for k in (s.get("JobID"), s.get("ServiceName")) if k)),
    ACL_TOKENS: TopicSpec(ACL_TOKEN, key=lambda t: t.accessor_id,
                          event_type=_acl_type(ACL_TOKEN)),
    ACL_POLICIES: TopicSpec(ACL_POLICY, key=lambda p: p.name, event_type=_acl_type(ACL_POLICY)),
    ACL_ROLES: TopicSpec(ACL_ROLE, key=lambda r: r.id, event_type=_acl_type(ACL_ROLE),
                         filter_keys=lambda r: (r.name,)),
}


def events_of(index: int, changes: Sequence[Change]) -> tuple[Event, ...]:
    """The events a committed batch publishes."""
    out = []
    for change in changes:
        spec = TABLE_TOPICS.get(change.table)
        if spec is None:
            continue
        event_type = spec.event_type(change.before, change.after)
        row = change.after if change.after is not None else change.before
        if event_type is None or row is None:
            continue
        out.append(Event(topic=spec.topic, type=event_type, key=spec.key(row),
                         namespace=spec.namespace(row), filter_keys=spec.filter_keys(row),
                         index=index, row=row, deleted=change.after is None))
    return tuple(out)


# ---- the broker ------------------------------------------------------------------------
class SubscriptionClosed(Exception):
    """The subscription has ended; ``str()`` is the reason its client is told."""


class BrokerClosed(Exception):
    """The broker takes no new subscriptions: the agent is shutting down."""


class Subscription:
    """One reader's cursor into the broker's ring (``next``); ``close`` ends it."""

    def __init__(self, broker: EventBroker, cursor: int,
                 on_close: Callable[[str], None] | None) -> None:
        self._broker = broker
        self._cursor = cursor  # the sequence number of the next batch to read
        self._on_close = on_close
        self._closed: str | None = None
        self._wake = asyncio.Event()

    @property
    def closed(self) -> str | None:
        """Why the subscription ended, or None while it is open."""
        return self._closed

    async def next(self, timeout: float) -> EventBatch | None:
        """The next batch; None when none came within ``timeout`` seconds. Raises
        ``SubscriptionClosed`` once the subscription has ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            if self._closed is not None:
                raise SubscriptionClosed(self._closed)
            batch = self._broker._batch(self._cursor)
            if batch is not None:
                self._cursor += 1
                return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                pass  # one more look, then None

    def close(self, reason: str = UNSUBSCRIBED) -> None:
        """End the subscription (idempotent): it leaves the broker at once, a reader waiting
        in ``next`` is woken, and ``on_close`` is told why."""
        if self._closed is not None:
            return
        self._closed = reason
        self._broker._forget(self)
        self._wake.set()
        if self._on_close is not None:
            self._on_close(reason)

    def _published(self, first: int) -> None:
        if self._cursor < first:
            self.close(LAGGING)  # its next batch is gone
        else:
            self._wake.set()


class EventBroker:
    """The ring of recent batches and the subscriptions reading it. ``publish`` is a
    ``StateStore`` commit observer."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("an event broker keeps at least one event")
        self._capacity = capacity
        self._ring: deque[EventBatch] = deque()
        self._first = 0  # the sequence number of the ring's oldest batch
        self._retained = 0  # events in the ring
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscriptions)

    @property
    def retained(self) -> int:
        """How many events the ring holds."""
        return self._retained

    def publish(self, index: int, changes: Sequence[Change]) -> None:
        """Record the events of the batch committed at ``index`` and wake the readers."""
        events = events_of(index, changes)
        if not events:
            return
        self._ring.append(EventBatch(index, events))
        self._retained += len(events)
        while self._retained > self._capacity and len(self._ring) > 1:
            self._retained -= len(self._ring.popleft().events)
            self._first += 1
        for subscription in list(self._subscriptions):
            subscription._published(self._first)

    def subscribe(self, index: int = 0, on_close: Callable[[str], None] | None = None
                  ) -> Subscription:
        """A subscription starting at the first retained batch whose index is at least
        ``index`` (0: the oldest retained; one newer than all: the next published).
        ``on_close(reason)`` is called when it ends, whoever ends it."""
        if self._closed:
            raise BrokerClosed(SHUTTING_DOWN)
        offset = bisect.bisect_left(self._ring, index, key=lambda batch: batch.index)
        subscription = Subscription(self, self._first + offset, on_close)
        self._subscriptions.add(subscription)
        return subscription

    def close(self) -> None:
        """End every subscription and take no more (the agent is stopping)."""
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription.close(SHUTTING_DOWN)

    def _batch(self, sequence: int) -> EventBatch | None:
        offset = sequence - self._first
        if 0 <= offset < len(self._ring):
            return self._ring[offset]
        return None

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
