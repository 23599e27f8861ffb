"""A task's environment variables and ``${...}`` interpolation.

Pure functions over values passed in; touches no files, processes or global state (the
agent's own environment is passed in as ``host_env``, never read here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from nomad_client.structs.network import AllocatedPort, allocated_ports, join_host_port
from nomad_client.structs.node_properties import (
    ATTR_PREFIX,
    META_PREFIX,
    NODE_FIELDS,
    NODE_REGION,
)

__all__ = [
    "FS_ISOLATION_CHROOT",
    "FS_ISOLATION_NONE",
    "HOST_ENV_DENYLIST",
    "NodeView",
    "TaskEnvInput",
    "TaskPaths",
    "build_task_env",
    "clean_env_key",
    "interpolate",
    "interpolate_config",
    "port_env",
    "task_paths",
]

# Agent-side credentials and licences that must never reach a task through the host env.
HOST_ENV_DENYLIST: frozenset[str] = frozenset(
    {
        "CONSUL_TOKEN",
        "CONSUL_HTTP_TOKEN",
        "CONSUL_HTTP_TOKEN_FILE",
        "NOMAD_TOKEN",
        "VAULT_TOKEN",
        "CONSUL_LICENSE",
        "NOMAD_LICENSE",
        "VAULT_LICENSE",
        "CONSUL_LICENSE_PATH",
        "NOMAD_LICENSE_PATH",
        "VAULT_LICENSE_PATH",
        # Set by the agent only for a task that has a Task API socket; one inherited from
        # the agent's own environment would point a task without a socket elsewhere.
        "NOMAD_UNIX_ADDR",
    }
)

# Keys with these prefixes carry user-chosen labels and get their odd bytes replaced.
_CLEANED_PREFIXES = ("NOMAD_ADDR_", "NOMAD_IP_", "NOMAD_PORT_", "NOMAD_HOST_PORT_", "NOMAD_META_")

_REFERENCE = re.compile(r"\$\{([a-zA-Z0-9_\-.]+)\}")


# A driver's filesystem isolation (Nomad's ``FSIsolation`` capability): "none" runs a task
# in the host's tree, "chroot" makes its task dir its root.
FS_ISOLATION_NONE = "none"
FS_ISOLATION_CHROOT = "chroot"


@attrs.frozen
class TaskPaths:
    """A task's directories as the task itself sees them."""

    alloc_dir: str
    local_dir: str
    secrets_dir: str


def task_paths(fs_isolation: str, *, alloc_dir: str, local_dir: str,
               secrets_dir: str) -> TaskPaths:
    """Where a task run with ``fs_isolation`` finds the directories that are at the given
    host paths: the same paths, or Nomad's ``/alloc``, ``/local`` and ``/secrets`` inside
    a chroot."""
    if fs_isolation == FS_ISOLATION_CHROOT:
        return TaskPaths(alloc_dir="/alloc", local_dir="/local", secrets_dir="/secrets")
    return TaskPaths(alloc_dir=alloc_dir, local_dir=local_dir, secrets_dir=secrets_dir)


@attrs.frozen
class NodeView:
    """The node facts interpolation may refer to."""

    id: str
    name: str
    datacenter: str
    region: str
    node_class: str
    pool: str
    attributes: Mapping[str, str]
    meta: Mapping[str, str]

    def api_field(self, field: str) -> str:
        """The value of the node's API JSON field ``field`` (one ``NODE_FIELDS`` reads)."""
        return {"ID": self.id, "Name": self.name, "Datacenter": self.datacenter,
                "NodeClass": self.node_class, "NodePool": self.pool}[field]


@attrs.frozen
class TaskEnvInput:
    """Everything about one task that its environment is built from.

    ``alloc_dir``, ``task_dir`` and ``secrets_dir`` are the paths as the task sees them:
    the shared ``alloc`` dir, the task's ``local`` dir and its ``secrets`` dir.
    ``extra_env`` is what task hooks add (``NOMAD_TOKEN``, ``NOMAD_UNIX_ADDR``, ...).
    ``allocated_resources`` is the allocation's (the ports its group network was given).
    """

    alloc_id: str
    alloc_name: str
    alloc_index: int
    job_id: str
    job_name: str
    group: str
    task: str
    namespace: str
    region: str
    datacenter: str
    alloc_dir: str
    task_dir: str
    secrets_dir: str
    job_meta: Mapping[str, str]
    group_meta: Mapping[str, str]
    task_meta: Mapping[str, str]
    task_env: Mapping[str, str]
    cpu_mhz: int
    memory_mb: int
    extra_env: Mapping[str, str] = attrs.field(factory=dict)
    allocated_resources: Mapping[str, Any] = attrs.field(factory=dict)
    # A dispatched or periodic child's parent job ("" for any other job).
    parent_job_id: str = ""


def clean_env_key(key: str) -> str:
    """Replace every byte that is not an ASCII letter, ``_``, ``.`` or non-leading digit."""
    out = []
    for i, byte in enumerate(key.encode("utf-8")):
        ch = chr(byte)
        ok = ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ch in "_." or (i > 0 and "0" <= ch <= "9")
        out.append(ch if ok else "_")
    return "".join(out)


def _node_value(name: str, node: NodeView) -> str | None:
    if name in NODE_FIELDS:
        return node.api_field(NODE_FIELDS[name])
    if name == NODE_REGION:
        return node.region
    # "node.attr.*"/"node.meta.*" are the driver-config spellings; accept them here too.
    if name.startswith(("node." + ATTR_PREFIX, "node." + META_PREFIX)):
        name = name.removeprefix("node.")
    if name.startswith(ATTR_PREFIX):
        return node.attributes.get(name[len(ATTR_PREFIX) :])
    if name.startswith(META_PREFIX):
        return node.meta.get(name[len(META_PREFIX) :])
    return None


