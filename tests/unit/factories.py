"""Builders the unit tests share; the fixtures built from them are in ``conftest.py``.

* records in the shapes the server stores: ``node``, ``job``, ``make_alloc``, ``acl_token``;
* a real API: a server, the router with every endpoint, served on real sockets
  (``serve_api``: TCP and, through a ``TaskAPIServer``, a task's socket), and optionally a
  real client running mock tasks (``start_agent``);
* waiting on conditions, never for a fixed time: ``wait_until``, ``settle``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiohttp
import attrs

from nomad_client.agent.client import Client, ClientSettings
from nomad_client.allocrunner.hooks import TaskSocketInfo
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.drivers.base import Driver
from nomad_client.client.drivers.mock import MockDriver
from nomad_client.client.servers import ServerRPC
from nomad_client.client.taskapi_config import LiveTaskAPIConfig, TaskAPIConfig
from nomad_client.http.context import TCP_LISTENER, ListenerContext
from nomad_client.http.endpoints import register_all
from nomad_client.http.listeners import Listener, tcp_socket
from nomad_client.http.router import Router
from nomad_client.http.services import LocalClient, Services
from nomad_client.http.taskapi import TaskAPIServer
from nomad_client.server.keyring import Keyring
from nomad_client.server.rpc import InProcessTransport
from nomad_client.server.sealing import Sealer
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB
from nomad_client.structs.models import ACLToken, Allocation, DriverInfo, Node

T = TypeVar("T")

# Seals the credential fields of a state store's records (a fixed test key).
SEALER = Sealer("00000000-0000-4000-8000-000000000000", bytes(range(32)))


class NoProcesses:
    """A task with no running process: only root peers pass a peer-credential check."""

    def root(self) -> tuple[int, float] | None:
        return None

    async def started(self) -> None:
        return None  # never will have one: do not wait


# The task whose socket ``serve_api`` adds: task "t" of allocation "a" (job "j").
TASK_INFO = TaskSocketInfo(alloc_id="a", task="t", namespace="default", job_id="j",
                           processes=NoProcesses())


# ---- records ---------------------------------------------------------------------------
def node(node_id: str = "n1", **changes: Any) -> Node:
    """A ready linux node in dc1 (meta ``rack = r1``) with a healthy raw_exec driver."""
    fields: dict[str, Any] = dict(
        id=node_id, name=node_id, datacenter="dc1", http_addr="127.0.0.1:4646",
        status="ready", attributes={"kernel.name": "linux"}, meta={"rack": "r1"},
        drivers={"raw_exec": DriverInfo(detected=True, healthy=True)})
    return Node(**(fields | changes))


def job(count: int = 1, driver: str = "raw_exec", *, task: Mapping[str, Any] | None = None,
        **fields: Any) -> dict[str, Any]:
    """Service job "web" for any ``dc*``: group "g" runs ``count`` copies of task "t".
    ``task`` adds fields to the task, ``fields`` to the job."""
    return {"ID": "web", "Type": "service", "Datacenters": ["dc*"],
            "TaskGroups": [{"Name": "g", "Count": count,
                            "Tasks": [{"Name": "t", "Driver": driver, **(task or {})}]}],
            **fields}


def make_alloc(**changes: Any) -> Allocation:
    """A running allocation of job "j" (group "g", task "t") on node "n"."""
    alloc = Allocation(id=str(uuid.uuid4()), namespace="default", eval_id="e", name="j.g[0]",
                       node_id="n", node_name="n", job_id="j",
                       job={"ID": "j", "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t"}]}]},
                       task_group="g", client_status="running")
    return attrs.evolve(alloc, **changes)


def acl_token(kind: str = "management", expires: float | None = None) -> ACLToken:
    """A new ACL token: management, or a client token holding policy "p"."""
    return ACLToken(accessor_id=str(uuid.uuid4()), secret_id=str(uuid.uuid4()), name="t",
                    type=kind, policies=() if kind == "management" else ("p",),
                    expiration_time=None if expires is None else int(expires * 1e9))


def identity_token(keyring: Keyring, alloc: Allocation, task: str = "t", **kw: Any) -> str:
    """The workload identity of ``task`` in ``alloc``, signed by ``keyring``."""
    return keyring.sign_identity(namespace=alloc.namespace, job_id=alloc.job_id,
                                 alloc_id=alloc.id, task=task, group=alloc.task_group,
                                 region="global", **kw)


async def seed(server: Server, *, tokens: tuple[ACLToken, ...] = (),
               allocs: tuple[Allocation, ...] = ()) -> None:
    """Write ACL tokens and allocations straight into the server's state."""
    await server.store.write({"acl_tokens": [(t.accessor_id, t) for t in tokens],
                              "allocs": [(a.id, a) for a in allocs]})


