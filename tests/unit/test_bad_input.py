"""Bad input is a 4xx with a plain reason, never a 5xx.

Property-based: hypothesis throws random header bytes, tokens, paths, query strings and bodies
at every route the router has, over raw sockets (so header bytes that are not UTF-8 reach the
agent exactly as sent), with and without a valid credential, with ACLs off and on. The agent
is real: server, client, router, endpoints and listeners (a TCP port and a Task API socket),
running on an event loop in a thread of its own so that each example can run synchronously.
Routes come from the router's own table, so a new endpoint is covered once it is registered.

Also here: names are checked whole (a trailing newline is not a valid name).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomad_client.client.allocdir import AllocDir
from nomad_client.http.endpoints.client import log_file_names
from nomad_client.http.router import Route, Router
from nomad_client.jobspec import JobspecError, JobValidationError, canonicalize_job, parse_jobspec
from nomad_client.server.keyring import Keyring
from tests.unit.factories import (
    InProcessAgent,
    acl_token,
    fresh_dir,
    identity_token,
    make_alloc,
    seed,
    start_agent,
)

T = TypeVar("T")
REPLY_TIMEOUT = 20.0  # generous: a loaded CI machine; a normal reply takes milliseconds
EXTRA_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
# Headers that frame the request: fuzzing them tests aiohttp's parser, not our code, and a
# Content-Length that disagrees with the body would just make the agent wait for more.
FRAMING_HEADERS = {"content-length", "transfer-encoding", "connection", "expect", "host",
                   "upgrade", "te", "keep-alive"}
# ``index`` makes list endpoints block for up to ``wait``; only these waits are sent (an
# unparsable one is a 400, any valid one is short).
WAITS = ("1ms", "20ms", "x", "1", "-", "5q", "%ff")
QUERY_KEYS = ("pretty", "prefix", "path", "task", "type", "plain", "follow", "node_id",
              "purge", "filter", "namespace", "offset", "origin", "resources")


class LoopThread:
    """An event loop running in its own thread; ``run`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="agent-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@attrs.define(repr=False)
class LiveAgent:
    """One in-process agent: addresses to send to and credentials to send."""

    acl: bool
    agent: InProcessAgent
    tcp: tuple[str, int]
    task_sock: str
    workload_token: str
    management_token: str
    routes: list[Route]
    plausible: dict[str, list[str]]

    def __repr__(self) -> str:  # hypothesis prints it with every failing example
        return f"<agent acl={self.acl}>"

    async def stop(self) -> None:
        await self.agent.stop()


def registered_routes(router: Router) -> list[Route]:
    """Every route in the router's table (static and parameterized)."""
    routes = [r for group in router._static.values() for r in group] + list(router._dynamic)
    assert len(routes) > 10, "the router's route table was not found"
    return routes


async def live_agent(base: Path, keyring: Keyring, *, acl: bool) -> LiveAgent:
    agent = await start_agent(base, keyring, acl=acl, task_sock=base / "api.sock",
                              node_name="fuzz", static_meta={"rack": "r1"})
    assert agent.client is not None
    # A running allocation on another node (so this client runs nothing) and a management
    # token: the credentials a fuzzed request may carry. Fuzzed paths name a second one: a
    # request may stop it (/v1/allocation/:id/stop), which must not end the credential.
    alloc, mgmt = make_alloc(node_id="elsewhere", node_name="elsewhere"), acl_token()
    target = make_alloc(node_id="elsewhere", node_name="elsewhere")
    await seed(agent.server, tokens=(mgmt,), allocs=(alloc, target))
    plausible = {"alloc_id": [target.id, str(uuid.uuid4())], "job_id": ["j", "x"],
                 "node_id": [agent.client.node_id, str(uuid.uuid4())],
                 "eval_id": [str(uuid.uuid4())]}
    return LiveAgent(acl, agent, agent.api.tcp, str(base / "api.sock"),
                     identity_token(keyring, alloc), mgmt.secret_id,
                     registered_routes(agent.api.router), plausible)


@pytest.fixture(scope="module")
def agents() -> Iterator[dict[bool, LiveAgent]]:
    with fresh_dir("bad-input-") as base:
        runner = LoopThread()
        started: dict[bool, LiveAgent] = {}
        try:
            # Not the session's keyring: a fuzzed PUT /v1/operator/keyring/rotate rotates it.
            keyring = runner.run(Keyring.load_or_create(base / "keyring"))
            for acl in (False, True):
                started[acl] = runner.run(live_agent(base / f"acl-{acl}", keyring, acl=acl))
            yield started
        finally:
            for agent in started.values():
                runner.run(agent.stop())
            runner.close()


# ---- raw HTTP --------------------------------------------------------------------------
def exchange(agent: LiveAgent, over_task_socket: bool, request: bytes) -> bytes:
    """Send ``request`` on a new connection; return the reply's head (status line and
    headers), or what came before the agent closed."""
    if over_task_socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = agent.task_sock
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = agent.tcp
    sock.settimeout(REPLY_TIMEOUT)
    received = b""
    with sock:
        sock.connect(address)
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole request was read: the reply may still be there
        try:
            while b"\r\n\r\n" not in received or received.startswith(b"HTTP/1.1 100"):
                if received.startswith(b"HTTP/1.1 100") and b"\r\n\r\n" in received:
                    received = received.split(b"\r\n\r\n", 1)[1]  # skip "100 Continue"
                    continue
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
    return received


def reply_status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1."), f"no HTTP reply: {reply[:200]!r}"
    return int(reply.split(b" ", 2)[1])


def raw_request(method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes) -> bytes:
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: localhost",
            b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
    head += [name + b": " + value for name, value in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# ---- strategies ----------------------------------------------------------------------
# Header values: any bytes but CR and LF (which would end the header, not fill it), often
# bytes that are not ASCII (and so mostly not UTF-8 either).
header_bytes = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1, max_size=64).map(lambda b: bytes(x | 0x80 for x in b)),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
header_name = st.one_of(
    st.sampled_from([b"X-Nomad-Token", b"Authorization", b"Content-Type", b"Accept",
                     b"Cookie", b"X-Forwarded-For", b"Accept-Encoding", b"Origin"]),
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~",
            min_size=1, max_size=20).map(str.encode),
    st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"\r", b"x").replace(b"\n", b"x")
                                           .replace(b":", b"x")),
).filter(lambda name: name.strip().lower() not in {n.encode() for n in FRAMING_HEADERS})

# Strings with anything in them, lone surrogates too (json.dumps escapes them as \udXXX),
# and often the awkward characters themselves.
any_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.lists(st.sampled_from(["\ud800", "\udfff", "\ud83d\ude00", "a", "\u00e9", "\x00",
                              "\n", "\\", '"']), max_size=6).map("".join))
meta_keys = st.one_of(st.sampled_from(["a", "rack", "x.y", "k_1", "key\n"]),
                      st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,10}", fullmatch=True), any_text)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=20)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([63, 64, 65, 100, 900, 1000, 1100, 5000, 50_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")]))
    inner = draw(st.sampled_from([b"1", b'"x"', b"[]", b'"\\ud800"']))
    nested = opener * depth + inner + closer * depth
    wrapper = draw(st.sampled_from([b"%s", b'{"Meta": %s}', b'{"Job": %s}', b'{"Meta": {"k": %s}}',
                                    b'{"JobHCL": "job \\"x\\" {}", "Variables": %s}']))
    return wrapper.replace(b"%s", nested)


@st.composite
def shaped_bodies(draw: st.DrawFn) -> bytes:
    """Bodies shaped like the endpoints' own, with random contents."""
    meta = st.dictionaries(meta_keys, st.one_of(st.none(), any_text, json_values), max_size=4)
    job = st.dictionaries(st.sampled_from(["ID", "Name", "Type", "TaskGroups", "Datacenters",
                                           "Priority", "Meta", "Constraints"]) | any_text,
                          json_values, max_size=6)
    hcl = st.one_of(any_text, st.sampled_from([
        'job "x" { group "g" { task "t" { driver = "raw_exec" } } }',
        'job "x" { meta { a = "${' + "(" * 300 + "1" + ")" * 300 + '}" } }',
        'variable "v\\n" { default = 1 }\njob "x" {}',
        'job "x" {' + 'group "g" {' * 60 + "}" * 61]))
    shape = draw(st.sampled_from(["meta", "job", "parse"]))
    if shape == "meta":
        body: Any = {"Meta": draw(meta)}
        if draw(st.booleans()):
            body["NodeID"] = draw(json_values)
    elif shape == "job":
        body = {"Job": draw(job)}
    else:
        body = {"JobHCL": draw(hcl), "Canonicalize": draw(st.booleans())}
    return json.dumps(body).encode()


bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=256),
    json_values.map(lambda v: json.dumps(v).encode()),
    deeply_nested(),
    shaped_bodies(),
)


@st.composite
def url_piece(draw: st.DrawFn, plausible: list[str]) -> bytes:
    """A path segment or query value: plausible, percent-encoded random text or bytes, or
    raw bytes (which the HTTP parser may refuse)."""
    kind = draw(st.sampled_from(["plausible", "text", "bytes", "raw"]))
    if kind == "plausible" and plausible:
        return draw(st.sampled_from(plausible)).encode()
    if kind == "text":
        return quote(draw(any_text).encode("utf-8", "surrogatepass"), safe="").encode()
    if kind == "bytes":
        return quote(draw(st.binary(max_size=24)), safe="").encode()
    raw = draw(st.binary(min_size=1, max_size=12))
    return bytes(b for b in raw if b not in b" \r\n?#/") or b"x"


@st.composite
def targets(draw: st.DrawFn, agent: LiveAgent) -> tuple[str, bytes]:
    """A method and request target for one of the router's routes."""
    route = draw(st.sampled_from(agent.routes))
    method = draw(st.sampled_from(sorted(route.methods)) | st.sampled_from(EXTRA_METHODS))
    parts = []
    for segment in route.segments:
        if segment.startswith("{"):
            name = segment.strip("{}*")
            parts.append(draw(url_piece(agent.plausible.get(name, []))))
        else:
            parts.append(segment.encode())
    target = b"/" + b"/".join(parts)
    query: list[bytes] = []
    if draw(st.booleans()):
        for key in draw(st.lists(st.sampled_from(QUERY_KEYS), max_size=3)):
            query.append(key.encode() + b"=" + draw(url_piece([])))
        if draw(st.booleans()):
            index = draw(st.sampled_from(["1", "999999", "-1", "abc", "1e3", "9" * 40]))
            query.append(b"index=" + index.encode() + b"&wait=" + draw(
                st.sampled_from(WAITS)).encode())
    if query:
        target += b"?" + b"&".join(query)
    return method, target


def plausible_target(agent: LiveAgent, route: Route) -> bytes:
    return ("/" + "/".join(agent.plausible.get(s.strip("{}*"), ["x"])[0]
                           if s.startswith("{") else s for s in route.segments)).encode()


@st.composite
def credentials(draw: st.DrawFn, agent: LiveAgent) -> list[tuple[bytes, bytes]]:
    kind = draw(st.sampled_from(["none", "workload", "management", "token-bytes",
                                 "bearer-bytes", "jwt-bytes", "both"]))
    junk = draw(header_bytes)
    if kind == "workload":
        name = draw(st.sampled_from([b"X-Nomad-Token", b"Authorization"]))
        prefix = b"Bearer " if name == b"Authorization" else b""
        return [(name, prefix + agent.workload_token.encode())]
    if kind == "management":
        return [(b"X-Nomad-Token", agent.management_token.encode())]
    if kind == "token-bytes":
        return [(b"X-Nomad-Token", junk)]
    if kind == "bearer-bytes":
        return [(b"Authorization", b"Bearer " + junk)]
    if kind == "jwt-bytes":
        return [(b"X-Nomad-Token", b"eyJ" + junk)]
    if kind == "both":
        return [(b"X-Nomad-Token", junk), (b"Authorization", b"Bearer " + junk)]
    return []


@st.composite
def requests(draw: st.DrawFn, agents: dict[bool, LiveAgent]) -> tuple[LiveAgent, bool, bytes]:
    agent = agents[draw(st.booleans())]
    method, target = draw(targets(agent))
    headers = draw(credentials(agent))
    headers += draw(st.lists(st.tuples(header_name, header_bytes), max_size=3))
    if draw(st.booleans()):
        headers.append((b"Content-Type", b"application/json"))
    body = draw(bodies)
    return agent, draw(st.booleans()), raw_request(method, target, headers, body)


# ---- the property -----------------------------------------------------------------------
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_not_5xx(agent: LiveAgent, over_task_socket: bool, request: bytes) -> None:
    reply = exchange(agent, over_task_socket, request)
    status = reply_status(reply)
    assert status < 500, (f"{status} for {request[:300]!r}"
                          f"{' (Task API)' if over_task_socket else ''}: {reply[:300]!r}")


@FUZZ
@given(data=st.data())
def test_no_request_to_any_route_gets_a_5xx(agents: dict[bool, LiveAgent],
                                             data: st.DataObject) -> None:
    assert_not_5xx(*data.draw(requests(agents)))


@FUZZ
@given(data=st.data())
def test_no_header_bytes_or_token_get_a_5xx(agents: dict[bool, LiveAgent],
                                            data: st.DataObject) -> None:
    # A well-formed request line to a real route, so every example reaches authentication.
    agent = agents[data.draw(st.booleans(), label="acl")]
    route = data.draw(st.sampled_from(agent.routes), label="route")
    method = data.draw(st.sampled_from(sorted(route.methods)), label="method")
    headers = data.draw(credentials(agent), label="credential")
    headers += data.draw(st.lists(st.tuples(header_name, header_bytes), max_size=3),
                         label="more headers")
    request = raw_request(method, plausible_target(agent, route), headers, b"")
    assert_not_5xx(agent, data.draw(st.booleans(), label="task socket"), request)


@FUZZ
@given(data=st.data())
def test_no_body_gets_a_5xx_from_the_endpoints_that_read_one(agents: dict[bool, LiveAgent],
                                                             data: st.DataObject) -> None:
    # Past authentication and routing, so every example reaches a body-reading handler.
    agent = agents[data.draw(st.booleans(), label="acl")]
    route = data.draw(st.sampled_from([r for r in agent.routes if r.methods & {"POST", "PUT"}]))
    method = data.draw(st.sampled_from(sorted(route.methods & {"POST", "PUT"})))
    token = agent.management_token if agent.acl else agent.workload_token
    request = raw_request(method, plausible_target(agent, route),
                          [(b"X-Nomad-Token", token.encode())], data.draw(bodies, label="body"))
    assert_not_5xx(agent, data.draw(st.booleans(), label="task socket"), request)


def test_the_fuzz_reaches_handlers(agents: dict[bool, LiveAgent]) -> None:
    # Guards the property above against passing vacuously (every request refused early).
    agent = agents[False]
    body = json.dumps({"Meta": {"fuzz_check": "1"}}).encode()
    request = raw_request("POST", b"/v1/client/metadata",
                          [(b"X-Nomad-Token", agent.workload_token.encode())], body)
    assert reply_status(exchange(agent, True, request)) == 200


# ---- names are checked whole: a trailing newline is not part of a valid name ------------
def test_variable_name_with_trailing_newline_is_refused() -> None:
    with pytest.raises(JobspecError, match="invalid variable name"):
        parse_jobspec('variable "v\\n" {\n  default = 1\n}\njob "x" {}\n', "<test>")


def test_identity_name_with_trailing_newline_is_refused() -> None:
    job = {"ID": "x", "Name": "x", "Type": "batch", "Datacenters": ["dc1"],
           "TaskGroups": [{"Name": "g", "Tasks": [{
               "Name": "t", "Driver": "mock_driver", "Config": {},
               "Identities": [{"Name": "vault\n", "Audience": ["a"]}]}]}]}
    with pytest.raises(JobValidationError, match="invalid identity name"):
        canonicalize_job(job)
    job["TaskGroups"][0]["Tasks"][0]["Identities"][0]["Name"] = "vault"
    canonicalize_job(job)  # the same job with a good name is fine


def test_log_file_names_must_match_whole(tmp_path: Path) -> None:
    adir = AllocDir(tmp_path / "alloc", str(uuid.uuid4()))
    adir.build()
    logs = adir.path / "alloc" / "logs"
    for name in ("web.stdout.0", "web.stdout.1\n", "web.stdout.\u0663", "web.stdout.2"):
        (logs / name).write_text("x")
    assert log_file_names(adir, "web", "stdout") == ["web.stdout.0", "web.stdout.2"]

