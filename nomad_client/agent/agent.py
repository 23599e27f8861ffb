"""The agent: wires its server (``agent.server_role``), the client, the router and the TCP
listener, and owns their start, stop and live reload.

Roles: an agent runs a server when ``server.enabled``, in ``-dev``, or when its client names
no ``servers`` (then the client uses this agent's own server in process, as before cluster
mode existed). A client-only agent (``client.servers`` set) reaches the servers over TCP RPC:
credentials through ``agent.acl_cache``, server routes forwarded (``http.forward``).

Start order: data dir -> server state + keyring -> router + endpoints -> TCP listener ->
server RPC listener and leadership -> client (which restores allocations, recreating their
Task API sockets). Stop order is the reverse; with ``dev_mode`` tasks are killed and the
temporary data dir removed, otherwise tasks keep running for the next agent to reattach.

Reload: only ``client { task_api { ... } }`` changes while the agent runs. The one
``LiveTaskAPIConfig`` is shared by the client (who gets a socket) and the Task API server
(rules, limits, peer checks, audit), which read it per decision, request or connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs

from nomad_client.agent.acl_cache import RemoteCredentials
from nomad_client.agent.client import Client, ClientSettings
from nomad_client.agent.config import AgentConfig, advertise_http_url, exec_driver_config
from nomad_client.agent.server_role import (
    EtcdClusterView,
    ServerRole,
    SingleServerView,
    tls_settings,
)
from nomad_client.client.drivers import builtin_drivers
from nomad_client.client.rpc_tcp import TcpTransport
from nomad_client.client.servers import ServerRPC
from nomad_client.client.taskapi_config import LiveTaskAPIConfig, TaskAPIConfig
from nomad_client.http.auth import CredentialSource
from nomad_client.http.context import TCP_LISTENER
from nomad_client.http.endpoints import register_all
from nomad_client.http.forward import HTTPForwarder, forwarded_dispatch
from nomad_client.http.listeners import Listener, tcp_socket
from nomad_client.http.router import Router
from nomad_client.http.services import ClusterView, EmbeddedCluster, Services
from nomad_client.http.taskapi import TaskAPIServer
from nomad_client.rpcwire.tls import client_context, expected_server_name
from nomad_client.server.rpc import InProcessTransport
from nomad_client.server.rpc_http import make_http_handler
from nomad_client.server.server import Server
from nomad_client.state_db import StateDB
from nomad_client.structs.models import Allocation

log = logging.getLogger(__name__)

# The one part of the config a reload applies; everything else keeps its start-up value.
RELOADABLE = "client.task_api"


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        # Replaced (never mutated) by a reload, together with ``task_api_config``.
        self.config = config
        self.task_api_config = LiveTaskAPIConfig(config.client.task_api)
        self._task_api_server: TaskAPIServer | None = None
        self._reload_lock = asyncio.Lock()
        self.data_dir: Path | None = None
        self._temp_data_dir = False
        self.server: Server | None = None
        self.client: Client | None = None
        self.router: Router | None = None
        self.http_address: tuple[str, int] | None = None
        self._listener: Listener | None = None
        self._dbs: list[StateDB] = []
        self._server_role: ServerRole | None = None
        self._transport: TcpTransport | None = None
        self._credentials: RemoteCredentials | None = None

    @property
    def runs_server(self) -> bool:
        cfg = self.config
        return cfg.server.enabled or cfg.dev_mode or not cfg.client.servers

    @property
    def rpc_address(self) -> str:
        """The server's advertised RPC address ("" without a server or RPC listener)."""
        return self._server_role.rpc_address if self._server_role is not None else ""

    @property
    def http_addr(self) -> str:
        assert self.http_address is not None
        return f"{self.http_address[0]}:{self.http_address[1]}"

    async def start(self) -> None:
        self.data_dir, self._temp_data_dir = await asyncio.to_thread(
            _prepare_data_dir, self.config.data_dir)
        try:
            await self._start_parts()
        except BaseException:
            await self.stop()
            raise

    async def _start_parts(self) -> None:
        cfg, data_dir = self.config, self.data_dir
        assert data_dir is not None
        credentials: CredentialSource
        if self.runs_server:
            self._server_role = ServerRole(cfg, data_dir, self._open_db)
            self.server = credentials = await self._server_role.open()
        else:
            self._transport = self._tcp_transport()
            self._credentials = credentials = RemoteCredentials(
                self._transport, acl_enabled=cfg.acl.enabled, token_ttl=cfg.acl.token_ttl,
                policy_ttl=cfg.acl.policy_ttl, alloc_view=self._client_allocation,
                node_credentials=lambda: dict(zip(("NodeID", "SecretID"),
                                                  self._node_credentials(), strict=True)))
        self.router = Router(credentials)

        sock = tcp_socket(cfg.bind_addr, cfg.ports.http)
        self._listener = Listener(self.router, TCP_LISTENER, sock)  # owns sock from here on
        self.http_address = sock.getsockname()[:2]
        if self.server is not None:
            # Signed tokens' ``iss`` and OIDC discovery name this one issuer (never a Host
            # header); in a cluster every server must be given the same one.
            self.server.keyring.issuer = (cfg.server.oidc_issuer
                                          or advertise_http_url(*self.http_address))
        client_db = None
        if cfg.client.enabled or cfg.dev_mode:
            state_dir = Path(cfg.client.state_dir or data_dir / "client")
            client_db = await self._open_db(state_dir / "state.db")
            self._task_api_server = TaskAPIServer(
                self.router, self.task_api_config,
                audit_path=data_dir / "audit" / "task-api.log", node_id=self._node_id)
            settings = ClientSettings(
                data_dir=data_dir, alloc_dir=Path(cfg.client.alloc_dir or data_dir / "alloc"),
                state_dir=state_dir, name=cfg.name, datacenter=cfg.datacenter,
                region=cfg.region, http_addr=self.http_addr,
                static_meta=dict(cfg.client.meta), meta_limits=cfg.client.meta_limits,
                task_api=self.task_api_config, node_class=cfg.client.node_class,
                node_pool=cfg.client.node_pool,
                disable_remote_exec=cfg.client.disable_remote_exec,
                servers=cfg.client.servers)
            transport = (InProcessTransport(self.server) if self.server is not None
                         else self._transport)
            assert transport is not None
            self.client = Client(settings, ServerRPC(transport),
                                 client_db, self._task_api_server,
                                 builtin_drivers(exec_driver_config(cfg, data_dir)))
        forward = None
        if self._transport is not None:
            forward = HTTPForwarder(self._transport, self._node_credentials)
        register_all(self.router, Services(
            server=self.server, client=self.client, agent_config=self._api_config,
            member=self._member(), cluster=self._cluster_view(), forward=forward,
            alloc_view=self._client_allocation))
        await self._listener.start()
        log.info("HTTP API listening on http://%s", self.http_addr)
        if self._server_role is not None:
            await self._server_role.start(
                {"Agent.HTTP": make_http_handler(forwarded_dispatch(self.router))},
                http_addr=self.http_addr)
        if self.client is not None:
            await self.client.start()
        if self._credentials is not None:
            self._credentials.start()

    def _tcp_transport(self) -> TcpTransport:
        cfg = self.config
        tls = tls_settings(cfg)
        return TcpTransport(
            cfg.client.servers, ssl_context=client_context(tls) if tls.rpc else None,
            server_hostname=(expected_server_name(cfg.region)
                             if tls.rpc and tls.verify_server_hostname else None))

    def _cluster_view(self) -> ClusterView:
        role = self._server_role
        if role is not None and role.uses_etcd:
            return EtcdClusterView(role)
        if role is not None and not self.config.dev_mode:  # it listens for RPC
            return SingleServerView(role, lambda: self.config.advertise.http or self.http_addr)
        if self._transport is not None:
            return _ClientCluster(self._transport)
        return EmbeddedCluster(self._member(), self.config.region)

    def _node_credentials(self) -> tuple[str, str]:
        client = self.client
        return ("", "") if client is None else client.node_credentials()

    def _client_allocation(self, alloc_id: str) -> Allocation | None:
        client = self.client
        return None if client is None else client.allocation(alloc_id)

    async def _open_db(self, path: Path) -> StateDB:
        db = await StateDB.open(path)
        self._dbs.append(db)
        return db

    def _node_id(self) -> str:
        return self.client.node_id if self.client is not None else ""

    def _api_config(self) -> dict[str, Any]:
        # Read per request: GET /v1/agent/self shows the config as the last reload left it.
        return self.config.to_api_dict()

    def _member(self) -> dict[str, Any]:
        host, port = self.http_address or ("", 0)
        return {"Name": f"{self.config.name}.{self.config.region}", "Addr": host, "Port": port,
                "Tags": {"region": self.config.region, "dc": self.config.datacenter},
                "Status": "alive"}

    async def reload(self, new: AgentConfig) -> None:
        """Apply ``new`` (the config read again from the same files and flags) as far as a
        running agent can: ``client.task_api`` is replaced and every part that reads it is
        told; every other setting keeps its value, with one warning naming those that
        differ. Reloads run one at a time. If applying fails, the previous Task API config
        is put back."""
        async with self._reload_lock:
            old = self.config
            kept = _changed_settings(old, _with_task_api(new, old.client.task_api))
            if kept:
                log.warning("config reload: these settings cannot change while the agent "
                            "runs and keep their current values: %s",
                            ", ".join(name for name, _, _ in kept))
            changes = [f"{name}: {json.dumps(before)} -> {json.dumps(after)}"
                       for name, before, after in _changed_settings(
                           old.client.task_api, new.client.task_api, f"{RELOADABLE}.")]
            if not changes:
                log.info("config reload: no change to %s", RELOADABLE)
                return
            try:
                await self._apply_task_api(new.client.task_api)
            except Exception:
                log.exception("config reload: applying %s failed; putting the previous "
                              "Task API config back", RELOADABLE)
                await self._restore_task_api(old.client.task_api)
                return
            log.info("config reload: applied %s changes: %s", RELOADABLE, "; ".join(changes))

    async def _apply_task_api(self, task_api: TaskAPIConfig) -> None:
        # The record (agent/self) and the live holder change together, before anyone awaits.
        self.config = _with_task_api(self.config, task_api)
        self.task_api_config.replace(task_api)
        if self._task_api_server is not None:
            await self._task_api_server.reconfigure()
        if self.client is not None:
            await self.client.apply_task_api_config()

    async def _restore_task_api(self, task_api: TaskAPIConfig) -> None:
        try:
            await self._apply_task_api(task_api)
        except Exception:
            log.exception("config reload: putting the previous Task API config back failed")

    async def stop(self) -> None:
        if self.server is not None:  # event streams end cleanly, before their listeners
            self.server.events.close()
        if self._credentials is not None:
            await self._credentials.close()
            self._credentials = None
        if self.client is not None:
            await self.client.shutdown(stop_tasks=self.config.dev_mode)
            self.client = None
        if self._task_api_server is not None:  # after the client: its sockets are closed
            await self._task_api_server.close()
            self._task_api_server = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._server_role is not None:
            await self._server_role.close()
            self._server_role = None
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
        for db in reversed(self._dbs):
            await db.close()
        self._dbs.clear()
        if self._temp_data_dir and self.data_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.data_dir, True)


