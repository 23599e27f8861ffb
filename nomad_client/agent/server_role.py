"""The agent's server role: where its state lives (this agent's files, or etcd shared with
the other servers), its RPC listener, and who leads.

Embedded store: state and keyring in the data dir; this server is the only one, so it always
leads. etcd store: rows and the keyring (sealed with the key-encryption key) live in etcd;
every server keeps the whole state in memory, follows every write, and one of them, elected
on an etcd lease, runs the leader's duties (scheduling, heartbeats, periodic launches).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from nomad_client.agent.config import AgentConfig
from nomad_client.client.fingerprint import NOMAD_VERSION, network_address
from nomad_client.client.rpc_tcp import TcpTransport
from nomad_client.http.listeners import tcp_socket
from nomad_client.rpcwire.tls import (
    TLSSettings,
    client_context,
    expected_server_name,
    server_context,
)
from nomad_client.server.keyring import Keyring
from nomad_client.server.rpc import rpc_handlers
from nomad_client.server.rpc_listener import RPCListener, handlers_dispatch
from nomad_client.server.sealing import Sealer
from nomad_client.server.server import Server
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB

log = logging.getLogger(__name__)

Handler = Callable[[Server, dict[str, Any]], Awaitable[Any]]


def tls_settings(cfg: AgentConfig) -> TLSSettings:
    t = cfg.tls
    return TLSSettings(rpc=t.rpc, ca_file=t.ca_file, cert_file=t.cert_file,
                       key_file=t.key_file, verify_server_hostname=t.verify_server_hostname)


def advertised(host: str, port: int, configured: str | None) -> str:
    """"host:port" others should dial: the configured advertise address (its port defaulting
    to the bound one), else the bound address (a wildcard stands for the host's address)."""
    if configured:
        if configured.startswith("[") and "]:" in configured:
            return configured
        if configured.count(":") == 1:
            return configured
        return f"{configured}:{port}"
    shown = network_address(host)
    return f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"


def _server_id(server_dir: Path) -> str:
    """This server's own ID, kept across restarts (its membership key in etcd)."""
    path = server_dir / "server-id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    server_dir.mkdir(parents=True, exist_ok=True)
    ident = str(uuid.uuid4())
    path.write_text(ident + "\n")
    return ident


# What only the leader can serve: it alone tracks heartbeats, so a follower hands a node's
# registration and heartbeats to it (and answers itself only when no leader is reachable).
LEADER_RPCS = ("Node.Register", "Node.UpdateStatus")


class LeaderForwarding:
    """A follower's way to the leader's RPC listener: one TCP transport, re-aimed when the
    leader changes."""

    def __init__(self, role: ServerRole, tls: TLSSettings) -> None:
        self._role = role
        self._tls = tls
        self._transport: TcpTransport | None = None
        self._target = ""

    def wrap(self, handlers: Mapping[str, Handler], methods: tuple[str, ...]
             ) -> dict[str, Handler]:
        return {method: self._forwarding(method, handlers[method]) for method in methods}

    def _forwarding(self, method: str, local: Handler) -> Handler:
        async def handle(server: Server, args: dict[str, Any]) -> Any:
            target = self._leader_address(server)
            if not target:
                return await local(server, args)
            try:
                return await self._to(target).call(method, args)
            except (ConnectionError, OSError, TimeoutError) as err:
                # The leader is out of reach: the write is served here, the leader's timer
                # simply misses one heartbeat (the next goes to whoever leads then).
                log.debug("forwarding %s to the leader at %s failed (%s)", method, target,
                          type(err).__name__)
                return await local(server, args)
        return handle

    def _leader_address(self, server: Server) -> str:
        leadership = self._role.leadership
        if server.is_leader or leadership is None:
            return ""
        leader = leadership.leader()
        address = "" if leader is None else str(leader.get("RPCAddr", ""))
        return "" if address == self._role.rpc_address else address

    def _to(self, target: str) -> TcpTransport:
        if self._transport is None or target != self._target:
            old, self._transport, self._target = self._transport, None, target
            if old is not None:
                _close_later(old)
            tls = self._tls
            self._transport = TcpTransport(
                [target], ssl_context=client_context(tls) if tls.rpc else None,
                server_hostname=(expected_server_name(self._role.region)
                                 if tls.rpc and tls.verify_server_hostname else None))
        return self._transport

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
        await asyncio.gather(*_CLOSING, return_exceptions=True)


_CLOSING: set[asyncio.Task[None]] = set()


def _close_later(transport: TcpTransport) -> None:
    # A transport aimed at a former leader: closed in the background (calls on it may
    # still be finishing), awaited by ``LeaderForwarding.close``.
    task = asyncio.create_task(transport.close())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


class EtcdClusterView:
    """``http.services.ClusterView`` of a server in etcd mode: the live servers' membership
    keys and the elected leader."""

    def __init__(self, role: ServerRole) -> None:
        self._role = role

    def members(self) -> list[dict[str, Any]]:
        leadership = self._role.leadership
        if leadership is None:
            return []
        return [_member(info) for info in leadership.members()]

    def leader(self) -> dict[str, Any] | None:
        leadership = self._role.leadership
        info = None if leadership is None else leadership.leader()
        return None if info is None else _member(info)

    def known_servers(self) -> list[str]:
        return [m["RPCAddr"] for m in self.members()]


class SingleServerView:
    """``ClusterView`` of a server with a store of its own and an RPC listener: the only
    server, so the leader, named by its real RPC address."""

    def __init__(self, role: ServerRole, http_addr: Callable[[], str]) -> None:
        self._role = role
        self._http_addr = http_addr

    def members(self) -> list[dict[str, Any]]:
        return [_member(self._role.member_info(self._http_addr()))]

    def leader(self) -> dict[str, Any] | None:
        return self.members()[0]

    def known_servers(self) -> list[str]:
        return [self._role.rpc_address]


def _member(info: Mapping[str, Any]) -> dict[str, Any]:
    rpc = str(info.get("RPCAddr", ""))
    host = rpc.rsplit(":", 1)[0].strip("[]") if rpc else ""
    return {"Name": info.get("Name", ""), "Addr": host, "RPCAddr": rpc,
            "HTTPAddr": info.get("HTTPAddr", ""), "Region": info.get("Region", ""),
            "Datacenter": info.get("Datacenter", ""), "Status": "alive",
            "Build": info.get("Build", NOMAD_VERSION)}


class ServerRole:
    """Owns the server, its store, its RPC listener and (etcd mode) its leadership."""

    def __init__(self, cfg: AgentConfig, data_dir: Path,
                 open_db: Callable[[Path], Awaitable[StateDB]]) -> None:
        self._cfg = cfg
        self._data_dir = data_dir
        self._open_db = open_db
        self.server: Server | None = None
        self.rpc: RPCListener | None = None
        self.rpc_address = ""
        self.server_id = ""
        self._etcd: Any = None
        self._keystore: Any = None
        self._store: StateStore | None = None
        self.leadership: Any = None
        self._to_leader: LeaderForwarding | None = None

    @property
    def region(self) -> str:
        return self._cfg.region

    @property
    def uses_etcd(self) -> bool:
        return self._cfg.server.store == "etcd"

    async def open(self) -> Server:
        """Open the state and keyring and build the server (nothing listens yet)."""
        cfg = self._cfg
        server_dir = self._data_dir / "server"
        self.server_id = await asyncio.to_thread(_server_id, server_dir)
        if self.uses_etcd:
            store, keyring = await self._open_etcd()
        else:
            db = await self._open_db(server_dir / "state.db")
            keyring = await Keyring.load_or_create(server_dir / "keyring")
            # The store seals with whichever root key is active, and follows rotations.
            store = await StateStore.restore(db, Sealer.for_keyring(keyring))
        self._store = store
        if keyring.rekeying:  # a full rotation stopped before it had re-sealed everything
            await store.reseal()
            await keyring.finish_rekeying()
        s = cfg.server
        self.server = Server(store, keyring, region=cfg.region, acl_enabled=cfg.acl.enabled,
                             data_dir=server_dir, tracked_versions=s.job_tracked_versions,
                             min_heartbeat_ttl=s.min_heartbeat_ttl,
                             max_heartbeats_per_second=s.max_heartbeats_per_second,
                             heartbeat_grace=s.heartbeat_grace,
                             # With etcd, only the elected server leads (``start``).
                             leader=not self.uses_etcd)
        return self.server

    async def _open_etcd(self) -> tuple[StateStore, Keyring]:
        # Imported here: only a server in etcd mode loads the etcd client (and grpc).
        from nomad_client.server.etcd.client import EtcdClient, EtcdSettings, EtcdTLS
        from nomad_client.server.etcd.kek import load_kek
        from nomad_client.server.etcd.keyring_store import EtcdKeyStore

        s = self._cfg.server
        kek_file = s.keyring_kek_file
        assert kek_file is not None  # the config refuses etcd mode without it
        kek = await asyncio.to_thread(load_kek, kek_file)
        tls = None
        if s.etcd.tls is not None:
            tls = EtcdTLS(ca_file=s.etcd.tls.ca_file, cert_file=s.etcd.tls.cert_file,
                          key_file=s.etcd.tls.key_file)
        self._etcd = await EtcdClient.connect(EtcdSettings(
            endpoints=s.etcd.endpoints, prefix=s.etcd.prefix, tls=tls))
        self._keystore = EtcdKeyStore(self._etcd, kek, kek_file=kek_file)
        keyring = await Keyring.load_or_create_from(self._keystore)
        self._keystore.watch(keyring)
        store = await StateStore.from_etcd(self._etcd, Sealer.for_keyring(keyring))
        return store, keyring

    async def start(self, extra_handlers: Mapping[str, Handler], *, http_addr: str) -> None:
        """Listen for RPC (not in -dev: nothing but this agent's own client would call) and
        take up leadership (always, with a store of its own; by election, with etcd)."""
        cfg, server = self._cfg, self.server
        assert server is not None
        if not cfg.dev_mode:
            sock = tcp_socket(cfg.bind_addr, cfg.ports.rpc)
            tls = tls_settings(cfg)
            handlers = {**rpc_handlers(), **extra_handlers}
            if self.uses_etcd:
                self._to_leader = LeaderForwarding(self, tls)
                handlers.update(self._to_leader.wrap(handlers, LEADER_RPCS))
            self.rpc = RPCListener(
                handlers_dispatch(handlers, server), sock,
                ssl_context=server_context(tls) if tls.rpc else None,
                allow_plaintext_remote=cfg.tls.rpc_allow_plaintext_remote)
            await self.rpc.start()
            host, port = self.rpc.address
            self.rpc_address = advertised(host, port, cfg.advertise.rpc)
            log.info("RPC listening on %s:%d (advertised as %s)", host, port, self.rpc_address)
        if self.uses_etcd:
            from nomad_client.server.etcd.leadership import Leadership

            self.leadership = Leadership(
                self._etcd, server_id=self.server_id,
                info=self.member_info(cfg.advertise.http or http_addr),
                ttl=cfg.server.leader_lease_ttl,
                on_gain=lambda: server.set_leader(True),
                on_loss=lambda: server.set_leader(False))
            await self.leadership.start()
        else:
            await server.set_leader(True)

    def member_info(self, http_addr: str) -> dict[str, Any]:
        cfg = self._cfg
        return {"ID": self.server_id, "Name": f"{cfg.name}.{cfg.region}",
                "RPCAddr": self.rpc_address, "HTTPAddr": http_addr, "Region": cfg.region,
                "Datacenter": cfg.datacenter, "Build": NOMAD_VERSION}

    async def close(self) -> None:
        """Stop leading (another server takes over at once), stop listening, close state."""
        if self.leadership is not None:
            await self.leadership.close()
            self.leadership = None
        elif self.server is not None:
            await self.server.set_leader(False)
        if self.rpc is not None:
            await self.rpc.close()
            self.rpc = None
        if self._to_leader is not None:
            await self._to_leader.close()
            self._to_leader = None
        if self.server is not None:
            await self.server.close()
        if self._store is not None:
            await self._store.close()
            self._store = None
        if self._keystore is not None:
            await self._keystore.close()
            self._keystore = None
        if self._etcd is not None:
            await self._etcd.close()
            self._etcd = None
