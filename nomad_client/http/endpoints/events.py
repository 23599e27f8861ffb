"""GET /v1/event/stream: the server's events (``server/events.py``) as newline-delimited
JSON, one ``{"Index": n, "Events": [...]}`` line per committed write that has an event the
caller asked for and may see, and ``{}`` at the start and whenever the stream has been idle
for ``HEARTBEAT_INTERVAL`` seconds.

Query: ``topic=<Topic>[:<key>]`` (repeatable; no key or ``*``: every key; a key matches an
event's key or one of its filter keys, e.g. ``Allocation:<job ID>``; no topic: every topic),
``namespace`` (default ``default``; ``*``: all; events outside namespaces, nodes and ACL
objects, pass any), ``index`` (start at the first retained write at or after it; 0: the
oldest retained).

Authorization, as Nomad's per topic (``TOPIC_NEEDS``): Job, Allocation, Evaluation and
Service need ``read-job``, Node ``node:read``, the ACL topics management; a workload reads
its own namespace's Service events without a policy (``may_read``, as the service endpoints
allow). A topic named in the request must be one the caller may read in the request's
namespace (for ``*``: in some namespace), else 403. Then every event is checked in its own
namespace before it is sent,
so ``namespace=*`` and the all-topics stream show exactly what the caller may see (Nomad
refuses those to all but management; we filter, as our lists do). The caller is checked
again, as a new request would be, each time the stream wakes (its ACL as it is now) and when
its credential expires: a deleted or expired token, a workload whose allocation stopped or a
policy change that takes a named topic away ends the stream.

How a stream ends after the 200: with one line ``{"Error": "<reason>"}`` (an object no
client mistakes for a batch; python-nomad then subscribes again), except when the client
has stopped reading: a write that waits ``WRITE_TIMEOUT`` seconds, or a subscription cut off
while a write waits (it fell a ring's worth of events behind), closes the connection. A
client that goes away ends its subscription at once; so does agent shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from aiohttp import web
from multidict import MultiMapping

from nomad_client.http.auth import (
    ALL_NAMESPACES,
    PERMISSION_REFUSED,
    Need,
    allows_service_read,
    credential_expiry,
    reauthenticate,
    request_namespace,
)
from nomad_client.http.context import Identity
from nomad_client.http.endpoints.acl import role_view, token_view
from nomad_client.http.endpoints.jobs import READ_JOB
from nomad_client.http.endpoints.nodes import node_api
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request
from nomad_client.http.listeners import when_lost
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import Services
from nomad_client.server.events import (
    ACL_POLICY,
    ACL_ROLE,
    ACL_TOKEN,
    ALLOCATION,
    EVALUATION,
    JOB,
    KNOWN_TOPICS,
    NODE,
    SERVICE,
    UNSUBSCRIBED,
    BrokerClosed,
    Event,
    EventBatch,
    Subscription,
    SubscriptionClosed,
)
from nomad_client.server.server import Server
from nomad_client.structs.codec import to_api

log = logging.getLogger(__name__)

# Seconds of silence after which a ``{}`` line is sent (tests shorten it).
HEARTBEAT_INTERVAL = 10.0
# A write that waits this long for the client to read ends the stream.
WRITE_TIMEOUT = 30.0
# How long the parting ``{"Error": ...}`` line may take to go out.
PARTING_WRITE_TIMEOUT = 1.0
# The shortest wait for a credential's expiry (no busy loop around the exact instant).
MIN_EXPIRY_WAIT = 0.05
HEARTBEAT = b"{}\n"
ALL_TOPICS = "*"
ALL_KEYS = "*"

MANAGEMENT = Need.management
TOPIC_NEEDS: Mapping[str, Need] = {
    JOB: READ_JOB, ALLOCATION: READ_JOB, EVALUATION: READ_JOB, SERVICE: READ_JOB,
    "Deployment": READ_JOB, "CSIPlugin": READ_JOB,
    "HostVolume": Need.namespace("host-volume-read"),
    "CSIVolume": Need.namespace("csi-read-volume"),
    NODE: Need.node_read,
    "Operator": Need("operator:read", lambda acl, ns: acl.allow_operator_read()),
    "Variable": Need("variables:any", lambda acl, ns: acl.allow_any_variables(ns),
                     namespaced=True),
    ACL_TOKEN: MANAGEMENT, ACL_POLICY: MANAGEMENT, ACL_ROLE: MANAGEMENT,
    "ACLAuthMethod": MANAGEMENT, "ACLBindingRule": MANAGEMENT, "NodePool": MANAGEMENT,
}


# ---- the request -----------------------------------------------------------------------
@attrs.frozen
class StreamRequest:
    """What a subscriber asked for. ``topics``: topic (or ``*``) -> the keys asked for, or
    None for every key."""

    topics: Mapping[str, frozenset[str] | None]
    namespace: str
    index: int

    def selects(self, event: Event) -> bool:
        if (self.namespace != ALL_NAMESPACES and event.namespace
                and event.namespace != self.namespace):
            return False
        return any(_keys_match(self.topics.get(topic, frozenset()), event)
                   for topic in (event.topic, ALL_TOPICS))

    def admit(self, server: Server, req: ApiRequest) -> None:
        """403 unless the caller may read every topic it named (``*`` is filtered instead)."""
        for topic in self.topics:
            if topic != ALL_TOPICS and not may_read(server, req, topic, self.namespace):
                raise PERMISSION_REFUSED


def _keys_match(keys: frozenset[str] | None, event: Event) -> bool:
    return keys is None or any(event.matches_key(key) for key in keys)


def parse_stream_request(query: MultiMapping[str]) -> StreamRequest:
    raw_index = query.get("index") or "0"
    try:
        index = int(raw_index)
        if index < 0:
            raise ValueError
    except ValueError:
        raise bad_request(f"Unable to parse index: {raw_index!r} is not a "
                          "non-negative integer") from None
    topics: dict[str, frozenset[str] | None] = {}
    for raw in query.getall("topic", ()) or [ALL_TOPICS]:
        topic, key = _parse_topic(raw)
        known = topics.get(topic, frozenset())
        topics[topic] = None if key == ALL_KEYS or known is None else known | {key}
    return StreamRequest(topics, request_namespace(query), index)


def _parse_topic(raw: str) -> tuple[str, str]:
    parts = raw.split(":")
    if len(parts) > 2 or not all(parts):
        raise bad_request(f"Invalid topic query: {raw!r} (want <Topic> or <Topic>:<key>)")
    topic, key = parts[0], parts[1] if len(parts) == 2 else ALL_KEYS
    if topic != ALL_TOPICS and topic not in KNOWN_TOPICS:
        raise bad_request(f"Invalid topic query: unknown topic {topic!r} (want one of "
                          f"{', '.join(sorted(KNOWN_TOPICS))} or *)")
    return topic, key


def may_read(server: Server, req: ApiRequest, topic: str, namespace: str) -> bool:
    """Whether the caller may read ``topic``'s events in ``namespace`` (an event's own, or
    the request's, where ``*`` asks "in some namespace")."""
    if TOPIC_NEEDS[topic].allows(req.identity.acl, namespace):
        return True
    if topic != SERVICE:
        return False
    # Nomad's implicit grant, as the service endpoints apply it: a workload discovers the
    # services of its own namespace without a policy.
    if namespace == ALL_NAMESPACES:
        return req.identity.claims is not None
    return allows_service_read(req, server, namespace)