class _ClientCluster:
    """``ClusterView`` of a client-only agent: the servers it was told of. Who leads and
    who is a member are server questions, forwarded to one."""

    def __init__(self, transport: TcpTransport) -> None:
        self._transport = transport

    def members(self) -> list[dict[str, Any]]:
        return []

    def leader(self) -> dict[str, Any] | None:
        return None

    def known_servers(self) -> list[str]:
        return list(self._transport.servers)


def _with_task_api(config: AgentConfig, task_api: TaskAPIConfig) -> AgentConfig:
    return attrs.evolve(config, client=attrs.evolve(config.client, task_api=task_api))


def _settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting of an attrs config object, by its dotted config name (blocks are
    followed, maps and lists are one setting each)."""
    out: dict[str, Any] = {}
    for field in attrs.fields(type(config)):
        name = f"{prefix}{field.name}"
        value = getattr(config, field.name)
        if attrs.has(type(value)):
            out.update(_settings(value, f"{name}."))
        else:
            out[name] = value
    return out


def _changed_settings(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(name, old value, new value) of each setting that differs."""
    before, after = _settings(old, prefix), _settings(new, prefix)
    return [(name, value, after[name]) for name, value in before.items()
            if after[name] != value]


def _prepare_data_dir(configured: str | None) -> tuple[Path, bool]:
    """The data dir to use and whether it is a temporary one (dev mode) to remove on stop."""
    if configured:
        path = Path(configured).resolve()
        path.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        path = Path(tempfile.mkdtemp(prefix="nomad-client-dev-"))
        temporary = True
    # Tasks running as other users must traverse into their alloc dirs, but no one else
    # needs to list which allocations and tasks this node runs.
    path.chmod(0o711)
    return path, temporary
