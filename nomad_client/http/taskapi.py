"""The HTTP layer's side of the Task API: serves a task's socket through the agent's one
router, as that task's Task API listener, under the operator's controls
(``client { task_api { ... } }``).

The alloc runner's Task API hook decides when a task has a socket and creates it safely; it
reaches this module only through the ``TaskSocketServer`` interface, so the alloc runner
never loads the HTTP layer.

Every request and connection reads the agent's current ``TaskAPIConfig`` (a reload replaces
it; the next request or connection obeys the new one), compiled once per config object into
a ``TaskAPIPolicy``. A request over a task's socket goes through, in order:

1. the task's rate limit (a token bucket per socket): over it, the request is held until the
   bucket would have a token for it (at most ``ratelimit.MAX_HOLD``), then answered 429 with
   ``Retry-After`` — so a flood costs the agent about one answer per connection per second;
2. the peer check (``peer_credentials``): is the connecting process the task's, or root?
   Decided once per connection; ``log`` warns, ``enforce`` answers 403;
3. the router: authentication, then this module's screen (``bind_identity_to_socket``,
   then the endpoint rules) on the path as routed, then routing, authorization, the handler;
4. the audit log, when enabled: one line per request, refusals included.

The TCP API is none of this: its listener calls the router with no screen.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import cast

from aiohttp import web

from nomad_client.allocrunner.hooks import TaskSocketInfo
from nomad_client.client.taskapi_config import LiveTaskAPIConfig, TaskAPIConfig
from nomad_client.http.audit import AuditLog, AuditSettings, audit_line, socket_fields
from nomad_client.http.auth import socket_binding_refusal
from nomad_client.http.context import Identity, ListenerContext, TaskSocketState
from nomad_client.http.endpoint_rules import EndpointRules
from nomad_client.http.errors import HTTPError
from nomad_client.http.listeners import Connection, ConnectionLimits, Listener
from nomad_client.http.peercred import peer_is_task
from nomad_client.http.ratelimit import TokenBucket
from nomad_client.http.request_counts import TASK_API_REQUESTS
from nomad_client.http.router import Router, answer_refusal, error_response

log = logging.getLogger(__name__)

TASK_API_LISTENER_NAME = "task-api"
PEER_OFF, PEER_ENFORCE = "off", "enforce"  # of PEER_CREDENTIALS_MODES; "log" warns only
NOT_THE_TASK = "Permission denied: the connecting process is not part of this task"
INVALID_RULES = "Permission denied: client.task_api endpoint rules are invalid"
# How long a connection made while its task is starting waits for the task's process.
TASK_START_WAIT = 10.0


class TaskAPIPolicy:
    """One ``TaskAPIConfig`` as the request path uses it, built once per config object.
    Also the router's ``RequestScreen`` for requests that need no audit line."""

    __slots__ = ("audit", "bind_identity", "burst", "config", "limits", "peer_mode", "rate",
                 "rules", "screen")

    def __init__(self, config: TaskAPIConfig, audit_path: Path) -> None:
        self.config = config
        try:
            self.rules: EndpointRules | None = EndpointRules(config.allowed_endpoints,
                                                             config.denied_endpoints)
        except ValueError as err:  # the config parser refuses these; fail closed regardless
            log.error("Task API: refusing every request, the endpoint rules are invalid: %s",
                      err)
            self.rules = None
        self.bind_identity = config.bind_identity_to_socket
        # What the router is to call ``admit`` on: None when there is nothing to screen.
        screens = self.rules is None or bool(self.rules) or self.bind_identity
        self.screen: TaskAPIPolicy | None = self if screens else None
        self.limits = ConnectionLimits(total=config.max_connections_per_task)
        self.rate = float(config.rate_limit.requests_per_second)  # 0: no limit
        self.burst = max(1.0, float(config.rate_limit.burst))
        self.peer_mode = config.peer_credentials
        audit = config.audit
        self.audit = (AuditSettings(Path(audit.path) if audit.path else audit_path,
                                    audit.max_size, audit.max_files)
                      if audit.enabled else None)

    def refusal(self, ctx: ListenerContext, identity: Identity, method: str, path: str
                ) -> str | None:
        if self.bind_identity:
            reason = socket_binding_refusal(identity, ctx)
            if reason is not None:
                return reason
        if self.rules is None:
            return INVALID_RULES
        return self.rules.refusal(method, path) if self.rules else None

    def admit(self, ctx: ListenerContext, identity: Identity, method: str, path: str) -> None:
        reason = self.refusal(ctx, identity, method, path)
        if reason is not None:
            raise HTTPError(403, reason)