# ---- payloads (Nomad's shapes; never a secret) -----------------------------------------
def _job_payload(server: Server, event: Event) -> dict[str, Any]:
    job = event.row
    # Nomad stores a job's status; ours is derived: as it is when the event is first sent.
    payload: dict[str, Any] = {"Job": {**job, "Status": server.job_status(job)}}
    if event.deleted:
        payload["Deleted"] = True
    return payload


def _alloc_payload(server: Server, event: Event) -> dict[str, Any]:
    # As Nomad's: the allocation without its job (clients fetch the job on their own).
    view = to_api(attrs.evolve(event.row, job={}))
    view["Job"] = None
    return {"Allocation": view}


def _plain(row: Any) -> Any:
    return to_api(row) if attrs.has(type(row)) else row


PAYLOADS: Mapping[str, Callable[[Server, Event], dict[str, Any]]] = {
    JOB: _job_payload,
    ALLOCATION: _alloc_payload,
    EVALUATION: lambda server, event: {"Evaluation": to_api(event.row)},
    NODE: lambda server, event: {"Node": node_api(event.row)},
    SERVICE: lambda server, event: {"Service": _plain(event.row)},
    ACL_TOKEN: lambda server, event: {
        "ACLToken": token_view(server, event.row) | {"SecretID": ""}},
    ACL_POLICY: lambda server, event: {"ACLPolicy": to_api(event.row)},
    ACL_ROLE: lambda server, event: {"ACLRole": role_view(event.row)},
}

# An event's JSON, built once for every subscriber; gone with the event.
_rendered: weakref.WeakKeyDictionary[Event, bytes] = weakref.WeakKeyDictionary()


