"""The client's only way to the servers: typed calls over an RPC transport.

The transport is anything with ``async call(method, args)`` taking and returning plain
msgpack-able values (the embedded server's ``InProcessTransport`` today, a network one later).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs

from nomad_client.structs.codec import from_rpc, to_rpc
from nomad_client.structs.models import Allocation, AllocUpdate, Node


class RPCTransport(Protocol):
    async def call(self, method: str, args: dict[str, Any]) -> Any: ...


class UnknownNode(Exception):
    """The servers do not know this node (their state was lost, or the node was collected):
    it must register again."""


@attrs.frozen
class NodeReply:
    """A reply to Node.Register and Node.UpdateStatus: the write's index, and the TTL
    (seconds) within which the servers must hear from the node again."""

    index: int
    heartbeat_ttl: float


class ServerRPC:
    def __init__(self, transport: RPCTransport) -> None:
        self._transport = transport

    async def node_register(self, node: Node) -> NodeReply:
        reply = await self._transport.call("Node.Register", {"Node": to_rpc(node)})
        return NodeReply(int(reply["Index"]), float(reply.get("HeartbeatTTL") or 0.0))

    async def node_update_status(self, node_id: str, status: str) -> NodeReply:
        """A heartbeat; ``UnknownNode`` when the servers do not know the node."""
        reply = await self._transport.call("Node.UpdateStatus",
                                           {"NodeID": node_id, "Status": status})
        if reply.get("UnknownNode"):
            raise UnknownNode(f"node {node_id} is not registered")
        return NodeReply(int(reply["Index"]), float(reply.get("HeartbeatTTL") or 0.0))

    async def node_get_client_allocs(self, node_id: str, min_index: int, wait: float
                                     ) -> tuple[dict[str, int], int]:
        reply = await self._transport.call("Node.GetClientAllocs", {
            "NodeID": node_id, "MinQueryIndex": min_index, "MaxQueryTime": wait})
        return dict(reply["Allocs"]), int(reply["Index"])

    async def alloc_get_allocs(self, node_id: str, secret_id: str, alloc_ids: Sequence[str]
                               ) -> tuple[list[Allocation], dict[str, dict[str, str]]]:
        """The allocations, and signed identities (alloc ID -> task -> token) for the live
        ones placed on this node."""
        reply = await self._transport.call("Alloc.GetAllocs", {
            "NodeID": node_id, "SecretID": secret_id, "AllocIDs": list(alloc_ids)})
        identities = {alloc_id: dict(tokens)
                      for alloc_id, tokens in (reply.get("SignedIdentities") or {}).items()}
        return [from_rpc(a, Allocation) for a in reply["Allocs"]], identities

    async def alloc_sign_identities(self, node_id: str, secret_id: str, alloc_id: str,
                                    tasks: Sequence[str]) -> dict[str, str]:
        """Fresh identities (task -> token) for tasks of a live allocation on this node."""
        reply = await self._transport.call("Alloc.SignIdentities", {
            "NodeID": node_id, "SecretID": secret_id, "AllocID": alloc_id,
            "Tasks": list(tasks)})
        return dict(reply["SignedIdentities"])

    async def node_update_alloc(self, updates: Sequence[AllocUpdate]) -> int:
        reply = await self._transport.call("Node.UpdateAlloc",
                                           {"Alloc": [to_rpc(u) for u in updates]})
        return int(reply["Index"])

    async def service_registration_upsert(self, node_id: str, secret_id: str, alloc_id: str,
                                          services: Sequence[Mapping[str, Any]]) -> int:
        """Register (or update) services of one of this node's live allocations."""
        reply = await self._transport.call("ServiceRegistration.Upsert", {
            "NodeID": node_id, "SecretID": secret_id, "AllocID": alloc_id,
            "Services": [dict(s) for s in services]})
        return int(reply["Index"])

    async def service_registration_delete(self, node_id: str, secret_id: str, alloc_id: str,
                                          ids: Sequence[str] | None) -> int:
        """Remove registrations this node made for ``alloc_id`` (None: all of them)."""
        reply = await self._transport.call("ServiceRegistration.DeleteByID", {
            "NodeID": node_id, "SecretID": secret_id, "AllocID": alloc_id,
            "IDs": None if ids is None else list(ids)})
        return int(reply["Index"])

    async def namespace_task_api_mode(self, namespace: str) -> str | None:
        """The namespace's ``Capabilities.TaskAPI`` (one of ``NAMESPACE_TASK_API_MODES``);
        None when the namespace leaves it to the agent or does not exist."""
        reply = await self._transport.call("Namespace.TaskAPIMode", {"Namespace": namespace})
        return str(reply["TaskAPI"]) or None
