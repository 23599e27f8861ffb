"""The server's side of the client/server interface, named after Nomad's RPCs.

Each handler takes and returns plain msgpack-serialisable values; ``InProcessTransport``
round-trips every request and reply through msgpack so the embedded server behaves exactly
like a remote one would.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nomad_client.server.server import Resource, Server
from nomad_client.structs.codec import from_rpc, msgpack_roundtrip, to_rpc
from nomad_client.structs.models import AllocUpdate, Node

Handler = Callable[[Server, dict[str, Any]], Awaitable[Any]]


async def _node_register(server: Server, args: dict[str, Any]) -> Any:
    return {"Index": await server.register_node(from_rpc(args["Node"], Node))}


async def _node_update_status(server: Server, args: dict[str, Any]) -> Any:
    return {"Index": await server.update_node_status(args["NodeID"], args["Status"])}


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


class RPCError(Exception):
    pass


class InProcessTransport:
    def __init__(self, server: Server) -> None:
        self._server = server

    async def call(self, method: str, args: dict[str, Any]) -> Any:
        handler = HANDLERS.get(method)
        if handler is None:
            raise RPCError(f"unknown RPC method {method!r}")
        reply = await handler(self._server, msgpack_roundtrip(args))
        return msgpack_roundtrip(reply)
