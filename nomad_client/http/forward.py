"""A client-only agent's way to answer server endpoints: forward the request to a server.

The local router has already authenticated and authorized the caller (and, on a task
socket, applied the Task API's rules); ``HTTPForwarder`` then sends the request as one RPC,
``Agent.HTTP``, which the server runs through its own router (``server/rpc_http.py``), so
the server checks the caller again with its own state. Only an allow-list of headers
travels either way: the credential, the content negotiation and Nomad's query metadata.

Streaming endpoints (the event stream, log following, file streaming, alloc exec) are not
forwarded: 501, naming what to do instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from aiohttp import web
from multidict import CIMultiDict

from nomad_client.http.context import ListenerContext
from nomad_client.http.errors import HTTPError
from nomad_client.http.query import blocking_params
from nomad_client.http.router import ApiRequest, Router, error_response
from nomad_client.rpcwire.errors import RPCError
from nomad_client.server.rpc_http import (
    METHOD,
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    STREAMING_REFUSED,
    Dispatch,
    pick_headers,
    streaming_endpoint,
)

log = logging.getLogger(__name__)

# A plain request's deadline, and what a blocking query gets beyond its wait: the server
# adds up to wait/16 of jitter (as Nomad does), then the reply must still travel.
REQUEST_TIMEOUT = 60.0
BLOCKING_MARGIN = 10.0

NO_SERVER = "No server reachable to forward the request to"
NODE_REFUSED = "The servers do not accept this agent's node (not registered yet?)"

# The listeners a forwarded request counts as having come through, on the server.
FORWARDED = ListenerContext(name="forwarded")
FORWARDED_TASK_API = ListenerContext(name="forwarded-task-api", task_api=True)


class RPCCaller(Protocol):
    """The client's RPC transport."""

    async def call(self, method: str, args: dict[str, Any], *,
                   timeout: float | None = None) -> Any: ...


# The node's ID and secret ID: the server forwards only for an authenticated client node.
NodeCredentials = Callable[[], tuple[str, str]]


def request_timeout(req: ApiRequest) -> float:
    """How long the forwarded request may take: a blocking query's wait and a margin."""
    try:
        index, wait = blocking_params(req.query)
    except HTTPError:
        return REQUEST_TIMEOUT  # the server tells the caller what is wrong with them
    if index > 0:
        return wait + wait / 16 + BLOCKING_MARGIN
    return REQUEST_TIMEOUT


def response_from_reply(reply: Any) -> web.Response:
    """The HTTP response a server's ``Agent.HTTP`` reply describes; 502 if malformed."""
    if not isinstance(reply, dict):
        return error_response(502, "Malformed reply from the server")
    status, headers, body = reply.get("Status"), reply.get("Headers") or {}, reply.get("Body")
    if (not isinstance(status, int) or not 100 <= status <= 599
            or not isinstance(headers, dict) or not isinstance(body, bytes | None)):
        return error_response(502, "Malformed reply from the server")
    picked = CIMultiDict(pick_headers(headers, RESPONSE_HEADERS))
    if any("\r" in v or "\n" in v for v in picked.values()):
        return error_response(502, "Malformed reply from the server")
    return web.Response(status=status, body=body or b"", headers=picked)


@attrs.frozen
class HTTPForwarder:
    transport: RPCCaller
    node_credentials: NodeCredentials

    async def forward(self, req: ApiRequest) -> web.StreamResponse:
        raw = req.raw
        streaming = streaming_endpoint(raw.raw_path)
        if streaming is not None:
            return error_response(501, STREAMING_REFUSED.format(what=streaming))
        timeout = request_timeout(req)
        body = await req.body()  # bounded in size and time by the router's reader
        node_id, secret_id = self.node_credentials()
        args = {"NodeID": node_id, "SecretID": secret_id, "Method": raw.method,
                "Path": raw.raw_path, "Headers": pick_headers(raw.headers, REQUEST_HEADERS),
                "Body": body, "TaskAPI": req.ctx.task_api}
        try:
            reply = await self.transport.call(METHOD, args, timeout=timeout)
        except TimeoutError:
            return error_response(504, "Timed out waiting for the server")
        except PermissionError:
            # The server does not know this node (yet): nothing the caller can fix.
            log.warning("forwarding %s: the server refused this node's credentials",
                        raw.method)
            return error_response(503, NODE_REFUSED)
        except (ConnectionError, OSError):
            return error_response(503, NO_SERVER)
        except RPCError as err:
            log.warning("forwarding %s failed: %s (%s)", raw.method, err.code, err.message)
            return error_response(502, f"The server could not answer ({err.code})")
        return response_from_reply(reply)


def forwarded_dispatch(router: Router) -> Dispatch:
    """``router``'s dispatch for the requests ``Agent.HTTP`` brings (``make_http_handler``):
    one from a task socket is authenticated by the Task API's rules."""

    async def dispatch(request: web.BaseRequest, task_api: bool) -> web.StreamResponse:
        return await router.dispatch(request, FORWARDED_TASK_API if task_api else FORWARDED)

    return dispatch
