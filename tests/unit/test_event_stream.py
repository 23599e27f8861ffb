"""GET /v1/event/stream and its broker: event shapes, topic/key/namespace filters, index
resume, heartbeats, per-event ACL filtering (a token, a workload identity), streams ended by
a deleted or expired token, a slow subscriber cut off with the broker's memory bounded, a
client that hangs up freeing its subscription at once, shutdown, no secret in any payload.
Served by a real router and listener; every wait is on a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.api.client import ApiClient, EventStreamClosed
from nomad_client.http.endpoints import events as events_endpoint
from nomad_client.server.events import (
    KNOWN_TOPICS,
    LAGGING,
    SHUTTING_DOWN,
    TABLE_TOPICS,
    EventBroker,
    SubscriptionClosed,
)
from nomad_client.server.keyring import Keyring
from nomad_client.server.server import Server
from nomad_client.server.state import JOBS, SERVICES, Change, job_key
from nomad_client.structs.models import (
    TOKEN_CLIENT,
    ACLPolicy,
    ACLRole,
    ACLToken,
    AllocUpdate,
    PolicyJobACL,
)
from nomad_client.structs.namespaces import Namespace
from tests.unit.factories import (
    ServedAPI,
    acl_token,
    identity_token,
    job,
    make_alloc,
    make_server,
    node,
    seed,
    serve_api,
    wait_until,
)

PROD = "prod"
READ_PROD = 'namespace "prod" { policy = "read" }'
READ_DEFAULT = 'namespace "default" { capabilities = ["read-job"] }'
# Every stream also asks for this node's events: registering it marks the end of a test's
# writes, so a reader knows when it has seen everything before it.
SENTINEL = "sentinel"


@attrs.define
class Agent:
    server: Server
    api: ServedAPI
    management: str

    @property
    def url(self) -> str:
        return self.api.url

    async def token(self, *policies: str) -> ACLToken:
        return await self.server.acls.upsert_token(
            ACLToken(accessor_id="", secret_id="", name="t", type=TOKEN_CLIENT,
                     policies=policies))

    async def policy(self, name: str, rules: str, job_id: str | None = None) -> None:
        attached = None if job_id is None else PolicyJobACL(namespace="default", job_id=job_id)
        await self.server.acls.upsert_policy(ACLPolicy(name=name, rules=rules,
                                                       job_acl=attached))

    async def sentinel(self) -> int:
        return await self.server.register_node(node(SENTINEL))


@pytest.fixture
async def agent(keyring: Keyring) -> AsyncIterator[Agent]:
    server = make_server(keyring, acl=True)
    api = await serve_api(server)
    try:
        management = await server.acls.bootstrap()
        await server.upsert_namespace(Namespace(name=PROD))
        yield Agent(server, api, management.secret_id)
    finally:
        await api.close()
        await server.close()


@pytest.fixture
def heartbeat(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Set the stream's heartbeat interval for this test."""
    return lambda seconds: monkeypatch.setattr(events_endpoint, "HEARTBEAT_INTERVAL", seconds)


