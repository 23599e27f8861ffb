"""The project's own asynchronous HTTP API client (aiohttp), for http:// and unix:// agents.

It talks to one agent address and touches nothing else, except that for a Unix socket
whose path is too long for ``sun_path`` it holds an ``O_PATH`` descriptor on the socket's
directory (closed by :meth:`ApiClient.close`).
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import errno
import json as jsonlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import attrs

DEFAULT_ADDRESS = "http://127.0.0.1:4646"
# sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


class ApiError(Exception):
    """The agent answered with an HTTP status >= 400."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"Unexpected response code: {self.status} ({self.body})"


class ApiConnectionError(Exception):
    """The agent could not be reached; str() names the method, URL and dial target."""

    def __init__(self, method: str, url: str, target: str, reason: str) -> None:
        self.method = method
        self.url = url
        self.target = target
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f'{self.method.capitalize()} "{self.url}": dial {self.target}: {self.reason}'


class EventStreamClosed(Exception):
    """The agent ended an event stream; ``str()`` is its reason (subscribe again from the
    last index seen, unless the reason is about the token)."""


@attrs.frozen
class ApiResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON (None for an empty body)."""
        if not self.body:
            return None
        return jsonlib.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    @property
    def index(self) -> int:
        """X-Nomad-Index as an int (0 when absent or malformed)."""
        try:
            return int(self.headers.get("X-Nomad-Index", "0"))
        except ValueError:
            return 0


def _seg(value: str) -> str:
    """Escape one path segment (IDs may contain '/', which must not split the path)."""
    return quote(value, safe="")


def _encode_params(params: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            out.append((key, ("true" if v else "false") if isinstance(v, bool) else str(v)))
    return out


def _reason(exc: BaseException) -> str:
    """A Go-like reason text for a connection failure."""
    err = exc
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    if isinstance(err, OSError) and err.errno is not None:
        text = os.strerror(err.errno).lower()
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EACCES):
            return f"connect: {text}"
        return text
    return str(exc) or type(exc).__name__


async def _stream_frames(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Nomad's ``StreamFrame`` objects, sent back to back, as they arrive; ``Data`` decoded
    to bytes and ``{}`` heartbeats left out."""
    decoder = jsonlib.JSONDecoder()
    # Nomad's Go encoder writes a non-ASCII file name as UTF-8, whose bytes a chunk may split.
    text = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    async for chunk in chunks:
        pending += text.decode(chunk)
        pos = 0
        while True:
            while pos < len(pending) and pending[pos].isspace():
                pos += 1
            try:
                frame, pos = decoder.raw_decode(pending, pos)
            except jsonlib.JSONDecodeError:
                break  # the rest of this frame is still on its way
            if frame:
                frame["Data"] = base64.b64decode(frame.get("Data") or "")
                yield frame
        pending = pending[pos:]


