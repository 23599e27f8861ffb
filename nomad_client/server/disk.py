"""Disk bookkeeping for placement: a node's free disk (from its fingerprint) against the
ephemeral disks of the allocations it runs.

A node's disk is the ``unique.storage.bytesfree`` its client fingerprinted, in MB; a node that
reports none is not limited by disk. Every live allocation takes its group's
``ephemeral_disk.size`` (Nomad's 300 MB when the group has none). A node without room is
exhausted in Nomad's ``disk`` dimension. Pure bookkeeping over records handed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from nomad_client.jobspec.rollout import DEFAULT_DISK_MB
from nomad_client.structs.jobs import iter_groups
from nomad_client.structs.models import Allocation, Node

DISK_EXHAUSTED: Final = "disk"
FREE_BYTES_ATTRIBUTE: Final = "unique.storage.bytesfree"
_MB: Final = 1024 * 1024


def group_disk_mb(group: Mapping[str, Any]) -> int:
    """The ephemeral disk one allocation of ``group`` takes, in MB."""
    size = (group.get("EphemeralDisk") or {}).get("SizeMB")
    return size if isinstance(size, int) and not isinstance(size, bool) else DEFAULT_DISK_MB


def alloc_disk_mb(alloc: Allocation) -> int:
    for group in iter_groups(alloc.job):
        if group.get("Name") == alloc.task_group:
            return group_disk_mb(group)
    return DEFAULT_DISK_MB


def node_disk_mb(node: Node) -> int | None:
    """The node's fingerprinted free disk in MB; None when it reports none."""
    free = node.attributes.get(FREE_BYTES_ATTRIBUTE)
    try:
        return int(free) // _MB if free is not None else None
    except ValueError:
        return None


class DiskBook:
    """The disk the live allocations of each node take during one scheduling pass; ``take``
    adds each allocation placed."""

    def __init__(self, allocs: Iterable[Allocation]) -> None:
        self._used: dict[str, int] = {}
        for alloc in allocs:
            if not alloc.terminal():
                self._used[alloc.node_id] = self._used.get(alloc.node_id, 0) + alloc_disk_mb(
                    alloc)

    def fits(self, node: Node, size_mb: int) -> bool:
        capacity = node_disk_mb(node)
        return capacity is None or self._used.get(node.id, 0) + size_mb <= capacity

    def take(self, node: Node, size_mb: int) -> None:
        self._used[node.id] = self._used.get(node.id, 0) + size_mb