# ---- a real API --------------------------------------------------------------------------
def task_api_server(router: Router, config: TaskAPIConfig | LiveTaskAPIConfig | None = None,
                    *, audit_dir: Path | None = None) -> TaskAPIServer:
    """The Task API server over ``router`` with ``config`` (the defaults unless given); its
    default audit log goes in ``audit_dir`` (a path that is never created unless a test
    turns the audit log on)."""
    live = config if isinstance(config, LiveTaskAPIConfig) else LiveTaskAPIConfig(config)
    audit_path = (audit_dir or Path(tempfile.gettempdir()) / "unit-audit-unused") / "audit.log"
    return TaskAPIServer(router, live, audit_path=audit_path, node_id=lambda: "node-1")


def make_server(keyring: Keyring, *, acl: bool = False, store: StateStore | None = None
                ) -> Server:
    """A server of region "global" (an in-memory store unless ``store`` is given)."""
    return Server(store if store is not None else StateStore(), keyring, region="global",
                  acl_enabled=acl)


@attrs.define
class OneAllocClient:
    """The local client as the endpoints see it: one allocation's directory."""

    adir: AllocDir
    node_id: str = "node-1"

    def metadata(self) -> dict[str, Any]:
        return {}

    async def apply_metadata(self, meta: dict[str, str | None]) -> dict[str, Any]:
        return {}

    def alloc_dir_for(self, alloc_id: str) -> AllocDir | None:
        return self.adir if alloc_id == self.adir.alloc_id else None

    def healthy(self) -> tuple[bool, str]:
        return True, "ok"


def unix_socket(path: Path) -> socket.socket:
    """A listening, non-blocking Unix socket bound at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@attrs.define
class ServedAPI:
    """A server's API on real listeners: a TCP port of 127.0.0.1 and any added sockets."""

    server: Server
    router: Router
    tcp: tuple[str, int]
    task_sock: Path | None = None
    listeners: list[Listener] = attrs.field(factory=list)
    task_api: TaskAPIServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.tcp[0]}:{self.tcp[1]}"

    async def listen(self, ctx: ListenerContext, sock: socket.socket) -> None:
        """Serve the router on ``sock`` too, as the listener ``ctx`` describes."""
        listener = Listener(self.router, ctx, sock)
        self.listeners.append(listener)  # closed by close() even if it fails to start
        await listener.start()

    async def serve_task(self, sock: socket.socket, info: TaskSocketInfo = TASK_INFO) -> None:
        """Serve ``sock`` as the Task API of the task ``info`` names."""
        assert self.task_api is not None
        self.listeners.append(await self.task_api.serve(sock, info))

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close()
        if self.task_api is not None:
            await self.task_api.close()


async def serve_api(server: Server, *, client: LocalClient | None = None,
                    router: Router | None = None, task_sock: Path | None = None,
                    task_api: TaskAPIServer | None = None) -> ServedAPI:
    """Register every endpoint on ``router`` (a new one by default) and serve it over TCP
    and, with ``task_sock``, as the Task API of task "t" of allocation "a" there (through
    ``task_api``, by default one with the default config)."""
    router = router if router is not None else Router(server)
    register_all(router, Services(server=server, client=client, agent_config={},
                                  member={"Name": "unit", "Addr": "127.0.0.1", "Port": 0}))
    tsock = tcp_socket("127.0.0.1", 0)
    api = ServedAPI(server, router, tsock.getsockname()[:2], task_sock,
                    task_api=task_api if task_api is not None else task_api_server(router))
    try:
        await api.listen(TCP_LISTENER, tsock)
        if task_sock is not None:
            await api.serve_task(unix_socket(task_sock))
    except BaseException:
        await api.close()
        raise
    return api


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[ServedAPI]:
    """``server``'s API served over TCP (``serve_api``) for the block; afterwards the API and
    the server are closed (a fixture sets the server up, then yields inside this)."""
    try:
        api = await serve_api(server)
        try:
            yield api
        finally:
            await api.close()
    finally:
        await server.close()


