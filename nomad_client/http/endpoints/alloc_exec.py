"""GET /v1/client/allocation/:alloc_id/exec: ``alloc exec``, a command run for one of this
node's tasks, carried over a websocket in Nomad's exec frames (``client/exec_session.py``).

Query: ``task`` (required), ``command`` (a JSON array of strings, required), ``tty``
(boolean), ``ws_handshake`` (boolean: the token comes in the first frame,
``{"version":1,"auth_token":"..."}``, as browsers send it). The token is otherwise the
request's own (``X-Nomad-Token`` or ``Authorization: Bearer``), authenticated by the router.

Without ``ws_handshake`` the caller is known before the upgrade, and everything that can
be checked then is answered as plain HTTP, in this order: 403 ``Permission denied`` when
``client { disable_remote_exec = true }``, 400 for bad parameters, then as on the other
allocation routes 403 without ``alloc-exec`` in the request's namespace, 404 for an
allocation this node does not run, 403 without ``alloc-exec`` in the allocation's namespace,
400 for a task the allocation does not have or one that is not running, and 403 without
``alloc-node-exec`` for a task without filesystem isolation (raw_exec).

With ``ws_handshake`` (as Nomad does for every request) only the node's switch and the
query's own syntax are checked before the upgrade: the caller is unknown until the first
frame, so it must not learn which allocations and tasks exist. The same checks then end
the session with a close frame (policy, 1008), as does a handshake that fails. A command
that cannot be started closes with 1011, an invalid frame with 1007. A session that ran
ends with the ``exited`` frame and a normal close.

The route needs no permission of the router (a ``ws_handshake`` caller is anonymous
there): the handler authorizes, with ``auth.authorize`` and ``auth.require_exec``.
"""

from __future__ import annotations

import json
import logging

import attrs
from aiohttp import WSCloseCode, WSMsgType, web

from nomad_client.allocrunner.alloc_runner import UnknownAllocation
from nomad_client.allocrunner.taskrunner.task_runner import ControlRefused
from nomad_client.client.drivers.base import ExecTarget
from nomad_client.client.exec_session import (
    ExecRequest,
    ExecStartError,
    ExecTask,
    FrameError,
    SessionEnd,
    decode_json_object,
    run_session,
)
from nomad_client.http.auth import (
    ALL_NAMESPACES,
    ALLOC_EXEC,
    PERMISSION_REFUSED,
    authenticate_handshake,
    authorize,
    require_exec,
)
from nomad_client.http.context import Identity
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request, not_found
from nomad_client.http.query import query_bool
from nomad_client.http.router import ApiRequest
from nomad_client.http.services import LocalClient, Services

log = logging.getLogger(__name__)

# Largest frame a client may send (stdin data is base64 in JSON); larger closes with 1009.
MAX_CLIENT_FRAME = 1024 * 1024
MAX_COMMAND_ARGS = 4096
HANDSHAKE_TIMEOUT = 10.0
HANDSHAKE_VERSION = 1
# Close codes for what fails after the upgrade.
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_BAD_FRAME = 1007


@attrs.frozen
class ExecQuery:
    task: str
    request: ExecRequest
    handshake: bool


def parse_exec_query(req: ApiRequest) -> ExecQuery:
    """The checked query of an exec request; 400 with the reason otherwise."""
    query = req.query
    task = query.get("task", "")
    if not task:
        raise bad_request("must provide task name")
    raw = query.get("command", "")
    try:
        command = json.loads(raw)
    except ValueError:
        raise bad_request("command must be a JSON array of strings, "
                          'e.g. command=["/bin/sh","-c","echo hi"]') from None
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise bad_request("command must be a JSON array of strings")
    if not command or not command[0]:
        raise bad_request("command is not present")
    if len(command) > MAX_COMMAND_ARGS:
        raise bad_request(f"command has more than {MAX_COMMAND_ARGS} arguments")
    if any("\0" in arg for arg in command):
        raise bad_request("command arguments must not contain NUL bytes")
    try:
        # Each argument must reach the kernel as bytes: lone surrogates never can.
        for arg in command:
            arg.encode()
    except UnicodeEncodeError:
        raise bad_request("command arguments must be valid UTF-8") from None
    return ExecQuery(task=task, request=ExecRequest(tuple(command), query_bool(query, "tty")),
                     handshake=query_bool(query, "ws_handshake"))


def _local_client(services: Services) -> LocalClient:
    if services.client is None:
        raise bad_request("No local Node and node_id not provided")
    return services.client


