"""Group networks and the ports an allocation was given, read from Nomad's API shapes.

A canonical task group carries ``"Networks": [{"Mode", "ReservedPorts", "DynamicPorts"}]``
(each port ``{"Label", "Value", "To"}``; ``Value`` is the static host port, 0 for a dynamic
one). The scheduler records what it gave an allocation in ``Allocation.allocated_resources``:
``{"Shared": {"Ports": [{"Label", "Value", "To", "HostIP"}], "Networks": [...]}}``. The
server, the client and the CLI all read those shapes through here. Pure: touches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

# The node attribute holding the address its allocations' ports are reached at.
NODE_ADDRESS_ATTRIBUTE: Final = "unique.network.ip-address"


@attrs.frozen
class PortAsk:
    """One ``port "label" {}`` of a group network: ``value`` is the static host port (0 for
    a dynamic one), ``to`` the port the task is told to listen on (0: the host port, -1:
    the same as the host port)."""

    label: str
    value: int
    to: int


@attrs.frozen
class NetworkAsk:
    """A group's ``network`` block: its mode and its ports, static ones first."""

    mode: str
    reserved: tuple[PortAsk, ...]
    dynamic: tuple[PortAsk, ...]


@attrs.frozen
class AllocatedPort:
    """A port an allocation holds on its node: ``value`` on ``host_ip``, mapped to ``to``."""

    label: str
    value: int
    to: int
    host_ip: str

    @property
    def task_port(self) -> int:
        """The port the task listens on (Nomad's ``NOMAD_PORT_<label>``): ``to`` if set,
        else the host port."""
        return self.to if self.to > 0 else self.value

    def to_api(self) -> dict[str, Any]:
        return {"Label": self.label, "Value": self.value, "To": self.to, "HostIP": self.host_ip}


def _port_asks(ports: Any) -> tuple[PortAsk, ...]:
    return tuple(PortAsk(label=p["Label"], value=int(p.get("Value") or 0),
                         to=int(p.get("To") or 0))
                 for p in ports or ())


def group_networks(group: Mapping[str, Any]) -> tuple[NetworkAsk, ...]:
    """The networks a canonical task group asks for (none without a ``network`` block)."""
    return tuple(NetworkAsk(mode=net.get("Mode") or "host",
                            reserved=_port_asks(net.get("ReservedPorts")),
                            dynamic=_port_asks(net.get("DynamicPorts")))
                 for net in group.get("Networks") or ())


def group_network_mode(group: Mapping[str, Any]) -> str:
    """The mode of a canonical task group's network ("host" without a ``network`` block)."""
    networks = group_networks(group)
    return networks[0].mode if networks else "host"


def allocated_ports(allocated_resources: Mapping[str, Any]) -> tuple[AllocatedPort, ...]:
    """The ports recorded in an allocation's ``allocated_resources`` (none when it has none)."""
    shared = allocated_resources.get("Shared") or {}
    return tuple(AllocatedPort(label=p["Label"], value=int(p["Value"]), to=int(p.get("To") or 0),
                               host_ip=p.get("HostIP") or "")
                 for p in shared.get("Ports") or ())


def allocated_resources(networks: Sequence[Mapping[str, Any]],
                        ports: Sequence[AllocatedPort]) -> dict[str, Any]:
    """The ``allocated_resources`` value for an allocation given ``ports`` in ``networks``
    (``{}`` when its group has no network)."""
    if not networks:
        return {}
    return {"Shared": {"Ports": [p.to_api() for p in ports], "Networks": list(networks)}}


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (Go's ``net.JoinHostPort``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
