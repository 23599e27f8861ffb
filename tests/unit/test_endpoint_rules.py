"""Endpoint rules for the Task API (``allowed_endpoints`` / ``denied_endpoints``): parsing,
glob matching, the refusal texts, and — through a real task socket — that no other spelling
of a request (slashes, percent-escapes, dot segments, trailing slashes, case, HEAD, query
strings, fragments, absolute form) reaches a handler a rule refuses."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nomad_client.client.taskapi_config import RateLimitConfig, TaskAPIConfig
from nomad_client.http.endpoint_rules import (
    EndpointRules,
    _glob_match,
    parse_endpoint_rule,
)
from nomad_client.http.router import ApiRequest
from nomad_client.server.keyring import Keyring
from tests.unit.factories import TaskAPIStack, raw_exchange, request_bytes, task_api_stack


# ---- parsing ---------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "methods", "pieces"), [
    ("GET /v1/agent/health", {"GET", "HEAD"}, ("/v1/agent/health",)),
    ("get /v1/agent/health", {"GET", "HEAD"}, ("/v1/agent/health",)),
    ("HEAD /v1/x", {"HEAD"}, ("/v1/x",)),
    ("PUT /v1/client/metadata", {"PUT"}, ("/v1/client/metadata",)),
    ("* /v1/var/*", None, ("/v1/var/", "")),
    ("  DELETE   /v1/job/*/x  ", {"DELETE"}, ("/v1/job/", "/x")),
    ("POST /v1/var/", {"POST"}, ("/v1/var/",)),
    ("OPTIONS /", {"OPTIONS"}, ("/",)),
    ("PATCH /*", {"PATCH"}, ("/", "")),
    ("GET /a**b", {"GET", "HEAD"}, ("/a", "", "b")),
])
def test_good_rules(text: str, methods: set[str] | None, pieces: tuple[str, ...]) -> None:
    rule = parse_endpoint_rule(text)
    assert rule.text == text
    assert rule.methods == (None if methods is None else frozenset(methods))
    assert rule.pieces == pieces


@pytest.mark.parametrize(("text", "reason"), [
    ("", 'must be "METHOD /path"'),
    ("GET", 'must be "METHOD /path"'),
    ("/v1/agent/health", 'must be "METHOD /path"'),
    ("GET /v1/a /v1/b", 'must be "METHOD /path"'),
    ("GTE /v1/agent/health", "unknown method 'GTE'"),
    ("CONNECT /v1/x", "unknown method"),
    ("** /v1/x", "unknown method"),
    ("GET v1/agent/health", "must start with /"),
    ("GET */v1", "must start with /"),
    ("GET /v1/jobs?namespace=x", "a query string"),
    ("GET /v1/jobs#x", "a fragment"),
    ("GET /v1/var/a%2Fb", "percent-escape"),
    ("GET /v1/\x00x", "control character"),
    ("GET /v1/\x7fx", "control character"),
])
def test_bad_rules_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("?", r"\?").replace("*", r"\*")):
        parse_endpoint_rule(text)


def test_a_rule_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_endpoint_rule(42)  # type: ignore[arg-type]


# ---- matching ----------------------------------------------------------------------------
@pytest.mark.parametrize(("glob", "path", "matches"), [
    ("/v1/agent/health", "/v1/agent/health", True),
    ("/v1/agent/health", "/v1/agent/health/", False),
    ("/v1/agent/health", "/v1/agent/healthz", False),
    ("/v1/agent/health", "/V1/agent/health", False),
    ("/v1/var/*", "/v1/var/", True),
    ("/v1/var/*", "/v1/var/a", True),
    ("/v1/var/*", "/v1/var/a/b/c", True),  # * crosses "/"
    ("/v1/var/*", "/v1/var", False),
    ("/v1/var/*", "/v1/vars", False),
    ("/v1/*/health", "/v1/agent/health", True),
    ("/v1/*/health", "/v1/a/b/health", True),
    ("/v1/*/health", "/v1/health", False),
    ("/v1/*/health", "/v1//health", True),
    ("*", "", True),
    ("/*", "/", True),
    ("/a*b*c", "/abc", True),
    ("/a*b*c", "/aXbYc", True),
    ("/a*b*c", "/acb", False),
    ("/a*bc*bc", "/abcbc", True),
    ("/a*bc*bc", "/abc", False),  # the pieces may not overlap
    ("/ab*ba", "/aba", False),
    ("/ab*ba", "/abba", True),
    ("/x*x*x*x*y", "/" + "x" * 5000, False),  # linear: finds, never backtracks
])
def test_glob_match(glob: str, path: str, matches: bool) -> None:
    assert _glob_match(tuple(glob.split("*")), path) is matches


@pytest.mark.parametrize(("method", "rule", "matches"), [
    ("GET", "GET /x", True),
    ("HEAD", "GET /x", True),  # a GET rule covers the bodiless GET
    ("GET", "HEAD /x", False),
    ("POST", "GET /x", False),
    ("PUT", "* /x", True),
    ("DELETE", "delete /x", True),
    ("get", "GET /x", False),  # methods are case-sensitive on the wire
])
def test_method_match(method: str, rule: str, matches: bool) -> None:
    assert parse_endpoint_rule(rule).matches(method, "/x") is matches


def test_denied_wins_and_allowed_must_match() -> None:
    rules = EndpointRules(allowed=["* /v1/var/*", "GET /v1/agent/health"],
                          denied=["PUT /v1/var/nomad/*"])
    assert rules.refusal("GET", "/v1/agent/health") is None
    assert rules.refusal("GET", "/v1/var/nomad/x") is None
    assert rules.refusal("PUT", "/v1/var/nomad/x") == (
        'Permission denied: "PUT /v1/var/nomad/*" is in client.task_api.denied_endpoints')
    assert rules.refusal("GET", "/v1/jobs") == (
        'Permission denied: "GET /v1/jobs" matches no rule of '
        "client.task_api.allowed_endpoints")
    assert EndpointRules(denied=["GET /x"]).refusal("GET", "/y") is None  # no allow-list
    assert not EndpointRules()


def test_first_matching_denied_rule_is_named() -> None:
    rules = EndpointRules(denied=["GET /v1/*", "* /v1/agent/health", "GET /v1/agent/health"])
    # Exact paths are looked up before globs, each kind in the order written.
    assert rules.refusal("GET", "/v1/agent/health") == (
        'Permission denied: "* /v1/agent/health" is in client.task_api.denied_endpoints')
    assert '"GET /v1/*"' in (rules.refusal("GET", "/v1/other") or "")


def test_a_refused_path_is_echoed_short_and_without_tokens() -> None:
    rules = EndpointRules(allowed=["GET /v1/agent/health"])
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    reason = rules.refusal("GET", f"/v1/{jwt}/" + "x" * 1000) or ""
    assert jwt not in reason and "<redacted>" in reason
    assert len(reason) < 300


# ---- through a real task socket --------------------------------------------------------
PROBES = {  # route pattern -> methods; each answers which route it is and its parameters
    "/v1/probe/static": ("GET", "PUT"),
    "/v1/probe/item/{name}": ("GET", "PUT", "DELETE"),
    "/v1/probe/rest/{rest*}": ("GET",),
}


@pytest.fixture
async def stack(workdir: Path, keyring: Keyring) -> AsyncIterator[TaskAPIStack]:
    # Hundreds of requests in a row: no rate limit, so every one reaches the rules.
    served = await task_api_stack(workdir, keyring, TaskAPIConfig(
        rate_limit=RateLimitConfig(requests_per_second=0)))
    for pattern, methods in PROBES.items():
        async def probe(req: ApiRequest, pattern: str = pattern) -> dict[str, Any]:
            return {"route": pattern, "params": req.params}

        served.agent.api.router.add(methods, pattern, probe)
    yield served
    await served.stop()


def reached(answer: Any) -> tuple[str, str] | None:
    """Which probe and parameters an answer came from (None: no probe answered)."""
    if answer.status != 200:
        return None
    body = json.loads(answer.body)
    return body["route"], json.dumps(body["params"], sort_keys=True)


def spellings(path: str) -> Iterator[str]:
    """Request targets an attacker might try for ``path``."""
    segments = path.strip("/").split("/")

    def join(parts: list[str]) -> str:
        return "/" + "/".join(parts)

    bases = {path, "/" + path, path + "/", "//" + path.lstrip("/") + "//", path + "%2F",
             path.upper(), "http://localhost" + path}
    for i in range(1, len(segments)):
        head, tail = join(segments[:i]), "/".join(segments[i:])
        bases |= {f"{head}//{tail}", f"{head}/./{tail}", f"{head}/x/../{tail}",
                  f"{head}%2F{tail}", f"{head}%2f{tail}", f"{head}/%2e/{tail}",
                  f"{head}/x/%2e%2e/{tail}"}
    for i, segment in enumerate(segments):
        encoded = "".join(f"%{b:02X}" for b in segment.encode())
        bases |= {join(segments[:i] + [encoded] + segments[i + 1:]),
                  join(segments[:i] + [segment.upper()] + segments[i + 1:])}
    for base, suffix in itertools.product(sorted(bases), ("", "?", "?a=b", "#f", "?a=/x#f")):
        yield base + suffix


CANONICAL = [("GET", "/v1/probe/static"), ("PUT", "/v1/probe/item/secret"),
             ("GET", "/v1/probe/rest/a/b")]


async def outcomes(stack: TaskAPIStack, method: str, path: str
                   ) -> dict[tuple[str, str], Any]:
    """The answer to every spelling of ``method path`` (GET also as HEAD)."""
    methods = (method, "HEAD") if method == "GET" else (method,)
    return {(m, target): await raw_exchange(stack.sock, request_bytes(m, target, stack.token))
            for m in methods for target in spellings(path)}


@pytest.mark.parametrize(("method", "path"), CANONICAL)
async def test_no_spelling_reaches_a_denied_endpoint(stack: TaskAPIStack, method: str,
                                                     path: str) -> None:
    target = reached(await raw_exchange(stack.sock, request_bytes(method, path, stack.token)))
    assert target is not None  # the canonical request reaches its probe
    free = await outcomes(stack, method, path)
    same = [key for key, answer in free.items() if reached(answer) == target]
    assert len(same) > 5  # many spellings do reach it: the table tests something
    rule = f"{method} {path}"
    await stack.configure(denied_endpoints=(rule,))
    for key, answer in (await outcomes(stack, method, path)).items():
        if key in same:
            assert answer.status == 403, (key, answer)
            assert answer.body == (f'Permission denied: "{rule}" is in '
                                   "client.task_api.denied_endpoints"), (key, answer)
        assert reached(answer) != target, (key, answer)


@pytest.mark.parametrize(("method", "path"), CANONICAL)
async def test_no_spelling_reaches_past_an_allow_list(stack: TaskAPIStack, method: str,
                                                      path: str) -> None:
    await stack.configure(allowed_endpoints=("PUT /v1/probe/item/ok",))
    for key, answer in (await outcomes(stack, method, path)).items():
        assert reached(answer) is None, (key, answer)
        if answer.status == 403 and key[0] != "HEAD":  # a HEAD answer has no body
            assert "client.task_api.allowed_endpoints" in answer.body, (key, answer)
    # ... while the allowed endpoint itself works.
    allowed = await raw_exchange(stack.sock, request_bytes("PUT", "/v1/probe/item/ok",
                                                           stack.token))
    assert reached(allowed) == ("/v1/probe/item/{name}", '{"name": "ok"}')


@pytest.mark.parametrize(("rule", "method", "target", "refused"), [
    # Real endpoints, written as operators would.
    ("GET /v1/agent/self", "GET", "/v1/agent/self", True),
    ("GET /v1/agent/self", "GET", "/v1/agent/self?pretty=1", True),
    ("GET /v1/agent/self", "GET", "/v1/agent/%73elf", True),
    ("GET /v1/agent/self", "GET", "/v1/agent/health", False),
    ("POST /v1/client/metadata", "POST", "/v1/client/metadata", True),
    ("POST /v1/client/metadata", "GET", "/v1/client/metadata", False),
    ("GET /v1/job/*", "GET", "//v1/job/x", True),
    ("GET /v1/job/*", "GET", "/v1/job/x/", True),
    ("GET /v1/job/*", "GET", "/v1/job/x%2F", True),
    ("GET /v1/job/*", "GET", "/v1/jobs", False),
    ("* /v1/var/*", "GET", "/v1/var/nomad/jobs/j", True),
    ("* /v1/var/*", "DELETE", "/v1/var/", True),
    ("* /v1/var/*", "GET", "/v1/vars", False),
    # A child job's ID holds "/", sent as %2F: rules see the decoded path.
    ("GET /v1/job/p/dispatch-1-ab", "GET", "/v1/job/p%2Fdispatch-1-ab", True),
    ("GET /v1/job/p/*", "GET", "/v1/job/p%2fdispatch-1-ab/allocations", True),
    ("POST /v1/job/*/dispatch", "POST", "/v1/job/p%2Fx/dispatch", True),
    ("GET /v1/job/p", "GET", "/v1/job/p%2Fx", False),
    # Unknown paths are refused by rules too (authentication first, then rules, then 404).
    ("* /nowhere*", "GET", "/nowhere/at/all", True),
])
async def test_denied_rules_on_real_endpoints(stack: TaskAPIStack, rule: str, method: str,
                                              target: str, refused: bool) -> None:
    await stack.configure(denied_endpoints=(rule,))
    answer = await raw_exchange(stack.sock, request_bytes(method, target, stack.token))
    denial = f'Permission denied: "{rule}" is in client.task_api.denied_endpoints'
    if refused:
        assert (answer.status, answer.body) == (403, denial), answer
    else:
        assert answer.status != 403, answer  # the handler's own answer, whatever it is


async def test_a_slash_escaped_in_a_segment_stays_in_its_parameter(stack: TaskAPIStack
                                                                   ) -> None:
    async def reach(method: str, target: str) -> tuple[str, str] | None:
        return reached(await raw_exchange(stack.sock,
                                          request_bytes(method, target, stack.token)))

    # One segment, whose parameter holds the "/" (and a literal "%" escaped as %25).
    assert await reach("PUT", "/v1/probe/item/a%2Fb") == ("/v1/probe/item/{name}",
                                                          '{"name": "a/b"}')
    assert await reach("PUT", "/v1/probe/item/a%252Fb") == ("/v1/probe/item/{name}",
                                                            '{"name": "a%2Fb"}')
    assert await reach("GET", "/v1/probe/rest/a%2Fb/c") == ("/v1/probe/rest/{rest*}",
                                                            '{"rest": "a/b/c"}')
    # Unescaped, the same text is two segments: no route of one.
    assert await reach("PUT", "/v1/probe/item/a/b") is None
    # A rule on the decoded path refuses both spellings.
    rule = "PUT /v1/probe/item/a/b"
    await stack.configure(denied_endpoints=(rule,))
    for target in ("/v1/probe/item/a%2Fb", "/v1/probe/item/a%2fb", "/v1/probe/item/a/b"):
        answer = await raw_exchange(stack.sock, request_bytes("PUT", target, stack.token))
        assert (answer.status, answer.body) == (
            403, f'Permission denied: "{rule}" is in client.task_api.denied_endpoints'), target


async def test_an_allow_list_refuses_unknown_paths_and_names_the_request(
        stack: TaskAPIStack) -> None:
    await stack.configure(allowed_endpoints=("GET /v1/agent/health", "* /v1/var/*"))
    assert (await stack.call("GET", "/v1/agent/health")).status == 200
    answer = await stack.call("GET", "/v1/no/such/path?x=1")
    assert (answer.status, answer.body) == (
        403, 'Permission denied: "GET /v1/no/such/path" matches no rule of '
             "client.task_api.allowed_endpoints")
    # Authentication still comes first: no token is 401, whatever the rules say.
    assert (await stack.call("GET", "/v1/no/such/path", token="")).status == 401