class _WebSocketChannel:
    """``ExecChannel`` over an aiohttp websocket: text and binary frames are both read as
    JSON (as Nomad's ReadJSON does); a close, an error or a lost connection is the end."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def send(self, frame: str) -> None:
        await self._ws.send_str(frame)

    async def receive(self) -> str | bytes | None:
        msg = await self._ws.receive()
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            data: str | bytes = msg.data
            return data
        return None


async def _handshake_identity(services: Services, req: ApiRequest,
                              ws: web.WebSocketResponse) -> Identity:
    """The caller named by the first frame; ``HTTPError`` when it names none."""
    try:
        msg = await ws.receive(timeout=HANDSHAKE_TIMEOUT)
    except TimeoutError:
        raise bad_request("timed out waiting for the handshake") from None
    if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        raise bad_request("expected a handshake frame")
    try:
        frame = decode_json_object(msg.data, "handshake frame")
    except FrameError as err:
        raise bad_request(str(err)) from None
    if frame.get("version") != HANDSHAKE_VERSION:
        raise bad_request(f"unexpected handshake value: {frame.get('version')}")
    token = frame.get("auth_token")
    if not isinstance(token, str):
        raise bad_request("handshake auth_token must be a string")
    return await authenticate_handshake(services.own_server, req.raw.headers, token, req.ctx)


def _exec_task(services: Services, client: LocalClient, req: ApiRequest, query: ExecQuery,
               identity: Identity) -> tuple[ExecTask, str]:
    """The task to exec into and its allocation's namespace, looked up only for a caller
    already known to hold ``alloc-exec`` in the request's namespace (as the router checks
    a route's need): 404 for an allocation this node does not run, 403 without
    ``alloc-exec`` in the allocation's own namespace, then 400 for a task it lacks."""
    authorize(identity, ALLOC_EXEC, req.raw)
    alloc_id = req.params["alloc_id"]
    try:
        task = client.exec_task(alloc_id, query.task)
    except UnknownAllocation:
        raise not_found(f"Unknown allocation {alloc_id!r}") from None
    except ControlRefused:
        task = None  # told once the caller is known to be allowed to learn it
    alloc = services.allocation(alloc_id)
    # An allocation the server forgot has no namespace: only an allow-all caller may exec.
    namespace = ALL_NAMESPACES if alloc is None else alloc.namespace
    require_exec(identity, namespace, fs_isolated=True)
    if task is None:
        raise bad_request(f"unknown task name {query.task!r}")
    return task, namespace


async def _authorized_target(services: Services, client: LocalClient, req: ApiRequest,
                             query: ExecQuery, identity: Identity) -> tuple[ExecTask, ExecTarget]:
    """The task and where the command runs, once the caller may run it there: a target
    without a process of its own (the host, raw_exec) has no filesystem isolation."""
    task, namespace = _exec_task(services, client, req, query, identity)
    try:
        target = await task.target()
    except ExecStartError as err:
        raise bad_request(str(err)) from None
    require_exec(identity, namespace, fs_isolated=target.pid is not None)
    return task, target


async def _upgrade(req: ApiRequest) -> web.WebSocketResponse:
    # A plain GET learns why an upgrade would be refused (the API client asks so, since a
    # refused upgrade's body is lost to it).
    ws = web.WebSocketResponse(max_msg_size=MAX_CLIENT_FRAME, autoclose=True)
    if not ws.can_prepare(req.raw).ok:
        raise bad_request("alloc exec needs a websocket upgrade")
    await ws.prepare(req.raw)
    return ws


async def alloc_exec(services: Services, req: ApiRequest) -> web.StreamResponse:
    client = _local_client(services)
    if client.remote_exec_disabled:
        log.info("refused alloc exec: remote exec is disabled on this client "
                 "(client.disable_remote_exec)")
        raise PERMISSION_REFUSED
    query = parse_exec_query(req)
    if not query.handshake:
        identity = req.identity
        task, target = await _authorized_target(services, client, req, query, identity)
    # With ws_handshake the caller is unknown until the first frame: nothing about this
    # node's allocations is looked up before it is authenticated (errors are close frames).
    ws = await _upgrade(req)
    alloc_id = req.params["alloc_id"]
    try:
        if query.handshake:
            identity = await _handshake_identity(services, req, ws)
            task, target = await _authorized_target(services, client, req, query, identity)
        # Only the program is logged: arguments may hold secrets.
        log.info("alloc exec session starting: alloc %s, task %s, command %s, tty %s, by %s",
                 alloc_id, query.task, query.request.command[0], query.request.tty,
                 _caller(identity))
        end = await client.exec_sessions.run(run_session(
            target, query.request, _WebSocketChannel(ws), task.stopped))
    except HTTPError as err:
        await ws.close(code=CLOSE_INTERNAL if err.status >= 500 else CLOSE_POLICY,
                       message=_reason(err.message))
        return ws
    except ExecStartError as err:
        await ws.close(code=CLOSE_INTERNAL, message=_reason(str(err)))
        return ws
    except Exception:  # after the upgrade, only a close frame can tell the client
        log.exception("alloc exec session failed (alloc %s, task %s)", alloc_id, query.task)
        await ws.close(code=CLOSE_INTERNAL, message=b"Internal server error")
        return ws
    await _close(ws, end)
    return ws


async def _close(ws: web.WebSocketResponse, end: SessionEnd) -> None:
    if end.client_gone or ws.closed:
        return
    if end.error is not None:
        await ws.close(code=CLOSE_BAD_FRAME, message=_reason(end.error))
        return
    await ws.close(code=WSCloseCode.OK)


def _caller(identity: Identity) -> str:
    if identity.token is not None:
        return f"ACL token {identity.token.name!r} ({identity.token.accessor_id})"
    if identity.claims is not None:
        return f"workload {identity.claims.alloc_id}/{identity.claims.task}"
    return "anyone (ACLs disabled)" if identity.acl.management else "anonymous"


def _reason(text: str) -> bytes:
    # A close frame's reason holds at most 123 bytes; cut at a character boundary.
    return text.encode()[:123].decode(errors="ignore").encode()


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    # Authorized by the handler (auth.require_exec), in the allocation's own namespace.
    routes.add(("GET",), "/v1/client/allocation/{alloc_id}/exec", alloc_exec)
