"""The operator's controls of the Task API (``client { task_api { ... } }``) as frozen values,
the one decision whether a task gets a socket, and the live holder a reload swaps.

The agent builds a ``TaskAPIConfig`` from its config files; the alloc runner's Task API hook
decides per task with ``decide_socket``; the HTTP layer reads the holder's current value on
every Task API request and connection, so a reload applies to the next one.
"""

from __future__ import annotations

from typing import Any

import attrs

from nomad_client.structs.taskapi import (
    AGENT_DEFAULT_MODES,
    NAMESPACE_TASK_API_MODES,
    TASK_API_DISABLED,
    TASK_API_ENABLED,
    TASK_API_OPT_IN,
)

PEER_CREDENTIALS_MODES = ("off", "log", "enforce")
DEFAULT_AUDIT_MAX_SIZE = 64 * 1024 * 1024
DEFAULT_AUDIT_MAX_FILES = 5


def _tuple(value: Any) -> tuple[str, ...]:
    return tuple(value or ())


@attrs.frozen
class RateLimitConfig:
    """A token bucket per task: ``requests_per_second`` refill, ``burst`` capacity.
    ``requests_per_second = 0`` turns the limit off."""

    requests_per_second: float = 100.0
    burst: int = 200


@attrs.frozen
class AuditConfig:
    """One JSON line per Task API request. ``path`` None: ``<data_dir>/audit/task-api.log``."""

    enabled: bool = False
    path: str | None = None
    max_size: int = DEFAULT_AUDIT_MAX_SIZE
    max_files: int = DEFAULT_AUDIT_MAX_FILES


def _rate_limit(value: RateLimitConfig | dict[str, Any]) -> RateLimitConfig:
    return value if isinstance(value, RateLimitConfig) else RateLimitConfig(**value)


def _audit(value: AuditConfig | dict[str, Any]) -> AuditConfig:
    return value if isinstance(value, AuditConfig) else AuditConfig(**value)


@attrs.frozen
class TaskAPIConfig:
    enabled: bool = True
    default_mode: str = TASK_API_ENABLED  # or TASK_API_OPT_IN
    # "METHOD /path/glob" rules, applied to Task API requests after authentication.
    allowed_endpoints: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    denied_endpoints: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    max_connections_per_task: int = 64
    rate_limit: RateLimitConfig = attrs.field(factory=RateLimitConfig, converter=_rate_limit)
    audit: AuditConfig = attrs.field(factory=AuditConfig, converter=_audit)
    peer_credentials: str = "log"  # one of PEER_CREDENTIALS_MODES
    bind_identity_to_socket: bool = False
    secrets_tmpfs: bool = True

    def to_api_dict(self) -> dict[str, Any]:
        """As shown under Config.Client.TaskAPI by GET /v1/agent/self."""
        return {
            "Enabled": self.enabled,
            "DefaultMode": self.default_mode,
            "AllowedEndpoints": list(self.allowed_endpoints),
            "DeniedEndpoints": list(self.denied_endpoints),
            "MaxConnectionsPerTask": self.max_connections_per_task,
            "RateLimit": {"RequestsPerSecond": self.rate_limit.requests_per_second,
                          "Burst": self.rate_limit.burst},
            "Audit": {"Enabled": self.audit.enabled, "Path": self.audit.path or "",
                      "MaxSize": self.audit.max_size, "MaxFiles": self.audit.max_files},
            "PeerCredentials": self.peer_credentials,
            "BindIdentityToSocket": self.bind_identity_to_socket,
            "SecretsTmpfs": self.secrets_tmpfs,
        }


@attrs.frozen
class SocketDecision:
    """Whether a task gets a socket, and why (the text of its task event when not)."""

    enabled: bool
    reason: str


def decide_socket(config: TaskAPIConfig, namespace_mode: str | None,
                  task_choice: bool | None) -> SocketDecision:
    """Precedence: the agent's ``enabled = false`` beats everything; then the namespace's
    capability (``disabled``: never; ``opt_in``: only tasks that ask; ``enabled``: every task
    that does not refuse); then the task's own choice; then the agent's ``default_mode``.
    A task may always refuse: giving up the socket never widens what it can reach."""
    if not config.enabled:
        return SocketDecision(False, "Task API is disabled on this node")
    if namespace_mode == TASK_API_DISABLED:
        return SocketDecision(False, "Task API is disabled in this namespace")
    if task_choice is False:
        return SocketDecision(False, "Task API is disabled by the task")
    if task_choice is True:
        return SocketDecision(True, "requested by the task")
    if namespace_mode == TASK_API_OPT_IN:
        return SocketDecision(False, "Task API is opt-in in this namespace and the task "
                                     "did not ask for it")
    if namespace_mode == TASK_API_ENABLED:
        return SocketDecision(True, "enabled in this namespace")
    if config.default_mode == TASK_API_OPT_IN:
        return SocketDecision(False, "Task API is opt-in on this node and the task did not "
                                     "ask for it")
    return SocketDecision(True, "enabled on this node")


class LiveTaskAPIConfig:
    """The agent's current ``TaskAPIConfig``, shared by the client and the HTTP layer. A
    reload replaces it whole; readers take ``current`` once per request or connection, so
    each sees one consistent config."""

    def __init__(self, config: TaskAPIConfig | None = None) -> None:
        self.current = config or TaskAPIConfig()

    def replace(self, config: TaskAPIConfig) -> None:
        self.current = config


__all__ = [
    "AGENT_DEFAULT_MODES",
    "NAMESPACE_TASK_API_MODES",
    "PEER_CREDENTIALS_MODES",
    "AuditConfig",
    "LiveTaskAPIConfig",
    "RateLimitConfig",
    "SocketDecision",
    "TaskAPIConfig",
    "decide_socket",
]