class Stream:
    """An open event stream: its lines, decoded, as they come (raw ones kept too)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.raw: list[bytes] = []

    async def line(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next line decoded; None at the end of the stream."""
        raw = await asyncio.wait_for(self.response.content.readline(), timeout)
        if not raw:
            return None
        assert raw.endswith(b"\n"), raw
        self.raw.append(raw)
        decoded: dict[str, Any] = json.loads(raw)
        return decoded

    async def batch(self) -> dict[str, Any]:
        """The next line with events (heartbeats skipped)."""
        while True:
            line = await self.line()
            assert line is not None, "the stream ended"
            assert "Error" not in line, line
            if line:
                return line

    async def events_until(self, sentinel: str = SENTINEL) -> list[dict[str, Any]]:
        """Every event up to the registration of node ``sentinel`` (left out)."""
        seen: list[dict[str, Any]] = []
        while True:
            batch = await self.batch()
            for event in batch["Events"]:
                assert event["Index"] == batch["Index"], batch
                if event["Topic"] == "Node" and event["Key"] == sentinel:
                    return seen
                seen.append(event)

    async def rest(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Every line until the stream ends (within ``timeout`` seconds in all)."""
        lines = []
        async with asyncio.timeout(timeout):
            while (line := await self.line()) is not None:
                lines.append(line)
        return lines


@contextlib.asynccontextmanager
async def stream(agent: Agent, token: str, *topics: str, sentinel: bool = True,
                 **params: Any) -> AsyncIterator[Stream]:
    """A subscription with ``token`` to ``topics`` (and, with ``sentinel``, the sentinel
    node's events), ``params`` as query (``index``: by default, from the next write on);
    its first line (the heartbeat sent at once) already read."""
    params.setdefault("index", agent.server.store.index + 1)
    topics = (*topics, f"Node:{SENTINEL}") if topics and sentinel else topics
    query = [("topic", t) for t in topics]
    query += [(name, str(value)) for name, value in params.items()]
    async with aiohttp.ClientSession() as session, session.get(
            agent.url + "/v1/event/stream", params=query,
            headers={"X-Nomad-Token": token}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("application/json")
        opened = Stream(response)
        assert await opened.line() == {}
        yield opened


async def status_of(url: str, token: str, query: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{url}/v1/event/stream?{query}", headers={"X-Nomad-Token": token}) as response:
        if response.status != 200:
            assert response.headers["Content-Type"].startswith("text/plain")
            return response.status, await response.text()
        return response.status, ""


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["Topic"], e["Type"], e["Key"]) for e in events]


# ---- shapes ----------------------------------------------------------------------------
async def test_a_jobs_life_in_nomads_shapes(agent: Agent) -> None:
    server = agent.server
    async with stream(agent, agent.management, "*") as events:
        await server.register_node(node("n1", secret_id="node-secret"))
        await server.register_job(job(Meta={"owner": "ops"}))
        alloc = server.job_allocs("web")[0]
        await server.update_allocs_from_client(
            [AllocUpdate(alloc.id, "running", "Tasks are running", {})])
        await server.deregister_job("web", purge=True)
        await agent.sentinel()
        seen = await events.events_until()
    assert summary(seen) == [
        ("Node", "NodeRegistration", "n1"),
        ("Job", "JobRegistered", "web"),
        ("Evaluation", "EvaluationUpdated", seen[2]["Key"]),
        ("Allocation", "PlanResult", alloc.id),
        ("Allocation", "AllocationUpdated", alloc.id),
        ("Job", "JobDeregistered", "web"),
        ("Evaluation", "EvaluationUpdated", seen[6]["Key"]),
        ("Allocation", "PlanResult", alloc.id),  # the scheduler stops it
        ("Job", "JobDeregistered", "web"),  # purged
    ]
    node_event, job_event, eval_event, placed, updated = seen[:5]
    assert set(node_event) == {"Topic", "Type", "Key", "Namespace", "FilterKeys", "Index",
                               "Payload"}
    assert (node_event["Namespace"], node_event["FilterKeys"]) == ("", None)
    assert node_event["Payload"]["Node"]["ID"] == "n1"
    assert node_event["Payload"]["Node"]["SecretID"] == ""
    assert (job_event["Namespace"], job_event["FilterKeys"]) == ("default", None)
    assert job_event["Payload"]["Job"]["Meta"] == {"owner": "ops"}
    assert "Deleted" not in job_event["Payload"]
    assert (eval_event["Namespace"], eval_event["FilterKeys"]) == ("default", ["web"])
    assert eval_event["Payload"]["Evaluation"]["JobID"] == "web"
    assert placed["FilterKeys"] == ["web"]
    assert placed["Payload"]["Allocation"]["ID"] == alloc.id
    assert placed["Payload"]["Allocation"]["Job"] is None  # Nomad's stub: no job
    assert updated["Payload"]["Allocation"]["ClientStatus"] == "running"
    assert updated["Index"] > placed["Index"]
    stopped, purged = seen[5], seen[8]
    assert seen[7]["Payload"]["Allocation"]["DesiredStatus"] == "stop"
    assert stopped["Payload"]["Job"]["Stop"] is True and "Deleted" not in stopped["Payload"]
    assert purged["Payload"]["Deleted"] is True
    assert purged["Payload"]["Job"]["ID"] == "web"  # the job as it was last


async def test_node_status_changes_are_node_stream_events(agent: Agent) -> None:
    async with stream(agent, agent.management, "Node") as events:
        await agent.server.register_node(node("n1"))
        await agent.server.update_node_status("n1", "down")
        await agent.sentinel()
        seen = await events.events_until()
    assert summary(seen) == [("Node", "NodeRegistration", "n1"),
                             ("Node", "NodeStreamEvent", "n1")]
    assert seen[1]["Payload"]["Node"]["Status"] == "down"


def test_every_topic_has_a_need_and_every_published_one_a_payload() -> None:
    assert set(events_endpoint.TOPIC_NEEDS) == KNOWN_TOPICS
    assert set(events_endpoint.PAYLOADS) == {spec.topic for spec in TABLE_TOPICS.values()}


# ---- filters ---------------------------------------------------------------------------
async def _two_namespaces(agent: Agent) -> None:
    """Node n1; job web in default, job api in prod (each placed on n1)."""
    await agent.server.register_node(node("n1"))
    await agent.server.register_job(job())
    await agent.server.register_job(job(ID="api", Namespace=PROD))
    await agent.sentinel()


@pytest.mark.parametrize(("topics", "namespace", "expected"), [
    (("Job:web",), "default", {("Job", "web")}),
    (("Job",), PROD, {("Job", "api")}),
    (("Job",), "*", {("Job", "web"), ("Job", "api")}),
    (("Job:web", "Job"), "*", {("Job", "web"), ("Job", "api")}),  # * wins, once each
    (("Allocation:web",), "default", {("Allocation", "web")}),  # by filter key (job ID)
    (("Evaluation:api",), PROD, {("Evaluation", "api")}),
    (("Node",), PROD, {("Node", "n1")}),  # outside namespaces: passes any filter
    (("Job:nope",), "*", set()),
])
async def test_topic_key_and_namespace_filters(
        agent: Agent, topics: tuple[str, ...], namespace: str,
        expected: set[tuple[str, str]]) -> None:
    await _two_namespaces(agent)
    async with stream(agent, agent.management, *topics, namespace=namespace,
                      index=0) as events:
        seen = await events.events_until()
    found = {(e["Topic"], e["Payload"].get("Allocation", e["Payload"].get(
        "Evaluation", {})).get("JobID", e["Key"])) for e in seen}
    assert found == expected
    keys = [(e["Topic"], e["Key"], e["Type"]) for e in seen]
    assert len(keys) == len(set(keys))  # an event matching two requested keys comes once


async def test_index_resumes_at_the_first_write_at_or_after_it(agent: Agent) -> None:
    server = agent.server
    written = []
    for name in ("a", "b", "c"):
        written.append(await server.store.write({JOBS: [(job_key("default", name),
                                                         job(ID=name))]}))
    await agent.sentinel()
    async with stream(agent, agent.management, "Job", index=written[1]) as events:
        seen = await events.events_until()
    assert [(e["Key"], e["Index"]) for e in seen] == [("b", written[1]), ("c", written[2])]
    async with stream(agent, agent.management, "Job", index=0) as events:
        assert [e["Key"] for e in await events.events_until()] == ["a", "b", "c"]
    # Newer than everything: only what comes next.
    async with stream(agent, agent.management, "Job",
                      index=server.store.index + 1) as events:
        index = await server.store.write({JOBS: [(job_key("default", "d"), job(ID="d"))]})
        await agent.sentinel()
        assert [(e["Key"], e["Index"]) for e in await events.events_until()] == [("d", index)]


async def test_heartbeats_while_idle(agent: Agent, heartbeat: Callable[[float], None]
                                     ) -> None:
    heartbeat(0.05)
    async with stream(agent, agent.management) as events:
        for _ in range(3):
            assert await events.line() == {}


@pytest.mark.parametrize(("query", "fragment"), [
    ("index=abc", "Unable to parse index"),
    ("index=-1", "Unable to parse index"),
    ("topic=Job:a:b", "Invalid topic query"),
    ("topic=Job:", "Invalid topic query"),
    ("topic=:web", "Invalid topic query"),
    ("topic=Jobs", "unknown topic 'Jobs'"),
])
async def test_bad_queries_are_400s(agent: Agent, query: str, fragment: str) -> None:
    status, text = await status_of(agent.url, agent.management, query)
    assert status == 400 and fragment in text, (status, text)


# ---- authorization ---------------------------------------------------------------------
async def test_a_token_sees_only_what_its_acl_allows(agent: Agent) -> None:
    await agent.policy("read-prod", READ_PROD)
    secret = (await agent.token("read-prod")).secret_id
    for query in ("topic=Node", "topic=ACLToken", "topic=Job&namespace=default",
                  "topic=Allocation"):
        assert await status_of(agent.url, secret, query) == (403, "Permission denied"), query
    assert (await status_of(agent.url, secret, "topic=Job&namespace=prod"))[0] == 200
    async with stream(agent, secret, namespace="*") as events:  # every topic
        await agent.server.register_node(node("n1"))  # no node read
        await agent.server.register_job(job())  # namespace default
        await agent.token("read-prod")  # ACL objects: management only
        await agent.server.register_job(job(ID="api", Namespace=PROD))
        first = await events.batch()
    assert {(e["Topic"], e["Namespace"]) for e in first["Events"]} == {("Job", PROD)}


async def test_a_workload_identity_sees_what_its_jobs_policy_allows(agent: Agent) -> None:
    mine, other = make_alloc(job_id="j"), make_alloc(job_id="k")
    await seed(agent.server, allocs=(mine, other))
    await agent.policy("j-reads", READ_DEFAULT, job_id="j")
    token = identity_token(agent.server.keyring, mine)
    async with stream(agent, token, f"Allocation:{mine.id}", sentinel=False) as events:
        await agent.server.update_allocs_from_client([
            AllocUpdate(other.id, "running", "other", {}),
            AllocUpdate(mine.id, "running", "mine", {})])
        batch = await events.batch()
    assert [(e["Key"], e["Type"]) for e in batch["Events"]] == [(mine.id, "AllocationUpdated")]


async def test_a_workload_identity_without_a_policy_gets_heartbeats_only(
        agent: Agent, heartbeat: Callable[[float], None]) -> None:
    heartbeat(0.05)
    mine, other = make_alloc(job_id="j"), make_alloc(job_id="k")
    await seed(agent.server, allocs=(mine, other))
    token = identity_token(agent.server.keyring, mine)
    assert await status_of(agent.url, token, f"topic=Allocation:{mine.id}") == (
        403, "Permission denied")
    async with stream(agent, token) as events:
        await agent.server.register_job(job())
        await agent.server.update_allocs_from_client([
            AllocUpdate(other.id, "complete", "", {})])
        await agent.server.register_node(node("n1"))
        # Its allocation stops: the identity is no longer valid, and the stream ends.
        await agent.server.update_allocs_from_client([AllocUpdate(mine.id, "complete", "", {})])
        lines = await events.rest()
    assert lines[-1] == {"Error": "ACL token not found"}
    assert set(map(json.dumps, lines[:-1])) <= {"{}"}


def registration(reg_id: str, namespace: str, alloc: str = "a1") -> dict[str, Any]:
    return {"ID": reg_id, "ServiceName": "web", "Namespace": namespace, "NodeID": "n1",
            "Datacenter": "dc1", "JobID": "shop", "AllocID": alloc, "Tags": [],
            "Address": "127.0.0.1", "Port": 8080}


async def test_a_workload_discovers_its_own_namespaces_services_without_a_policy(
        agent: Agent) -> None:
    mine = make_alloc(job_id="j")
    await seed(agent.server, allocs=(mine,))
    token = identity_token(agent.server.keyring, mine)
    assert await status_of(agent.url, token, f"topic=Service&namespace={PROD}") == (
        403, "Permission denied")
    async with stream(agent, token, "Service:web", sentinel=False) as events:
        await agent.server.store.write({SERVICES: [("in-prod", registration("in-prod", PROD))]})
        await agent.server.store.write({SERVICES: [("here", registration("here", "default"))]})
        await agent.server.store.write({}, {SERVICES: ["here"]})
        first, second = await events.batch(), await events.batch()
    assert [(e["Type"], e["Key"], e["FilterKeys"]) for e in first["Events"]] == [
        ("ServiceRegistration", "here", ["shop", "web"])]
    assert first["Events"][0]["Payload"]["Service"]["Port"] == 8080
    assert [(e["Type"], e["Key"]) for e in second["Events"]] == [
        ("ServiceDeregistration", "here")]
    async with stream(agent, token, namespace="*") as events:  # every topic, everywhere
        await agent.server.store.write({SERVICES: [("in-prod", registration("in-prod", PROD))],
                                        JOBS: [(job_key("default", "x"), job(ID="x"))]})
        await agent.server.store.write({SERVICES: [("here", registration("here", "default"))]})
        batch = await events.batch()
    assert [(e["Topic"], e["Key"]) for e in batch["Events"]] == [("Service", "here")]


async def test_a_deleted_token_or_a_revoked_policy_ends_the_stream(agent: Agent) -> None:
    await agent.policy("read-prod", READ_PROD)
    doomed = await agent.token("read-prod")
    async with stream(agent, doomed.secret_id, "Job", namespace=PROD,
                      sentinel=False) as events:
        await agent.server.acls.delete_token(doomed.accessor_id)
        assert await events.rest() == [{"Error": "ACL token not found"}]
    kept = await agent.token("read-prod")
    async with stream(agent, kept.secret_id, "Job", namespace=PROD,
                      sentinel=False) as events:
        await agent.server.acls.delete_policy("read-prod")
        assert await events.rest() == [{"Error": "Permission denied"}]


async def test_an_expiring_token_ends_the_stream_when_it_expires(agent: Agent) -> None:
    token = acl_token("client", expires=time.time() + 1)
    await seed(agent.server, tokens=(token,))
    async with stream(agent, token.secret_id) as events:  # idle: no event wakes it
        assert await events.rest() == [{"Error": "ACL token expired"}]
    assert token.expiration_time is not None and time.time_ns() >= token.expiration_time


async def test_no_secret_in_any_payload(agent: Agent) -> None:
    server = agent.server
    secrets = [agent.management, "node-secret"]
    async with stream(agent, agent.management, index=0) as events:  # every topic
        await server.register_node(node("n1", secret_id="node-secret"))
        await agent.policy("read-prod", READ_PROD)
        role = await server.acls.upsert_role(ACLRole(id="", name="r", policies=("read-prod",)))
        token = await agent.token("read-prod")
        secrets.append(token.secret_id)
        await server.acls.upsert_token(attrs.evolve(token, name="renamed"))
        await server.acls.delete_token(token.accessor_id)
        await server.acls.delete_role(role.id)
        await agent.sentinel()
        seen = await events.events_until()
    raw = b"".join(events.raw)
    for secret in secrets:
        assert secret.encode() not in raw
    tokens = [e for e in seen if e["Topic"] == "ACLToken"]
    assert [e["Type"] for e in tokens] == ["ACLTokenUpserted"] * 3 + ["ACLTokenDeleted"]
    assert all(e["Payload"]["ACLToken"]["SecretID"] == "" for e in tokens)
    assert {e["Type"] for e in seen if e["Topic"] in ("ACLPolicy", "ACLRole")} == {
        "ACLPolicyUpserted", "ACLRoleUpserted", "ACLRoleDeleted"}


# ---- subscriptions: slow, gone, shut down -----------------------------------------------
def _publish(broker: EventBroker, index: int, *keys: str) -> None:
    broker.publish(index, [Change(JOBS, job_key("default", k), None,
                                  job(ID=k) | {"ModifyIndex": index}) for k in keys])


async def test_broker_cuts_off_a_subscriber_more_than_its_ring_behind() -> None:
    broker = EventBroker(capacity=4)
    slow, keeping_up = broker.subscribe(), broker.subscribe()
    for index in range(1, 5):
        _publish(broker, index, f"j{index}")
        assert (await keeping_up.next(0)) is not None
    assert slow.closed is None and broker.retained == 4
    _publish(broker, 5, "j5")  # drops batch 1, which the slow one has not read
    assert slow.closed == LAGGING and broker.subscriptions == 1
    with pytest.raises(SubscriptionClosed, match="client should resubscribe"):
        await slow.next(0)
    assert (await keeping_up.next(0)) is not None  # the one keeping up reads on
    _publish(broker, 6, *(f"big{i}" for i in range(10)))  # a batch larger than the ring
    assert broker.retained == 10 and keeping_up.closed is None
    assert len((await keeping_up.next(0) or pytest.fail("no batch")).events) == 10


async def test_a_client_that_stops_reading_is_cut_off(agent: Agent) -> None:
    capacity = 32
    broker = agent.server.events = EventBroker(capacity=capacity)
    agent.server.store.observe(broker.publish)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, agent.api.tcp)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET /v1/event/stream?topic=Job HTTP/1.1\r\nHost: x\r\n"
                     f"X-Nomad-Token: {agent.management}\r\n\r\n".encode())
        await reader.readuntil(b"{}\n")  # subscribed; from here on the client reads nothing
        padding = "x" * 64 * 1024
        for n in range(5000):
            await agent.server.store.write({JOBS: [(job_key("default", f"j{n}"),
                                                    job(ID=f"j{n}", Meta={"pad": padding}))]})
            assert broker.retained <= capacity
            if broker.subscriptions == 0:
                break
            await asyncio.sleep(0)  # the stream takes each batch and writes it, until stuck
        assert broker.subscriptions == 0, "the slow subscriber was never cut off"
        with contextlib.suppress(ConnectionError):  # its connection ends
            while await asyncio.wait_for(reader.read(1 << 20), 10):
                pass
    finally:
        writer.close()


async def test_a_client_that_hangs_up_frees_its_subscription_at_once(
        agent: Agent, heartbeat: Callable[[float], None]) -> None:
    heartbeat(3600)  # no write will find out: the connection's loss must
    async with stream(agent, agent.management):
        assert agent.server.events.subscriptions == 1
    await wait_until(lambda: agent.server.events.subscriptions == 0, "subscription freed",
                     timeout=5)


async def test_shutdown_ends_every_stream(agent: Agent) -> None:
    async with stream(agent, agent.management) as first, \
            stream(agent, agent.management, "Job") as second:
        await agent.server.close()
        for opened in (first, second):
            assert await opened.rest() == [{"Error": SHUTTING_DOWN}]
    assert agent.server.events.subscriptions == 0
    assert await status_of(agent.url, agent.management, "") == (503, SHUTTING_DOWN)


# ---- the API client ---------------------------------------------------------------------
async def test_api_client_streams_batches_and_reports_the_end(agent: Agent) -> None:
    token = await agent.token("nothing")
    async with ApiClient(agent.url, agent.management) as client:
        batches = client.event_stream(["Job:web"], namespace="default")
        first = asyncio.ensure_future(anext(batches))
        await wait_until(lambda: agent.server.events.subscriptions == 1, "subscribed")
        await agent.server.register_job(job())
        batch = await asyncio.wait_for(first, 10)
        assert [(e["Topic"], e["Key"]) for e in batch["Events"]] == [("Job", "web")]
        await batches.aclose()
    await wait_until(lambda: agent.server.events.subscriptions == 0, "unsubscribed")
    async with ApiClient(agent.url, token.secret_id) as client:
        ending = client.event_stream()
        nothing = asyncio.ensure_future(anext(ending))
        await wait_until(lambda: agent.server.events.subscriptions == 1, "subscribed")
        await agent.server.acls.delete_token(token.accessor_id)
        with pytest.raises(EventStreamClosed, match="ACL token not found"):
            await asyncio.wait_for(nothing, 10)
