"""What endpoints may reach: the agent's own server (None on a client-only agent), the local
client (if enabled), the cluster as this agent sees it, the way to the servers, the config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from nomad_client.client.exec_session import ExecSessions, ExecTask
from nomad_client.http.errors import HTTPError
from nomad_client.server.server import Server
from nomad_client.structs.models import Allocation

if TYPE_CHECKING:
    from aiohttp import web

    from nomad_client.http.router import ApiRequest

# Nomad's default ports: servers are named by their RPC address, members by their gossip one.
RPC_PORT = 4647
SERF_PORT = 4648


class LocalClient(Protocol):
    """The node-local operations endpoints need from the client."""

    node_id: str

    def metadata(self) -> dict[str, Any]: ...
    async def apply_metadata(self, meta: dict[str, str | None]) -> dict[str, Any]: ...
    def alloc_dir_for(self, alloc_id: str) -> Any: ...
    def healthy(self) -> tuple[bool, str]: ...
    # Allocation control and resource usage: an allocation the client does not run is an
    # ``UnknownAllocation``, a request it cannot carry out a ``ControlRefused``.
    async def restart_alloc(self, alloc_id: str, task: str | None, all_tasks: bool
                            ) -> None: ...
    async def signal_alloc(self, alloc_id: str, signal: str, task: str | None) -> None: ...
    async def alloc_stats(self, alloc_id: str, task: str | None) -> dict[str, Any]: ...
    async def host_stats(self) -> dict[str, Any]: ...
    # Service checks this node runs: check ID -> result (None: the allocation runs none).
    def alloc_checks(self, alloc_id: str) -> dict[str, Any] | None: ...
    # PUT /v1/client/gc: destroy the allocations that finished here; their IDs.
    async def collect_garbage(self) -> list[str]: ...
    # alloc exec: the running sessions, the agent's switch and a task to exec into
    # (``UnknownAllocation``; ``ControlRefused`` for a task the allocation does not have).
    exec_sessions: ExecSessions

    @property
    def remote_exec_disabled(self) -> bool: ...
    def exec_task(self, alloc_id: str, task: str) -> ExecTask: ...


class ClusterView(Protocol):
    """The servers as this agent knows them. A member is a dict with ``Name``, ``Addr``
    (host), ``RPCAddr`` (``host:port``), ``HTTPAddr``, ``Region``, ``Datacenter`` and
    ``Status``; optionally ``Port`` (a gossip port, when there is one) and ``Build``."""

    def members(self) -> list[dict[str, Any]]: ...
    def leader(self) -> dict[str, Any] | None: ...
    # The RPC addresses this agent's client would try (a client-only agent's ``servers``).
    def known_servers(self) -> list[str]: ...


class Forwarder(Protocol):
    """Sends a request that only a server can answer to one (a client-only agent)."""

    async def forward(self, req: ApiRequest) -> web.StreamResponse: ...


@attrs.frozen
class EmbeddedCluster:
    """The cluster of one an embedded agent is: its own server is the leader, the only
    peer and the only member. It listens on no RPC or gossip port (its client reaches the
    server in process), so both are Nomad's defaults on the advertised host: what a Nomad
    client or tool expects to parse."""

    member: dict[str, Any]
    region: str

    def members(self) -> list[dict[str, Any]]:
        member = self.member
        host = member.get("Addr", "")
        return [{"Name": member.get("Name", ""), "Addr": host,
                 "RPCAddr": f"{host}:{RPC_PORT}", "HTTPAddr": f"{host}:{member.get('Port', 0)}",
                 "Region": self.region,
                 "Datacenter": member.get("Tags", {}).get("dc", "dc1"),
                 "Status": member.get("Status", "alive"), "Port": SERF_PORT}]

    def leader(self) -> dict[str, Any] | None:
        return self.members()[0]

    def known_servers(self) -> list[str]:
        return [m["RPCAddr"] for m in self.members()]


def _config_source(value: dict[str, Any] | Callable[[], dict[str, Any]]
                   ) -> Callable[[], dict[str, Any]]:
    # A fixed dict is a config that never changes; the agent passes a callable, so a reload
    # is shown by the next GET /v1/agent/self.
    if callable(value):
        return value
    return lambda: value


def _embedded_cluster(services: Services) -> ClusterView:
    region = services.server.region if services.server is not None else \
        services.member.get("Tags", {}).get("region", "global")
    return EmbeddedCluster(services.member, region)


NO_SERVER_HERE = HTTPError(500, "this agent runs no server")


@attrs.frozen
class Services:
    # None on a client-only agent: its server endpoints are forwarded (``forward``).
    server: Server | None
    client: LocalClient | None
    # The agent config as GET /v1/agent/self shows it, read when asked.
    agent_config: Callable[[], dict[str, Any]] = attrs.field(converter=_config_source)
    member: dict[str, Any]
    cluster: ClusterView = attrs.field(
        default=attrs.Factory(_embedded_cluster, takes_self=True))
    forward: Forwarder | None = None
    # The client's own view of an allocation, for its local endpoints when no server is
    # here to ask (a client-only agent).
    alloc_view: Callable[[str], Allocation | None] | None = None

    @property
    def own_server(self) -> Server:
        """The agent's server, for server endpoints (which a client-only agent forwards
        instead of registering, so they never get here without one)."""
        if self.server is None:
            raise NO_SERVER_HERE
        return self.server

    def allocation(self, alloc_id: str) -> Allocation | None:
        """An allocation as this agent knows it: the server's record, else the client's."""
        if self.server is not None:
            return self.server.allocation(alloc_id)
        return self.alloc_view(alloc_id) if self.alloc_view is not None else None
