"""A compiled ACL: a token's (or workload identity's) policies folded into tables, so that
every check is a dict lookup, plus a glob fallback remembered per name.

Folding follows Nomad's ``acl.NewACL`` (policies in name order): labelled blocks merge per
exact label text and a ``deny`` freezes that label's entry; variables rules union with no
deny override [quirk]; singleton levels keep the strongest (deny > write > read > list).
Pure computation.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence

import attrs

from nomad_client.acl.capabilities import DENY, LIST, READ, WRITE
from nomad_client.acl.policy import Policy
from nomad_client.acl.table import EMPTY, EMPTY_TABLE, CapabilityTable

# Variable keys join the namespace label and the path spec with a byte neither may hold.
_KEY_SEPARATOR = "\x00"
_LEVEL_STRENGTH = {LIST: 1, READ: 2, WRITE: 3, DENY: 4}
_IMPLICIT_VARIABLES = frozenset({READ, LIST})


@attrs.frozen
class WorkloadClaim:
    """What a workload identity's implicit variable grants depend on (Nomad's ACLClaim):
    ``job_id`` is the parent job for dispatched and periodic children; ``task`` is empty
    for service identities."""

    namespace: str
    job_id: str
    group: str
    task: str


def variable_key(namespace: str, path: str) -> str:
    return f"{namespace}{_KEY_SEPARATOR}{path}"


def _implicit_paths(claim: WorkloadClaim) -> frozenset[str]:
    """The variable paths a workload may read and list without any policy."""
    paths = ["nomad/jobs"]
    prefix = "nomad/jobs"
    # Each level needs the one above; an empty part (a service identity has no task)
    # grants nothing below it rather than a path ending in "/".
    for part in (claim.job_id, claim.group, claim.task):
        if not part:
            break
        prefix = f"{prefix}/{part}"
        paths.append(prefix)
    return frozenset(paths)


class ACL:
    """Answers "may this identity do X". Build one with ``compile_acl``."""

    __slots__ = (
        "management",
        "_namespaces",
        "_node_pools",
        "_host_volumes",
        "_variables",
        "_variable_keys",
        "_agent",
        "_node",
        "_operator",
        "_quota",
        "_plugin",
        "_operator_capabilities",
    )

    def __init__(
        self,
        *,
        management: bool = False,
        namespaces: CapabilityTable = EMPTY_TABLE,
        node_pools: CapabilityTable = EMPTY_TABLE,
        host_volumes: CapabilityTable = EMPTY_TABLE,
        variables: CapabilityTable = EMPTY_TABLE,
        agent: str = "",
        node: str = "",
        operator: str = "",
        quota: str = "",
        plugin: str = "",
        operator_capabilities: frozenset[str] = EMPTY,
    ) -> None:
        self.management = management
        self._namespaces = namespaces
        self._node_pools = node_pools
        self._host_volumes = host_volumes
        self._variables = variables
        self._variable_keys = variables.labels()  # sorted, for prefix searches
        self._agent = agent
        self._node = node
        self._operator = operator
        self._quota = quota
        self._plugin = plugin
        self._operator_capabilities = operator_capabilities

    # -- namespaces ----------------------------------------------------------------------

    def allow_namespace_op(self, namespace: str, capability: str) -> bool:
        """``capability`` in ``namespace``; for ``"*"``, in any namespace a rule names."""
        if self.management:
            return True
        if namespace == "*":
            return capability in self._namespaces.all_capabilities
        return capability in self._namespaces.lookup(namespace)

    def allow_namespace(self, namespace: str) -> bool:
        """Any access short of deny (namespace list and read); for ``"*"``, anywhere."""
        if self.management:
            return True
        if namespace == "*":
            return self._namespaces.any_access
        caps = self._namespaces.lookup(namespace)
        return bool(caps) and DENY not in caps

    # -- singleton levels ----------------------------------------------------------------

    def allow_agent_read(self) -> bool:
        return self.management or self._agent in (READ, WRITE)

    def allow_agent_write(self) -> bool:
        return self.management or self._agent == WRITE

    def allow_node_read(self) -> bool:
        return self.management or self._node in (READ, WRITE)

    def allow_node_write(self) -> bool:
        return self.management or self._node == WRITE

    def allow_operator_read(self) -> bool:
        return self.management or self._operator in (READ, WRITE)

    def allow_operator_write(self) -> bool:
        return self.management or self._operator == WRITE

    def allow_operator_capability(self, capability: str) -> bool:
        return (self.management or self._operator == WRITE
                or capability in self._operator_capabilities)

    def allow_quota_read(self) -> bool:
        return self.management or self._quota in (READ, WRITE)

    def allow_quota_write(self) -> bool:
        return self.management or self._quota == WRITE

    def allow_plugin_read(self) -> bool:
        # [quirk] only "read": a plugin "write" level grants neither read nor list.
        return self.management or self._plugin == READ

    def allow_plugin_list(self) -> bool:
        return self.management or self._plugin in (LIST, READ)

    # -- node pools and host volumes -----------------------------------------------------

    def allow_node_pool(self, pool: str, capability: str) -> bool:
        return self.management or capability in self._node_pools.lookup(pool)

    def allow_node_pool_access(self, pool: str) -> bool:
        """Any access short of deny (node pool list filtering)."""
        if self.management:
            return True
        caps = self._node_pools.lookup(pool)
        return bool(caps) and DENY not in caps

    def allow_host_volume(self, volume: str, capability: str) -> bool:
        return self.management or capability in self._host_volumes.lookup(volume)

    # -- variables -----------------------------------------------------------------------

    def allow_variable_op(
        self, namespace: str, path: str, op: str, claim: WorkloadClaim | None = None
    ) -> bool:
        """``op`` (read, list, write, destroy) on the variable at ``path``: an exact rule
        wins, then a workload's implicit read/list of its own paths, then the closest glob
        over namespace and path together."""
        if self.management:
            return True
        key = variable_key(namespace, path)
        caps = self._variables.exact(key)
        if caps is not None:
            return op in caps
        if (claim is not None and claim.namespace == namespace
                and path in _implicit_paths(claim)):
            return op in _IMPLICIT_VARIABLES
        return op in self._variables.lookup(key)

    def allow_any_variables(self, namespace: str) -> bool:
        """Whether any variables rule could apply in ``namespace`` (the Variable event
        topic and search; results are then filtered per path). [quirk] As in Nomad, the
        namespace is matched as a prefix of the rule keys, so rules under a glob namespace
        do not count and ``dev`` also matches rules for ``devops``."""
        if self.management:
            return True
        keys = self._variable_keys
        at = bisect.bisect_left(keys, namespace)
        return at < len(keys) and keys[at].startswith(namespace)


MANAGEMENT = ACL(management=True)
DENY_ALL = ACL()


# --------------------------------------------------------------------------------------
# Compiling


def _fold_labelled(entries: dict[str, set[str]], label: str, caps: Iterable[str]) -> None:
    """Merge one block into its label's entry; an entry holding deny stays exactly {deny}."""
    current = entries.setdefault(label, set())
    if DENY in current:
        return
    if DENY in caps:
        current.clear()
        current.add(DENY)
        return
    current.update(caps)


