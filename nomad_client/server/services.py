"""Native service discovery on the server: the ``services`` table of Nomad's
``ServiceRegistration`` dicts (``ID``, ``ServiceName``, ``Namespace``, ``NodeID``,
``Datacenter``, ``JobID``, ``AllocID``, ``Tags``, ``Address``, ``Port``, ``CreateIndex``,
``ModifyIndex``), keyed by ID.

Only clients register, over RPC as their node (the server checks the node's secret first),
and only for live allocations placed on that node. A client sends what only it knows (the ID,
name, tags, address and port); namespace, job, node and datacenter come from the server's own
records, and the ID must carry its allocation's prefix, so a node can neither claim nor
overwrite another allocation's registrations. The allocation is checked inside each row
update, under the store's write lock, so a registration never lands after its allocation
became terminal; and the registry watches every committed batch (a commit observer of the
store), so whichever write makes an allocation terminal or deletes it (a stop, a client's
report, a purge, a garbage collection), its registrations are removed right after. An upsert
that changes nothing keeps the row and its indexes, as Nomad's does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nomad_client.server.state import DELETE, SERVICES, Change, RowUpdate, StateStore
from nomad_client.structs.models import Allocation, Node
from nomad_client.structs.services import alloc_registration_prefix

log = logging.getLogger(__name__)

# Bounds on what one client may put in the catalog for one allocation.
MAX_REGISTRATIONS_PER_CALL = 256
MAX_TEXT_LENGTH = 1024
MAX_TAGS = 128


class ServiceError(Exception):
    """A registration refused or not found; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _text(value: Any, field: str) -> str:
    if (not isinstance(value, str) or not value or len(value) > MAX_TEXT_LENGTH
            or not value.isprintable()):
        raise ServiceError(400, f"invalid service registration {field}")
    return value


def _address(value: Any) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ServiceError(400, "invalid service registration address") from None
    if address.is_unspecified:
        raise ServiceError(400, "invalid service registration address")
    return str(value)


