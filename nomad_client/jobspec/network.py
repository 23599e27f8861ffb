"""The rules of a group's ``network`` block, in one place for both front doors: the HCL
decoder reports a broken rule with the file and line, the job validator checks JSON jobs
(any key missing or mistyped) by the same rules.

The canonical shape is Nomad's API JSON: ``{"Mode": "host", "ReservedPorts": [{"Label",
"Value", "To"}], "DynamicPorts": [{"Label", "Value": 0, "To"}]}``; ``Value`` of a reserved
port is its static host port, a dynamic port's is picked by the scheduler. Pure computation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from nomad_client.jobspec.errors import short_repr

# "bridge" and "cni/<name>" need network namespaces this client cannot build (yet).
NETWORK_MODES: Final = ("host", "none")
DEFAULT_HOST_NETWORK: Final = "default"
MAX_PORT: Final = 65535
# A label becomes part of environment variable names (NOMAD_PORT_<label>): an identifier.
_PORT_LABEL = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,127}\Z")  # \Z: `$` accepts a newline


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def mode_problem(mode: Any) -> str | None:
    if mode in NETWORK_MODES:
        return None
    return (f"unsupported network mode {short_repr(mode)} (expected one of "
            f"{', '.join(NETWORK_MODES)})")


def label_problem(label: Any) -> str | None:
    if isinstance(label, str) and _PORT_LABEL.match(label):
        return None
    return (f"invalid port label {short_repr(label)} (letters, digits and '_', not starting "
            "with a digit, at most 128 characters)")


def static_problem(label: str, value: Any) -> str | None:
    if _is_int(value) and 1 <= value <= MAX_PORT:
        return None
    return f"port {label!r}: static must be between 1 and {MAX_PORT}, got {short_repr(value)}"


def to_problem(label: str, value: Any) -> str | None:
    if _is_int(value) and -1 <= value <= MAX_PORT:
        return None
    return f"port {label!r}: to must be between -1 and {MAX_PORT}, got {short_repr(value)}"


def host_network_problem(label: str, value: Any) -> str | None:
    if value in ("", DEFAULT_HOST_NETWORK):
        return None
    return (f"port {label!r}: host_network {short_repr(value)} is not supported (this client "
            f'has only the "{DEFAULT_HOST_NETWORK}" host network)')


def duplicate_label(label: str) -> str:
    return f"port label {label!r} already in use by the group network"


def duplicate_static(value: int, holder: str) -> str:
    return f"static port {value} already reserved by port {holder!r}"


def fill_networks(networks: Any) -> None:
    """Fill the defaults of a group's ``Networks`` in place (mistyped parts are left for
    ``network_problems`` to report)."""
    if not isinstance(networks, list):
        return
    for network in networks:
        if not isinstance(network, dict):
            continue
        if not network.get("Mode"):
            network["Mode"] = "host"
        for key in ("ReservedPorts", "DynamicPorts"):
            if network.get(key) is None:
                network[key] = []
            for port in network[key] if isinstance(network[key], list) else ():
                if isinstance(port, dict):
                    for field in ("Value", "To"):
                        if port.get(field) is None:
                            port[field] = 0


def network_problems(networks: Any) -> Iterator[str]:
    """Every broken rule of a group's filled-in ``Networks``."""
    if not isinstance(networks, list):
        yield "Networks must be a list"
        return
    if len(networks) > 1:
        yield "only one network block is allowed in a task group"
    for network in networks:
        if not isinstance(network, dict):
            yield "each network must be an object"
            continue
        if (problem := mode_problem(network["Mode"])) is not None:
            yield problem
        yield from _port_problems(network)


def _port_problems(network: Mapping[str, Any]) -> Iterator[str]:
    labels: set[str] = set()
    statics: dict[int, str] = {}
    for key in ("ReservedPorts", "DynamicPorts"):
        ports = network[key]
        if not isinstance(ports, list) or not all(isinstance(p, dict) for p in ports):
            yield f"{key} must be a list of objects"
            continue
        for port in ports:
            label = port.get("Label")
            if (problem := label_problem(label)) is not None:
                yield problem
                continue
            if label in labels:
                yield duplicate_label(label)
            labels.add(label)
            value = port["Value"]
            if key == "ReservedPorts":
                if (problem := static_problem(label, value)) is not None:
                    yield problem
                elif value in statics:
                    yield duplicate_static(value, statics[value])
                else:
                    statics[value] = label
            elif value != 0:
                yield (f"dynamic port {label!r}: Value must be 0 (the scheduler picks it), got "
                       f"{short_repr(value)}; a static port belongs in ReservedPorts")
            if (problem := to_problem(label, port["To"])) is not None:
                yield problem
            host_network = port.get("HostNetwork")
            if host_network is not None and (
                    problem := host_network_problem(label, host_network)) is not None:
                yield problem
            if port.get("IgnoreCollision"):
                yield f"port {label!r}: IgnoreCollision is not supported by this client"