def _strongest(current: str, level: str) -> str:
    """The stronger of two levels; ``scale`` and "" count as nothing."""
    if _LEVEL_STRENGTH.get(level, 0) > _LEVEL_STRENGTH.get(current, 0):
        return level
    return current


def _table(entries: dict[str, set[str]]) -> CapabilityTable:
    return CapabilityTable({label: frozenset(caps) for label, caps in entries.items()})


def compile_acl(policies: Sequence[Policy]) -> ACL:
    """Fold ``policies`` (the caller passes them sorted by policy name) into one ACL."""
    namespaces: dict[str, set[str]] = {}
    node_pools: dict[str, set[str]] = {}
    host_volumes: dict[str, set[str]] = {}
    variables: dict[str, set[str]] = {}
    operator_capabilities: set[str] = set()
    agent = node = operator = quota = plugin = ""
    for policy in policies:
        for ns in policy.namespaces:
            for rule in ns.variables:
                # [quirk] unioned with no deny override: {deny} + {read} allows read.
                variables.setdefault(variable_key(ns.name, rule.path), set()).update(
                    rule.capabilities)
            # Even a block holding only variables creates its (empty) entry [quirk].
            _fold_labelled(namespaces, ns.name, ns.capabilities)
        for pool in policy.node_pools:
            _fold_labelled(node_pools, pool.name, pool.capabilities)
        for volume in policy.host_volumes:
            _fold_labelled(host_volumes, volume.name, volume.capabilities)
        agent = _strongest(agent, policy.agent)
        node = _strongest(node, policy.node)
        operator = _strongest(operator, policy.operator)
        quota = _strongest(quota, policy.quota)
        plugin = _strongest(plugin, policy.plugin)
        if policy.operator_capabilities and DENY not in operator_capabilities:
            if DENY in policy.operator_capabilities:
                operator_capabilities = {DENY}
            else:
                operator_capabilities |= policy.operator_capabilities
    return ACL(
        namespaces=_table(namespaces),
        node_pools=_table(node_pools),
        host_volumes=_table(host_volumes),
        variables=_table(variables),
        agent=agent,
        node=node,
        operator=operator,
        quota=quota,
        plugin=plugin,
        operator_capabilities=frozenset(operator_capabilities),
    )


class ACLCache:
    """Compiled ACLs by policy set, least recently used dropped first. The caller's key
    must change whenever a policy does (e.g. the sorted (policy name, modify index) pairs)."""

    def __init__(self, max_entries: int = 512) -> None:
        if max_entries < 1:
            raise ValueError("an ACL cache holds at least one entry")
        self._max_entries = max_entries
        self._entries: OrderedDict[Hashable, ACL] = OrderedDict()

    def peek(self, key: Hashable) -> ACL | None:
        """The ACL cached for ``key``, or None (nothing is built)."""
        acl = self._entries.get(key)
        if acl is not None:
            self._entries.move_to_end(key)
        return acl

    def get(self, key: Hashable, build: Callable[[], ACL]) -> ACL:
        acl = self.peek(key)
        if acl is not None:
            return acl
        acl = build()
        self._entries[key] = acl
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return acl

    def __len__(self) -> int:
        return len(self._entries)
