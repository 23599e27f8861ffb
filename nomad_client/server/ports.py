"""Port bookkeeping for placement: which host ports each node's allocations hold, and the
static and dynamic ports a new allocation gets on a node.

Nomad's rules (``AssignPorts``): static ports are taken first and must be free; each dynamic
port is picked at random from the node's dynamic range (``RANDOM_PICKS`` tries), then, if
every try hit a taken port, at random among the ports still free; no port is held twice on a
node. Unlike Nomad, an allocation the scheduler has stopped keeps its ports until its client
reports it finished: its process may still be bound to them. Pure bookkeeping over records
handed in; the randomness comes from the caller, so tests can seed it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from nomad_client.structs.models import Allocation, Node
from nomad_client.structs.network import (
    NODE_ADDRESS_ATTRIBUTE,
    AllocatedPort,
    NetworkAsk,
    PortAsk,
    allocated_ports,
    allocated_resources,
)

__all__ = [
    "DEFAULT_MAX_DYNAMIC_PORT",
    "DEFAULT_MIN_DYNAMIC_PORT",
    "DYNAMIC_PORT_FAILED",
    "RESERVED_PORT_COLLISION",
    "PortBook",
    "PortsExhausted",
    "dynamic_port_range",
    "holds_ports",
    "node_address",
]

# Nomad's client defaults (``min_dynamic_port``/``max_dynamic_port``), both inclusive.
DEFAULT_MIN_DYNAMIC_PORT: Final = 20000
DEFAULT_MAX_DYNAMIC_PORT: Final = 32000
RANDOM_PICKS: Final = 20
MAX_PORT: Final = 65535

RESERVED_PORT_COLLISION: Final = "network: reserved port collision"
DYNAMIC_PORT_FAILED: Final = "network: dynamic port selection failed"


@attrs.frozen
class PortsExhausted:
    """Why a node cannot give an allocation its ports: Nomad's exhausted dimension."""

    dimension: str


def dynamic_port_range(node: Node) -> tuple[int, int]:
    """The node's dynamic port range: ``NodeResources.MinDynamicPort``/``MaxDynamicPort``
    (Nomad's fields) when both are set and sane, else Nomad's defaults."""
    low = node.node_resources.get("MinDynamicPort")
    high = node.node_resources.get("MaxDynamicPort")
    if (isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool)
            and not isinstance(high, bool) and 1 <= low <= high <= MAX_PORT):
        return low, high
    return DEFAULT_MIN_DYNAMIC_PORT, DEFAULT_MAX_DYNAMIC_PORT


def node_address(node: Node) -> str:
    """The address a node's allocation ports are reached at: its fingerprinted address
    (loopback for a node that has none)."""
    return node.attributes.get(NODE_ADDRESS_ATTRIBUTE) or "127.0.0.1"


def holds_ports(alloc: Allocation) -> bool:
    """Whether ``alloc`` still holds its host ports: until its client reports it finished,
    its processes may be bound to them, even once the scheduler has stopped it."""
    return not alloc.client_terminal() and bool(allocated_ports(alloc.allocated_resources))


class PortBook:
    """The host ports held on each node during one scheduling pass; ``assign`` adds the
    ports of each allocation it places."""

    def __init__(self, allocs: Iterable[Allocation], rng: random.Random) -> None:
        self._rng = rng
        self._used: dict[str, set[int]] = {}
        for alloc in allocs:
            if holds_ports(alloc):
                self._used.setdefault(alloc.node_id, set()).update(
                    p.value for p in allocated_ports(alloc.allocated_resources))

    def assign(self, node: Node, networks: Sequence[NetworkAsk]
               ) -> dict[str, Any] | PortsExhausted:
        """The ``allocated_resources`` of a new allocation of a group asking for ``networks``
        on ``node`` (its ports are then held), or why the node cannot give them."""
        if not networks:
            return {}
        taken = set(self._used.get(node.id, ()))
        address = node_address(node)
        low, high = dynamic_port_range(node)
        given: list[AllocatedPort] = []
        shared_networks: list[dict[str, Any]] = []
        for network in networks:
            reserved = []
            for ask in network.reserved:
                if ask.value in taken:
                    return PortsExhausted(f"{RESERVED_PORT_COLLISION} {ask.label}={ask.value}")
                taken.add(ask.value)
                reserved.append(_allocated(ask, ask.value, address))
            dynamic = []
            for ask in network.dynamic:
                port = self._pick(low, high, taken)
                if port is None:
                    return PortsExhausted(DYNAMIC_PORT_FAILED)
                taken.add(port)
                dynamic.append(_allocated(ask, port, address))
            given += reserved + dynamic
            shared_networks.append({
                "Mode": network.mode, "IP": address,
                "ReservedPorts": [_network_port(p) for p in reserved],
                "DynamicPorts": [_network_port(p) for p in dynamic]})
        self._used.setdefault(node.id, set()).update(p.value for p in given)
        return allocated_resources(shared_networks, given)

    def _pick(self, low: int, high: int, taken: set[int]) -> int | None:
        for _ in range(RANDOM_PICKS):
            port = self._rng.randint(low, high)
            if port not in taken:
                return port
        free = [port for port in range(low, high + 1) if port not in taken]
        return self._rng.choice(free) if free else None


def _allocated(ask: PortAsk, value: int, address: str) -> AllocatedPort:
    # to = -1 asks for the task to use the host port itself.
    return AllocatedPort(label=ask.label, value=value, to=value if ask.to == -1 else ask.to,
                         host_ip=address)


def _network_port(port: AllocatedPort) -> dict[str, Any]:
    return {"Label": port.label, "Value": port.value, "To": port.to}