@attrs.define
class InProcessAgent:
    """A server with its API on real sockets and, optionally, a client of its own."""

    server: Server
    api: ServedAPI
    client: Client | None = None

    async def stop(self) -> None:
        try:
            if self.client is not None:
                await self.client.shutdown(stop_tasks=True)
                await self.client.db.close()
        finally:
            await self.api.close()


async def start_agent(base: Path, keyring: Keyring, *, acl: bool = False,
                      with_client: bool = True, task_sock: Path | None = None,
                      node_name: str = "client-1",
                      static_meta: Mapping[str, str] | None = None,
                      drivers: Mapping[str, Driver] | None = None,
                      router_type: Callable[[Server], Router] = Router,
                      task_api_config: TaskAPIConfig | LiveTaskAPIConfig | None = None
                      ) -> InProcessAgent:
    """An agent in this process: server, router (a ``router_type``) and listeners (see
    ``serve_api``) and, with ``with_client``, a client in dc1 keeping its files under
    ``base``. The client's drivers are ``drivers``, by default only the mock driver: whatever
    a test (or a fuzzed request) registers, no process runs. Task sockets are served under
    ``task_api_config`` (the defaults unless given)."""
    base.mkdir(parents=True, exist_ok=True)
    server = make_server(keyring, acl=acl)
    router = router_type(server)
    # One live config, as in the agent: the client decides who gets a socket by it, the
    # Task API server serves the sockets by it.
    live = (task_api_config if isinstance(task_api_config, LiveTaskAPIConfig)
            else LiveTaskAPIConfig(task_api_config))
    task_api = task_api_server(router, live, audit_dir=base / "audit")
    client = None
    if with_client:
        settings = ClientSettings(
            data_dir=base, alloc_dir=base / "alloc", state_dir=base / "client",
            name=node_name, datacenter="dc1", region="global", http_addr="127.0.0.1:0",
            static_meta=dict(static_meta or {}), task_api=live)
        client = Client(settings, ServerRPC(InProcessTransport(server)),
                        await StateDB.open(base / "client" / "state.db"), task_api,
                        drivers=drivers or {"mock_driver": MockDriver()})
    try:
        api = await serve_api(server, client=client, router=router, task_sock=task_sock,
                              task_api=task_api)
    except BaseException:
        if client is not None:
            await client.db.close()
        raise
    agent = InProcessAgent(server, api, client)
    try:
        if client is not None:
            await client.start()
    except BaseException:
        await agent.stop()
        raise
    return agent


# ---- directories, files, loops and waiting ---------------------------------------------
@contextlib.contextmanager
def fresh_dir(prefix: str, mode: int | None = None) -> Iterator[Path]:
    """A new directory outside pytest's tmp tree (its paths are short enough for a socket's
    ``sun_path``), with ``mode`` if given; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if mode is not None:
            path.chmod(mode)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_file(directory: Path, name: str, text: str) -> Path:
    """The file ``name`` in ``directory``, holding ``text``."""
    path = directory / name
    path.write_text(text)
    return path


def run_in_own_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new event loop in a worker thread and return its result: for
    synchronous (e.g. session-scoped) fixtures, without touching this thread's loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def wait_until(check: Callable[[], Any], what: str = "the condition",
                     timeout: float = 15.0) -> Any:
    """Poll ``check`` (a function or a coroutine function) until it returns something true,
    and return that; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def settle() -> None:
    """Let freshly started tasks run until they block: each gets the loop many times over,
    so one that would finish without outside help has finished."""
    for _ in range(20):
        await asyncio.sleep(0)