def _client_part(raw: Any, alloc_id: str) -> dict[str, Any]:
    """What a client may say about one registration of ``alloc_id``, checked."""
    if not isinstance(raw, Mapping):
        raise ServiceError(400, "a service registration must be an object")
    reg_id = _text(raw.get("ID"), "ID")
    if not reg_id.startswith(alloc_registration_prefix(alloc_id)):
        raise ServiceError(403, f"service registration {reg_id!r} is not one of allocation "
                                f"{alloc_id}")
    tags = raw.get("Tags") or []
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise ServiceError(400, "invalid service registration tags")
    port = raw.get("Port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ServiceError(400, "invalid service registration port")
    return {"ID": reg_id, "ServiceName": _text(raw.get("ServiceName"), "name"),
            "Tags": [_text(t, "tag") for t in tags], "Address": _address(raw.get("Address")),
            "Port": port}


class ServiceRegistry:
    """The ``services`` table. Use it from one event loop."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        # Allocations whose registrations are to go: any a restored state still holds for
        # allocations that are gone or terminal, then each that becomes so.
        self._doomed = {r["AllocID"] for r in store.values(SERVICES)
                        if not self._live(r["AllocID"])}
        self._removals: set[asyncio.Task[None]] = set()
        store.observe(self._allocs_changed)

    async def close(self) -> None:
        """Stop removals under way (whatever they left is removed after a restart)."""
        for task in self._removals:
            task.cancel()
        await asyncio.gather(*self._removals, return_exceptions=True)

    def _live(self, alloc_id: str) -> bool:
        alloc: Allocation | None = self._store.get("allocs", alloc_id)
        return alloc is not None and not alloc.terminal()

    def _allocs_changed(self, index: int, changes: Sequence[Change]) -> None:
        """Commit observer (under the write lock, must not wait): allocations that stopped
        or went have their registrations removed by a write of their own, just after."""
        for change in changes:
            if (change.table == "allocs" and change.before is not None
                    and not change.before.terminal()
                    and (change.after is None or change.after.terminal())):
                self._doomed.add(change.key)
        if not self._doomed:
            return
        # Only those holding registrations (none can be added once they are terminal).
        doomed = self._doomed & {r["AllocID"] for r in self._store.values(SERVICES)}
        self._doomed = set()
        if not doomed:
            return
        task = asyncio.get_running_loop().create_task(self._remove_logged(doomed),
                                                      name="service-registrations-removal")
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _remove_logged(self, alloc_ids: set[str]) -> None:
        try:
            await self.remove_allocs(alloc_ids)
        except Exception:
            log.exception("removing the service registrations of stopped allocations failed")

    # ---- reads (in ID order) ---------------------------------------------------------------
    def all(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """The registrations of ``namespace`` (None: of every namespace)."""
        rows: list[dict[str, Any]] = self._store.rows(SERVICES)
        return rows if namespace is None else [r for r in rows if r["Namespace"] == namespace]

    def by_name(self, name: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.all(namespace) if r["ServiceName"] == name]

    def of_alloc(self, alloc_id: str) -> list[dict[str, Any]]:
        return [r for r in self.all() if r["AllocID"] == alloc_id]

    # ---- a client's writes (the caller has authenticated ``node``) --------------------------
    async def upsert(self, node: Node, alloc_id: str, registrations: Sequence[Any]) -> int:
        """Create or update registrations of ``alloc_id``, a live allocation on ``node``."""
        if len(registrations) > MAX_REGISTRATIONS_PER_CALL:
            raise ServiceError(400, "too many service registrations in one call")
        parts = [_client_part(raw, alloc_id) for raw in registrations]
        if not parts:
            return self._store.index
        return await self._store.write(updates={SERVICES: [
            (part["ID"], self._registered(node, alloc_id, part)) for part in parts]})

    def _registered(self, node: Node, alloc_id: str, part: dict[str, Any]) -> RowUpdate:
        def apply(current: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
            # Under the write lock: the allocation as it is now, not as it was asked about.
            alloc = self._live_alloc_on(node, alloc_id)
            if current is not None and current["AllocID"] != alloc_id:
                raise ServiceError(403, f"service registration {part['ID']!r} is not one of "
                                        f"allocation {alloc_id}")
            row = {"ID": part["ID"], "ServiceName": part["ServiceName"],
                   "Namespace": alloc.namespace, "NodeID": node.id,
                   "Datacenter": node.datacenter, "JobID": alloc.job_id, "AllocID": alloc.id,
                   "Tags": part["Tags"], "Address": part["Address"], "Port": part["Port"]}
            if current is not None and all(current.get(k) == v for k, v in row.items()):
                return None  # nothing changed: the indexes stay
            return row
        return apply

    def _live_alloc_on(self, node: Node, alloc_id: str) -> Allocation:
        alloc: Allocation | None = self._store.get("allocs", alloc_id)
        if alloc is None:
            raise ServiceError(404, f"allocation {alloc_id} not found")
        if alloc.node_id != node.id:
            raise ServiceError(403, f"allocation {alloc_id} is not placed on this node")
        if alloc.terminal():
            raise ServiceError(403, f"allocation {alloc_id} is terminal")
        return alloc

    async def deregister(self, node: Node, alloc_id: str, ids: Iterable[str] | None = None
                         ) -> int:
        """Remove registrations of ``alloc_id`` made by ``node`` (``ids`` of them; None: all
        of them). IDs it does not hold are no error: a retried delete finds them gone."""
        wanted = None if ids is None else set(ids)

        def remove(current: dict[str, Any] | None, index: int) -> Any:
            if (current is None or current["AllocID"] != alloc_id
                    or current["NodeID"] != node.id):
                return None
            return DELETE

        keys = [r["ID"] for r in self.of_alloc(alloc_id) if wanted is None or r["ID"] in wanted]
        return await self._store.write(updates={SERVICES: [(k, remove) for k in keys]})

    # ---- an operator's delete, and housekeeping -------------------------------------------------
    async def delete(self, namespace: str, reg_id: str) -> int:
        """``DELETE /v1/service/:name/:id``: the registration ``reg_id`` of ``namespace``."""
        def remove(current: dict[str, Any] | None, index: int) -> Any:
            if current is None or current["Namespace"] != namespace:
                raise ServiceError(404, "service registration not found")
            return DELETE

        return await self._store.write(updates={SERVICES: [(reg_id, remove)]})

    async def remove_allocs(self, alloc_ids: Iterable[str]) -> int:
        """Remove the registrations of those of ``alloc_ids`` that are gone or terminal."""
        wanted = set(alloc_ids)
        if not wanted:
            return self._store.index

        def remove(current: dict[str, Any] | None, index: int) -> Any:
            if current is None or self._live(current["AllocID"]):
                return None
            return DELETE

        keys = [r["ID"] for r in self.all() if r["AllocID"] in wanted]
        return await self._store.write(updates={SERVICES: [(k, remove) for k in keys]})