class ApiClient:
    """An async client for one agent.

    ``address``: argument, else ``$NOMAD_ADDR``, else ``http://127.0.0.1:4646``; accepts
    ``http://host:port``, ``https://host:port`` and ``unix:///abs/path/api.sock``.
    ``token``: argument, else ``$NOMAD_TOKEN``; sent as ``X-Nomad-Token``.
    ``namespace``: sent as ``?namespace=`` with every request that does not name one itself
    (as Nomad's Go client does); None leaves it to the agent (``default``). Methods that
    address namespaced objects take a ``namespace`` of their own, which wins.
    ``region``: sent as ``?region=`` with every request that does not name one itself.
    """

    def __init__(self, address: str | None = None, token: str | None = None, *,
                 namespace: str | None = None, timeout: float = 60.0,
                 region: str | None = None) -> None:
        address = address or os.environ.get("NOMAD_ADDR") or DEFAULT_ADDRESS
        token = token if token is not None else os.environ.get("NOMAD_TOKEN")
        self.address = address.rstrip("/")
        self.token = token or None
        self.default_namespace = namespace or None
        self.default_region = region or None
        self.timeout = timeout
        self._socket_path: str | None = None
        if self.address.startswith("unix://"):
            path = self.address[len("unix://"):]
            if not path.startswith("/"):
                raise ValueError(f"unix address must name an absolute path: {address!r}")
            self._socket_path = path
            # The Host header a Unix-socket agent sees.
            self._base = "http://localhost"
        else:
            if "://" not in self.address:
                self.address = "http://" + self.address
            parts = urlsplit(self.address)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"unsupported agent address {address!r} "
                                 "(want http://host:port or unix:///path)")
            self._base = self.address
        self._session: aiohttp.ClientSession | None = None
        self._dir_fd: int | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session and any directory descriptor held for a long socket path."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _dial_target(self) -> str:
        if self._socket_path is not None:
            return f"unix {self._socket_path}"
        parts = urlsplit(self.address)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"tcp {parts.hostname}:{port}"

    def _connect_path(self) -> str:
        """The path to connect to; long paths go through /proc/self/fd/<dirfd>/<name>."""
        assert self._socket_path is not None
        if len(os.fsencode(self._socket_path)) <= _SUN_PATH_MAX:
            return self._socket_path
        directory, name = os.path.split(self._socket_path)
        if self._dir_fd is None:
            # O_PATH: we only need a handle to name the directory, not to read it.
            self._dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        short = f"/proc/self/fd/{self._dir_fd}/{name}"
        if len(os.fsencode(short)) > _SUN_PATH_MAX:
            raise ValueError(f"socket file name too long: {name!r}")
        return short

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self._socket_path is not None:
                connector = aiohttp.UnixConnector(path=self._connect_path())
            else:
                connector = aiohttp.TCPConnector()
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                auto_decompress=True,
            )
        return self._session

    # -- raw requests -----------------------------------------------------------------

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json: Any = None, data: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> ApiResponse:
        """Send one request; never raises for an HTTP status (see ApiResponse.status).

        Raises ApiConnectionError when the agent cannot be reached or the request times out.
        """
        if not path.startswith("/"):
            path = "/" + path
        url = self._base + path
        hdrs: dict[str, str] = {}
        if self.token:
            hdrs["X-Nomad-Token"] = self.token
        body: bytes | None = data
        if json is not None:
            body = jsonlib.dumps(json).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        if self.default_namespace and (params or {}).get("namespace") is None:
            params = {**(params or {}), "namespace": self.default_namespace}
        if self.default_region and (params or {}).get("region") is None:
            params = {**(params or {}), "region": self.default_region}
        try:
            session = self._get_session()
            async with session.request(method, url, params=_encode_params(params),
                                       data=body, headers=hdrs) as resp:
                payload = await resp.read()
                return ApiResponse(status=resp.status, headers=dict(resp.headers),
                                   body=payload)
        except TimeoutError as exc:
            raise ApiConnectionError(method, url, self._dial_target(),
                                     "i/o timeout") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiConnectionError(method, url, self._dial_target(), _reason(exc)) from exc

    async def _checked(self, method: str, path: str, **kwargs: Any) -> ApiResponse:
        resp = await self.request(method, path, **kwargs)
        if resp.status >= 400:
            raise ApiError(resp.status, resp.text())
        return resp

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return (await self._checked("GET", path, params=params)).json()

    async def put(self, path: str, json: Any = None,
                  params: Mapping[str, Any] | None = None) -> Any:
        return (await self._checked("PUT", path, json=json, params=params)).json()

    async def post(self, path: str, json: Any = None,
                   params: Mapping[str, Any] | None = None) -> Any:
        return (await self._checked("POST", path, json=json, params=params)).json()

    async def delete(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return (await self._checked("DELETE", path, params=params)).json()

    async def get_bytes(self, path: str, params: Mapping[str, Any] | None = None) -> bytes:
        return (await self._checked("GET", path, params=params)).body

    async def get_blocking(self, path: str, index: int, wait: str = "5s",
                           params: Mapping[str, Any] | None = None) -> tuple[Any, int]:
        """A blocking query: returns (body, X-Nomad-Index) once the index passes ``index``
        or the wait runs out."""
        query = dict(params or {})
        if index > 0:
            query.update(index=index, wait=wait)
        resp = await self._checked("GET", path, params=query)
        return resp.json(), resp.index

    # -- convenience ------------------------------------------------------------------

    async def agent_self(self) -> Any:
        return await self.get("/v1/agent/self")

    async def agent_health(self) -> Any:
        return await self.get("/v1/agent/health")

    async def status_leader(self) -> Any:
        return await self.get("/v1/status/leader")

    # Jobs and allocations: ``namespace`` None means the client's (see the class); on the
    # list calls "*" means every namespace the caller may see.
    async def jobs_list(self, prefix: str | None = None, namespace: str | None = None) -> Any:
        return await self.get("/v1/jobs", {"prefix": prefix, "namespace": namespace})

    async def job_get(self, job_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/job/{_seg(job_id)}", {"namespace": namespace})

    async def job_summary(self, job_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/job/{_seg(job_id)}/summary", {"namespace": namespace})

    async def job_register(self, job: Mapping[str, Any], namespace: str | None = None, *,
                           enforce_index: int | None = None,
                           submission: Mapping[str, Any] | None = None) -> Any:
        """Register ``job``; ``enforce_index``: only if its JobModifyIndex is that (0: only
        if it is new); ``submission``: the source it came from (Nomad's JobSubmission)."""
        return await self.post("/v1/jobs", register_request(job, enforce_index, submission),
                               {"namespace": namespace})

    async def job_plan(self, job: Mapping[str, Any], diff: bool = True,
                       policy_override: bool = False, namespace: str | None = None) -> Any:
        return await self.post(f"/v1/job/{_seg(str(job['ID']))}/plan",
                               {"Job": job, "Diff": diff, "PolicyOverride": policy_override},
                               {"namespace": namespace})

    async def job_deregister(self, job_id: str, purge: bool = False,
                             namespace: str | None = None) -> Any:
        return await self.delete(f"/v1/job/{_seg(job_id)}",
                                 {"purge": purge or None, "namespace": namespace})

    async def job_allocations(self, job_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/job/{_seg(job_id)}/allocations", {"namespace": namespace})

    async def job_evaluations(self, job_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/job/{_seg(job_id)}/evaluations", {"namespace": namespace})

    async def evaluation_get(self, eval_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/evaluation/{_seg(eval_id)}", {"namespace": namespace})

    # -- Job versions, evaluations (``http.endpoints.job_history``, ``evaluations``) --

    async def job_version(self, job_id: str, version: int,
                          namespace: str | None = None) -> Any:
        return await self.get(f"/v1/job/{_seg(job_id)}",
                              {"version": version, "namespace": namespace})

    async def job_versions(self, job_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/job/{_seg(job_id)}/versions", {"namespace": namespace})

    async def job_revert(self, job_id: str, version: int, *,
                         enforce_prior_version: int | None = None,
                         namespace: str | None = None) -> Any:
        body: dict[str, Any] = {"JobID": job_id, "JobVersion": version}
        if enforce_prior_version is not None:
            body["EnforcePriorVersion"] = enforce_prior_version
        return await self.post(f"/v1/job/{_seg(job_id)}/revert", body,
                               {"namespace": namespace})

    async def job_evaluate(self, job_id: str, *, force_reschedule: bool = False,
                           namespace: str | None = None) -> Any:
        return await self.post(f"/v1/job/{_seg(job_id)}/evaluate",
                               {"JobID": job_id,
                                "EvalOptions": {"ForceReschedule": force_reschedule}},
                               {"namespace": namespace})

    async def job_validate(self, job: Mapping[str, Any], namespace: str | None = None) -> Any:
        return await self.post("/v1/validate/job", {"Job": job}, {"namespace": namespace})

    async def job_submission(self, job_id: str, version: int,
                             namespace: str | None = None) -> Any:
        return await self.get(f"/v1/job/{_seg(job_id)}/submission",
                              {"version": version, "namespace": namespace})

    async def evaluations_list(self, prefix: str | None = None,
                               namespace: str | None = None) -> Any:
        return await self.get("/v1/evaluations", {"prefix": prefix, "namespace": namespace})

    async def evaluation_allocations(self, eval_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/evaluation/{_seg(eval_id)}/allocations",
                              {"namespace": namespace})

    async def allocations_list(self, prefix: str | None = None,
                               namespace: str | None = None) -> Any:
        return await self.get("/v1/allocations", {"prefix": prefix, "namespace": namespace})

    async def allocation_get(self, alloc_id: str, namespace: str | None = None) -> Any:
        return await self.get(f"/v1/allocation/{_seg(alloc_id)}", {"namespace": namespace})

    # -- Scaling, dispatch and periodic launches (a child job's ID holds "/": escaped) --

    async def job_scale_status(self, job_id: str, namespace: str | None = None
                               ) -> dict[str, Any]:
        """Nomad's JobScaleStatus: each group's desired and placed counts and its events."""
        return await self.get(f"/v1/job/{_seg(job_id)}/scale", {"namespace": namespace})

    async def job_scale(self, job_id: str, group: str, count: int | None, *,
                        message: str = "", error: bool = False,
                        meta: Mapping[str, Any] | None = None, check_index: int = 0,
                        namespace: str | None = None) -> dict[str, Any]:
        """Scale ``group`` to ``count`` (None: only record a scaling event); with
        ``check_index`` only if the job's modify index is still that."""
        body: dict[str, Any] = {"Count": count, "Target": {"Group": group},
                                "Message": message, "Error": error, "Meta": dict(meta or {}),
                                "JobModifyIndex": check_index}
        return await self.post(f"/v1/job/{_seg(job_id)}/scale", body, {"namespace": namespace})

    async def job_dispatch(self, job_id: str, payload: bytes | None = None,
                           meta: Mapping[str, str] | None = None, *,
                           idempotency_token: str = "", id_prefix_template: str = "",
                           namespace: str | None = None) -> dict[str, Any]:
        """Dispatch the parameterized job: ``{"DispatchedJobID", "EvalID", ...}``."""
        body = {"Payload": base64.b64encode(payload).decode() if payload else None,
                "Meta": dict(meta or {}), "IdempotencyToken": idempotency_token,
                "IdPrefixTemplate": id_prefix_template}
        return await self.post(f"/v1/job/{_seg(job_id)}/dispatch", body,
                               {"namespace": namespace})

    async def job_periodic_force(self, job_id: str, namespace: str | None = None
                                 ) -> dict[str, Any]:
        """Launch a child of the periodic job now: ``{"EvalID", "EvalCreateIndex", ...}``."""
        return await self.post(f"/v1/job/{_seg(job_id)}/periodic/force", None,
                               {"namespace": namespace})

    async def scaling_policies(self, job: str | None = None, policy_type: str | None = None,
                               prefix: str | None = None, namespace: str | None = None
                               ) -> list[dict[str, Any]]:
        return await self.get("/v1/scaling/policies", {
            "job": job, "type": policy_type, "prefix": prefix, "namespace": namespace}) or []

    async def scaling_policy(self, policy_id: str, namespace: str | None = None
                             ) -> dict[str, Any]:
        return await self.get(f"/v1/scaling/policy/{_seg(policy_id)}",
                              {"namespace": namespace})

    # -- Namespaces (Nomad's /v1/namespaces and /v1/namespace/:name) --

    async def namespaces(self, prefix: str | None = None) -> list[dict[str, Any]]:
        """The namespaces the caller holds any capability in, by name."""
        return await self.get("/v1/namespaces", {"prefix": prefix or None}) or []

    async def namespace(self, name: str) -> dict[str, Any]:
        return await self.get(f"/v1/namespace/{_seg(name)}")

    async def apply_namespace(self, namespace: Mapping[str, Any]) -> int:
        """Create or replace the namespace ``namespace["Name"]`` (Nomad's object); the
        write's index."""
        name = str(namespace.get("Name") or "")
        path = f"/v1/namespace/{_seg(name)}" if name else "/v1/namespace"
        return (await self._checked("PUT", path, json=dict(namespace))).index

    async def delete_namespace(self, name: str) -> int:
        return (await self._checked("DELETE", f"/v1/namespace/{_seg(name)}")).index

    async def nodes_list(self, prefix: str | None = None, filter: str | None = None) -> Any:
        return await self.get("/v1/nodes", {"prefix": prefix, "filter": filter})

    async def node_get(self, node_id: str) -> Any:
        return await self.get(f"/v1/node/{_seg(node_id)}")

    async def node_eligibility(self, node_id: str, eligible: bool) -> Any:
        return await self.post(f"/v1/node/{_seg(node_id)}/eligibility", {
            "NodeID": node_id, "Eligibility": "eligible" if eligible else "ineligible"})

    async def node_drain(self, node_id: str, deadline_ns: int | None, *,
                         ignore_system_jobs: bool = False, mark_eligible: bool = False) -> Any:
        """Start a drain (``deadline_ns``: 0 none, negative at once), or cancel one (None)."""
        spec = None if deadline_ns is None else {"Deadline": deadline_ns,
                                                 "IgnoreSystemJobs": ignore_system_jobs}
        return await self.post(f"/v1/node/{_seg(node_id)}/drain", {
            "NodeID": node_id, "DrainSpec": spec, "MarkEligible": mark_eligible})

    async def metrics(self, format: str | None = None) -> Any:
        """The agent's metrics: JSON, or the Prometheus text with ``format="prometheus"``."""
        if format == "prometheus":
            return (await self._checked("GET", "/v1/metrics",
                                        params={"format": format})).text()
        return await self.get("/v1/metrics")

    async def system_gc(self) -> Any:
        return await self.put("/v1/system/gc")

    async def client_gc(self, node_id: str | None = None) -> Any:
        return await self.put("/v1/client/gc", None, {"node_id": node_id or None})

    async def client_metadata_read(self, node_id: str | None = None) -> Any:
        return await self.get("/v1/client/metadata", {"node_id": node_id or None})

    async def client_metadata_apply(self, meta: Mapping[str, str | None],
                                    node_id: str | None = None) -> Any:
        return await self.post("/v1/client/metadata", {"Meta": dict(meta)},
                               {"node_id": node_id or None})

    async def fs_ls(self, alloc_id: str, path: str = "/") -> Any:
        return await self.get(f"/v1/client/fs/ls/{_seg(alloc_id)}", {"path": path})

    async def fs_stat(self, alloc_id: str, path: str) -> Any:
        return await self.get(f"/v1/client/fs/stat/{_seg(alloc_id)}", {"path": path})

    async def fs_cat(self, alloc_id: str, path: str) -> bytes:
        return await self.get_bytes(f"/v1/client/fs/cat/{_seg(alloc_id)}", {"path": path})

    async def fs_readat(self, alloc_id: str, path: str, offset: int = 0,
                        limit: int = 0) -> bytes:
        """``limit`` bytes of the file from ``offset`` (0: to its end)."""
        return await self.get_bytes(f"/v1/client/fs/readat/{_seg(alloc_id)}",
                                    {"path": path, "offset": offset, "limit": limit or None})

    def fs_stream(self, alloc_id: str, path: str, *, offset: int = 0, origin: str = "start",
                  follow: bool = True) -> AsyncIterator[dict[str, Any]]:
        """The file's ``StreamFrame``s (``Offset``, ``Data`` decoded to bytes, ``File``,
        ``FileEvent``) as they come, heartbeats left out; followed until it is deleted."""
        params = {"path": path, "offset": offset, "origin": origin,
                  "follow": str(follow).lower()}
        return _stream_frames(self.stream_body(f"/v1/client/fs/stream/{_seg(alloc_id)}",
                                               params, idle_timeout=self.timeout))

    def fs_stream_plain(self, alloc_id: str, path: str, *, offset: int = 0,
                        origin: str = "start", follow: bool = True) -> AsyncIterator[bytes]:
        """The file's bytes as they come (``plain=true``: no frames, no heartbeats)."""
        params = {"path": path, "offset": offset, "origin": origin,
                  "follow": str(follow).lower(), "plain": "true"}
        return self.stream_body(f"/v1/client/fs/stream/{_seg(alloc_id)}", params,
                                idle_timeout=None)

    def alloc_logs_stream(self, alloc_id: str, task: str, *, stderr: bool = False,
                          follow: bool = False, origin: str = "start", offset: int = 0
                          ) -> AsyncIterator[bytes]:
        """A task's log bytes as they come (``plain=true``); with ``follow`` until the
        task is dead and its log read. ``origin="end"``: the last ``offset`` bytes first."""
        # Only what differs from a plain read: the query of ``alloc_logs``, extended.
        params = {"task": task, "type": "stderr" if stderr else "stdout", "plain": "true",
                  "follow": "true" if follow else None,
                  "origin": None if origin == "start" else origin, "offset": offset or None}
        return self.stream_body(f"/v1/client/fs/logs/{_seg(alloc_id)}", params,
                                idle_timeout=None)

    async def alloc_logs(self, alloc_id: str, task: str, stderr: bool = False) -> bytes:
        return await self.get_bytes(
            f"/v1/client/fs/logs/{_seg(alloc_id)}",
            {"task": task, "type": "stderr" if stderr else "stdout", "plain": "true"},
        )

    # -- alloc exec: a websocket of Nomad's exec frames (``namespace``: the allocation's) --

    @contextlib.asynccontextmanager
    async def alloc_exec(self, alloc_id: str, task: str, command: Sequence[str], *,
                         tty: bool = False, namespace: str | None = None
                         ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """The exec session's websocket. A refusal before the upgrade raises ``ApiError``
        with the agent's reason; an unreachable agent ``ApiConnectionError``."""
        path = f"/v1/client/allocation/{_seg(alloc_id)}/exec"
        params = {"task": task, "command": jsonlib.dumps(list(command)), "tty": tty,
                  "namespace": namespace or self.default_namespace,
                  "region": self.default_region}
        headers = {"X-Nomad-Token": self.token} if self.token else {}
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=self._connect_path()) if self._socket_path is not None
            else aiohttp.TCPConnector())
        # A session of its own: it lasts as long as the command, past the API's timeout.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            try:
                ws = await session.ws_connect(self._base + path, params=_encode_params(params),
                                              headers=headers, autoping=True)
            except aiohttp.WSServerHandshakeError as exc:
                # aiohttp drops a refusal's body: ask again, without the upgrade, for it.
                resp = await self.request("GET", path, params=params)
                raise ApiError(exc.status, resp.text() if resp.status >= 400
                               else exc.message) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise ApiConnectionError("GET", self._base + path, self._dial_target(),
                                         _reason(exc)) from exc
            async with ws:
                yield ws

    # -- Allocation control and resource usage (``namespace``: the allocation's) --

    async def alloc_stop(self, alloc_id: str, *, no_shutdown_delay: bool = False,
                         namespace: str | None = None) -> dict[str, Any]:
        """Stop an allocation (it is replaced); ``{"EvalID", "Index"}``."""
        return await self.post(f"/v1/allocation/{_seg(alloc_id)}/stop", params={
            "no_shutdown_delay": no_shutdown_delay or None, "namespace": namespace})

    async def alloc_restart(self, alloc_id: str, task: str | None = None, *,
                            all_tasks: bool = False, namespace: str | None = None) -> None:
        """Restart ``task`` in place, or every running task; returns once they exited."""
        body: dict[str, Any] = {"TaskName": task or "", "AllTasks": all_tasks}
        await self.put(f"/v1/client/allocation/{_seg(alloc_id)}/restart", body,
                       {"namespace": namespace})

    async def alloc_signal(self, alloc_id: str, signal: str, task: str | None = None, *,
                           namespace: str | None = None) -> None:
        """Send ``signal`` to ``task``, or to every running task of the allocation."""
        await self.put(f"/v1/client/allocation/{_seg(alloc_id)}/signal",
                       {"Signal": signal, "Task": task or ""}, {"namespace": namespace})

    async def alloc_stats(self, alloc_id: str, task: str | None = None, *,
                          namespace: str | None = None) -> dict[str, Any]:
        """Nomad's ``AllocResourceUsage`` (only ``task``'s when given)."""
        return await self.get(f"/v1/client/allocation/{_seg(alloc_id)}/stats",
                              {"task": task, "namespace": namespace})

    async def client_stats(self, node_id: str | None = None) -> dict[str, Any]:
        """Nomad's ``HostStats`` of the agent's node (``node_id`` must name it)."""
        return await self.get("/v1/client/stats", {"node_id": node_id or None})

    # -- Service discovery (``namespace``: the registrations'; "*" on lists: every one) --

    async def services_list(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """``[{"Namespace", "Services": [{"ServiceName", "Tags"}]}]``."""
        return await self.get("/v1/services", {"namespace": namespace}) or []

    async def service_registrations(self, name: str, *, namespace: str | None = None,
                                    tags: Sequence[str] = (), filter: str | None = None,
                                    choose: str | None = None) -> list[dict[str, Any]]:
        """The registrations of service ``name``; ``tags`` must all be among theirs,
        ``choose`` is ``"<n>|<key>"``."""
        return await self.get(f"/v1/service/{_seg(name)}", {
            "namespace": namespace, "tag": list(tags) or None, "filter": filter,
            "choose": choose}) or []

    async def service_delete(self, name: str, service_id: str,
                             namespace: str | None = None) -> int:
        """Delete one registration; the write's index."""
        return (await self._checked("DELETE", f"/v1/service/{_seg(name)}/{_seg(service_id)}",
                                    params={"namespace": namespace})).index

    async def alloc_services(self, alloc_id: str,
                             namespace: str | None = None) -> list[dict[str, Any]]:
        return await self.get(f"/v1/allocation/{_seg(alloc_id)}/services",
                              {"namespace": namespace}) or []

    async def alloc_checks(self, alloc_id: str, namespace: str | None = None
                           ) -> dict[str, Any]:
        """Check ID -> the latest result of the allocation's service checks."""
        return await self.get(f"/v1/allocation/{_seg(alloc_id)}/checks",
                              {"namespace": namespace}) or {}

    # -- ACL (bodies and answers in Nomad's shapes; writes use PUT, as Nomad's CLI does) --

    async def acl_bootstrap(self, secret: str | None = None) -> dict[str, Any]:
        """The new management token; ``secret``, when given, becomes its SecretID."""
        body = {"BootstrapSecret": secret} if secret else None
        return await self.put("/v1/acl/bootstrap", body)

    async def acl_policies(self) -> list[dict[str, Any]]:
        return await self.get("/v1/acl/policies") or []

    async def acl_policy(self, name: str) -> dict[str, Any]:
        return await self.get(f"/v1/acl/policy/{_seg(name)}")

    async def acl_policies_self(self) -> list[dict[str, Any]]:
        """The policies that apply to the caller (for a workload identity: those attached
        to its job)."""
        return await self.get("/v1/acl/policy/self") or []

    async def acl_policy_apply(self, policy: Mapping[str, Any]) -> None:
        """Create or replace the policy named ``policy["Name"]``."""
        await self.put(f"/v1/acl/policy/{_seg(str(policy['Name']))}", dict(policy))

    async def acl_policy_delete(self, name: str) -> None:
        await self.delete(f"/v1/acl/policy/{_seg(name)}")

    async def acl_tokens(self) -> list[dict[str, Any]]:
        return await self.get("/v1/acl/tokens") or []

    async def acl_token(self, accessor_id: str) -> dict[str, Any]:
        return await self.get(f"/v1/acl/token/{_seg(accessor_id)}")

    async def acl_token_self(self) -> dict[str, Any]:
        return await self.get("/v1/acl/token/self")

    async def acl_token_create(self, token: Mapping[str, Any]) -> dict[str, Any]:
        return await self.put("/v1/acl/token", dict(token))

    async def acl_token_update(self, token: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``token`` over the stored token ``token["AccessorID"]``."""
        path = f"/v1/acl/token/{_seg(str(token['AccessorID']))}"
        return await self.put(path, dict(token))

    async def acl_token_delete(self, accessor_id: str) -> None:
        await self.delete(f"/v1/acl/token/{_seg(accessor_id)}")

    async def acl_roles(self) -> list[dict[str, Any]]:
        return await self.get("/v1/acl/roles") or []

    async def acl_role(self, role_id: str) -> dict[str, Any]:
        return await self.get(f"/v1/acl/role/{_seg(role_id)}")

    async def acl_role_by_name(self, name: str) -> dict[str, Any]:
        return await self.get(f"/v1/acl/role/name/{_seg(name)}")

    async def acl_role_create(self, role: Mapping[str, Any]) -> dict[str, Any]:
        return await self.put("/v1/acl/role", dict(role))

    async def acl_role_update(self, role: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``role`` over the stored role ``role["ID"]``."""
        path = f"/v1/acl/role/{_seg(str(role['ID']))}"
        return await self.put(path, dict(role))

    async def acl_role_delete(self, role_id: str) -> None:
        await self.delete(f"/v1/acl/role/{_seg(role_id)}")

    # -- Operator: the root keyring (Nomad's /v1/operator/keyring/*) --

    async def keyring_keys(self) -> list[dict[str, Any]]:
        """Every root key's metadata (``KeyID``, ``State``, ``CreateTime`` in unix ns…)."""
        return await self.get("/v1/operator/keyring/keys") or []

    async def keyring_rotate(self, *, full: bool = False) -> dict[str, Any]:
        """A new active root key; ``full`` re-seals everything stored with the new one.
        Answers ``{"Key": <metadata>, "Index": N}``."""
        return await self.put("/v1/operator/keyring/rotate", None,
                              {"full": "true" if full else None})

    # -- Variables (Nomad's /v1/vars and /v1/var/:path; 409 arrives as ApiError.status) --

    @staticmethod
    def _var_route(path: str) -> str:
        # As Nomad's Go client: surrounding slashes and spaces are not part of the path, and
        # the slashes inside it are path separators of the route, not escaped.
        return "/v1/var/" + quote(path.strip(" /"), safe="/")

    async def variables_list(self, prefix: str = "",
                             namespace: str | None = None) -> list[dict[str, Any]]:
        """Metadata (no Items) of the variables under ``prefix`` the caller may list."""
        return await self.get("/v1/vars", {"prefix": prefix or None,
                                           "namespace": namespace or None}) or []

    async def variable_read(self, path: str, namespace: str | None = None) -> dict[str, Any]:
        return await self.get(self._var_route(path), {"namespace": namespace or None})

    async def variable_read_blocking(self, path: str, index: int, wait: str = "5s",
                                     namespace: str | None = None,
                                     ) -> tuple[dict[str, Any], int]:
        """The variable once its ModifyIndex passes ``index`` (or the wait runs out), with
        the index to pass next."""
        return await self.get_blocking(self._var_route(path), index, wait,
                                       {"namespace": namespace or None})

    async def variable_write(self, path: str, items: Mapping[str, str], *,
                             cas: int | None = None,
                             namespace: str | None = None) -> dict[str, Any]:
        """Write ``items``; with ``cas`` only if the stored ModifyIndex equals it (0: only if
        absent), else ApiError 409 whose body is the stored variable."""
        return await self.put(self._var_route(path), {"Items": dict(items)},
                              {"cas": cas, "namespace": namespace or None})

    async def variable_delete(self, path: str, *, cas: int | None = None,
                              namespace: str | None = None) -> None:
        await self._checked("DELETE", self._var_route(path),
                            params={"cas": cas, "namespace": namespace or None})

    async def variable_lock_acquire(self, path: str, lock: Mapping[str, Any],
                                    items: Mapping[str, str] | None = None,
                                    namespace: str | None = None) -> dict[str, Any]:
        """Take the lock (``{"TTL": "15s", "LockDelay": "15s"}``); the answer's ``Lock.ID``
        names the holder. Held by another → ApiError 409. Nomad replaces the stored items
        with ``items`` (none when not given)."""
        body: dict[str, Any] = {"Lock": dict(lock)}
        if items:
            body["Items"] = dict(items)
        return await self.put(self._var_route(path), body,
                              {"lock-acquire": "", "namespace": namespace or None})

    async def variable_lock_renew(self, path: str, lock_id: str,
                                  namespace: str | None = None) -> dict[str, Any]:
        """Extend the lock; ApiError 409 when it is no longer ours."""
        return await self.put(self._var_route(path), {"Lock": {"ID": lock_id}},
                              {"lock-renew": "", "namespace": namespace or None})

    async def variable_lock_release(self, path: str, lock_id: str,
                                    namespace: str | None = None) -> dict[str, Any]:
        return await self.put(self._var_route(path), {"Lock": {"ID": lock_id}},
                              {"lock-release": "", "namespace": namespace or None})

    # -- event stream -------------------------------------------------------------------

    async def event_stream(self, topics: Sequence[str] = (), *, index: int = 0,
                           namespace: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Each batch of ``GET /v1/event/stream`` (``{"Index", "Events"}``) as it arrives,
        heartbeats left out. ``topics``: ``"Topic"`` or ``"Topic:key"`` (none: every topic).

        Raises ApiError when the subscription is refused, EventStreamClosed when the agent
        ends the stream, and ApiConnectionError when the agent cannot be reached or stays
        silent longer than the client's timeout (it sends a heartbeat every few seconds).
        """
        params = {"index": index, "topic": list(topics) or None,
                  "namespace": namespace or self.default_namespace}
        pending = bytearray()
        async for chunk in self.stream_body("/v1/event/stream", params,
                                            idle_timeout=self.timeout):
            pending += chunk
            if b"\n" not in chunk:
                continue  # a long line arriving in pieces is split only once
            *lines, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in lines:
                message = jsonlib.loads(line) if line.strip() else {}
                if "Error" in message:
                    raise EventStreamClosed(message["Error"])
                if message:
                    yield message

    async def stream_body(self, path: str, params: Mapping[str, Any] | None, *,
                          idle_timeout: float | None) -> AsyncIterator[bytes]:
        """GET ``path`` and yield its body piece by piece as it arrives (no total timeout:
        a stream lasts; ``idle_timeout``: the longest silence, None for none).

        Raises ApiError for a refusal and ApiConnectionError when the agent cannot be
        reached or stays silent too long."""
        url = self._base + path
        headers = {"X-Nomad-Token": self.token} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                        sock_read=idle_timeout)
        try:
            async with self._get_session().get(url, params=_encode_params(params),
                                               headers=headers, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise ApiError(resp.status, (await resp.read()).decode("utf-8", "replace"))
                async for chunk in resp.content.iter_any():
                    yield chunk
        except TimeoutError as exc:
            raise ApiConnectionError("GET", url, self._dial_target(), "i/o timeout") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiConnectionError("GET", url, self._dial_target(), _reason(exc)) from exc


def register_request(job: Mapping[str, Any], enforce_index: int | None = None,
                     submission: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The body of a job registration (Nomad's JobRegisterRequest)."""
    body: dict[str, Any] = {"Job": job}
    if enforce_index is not None:
        body.update(EnforceIndex=True, JobModifyIndex=enforce_index)
    if submission is not None:
        body["Submission"] = dict(submission)
    return body
