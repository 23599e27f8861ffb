"""The one in-process HTTP router. Every listener (the TCP address, each task's socket) calls
``Router.dispatch(request, listener_context)``; no endpoint exists twice.

Dispatch order: authenticate (Task API: before routing, so even unknown paths need a
credential) -> the listener's ``RequestScreen`` if it has one (the Task API's endpoint rules
and identity binding, on the path as routed, so unknown paths are screened too) -> match
route (404 / 405) -> authorize the route's ``Need`` -> call the handler -> encode. Handlers
return a JSON-able value, a ``Reply`` (value + index headers) or a ready
``web.StreamResponse``; they raise ``HTTPError`` for anything the caller got wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, Protocol
from urllib.parse import unquote

import attrs
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiMapping

from nomad_client.http.auth import (
    CredentialPending,
    CredentialSource,
    Need,
    authenticate,
    authenticate_settled,
    authorize,
    resolve,
)
from nomad_client.http.context import UNRESOLVED, Identity, ListenerContext
from nomad_client.http.errors import HTTPError
from nomad_client.http.jsonbody import BadJSONBody, decode_json_body

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
BODY_READ_TIMEOUT = 10.0
# After refusing a body the client is still sending: how long and how much of the rest to
# read and discard before closing (see refuse_body).
LINGER_TIME = 2.0
LINGER_MAX_BYTES = 2 * MAX_BODY_BYTES


@attrs.frozen
class Reply:
    body: Any
    index: int | None = None
    status: int = 200


class ApiRequest(NamedTuple):
    """What a handler gets: the raw request, the listener it came through, the caller and
    the path parameters. A NamedTuple: immutable and cheap on the hot path."""

    raw: web.BaseRequest
    ctx: ListenerContext
    identity: Identity
    params: dict[str, str]

    @property
    def method(self) -> str:
        return self.raw.method

    @property
    def query(self) -> MultiMapping[str]:
        return self.raw.query

    async def body(self) -> bytes:
        return await read_body(self.raw)

    async def json(self) -> Any:
        data = await self.body()
        if not data.strip():
            raise HTTPError(400, "Request body is empty")
        try:
            # The one decoding edge: also refuses deep nesting and lone surrogates.
            return decode_json_body(data)
        except BadJSONBody as exc:
            raise HTTPError(400, str(exc)) from None


Handler = Callable[[ApiRequest], Awaitable[Any]]


class RequestScreen(Protocol):
    """A listener's own say over an authenticated request before it is routed."""

    def admit(self, ctx: ListenerContext, identity: Identity, method: str, path: str) -> None:
        """Raise ``HTTPError`` to refuse. ``path`` is ``Router.route_key`` of the request:
        every spelling the router routes alike has the same one."""
        ...


@attrs.frozen
class Route:
    methods: frozenset[str]
    segments: tuple[str, ...]  # "{name}" captures one segment, "{name*}" the rest
    handler: Handler
    need: Need


class Router:
    def __init__(self, credentials: CredentialSource) -> None:
        # Who vouches for callers: the embedded server, or a client-only agent's cache of
        # the servers' answers.
        self.credentials = credentials
        self._static: dict[str, list[Route]] = {}
        self._dynamic: list[Route] = []

    def add(self, methods: Iterable[str], path: str, handler: Handler,
            need: Need = Need.none) -> None:
        segments = tuple(path.strip("/").split("/"))
        route = Route(frozenset(methods), segments, handler, need)
        if any(s.startswith("{") for s in segments):
            self._dynamic.append(route)
        else:
            self._static.setdefault(path, []).append(route)

    def route_key(self, path: str) -> str:
        """The one spelling of ``path`` (as ``_route_path`` gives it) that ``match`` routes
        and endpoint rules see: percent-decoded, a registered path as it is, any other
        without the leading and trailing slashes ``match`` ignores. Every spelling routed
        alike has the same key (one with ``%2F`` in a segment decodes to a ``/`` there)."""
        if "%" in path:
            path = unquote(path)
        return path if path in self._static else "/" + path.strip("/")

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        static = self._static.get(path)
        if static is not None:
            for route in static:
                if method in route.methods:
                    return route, _NO_PARAMS
            raise HTTPError(405, "Invalid method")
        parts = path.strip("/").split("/")
        candidates = [(r, p) for r in self._dynamic
                      if (p := _match_segments(r.segments, parts)) is not None]
        if not candidates:
            raise HTTPError(404, "Not Found")
        for route, params in candidates:
            if method in route.methods:
                return route, params
        raise HTTPError(405, "Invalid method")

    async def dispatch(self, request: web.BaseRequest, ctx: ListenerContext,
                       screen: RequestScreen | None = None) -> web.StreamResponse:
        try:
            try:
                identity = authenticate(self.credentials, request.headers, ctx)
            except CredentialPending:  # rare: a remote source had to ask the servers
                identity = await authenticate_settled(self.credentials, request.headers, ctx)
            path = _route_path(request)
            if screen is not None:  # the Task API's; the TCP listener has none
                screen.admit(ctx, identity, request.method, self.route_key(path))
            if identity.acl is UNRESOLVED:  # rare: a cached caller's ACL is already there
                identity = await resolve(self.credentials, identity)
            route, params = self.match(request.method, path)
            authorize(identity, route.need, request)
            result = await route.handler(ApiRequest(request, ctx, identity, params))
        except HTTPError as err:
            return await answer_refusal(request, error_response(err.status, err.message))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error serving %s %s", request.method, request.path)
            return error_response(500, "Internal server error")
        if isinstance(result, web.StreamResponse):
            return result
        if request.query_string and request.query.get("pretty", "0") != "0":
            reply = result if isinstance(result, Reply) else Reply(result)
            return json_response(reply, pretty=True)
        if isinstance(result, Reply):
            return json_response(result)
        # The hot path (e.g. health checks over a task socket): no wrapper objects.
        return web.Response(body=_encode(result).encode(), content_type="application/json")


