"""The vocabulary of ACL policies: the coarse ``policy`` levels each block accepts, the
capabilities each block knows, and what a coarse level expands to.

The one home of these tables (Nomad's ``acl/policy.go`` constants); ``policy`` validates
against them and ``acl`` checks with them. Pure data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DENY = "deny"
READ = "read"
LIST = "list"
WRITE = "write"
SCALE = "scale"

# Coarse levels: every block but ``plugin`` accepts these (``scale`` outside namespaces
# grants nothing), ``plugin`` is the only one accepting ``list``.
POLICY_LEVELS = frozenset({DENY, READ, WRITE, SCALE})
PLUGIN_POLICY_LEVELS = frozenset({DENY, READ, LIST, WRITE})

# Every namespace capability, in the order RulesJSON lists them.
NAMESPACE_CAPABILITIES: tuple[str, ...] = (
    "deny",
    "list-jobs",
    "parse-job",
    "read-job",
    "submit-job",
    "dispatch-job",
    "read-logs",
    "read-fs",
    "alloc-exec",
    "alloc-node-exec",
    "alloc-lifecycle",
    "register-job",
    "revert-job",
    "deregister-job",
    "purge-job",
    "evaluate-job",
    "plan-job",
    "tag-job-version",
    "stable-job",
    "fail-deployment",
    "pause-deployment",
    "promote-deployment",
    "unblock-deployment",
    "cancel-deployment",
    "set-alloc-health-deployment",
    "gc-allocation",
    "pause-allocation",
    "force-periodic-job",
    "delete-service-registration",
    "scale-job",
    "read-job-scaling",
    "list-scaling-policies",
    "read-scaling-policy",
    "csi-register-plugin",
    "csi-write-volume",
    "csi-read-volume",
    "csi-list-volume",
    "csi-mount-volume",
    "host-volume-create",
    "host-volume-register",
    "host-volume-read",
    "host-volume-write",
    "host-volume-delete",
    "sentinel-override",
    "submit-recommendation",
)

_NAMESPACE_READ = (
    "list-jobs",
    "parse-job",
    "read-job",
    "csi-list-volume",
    "csi-read-volume",
    "read-job-scaling",
    "list-scaling-policies",
    "read-scaling-policy",
    "host-volume-read",
)
_NAMESPACE_WRITE = (
    *_NAMESPACE_READ,
    "scale-job",
    "submit-job",
    "dispatch-job",
    "read-logs",
    "read-fs",
    "alloc-exec",
    "alloc-lifecycle",
    "csi-mount-volume",
    "csi-write-volume",
    "submit-recommendation",
    "host-volume-create",
)


def _levels(read: Iterable[str], write: Iterable[str]) -> dict[str, frozenset[str]]:
    """What the coarse levels grant: ``deny`` only itself, ``read`` and ``write`` the
    capabilities given."""
    return {DENY: frozenset({DENY}), READ: frozenset(read), WRITE: frozenset(write)}


NAMESPACE_EXPANSION: Mapping[str, frozenset[str]] = {
    **_levels(_NAMESPACE_READ, _NAMESPACE_WRITE),
    SCALE: frozenset({
        "list-scaling-policies",
        "read-scaling-policy",
        "read-job-scaling",
        "scale-job",
        "read-job",
        "submit-recommendation",
    }),
}
# Host volume capabilities that bring others with them, applied after the expansion;
# each right-hand side is already closed under this table.
NAMESPACE_IMPLIED: Mapping[str, frozenset[str]] = {
    "host-volume-write": frozenset({
        "host-volume-register", "host-volume-create", "host-volume-delete", "host-volume-read",
    }),
    "host-volume-register": frozenset({"host-volume-create", "host-volume-read"}),
    "host-volume-create": frozenset({"host-volume-read"}),
}

VARIABLE_CAPABILITIES: tuple[str, ...] = ("read", "list", "write", "destroy", "deny")

NODE_POOL_CAPABILITIES: tuple[str, ...] = ("read", "write", "delete", "deny")
NODE_POOL_EXPANSION: Mapping[str, frozenset[str]] = _levels(
    read={"read"}, write={"delete", "read", "write"})

HOST_VOLUME_CAPABILITIES: tuple[str, ...] = ("mount-readonly", "mount-readwrite", "deny")
HOST_VOLUME_EXPANSION: Mapping[str, frozenset[str]] = _levels(
    read={"mount-readonly"}, write={"mount-readonly", "mount-readwrite"})

OPERATOR_CAPABILITIES: tuple[str, ...] = (
    "snapshot-save",
    "license-read",
    "keyring-read",
    "keyring-rotate",
    "keyring-delete",
    "deny",
)
OPERATOR_EXPANSION: Mapping[str, frozenset[str]] = _levels(
    read={"license-read", "keyring-read"},
    write={"snapshot-save", "license-read", "keyring-rotate", "keyring-read", "keyring-delete"},
)

SENTINEL_CAPABILITIES: tuple[str, ...] = (
    "sentinel-read",
    "sentinel-submit",
    "sentinel-delete",
    "deny",
)
SENTINEL_EXPANSION: Mapping[str, frozenset[str]] = _levels(
    read={"sentinel-read"}, write={"sentinel-read", "sentinel-submit", "sentinel-delete"})


def expand(
    level: str, explicit: Iterable[str], expansion: Mapping[str, frozenset[str]]
) -> frozenset[str]:
    """``explicit`` plus what the coarse ``level`` grants (levels missing from
    ``expansion``, such as ``scale`` outside namespaces, grant nothing)."""
    return frozenset(explicit) | expansion.get(level, frozenset())


def expand_namespace(level: str, explicit: Iterable[str]) -> frozenset[str]:
    caps = expand(level, explicit, NAMESPACE_EXPANSION)
    implied = [NAMESPACE_IMPLIED[cap] for cap in caps if cap in NAMESPACE_IMPLIED]
    return caps.union(*implied)


def expand_variables(explicit: Iterable[str]) -> frozenset[str]:
    """One ``path`` block's capabilities: ``read`` brings ``list``; a ``deny`` anywhere
    leaves only ``deny``."""
    caps = frozenset(explicit)
    if DENY in caps:
        return frozenset({DENY})
    if READ in caps:
        return caps | {LIST}
    return caps


def in_order(capabilities: frozenset[str], order: tuple[str, ...]) -> list[str]:
    """``capabilities`` as a list in the vocabulary's order (for RulesJSON)."""
    return [cap for cap in order if cap in capabilities]
