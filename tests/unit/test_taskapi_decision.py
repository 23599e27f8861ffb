"""``decide_socket``: every combination of the agent's ``enabled`` and ``default_mode``, the
namespace's Task API capability and the task's own choice, against a table written out by
hand (not computed by the rules it checks)."""

from __future__ import annotations

import itertools

import pytest

from nomad_client.client.taskapi_config import SocketDecision, TaskAPIConfig, decide_socket

# What each cell of the table means: a socket, or none and the reason the task is told.
OUTCOMES = {
    "yes": None,
    "node": "Task API is disabled on this node",
    "ns": "Task API is disabled in this namespace",
    "task": "Task API is disabled by the task",
    "ns-opt": "Task API is opt-in in this namespace and the task did not ask for it",
    "node-opt": "Task API is opt-in on this node and the task did not ask for it",
}

# The agent has enabled = true. Columns: the task's choice (none, task_api { enabled = true },
# task_api { enabled = false }). A namespace mode of "-" is a namespace without a say (None),
# '""' one whose Capabilities.TaskAPI is the empty string.
TABLE = """
default_mode  namespace  none      true  false
enabled       -          yes       yes   task
enabled       ""         yes       yes   task
enabled       enabled    yes       yes   task
enabled       disabled   ns        ns    ns
enabled       opt_in     ns-opt    yes   task
opt_in        -          node-opt  yes   task
opt_in        ""         node-opt  yes   task
opt_in        enabled    yes       yes   task
opt_in        disabled   ns        ns    ns
opt_in        opt_in     ns-opt    yes   task
"""

CHOICES = (None, True, False)
NAMESPACE_MODES = {"-": None, '""': "", "enabled": "enabled", "disabled": "disabled",
                   "opt_in": "opt_in"}


def enabled_node_cases() -> list[tuple[TaskAPIConfig, str | None, bool | None, str]]:
    rows = [line.split() for line in TABLE.strip().splitlines()[1:]]
    return [(TaskAPIConfig(default_mode=default_mode), NAMESPACE_MODES[namespace], choice,
             outcome)
            for default_mode, namespace, *outcomes in rows
            for choice, outcome in zip(CHOICES, outcomes, strict=True)]


def disabled_node_cases() -> list[tuple[TaskAPIConfig, str | None, bool | None, str]]:
    # enabled = false beats everything: no namespace or task can turn it back on.
    return [(TaskAPIConfig(enabled=False, default_mode=default_mode), mode, choice, "node")
            for default_mode, mode, choice in itertools.product(
                ("enabled", "opt_in"), NAMESPACE_MODES.values(), CHOICES)]


CASES = enabled_node_cases() + disabled_node_cases()


def test_the_table_covers_every_combination() -> None:
    seen = {(c.enabled, c.default_mode, mode, choice) for c, mode, choice, _ in CASES}
    assert len(CASES) == len(seen) == 2 * 2 * len(NAMESPACE_MODES) * len(CHOICES)


@pytest.mark.parametrize(("config", "namespace_mode", "choice", "outcome"), CASES)
def test_decide_socket(config: TaskAPIConfig, namespace_mode: str | None,
                       choice: bool | None, outcome: str) -> None:
    decision = decide_socket(config, namespace_mode, choice)
    assert isinstance(decision, SocketDecision)
    reason = OUTCOMES[outcome]
    if reason is None:
        assert decision.enabled, decision.reason
    else:
        assert decision == SocketDecision(False, reason)
