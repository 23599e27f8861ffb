"""Which compiled ACL a caller holds: the one home of resolution (Nomad's ``ResolveACL``).

* a management token: ``MANAGEMENT``;
* a client token: its policies and those of the roles it links to (unknown policy names and
  deleted roles are skipped, as Nomad does);
* a workload identity: the policies attached to it by JobACL;
* anonymous: the policy named ``anonymous`` if there is one.

A caller whose policies are none of the existing ones gets ``DENY_ALL``: holding no policy
never means everything (CVE-2023-1299, where a workload identity without policies was
treated as management).

Compiled ACLs are cached by the sorted (policy name, modify index) pairs, so any policy edit
gives a new key and the next request sees it. Workload identities also skip the policy scan:
their ACL is remembered per (namespace, job, group, task) together with the index of the
policies table it was resolved at. Stored rules are parsed in a worker thread (a large policy
takes a second), once per key however many requests are waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from nomad_client.acl import (
    ACL,
    DENY_ALL,
    MANAGEMENT,
    ACLCache,
    PolicyError,
    compile_acl,
    parse_policy,
)
from nomad_client.server.acls import ANONYMOUS_POLICY, ACLs
from nomad_client.server.state import ACL_POLICIES, ACL_ROLES
from nomad_client.structs.models import TOKEN_MANAGEMENT, ACLPolicy, ACLToken, Allocation

log = logging.getLogger(__name__)

# Compiled ACLs kept, as Nomad's server cache.
MAX_COMPILED = 512
# Workloads whose resolution is remembered; past this the remembered ones are dropped.
MAX_WORKLOADS = 4096

PolicyKey = tuple[tuple[str, int], ...]
# (namespace, job ID, group, task): what JobACL attaches policies to.
WorkloadKey = tuple[str, str, str, str]


def workload_key(alloc: Allocation, task: str) -> WorkloadKey:
    """The workload ``task`` of ``alloc`` is, as policies attach to it: a dispatched or
    periodic child counts as its parent job."""
    return alloc.namespace, alloc.job.get("ParentID") or alloc.job_id, alloc.task_group, task


def _name(policy: ACLPolicy) -> str:
    return policy.name


def _remember(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    if len(cache) >= limit:
        cache.clear()  # rare (thousands of callers), and every entry can be resolved again
    cache[key] = value


def _key(policies: Sequence[ACLPolicy]) -> PolicyKey:
    return tuple([(p.name, p.modify_index) for p in policies])


def _compile(policies: Sequence[ACLPolicy]) -> ACL:
    """Parse (leniently, as Nomad evaluates stored rules) and fold ``policies``, given in
    name order. Blocking: runs in a worker thread."""
    parsed = []
    for policy in policies:
        try:
            parsed.append(parse_policy(policy.rules, strict=False))
        except PolicyError as err:
            # Skipping it could drop a deny; refusing everything is the safe reading.
            log.warning("ACL policy %r cannot be parsed, so its holders get no access: %s",
                        policy.name, err)
            return DENY_ALL
    return compile_acl(parsed)


class ACLResolver:
    """Resolves callers to compiled ACLs, caching as the module docstring says. Use it from
    one event loop (its caches are not locked)."""

    def __init__(self, acls: ACLs, *, max_compiled: int = MAX_COMPILED,
                 max_workloads: int = MAX_WORKLOADS) -> None:
        self._acls = acls
        self._store = acls.store
        self._compiled = ACLCache(max_compiled)
        self._compiling: dict[PolicyKey, asyncio.Future[ACL]] = {}
        self._workloads: dict[WorkloadKey, tuple[int, ACL]] = {}
        # The request path's shortcuts, each entry tagged with the table indexes it was
        # resolved at (any policy or role change makes it stale): by (alloc ID, task) for a
        # workload identity, by (accessor, token modify index) for a client token.
        self._by_task: dict[tuple[str, str], tuple[int, ACL]] = {}
        self._by_token: dict[tuple[str, int], tuple[int, int, ACL]] = {}
        self._max_workloads = max_workloads

    def cached_for_token(self, token: ACLToken) -> ACL | None:
        """The token's ACL if it was resolved since the last policy or role change."""
        if token.type == TOKEN_MANAGEMENT:
            return MANAGEMENT
        known = self._by_token.get((token.accessor_id, token.modify_index))
        if (known is not None and known[0] == self._store.table_index(ACL_POLICIES)
                and known[1] == self._store.table_index(ACL_ROLES)):
            return known[2]
        return None

    def cached_for_workload(self, alloc_id: str, task: str) -> ACL | None:
        """A workload identity's ACL if it was resolved since the last policy change."""
        known = self._by_task.get((alloc_id, task))
        if known is not None and known[0] == self._store.table_index(ACL_POLICIES):
            return known[1]
        return None

    async def for_token(self, token: ACLToken) -> ACL:
        if token.type == TOKEN_MANAGEMENT:
            return MANAGEMENT
        # Read before the policies and roles are: a change after this point leaves a stale
        # index behind, so the next request resolves again.
        indexes = (self._store.table_index(ACL_POLICIES), self._store.table_index(ACL_ROLES))
        acl = await self.for_policies(self._acls.token_policy_names(token))
        _remember(self._by_token, (token.accessor_id, token.modify_index), (*indexes, acl),
                  self._max_workloads)
        return acl

    async def for_workload(self, alloc: Allocation, task: str) -> ACL:
        key = workload_key(alloc, task)
        # Read before the policies are: a change after this point leaves a stale index
        # behind, so the next request resolves again.
        index = self._store.table_index(ACL_POLICIES)
        known = self._workloads.get(key)
        if known is not None and known[0] == index:
            return known[1]
        acl = await self.for_policies(self._acls.workload_policy_names(*key))
        _remember(self._workloads, key, (index, acl), self._max_workloads)
        _remember(self._by_task, (alloc.id, task), (index, acl), self._max_workloads)
        return acl

    async def for_anonymous(self) -> ACL:
        return await self.for_policies((ANONYMOUS_POLICY,))

    def _existing(self, names: Iterable[str]) -> list[ACLPolicy]:
        """The existing policies among ``names``, in name order (the order they fold in)."""
        return sorted((p for p in map(self._acls.policy, names) if p is not None), key=_name)

    async def for_policies(self, names: Iterable[str]) -> ACL:
        """The ACL of the existing policies among ``names``; ``DENY_ALL`` if none exist."""
        policies = self._existing(names)
        if not policies:
            return DENY_ALL
        key = _key(policies)
        cached = self._compiled.peek(key)
        if cached is not None:
            return cached
        compiling = self._compiling.get(key)
        if compiling is None:
            compiling = asyncio.ensure_future(asyncio.to_thread(_compile, policies))
            self._compiling[key] = compiling
            compiling.add_done_callback(lambda done: self._compiled_one(key, done))
        # Shielded: a caller that goes away must not cancel the others' compilation.
        return await asyncio.shield(compiling)

    def _compiled_one(self, key: PolicyKey, done: asyncio.Future[ACL]) -> None:
        del self._compiling[key]
        if not done.cancelled() and done.exception() is None:
            acl = done.result()
            self._compiled.get(key, lambda: acl)