def interpolate(value: str, env: Mapping[str, str], node: NodeView) -> str:
    """Replace each ``${name}`` in ``value``; names that resolve to nothing stay verbatim.

    Lookup order: the env map (``${NAME}`` or ``${env.NAME}``), then the node's properties
    (``node.unique.id``, ``attr.<key>``, ``meta.<key>``, ... as listed in
    :mod:`nomad_client.structs.node_properties`). A single pass: substituted text is not
    interpolated again.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in env:
            return env[name]
        if name.startswith("env.") and name[4:] in env:
            return env[name[4:]]
        found = _node_value(name, node)
        return match.group(0) if found is None else found

    return _REFERENCE.sub(replace, value)


def interpolate_config(config: Any, env: Mapping[str, str], node: NodeView) -> Any:
    """Interpolate every string inside ``config`` (dict values, list/tuple items).

    Dict keys and non-string scalars are returned unchanged; a new structure is returned.
    """
    if isinstance(config, str):
        return interpolate(config, env, node)
    if isinstance(config, Mapping):
        return {key: interpolate_config(val, env, node) for key, val in config.items()}
    if isinstance(config, list):
        return [interpolate_config(item, env, node) for item in config]
    if isinstance(config, tuple):
        return tuple(interpolate_config(item, env, node) for item in config)
    return config


def port_env(ports: Sequence[AllocatedPort]) -> dict[str, str]:
    """Nomad's variables for the ports of the group network (``client/taskenv``): the task
    port (``to`` if set, else the host port) as ``NOMAD_PORT_``/``NOMAD_ALLOC_PORT_``; the
    host's address and port as the others (``NOMAD_ADDR_`` too, even when ``to`` is set)."""
    env: dict[str, str] = {}
    for port in ports:
        host_addr = join_host_port(port.host_ip, port.value)
        env[f"NOMAD_IP_{port.label}"] = port.host_ip
        env[f"NOMAD_HOST_IP_{port.label}"] = port.host_ip
        env[f"NOMAD_PORT_{port.label}"] = str(port.task_port)
        env[f"NOMAD_ALLOC_PORT_{port.label}"] = str(port.task_port)
        env[f"NOMAD_HOST_PORT_{port.label}"] = str(port.value)
        env[f"NOMAD_ADDR_{port.label}"] = host_addr
        env[f"NOMAD_HOST_ADDR_{port.label}"] = host_addr
    return env


def _merged_meta(inp: TaskEnvInput) -> dict[str, str]:
    merged: dict[str, str] = {}
    for layer in (inp.job_meta, inp.group_meta, inp.task_meta):
        merged.update(layer)
    return merged


def build_task_env(
    inp: TaskEnvInput, node: NodeView, host_env: Mapping[str, str]
) -> dict[str, str]:
    """The environment a task starts with.

    Built in this order, later steps overriding earlier ones: directory vars, resource
    limits, alloc/job/group/task identity, the group network's ports (``port_env``),
    ``extra_env`` from hooks, ``NOMAD_META_*``
    (key and value interpolated), then the host env only for keys still unset (minus
    ``HOST_ENV_DENYLIST``), then the task's own ``env`` block (keys and values
    interpolated; it may override any ``NOMAD_`` variable). Finally keys with a label
    prefix (``NOMAD_META_`` and the network ones) are cleaned with ``clean_env_key``.
    Empty values are not set.
    """
    env: dict[str, str] = {}

    def put(key: str, value: str) -> None:
        if value:
            env[key] = value

    put("NOMAD_ALLOC_DIR", inp.alloc_dir)
    put("NOMAD_TASK_DIR", inp.task_dir)
    put("NOMAD_SECRETS_DIR", inp.secrets_dir)

    if inp.cpu_mhz > 0:
        put("NOMAD_CPU_LIMIT", str(inp.cpu_mhz))
    if inp.memory_mb > 0:
        put("NOMAD_MEMORY_LIMIT", str(inp.memory_mb))

    put("NOMAD_ALLOC_ID", inp.alloc_id)
    put("NOMAD_SHORT_ALLOC_ID", inp.alloc_id[:8])
    put("NOMAD_ALLOC_NAME", inp.alloc_name)
    if inp.alloc_index >= 0:
        put("NOMAD_ALLOC_INDEX", str(inp.alloc_index))
    put("NOMAD_JOB_ID", inp.job_id)
    put("NOMAD_JOB_NAME", inp.job_name)
    put("NOMAD_JOB_PARENT_ID", inp.parent_job_id)
    put("NOMAD_GROUP_NAME", inp.group)
    put("NOMAD_TASK_NAME", inp.task)
    put("NOMAD_NAMESPACE", inp.namespace)
    put("NOMAD_REGION", inp.region)
    put("NOMAD_DC", inp.datacenter)

    env.update(port_env(allocated_ports(inp.allocated_resources)))
    env.update(inp.extra_env)

    for key, value in _merged_meta(inp).items():
        key_i = interpolate(key, env, node)
        value_i = interpolate(value, env, node)
        env[f"NOMAD_META_{key_i.upper()}"] = value_i
        env[f"NOMAD_META_{key_i}"] = value_i

    for key, value in host_env.items():
        if key not in env and key not in HOST_ENV_DENYLIST:
            env[key] = value

    # Interpolate the whole block against the env as it stood before it, so entries of
    # the block do not see each other (order-independent results).
    before = dict(env)
    for key, value in inp.task_env.items():
        env[interpolate(key, before, node)] = interpolate(value, before, node)

    cleaned: dict[str, str] = {}
    for key, value in env.items():
        if key.startswith(_CLEANED_PREFIXES):
            key = clean_env_key(key)
        cleaned[key] = value
    return cleaned