def render(server: Server, event: Event) -> bytes:
    """``event`` as Nomad's JSON."""
    encoded = _rendered.get(event)
    if encoded is None:
        encoded = json.dumps({
            "Topic": event.topic, "Type": event.type, "Key": event.key,
            "Namespace": event.namespace, "FilterKeys": list(event.filter_keys) or None,
            "Index": event.index, "Payload": PAYLOADS[event.topic](server, event),
        }, separators=(",", ":")).encode()
        _rendered[event] = encoded
    return encoded


def batch_line(server: Server, batch: EventBatch, request: StreamRequest, req: ApiRequest
               ) -> bytes | None:
    """The line for ``batch``: its events the caller (``req.identity``) asked for and may
    see; None if none."""
    chosen = [render(server, event) for event in batch.events
              if request.selects(event) and may_read(server, req, event.topic, event.namespace)]
    if not chosen:
        return None
    return b'{"Index":%d,"Events":[%b]}\n' % (batch.index, b",".join(chosen))


# ---- the stream ------------------------------------------------------------------------
class _ClientStalled(Exception):
    """The client stopped reading: nothing more can be told to it."""


class _EventStream:
    """One subscriber's response: the subscription, the caller as last checked, and
    whether a write is waiting on the client."""

    def __init__(self, server: Server, req: ApiRequest, request: StreamRequest) -> None:
        self._server = server
        self._req = req
        self._request = request
        self._identity: Identity = req.identity
        self._writing = False
        self._response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        self._response.content_type = "application/json"
        self._response.enable_chunked_encoding()
        self._response.force_close()  # a stream's end is its connection's end

    async def serve(self) -> web.StreamResponse:
        try:
            subscription = self._server.events.subscribe(self._request.index,
                                                         on_close=self._on_close)
        except BrokerClosed as err:
            raise HTTPError(503, str(err)) from None
        forget = when_lost(self._req.raw, subscription.close)
        try:
            await self._response.prepare(self._req.raw)
            await self._write(HEARTBEAT, WRITE_TIMEOUT)
            reason = await self._pump(subscription)
            await self._write(json.dumps({"Error": reason}).encode() + b"\n",
                              PARTING_WRITE_TIMEOUT)
        except (ConnectionError, _ClientStalled):
            self._end_connection()
        except Exception:  # after the 200, only the connection can say so
            log.exception("event stream failed")
            self._end_connection()
        finally:
            forget()
            subscription.close()
        return self._response

    async def _pump(self, subscription: Subscription) -> str:
        """Send batches and heartbeats until the stream must end; return why."""
        loop = asyncio.get_running_loop()
        last_write = loop.time()
        while True:
            wait = last_write + HEARTBEAT_INTERVAL - loop.time()
            expiry = credential_expiry(self._identity)
            if expiry is not None:
                wait = min(wait, max(expiry - time.time(), MIN_EXPIRY_WAIT))
            try:
                batch = await subscription.next(wait)
            except SubscriptionClosed as closed:
                return str(closed)
            try:
                self._identity = await reauthenticate(
                    self._server, self._identity, self._req.raw.headers, self._req.ctx)
                caller = self._req._replace(identity=self._identity)
                self._request.admit(self._server, caller)
            except HTTPError as err:
                return err.message
            line = None if batch is None else batch_line(self._server, batch, self._request,
                                                         caller)
            if line is None and loop.time() - last_write >= HEARTBEAT_INTERVAL:
                line = HEARTBEAT
            if line is not None:
                await self._write(line, WRITE_TIMEOUT)
                last_write = loop.time()

    async def _write(self, data: bytes, timeout: float) -> None:
        self._writing = True
        try:
            async with asyncio.timeout(timeout):
                await self._response.write(data)
        except TimeoutError:
            raise _ClientStalled from None
        finally:
            self._writing = False

    def _on_close(self, reason: str) -> None:
        # A write waiting on a client that does not read would hear of the end only when
        # it times out: end the connection now (the client could not be told anyway).
        if self._writing and reason != UNSUBSCRIBED:
            self._end_connection()

    def _end_connection(self) -> None:
        transport = self._req.raw.transport
        if transport is not None:
            transport.abort()  # close() would wait to flush what the client is not reading


async def stream_events(services: Services, req: ApiRequest) -> web.StreamResponse:
    request = parse_stream_request(req.query)
    request.admit(services.own_server, req)
    return await _EventStream(services.own_server, req, request).serve()


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    # Authorized per topic and per event by the handler.
    routes.add(("GET",), "/v1/event/stream", stream_events)