class _AuditedRequest:
    """The screen of one request while the audit log is on: also keeps who asked and why
    the request was refused, for its audit line."""

    __slots__ = ("identity", "policy", "reason")

    def __init__(self, policy: TaskAPIPolicy) -> None:
        self.policy = policy
        self.identity: Identity | None = None
        self.reason: str | None = None

    def admit(self, ctx: ListenerContext, identity: Identity, method: str, path: str) -> None:
        self.identity = identity
        self.reason = self.policy.refusal(ctx, identity, method, path)
        if self.reason is not None:
            raise HTTPError(403, self.reason)


class TaskListener(Listener):
    """A task socket's listener: requests go through ``TaskAPIServer.handle``; the
    connection limit is the live config's ``max_connections_per_task``."""

    def __init__(self, server: TaskAPIServer, ctx: ListenerContext, sock: socket.socket
                 ) -> None:
        super().__init__(server.router, ctx, sock)
        self._task_api = server

    @property
    def limits(self) -> ConnectionLimits:
        return self._task_api.policy().limits

    def request_handler(self) -> Callable[[web.BaseRequest], object]:
        return functools.partial(self._task_api.handle, ctx=self.ctx)


class TaskAPIServer:
    """Implements ``allocrunner.hooks.TaskSocketServer`` with one ``TaskListener`` per
    socket. ``audit_path`` is the audit log used when ``audit.path`` is unset;
    ``node_id`` names the node in audit lines."""

    def __init__(self, router: Router, config: LiveTaskAPIConfig, *, audit_path: Path,
                 node_id: Callable[[], str]) -> None:
        self.router = router
        self._live = config
        self._audit_path = audit_path
        self._node_id = node_id
        self._policy = TaskAPIPolicy(config.current, audit_path)
        self._audit: AuditLog | None = None
        self._configured: TaskAPIConfig | None = None  # what reconfigure last applied
        self._reconfiguring = asyncio.Lock()

    def policy(self) -> TaskAPIPolicy:
        """The current config's policy (compiled when the config object changes)."""
        policy = self._policy
        current = self._live.current
        if policy.config is not current:
            policy = self._policy = TaskAPIPolicy(current, self._audit_path)
        return policy

    # ---- lifecycle -----------------------------------------------------------------------
    async def serve(self, sock: socket.socket, info: TaskSocketInfo) -> Listener:
        # task_api=True: a credential is always required and the anonymous policy never applies.
        ctx = ListenerContext(name=TASK_API_LISTENER_NAME, task_api=True,
                              alloc_id=info.alloc_id, task=info.task,
                              namespace=info.namespace, job_id=info.job_id,
                              processes=info.processes, state=TaskSocketState())
        listener = TaskListener(self, ctx, sock)
        try:
            if self._configured is not self._live.current:
                await self.reconfigure()
            await listener.start()
        except BaseException:
            await listener.close()  # the socket is ours from the call on: never leak it
            raise
        return listener

    async def reconfigure(self) -> None:
        """Apply the live config's audit settings: open, close or reopen the audit log.
        Raises ``OSError`` if the audit log cannot be opened (it stays closed)."""
        async with self._reconfiguring:
            current = self._live.current
            wanted = self.policy().audit
            held = self._audit
            if held is None or held.settings != wanted:
                self._audit = None
                if held is not None:
                    await held.close()
                if wanted is not None:
                    audit = AuditLog(wanted)
                    try:
                        await audit.open()
                    except OSError as err:
                        raise OSError(err.errno, f"Task API audit log {wanted.path}: "
                                                 f"{err.strerror or err}") from err
                    self._audit = audit
            self._configured = current

    async def close(self) -> None:
        """Flush and close the audit log (its writer task is cancelled and awaited)."""
        async with self._reconfiguring:
            held, self._audit = self._audit, None
            self._configured = None
            if held is not None:
                await held.close()

    # ---- the request path ----------------------------------------------------------------
    async def handle(self, request: web.BaseRequest, ctx: ListenerContext
                     ) -> web.StreamResponse:
        # One coroutine, the checks inline: this runs on every Task API request.
        policy = self._policy
        if policy.config is not self._live.current:
            policy = self.policy()
        audit = self._audit
        started = 0.0
        response: web.StreamResponse | None = None
        reason = None
        if policy.rate or audit is not None:
            started = asyncio.get_running_loop().time()
            if policy.rate:
                bucket = cast(TaskSocketState, ctx.state).bucket
                hold = bucket.take(started, policy.rate, policy.burst)
                if hold:
                    reason, response = await self._over_limit(request, bucket, policy, hold)
        # Ours: the listeners make every connection (typed by aiohttp as its base class).
        conn: Connection = request.protocol  # type: ignore[assignment]
        if response is None and policy.peer_mode != PEER_OFF and conn.peer_is_task is not True:
            reason = await self._peer_refusal(conn, ctx, policy)
            if reason is not None:
                response = await answer_refusal(request, error_response(403, reason))
        if audit is None:
            if response is None:
                response = await self.router.dispatch(request, ctx, policy.screen)
            TASK_API_REQUESTS.count(response.status)
            return response
        identity = None
        if response is None:
            audited = _AuditedRequest(policy)
            response = await self.router.dispatch(request, ctx, audited)
            identity, reason = audited.identity, audited.reason
        audit.record(audit_line(
            socket=self._audit_fields(ctx), method=request.method, path=request.path,
            status=response.status, latency=asyncio.get_running_loop().time() - started,
            identity=identity, peer=conn.peer_cred, reason=reason))
        TASK_API_REQUESTS.count(response.status)
        return response

    def _audit_fields(self, ctx: ListenerContext) -> str:
        """The socket's shared audit fields, encoded again only when the node ID changed
        (it is known once the client has registered)."""
        state = cast(TaskSocketState, ctx.state)
        node = self._node_id()
        cached = state.audit_fields
        if cached is None or cached[0] != node:
            cached = state.audit_fields = (node, socket_fields(
                node=node, namespace=ctx.namespace, job=ctx.job_id, alloc=ctx.alloc_id,
                task=ctx.task))
        return cached[1]

    async def _over_limit(self, request: web.BaseRequest, bucket: TokenBucket,
                          policy: TaskAPIPolicy, hold: float) -> tuple[str, web.Response]:
        """Hold a request over the rate limit, then refuse it (429)."""
        bucket.held += 1
        try:
            await asyncio.sleep(hold)
        finally:
            bucket.held -= 1
        retry = bucket.retry_after(asyncio.get_running_loop().time(), policy.rate,
                                   policy.burst)
        reason = (f"Too many requests: this task's Task API allows {policy.rate:g} requests "
                  f"per second (client.task_api.rate_limit)")
        response = error_response(429, reason)
        response.headers["Retry-After"] = str(retry)
        return reason, await answer_refusal(request, response)

    async def _peer_refusal(self, conn: Connection, ctx: ListenerContext,
                            policy: TaskAPIPolicy) -> str | None:
        """``peer_credentials`` (not off): decided once per connection; ``log`` warns
        (rate-limited, per socket), ``enforce`` refuses."""
        verdict = conn.peer_is_task
        if verdict is None:
            enforce = policy.peer_mode == PEER_ENFORCE
            root = await _task_root(ctx, conn, wait=enforce)
            peer = conn.peer_cred
            if root is None and not enforce and (peer is None or peer.uid != 0):
                # log: never delay a request to judge it; judge once the task's process is
                # known (a task connecting while it starts gets no false warning).
                return None
            verdict = conn.peer_is_task = peer_is_task(peer, root)
            if not verdict:
                conn.listener.errors.report(
                    "%s connection from a process that is not part of the task (%s)",
                    "refusing" if policy.peer_mode == PEER_ENFORCE else "allowing",
                    "credentials unknown" if peer is None else
                    f"pid {peer.pid}, uid {peer.uid}, gid {peer.gid}")
        if verdict or policy.peer_mode != PEER_ENFORCE:
            return None
        return NOT_THE_TASK


async def _task_root(ctx: ListenerContext, conn: Connection, *, wait: bool
                     ) -> tuple[int, float] | None:
    """The task's root process. The socket exists before the driver starts the task, so a
    task that connects at once may be early: with ``wait``, a non-root peer waits (bounded)
    for the start."""
    processes = ctx.processes
    if processes is None:
        return None
    root = processes.root()
    if wait and root is None and conn.peer_cred is not None and conn.peer_cred.uid != 0:
        try:
            async with asyncio.timeout(TASK_START_WAIT):
                await processes.started()
        except TimeoutError:
            return None
        root = processes.root()
    return root
