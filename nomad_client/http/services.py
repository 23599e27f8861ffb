"""What endpoints may reach: the embedded server, the local client (if enabled), the config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

from nomad_client.client.exec_session import ExecSessions, ExecTask
from nomad_client.server.server import Server


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


def _config_source(value: dict[str, Any] | Callable[[], dict[str, Any]]
                   ) -> Callable[[], dict[str, Any]]:
    # A fixed dict is a config that never changes; the agent passes a callable, so a reload
    # is shown by the next GET /v1/agent/self.
    if callable(value):
        return value
    return lambda: value


@attrs.frozen
class Services:
    server: Server
    client: LocalClient | None
    # The agent config as GET /v1/agent/self shows it, read when asked.
    agent_config: Callable[[], dict[str, Any]] = attrs.field(converter=_config_source)
    member: dict[str, Any]
