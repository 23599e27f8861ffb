"""The embedded server: owns the state store, the scheduler and the keyring.

HTTP endpoints call it directly (they live in the same agent process); the client reaches it
only through ``rpc.ServerRPC``. Every write goes through ``StateStore.write`` so indexes and
blocking queries stay consistent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from nomad_client.server.keyring import IdentityClaims, IdentityError, IdentityVerifier, Keyring
from nomad_client.server.scheduler import plan_job
from nomad_client.server.state import JOBS, StateStore
from nomad_client.structs.models import (
    DESIRED_RUN,
    EVAL_COMPLETE,
    NODE_READY,
    ACLToken,
    Allocation,
    AllocUpdate,
    Evaluation,
    Node,
)

log = logging.getLogger(__name__)


class NotFound(Exception):
    pass


class Server:
    def __init__(self, store: StateStore, keyring: Keyring, *, region: str,
                 acl_enabled: bool) -> None:
        self.store = store
        self.keyring = keyring
        self.region = region
        self.acl_enabled = acl_enabled
        self.identities = IdentityVerifier(keyring)
        # One scheduling pass at a time, as a single-leader cluster would do.
        self._plan_lock = asyncio.Lock()

    # ---- jobs --------------------------------------------------------------------------
    async def register_job(self, job: Mapping[str, Any]) -> tuple[str, int]:
        job = dict(job)
        previous = self.store.get(JOBS, job["ID"])
        job["Stop"] = False
        job["SubmitTime"] = time.time_ns()
        job["Version"] = (previous["Version"] + 1) if previous else 0
        job["Status"] = "pending"
        await self.store.write({JOBS: [(job["ID"], job)]})
        return await self._evaluate(job["ID"], "job-register")

    async def deregister_job(self, job_id: str, *, purge: bool) -> tuple[str, int]:
        job = self.store.get(JOBS, job_id)
        if job is None:
            return "", 0  # Nomad answers 200 with empty IDs for unknown jobs
        await self.store.write({JOBS: [(job_id, {**job, "Stop": True})]})
        eval_id, index = await self._evaluate(job_id, "job-deregister")
        if purge:
            # Allocations already finished go now; running ones once their client reports
            # them terminal (see update_allocs_from_client). Their clients then remove
            # the allocation directories.
            done = [a.id for a in self.job_allocs(job_id) if a.client_terminal()]
            index = await self.store.write({}, {JOBS: [job_id], "allocs": done})
        return eval_id, index

    def job_status(self, job: Mapping[str, Any]) -> str:
        allocs = self.job_allocs(job["ID"])
        if any(not a.client_terminal() and a.desired_status == DESIRED_RUN for a in allocs):
            return "running" if any(a.client_status == "running" for a in allocs) else "pending"
        if job.get("Stop") or (allocs and job.get("Type") == "batch"):
            return "dead"
        return "pending"

    def job_allocs(self, job_id: str) -> list[Allocation]:
        return [a for a in self.store.rows("allocs") if a.job_id == job_id]

    async def _evaluate(self, job_id: str, triggered_by: str) -> tuple[str, int]:
        async with self._plan_lock:
            job = self.store.get(JOBS, job_id)
            if job is None:
                return "", self.store.index
            ev = Evaluation(id=str(uuid.uuid4()), namespace=job.get("Namespace", "default"),
                            job_id=job_id, type=job.get("Type", "service"),
                            triggered_by=triggered_by, priority=job.get("Priority", 50))
            nodes = self.store.rows("nodes")
            plan = plan_job(job, ev.id, nodes, self.job_allocs(job_id))
            new_allocs = [self._with_identities(a) for a in plan.new_allocs]
            changed = [*new_allocs, *plan.stopped_allocs]
            ev = attrs.evolve(ev, status=EVAL_COMPLETE, failed_tg_allocs=dict(plan.failed_groups),
                              queued_allocations=dict(plan.queued))
            index = await self.store.write({
                "evals": [(ev.id, ev)],
                "allocs": [(a.id, attrs.evolve(a, alloc_modify_index=self.store.index + 1))
                           for a in changed],
            })
            if plan.failed_groups:
                log.info("job %s: could not place %s", job_id, dict(plan.queued))
            return ev.id, index

    def _with_identities(self, alloc: Allocation) -> Allocation:
        group = next(g for g in alloc.job["TaskGroups"] if g["Name"] == alloc.task_group)
        tokens = {}
        for task in group.get("Tasks") or ():
            ttl_ns = (task.get("Identity") or {}).get("TTL") or 0
            tokens[task["Name"]] = self.keyring.sign_identity(
                namespace=alloc.namespace, job_id=alloc.job_id, alloc_id=alloc.id,
                task=task["Name"], group=alloc.task_group, region=self.region,
                # Unlike Nomad, the default identity may carry a ttl (and so an exp claim).
                ttl_seconds=ttl_ns / 1e9 if ttl_ns else None)
        return attrs.evolve(alloc, signed_identities=tokens)

    async def _reevaluate_queued(self) -> None:
        """A node changed: retry every live job that still has allocations it could not place."""
        for job in self.store.rows(JOBS):
            if job.get("Stop"):
                continue
            evals = [e for e in self.store.rows("evals") if e.job_id == job["ID"]]
            latest = max(evals, key=lambda e: e.create_index, default=None)
            if latest is not None and latest.queued_allocations:
                try:
                    await self._evaluate(job["ID"], "node-update")
                except Exception:
                    # One bad job must never stop nodes from registering.
                    log.exception("re-evaluating job %s failed", job["ID"])

    # ---- nodes (the client side of the RPC interface lands here) ------------------------
    async def register_node(self, node: Node) -> int:
        previous = self.store.get("nodes", node.id)
        if previous is not None and previous.secret_id and previous.secret_id != node.secret_id:
            raise PermissionError("node secret ID does not match")
        node = attrs.evolve(node, status=NODE_READY, status_updated_at=int(time.time()))
        index = await self.store.write({"nodes": [(node.id, node)]})
        await self._reevaluate_queued()
        return index

    async def update_node_status(self, node_id: str, status: str) -> int:
        node = self._node(node_id)
        if node.status == status:
            return self.store.index
        return await self.store.write({"nodes": [(node_id, attrs.evolve(
            node, status=status, status_updated_at=int(time.time())))]})

    def _node(self, node_id: str) -> Node:
        node = self.store.get("nodes", node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found")
        return node

    async def client_allocs(self, node_id: str, min_index: int, wait: float
                            ) -> tuple[dict[str, int], int]:
        index = await self.store.wait_for_change(("allocs",), min_index, wait)
        allocs = {a.id: a.alloc_modify_index for a in self.store.rows("allocs")
                  if a.node_id == node_id}
        return allocs, index

    def allocs_by_id(self, alloc_ids: Sequence[str]) -> list[Allocation]:
        return [a for a in (self.store.get("allocs", i) for i in alloc_ids) if a is not None]

    async def update_allocs_from_client(self, updates: Sequence[AllocUpdate]) -> int:
        rows = []
        collect: list[str] = []
        for update in updates:
            alloc = self.store.get("allocs", update.id)
            if alloc is None:
                continue
            alloc = attrs.evolve(
                alloc, client_status=update.client_status,
                client_description=update.client_description,
                task_states=dict(update.task_states), modify_time=time.time_ns())
            rows.append((alloc.id, alloc))
            if alloc.client_terminal():
                self.identities.forget_alloc(alloc.id)
                if self.store.get(JOBS, alloc.job_id) is None:
                    collect.append(alloc.id)  # its job was purged: garbage-collect it
        if not rows:
            return self.store.index
        return await self.store.write(
            {"allocs": [r for r in rows if r[0] not in collect]}, {"allocs": collect})

    async def gc_alloc(self, alloc_id: str) -> int:
        return await self.store.write({}, {"allocs": [alloc_id]})

    # ---- authentication ----------------------------------------------------------------
    def token_by_secret(self, secret: str) -> ACLToken | None:
        for token in self.store.rows("acl_tokens"):
            if token.secret_id == secret:
                return token
        return None

    def verify_workload_identity(self, token: str) -> IdentityClaims:
        """A workload identity is valid while its signature, time claims and allocation are."""
        claims = self.identities.verify(token)
        alloc = self.store.get("allocs", claims.alloc_id)
        if alloc is None:
            raise IdentityError("allocation does not exist")
        if alloc.client_terminal() or alloc.desired_status != DESIRED_RUN:
            raise IdentityError("allocation is terminal")
        return claims

