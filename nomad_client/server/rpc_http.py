"""The server's side of ``Agent.HTTP``: an HTTP request a client-only agent forwards, run
through this agent's own router in process, as if it had arrived on the HTTP listener.

Only an authenticated client node may forward (its NodeID and SecretID). The request is
checked again by the router, from scratch: the caller's credential against this server's
state, and one that came through a task socket gets the Task API's rules (never anonymous).
Streaming endpoints are refused (501): their answer never ends, and it could not travel as
one reply.

What travels is defined here, below the HTTP layer that uses it on both ends: the
request's method, raw path (with its query), allow-listed headers and body, and whether it
came through a task socket; the reply's status, allow-listed headers and body.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast
from urllib.parse import unquote

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from nomad_client.server.server import Server

METHOD = "Agent.HTTP"
# Request headers a server needs from a Nomad client or tool; nothing else is taken.
REQUEST_HEADERS = ("X-Nomad-Token", "Authorization", "Content-Type", "Accept")
# Response headers a Nomad client reads; nothing else goes back.
RESPONSE_HEADERS = ("Content-Type", "Cache-Control", "X-Nomad-Index", "X-Nomad-KnownLeader",
                    "X-Nomad-LastContact", "X-Nomad-NextToken")
STREAMING_REFUSED = ("{what} is not forwarded between agents: send this request "
                     "to a server agent's HTTP API directly")

# The router's dispatch for a forwarded request; the flag: it came through a task socket.
Dispatch = Callable[[web.BaseRequest, bool], Awaitable[web.StreamResponse]]
Handler = Callable[[Server, dict[str, Any]], Awaitable[Any]]

METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})
MAX_PATH = 8190  # aiohttp's own request-line bound
MAX_HEADER_VALUE = 8190


def streaming_endpoint(path: str) -> str | None:
    """What streaming endpoint ``path`` (a raw request path) names, or None. Decoded and
    split as the router does, so no other spelling of the path gets past."""
    parts = unquote(path.partition("?")[0]).strip("/").split("/")
    if parts[:3] == ["v1", "event", "stream"]:
        return "The event stream"
    if parts[:3] == ["v1", "client", "fs"] and parts[3:4] in (["stream"], ["logs"]):
        return "File streaming"
    # The alloc ID is one segment as routed, but may decode to several: exec is last.
    if parts[:3] == ["v1", "client", "allocation"] and len(parts) >= 5 and parts[-1] == "exec":
        return "Alloc exec"
    return None


def pick_headers(headers: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, str]:
    """The allowed headers of ``headers`` that are plain strings, under their usual names."""
    picked: dict[str, str] = {}
    lowered = {str(k).lower(): v for k, v in headers.items()}
    for name in allowed:
        value = lowered.get(name.lower())
        if isinstance(value, str):
            picked[name] = value
    return picked


def _authenticate_node(server: Server, args: dict[str, Any]) -> None:
    node_id, secret_id = args.get("NodeID"), args.get("SecretID")
    if not isinstance(node_id, str) or not isinstance(secret_id, str):
        raise PermissionError("node secret ID does not match")
    node = server.node(node_id)
    # Compared in constant time; a node without a secret cannot forward.
    if node is None or not node.secret_id or not hmac.compare_digest(
            node.secret_id.encode(), secret_id.encode()):
        raise PermissionError("node secret ID does not match")


def _is_clean(text: str, limit: int) -> bool:
    # Printable ASCII: what a request target or a header value may hold here.
    return 0 < len(text) <= limit and text.isascii() and text.isprintable()


def _path(args: dict[str, Any]) -> str:
    path = args.get("Path")
    if (not isinstance(path, str) or not _is_clean(path, MAX_PATH) or " " in path
            or not path.startswith("/") or path.startswith("//") or "#" in path):
        raise ValueError("Path must be an origin-form request target")
    return path


def _headers(args: dict[str, Any], body: bytes) -> CIMultiDict[str]:
    given = args.get("Headers", {})
    if not isinstance(given, dict):
        raise ValueError("Headers must be a map")
    headers: CIMultiDict[str] = CIMultiDict()
    allowed = {name.lower(): name for name in REQUEST_HEADERS}
    for name, value in given.items():
        canonical = allowed.get(str(name).lower())
        if canonical is None:
            continue  # only the allow-list is taken, whatever a node sends
        if not isinstance(value, str) or (value and not _is_clean(value, MAX_HEADER_VALUE)):
            raise ValueError(f"header {canonical} must be printable ASCII")
        headers[canonical] = value
    if body:
        # The router's body reader refuses an oversized body by this length.
        headers["Content-Length"] = str(len(body))
    return headers


class _Detached:
    """The protocol side of a request that came over no connection."""

    transport = None
    ssl_context = None
    peername = None
    sockname = None
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


class _NoWire(AbstractStreamWriter):
    """A request with no connection: a handler that starts streaming finds its client gone
    (as every streaming handler expects one may be), so it ends at once."""

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        raise ConnectionResetError("forwarded request: no connection to stream to")

    async def write_eof(self, chunk: bytes = b"") -> None:
        raise ConnectionResetError("forwarded request: no connection to stream to")

    async def drain(self) -> None:
        pass

    def enable_compression(self, encoding: str = "deflate",
                           strategy: int | None = None) -> None:
        pass

    def enable_chunking(self) -> None:
        pass

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        raise ConnectionResetError("forwarded request: no connection to stream to")


def build_request(method: str, path: str, headers: CIMultiDict[str], body: bytes
                  ) -> web.BaseRequest:
    """An aiohttp request carrying ``body``, as the HTTP listener would have built it."""
    loop = asyncio.get_running_loop()
    protocol = _Detached()
    payload: StreamReader = EMPTY_PAYLOAD
    if body:
        # A limit above the body's size: it is all there, nothing to pause.
        payload = StreamReader(cast(Any, protocol), max(2**16, len(body)), loop=loop)
        payload.feed_data(body)
        payload.feed_eof()
    target, _, query = path.partition("?")
    message = RawRequestMessage(
        method, path, HttpVersion11, CIMultiDictProxy(headers),
        tuple((k.encode(), v.encode()) for k, v in headers.items()), False, None, False,
        False, URL.build(path=target, query_string=query, encoded=True))
    return web.BaseRequest(message, payload, cast(Any, protocol), _NoWire(),
                           cast(Any, asyncio.current_task()), loop)


def _plain(status: int, text: str) -> dict[str, Any]:
    return {"Status": status, "Headers": {"Content-Type": "text/plain; charset=utf-8"},
            "Body": text.encode()}


def _reply(response: web.StreamResponse) -> dict[str, Any]:
    if not isinstance(response, web.Response):
        return _plain(501, "streaming responses are not forwarded")
    body = response.body
    if body is None:
        body = b""
    if not isinstance(body, bytes):
        return _plain(500, "Internal server error")
    return {"Status": response.status,
            "Headers": pick_headers(response.headers, RESPONSE_HEADERS), "Body": body}


def make_http_handler(dispatch: Dispatch) -> Handler:
    """The ``Agent.HTTP`` RPC handler, running requests through ``dispatch`` (the server
    agent's router, as ``http.forward.forwarded_dispatch`` binds it)."""

    async def handle(server: Server, args: dict[str, Any]) -> Any:
        _authenticate_node(server, args)
        method = args.get("Method")
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError("Method must be an HTTP method")
        path = _path(args)
        body = args.get("Body", b"")
        if not isinstance(body, bytes):
            raise ValueError("Body must be bytes")
        streaming = streaming_endpoint(path)
        if streaming is not None:
            return _plain(501, STREAMING_REFUSED.format(what=streaming))
        request = build_request(method, path, _headers(args, body), body)
        return _reply(await dispatch(request, args.get("TaskAPI") is True))

    return handle