class HttpAnswer(NamedTuple):
    """What an HTTP call to a test server answered."""

    status: int
    body: Any  # decoded JSON, or the plain text of an error / empty write answer
    headers: Mapping[str, str]

    @property
    def nomad_index(self) -> int | None:
        index = self.headers.get("X-Nomad-Index")
        return int(index) if index else None


async def call_http(session: aiohttp.ClientSession, url: str, method: str, path: str,
                    body: Any = None, *, token: str = "", data: bytes | None = None
                    ) -> HttpAnswer:
    """One request with ``token`` (none if empty) and a JSON ``body`` (or raw ``data``)."""
    headers = {"X-Nomad-Token": token} if token else {}
    payload = json.dumps(body).encode() if body is not None else data
    async with session.request(method, url + path, headers=headers, data=payload) as r:
        text = await r.text()
        decoded = json.loads(text) if r.content_type == "application/json" else text
        return HttpAnswer(r.status, decoded, r.headers)


async def call_http_once(url: str, method: str, path: str, body: Any = None, *,
                         token: str = "") -> HttpAnswer:
    """``call_http`` on a session of its own, for a test that makes one request at a time."""
    async with aiohttp.ClientSession() as session:
        return await call_http(session, url, method, path, body, token=token)


# ---- the Task API over a real socket ----------------------------------------------------
async def call_unix(path: Path | str, method: str, target: str, *, token: str = "",
                    data: bytes | None = None) -> HttpAnswer:
    """One request over the Unix socket at ``path`` (``target``: path and query)."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as session:
        return await call_http(session, "http://localhost", method, target, token=token,
                               data=data)


async def raw_exchange(path: Path | str, request: bytes) -> HttpAnswer:
    """``request`` sent byte for byte (no client library re-spells its target) on a new
    connection to the Unix socket at ``path``; the answer, its body as text."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in
                   (line.partition(":") for line in lines[1:] if line)}
        length = 0 if request.startswith(b"HEAD ") else int(headers.get("content-length", 0))
        body = await asyncio.wait_for(reader.readexactly(length), 15)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return HttpAnswer(int(lines[0].split(" ")[1]), body.decode(), headers)


def request_bytes(method: str, target: str, token: str = "", body: bytes = b"") -> bytes:
    """An HTTP/1.1 request with ``target`` exactly as given."""
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if token:
        head += f"X-Nomad-Token: {token}\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


@attrs.define
class TaskAPIStack:
    """A server-only agent whose task "t" of ``alloc`` has a socket at ``sock``, served under
    the live config ``live``; ``token`` is that task's workload identity."""

    agent: InProcessAgent
    live: LiveTaskAPIConfig
    alloc: Allocation
    token: str
    sock: Path

    @property
    def task_api(self) -> TaskAPIServer:
        assert self.agent.api.task_api is not None
        return self.agent.api.task_api

    async def configure(self, **changes: Any) -> None:
        """Replace the live config (as a reload does) and tell the server."""
        self.live.replace(attrs.evolve(self.live.current, **changes))
        await self.task_api.reconfigure()

    async def call(self, method: str, target: str, *, token: str | None = None,
                   data: bytes | None = None) -> HttpAnswer:
        """One request over the task's socket, with the task's identity unless ``token``."""
        return await call_unix(self.sock, method, target,
                               token=self.token if token is None else token, data=data)

    async def stop(self) -> None:
        await self.agent.stop()


async def task_api_stack(base: Path, keyring: Keyring, config: TaskAPIConfig | None = None,
                         *, acl: bool = False) -> TaskAPIStack:
    """A ``TaskAPIStack`` under ``base`` (short enough for the socket's path) whose alloc
    "a" runs task "t" (the socket's task), with ``config`` (the defaults unless given)."""
    live = LiveTaskAPIConfig(config)
    sock = base / "api.sock"
    agent = await start_agent(base, keyring, acl=acl, with_client=False, task_sock=sock,
                              task_api_config=live)
    try:
        alloc = make_alloc(id=TASK_INFO.alloc_id)
        await seed(agent.server, allocs=(alloc,))
    except BaseException:
        await agent.stop()
        raise
    return TaskAPIStack(agent, live, alloc, identity_token(keyring, alloc), sock)


class ManualClock:
    """Unix seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
