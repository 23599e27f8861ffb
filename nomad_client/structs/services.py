"""Service registrations as the client and the server both name them (Nomad's
``ServiceRegistration``, kept as its API dict).

A registration's ID says whose it is, as Nomad's does:
``_nomad-task-<alloc ID>-<workload>-<service name>-<port label>``, where ``<workload>`` is the
task's name for a task's service and ``group-<group>`` for a group's. The server holds a
client to the IDs of its own allocations by that prefix. Pure: touches nothing.
"""

from __future__ import annotations

from typing import Final

REGISTRATION_ID_PREFIX: Final = "_nomad-task-"


def group_workload(group: str) -> str:
    """The workload a group's services belong to (a task's belong to the task's name)."""
    return f"group-{group}"


def alloc_registration_prefix(alloc_id: str) -> str:
    """What the ID of every registration of ``alloc_id`` starts with."""
    return f"{REGISTRATION_ID_PREFIX}{alloc_id}-"


def registration_id(alloc_id: str, workload: str, service: str, port_label: str) -> str:
    return f"{alloc_registration_prefix(alloc_id)}{workload}-{service}-{port_label}"
