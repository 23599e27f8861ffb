"""Nomad namespaces: the record the server stores for each, and the rules its fields follow.

A namespace's ``Capabilities`` restrict what its jobs may use: task drivers (Nomad's
``EnabledTaskDrivers``/``DisabledTaskDrivers``) and, ours, whether its tasks get a Task API
socket (``TaskAPI``: "" defers to the agent, else one of ``NAMESPACE_TASK_API_MODES``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from nomad_client.structs.taskapi import NAMESPACE_TASK_API_MODES

DEFAULT_NAMESPACE = "default"
DEFAULT_NAMESPACE_DESCRIPTION = "Default shared namespace"
# Nomad's rule for namespace names ("*", every namespace, is never one).
NAMESPACE_NAME = re.compile(r"[a-zA-Z0-9-]{1,128}")
NAMESPACE_NAME_RULE = "^[a-zA-Z0-9-]{1,128}$"
MAX_DESCRIPTION_LENGTH = 256


@attrs.frozen
class NamespaceCapabilities:
    enabled_task_drivers: tuple[str, ...] = ()  # empty: every driver
    disabled_task_drivers: tuple[str, ...] = ()
    task_api: str = ""  # "" or one of NAMESPACE_TASK_API_MODES

    def allows_driver(self, driver: str) -> bool:
        """Nomad's rule: a disabled driver never runs; an enabled list, when set, is the
        only drivers that do."""
        if driver in self.disabled_task_drivers:
            return False
        return not self.enabled_task_drivers or driver in self.enabled_task_drivers


@attrs.frozen
class Namespace:
    name: str
    description: str = ""
    quota: str = ""
    capabilities: NamespaceCapabilities | None = None
    meta: dict[str, str] = attrs.field(factory=dict)
    create_index: int = 0
    modify_index: int = 0

    @property
    def task_api_mode(self) -> str | None:
        """The namespace's Task API capability; None when it leaves it to the agent."""
        return (self.capabilities.task_api if self.capabilities else "") or None

    def allows_driver(self, driver: str) -> bool:
        return self.capabilities is None or self.capabilities.allows_driver(driver)


# Exists from the start in every state store, as in Nomad (indexes 1).
DEFAULT_NAMESPACE_RECORD = Namespace(name=DEFAULT_NAMESPACE,
                                     description=DEFAULT_NAMESPACE_DESCRIPTION,
                                     create_index=1, modify_index=1)


def job_namespace(job: Mapping[str, Any]) -> str:
    """The namespace a job (its API dict) is in."""
    return job.get("Namespace") or DEFAULT_NAMESPACE


def task_api_mode_problem(mode: str) -> str | None:
    """Why ``mode`` cannot be a namespace's ``Capabilities.TaskAPI``; None if it can."""
    if mode == "" or mode in NAMESPACE_TASK_API_MODES:
        return None
    allowed = ", ".join(f'"{m}"' for m in NAMESPACE_TASK_API_MODES)
    return f'invalid Task API mode {quoted(mode)}: must be one of {allowed}, or "" (unset)'


def quoted(text: str, limit: int = 200) -> str:
    """``text`` in double quotes, escaped as Go's %q would (for error messages), cut at
    ``limit`` characters: values from callers may be huge."""
    return json.dumps(text if len(text) <= limit else text[:limit] + "...")
