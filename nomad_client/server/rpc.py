"""The server's side of the client/server interface, named after Nomad's RPCs.

Each handler takes and returns plain msgpack-serialisable values; ``InProcessTransport``
round-trips every request and reply through msgpack so the embedded server behaves exactly
like a remote one would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from nomad_client.rpcwire.errors import UnknownMethod
from nomad_client.server.rpc_acl import ACL_HANDLERS
from nomad_client.server.server import NotFound, Resource, Server
from nomad_client.structs.codec import from_rpc, msgpack_roundtrip, to_rpc
from nomad_client.structs.models import AllocUpdate, Node

Handler = Callable[[Server, dict[str, Any]], Awaitable[Any]]


async def _node_register(server: Server, args: dict[str, Any]) -> Any:
    index, ttl = await server.client_register(from_rpc(args["Node"], Node))
    return {"Index": index, "HeartbeatTTL": ttl}


async def _node_update_status(server: Server, args: dict[str, Any]) -> Any:
    # A heartbeat. An unknown node is told so in the reply (any transport carries that),
    # and registers again.
    try:
        index, ttl = await server.client_heartbeat(args["NodeID"], args["Status"])
    except NotFound:
        return {"Index": server.store.index, "HeartbeatTTL": 0.0, "UnknownNode": True}
    return {"Index": index, "HeartbeatTTL": ttl}


async def _node_get_client_allocs(server: Server, args: dict[str, Any]) -> Any:
    allocs, index = await server.client_allocs(args["NodeID"], args["MinQueryIndex"],
                                               args["MaxQueryTime"])
    return {"Allocs": allocs, "Index": index}


async def _alloc_get_allocs(server: Server, args: dict[str, Any]) -> Any:
    # The caller is a client node (NodeID + its SecretID): the live allocations placed on it
    # come with freshly signed identities, which travel beside the records, never in them.
    allocs, identities = await server.allocs_for_node(args["NodeID"], args["SecretID"],
                                                      args["AllocIDs"])
    return {"Allocs": [to_rpc(a) for a in allocs], "SignedIdentities": identities,
            "Index": server.store.index}


async def _alloc_sign_identities(server: Server, args: dict[str, Any]) -> Any:
    signed = await server.sign_identities(args["NodeID"], args["SecretID"], args["AllocID"],
                                          args["Tasks"])
    return {"SignedIdentities": signed, "Index": server.store.index}


async def _node_update_alloc(server: Server, args: dict[str, Any]) -> Any:
    updates = [from_rpc(u, AllocUpdate) for u in args["Alloc"]]
    return {"Index": await server.update_allocs_from_client(updates)}


async def _namespace_task_api_mode(server: Server, args: dict[str, Any]) -> Any:
    # "" for a namespace that leaves it to the agent or does not exist: msgpack-plain.
    return {"TaskAPI": server.namespace_task_api_mode(args["Namespace"]) or "",
            "Index": server.index_of(Resource.NAMESPACES)}


async def _service_registration_upsert(server: Server, args: dict[str, Any]) -> Any:
    # The caller is a client node (NodeID + its SecretID), registering for its allocation.
    index = await server.upsert_services(args["NodeID"], args["SecretID"], args["AllocID"],
                                         args["Services"])
    return {"Index": index}


async def _service_registration_delete(server: Server, args: dict[str, Any]) -> Any:
    # IDs None: every registration the node made for the allocation.
    index = await server.deregister_services(args["NodeID"], args["SecretID"],
                                             args["AllocID"], args.get("IDs"))
    return {"Index": index}


HANDLERS: dict[str, Handler] = {
    "Node.Register": _node_register,
    "Node.UpdateStatus": _node_update_status,
    "Node.GetClientAllocs": _node_get_client_allocs,
    "Alloc.GetAllocs": _alloc_get_allocs,
    "Alloc.SignIdentities": _alloc_sign_identities,
    "Node.UpdateAlloc": _node_update_alloc,
    "Namespace.TaskAPIMode": _namespace_task_api_mode,
    "ServiceRegistration.Upsert": _service_registration_upsert,
    "ServiceRegistration.DeleteByID": _service_registration_delete,
}


def rpc_handlers() -> dict[str, Handler]:
    """Every RPC a server answers: the client's calls and the ACL and key set look-ups of
    client-only agents (``server.rpc_acl``). The agent adds ``Agent.HTTP``, which needs its
    router."""
    return {**HANDLERS, **ACL_HANDLERS}


class InProcessTransport:
    """The embedded agent's way from its client to its server: the same handlers a TCP
    listener dispatches to, with every request and reply round-tripped through msgpack.
    A server exception reaches the caller as itself (over TCP it arrives as the
    ``rpcwire.errors`` class of its kind, each a subclass of the same builtin)."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._handlers = rpc_handlers()

    async def call(self, method: str, args: dict[str, Any], *,
                   timeout: float | None = None) -> Any:
        handler = self._handlers.get(method)
        if handler is None:
            raise UnknownMethod(f"unknown RPC method {method!r}")
        request = msgpack_roundtrip(args)
        if timeout is None:
            reply = await handler(self._server, request)
        else:
            async with asyncio.timeout(timeout):
                reply = await handler(self._server, request)
        return msgpack_roundtrip(reply)