_NO_PARAMS: dict[str, str] = {}


def _route_path(request: web.BaseRequest) -> str:
    """The path as the router routes it: the raw target without its query, split at its
    slashes and each segment percent-decoded on its own, so an ID holding a ``/`` (a child
    job's, sent as ``%2F``) stays one segment. A ``/`` or ``%`` decoded inside a segment is
    kept escaped (``%2F``, ``%25``); ``match`` unescapes what it captures."""
    path = request.raw_path.partition("?")[0]
    if "%" not in path:  # the common case: nothing to decode
        return path
    return "/".join(unquote(segment).replace("%", "%25").replace("/", "%2F")
                    for segment in path.split("/"))


def _param(segment: str) -> str:
    return unquote(segment) if "%" in segment else segment


def _match_segments(pattern: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for i, seg in enumerate(pattern):
        if seg.startswith("{") and seg.endswith("*}"):
            rest = "/".join(parts[i:])
            if not rest:
                return None
            params[seg[1:-2]] = _param(rest)
            return params
        if i >= len(parts):
            return None
        if seg.startswith("{"):
            if not parts[i]:
                return None
            params[seg[1:-1]] = _param(parts[i])
        elif seg != parts[i]:
            return None
    return params if len(parts) == len(pattern) else None


def _make_compact_encoder() -> Callable[[Any], str]:
    # JSONEncoder.encode builds a fresh C encoder on every call; for the small bodies of a
    # busy API that setup costs as much as the encoding. Build the C encoder once.
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - CPython always has the accelerator
        return json.JSONEncoder(separators=(",", ":")).encode
    chunks = c_make_encoder(None, json.JSONEncoder().default,
                            json.encoder.encode_basestring_ascii, None, ":", ",",
                            False, False, True)
    return lambda obj: "".join(chunks(obj, 0))


_encode = _make_compact_encoder()
_encode_pretty = json.JSONEncoder(indent=4).encode


def json_response(reply: Reply, *, pretty: bool = False) -> web.Response:
    body = (_encode_pretty(reply.body) + "\n") if pretty else _encode(reply.body)
    headers = None
    if reply.index is not None:
        headers = {"X-Nomad-Index": str(reply.index), "X-Nomad-KnownLeader": "true",
                   "X-Nomad-LastContact": "0"}
    return web.Response(status=reply.status, body=body.encode(),
                        content_type="application/json", headers=headers)


def error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain")


async def answer_refusal(request: web.BaseRequest, response: web.Response) -> web.Response:
    """``response`` to a request that is not served, delivered even while the client is still
    sending a body we will not read (or not all of)."""
    if request.body_exists and not request.content.is_eof():
        await refuse_body(request, response)
    return response


async def read_body(request: web.BaseRequest) -> bytes:
    """The request body, bounded in size and in time so a slow or huge upload cannot pin
    a connection or the agent's memory."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise HTTPError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes)")
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT):
            async for chunk in request.content.iter_any():
                total += len(chunk)
                if total > MAX_BODY_BYTES:
                    raise HTTPError(413, f"Request body too large (limit {MAX_BODY_BYTES} bytes)")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, "Timed out reading request body") from None
    except RequestPayloadError:
        # e.g. broken chunked encoding: the client's fault, and the parser's message quotes
        # raw input, so it is not passed on.
        raise HTTPError(400, "Invalid request body encoding") from None
    except ConnectionError:
        # The client hung up mid-body: nothing to log, nobody to answer.
        raise HTTPError(400, "Connection lost while reading request body") from None
    return b"".join(chunks)


async def refuse_body(request: web.BaseRequest, response: web.Response) -> None:
    """Deliver ``response`` while the client is still sending the body we will not read.

    Closing at once, with unread data queued, makes the kernel reset the connection, and a
    client still sending then often sees the reset instead of our answer. So: send the
    answer, half-close (shutdown write), read and discard what keeps coming for at most
    ``LINGER_TIME`` seconds and ``LINGER_MAX_BYTES`` bytes, and only then let the
    connection close. A client that sends up to that much more gets the answer and a clean
    close; a huge upload is still cut off after the bound.
    """
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return  # the client is gone; aiohttp notices and closes
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    if transport.can_write_eof():
        transport.write_eof()
    drained = 0
    try:
        async with asyncio.timeout(LINGER_TIME):
            while drained < LINGER_MAX_BYTES:
                chunk = await request.content.readany()
                if not chunk:
                    break
                drained += len(chunk)
    except (TimeoutError, OSError, RequestPayloadError):
        pass  # bound reached or the client gave up: close now
