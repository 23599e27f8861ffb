"""What endpoints may reach: the embedded server, the local client (if enabled), the config."""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from nomad_client.server.server import Server


class LocalClient(Protocol):
    """The node-local operations endpoints need from the client."""

    node_id: str

    def metadata(self) -> dict[str, Any]: ...
    async def apply_metadata(self, meta: dict[str, str | None]) -> dict[str, Any]: ...
    def alloc_dir_for(self, alloc_id: str) -> Any: ...
    def healthy(self) -> tuple[bool, str]: ...


@attrs.frozen
class Services:
    server: Server
    client: LocalClient | None
    agent_config: dict[str, Any]
    member: dict[str, Any]
